"""Where the folders that priorlab ships beside its code are: the Hydra configs (`configs/`) and the named studies
(`experiments/`).

In the repository they are the top-level folders `configs/` and `experiments/`, read in place by a checkout or an
editable install (whose .pth names `src/`). A wheel holds copies of them as package data, `priorlab/configs` and
`priorlab/experiments` (setup.py copies them in when it builds), found through importlib.resources. `shipped_dir`
is the one place that decides; everything else asks it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.resources
import os
from pathlib import Path

SHIPPED = ("configs", "experiments")
ENV = {"configs": "PRIORLAB_CONFIGS"}  # a folder of the user's own configs in place of the shipped ones
SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the repository, where priorlab runs from src/priorlab
_extracted = contextlib.ExitStack()  # package data of an installed zip, extracted until the interpreter exits
atexit.register(_extracted.close)


def shipped_dir(name: str) -> Path:
    """The folder `name` ("configs" or "experiments") as a real directory (Hydra reads its config folder by path):
    $PRIORLAB_CONFIGS for the configs where set, else the installed package's data, else the repository's folder.
    """
    if name not in SHIPPED:
        raise ValueError(f"priorlab ships no folder {name!r}; it ships {', '.join(SHIPPED)}")
    if os.environ.get(ENV.get(name, "")):
        return Path(os.environ[ENV[name]])
    packaged = importlib.resources.files("priorlab").joinpath(name)
    if packaged.is_dir():
        if isinstance(packaged, Path):
            return packaged
        return Path(_extracted.enter_context(importlib.resources.as_file(packaged)))
    return SOURCE_ROOT / name


def source_root() -> Path | None:
    """The repository checkout that priorlab runs from (a checkout or an editable install); None for an install
    from a wheel, whose files belong to no checkout."""
    here = Path(__file__).resolve().parent
    if here == SOURCE_ROOT / "src" / "priorlab" and (SOURCE_ROOT / "pyproject.toml").is_file():
        return SOURCE_ROOT
    return None

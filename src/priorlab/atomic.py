"""Atomic writes: everything is written under a temporary sibling name and renamed into place, so a reader, or a
run started again after a kill, never sees half a file or half a folder."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically (creating its folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as err:  # a full or read-only disk: name the file the user knows, leave no temporary behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    return path


def write_json(path: str | Path, data, indent: int = 1) -> Path:
    """Write `data` as JSON to `path` atomically."""
    return write_text(path, json.dumps(data, indent=indent))


@contextlib.contextmanager
def folder(path: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of `path` to fill; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the folder is the user's output, made as mkdir would
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def removed_unless_started(path: str | Path, *kept: str) -> Iterator[None]:
    """Remove the folder `path` when the body fails, if `path` did not exist before it and none of `kept` (paths
    inside it) was written: a run that fails before its first checkpoint leaves no half-started run folder."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except BaseException:
        if not existed and not any((path / k).exists() for k in kept):
            shutil.rmtree(path, ignore_errors=True)
        raise


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

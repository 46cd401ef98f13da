"""The run-folder layout of a study, the one place that both writes and reads it.

    <paths.runs>/<study>/
      study.json                      name, preset, thresholds, seeds, the sessions that ran it (`claim_study_dir`)
      base/[<name>/][seed=<b>/]       each base (`study.bases`)
      prior/<name>/[seed=<b>/]        each extra prior
      finetune/[base=<name>/][<key>=<value>/...]p=<p>/seed=<s>/   each fine-tune (`finetune_subdir`)
      logs/<run label>.log            with jobs > 1 (`run_label`)

A folder level names a sweep axis by the last part of its key, cond_dropout as `p` and guidance_distill.max_scale as
`distill` (`axis_label`);
`run_axes` reads the levels back for the results table.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from priorlab import atomic
from priorlab.checks import read_json_object
from priorlab.errors import UserError
from priorlab.resources import source_root

# A sweep axis written otherwise than its key's last part, in folders and text: guidance_distill.max_scale as
# distill (distill=None: the plain fine-tune; distill=6.0: guidance distilled up to w = 6, `training.distill`)
AXIS_LABELS = {"cond_dropout": "p", "max_scale": "distill"}
FIXED_LEVELS = ("cond_dropout", "seed")  # the levels every fine-tune folder ends with


def axis_label(key: str) -> str:
    """How folders, reports and figures name an axis: cond_dropout → p, data.train_per_class → train_per_class."""
    key = key.split(".")[-1]
    return AXIS_LABELS.get(key, key)


def run_label(override: str) -> str:
    """A sweep override as a run label: data.train_per_class=5 → train_per_class=5, cond_dropout=0.1 → p=0.1."""
    key, value = override.split("=", 1)
    return f"{axis_label(key)}={value}"


def finetune_subdir(base: str, sweep: dict) -> str | None:
    """The fine-tunes' run folder: base=<name>/ (several bases), one level per sweep key other than cond_dropout
    and seed, then p=/seed=; None where that is the default folder, finetune/p=<p>/seed=<s> (the one
    configs/stage/finetune.yaml gives a fine-tune trained alone)."""
    extra = "".join(f"{axis_label(key)}=${{{key}}}/" for key in sweep if key not in FIXED_LEVELS)
    if not base and not extra:
        return None
    fixed = "/".join(f"{axis_label(key)}=${{{key}}}" for key in FIXED_LEVELS)
    return f"finetune/{f'base={base}/' if base else ''}{extra}{fixed}"


def run_axes(run_dir: Path, study_dir: Path) -> dict[str, str]:
    """The study axes a fine-tune's folder names besides p and seed: finetune/base=a/max_steps=200/p=0/seed=0
    → {"base_name": "a", "max_steps": "200"} (`base` is a prior's name, so the base's axis is `base_name`)."""
    levels = [level.split("=", 1) for level in run_dir.relative_to(study_dir / "finetune").parts if "=" in level]
    fixed = {axis_label(key) for key in FIXED_LEVELS}
    return {("base_name" if key == "base" else key): value for key, value in levels if key not in fixed}


def claim_study_dir(study_dir: Path, name: str, preset: str, **record) -> dict:
    """Mark the folder as this study's (study.json, with `record` added), or refuse a folder that holds another
    study's runs. Returns what study.json holds."""
    marker = study_dir / "study.json"
    if marker.exists():
        held = study_record(marker)
        if (held.get("name"), held.get("preset")) != (name, preset):
            raise UserError(
                f"{study_dir} holds the runs of study {held.get('name')} preset {held.get('preset')}; "
                f"choose another paths.runs for {name} preset {preset}, or remove that folder"
            )
        held.update(record)
        atomic.write_json(marker, held)
        return held
    if study_dir.exists() and any(study_dir.iterdir()):
        raise UserError(f"{study_dir} already holds files that are not a priorlab study; choose another paths.runs")
    held = {"name": name, "preset": preset, **record}
    atomic.write_json(marker, held)
    return held


def machine() -> dict:
    """What the study ran on: the accelerator (its name), the CPU and its core count."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]  # fmt: skip
        cpu = names[0] if names else cpu
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"accelerator": ", ".join(gpus) if gpus else "none (CPU)", "cpu": cpu, "cores": os.cpu_count()}


def commit() -> str | None:
    """The git commit of the priorlab checkout ($PRIORLAB_COMMIT where set), with -dirty for uncommitted changes;
    None where priorlab was installed from a wheel (its files are no checkout's, whatever folder holds them)."""
    if os.environ.get("PRIORLAB_COMMIT"):
        return os.environ["PRIORLAB_COMMIT"]
    root = source_root()
    if root is None:
        return None
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def study_record(path: str | Path) -> dict:
    """study.json (`path`), checked: a JSON object whose name and preset are names, validity a mapping of
    numbers, base_seeds and seeds lists of whole numbers, sessions a list, primary_scale a number (or null) and main
    a mapping of condition keys to lists of values; a UserError naming the file otherwise."""
    path = Path(path)
    remedy = ('restore it, or write {"name": "<study>", "preset": "<preset>"} there and run `priorlab study <study> '
              'preset=<preset>` again (its finished runs are kept)')  # fmt: skip
    held = read_json_object(path, "a study record", remedy)
    kinds = {"name": (str,), "preset": (str,), "validity": (dict, type(None)), "base_seeds": (list, type(None)),
             "seeds": (list,), "sessions": (list,), "primary_scale": (int, float, type(None)),
             "main": (dict, type(None))}  # fmt: skip
    for key, types in kinds.items():
        if key in held and not isinstance(held[key], types):
            raise UserError(f"{path}: {key}={held[key]!r} is not {' or '.join(t.__name__ for t in types)}; {remedy}")
    numbers = [*(held.get("validity") or {}).values(), *(held.get("base_seeds") or []), *held.get("seeds", [])]
    numbers += [held["primary_scale"]] if held.get("primary_scale") is not None else []
    main = (held.get("main") or {}).values()
    if not all(isinstance(v, list) and all(isinstance(x, str | int | float) for x in v) for v in main):
        raise UserError(f'{path}: main must map condition keys to lists of values, e.g. {{"base_name": ["broad"]}}; '
                        f"{remedy}")  # fmt: skip
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
        raise UserError(f"{path}: validity, base_seeds, seeds and primary_scale must hold numbers; {remedy}")
    return held

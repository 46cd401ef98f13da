"""The settings of a study's runs given on the `priorlab study` command line, over those of its preset.

`priorlab study NAME data=hf data.source=imgs sweep.cond_dropout=[0,0.1] base_steps=500` sets, for every run,
what the command line says; the preset's settings apply where it says nothing. Precedence, first wins: the command
line, the preset (its `bases` entry, then `base`/`finetune`, then `common`), the experiment's `common`, the
config defaults. A key=value that is not the study's own (STUDY_KEYS) is a `priorlab train` setting of every run;
one that `priorlab train` does not take either is refused. A config group chosen on the command line (data=hf,
model=unet_tiny) replaces the preset's choice; the preset's settings inside that group (model.hidden=32) are kept
where the new config has the key and left out, as the dry run says, where it does not.
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from priorlab.errors import UserError
from priorlab.overrides import override

# The study's own settings (configs/study.yaml); any other key=value is a setting of every run.
STUDY_KEYS = ("name", "preset", "sweep", "base_steps", "finetune_steps", "base_seeds", "jobs", "launcher",
              "experiments", "extra", "overrides", "launcher_overrides", "dry_run", "paths", "hydra")  # fmt: skip
# Settings the study itself gives each run: the command line cannot set them for every run.
SET_BY_STUDY = {"seed": "sweep.seed=[...]", "cond_dropout": "sweep.cond_dropout=[...]", "stage": None,
                "base": None, "study": None, "paths.run_dir": None, "stage.run_subdir": None}  # fmt: skip
STEPS = {"base_steps": "trainer.max_steps", "finetune_steps": "trainer.max_steps"}


def route_study_args(args: list[str]) -> list[str]:
    """The `priorlab study` command line for Hydra: the study's own overrides as they are (a `sweep.KEY=...`
    added where the preset has no such axis), `hydra.launcher.KEY=...` (the SLURM jobs' settings, not the study's
    own launcher's) collected into `launcher_overrides=[...]`, every other key=value into `overrides=[...]`."""

    own, runs, launcher = [], [], []
    for arg in args:
        key, sep, _ = arg.partition("=")
        name = key.lstrip("+~")
        if sep and name.startswith("hydra.launcher."):
            launcher.append(arg)
        elif arg.startswith("-") or not sep or name.split(".")[0] in STUDY_KEYS:
            own.append(f"++{arg}" if name.startswith("sweep.") and key == name else arg)
        else:
            runs.append(arg)
    own += [override("launcher_overrides", launcher)] if launcher else []
    return [*own, override("overrides", runs)] if runs else own


def _key(arg: str) -> str:
    return arg.partition("=")[0].lstrip("+~")


def run_overrides(cfg: DictConfig) -> list[str]:
    """The command line's settings of every run (`extra=[...]` and the other key=value), refusing those that
    the study sets itself."""
    given = [*cfg.get("extra", []), *cfg.get("overrides", [])]
    for arg in given:
        key = _key(arg)
        if not isinstance(arg, str) or "=" not in arg:
            raise UserError(f"{arg!r} is not a key=value setting of the study's runs")
        if key in SET_BY_STUDY:
            use = SET_BY_STUDY[key]
            raise UserError(f"{key} is set by the study for each run; "
                            + (f"give its values as {use}" if use else "leave it out"))  # fmt: skip
    return list(given)


def step_overrides(cfg: DictConfig) -> dict[str, list[str]]:
    """trainer.max_steps for the bases (`base_steps`) and the fine-tunes (`finetune_steps`), where given."""
    out = {}
    for key, stage in (("base_steps", "base"), ("finetune_steps", "finetune")):
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{key}={value!r} must be a whole number of steps, at least 1")
        out[stage] = [] if value is None else [f"{STEPS[key]}={value}"]
    return out


def given_sweep(cfg: DictConfig) -> dict[str, list | None]:
    """The command line's sweep axes (`sweep.data.train_per_class=[5,all]` → {"data.train_per_class": [5, "all"]});
    a single value is an axis of one, null removes a preset's axis."""
    sweep = OmegaConf.to_container(cfg.get("sweep") or OmegaConf.create({}), resolve=True)
    out: dict[str, list | None] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            if isinstance(value, dict) and value:
                walk(value, f"{prefix}{key}.")
            else:
                out[f"{prefix}{key}"] = value if value is None or isinstance(value, list) else [value]

    walk(sweep, "")
    for key, values in out.items():
        if values is None and key in ("cond_dropout", "seed"):
            raise UserError(f"sweep.{key} cannot be removed; give its values, e.g. sweep.{key}=[0,1]")
        if values is not None and not values:
            raise UserError(f"sweep.{key}=[] has no values; give at least one, or sweep.{key}=null to drop the axis")
    return out


def merge_sweep(preset: dict, given: dict[str, list | None]) -> dict:
    """The preset's sweep with the command line's axes: a given axis replaces the preset's in its place, a new
    one comes before cond_dropout and seed (the run folders' order), null removes one."""
    merged = {k: v for k, v in preset.items() if k not in ("cond_dropout", "seed")}
    for key, values in given.items():
        if key not in ("cond_dropout", "seed"):
            merged[key] = values
    merged = {k: v for k, v in merged.items() if v is not None}
    for key in ("cond_dropout", "seed"):
        merged[key] = given.get(key) or preset.get(key)
    return merged


def group_choices(overrides: list[str], config_dir: Path) -> dict[str, str]:
    """The config groups chosen in a list of overrides (data=hf → {"data": "hf"}), the last choice of each."""
    out = {}
    for arg in overrides:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if sep and re.fullmatch(r"[\w-]+", key) and (config_dir / key).is_dir():
            out[key] = value
    return out


def has_key(cfg: DictConfig, key: str) -> bool:
    """Whether `key` (dotted) is a setting of `cfg`, its value missing (???) included."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in list(node.keys())


def apply_given(runs: list[str], given: list[str], compose, config_dir: Path) -> tuple[list[str], list[str]]:
    """A run's overrides from its preset followed by the command line's (`given`), without the preset's settings
    inside a config group that `given` replaces and whose new config lacks them; (overrides, those left out)."""
    replaced = group_choices(given, config_dir)
    inside = [a for a in runs if not a.startswith("+") and _key(a).split(".")[0] in replaced and "." in _key(a)]
    if not inside:
        return [*runs, *given], []
    cfg = compose([f"{g}={v}" for g, v in {**group_choices(runs, config_dir), **replaced}.items()])
    dropped = [a for a in inside if not has_key(cfg, _key(a))]
    return [a for a in runs if a not in dropped] + given, dropped


def describe(name: str, preset: str, composed: tuple[DictConfig, DictConfig], sweep: dict, runs: tuple[int, int],
             left_out: list[str]) -> str:  # fmt: skip
    """The dry run's summary of the effective settings: data, model, step counts, sweep, and the preset's
    settings that the command line's group choices left out. `composed`: the first base's and first fine-tune's
    training configs with Hydra's; `runs`: how many bases and fine-tunes."""
    base, finetune = composed
    choices = finetune.hydra.runtime.choices

    def group(key: str) -> str:
        node = OmegaConf.to_container(finetune[key], resolve=True)
        return f"{choices[key]} (" + ", ".join(f"{k}={v}" for k, v in node.items() if not k.startswith("_")) + ")"

    axes = " × ".join(f"{key}={list(values)}" for key, values in sweep.items())
    lines = [
        f"study {name}, preset {preset}: the command line's settings, else the preset's, else the study's common "
        "ones, else the config defaults",
        f"  data:       {group('data')}",
        f"  model:      {group('model')}",
        f"  trainer:    {choices['trainer']}; eval: {choices['eval']}; logger: {choices['logger']}",
        f"  bases:      {runs[0]} of trainer.max_steps={base.trainer.max_steps}",
        f"  fine-tunes: {runs[1]} of trainer.max_steps={finetune.trainer.max_steps}: {axes}",
    ]
    if left_out:
        lines.append(f"  left out:   {', '.join(left_out)} (the preset's; not settings of the command line's "
                     "config choice)")  # fmt: skip
    return "\n".join(lines)

"""An experiment file (experiments/NAME.yaml) and its presets: each preset's overrides, sweep, bases, extra priors,
seeds and validity thresholds, checked with messages that say what to change; and the sweep's grid."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import yaml

from priorlab.errors import UserError
from priorlab.overrides import override, override_value
from priorlab.resources import shipped_dir
from priorlab.study.settings import merge_sweep

EXPERIMENTS_DIR = shipped_dir("experiments")

LAUNCHERS = ("basic", "slurm")  # here, one run or `jobs` at a time | every run a SLURM job (`study.slurm`)


def load_experiment(name: str, experiments_dir: str | Path | None = None) -> dict:
    """The experiment spec of a name (experiments/NAME.yaml) or of a YAML path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(experiments_dir or EXPERIMENTS_DIR) / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(experiments_dir or EXPERIMENTS_DIR).glob("*.yaml"))
        raise UserError(f"no experiment {name!r} (looked for {path}); known: {', '.join(known) or 'none'}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from err
    except OSError as err:  # a folder named NAME.yaml, a file it may not read
        raise UserError(f"{path} cannot be read ({err.strerror or type(err).__name__})") from err
    if not isinstance(spec, dict):
        raise UserError(f"{path} must hold a mapping with a `presets` key")
    spec.setdefault("name", path.stem)
    return spec


def chosen_preset(spec: dict, preset: str | None) -> str:
    """The preset to run: the one given, else the experiment's `default_preset`, else `quick`."""
    presets = spec.get("presets") or {}
    if preset is None:
        preset = spec.get("default_preset") or ("quick" if "quick" in presets else None)
    if preset is None:
        raise UserError(f"experiment {spec['name']} has no default preset; choose one with preset=NAME: "
                        f"{', '.join(presets)}")  # fmt: skip
    return str(preset)


def preset_overrides(spec: dict, preset: str, sweep: dict | None = None, base_seeds: list | None = None) -> dict:
    """The preset's override lists (common, base, finetune) and its sweep, with the command line's sweep axes
    (`study.settings.merge_sweep`) and base seeds where given."""
    presets = spec.get("presets", {})
    if preset not in presets:
        raise UserError(f"experiment {spec['name']} has no preset {preset!r}; presets: {', '.join(presets)}")
    p = presets[preset]
    sweep = merge_sweep(p.get("sweep", {}), sweep or {})
    if not sweep.get("cond_dropout") or not sweep.get("seed"):
        raise UserError(f"preset {preset} of {spec['name']} needs sweep.cond_dropout and sweep.seed lists")
    where = f"preset {preset} of {spec['name']}"
    return {
        "common": [*spec.get("common", []), *p.get("common", [])],
        "base": p.get("base", []),
        "finetune": p.get("finetune", []),
        "sweep": sweep,
        "bases": check_bases(p.get("bases"), where, sweep),
        "priors": check_priors(p.get("priors"), where, p.get("bases")),
        "base_seeds": check_base_seeds(p.get("base_seeds") if base_seeds is None else base_seeds, sweep["seed"], where),
        "validity": check_validity({**spec.get("validity", {}), **p.get("validity", {})}, where),
        "jobs": p.get("jobs", 1),
        "primary_scale": check_primary_scale(p.get("primary_scale"), where),
        "main": check_main(p.get("main"), where),
    }


def check_primary_scale(scale, where: str) -> float | None:
    """The preset's `primary_scale`: the one guidance scale declared before the study runs, at which its report
    states findings without a multiple-comparison correction (the other scales are secondary, Holm-corrected)."""
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 1:
        raise UserError(f"{where}: `primary_scale` must be a guidance scale above 1 (e.g. 1.5), got {scale!r}")
    return float(scale)


def check_main(main, where: str) -> dict[str, list[str]] | None:
    """The preset's `main` conditions: a mapping from a condition key (a study axis such as base_name, or
    cond_dropout) to its values; the conditions matching every entry are the ones the study is about (the
    validity check "guidance pays" asks it of them). None: every condition."""
    if main is None:
        return None
    if not isinstance(main, dict) or not main or not all(isinstance(v, list) and v for v in main.values()):
        raise UserError(f"{where}: `main` must map condition keys to lists of values, e.g. {{base_name: [broad]}}")
    return {str(k): [str(v) for v in values] for k, values in main.items()}


def check_base_seeds(base_seeds: list | None, seeds: list, where: str) -> list[int] | None:
    """The preset's `base_seeds`: distinct whole numbers, no more of them than fine-tune seeds."""
    if base_seeds is None:
        return None
    if (not isinstance(base_seeds, list) or not base_seeds or len(set(map(str, base_seeds))) != len(base_seeds)
            or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in base_seeds)):  # fmt: skip
        raise UserError(f"{where}: `base_seeds` must be a list of distinct non-negative whole numbers")
    if len(base_seeds) > len(seeds):
        raise UserError(f"{where}: {len(base_seeds)} base_seeds for {len(seeds)} fine-tune seeds; a base seed "
                        "without a fine-tune would be trained for nothing")  # fmt: skip
    return list(base_seeds)


def check_validity(validity: dict, where: str) -> dict:
    """The preset's validity thresholds (unknown keys refused), merged over the defaults."""
    from priorlab.analysis.validity import THRESHOLDS

    if not isinstance(validity, dict) or set(validity) - set(THRESHOLDS):
        known = ", ".join(THRESHOLDS)
        raise UserError(f"{where}: `validity` takes only {known}; got {validity!r}")
    return {**THRESHOLDS, **{k: float(v) for k, v in validity.items()}}


def check_bases(bases: dict | None, where: str, sweep: dict | None = None) -> dict[str, dict] | None:
    """The `bases` of a preset: name → lists of overrides under common (base and fine-tunes), base, finetune, and
    the base's `priors` (other bases as extra priors) and `sweep` (its own values of some of `sweep`'s keys)."""
    if bases is None:
        return None
    if not isinstance(bases, dict) or not bases:
        raise UserError(f"{where}: `bases` must map each base's name to its overrides")
    out = {}
    for name, entry in bases.items():
        entry = entry or {}
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(name)):
            raise UserError(f"{where}: base name {name!r} may hold only letters, digits, '_', '.' and '-'")
        if not isinstance(entry, dict) or set(entry) - {"common", "base", "finetune", "priors", "sweep", "path"}:
            raise UserError(f"{where}: base {name} takes only `common`, `base` and `finetune` override lists, "
                            "`priors`, `sweep` and `path`")  # fmt: skip
        out[str(name)] = {key: list(entry.get(key) or []) for key in ("common", "base", "finetune")}
        if entry.get("path") is not None:  # a base trained elsewhere
            out[str(name)]["path"] = check_base_path(entry["path"], entry, str(name), where)
        out[str(name)]["priors"] = check_base_priors(entry.get("priors"), str(name), bases, where)
        out[str(name)]["sweep"] = check_base_sweep(entry.get("sweep"), str(name), sweep, where)
    return out


def check_base_path(path, entry: dict, name: str, where: str) -> str:
    """A base's `path`: a model trained elsewhere (a diffusers UNet2DModel or DiT folder or pipeline folder, or a
    priorlab model folder, or a hub name: `models.hub`), which the study fine-tunes without training a base; it
    takes no `base` overrides."""
    if not isinstance(path, str) or not path:
        raise UserError(f"{where}: base {name}'s `path` must name a folder: a diffusers model or pipeline folder, or "
                        "a priorlab model folder; or a hub name (org/name[@revision])")  # fmt: skip
    if entry.get("base"):
        raise UserError(f"{where}: base {name} has a `path` (a base trained elsewhere, not trained by the study) and "
                        "`base` overrides; drop one")  # fmt: skip
    return path


def check_base_sweep(own, name: str, sweep: dict, where: str) -> dict[str, list]:
    """A base's `sweep`: values of some of the preset's sweep keys (not seed) for this base's fine-tunes only, e.g. a
    control run at one data size. The keys stay the preset's, so every base's run folders have the same levels."""
    if own is None:
        return {}
    keys = [k for k in sweep or {} if k != "seed"]
    if not isinstance(own, dict) or not all(k in keys and isinstance(v, list) and v for k, v in own.items()):
        raise UserError(f"{where}: base {name}'s `sweep` must give lists of values for some of the preset's sweep "
                        f"keys ({', '.join(keys)})")  # fmt: skip
    return dict(own)


def check_base_priors(priors, name: str, bases: dict, where: str) -> dict[str, str]:
    """A base's `priors`: extra prior name → another base of the preset, whose model (of the same base seed)
    evaluates this base's fine-tunes as prior=<name>: a diffusion model the fine-tune did not start from (the
    paper's second claim), at no extra training."""
    from priorlab.priors.modes import check_extra_priors

    if priors is None:
        return {}
    others = [str(b) for b in bases if str(b) != name]
    if not isinstance(priors, dict) or not all(str(v) in others for v in priors.values()):
        example = others[0] if others else "NAME"
        raise UserError(f"{where}: base {name}'s `priors` must map prior names to other bases of the preset "
                        f"({', '.join(others) or 'none'}), e.g. {{other: {example}}}")  # fmt: skip
    try:
        check_extra_priors(priors)
    except UserError as err:
        raise UserError(f"{where}: base {name}: {err}") from err
    return {str(k): str(v) for k, v in priors.items()}


def check_priors(priors: dict | None, where: str, bases: dict | None = None) -> dict[str, list[str]]:
    """The `priors` of a preset: name → the overrides of a base trained as an extra prior (e.g. a smaller network,
    issue 17's cheap prior), which every fine-tune's evaluation uses beside the base, reported as prior=<name>.
    Not with several `bases` yet: each would need a prior trained with its own settings."""
    from priorlab.priors.modes import check_extra_priors

    if priors is None:
        return {}
    if bases:
        raise UserError(f"{where}: `priors` and `bases` together are not supported yet (each base would need its own "
                        "prior); give the extra priors to a preset with one base")  # fmt: skip
    if not isinstance(priors, dict) or not priors:
        raise UserError(f"{where}: `priors` must map each extra prior's name to the overrides of its base run")
    for name, overrides in priors.items():
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise UserError(f"{where}: prior {name} takes a list of overrides of its base run, e.g. [model.hidden=32]")
    try:
        check_extra_priors(priors)
    except UserError as err:
        raise UserError(f"{where}: {err}") from err
    return {str(name): list(overrides) for name, overrides in priors.items()}


def sweep_values(values: list) -> str:
    """A sweep's values as the text of a Hydra multirun override (v1,v2,...), each quoted where it must be."""
    return ",".join(override_value(v) for v in values)


def sweep_yaml(name: str, base_dir: Path, common: list[str], finetune: list[str], sweep: dict) -> str:
    """A W&B sweep config running the same fine-tunes through `wandb agent` (grid over the sweep)."""
    fixed = ["train", "stage=finetune", override("base", base_dir), *common, *finetune]
    config = {
        "name": name,
        "program": "priorlab",
        "method": "grid",
        "command": ["${program}", *fixed, "${args_no_hyphens}"],
        "parameters": {key: {"values": list(values)} for key, values in sweep.items()},
    }
    return yaml.safe_dump(config, sort_keys=False)


def sweep_points(sweep: dict) -> list[list[str]]:
    """Every point of the sweep grid as a list of overrides (key=value), the last key varying fastest."""
    return [
        [override(k, v) for k, v in zip(sweep, values, strict=True)] for values in itertools.product(*sweep.values())
    ]

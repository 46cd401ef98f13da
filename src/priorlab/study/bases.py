"""A study's bases (one, several named, each once per base seed) and its extra priors, each with the overrides of
its training run and of its fine-tunes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from priorlab.errors import UserError
from priorlab.overrides import override
from priorlab.study.layout import finetune_subdir


@dataclass
class BaseRuns:
    """One base of a study and the overrides of its training run and of its fine-tunes (without the sweep)."""

    label: str
    base_dir: Path
    base: list[str]
    finetune: list[str]
    seeds: list  # the fine-tune seeds that start from this base
    priors: dict = field(default_factory=dict)  # extra prior's folder → (settings shared with the base, its own)
    others: dict = field(default_factory=dict)  # prior name → another base's folder (`priors` of a base)
    sweep: dict = field(default_factory=dict)  # the base's own values of some sweep keys (`sweep` of a base)
    pretrained: bool = False  # a base trained elsewhere (`path` of a base): fine-tuned, never trained by the study

    def grid(self, sweep: dict) -> dict:
        """The sweep of this base's fine-tunes: the preset's, with the base's own values and its seeds."""
        return {**sweep, **self.sweep, "seed": self.seeds}


def with_priors(bases: list[BaseRuns], study_dir: Path, common: list[str], parts: dict) -> list[BaseRuns]:
    """The preset's extra priors (`priors`), each trained as a base under prior/<name>/ (…/seed=<b>/ with base
    seeds: the fine-tunes from base seed b use the prior of seed b), given to the fine-tunes as extra_priors."""
    for b in bases:
        seed = b.base_dir.name.split("=", 1)[1] if parts.get("base_seeds") else None  # base/seed=<b>/
        for name, own in parts["priors"].items():
            folder = study_dir / "prior" / name
            folder = folder / f"seed={seed}" if seed is not None else folder
            # (the settings shared with the base, the prior's own): the command line's settings go between them
            placed = [
                *([f"seed={seed}"] if seed is not None else []),
                f"stage.run_subdir={folder.relative_to(study_dir)}",
            ]
            b.priors[folder] = ([*common, *parts["base"]], [*own, *placed])
            b.finetune = [*b.finetune, override(f"+extra_priors.{name}", folder)]
    return bases


def check_finished_have_priors(study_dir: Path, names: list[str]) -> None:
    """Refuse a study whose finished fine-tunes were evaluated without one of its extra priors (`priors:` added
    after they finished): a finished run is skipped, so it would never be evaluated with it."""
    missing = []
    for done in sorted((study_dir / "finetune").rglob("done.json")) if (study_dir / "finetune").exists() else []:
        config = done.parent / "config.yaml"
        held = (yaml.safe_load(config.read_text()) or {}).get("extra_priors") or {} if config.exists() else {}
        if set(names) - set(held):
            missing.append(done.parent.relative_to(study_dir).as_posix())
    if missing:
        raise UserError(f"{len(missing)} finished fine-tune(s) of {study_dir} (e.g. {missing[0]}) were evaluated "
                        f"without the extra prior(s) {', '.join(names)}, and a finished run is not evaluated "
                        "again; evaluate them with `priorlab evaluate model=RUN base=BASE extra_priors.NAME=PATH`, or "
                        "run the study in another paths.runs")  # fmt: skip


def prior_jobs(bases: list[BaseRuns]) -> list[tuple[str, list[str]]]:
    """The training jobs of the extra priors, each once however many bases use it."""
    runs = {folder: [*shared, *own] for b in bases for folder, (shared, own) in b.priors.items()}
    return [("_".join(folder.parts[-2:] if folder.name.startswith("seed=") else ("prior", folder.name)),
             ["train", "stage=base", *overrides]) for folder, overrides in runs.items()]  # fmt: skip


def base_folder(study_dir: Path, name: str, entry: dict) -> Path:
    """A named base's model: base/<name>/ of the study, or its `path` (a diffusers or priorlab model trained
    elsewhere, checked to be one here, before anything runs). A hub name (`models.hub`) is fetched here and given
    to the fine-tunes at the commit it resolved to (org/name@commit), so that every fine-tune of the study starts
    from the same weights."""
    if entry.get("path") is None:
        return study_dir / "base" / name
    from priorlab.models.hub import hub_model
    from priorlab.models.io import resolve_model_dir

    role = f"bases.{name}.path"
    hub = hub_model(str(entry["path"]), role)
    folder = Path(f"{hub.repo_id}@{hub.commit}") if hub else Path(entry["path"]).expanduser().resolve()
    resolve_model_dir(folder, role=role)
    return folder


def trained_bases(bases: list[BaseRuns]) -> list[BaseRuns]:
    """The bases the study trains (not those given by `path`)."""
    return [b for b in bases if not b.pretrained]


def study_bases(study_dir: Path, common: list[str], parts: dict) -> list[BaseRuns]:
    """The bases of a preset: one under base/ without `bases`, else one under base/<name>/ each; with
    `base_seeds`, each of those once per base seed (…/seed=<b>/), the fine-tune seeds dealt out in turn."""
    seeds = list(parts["sweep"]["seed"])
    if parts["bases"] is None:
        subdir = finetune_subdir("", parts["sweep"])
        folder = [f"stage.run_subdir={subdir}"] if subdir else []
        named = [BaseRuns("", study_dir / "base", [*common, *parts["base"]], [*common, *parts["finetune"], *folder],
                          seeds)]  # fmt: skip
    else:
        named = []
        folders = {name: base_folder(study_dir, name, entry) for name, entry in parts["bases"].items()}
        for name, entry in parts["bases"].items():
            own = [*common, *entry["common"]]
            others = {p: folders[other] for p, other in entry["priors"].items()}
            named.append(BaseRuns(name, folders[name],
                                  [*own, *parts["base"], *entry["base"], f"stage.run_subdir=base/{name}"],
                                  [*own, *parts["finetune"], *entry["finetune"],
                                   f"stage.run_subdir={finetune_subdir(name, parts['sweep'])}"],
                                  seeds, others=others, sweep=entry["sweep"],
                                  pretrained=entry.get("path") is not None))  # fmt: skip
    base_seeds = parts.get("base_seeds")
    if base_seeds and any(b.pretrained for b in named):
        raise UserError("a base given by `path` is trained elsewhere, once: it takes no base_seeds; leave base_seeds "
                        "out or train the base in the study")  # fmt: skip
    if not base_seeds:
        for b in named:
            b.finetune += [override(f"+extra_priors.{p}", folder) for p, folder in b.others.items()]
        return named
    out = []
    for b in named:
        for i, seed in enumerate(base_seeds):
            folder = b.base_dir / f"seed={seed}"
            label = f"{b.label}_seed={seed}" if b.label else f"seed={seed}"
            own = [o for o in b.base if not o.startswith("stage.run_subdir=")]
            others = {p: other / f"seed={seed}" for p, other in b.others.items()}
            extra = [override(f"+extra_priors.{p}", other) for p, other in others.items()]
            out.append(BaseRuns(label, folder,
                                [*own, f"seed={seed}", f"stage.run_subdir={folder.relative_to(study_dir)}"],
                                [*b.finetune, *extra], seeds[i :: len(base_seeds)], others=others,
                                sweep=b.sweep))  # fmt: skip
    return out

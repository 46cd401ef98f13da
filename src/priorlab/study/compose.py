"""The training configs of a study's runs, composed as `priorlab train` would compose them: to refuse an unknown
setting before anything runs, to apply the command line's settings, to find finished runs, and to train the
evaluator once before the fine-tunes that share it."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from priorlab.errors import UserError
from priorlab.overrides import CONFIG_DIR, override, rewrite_overrides
from priorlab.study.bases import BaseRuns
from priorlab.study.settings import STUDY_KEYS, apply_given
from priorlab.study.spec import sweep_points


def compose_train(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The `priorlab train` config with these overrides, as the command would compose it (with `hydra_config`,
    Hydra's own under `hydra`: the group choices)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    overrides = rewrite_overrides("train", overrides)
    if GlobalHydra.instance().is_initialized():  # inside `priorlab study`, a Hydra app over the same configs
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def launches_ddp_processes(overrides: list[str]) -> bool:
    """Whether `priorlab train` with these overrides asks for a DDP trainer of several processes, started by
    re-running the command line (Lightning's `ddp` strategy; not `ddp_spawn`, and not on one device)."""
    trainer = compose_train(overrides).trainer
    strategy = trainer.get("strategy")
    name = str(strategy if isinstance(strategy, str) or strategy is None else strategy.get("_target_", "")).lower()
    relaunching = any(k in name for k in ("ddp", "fsdp", "deepspeed")) and not any(
        k in name for k in ("spawn", "fork", "notebook")
    )
    return relaunching and trainer.get("devices", 1) != 1


def prepare_evaluator(overrides: list[str]) -> None:
    """Train and cache, once, the evaluator that the fine-tunes' evaluation callbacks would each train on first
    use (jobs running at once would race to train the same one)."""
    from hydra.utils import instantiate

    from priorlab.evaluation.setup import ensure_evaluator, evaluator_dir

    cfg = compose_train(overrides)
    callbacks = cfg.get("callbacks") or {}
    evaluating = [callbacks[k] for k in ("conditional_quality", "prior_quality") if k in callbacks]
    if not evaluating:
        return
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    path = evaluating[0].get("evaluator") or evaluator_dir(cfg.paths.runs, datamodule)
    ensure_evaluator(path, datamodule, steps=int(cfg.eval.get("evaluator_steps", 1500)), progress=True)


def with_command_line(bases: list[BaseRuns], given: list[str], steps: dict) -> tuple[list[BaseRuns], list[str]]:
    """The bases with the command line's settings after the preset's (`study.settings.apply_given`): those of
    every run, then base_steps or finetune_steps; and the preset's settings left out."""
    left_out: list[str] = []
    for b in bases:
        # an extra prior keeps its own settings over the command line's (a smaller width stays smaller)
        b.priors = {folder: (apply_given(shared, [*given, *steps["base"]], compose_train, CONFIG_DIR)[0], own)
                    for folder, (shared, own) in b.priors.items()}  # fmt: skip
        b.base, dropped = apply_given(b.base, [*given, *steps["base"]], compose_train, CONFIG_DIR)
        b.finetune, dropped_too = apply_given(b.finetune, [*given, *steps["finetune"]], compose_train, CONFIG_DIR)
        left_out += [d for d in dict.fromkeys(dropped + dropped_too) if d not in left_out]
    return bases, left_out


def check_runs(b: BaseRuns, point: list[str]) -> None:
    """Compose a base's training config and its first fine-tune's, so that a setting neither the study nor
    `priorlab train` takes is refused before anything runs, naming the valid ones."""
    from priorlab.diagnose import composition_error

    for overrides in (["stage=base", *b.base], ["stage=finetune", override("base", b.base_dir), *b.finetune, *point]):
        try:
            compose_train(overrides)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors: one line naming the key
            message = composition_error("train", CONFIG_DIR, overrides, err)
            own = ", ".join(k for k in STUDY_KEYS if k not in ("hydra", "overrides", "launcher_overrides"))
            sep = " " if message.endswith("?") else ". "
            raise UserError(f"{message}{sep}A study takes its own settings ({own}) and those of `priorlab train` "
                            "for every run") from err  # fmt: skip


def first_configs(b: BaseRuns, parts: dict) -> tuple[DictConfig, DictConfig]:
    """The training configs of the study's first base and first fine-tune, with Hydra's (its group choices)."""
    point = sweep_points(b.grid(parts["sweep"]))[0]
    finetune = ["stage=finetune", override("base", b.base_dir), *b.finetune, *point]
    return compose_train(["stage=base", *b.base], hydra_config=True), compose_train(finetune, hydra_config=True)


def unfinished(jobs: list[tuple[str, list[str]]], name: str) -> list[tuple[str, list[str]]]:
    """The `priorlab train` jobs whose run folder holds no done.json. A finished run is checked here as the command
    would check it (its recorded settings and base: `priorlab.training.resume.check_resume`) and skipped, which
    saves the start of a process per finished run when a study resumes (about 12 s each on a GPU host)."""
    from priorlab.commands.train import DONE, adopt_base_schedule
    from priorlab.training.resume import check_resume

    out = []
    for label, args in jobs:
        cfg = compose_train(args[1:])
        run_dir = Path(cfg.paths.run_dir)
        if not (run_dir / DONE).exists():
            out.append((label, args))
            continue
        adopt_base_schedule(cfg)  # a diffusers base's schedule, as the command adopts it
        check_resume(cfg, run_dir, finished=True)
        print(f"[study {name}] {label} is finished; skipping", flush=True)
    return out

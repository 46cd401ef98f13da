"""`priorlab study NAME`: the bases, the fine-tunes of each, results and report; resumable (`priorlab.study`)."""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from priorlab import forkserver
from priorlab.errors import UserError
from priorlab.overrides import override
from priorlab.study.bases import (
    BaseRuns,
    check_finished_have_priors,
    prior_jobs,
    study_bases,
    trained_bases,
    with_priors,
)
from priorlab.study.compose import (
    check_runs,
    first_configs,
    launches_ddp_processes,
    prepare_evaluator,
    unfinished,
    with_command_line,
)
from priorlab.study.layout import claim_study_dir, commit, machine, run_label
from priorlab.study.progress import StudyProgress, duration
from priorlab.study.schedule import exit_on_sigterm, run_parallel, run_priorlab, shell_line
from priorlab.study.settings import describe, given_sweep, run_overrides, step_overrides
from priorlab.study.slurm import launcher_settings, require_submitit, run_on_slurm
from priorlab.study.spec import (
    LAUNCHERS,
    chosen_preset,
    load_experiment,
    preset_overrides,
    sweep_points,
    sweep_values,
    sweep_yaml,
)


@dataclass
class Plan:
    """What a study runs: its name and folder, the preset's parts, the bases and each base's fine-tune commands
    (label → [(job label, `priorlab` arguments)]: one multirun, or one run per sweep point)."""

    name: str
    preset: str
    study_dir: Path
    parts: dict
    bases: list[BaseRuns]
    commands: dict
    jobs: int
    left_out: list[str]
    slurm: dict | None = None  # launcher=slurm: the jobs' settings (`study.slurm.launcher_settings`)

    def points(self, b: BaseRuns) -> list[list[str]]:
        return sweep_points(b.grid(self.parts["sweep"]))

    @property
    def total(self) -> int:
        return sum(len(self.points(b)) for b in self.bases)


def run_study(cfg: DictConfig) -> Path:
    """For each base: base → fine-tune multirun; then results.csv → report.md, each step skipping finished work.

    study.json records the preset's validity thresholds and base seeds, the machine, the commit and the wall time
    of each invocation (a study resumed in pieces adds one entry per piece)."""
    from priorlab.analysis.report import build_report
    from priorlab.loggers import sync_hint, wandb_mode

    started = time.time()
    plan = make_plan(cfg)
    if cfg.dry_run:
        print_plan(plan)
        return plan.study_dir
    run_plan(plan, started)
    print(f"[study {plan.name}] writing the report", flush=True)
    report = build_report(plan.study_dir)
    print(f"study {plan.name} done in {duration(time.time() - started)}: {plan.study_dir / 'results.csv'}, {report}")
    offline = sorted((plan.study_dir / "wandb").glob("offline-run-*"))
    if offline and wandb_mode() != "online":
        print(sync_hint(plan.study_dir / "wandb", f"its {len(offline)} W&B runs (group {plan.name})"))
    return plan.study_dir


def check_jobs(cfg: DictConfig, parts: dict) -> int:
    """The runs trained at once: jobs= on the command line, else the preset's."""
    if cfg.launcher not in LAUNCHERS:
        raise UserError(f"launcher={cfg.launcher} is unknown; use one of {', '.join(LAUNCHERS)}")
    if cfg.launcher != "basic":  # a preset's `jobs` is for the basic launcher; SLURM runs the jobs at once itself
        if cfg.get("jobs") not in (None, 1):
            raise UserError(f"jobs={cfg.jobs} is for the basic launcher; launcher={cfg.launcher} runs its jobs "
                            "at once itself (hydra.launcher.array_parallelism=N caps them)")  # fmt: skip
        return 1
    jobs = parts["jobs"] if cfg.get("jobs") is None else cfg.jobs
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UserError(f"jobs={jobs!r} must be a whole number of at least 1 (the runs trained at once)")
    return jobs


def check_launcher_settings(cfg: DictConfig, study_dir: Path) -> dict | None:
    """launcher=slurm: the jobs' settings (configs/hydra/launcher/slurm.yaml, then the command line's
    hydra.launcher.*), and submitit installed (a dry run does without); other launchers take no such settings."""
    given = list(cfg.get("launcher_overrides") or [])
    if cfg.launcher != "slurm":
        if given:
            raise UserError(f"{given[0]} is a SLURM setting; add launcher=slurm, or leave it out")
        return None
    settings = launcher_settings(given, study_dir)
    if not cfg.dry_run:
        require_submitit()
    return settings


def make_plan(cfg: DictConfig) -> Plan:
    """The study's runs from its experiment file, preset and command line, checked before anything runs."""
    spec = load_experiment(cfg.name, cfg.get("experiments"))
    base_seeds = cfg.get("base_seeds")
    base_seeds = OmegaConf.to_container(base_seeds) if OmegaConf.is_list(base_seeds) else base_seeds
    preset = chosen_preset(spec, cfg.preset)
    parts = preset_overrides(spec, preset, given_sweep(cfg), base_seeds)
    jobs = check_jobs(cfg, parts)
    runs = Path(cfg.paths.runs).resolve()
    study_dir = runs / spec["name"]
    common = [override("study", spec["name"]), override("paths.runs", runs), *parts["common"]]
    bases = with_priors(study_bases(study_dir, common, parts), study_dir, common, parts)
    bases, left_out = with_command_line(bases, run_overrides(cfg), step_overrides(cfg))
    check_runs(bases[0], sweep_points(bases[0].grid(parts["sweep"]))[0])
    slurm = check_launcher_settings(cfg, study_dir)
    commands = {b.label: finetune_commands(b, parts["sweep"], cfg.launcher, jobs) for b in bases}
    return Plan(spec["name"], preset, study_dir, parts, bases, commands, jobs, left_out, slurm)


def finetune_commands(b: BaseRuns, sweep: dict, launcher: str, jobs: int) -> list[tuple[str, list[str]]]:
    """A base's fine-tunes: one `priorlab train` per sweep point (a SLURM job each, jobs at once, or a DDP trainer,
    which re-runs its command line and so cannot be a multirun), else one multirun of the sweep."""
    fixed = ["stage=finetune", override("base", b.base_dir), *b.finetune]
    own_sweep = b.grid(sweep)
    points = sweep_points(own_sweep)
    if launcher == "slurm" or jobs > 1 or launches_ddp_processes([*fixed, *points[0]]):
        tag = [f"base_{b.label}"] if b.label else []
        return [("_".join(["finetune", *tag, *map(run_label, point)]), ["train", *fixed, *point]) for point in points]
    values = [f"{key}={sweep_values(values)}" for key, values in own_sweep.items()]
    return [("finetunes", ["train", "-m", *fixed, *values])]


def print_plan(plan: Plan) -> None:
    """`dry_run=true`: the settings, then every command the study would run."""
    counts = (len(plan.bases), plan.total)
    first = first_configs(plan.bases[0], plan.parts)
    print(describe(plan.name, plan.preset, first, plan.parts["sweep"], counts, plan.left_out))
    if plan.slurm is not None:
        shown = ", ".join(f"{k}={v}" for k, v in plan.slurm.items() if v not in (None, {}, []))
        print(f"  slurm:      a job per run, the fine-tunes of a base after it (afterok): {shown}")
    for label, args in prior_jobs(plan.bases):
        print(f"{label}: {shell_line(['priorlab', *args])}")
    for b in plan.bases:
        tag = f" ({b.label})" if b.label else ""
        trained = shell_line(["priorlab", "train", "stage=base", *b.base])
        print(f"base{tag}:      {f'trained elsewhere: {b.base_dir}' if b.pretrained else trained}")
        for _, args in plan.commands[b.label]:
            print(f"finetunes{tag}: {shell_line(['priorlab', *args])}")


def claim(plan: Plan) -> dict:
    """Refuse finished runs that lack an extra prior, mark the folder as this study's, write the W&B sweeps."""
    parts = plan.parts
    cross = [p for entry in (parts["bases"] or {}).values() for p in entry["priors"]]
    check_finished_have_priors(plan.study_dir, list(dict.fromkeys([*parts["priors"], *cross])))
    held = claim_study_dir(plan.study_dir, plan.name, plan.preset, validity=parts["validity"],
                           base_seeds=parts["base_seeds"], seeds=list(parts["sweep"]["seed"]),
                           primary_scale=parts["primary_scale"], main=parts["main"])  # fmt: skip
    for b in plan.bases:
        name = f"wandb_sweep_base={b.label}.yaml" if b.label else "wandb_sweep.yaml"
        sweep = sweep_yaml(plan.name, b.base_dir, b.finetune, [], b.grid(parts["sweep"]))
        (plan.study_dir / name).write_text(sweep)
    return held


def run_plan(plan: Plan, started: float) -> None:
    """Every run of the plan, then results.csv; study.json gets this invocation's session either way."""
    from priorlab.analysis.results import collect_results
    from priorlab.loggers import shared_wandb_service

    held = claim(plan)
    # where and from what it ran, found now: at a SIGTERM (`timeout` ending a piece) the session is recorded first,
    # in the seconds before the SIGKILL that follows, while the jobs' GPU processes may take long to end
    where = {"commit": commit(), "machine": machine()}
    progress = StudyProgress(plan.name, plan.study_dir / "finetune", plan.total, started)
    finished = False
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    # imports while the study starts up (SLURM's jobs start processes of their own)
    server = forkserver.ForkServer() if forkserver.enabled() and plan.slurm is None else None
    try:
        if plan.slurm is not None:
            run_on_slurm(plan, progress)
        else:
            with shared_wandb_service(logs_to_wandb(plan)):
                (_run_at_once if plan.jobs > 1 else _run_in_turn)(plan, progress, server)
        collect_results(plan.study_dir)
        finished = True
    finally:
        session = {"wall_time_s": round(time.time() - started, 1), **where, "finished": finished}
        sessions = [*held.get("sessions", []), session]
        claim_study_dir(plan.study_dir, plan.name, plan.preset, sessions=sessions,
                        wall_time_s=round(sum(s["wall_time_s"] for s in sessions), 1))  # fmt: skip
        signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.close()


def logs_to_wandb(plan: Plan) -> bool:
    """Whether any run of the plan logs to W&B (the default logger; `logger=csv` opts out)."""
    runs = [b.base for b in trained_bases(plan.bases)] + [args for jobs in plan.commands.values() for _, args in jobs]
    return any("logger=csv" not in args for args in runs)


def _run_in_turn(plan: Plan, progress: StudyProgress, server) -> None:
    """One run at a time, with the study's own output: the extra priors, every base, then each base's fine-tunes."""
    for label, args in prior_jobs(plan.bases):
        print(f"[study {plan.name}] extra prior {label}", flush=True)
        run_priorlab(args, server)
    trained = trained_bases(plan.bases)
    for i, b in enumerate(trained):  # every base first: a base may be another's prior
        tag = f" {b.label}" if b.label else ""
        print(f"[study {plan.name}] base{tag} ({i + 1} of {len(trained)})", flush=True)
        run_priorlab(["train", "stage=base", *b.base], server)
    done = 0
    for b in plan.bases:
        tag = f" {b.label}" if b.label else ""
        n = len(plan.points(b))
        print(f"[study {plan.name}] fine-tunes {done + 1}–{done + n} of {plan.total} (from base{tag})", flush=True)
        with progress.watching():
            for _, args in plan.commands[b.label]:
                run_priorlab(args, server)
        done += n


def _run_at_once(plan: Plan, progress: StudyProgress, server=None) -> None:
    """The bases and extra priors, then every fine-tune of every base, `jobs` runs at a time (logs under logs/);
    finished runs are skipped without starting a process (`unfinished`)."""
    name, jobs = plan.name, plan.jobs
    logs = plan.study_dir / "logs"
    base_jobs = [(f"base_{b.label}" if b.label else "base", ["train", "stage=base", *b.base])
                 for b in trained_bases(plan.bases)]  # fmt: skip
    priors = prior_jobs(plan.bases)
    what = f" and {len(priors)} extra prior(s)" if priors else ""
    print(f"[study {name}] {len(base_jobs)} base(s){what}, {jobs} at a time", flush=True)
    run_parallel(unfinished([*base_jobs, *priors], name), jobs, logs, name, server)
    finetunes = [job for b in plan.bases for job in plan.commands[b.label]]
    prepare_evaluator(finetunes[0][1][1:])
    print(f"[study {name}] {len(finetunes)} fine-tunes, {jobs} at a time", flush=True)
    with progress.watching():
        run_parallel(unfinished(finetunes, name), jobs, logs, name, server)

"""`priorlab study NAME`: the bases, the fine-tunes of each, results and report; resumable (`priorlab.study`)."""

from __future__ import annotations

import signal
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from priorlab import forkserver
from priorlab.errors import UserError
from priorlab.overrides import override
from priorlab.study.bases import BaseRuns, check_finished_have_priors, prior_jobs, study_bases, with_priors
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
from priorlab.study.spec import LAUNCHERS, load_experiment, preset_overrides, sweep_points, sweep_values, sweep_yaml


def run_study(cfg: DictConfig) -> Path:
    """For each base: base → fine-tune multirun; then results.csv → report.md, each step skipping finished work.

    study.json records the preset's validity thresholds and base seeds, the machine, the commit and the wall time
    of each invocation (a study resumed in pieces adds one entry per piece)."""
    import time

    from priorlab.analysis.report import build_report
    from priorlab.analysis.results import collect_results

    started = time.time()
    spec = load_experiment(cfg.name, cfg.get("experiments"))
    base_seeds = cfg.get("base_seeds")
    base_seeds = OmegaConf.to_container(base_seeds) if OmegaConf.is_list(base_seeds) else base_seeds
    parts = preset_overrides(spec, cfg.preset, given_sweep(cfg), base_seeds)
    if cfg.launcher not in LAUNCHERS:
        raise UserError(f"launcher={cfg.launcher} is unknown; use one of {', '.join(LAUNCHERS)}")
    jobs = parts["jobs"] if cfg.get("jobs") is None else cfg.jobs
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise UserError(f"jobs={jobs!r} must be a whole number of at least 1 (the runs trained at once)")
    if jobs > 1 and cfg.launcher != "basic":
        raise UserError(f"jobs={jobs} is for the basic launcher; launcher={cfg.launcher} runs its jobs at once itself")
    runs = Path(cfg.paths.runs).resolve()
    study_dir = runs / spec["name"]
    common = [override("study", spec["name"]), override("paths.runs", runs), *parts["common"]]
    bases = with_priors(study_bases(study_dir, common, parts), study_dir, common, parts)
    bases, left_out = with_command_line(bases, run_overrides(cfg), step_overrides(cfg))
    check_runs(bases[0], sweep_points(bases[0].grid(parts["sweep"]))[0])
    commands = {}  # per base: the fine-tunes' commands, one multirun or one run per point
    for b in bases:
        fixed = ["stage=finetune", override("base", b.base_dir), *b.finetune]
        own_sweep = b.grid(parts["sweep"])
        points = sweep_points(own_sweep)
        if cfg.launcher == "basic" and (jobs > 1 or launches_ddp_processes([*fixed, *points[0]])):
            tag = [f"base_{b.label}"] if b.label else []
            commands[b.label] = [("_".join(["finetune", *tag, *map(run_label, point)]), ["train", *fixed, *point])
                                 for point in points]  # fmt: skip
        else:
            sweep = [f"{key}={sweep_values(values)}" for key, values in own_sweep.items()]
            commands[b.label] = [("finetunes", ["train", "-m", *fixed, *sweep, *LAUNCHERS[cfg.launcher]])]
    if cfg.dry_run:
        counts = (len(bases), sum(len(sweep_points(b.grid(parts["sweep"]))) for b in bases))
        print(describe(spec["name"], cfg.preset, first_configs(bases[0], parts), parts["sweep"], counts, left_out))
        for label, args in prior_jobs(bases):
            print(f"{label}: {shell_line(['priorlab', *args])}")
        for b in bases:
            tag = f" ({b.label})" if b.label else ""
            print(f"base{tag}:      {shell_line(['priorlab', 'train', 'stage=base', *b.base])}")
            for _, args in commands[b.label]:
                print(f"finetunes{tag}: {shell_line(['priorlab', *args])}")
        return study_dir
    cross = [p for entry in (parts["bases"] or {}).values() for p in entry["priors"]]
    check_finished_have_priors(study_dir, list(dict.fromkeys([*parts["priors"], *cross])))
    held = claim_study_dir(study_dir, spec["name"], cfg.preset, validity=parts["validity"],
                           base_seeds=parts["base_seeds"], seeds=list(parts["sweep"]["seed"]),
                           primary_scale=parts["primary_scale"], main=parts["main"])  # fmt: skip
    for b in bases:
        name = f"wandb_sweep_base={b.label}.yaml" if b.label else "wandb_sweep.yaml"
        (study_dir / name).write_text(sweep_yaml(spec["name"], b.base_dir, b.finetune, [],
                                                 b.grid(parts["sweep"])))  # fmt: skip
    total = sum(len(sweep_points(b.grid(parts["sweep"]))) for b in bases)
    progress = StudyProgress(spec["name"], study_dir / "finetune", total, started)
    finished = False
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)  # `timeout` ends a piece: its time is recorded
    server = forkserver.ForkServer() if forkserver.enabled() else None  # imports while the study starts up
    try:
        if jobs > 1:
            _run_at_once(spec["name"], study_dir, bases, commands, jobs, progress, server)
        done = 0
        for label, args in [] if jobs > 1 else prior_jobs(bases):
            print(f"[study {spec['name']}] extra prior {label}", flush=True)
            run_priorlab(args, server)
        for i, b in enumerate([] if jobs > 1 else bases):  # every base first: a base may be another's prior
            tag = f" {b.label}" if b.label else ""
            print(f"[study {spec['name']}] base{tag} ({i + 1} of {len(bases)})", flush=True)
            run_priorlab(["train", "stage=base", *b.base], server)
        for b in [] if jobs > 1 else bases:
            tag = f" {b.label}" if b.label else ""
            n = len(sweep_points(b.grid(parts["sweep"])))
            print(f"[study {spec['name']}] fine-tunes {done + 1}–{done + n} of {total} (from base{tag})", flush=True)
            with progress.watching():
                for _, args in commands[b.label]:
                    run_priorlab(args, server)
            done += n
        collect_results(study_dir)
        finished = True
    finally:
        if server is not None:
            server.close()
        signal.signal(signal.SIGTERM, previous)
        session = {"wall_time_s": round(time.time() - started, 1), "commit": commit(), "machine": machine(),
                   "finished": finished}  # fmt: skip
        sessions = [*held.get("sessions", []), session]
        claim_study_dir(study_dir, spec["name"], cfg.preset, sessions=sessions,
                        wall_time_s=round(sum(s["wall_time_s"] for s in sessions), 1))  # fmt: skip
    print(f"[study {spec['name']}] writing the report", flush=True)
    report = build_report(study_dir)
    print(f"study {spec['name']} done in {duration(time.time() - started)}: {study_dir / 'results.csv'}, {report}")
    return study_dir


def _run_at_once(name: str, study_dir: Path, bases: list[BaseRuns], commands: dict, jobs: int,
                 progress: StudyProgress, server=None) -> None:  # fmt: skip
    """The bases and extra priors, then every fine-tune of every base, `jobs` runs at a time (logs under logs/);
    finished runs are skipped without starting a process (`unfinished`)."""
    logs = study_dir / "logs"
    base_jobs = [(f"base_{b.label}" if b.label else "base", ["train", "stage=base", *b.base]) for b in bases]
    priors = prior_jobs(bases)
    what = f" and {len(priors)} extra prior(s)" if priors else ""
    print(f"[study {name}] {len(base_jobs)} base(s){what}, {jobs} at a time", flush=True)
    run_parallel(unfinished([*base_jobs, *priors], name), jobs, logs, name, server)
    finetunes = [job for b in bases for job in commands[b.label]]
    prepare_evaluator(finetunes[0][1][1:])
    print(f"[study {name}] {len(finetunes)} fine-tunes, {jobs} at a time", flush=True)
    with progress.watching():
        run_parallel(unfinished(finetunes, name), jobs, logs, name, server)

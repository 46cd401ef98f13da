"""`priorlab study NAME`: the base(s), a Hydra multirun of fine-tunes per base, results, report; resumable.

An experiment file (experiments/NAME.yaml) lists, per preset, the overrides shared by every run, those of
the base and of the fine-tunes, and the sweep (cond_dropout × seed × any other key, e.g. trainer.max_steps).
A preset may list several `bases`, each with its own overrides (`common` for the base and its fine-tunes,
`base`, `finetune`): each base is trained once under base/<name>/ and its sweep runs under
finetune/base=<name>/<key>=<value>/.../p=<p>/seed=<s>/. Without `bases` there is one base, under base/.
`base_seeds: [b0, b1, ...]` trains each base once per seed (base/seed=<b>/, base/<name>/seed=<b>/) and starts the
fine-tune of seed s (the i-th of the sweep's seeds) from base seed b_(i mod B), so the seeds over which the report
draws its intervals replicate the base's training too. `validity:` sets the thresholds of the report's validity
checks (`priorlab.analysis.validity`). Running the same command again skips finished runs (done.json) and
resumes unfinished ones from their last checkpoint. With a DDP trainer and the basic launcher the fine-tunes run
one `priorlab train` per sweep point instead of one multirun (Lightning starts DDP processes by re-running the
command line, which must not hold -m). `jobs=N` (or a preset's `jobs:`) trains N runs at once, each its own
process logging to logs/<run>.log: the bases, then the fine-tunes (small models leave a large GPU mostly idle).
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from priorlab import atomic, forkserver
from priorlab.cli import override, override_value
from priorlab.errors import UserError
from priorlab.study_progress import StudyProgress, duration
from priorlab.study_settings import (
    STUDY_KEYS,
    apply_given,
    describe,
    given_sweep,
    merge_sweep,
    run_overrides,
    step_overrides,
)

EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
LAUNCHERS = {"basic": [], "slurm": ["hydra/launcher=slurm"]}


def load_experiment(name: str, experiments_dir: str | Path | None = None) -> dict:
    """The experiment spec of a name (experiments/NAME.yaml) or of a YAML path."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(experiments_dir or EXPERIMENTS_DIR) / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in Path(experiments_dir or EXPERIMENTS_DIR).glob("*.yaml"))
        raise UserError(f"no experiment {name!r} (looked for {path}); known: {', '.join(known) or 'none'}")
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}".replace("\n", " ")) from err
    if not isinstance(spec, dict):
        raise UserError(f"{path} must hold a mapping with a `presets` key")
    spec.setdefault("name", path.stem)
    return spec


def preset_overrides(spec: dict, preset: str, sweep: dict | None = None, base_seeds: list | None = None) -> dict:
    """The preset's override lists (common, base, finetune) and its sweep, with the command line's sweep axes
    (`study_settings.merge_sweep`) and base seeds where given."""
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
        if not isinstance(entry, dict) or set(entry) - {"common", "base", "finetune", "priors", "sweep"}:
            raise UserError(f"{where}: base {name} takes only `common`, `base` and `finetune` override lists, "
                            "`priors` and `sweep`")  # fmt: skip
        out[str(name)] = {key: list(entry.get(key) or []) for key in ("common", "base", "finetune")}
        out[str(name)]["priors"] = check_base_priors(entry.get("priors"), str(name), bases, where)
        out[str(name)]["sweep"] = check_base_sweep(entry.get("sweep"), str(name), sweep, where)
    return out


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
    from priorlab.evaluation.generation import check_extra_priors

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
    from priorlab.evaluation.generation import check_extra_priors

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


def finetune_subdir(base: str, sweep: dict) -> str | None:
    """The fine-tunes' run folder: base=<name>/ (several bases), one level per sweep key other than cond_dropout
    and seed, then p=/seed=; None where that is the default folder, finetune/p=<p>/seed=<s>."""
    extra = "".join(f"{key.split('.')[-1]}=${{{key}}}/" for key in sweep if key not in ("cond_dropout", "seed"))
    if not base and not extra:
        return None
    return f"finetune/{f'base={base}/' if base else ''}{extra}p=${{cond_dropout}}/seed=${{seed}}"


def claim_study_dir(study_dir: Path, name: str, preset: str, **record) -> dict:
    """Mark the folder as this study's (study.json, with `record` added), or refuse a folder that holds another
    study's runs. Returns what study.json holds."""
    marker = study_dir / "study.json"
    if marker.exists():
        from priorlab.analysis.results import study_record

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
    """The git commit of the priorlab checkout ($PRIORLAB_COMMIT where set), with -dirty for uncommitted changes."""
    if os.environ.get("PRIORLAB_COMMIT"):
        return os.environ["PRIORLAB_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def _priorlab_command() -> list[str]:
    """The installed `priorlab` beside this Python, else `python -m priorlab`."""
    exe = Path(sys.executable).parent / "priorlab"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "priorlab"]


def _priorlab(args: list[str], server=None) -> None:
    """`priorlab ARGS` with the study's own stdout and stderr: forked from `server` (`priorlab.forkserver`), or a
    process of its own without a server."""
    env = {**os.environ, "PRIORLAB_COMMAND": ""}
    if server is None:
        code = subprocess.run([*_priorlab_command(), *args], env=env).returncode
    else:
        sys.stdout.flush()
        sys.stderr.flush()
        run = server.start(args, env, os.getcwd(), forkserver.STDOUT, forkserver.STDERR)
        try:
            code = run.wait()
        except BaseException:  # interrupted: the run stops too (it resumes from its checkpoint)
            run.terminate()
            try:
                run.wait(timeout=5)
            except subprocess.TimeoutExpired:
                run.kill()
            raise
    if code != 0:
        raise UserError(f"`priorlab {' '.join(args[:3])} ...` failed (exit {code}); see its output above. "
                        "Run the same study command again to resume")  # fmt: skip


def _gpu_count() -> int:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return 0  # the user placed the jobs already
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no usable CUDA: the jobs share the CPU
        return 0


def job_threads(max_jobs: int) -> dict[str, str]:
    """CPU threads per job: the cores shared out among the jobs running at once (each torch process would
    otherwise start one thread per core, and N of them thrash the CPU, the evaluation's CPU work most). A
    user's own OMP_NUM_THREADS is kept."""
    if "OMP_NUM_THREADS" in os.environ:
        return {}
    n = str(max(1, (os.cpu_count() or 1) // max_jobs))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}


# cuBLAS reports the same exhaustion as a failed handle allocation (seen when nine jobs shared an H100)
OUT_OF_MEMORY = re.compile(r"CUDA out of memory|CUDA error: out of memory|OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED")


def ran_out_of_gpu_memory(log: Path, since: int = 0) -> bool:
    """Whether a job's log ends in a CUDA out-of-memory error (jobs sharing a GPU can exceed its memory together
    where each alone fits: six evaluations of the gpu preset on one H200 peaked at its 140 GB), looking only at
    what was written from byte `since` on (the current attempt; the log keeps the earlier ones)."""
    try:
        with open(log, "rb") as fh:
            fh.seek(max(since, fh.seek(0, os.SEEK_END) - 20000))
            return bool(OUT_OF_MEMORY.search(fh.read().decode("utf-8", "replace")))
    except OSError:
        return False


def run_parallel(jobs: list[tuple[str, list[str]]], max_jobs: int, log_dir: Path, tag: str, server=None) -> None:
    """`priorlab <args>` for each (label, args) of `jobs`, at most `max_jobs` at once, each writing its output to
    log_dir/<label>.log. On a machine with several GPUs (and CUDA_VISIBLE_DEVICES unset) the job in slot i sees
    only GPU i mod count. Logs are appended to, each attempt under a dated header, so that a study resumed in
    pieces keeps every piece's output. A job that ran out of GPU memory is run again, once, alone after the others
    (it resumes from its checkpoint). Any other failed job stops new ones from
    starting; the running ones finish (their work is kept for a resume), then the study stops with the failed
    jobs' logs named. An interrupted study ends its jobs. The jobs are forked from `server` (`priorlab.forkserver`,
    one that imported priorlab once; a new one when None), unless PRIORLAB_FORKSERVER=0 starts each as a process of
    its own."""
    import time

    log_dir.mkdir(parents=True, exist_ok=True)
    base_cmd = _priorlab_command()
    own = server is None and forkserver.enabled() and bool(jobs)
    server = forkserver.ForkServer() if own else server
    gpus = _gpu_count()
    threads = job_threads(max_jobs)
    pending = list(jobs)
    again: list[tuple[str, list[str]]] = []  # ran out of GPU memory: once more, alone, at the end
    retried: set[str] = set()
    # slot → (process, label, args, log, the log's size at the start, start time)
    running: dict[int, tuple[subprocess.Popen, str, list[str], Path, int, float]] = {}
    failed: list[tuple[str, Path, int]] = []
    done = 0

    def start(label: str, args: list[str], slot: int, again: bool) -> None:
        env = {**os.environ, "PRIORLAB_COMMAND": "", **threads}
        if gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
        log = log_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}.log"
        with open(log, "a") as fh:
            offset = fh.tell()
            why = " (run again alone after running out of GPU memory)" if again else ""
            gap = "\n" if offset else ""  # a blank line between attempts
            fh.write(f"{gap}[priorlab study] {label} started {time.strftime('%Y-%m-%d %H:%M:%S')}{why}\n")
            fh.flush()
            if server is None:
                proc = subprocess.Popen([*base_cmd, *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
            else:
                proc = server.start(args, env, os.getcwd(), log)
        running[slot] = (proc, label, args, log, offset, time.time())
        print(f"[study {tag}] started {label} (log: {log})", flush=True)

    try:
        while pending or running or (again and not failed):
            while pending and not failed and len(running) < max_jobs:
                start(*pending.pop(0), next(i for i in range(max_jobs) if i not in running), False)
            if again and not pending and not running and not failed:
                start(*again.pop(0), 0, True)
            if failed and not running:
                break
            time.sleep(0.5)
            for slot, (proc, label, args, log, offset, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[slot]
                if proc.returncode != 0 and label not in retried and ran_out_of_gpu_memory(log, offset):
                    retried.add(label)
                    again.append((label, args))
                    print(f"[study {tag}] {label} ran out of GPU memory; it runs again alone after the others",
                          flush=True)  # fmt: skip
                    continue
                done += 1
                if proc.returncode != 0:
                    failed.append((label, log, proc.returncode))
                    print(f"[study {tag}] {label} failed (exit {proc.returncode}); see {log}", flush=True)
                else:
                    print(f"[study {tag}] {label} finished in {time.time() - t0:.0f} s "
                          f"({done} of {len(jobs)})", flush=True)  # fmt: skip
    finally:  # an interrupted study (Ctrl-C, `timeout`) ends its jobs quickly; each resumes from its checkpoint
        for proc, *_ in running.values():
            proc.terminate()
        deadline = time.time() + 5
        for proc, *_ in running.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if own:
            server.close()
    if failed:
        logs = "; ".join(f"{label} (exit {rc}): {log}" for label, log, rc in failed)
        raise UserError(f"{len(failed)} run(s) failed: {logs}. Run the same study command again to resume")


def prepare_evaluator(overrides: list[str]) -> None:
    """Train and cache, once, the evaluator that the fine-tunes' evaluation callbacks would each train on first
    use (jobs running at once would race to train the same one)."""
    from hydra.utils import instantiate

    from priorlab.evaluation.setup import ensure_evaluator, evaluator_dir

    cfg = _compose_train(overrides)
    callbacks = cfg.get("callbacks") or {}
    evaluating = [callbacks[k] for k in ("conditional_quality", "prior_quality") if k in callbacks]
    if not evaluating:
        return
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    path = evaluating[0].get("evaluator") or evaluator_dir(cfg.paths.runs, datamodule)
    ensure_evaluator(path, datamodule, steps=int(cfg.eval.get("evaluator_steps", 1500)), progress=True)


def _values(values: list) -> str:
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


def launches_ddp_processes(overrides: list[str]) -> bool:
    """Whether `priorlab train` with these overrides asks for a DDP trainer of several processes, started by
    re-running the command line (Lightning's `ddp` strategy; not `ddp_spawn`, and not on one device)."""
    trainer = _compose_train(overrides).trainer
    strategy = trainer.get("strategy")
    name = str(strategy if isinstance(strategy, str) or strategy is None else strategy.get("_target_", "")).lower()
    relaunching = any(k in name for k in ("ddp", "fsdp", "deepspeed")) and not any(
        k in name for k in ("spawn", "fork", "notebook")
    )
    return relaunching and trainer.get("devices", 1) != 1


def _compose_train(overrides: list[str], hydra_config: bool = False) -> DictConfig:
    """The `priorlab train` config with these overrides, as the command would compose it (with `hydra_config`,
    Hydra's own under `hydra`: the group choices)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from priorlab.cli import CONFIG_DIR, rewrite_overrides

    overrides = rewrite_overrides("train", overrides)
    if GlobalHydra.instance().is_initialized():  # inside `priorlab study`, a Hydra app over the same configs
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra_config)


def with_command_line(bases: list[BaseRuns], given: list[str], steps: dict) -> tuple[list[BaseRuns], list[str]]:
    """The bases with the command line's settings after the preset's (`study_settings.apply_given`): those of
    every run, then base_steps or finetune_steps; and the preset's settings left out."""
    from priorlab.cli import CONFIG_DIR

    left_out: list[str] = []
    for b in bases:
        # an extra prior keeps its own settings over the command line's (a smaller width stays smaller)
        b.priors = {folder: (apply_given(shared, [*given, *steps["base"]], _compose_train, CONFIG_DIR)[0], own)
                    for folder, (shared, own) in b.priors.items()}  # fmt: skip
        b.base, dropped = apply_given(b.base, [*given, *steps["base"]], _compose_train, CONFIG_DIR)
        b.finetune, dropped_too = apply_given(b.finetune, [*given, *steps["finetune"]], _compose_train, CONFIG_DIR)
        left_out += [d for d in dict.fromkeys(dropped + dropped_too) if d not in left_out]
    return bases, left_out


def check_runs(b: BaseRuns, point: list[str]) -> None:
    """Compose a base's training config and its first fine-tune's, so that a setting neither the study nor
    `priorlab train` takes is refused before anything runs, naming the valid ones."""
    from priorlab.cli import CONFIG_DIR
    from priorlab.diagnose import composition_error

    for overrides in (["stage=base", *b.base], ["stage=finetune", override("base", b.base_dir), *b.finetune, *point]):
        try:
            _compose_train(overrides)
        except Exception as err:  # noqa: BLE001 - Hydra's composition errors: one line naming the key
            message = composition_error("train", CONFIG_DIR, overrides, err)
            own = ", ".join(k for k in STUDY_KEYS if k not in ("hydra", "overrides"))
            sep = " " if message.endswith("?") else ". "
            raise UserError(f"{message}{sep}A study takes its own settings ({own}) and those of `priorlab train` "
                            "for every run") from err  # fmt: skip


def _composed(b: BaseRuns, parts: dict) -> tuple[DictConfig, DictConfig]:
    """The training configs of the study's first base and first fine-tune, with Hydra's (its group choices)."""
    point = sweep_points(b.grid(parts["sweep"]))[0]
    finetune = ["stage=finetune", override("base", b.base_dir), *b.finetune, *point]
    return _compose_train(["stage=base", *b.base], hydra_config=True), _compose_train(finetune, hydra_config=True)


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
        for name, entry in parts["bases"].items():
            own = [*common, *entry["common"]]
            others = {p: study_dir / "base" / other for p, other in entry["priors"].items()}
            named.append(BaseRuns(name, study_dir / "base" / name,
                                  [*own, *parts["base"], *entry["base"], f"stage.run_subdir=base/{name}"],
                                  [*own, *parts["finetune"], *entry["finetune"],
                                   f"stage.run_subdir={finetune_subdir(name, parts['sweep'])}"],
                                  seeds, others=others, sweep=entry["sweep"]))  # fmt: skip
    base_seeds = parts.get("base_seeds")
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
            others = [override(f"+extra_priors.{p}", other / f"seed={seed}") for p, other in b.others.items()]
            out.append(BaseRuns(label, folder,
                                [*own, f"seed={seed}", f"stage.run_subdir={folder.relative_to(study_dir)}"],
                                [*b.finetune, *others], seeds[i :: len(base_seeds)], sweep=b.sweep))  # fmt: skip
    return out


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
            commands[b.label] = [("_".join(["finetune", *tag, *map(_short, point)]), ["train", *fixed, *point])
                                 for point in points]  # fmt: skip
        else:
            sweep = [f"{key}={_values(values)}" for key, values in own_sweep.items()]
            commands[b.label] = [("finetunes", ["train", "-m", *fixed, *sweep, *LAUNCHERS[cfg.launcher]])]
    if cfg.dry_run:
        counts = (len(bases), sum(len(sweep_points(b.grid(parts["sweep"]))) for b in bases))
        print(describe(spec["name"], cfg.preset, _composed(bases[0], parts), parts["sweep"], counts, left_out))
        for label, args in prior_jobs(bases):
            print(f"{label}: {_shell(['priorlab', *args])}")
        for b in bases:
            tag = f" ({b.label})" if b.label else ""
            print(f"base{tag}:      {_shell(['priorlab', 'train', 'stage=base', *b.base])}")
            for _, args in commands[b.label]:
                print(f"finetunes{tag}: {_shell(['priorlab', *args])}")
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
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)  # `timeout` ends a piece: its time is recorded
    server = forkserver.ForkServer() if forkserver.enabled() else None  # imports while the study starts up
    try:
        if jobs > 1:
            _run_at_once(spec["name"], study_dir, bases, commands, jobs, progress, server)
        done = 0
        for label, args in [] if jobs > 1 else prior_jobs(bases):
            print(f"[study {spec['name']}] extra prior {label}", flush=True)
            _priorlab(args, server)
        for i, b in enumerate([] if jobs > 1 else bases):  # every base first: a base may be another's prior
            tag = f" {b.label}" if b.label else ""
            print(f"[study {spec['name']}] base{tag} ({i + 1} of {len(bases)})", flush=True)
            _priorlab(["train", "stage=base", *b.base], server)
        for b in [] if jobs > 1 else bases:
            tag = f" {b.label}" if b.label else ""
            n = len(sweep_points(b.grid(parts["sweep"])))
            print(f"[study {spec['name']}] fine-tunes {done + 1}–{done + n} of {total} (from base{tag})", flush=True)
            with progress.watching():
                for _, args in commands[b.label]:
                    _priorlab(args, server)
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


def unfinished(jobs: list[tuple[str, list[str]]], name: str) -> list[tuple[str, list[str]]]:
    """The `priorlab train` jobs whose run folder holds no done.json. A finished run is checked here as the command
    would check it (its recorded settings and base: `priorlab.resume.check_resume`) and skipped, which saves the
    start of a process per finished run when a study resumes (about 12 s each on a GPU host)."""
    from priorlab.commands.train import DONE
    from priorlab.resume import check_resume

    out = []
    for label, args in jobs:
        cfg = _compose_train(args[1:])
        run_dir = Path(cfg.paths.run_dir)
        if not (run_dir / DONE).exists():
            out.append((label, args))
            continue
        check_resume(cfg, run_dir, finished=True)
        print(f"[study {name}] {label} is finished; skipping", flush=True)
    return out


def _shell(args: list[str]) -> str:
    """A command line to paste into a POSIX shell: each argument as it is where it can be, else in double quotes
    (Hydra's single quotes kept inside), else shell-quoted."""
    quoted = [a if shlex.quote(a) == a else f'"{a}"' if not re.search(r'["$`\\!]', a) else shlex.quote(a) for a in args]
    return " ".join(quoted)


def _short(override: str) -> str:
    """A sweep override as a run label: data.train_per_class=5 → train_per_class=5, cond_dropout=0.1 → p=0.1."""
    key, value = override.split("=", 1)
    key = key.split(".")[-1]
    return f"{'p' if key == 'cond_dropout' else key}={value}"


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)

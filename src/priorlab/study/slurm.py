"""launcher=slurm: every run of a study as a SLURM job, submitted through submitit (the `.[slurm]` extra).

Design. The study submits, at once, one job per unfinished extra prior and base, one job that trains the evaluator
the fine-tunes share (they would race to train it), and per base one job array of its unfinished fine-tunes that
depends (`--dependency=afterok:...`) on the jobs of the runs it needs: its base, the extra priors and other bases
it is evaluated with, the evaluator. It then waits for every job, and collects the results as the basic launcher
does. Dependencies rather than a wait per stage: the fine-tunes queue while their base trains, and each base's
start as soon as it ends, not when the slowest base does; `--kill-on-invalid-dep=yes` takes the fine-tunes of a
failed base out of the queue.

Resumable: what is finished is read from the run folders alone (done.json), never from a record of jobs, so the
same command run again submits exactly the runs still unfinished, each resuming from its last checkpoint, and
depending only on the jobs it submits itself (a finished base needs none). An interrupted study (Ctrl-C, SIGTERM)
cancels its jobs, so that a later one does not race them; the job ids are kept in slurm_jobs.json, and a study whose
earlier jobs are still queued or running (squeue) refuses to start, naming them. `hydra.launcher.max_num_timeout=N`
requeues a job that reached its time limit up to N times; it resumes from its checkpoint.

Settings: configs/hydra/launcher/slurm.yaml (the file `priorlab train -m hydra/launcher=slurm` uses), then the
command line's `hydra.launcher.KEY=VALUE`, the keys of hydra-submitit-launcher's SlurmQueueConf, given to every job.
"""

from __future__ import annotations

import difflib
import getpass
import json
import os
import subprocess
import time
from pathlib import Path

import yaml

from priorlab.errors import UserError
from priorlab.overrides import CONFIG_DIR
from priorlab.study.schedule import _priorlab_command

INSTALL = "pip install -e '.[slurm]' (hydra-submitit-launcher, which brings submitit)"
# hydra-submitit-launcher's SlurmQueueConf (BaseQueueConf's keys, then the SLURM ones), which submitit receives
# as the plugin gives them: the generic ones as they are, the others prefixed with slurm_
GENERIC = ("timeout_min", "cpus_per_task", "gpus_per_node", "tasks_per_node", "mem_gb", "nodes", "name",
           "stderr_to_stdout")  # fmt: skip
SPECIFIC = ("partition", "qos", "comment", "constraint", "exclude", "gres", "cpus_per_gpu", "gpus_per_task",
            "mem_per_gpu", "mem_per_cpu", "account", "signal_delay_s", "additional_parameters", "array_parallelism",
            "setup", "srun_args")  # fmt: skip
KEYS = ("submitit_folder", "max_num_timeout", *GENERIC, *SPECIFIC)
RECORD = "slurm_jobs.json"
POLL_S = 30.0  # between looks at the queue (submitit asks sacct at most once a minute anyway)


def launcher_settings(given: list[str], study_dir: Path) -> dict:
    """configs/hydra/launcher/slurm.yaml's settings with the command line's `hydra.launcher.KEY=VALUE` over them
    (values read as Hydra reads them; `hydra.launcher.additional_parameters.KEY=V` sets one entry); an unknown key
    is refused in one line. Jobs write their submitit files under <study>/slurm/ unless submitit_folder is given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    settings = {k: v for k, v in yaml.safe_load((CONFIG_DIR / "hydra/launcher/slurm.yaml").read_text()).items()
                if k != "defaults"}  # fmt: skip
    settings["submitit_folder"] = str(study_dir / "slurm" / "%j")
    parser = OverridesParser.create()
    for arg in given:
        try:
            parsed = parser.parse_override(arg)
        except Exception as err:  # noqa: BLE001 - Hydra's grammar errors: one line
            raise UserError(f"{arg!r} is not a Hydra override: {str(err).splitlines()[0]}") from err
        key = parsed.key_or_group.removeprefix("hydra.launcher.")
        top, _, entry = key.partition(".")
        if top not in KEYS or (entry and top != "additional_parameters") or parsed.is_sweep_override():
            near = difflib.get_close_matches(top, KEYS, n=1)
            hint = f"did you mean hydra.launcher.{near[0]}? " if near and near[0] != top else ""
            raise UserError(f"hydra.launcher.{key} is not a SLURM setting; {hint}the settings are "
                            f"{', '.join(sorted(KEYS))} (hydra-submitit-launcher's)")  # fmt: skip
        value = parsed.value()
        if entry:
            settings["additional_parameters"] = {**(settings.get("additional_parameters") or {}), entry: value}
        else:
            settings[top] = value
    return settings


def require_submitit():
    """The submitit module, else a one-line error naming the install command."""
    try:
        import submitit
    except ImportError as err:
        raise UserError(f"launcher=slurm needs submitit, which is not installed; install it with {INSTALL}") from err
    return submitit


def make_executor(settings: dict, name: str, after: list[str]):
    """A SLURM executor with the study's settings, naming its jobs `name`, started only after the jobs `after` end
    well (dependency afterok; SLURM cancels them if one of those fails)."""
    submitit = require_submitit()
    extra = dict(settings.get("additional_parameters") or {})
    if after:
        extra.update({"dependency": "afterok:" + ":".join(after), "kill-on-invalid-dep": "yes"})
    params = {"name": name, **{k: settings[k] for k in GENERIC if settings.get(k) is not None}}
    params.update({f"slurm_{k}": settings[k] for k in SPECIFIC if settings.get(k) is not None})
    params["slurm_additional_parameters"] = extra
    init = {"slurm_max_num_timeout": settings["max_num_timeout"]} if settings.get("max_num_timeout") is not None else {}
    try:
        executor = submitit.AutoExecutor(folder=settings["submitit_folder"], cluster="slurm", **init)
        executor.update_parameters(**params)
    except (RuntimeError, ValueError, NameError, AssertionError) as err:  # no srun here; a value SLURM refuses
        raise UserError(f"launcher=slurm: {str(err).splitlines()[0]}") from err
    return executor


class PriorlabJob:
    """`priorlab ARGS` in `cwd`, run inside a SLURM job (its output goes to the job's log); picklable by reference.
    Checkpointable: a job that reaches its time limit is requeued (max_num_timeout) and resumes from its checkpoint."""

    def __init__(self, cwd: str):
        self.cwd = cwd

    def __call__(self, args: list[str]) -> None:
        env = {**os.environ, "PRIORLAB_COMMAND": ""}
        code = subprocess.run([*_priorlab_command(), *args], cwd=self.cwd, env=env).returncode
        if code != 0:
            raise RuntimeError(f"`priorlab {' '.join(args[:3])} ...` failed (exit {code})")

    def checkpoint(self, args: list[str]):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(PriorlabJob(self.cwd), args)


def log_of(job) -> str:
    """The file holding a job's error output (submitit's)."""
    return str(job.paths.stderr).replace("%t", "0")


def pause(seconds: float) -> None:
    """The wait between two polls of the jobs' states (a test replaces this, never time.sleep itself)."""
    time.sleep(seconds)


def wait_for(jobs: dict, tag: str, poll_s: float = POLL_S) -> None:
    """Wait until every job (label → submitit job) has ended; then, if some did not end well, stop the study in one
    line naming them and their logs."""
    pending, failed = dict(jobs), []
    while pending:
        for label, job in list(pending.items()):
            if not job.done():
                continue
            del pending[label]
            if job.exception() is None:
                print(f"[study {tag}] {label} finished (job {job.job_id})", flush=True)
            else:
                failed.append(f"{label} (job {job.job_id}, {job.state}): {log_of(job)}")
                print(f"[study {tag}] {label} did not finish (job {job.job_id}, {job.state})", flush=True)
        if pending:
            pause(poll_s)
    if failed:
        shown = "; ".join(failed[:5]) + (f"; and {len(failed) - 5} more" if len(failed) > 5 else "")
        raise UserError(f"{len(failed)} SLURM job(s) did not finish: {shown}. Run the same study command again "
                        "to resume")  # fmt: skip


def cancel(jobs: dict) -> None:
    """Cancel the jobs that have not ended (an interrupted study: each resumes from its checkpoint next time)."""
    for job in jobs.values():
        if not job.done():
            job.cancel(check=False)


def record(study_dir: Path, jobs: dict) -> None:
    """The ids of the jobs this invocation submitted, in slurm_jobs.json."""
    (study_dir / RECORD).write_text(json.dumps({label: job.job_id for label, job in jobs.items()}, indent=1))


def check_no_jobs_left(study_dir: Path) -> None:
    """Refuse to start while jobs that an earlier invocation submitted are still queued or running: a second copy of
    a run would race them on its folder."""
    path = study_dir / RECORD
    if not path.exists():
        return
    recorded = json.loads(path.read_text())
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-u", getpass.getuser()], capture_output=True,
                             text=True, timeout=60).stdout.split()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return  # no squeue here: submitting will fail with its own message
    left = [f"{label} ({job})" for label, job in recorded.items() if str(job) in out]
    if left:
        ids = " ".join(str(recorded[label]) for label in recorded if str(recorded[label]) in out)
        raise UserError(f"{len(left)} job(s) of an earlier run of this study are still queued or running "
                        f"({', '.join(left[:3])}{', ...' if len(left) > 3 else ''}); wait for them, or "
                        f"`scancel {ids}`, then run the study again")  # fmt: skip


def submit_study(plan, jobs: dict) -> None:
    """Submit the plan's unfinished runs (`study.run.Plan`; settings in plan.slurm): the extra priors and bases, the
    evaluator, then per base an array of its fine-tunes depending on the jobs of the runs they need; into `jobs`,
    label → job, as they are submitted."""
    from priorlab.study.bases import prior_jobs
    from priorlab.study.compose import prepare_evaluator, unfinished

    settings, run, ids = plan.slurm, PriorlabJob(os.getcwd()), {}
    prior_folders = list(dict.fromkeys(folder for b in plan.bases for folder in b.priors))
    trained = list(zip(prior_folders, prior_jobs(plan.bases), strict=True))
    trained += [(b.base_dir, (f"base_{b.label}" if b.label else "base", ["train", "stage=base", *b.base]))
                for b in plan.bases if not b.pretrained]  # fmt: skip
    todo = {label for label, _ in unfinished([job for _, job in trained], plan.name)}
    for folder, (label, args) in trained:
        if label in todo:
            jobs[label] = make_executor(settings, f"{plan.name}-{label}", []).submit(run, args)
            ids[folder] = jobs[label].job_id
            print(f"[study {plan.name}] submitted {label} (job {ids[folder]})", flush=True)
    finetunes = {b.label: unfinished(plan.commands[b.label], plan.name) for b in plan.bases}
    first = next((runs[0] for runs in finetunes.values() if runs), None)
    if first is None:
        return
    jobs["evaluator"] = make_executor(settings, f"{plan.name}-evaluator", []).submit(prepare_evaluator, first[1][1:])
    for b in plan.bases:
        if not finetunes[b.label]:
            continue
        needs = [b.base_dir, *b.priors, *b.others.values()]
        after = [ids[folder] for folder in needs if folder in ids] + [jobs["evaluator"].job_id]
        name = f"{plan.name}-finetunes" + (f"-{b.label}" if b.label else "")
        labels, args = zip(*finetunes[b.label], strict=True)
        jobs.update(zip(labels, make_executor(settings, name, after).map_array(run, args), strict=True))
        print(f"[study {plan.name}] submitted {len(labels)} fine-tune(s){' of ' + b.label if b.label else ''} "
              f"after job(s) {', '.join(after)}", flush=True)  # fmt: skip


def run_on_slurm(plan, progress) -> None:
    """Every unfinished run of the plan as a SLURM job (`submit_study`), waited for; an interrupted study cancels
    the jobs it submitted."""
    check_no_jobs_left(plan.study_dir)
    jobs: dict = {}
    try:
        submit_study(plan, jobs)
        record(plan.study_dir, jobs)
        with progress.watching():
            wait_for(jobs, plan.name)
    except BaseException:
        record(plan.study_dir, jobs)
        cancel(jobs)
        raise

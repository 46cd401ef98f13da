"""Running a study's commands: one at a time with the study's own output, or N at once with a log each, forked from
a server that imported priorlab once (`priorlab.forkserver`); a job that ran out of GPU memory runs again alone."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from priorlab import forkserver
from priorlab.errors import UserError

# W&B's banner and sync hint once per run would bury the study's own lines (the study says how to sync at its end);
# a WANDB_SILENT of the user's own wins.
QUIET_WANDB = {"WANDB_SILENT": "true"}


def _priorlab_command() -> list[str]:
    """The installed `priorlab` beside this Python, else `python -m priorlab`."""
    exe = Path(sys.executable).parent / "priorlab"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "priorlab"]


def run_priorlab(args: list[str], server=None) -> None:
    """`priorlab ARGS` with the study's own stdout and stderr: forked from `server` (`priorlab.forkserver`), or a
    process of its own without a server."""
    env = {**QUIET_WANDB, **os.environ, "PRIORLAB_COMMAND": ""}
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
    own = server is None and forkserver.enabled() and bool(jobs)
    pool = JobPool(max_jobs, log_dir, tag, forkserver.ForkServer() if own else server, len(jobs))
    try:
        pool.run(list(jobs))
    finally:  # an interrupted study (Ctrl-C, `timeout`) ends its jobs quickly; each resumes from its checkpoint
        pool.stop()
        if own:
            pool.server.close()
    if pool.failed:
        logs = "; ".join(f"{label} (exit {rc}): {log}" for label, log, rc in pool.failed)
        raise UserError(f"{len(pool.failed)} run(s) failed: {logs}. Run the same study command again to resume")


@dataclass
class Job:
    proc: subprocess.Popen
    label: str
    args: list[str]
    log: Path
    offset: int  # the log's size when this attempt started
    started: float


class JobPool:
    """The jobs of `run_parallel`: started in free slots, polled, and ended."""

    def __init__(self, max_jobs: int, log_dir: Path, tag: str, server, total: int):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.max_jobs, self.log_dir, self.tag, self.server, self.total = max_jobs, log_dir, tag, server, total
        self.gpus = _gpu_count()
        self.threads = job_threads(max_jobs)
        self.running: dict[int, Job] = {}  # slot → job
        self.again: list[tuple[str, list[str]]] = []  # ran out of GPU memory: once more, alone, at the end
        self.retried: set[str] = set()
        self.failed: list[tuple[str, Path, int]] = []
        self.done = 0

    def run(self, pending: list[tuple[str, list[str]]]) -> None:
        while pending or self.running or (self.again and not self.failed):
            while pending and not self.failed and len(self.running) < self.max_jobs:
                self.start(*pending.pop(0), next(i for i in range(self.max_jobs) if i not in self.running), False)
            if self.again and not pending and not self.running and not self.failed:
                self.start(*self.again.pop(0), 0, True)
            if self.failed and not self.running:
                break
            time.sleep(0.5)
            self.poll()

    def start(self, label: str, args: list[str], slot: int, again: bool) -> None:
        env = {**QUIET_WANDB, **os.environ, "PRIORLAB_COMMAND": "", **self.threads}
        if self.gpus > 1:
            env["CUDA_VISIBLE_DEVICES"] = str(slot % self.gpus)
        log = self.log_dir / f"{re.sub(r'[^A-Za-z0-9_.=-]+', '_', label)}.log"
        with open(log, "a") as fh:
            offset = fh.tell()
            why = " (run again alone after running out of GPU memory)" if again else ""
            gap = "\n" if offset else ""  # a blank line between attempts
            fh.write(f"{gap}[priorlab study] {label} started {time.strftime('%Y-%m-%d %H:%M:%S')}{why}\n")
            fh.flush()
            if self.server is None:
                proc = subprocess.Popen([*_priorlab_command(), *args], stdout=fh, stderr=subprocess.STDOUT, env=env)
            else:
                proc = self.server.start(args, env, os.getcwd(), log)
        self.running[slot] = Job(proc, label, args, log, offset, time.time())
        print(f"[study {self.tag}] started {label} (log: {log})", flush=True)

    def poll(self) -> None:
        """Take the jobs that ended out of their slots: count, fail, or queue again after running out of memory."""
        for slot, job in list(self.running.items()):
            if job.proc.poll() is None:
                continue
            del self.running[slot]
            rc = job.proc.returncode
            if rc != 0 and job.label not in self.retried and ran_out_of_gpu_memory(job.log, job.offset):
                self.retried.add(job.label)
                self.again.append((job.label, job.args))
                print(f"[study {self.tag}] {job.label} ran out of GPU memory; it runs again alone after the others",
                      flush=True)  # fmt: skip
                continue
            self.done += 1
            if rc != 0:
                self.failed.append((job.label, job.log, rc))
                print(f"[study {self.tag}] {job.label} failed (exit {rc}); see {job.log}", flush=True)
            else:
                print(f"[study {self.tag}] {job.label} finished in {time.time() - job.started:.0f} s "
                      f"({self.done} of {self.total})", flush=True)  # fmt: skip

    def stop(self) -> None:
        """End the running jobs: terminate, then kill what is left after 5 s."""
        for job in self.running.values():
            job.proc.terminate()
        deadline = time.time() + 5
        for job in self.running.values():
            try:
                job.proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()


def shell_line(args: list[str]) -> str:
    """A command line to paste into a POSIX shell: each argument as it is where it can be, else in double quotes
    (Hydra's single quotes kept inside), else shell-quoted."""
    quoted = [a if shlex.quote(a) == a else f'"{a}"' if not re.search(r'["$`\\!]', a) else shlex.quote(a) for a in args]
    return " ".join(quoted)


def exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)

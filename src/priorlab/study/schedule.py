"""Running a study's commands: one at a time with the study's own output, or N at once with a log each, forked from
a server that imported priorlab once (`priorlab.forkserver`); a job that ran out of GPU memory runs again alone."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from priorlab import forkserver
from priorlab.errors import UserError


def _priorlab_command() -> list[str]:
    """The installed `priorlab` beside this Python, else `python -m priorlab`."""
    exe = Path(sys.executable).parent / "priorlab"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "priorlab"]


def run_priorlab(args: list[str], server=None) -> None:
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


def shell_line(args: list[str]) -> str:
    """A command line to paste into a POSIX shell: each argument as it is where it can be, else in double quotes
    (Hydra's single quotes kept inside), else shell-quoted."""
    quoted = [a if shlex.quote(a) == a else f'"{a}"' if not re.search(r'["$`\\!]', a) else shlex.quote(a) for a in args]
    return " ".join(quoted)


def exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)

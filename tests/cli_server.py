"""Runs `priorlab` command lines for the fuzz test, each in a fork of one interpreter that imported priorlab once.

A fresh `priorlab` process spends about 5 s importing Lightning and torch; a fork of this server starts in
milliseconds, so hundreds of command lines fit in minutes. The child does what the `priorlab` executable does:
`sys.argv = [<venv>/bin/priorlab, *args]`, then `priorlab.cli.main()`, with its own working folder, environment,
stdout and stderr (files; stdin is /dev/null). An exception that escapes `main` is printed as Python prints one
(a "Traceback") and exits with 1; `sys.exit(code)` exits with `code`.

Protocol: one JSON object per line on stdin, {"args": [...], "cwd": "...", "env": {...}, "timeout": seconds}; one
JSON object per line on stdout, {"rc": int, "stdout": str, "stderr": str, "seconds": float}; rc is -9 for a
command killed at its timeout.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from priorlab.forkserver import exit_child, run_command


def _child(case: dict, out_path: str, err_path: str) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its own process group: a timeout kills whatever it started too
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, out_path), (2, err_path)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), fd)
        os.chdir(case["cwd"])
        os.environ.update(case.get("env") or {})
        code = run_command(case["args"])  # with the case's OMP_NUM_THREADS, as a fresh process would apply it
    finally:
        exit_child(code)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return -9
        time.sleep(0.005)


def main() -> None:
    import importlib

    from priorlab.forkserver import PRELOAD

    # imported once here, not in every case: the stack a study's fork server holds (the CLI, train, evaluate, the
    # report; a study run here forks its server from this), and the pipelines of export and sample
    for name in (*PRELOAD, "priorlab.pipelines.export", "priorlab.pipelines.sample"):
        importlib.import_module(name)

    replies = os.fdopen(os.dup(1), "w")
    for line in sys.stdin:
        case = json.loads(line)
        with tempfile.TemporaryDirectory() as tmp:
            out_path, err_path = os.path.join(tmp, "out"), os.path.join(tmp, "err")
            sys.stdout.flush()
            sys.stderr.flush()
            start = time.monotonic()
            pid = os.fork()
            if pid == 0:
                _child(case, out_path, err_path)
            rc = _wait(pid, float(case.get("timeout", 300)))
            texts = [Path(p).read_text(errors="replace") if os.path.exists(p) else "" for p in (out_path, err_path)]
        reply = {"rc": rc, "stdout": texts[0], "stderr": texts[1], "seconds": round(time.monotonic() - start, 3)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()

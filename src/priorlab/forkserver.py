"""A fork server for a study's runs: one process imports priorlab's training stack once, then forks a child per
run, so that a run starts in milliseconds instead of the 5-8 s that importing torch and Lightning takes.

`priorlab study jobs=N` starts each base, extra prior and fine-tune as `priorlab train ...` with its own log. A
fresh interpreter spends most of a short run importing (a tiny CPU fine-tune: about 8 s of 11); on a GPU host each
finished run that a resumed piece checked cost 12 s. The server never computes anything (no torch op, no CUDA
context), so a child initialises its own thread pools and its own GPU as a fresh process would.

The child does what the `priorlab` executable does: `sys.argv = [<venv>/bin/priorlab, *args]`, then
`priorlab.cli.main()`, in its own working folder and environment, with stdin from /dev/null and stdout and stderr
appended to the run's log. It stays in the study's process group, as a subprocess would: stopping the group (Ctrl-C,
`kill -- -PID`) stops the runs too; the server ignores Ctrl-C, so that it reports their ends to the study.
`PRIORLAB_FORKSERVER=0` turns it off (a subprocess per run).

Protocol, one JSON object per line. To the server: {"args": [...], "cwd": ..., "env": {...}, "out": path, "err":
path} (the files stdout and stderr are appended to, or STDOUT / STDERR: the study's own, which the server holds as
the descriptors named on its command line). From it: {"pid": pid} for each request, in order, and {"exited": pid,
"rc": code} as each child ends.

Over 300 lines: the server, the study's client of it and the forked variant speak one protocol and share its
lifecycle (start, requests, child ends, shutdown), so they stay in one file.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import NoReturn

STDOUT, STDERR = "<stdout>", "<stderr>"  # a run's output to the study's own stdout or stderr
OWN: dict[str, int] = {}  # in the server: STDOUT and STDERR → the descriptors the study passed
PRELOAD = ("priorlab.cli", "priorlab.commands.train", "priorlab.commands.evaluate", "priorlab.analysis.report",
           "priorlab.evaluation.callbacks", "priorlab.training.module")  # fmt: skip


def enabled() -> bool:
    """Whether studies start their runs through the server (on where fork exists and PRIORLAB_FORKSERVER≠0)."""
    return hasattr(os, "fork") and os.environ.get("PRIORLAB_FORKSERVER", "1") != "0"


def _child(request: dict) -> None:
    """In the forked child: the run, as the `priorlab` executable would run it; never returns."""
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a run as it stops a process
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, key in ((1, "out"), (2, "err")):
            target = request[key]  # the study's own stdout or stderr (one file offset, as a subprocess's), or a log
            opened = OWN.get(target) or os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)  # appended to
            os.dup2(opened, fd)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        code = run_command(request["args"])
    finally:
        exit_child(code)


def run_command(args: list[str]) -> int:
    """`priorlab ARGS` in this (forked) process, as the `priorlab` executable runs it, OMP_NUM_THREADS applied as a
    fresh process would: its exit status; an exception that escapes `main` is printed as the interpreter prints one,
    and gives 1 (as does a `sys.exit` with a message)."""
    _threads_from_environment()
    sys.argv = [str(Path(sys.executable).parent / "priorlab"), *args]
    try:
        from priorlab.cli import main

        main()
        return 0
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            return exit_.code or 0
        print(exit_.code, file=sys.stderr)
        return 1
    except BaseException:  # noqa: BLE001 - printed as the interpreter would print it
        traceback.print_exc()
        return 1


def exit_child(code: int) -> NoReturn:
    """End a forked child: flush its streams, then leave without the parent's atexit handlers."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001, S110 - nothing more to report from a dying child
            pass
    os._exit(code & 0xFF)


def _threads_from_environment() -> None:
    """Apply OMP_NUM_THREADS as a fresh process would: OpenMP reads it when torch is loaded, which in a fork was the
    server's start, without it. Left unapplied, two jobs of one thread each ran two threads each and took 1-3 s a
    step of a tiny model on 2 cores instead of 0.1 s (`priorlab.training.threads` measured why)."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if value.isdigit() and int(value) > 0:
        import torch

        torch.set_num_threads(int(value))


def serve() -> None:
    """The server's loop: fork a child per request, report each child's exit; on end of input, stop the children
    still running and exit."""
    import importlib

    OWN.update(zip((STDOUT, STDERR), map(int, sys.argv[1:3]), strict=True))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in PRELOAD:
        importlib.import_module(module)
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the server's own output goes nowhere: the replies are the channel
    children: set[int] = set()
    open_input = True
    while open_input or children:
        ready = select.select([sys.stdin], [], [], 0.05)[0] if open_input else time.sleep(0.05)
        if ready:
            line = sys.stdin.readline()
            if not line:
                open_input = False
                for pid in children:  # the study is gone: its runs go too (each resumes from its checkpoint)
                    _signal(pid, signal.SIGTERM)
            else:
                pid = _fork()
                if pid == 0:
                    _child(json.loads(line))
                children.add(pid)
                replies.write(json.dumps({"pid": pid}) + "\n")
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                replies.write(json.dumps({"exited": pid, "rc": os.waitstatus_to_exitcode(status)}) + "\n")


def _fork() -> int:
    """os.fork() without Python 3.12's warning that the process is multi-threaded. The server has imported the stack
    and computes nothing, so its only other threads are libraries' idle ones started at import: one each by torch and
    Lightning, and a jemalloc background thread (jemalloc registers fork handlers of its own); 4 threads in all,
    counted in /proc/self/task. The warning reached every study's output on the GPU hosts (Python 3.12)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is multi-threaded, use of fork\(\) may lead to deadlocks",
                                category=DeprecationWarning)  # fmt: skip
        return os.fork()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def preloaded() -> bool:
    """Whether this process has imported the training stack (`PRELOAD`) and runs one thread. Then the server is
    a fork of it rather than a fresh interpreter that imports the stack again (8 s on 2 cores): a study started in a
    process of one thread that already holds it: a fork of the test suite's CLI server. A user's `priorlab study`
    imports the stack only to check finished runs or a base given by path, by then with threads of its own, and
    starts a fresh server (a fork from there warned of deadlocks on an H100 host)."""
    return all(name in sys.modules for name in PRELOAD) and _one_thread()


def _one_thread() -> bool:
    """Whether this process runs one thread, counted by the OS (/proc/self/task): importing the stack starts native
    threads (4 here), and a fork of a process with threads may deadlock. False where it cannot be counted."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


class _ForkedServer:
    """The server as a fork of this process, with the part of `subprocess.Popen` that `ForkServer` uses (stdin,
    stdout, wait, kill). The fork takes the default SIGTERM, as a fresh process has, and `serve`'s input and
    replies on pipes, as `ForkServer` starts a fresh one."""

    def __init__(self, own: tuple[int, int]):
        requests, replies = os.pipe(), os.pipe()  # (read, write) each
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.dup2(requests[0], 0)
                os.dup2(replies[1], 1)
                for fd in (*requests, *replies):
                    os.close(fd)
                sys.stdin = os.fdopen(0, "r")
                sys.argv = [sys.argv[0], *map(str, own)]
                _forget_hydra()
                serve()
            finally:
                os._exit(0)
        os.close(requests[0])
        os.close(replies[1])
        self.stdin = os.fdopen(requests[1], "w", buffering=1)
        self.stdout = os.fdopen(replies[0], "r")
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            done, status = os.waitpid(self.pid, os.WNOHANG)
            if done:
                self.returncode = os.waitstatus_to_exitcode(status)
            elif deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"fork server {self.pid}", timeout)
            else:
                time.sleep(0.01)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            _signal(self.pid, signal.SIGKILL)


def _forget_hydra() -> None:
    """A fork of a command (`priorlab study` runs inside Hydra's main) holds Hydra's initialised state, which a run's
    own Hydra main refuses: cleared, as a fresh process starts."""
    if "hydra" in sys.modules:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()


class ForkServer:
    """The study's end of the server: `start(args, env, cwd, out)` returns a `Run` with the part of the
    subprocess.Popen interface that `priorlab.study.schedule` uses."""

    def __init__(self):
        own = (os.dup(1), os.dup(2))  # the study's stdout and stderr, for runs that write to them
        if preloaded():
            self.proc = _ForkedServer(own)
        else:
            command = [sys.executable, "-m", "priorlab.forkserver", *map(str, own)]
            self.proc = subprocess.Popen(command, pass_fds=own, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, bufsize=1)  # fmt: skip
        for fd in own:
            os.close(fd)
        self.exits: dict[int, int] = {}
        self.started: list[int] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            message = json.loads(line)
            with self.changed:
                if "pid" in message:
                    self.started.append(message["pid"])
                else:
                    self.exits[message["exited"]] = message["rc"]
                self.changed.notify_all()
        with self.changed:  # the server is gone: no run of it will report again
            self.started.append(-1)
            self.changed.notify_all()

    def start(self, args: list[str], env: dict, cwd: str | Path, out: str | Path, err: str | Path | None = None) -> Run:
        """Fork `priorlab ARGS`, its stdout appended to `out` and its stderr to `err` (to `out` when None); STDOUT
        and STDERR are the study's own."""
        request = {"args": list(args), "env": dict(env), "cwd": str(cwd), "out": str(out), "err": str(err or out)}
        with self.changed:
            self.proc.stdin.write(json.dumps(request) + "\n")
            self.proc.stdin.flush()
            self.changed.wait_for(lambda: self.started)
            pid = self.started.pop(0)
        if pid < 0:
            raise OSError("the study's fork server stopped; set PRIORLAB_FORKSERVER=0 to start runs as processes")
        return Run(self, pid)

    def close(self) -> None:
        """End the server (it stops the runs still running) and wait for it."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Run:
    """A forked run as `subprocess.Popen` presents a process: pid, returncode, poll(), wait(), terminate(), kill()."""

    def __init__(self, server: ForkServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exits.get(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        with self.server.changed:
            if not self.server.changed.wait_for(lambda: self.pid in self.server.exits, timeout):
                raise subprocess.TimeoutExpired(f"run {self.pid}", timeout)
        return self.poll()

    def terminate(self) -> None:
        if self.poll() is None:  # an ended run's pid may already belong to another process
            _signal(self.pid, signal.SIGTERM)

    def kill(self) -> None:
        if self.poll() is None:
            _signal(self.pid, signal.SIGKILL)


if __name__ == "__main__":
    serve()

"""The fork server that starts a study's runs (`priorlab.forkserver`): a run's exit status, its output to a log or
to the study's own stdout and stderr, its environment and threads, and stopping runs."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time

import pytest
import torch

from priorlab import forkserver


@pytest.fixture(scope="module")
def server():
    s = forkserver.ForkServer()
    yield s
    s.close()


def test_a_run_writes_its_log_and_returns_the_commands_exit_status(server, tmp_path):
    log = tmp_path / "run.log"
    log.write_text("[an earlier attempt]\n")
    run = server.start(["data", "cifar"], {**os.environ, "PRIORLAB_COMMAND": ""}, tmp_path, log)
    assert run.wait(timeout=120) == 2 and run.returncode == 2
    text = log.read_text()
    assert text.startswith("[an earlier attempt]\n")  # appended to, as a study's logs keep every attempt
    assert "priorlab: error: priorlab data cifar: the data sets it prepares are: emoji" in text


def test_a_run_can_write_to_the_studys_own_stdout_and_stderr(tmp_path, capfd):
    s = forkserver.ForkServer()  # holds the descriptors 1 and 2 of now: capfd's
    try:
        run = s.start(["data", "cifar"], dict(os.environ), tmp_path, forkserver.STDOUT, forkserver.STDERR)
        assert run.wait(timeout=120) == 2
    finally:
        s.close()
    out, err = capfd.readouterr()
    assert "priorlab: error: priorlab data cifar" in err and "priorlab: error" not in out


def test_a_run_is_stopped_by_terminate_and_by_closing_the_server(tmp_path):
    args = ["train", "data=toy2d", "model=mlp", "trainer.max_steps=1000000", f"paths.runs={tmp_path}"]
    env = {**os.environ, "PRIORLAB_COMMAND": "", "WANDB_MODE": "offline"}
    s = forkserver.ForkServer()
    try:
        first = s.start(args, env, tmp_path, tmp_path / "a.log")
        second = s.start([*args, "study=other"], env, tmp_path, tmp_path / "b.log")
        time.sleep(1)
        assert first.poll() is None and second.poll() is None
        first.terminate()
        assert first.wait(timeout=60) != 0
        assert second.poll() is None
    finally:
        s.close()  # end of input: the server stops the runs still running, then exits
    assert s.proc.returncode == 0 and second.wait(timeout=5) != 0


def test_omp_num_threads_reaches_torch_in_a_fork(monkeypatch):
    """OpenMP read the environment when the server loaded torch, so a fork applies it itself: two jobs of one thread
    each would otherwise run two threads each (1-3 s a step of a tiny model on 2 cores instead of 0.1 s)."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        forkserver._threads_from_environment()
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "not a number")
        torch.set_num_threads(2)
        forkserver._threads_from_environment()  # left to torch, as OpenMP ignores a malformed value
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_server_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("PRIORLAB_FORKSERVER", "0")
    assert not forkserver.enabled()
    monkeypatch.delenv("PRIORLAB_FORKSERVER")
    assert forkserver.enabled() == hasattr(os, "fork")


def test_a_server_is_forked_only_from_a_process_of_one_thread_that_holds_the_stack():
    """`preloaded`: the stack imported (PRELOAD) and one OS thread; a second thread, even one Python's threading does
    not count as alive for long, makes a study start a fresh server instead (a fork of it may deadlock)."""
    import threading

    for name in forkserver.PRELOAD:
        importlib.import_module(name)
    release = threading.Event()
    worker = threading.Thread(target=release.wait)
    worker.start()
    try:
        assert not forkserver._one_thread() and not forkserver.preloaded()
    finally:
        release.set()
        worker.join()
    code = "import os; from priorlab import forkserver; print(forkserver._one_thread(), forkserver.preloaded())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["True", "False"]  # one thread, the stack not imported


def test_the_servers_fork_is_not_reported_as_a_fork_of_a_multi_threaded_process(monkeypatch):
    """Python 3.12 warns at each fork of a process with threads; the server's are libraries' idle ones (`_fork`),
    and the warning must not reach a study's output. Python 3.12's own warning is stood in for by a fake fork."""
    import warnings

    def fork_that_warns() -> int:
        warnings.warn("This process (pid=1) is multi-threaded, use of fork() may lead to deadlocks in the child.",
                      DeprecationWarning, stacklevel=2)  # fmt: skip
        return 12345

    monkeypatch.setattr(forkserver.os, "fork", fork_that_warns)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forkserver._fork() == 12345
        with pytest.raises(DeprecationWarning):  # the stand-in warns outside `_fork`
            fork_that_warns()

"""A run killed with SIGKILL and started again with the same command ends with the weights of an unbroken run; started
again with other settings or another base, a run refuses them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import run_cli
from priorlab.models.io import content_hash

ARGS = ["train", "data=toy2d", "model=mlp", "model.hidden=64", "logger=csv", "trainer.max_steps=600",
        "trainer.val_check_interval=50", "trainer.log_every_n_steps=50", "callbacks.ema.decay=0.99"]  # fmt: skip


def _cmd(study):
    return [str(Path(sys.executable).parent / "priorlab"), *ARGS, f"study={study}"]


def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    # one thread in every process: the weights are compared bit for bit, and a thread count that followed the
    # machine's load (cpu_threads=auto) could split the same reductions differently in the runs compared
    env = {"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    assert run_cli(*ARGS, "study=unbroken", cwd=tmp_path, env=env).returncode == 0
    proc = subprocess.Popen(_cmd("killed"), cwd=tmp_path, env={**os.environ, **env}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # a process of its own, for SIGKILL  # fmt: skip
    ckpt = tmp_path / "runs/killed/base/checkpoints/last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]
    assert 0 < step < 600 and not (tmp_path / "runs/killed/base/done.json").exists()
    assert run_cli(*ARGS, "study=killed", cwd=tmp_path, env=env).returncode == 0
    a = load_file(tmp_path / "runs/unbroken/base/model/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "runs/killed/base/model/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the resumed run's metrics.csv continues the killed session's: the same rows as the unbroken run's, once each
    unbroken, killed = (pd.read_csv(tmp_path / f"runs/{r}/base/metrics.csv") for r in ("unbroken", "killed"))
    assert sorted(killed.columns) == sorted(unbroken.columns)
    for frame in (unbroken, killed):
        frame.sort_values(["step", *sorted(frame.columns)], inplace=True, ignore_index=True)
    assert len(killed) == len(unbroken) and (killed["step"].to_numpy() == unbroken["step"].to_numpy()).all()
    for column in ("val/loss_cond", "train/loss"):
        assert np.allclose(killed[column], unbroken[column], rtol=1e-5, equal_nan=True), column
    # started again once finished, it trains nothing
    assert "is finished" in run_cli(*ARGS, "study=killed", cwd=tmp_path, env=env).stdout


def test_corrupt_checkpoint_is_a_one_line_error_and_nothing_is_overwritten(tmp_path):
    from conftest import run_cli

    args = ["train", "data=toy2d", "model=mlp", "model.hidden=16", "logger=csv", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "study=c"]  # fmt: skip
    ckpt_dir = tmp_path / "runs/c/base/checkpoints"
    ckpt_dir.mkdir(parents=True)
    (ckpt_dir / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "cannot be loaded" in out.stderr and "Delete it to start the run over" in out.stderr
    assert (ckpt_dir / "last.ckpt").read_bytes() == b"PK\x03\x04 truncated"
    assert not (tmp_path / "runs/c/base/model").exists()


def test_non_finite_loss_stops_training_naming_the_step(tmp_path):
    import re

    from conftest import run_cli

    # a stable start, checkpointed at steps 5 and 10; then a learning rate of 1e30 from step 10 on
    blowup = ["+callbacks.blowup._target_=blowup.RaiseLearningRate", "+callbacks.blowup.after_step=10"]
    out = run_cli("train", "data=toy2d", "model=mlp", "model.hidden=16", "logger=csv", "trainer.max_steps=200",
                  "trainer.val_check_interval=5", "study=n", *blowup, cwd=tmp_path,
                  env={"PYTHONPATH": str(Path(__file__).parent)})  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    found = re.search(r"priorlab: error: the (training loss became \S+|weights hold non-finite values) at step (\d+)",
                      out.stderr)  # fmt: skip
    assert found, out.stderr[-2000:]
    assert 10 < int(found.group(2)) < 15  # within a few steps of the raise, before the next validation
    ckpt = tmp_path / "runs/n/base/checkpoints/last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    assert state["global_step"] == 10  # the last checkpoint before the blow-up is kept, and its weights are finite
    tensors = [v for v in state["state_dict"].values() if v.is_floating_point()]
    assert tensors and all(torch.isfinite(v).all() for v in tensors)
    assert not (tmp_path / "runs/n/base/done.json").exists()


TINY_RUN = ["data=toy2d", "data.num_samples=512", "model=mlp", "model.hidden=16", "logger=csv", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "study=r"]  # fmt: skip
BASE, FINETUNE = "runs/r/base", "runs/r/finetune/p=0.1/seed=0"
FINETUNE_ARGS = ["stage=finetune", f"base={BASE}"]


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """A finished base and a finished fine-tune of it (4 steps each), copied by each test that changes them."""
    from conftest import run_cli

    root = tmp_path_factory.mktemp("runs")
    for args in ([], FINETUNE_ARGS):
        out = run_cli("train", *TINY_RUN, *args, cwd=root)
        assert out.returncode == 0, out.stderr[-3000:]
    return root


def _copy(tiny_runs: Path, tmp_path: Path) -> Path:
    shutil.copytree(tiny_runs / "runs", tmp_path / "runs")
    return tmp_path


def _kill(run: Path) -> None:
    """Leave `run` as a run killed after its last checkpoint: no done.json, no model folder."""
    (run / "done.json").unlink()
    shutil.rmtree(run / "model")


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _replace_weights(model_dir: Path) -> None:
    """Overwrite a model folder's weights with other (valid) weights."""
    path = model_dir / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    for key in tensors:
        tensors[key] = tensors[key] + 0.5
    save_file(tensors, path)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("priorlab: error:")]


@pytest.mark.parametrize(
    ("run", "finished", "args", "replace_base", "expected"),
    [
        (BASE, False, ["optimizer.lr=0.05"], False, ["holds a run started with other settings",
                                                    "optimizer.lr: 0.0003 (recorded) vs 0.05 (given)"]),
        (BASE, False, ["model.hidden=64"], False, ["model.hidden: 16 (recorded) vs 64 (given)"]),
        (BASE, True, ["optimizer.lr=0.05", "seed=3"], False, ["is finished and was trained with other settings",
                                                             "optimizer.lr: 0.0003 (recorded) vs 0.05 (given)",
                                                             "seed: 0 (recorded) vs 3 (given)"]),
        (FINETUNE, False, FINETUNE_ARGS, True, ["holds a run started with other settings", "base weights (sha256): "]),
        (FINETUNE, True, FINETUNE_ARGS, True, ["is finished and was trained with other settings",
                                              "base weights (sha256): "]),
    ],
    ids=["killed_other_lr", "killed_other_size", "finished_other_lr_and_seed", "killed_base_replaced",
         "finished_base_replaced"],
)  # fmt: skip
def test_a_resumed_or_finished_run_refuses_other_settings_naming_them(tiny_runs, tmp_path, run, finished, args,
                                                                       replace_base, expected):  # fmt: skip
    """Started again with other training settings or another base, a run with a checkpoint or done.json ends in one
    line naming each differing key (or both hashes), rc 2, and nothing in its folder changes."""
    from conftest import run_cli

    root = _copy(tiny_runs, tmp_path)
    if not finished:
        _kill(root / run)
    if replace_base:
        _replace_weights(root / BASE / "model")
    before = _files(root / run)
    out = run_cli("train", *TINY_RUN, *args, cwd=root)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    assert all(text in line for text in expected), line
    assert "resume=force" in line and "is finished (done.json present)" not in out.stdout
    if replace_base:
        recorded = json.loads((tiny_runs / FINETUNE / "base.json").read_text())["sha256"]
        given = content_hash(root / BASE / "model")
        assert f"{recorded[:12]} (recorded) vs {given[:12]} (given, {BASE}/model)" in line
    assert _files(root / run) == before


def test_resume_force_continues_and_records_what_differed(tiny_runs, tmp_path):
    from conftest import run_cli

    root = _copy(tiny_runs, tmp_path)
    run = root / FINETUNE
    original = json.loads((run / "model/priorlab.json").read_text())["base"]["sha256"]
    _kill(run)
    _replace_weights(root / BASE / "model")
    out = run_cli("train", *TINY_RUN, *FINETUNE_ARGS, "optimizer.lr=0.05", "resume=force", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (run / "done.json").exists()
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["optimizer"]["lr"] == 0.05 and config["resume"] == "force"
    (forced,) = json.loads((run / "resume_forced.json").read_text())
    assert forced["step"] == 4 and forced["settings"]["optimizer.lr"] == {"recorded": 0.0003, "given": 0.05}
    new = content_hash(root / BASE / "model")
    assert forced["settings"]["base weights (sha256)"]["recorded"] == original
    assert forced["settings"]["base weights (sha256)"]["given"]["sha256"] == new
    base = json.loads((run / "model/priorlab.json").read_text())["base"]
    assert base["sha256"] == original and base["resumed_with"]["sha256"] == new  # the weights it started from
    # a finished run given other settings with resume=force is left as it is
    before = _files(run)
    out = run_cli("train", *TINY_RUN, *FINETUNE_ARGS, "optimizer.lr=0.1", "resume=force", cwd=root)
    assert out.returncode == 0 and "is finished" in out.stdout, out.stderr[-3000:]
    assert _files(run) == before


def test_settings_that_do_not_change_training_may_differ_on_resume(tiny_runs, tmp_path):
    """Where the run folder is spelled from, logging, validation, evaluation and (for a base) cond_dropout."""
    from conftest import run_cli

    root = _copy(tiny_runs, tmp_path)
    _kill(root / BASE)
    other = [f"paths.runs={root / 'runs'}", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1", "eval=tiny",
             "cond_dropout=0.3", "data.name=toy"]  # fmt: skip
    out = run_cli("train", *TINY_RUN, *other, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (root / BASE / "done.json").exists() and not (root / BASE / "resume_forced.json").exists()


def test_evaluate_refuses_the_recorded_base_changed_since_the_fine_tune(tiny_runs, tmp_path):
    from conftest import run_cli

    root = _copy(tiny_runs, tmp_path)
    _replace_weights(root / BASE / "model")
    given = content_hash(root / BASE / "model")
    # the fine-tune recorded the base in the folder it was copied from: this one is another prior, used with a note
    out = run_cli("evaluate", f"model={FINETUNE}", f"base={BASE}", "eval=tiny", "out=other_prior", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"note: base={BASE}/model is not the base {FINETUNE}/model was fine-tuned from" in out.stdout
    meta_path = root / FINETUNE / "model/priorlab.json"
    meta = json.loads(meta_path.read_text())
    recorded = meta["base"]["sha256"]
    meta["base"]["path"] = str((root / BASE / "model").resolve())  # as if trained here, not where it was copied from
    meta_path.write_text(json.dumps(meta))
    before = _files(root / "runs")
    out = run_cli("evaluate", f"model={FINETUNE}", f"base={BASE}", "eval=tiny", cwd=root)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    (line,) = _error_lines(out.stderr)
    assert line == (f"priorlab: error: base={BASE}/model has changed since {FINETUNE}/model was "
                    f"fine-tuned from it: its weights hash to {given[:12]}, the fine-tune recorded {recorded[:12]}. "
                    "Pass the base it was trained from, or base_check=false to use this one anyway")  # fmt: skip
    assert _files(root / "runs") == before
    out = run_cli("evaluate", f"model={FINETUNE}", f"base={BASE}", "eval=tiny", "base_check=false", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert list((root / FINETUNE / "eval").glob("step=*_cond.json"))

"""A run killed with SIGKILL and started again with the same command ends with the weights of an unbroken run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ARGS = ["train", "data=toy2d", "model=mlp", "model.hidden=64", "logger=csv", "trainer.max_steps=1500",
        "trainer.val_check_interval=50", "trainer.log_every_n_steps=50", "callbacks.ema.decay=0.99"]  # fmt: skip


def _cmd(study):
    return [str(Path(sys.executable).parent / "priorlab"), *ARGS, f"study={study}"]


def test_sigkill_then_resume_gives_identical_weights(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    subprocess.run(_cmd("unbroken"), cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    proc = subprocess.Popen(_cmd("killed"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "runs/killed/base/checkpoints/last.ckpt"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]
    assert 0 < step < 1500 and not (tmp_path / "runs/killed/base/done.json").exists()
    subprocess.run(_cmd("killed"), cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    a = load_file(tmp_path / "runs/unbroken/base/model/diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "runs/killed/base/model/diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # started again once finished, it trains nothing
    out = subprocess.run(_cmd("killed"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "is finished" in out.stdout


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
    blowup = ["+callbacks.blowup._target_=conftest.RaiseLearningRate", "+callbacks.blowup.after_step=10"]
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

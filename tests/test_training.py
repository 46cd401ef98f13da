import csv
import math
import re
import shutil
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from priorlab.commands.train import build_module
from priorlab.errors import UserError
from priorlab.models import save_denoiser

TINY_MLP = ["data=toy2d", "model=mlp", "model.hidden=16", "data.batch_size=32"]


def _module(compose_tmp, overrides: list[str]):
    """The composed config, its set-up datamodule, and the DiffusionModule that `priorlab train` builds."""
    cfg = compose_tmp(overrides)
    dm = instantiate(cfg.data)
    dm.setup()
    module, _ = build_module(cfg, dm)
    return cfg, dm, module


def test_finetune_module_starts_at_the_base_prior(compose_tmp, tmp_path):
    base_cfg = compose_tmp(["data=toy2d", "model=mlp", "model.hidden=32"])
    dm = instantiate(base_cfg.data)
    dm.setup()
    base_module, meta = build_module(base_cfg, dm)
    assert meta["cond_dropout"] == 1.0 and base_module.cond_dropout == 1.0
    with torch.no_grad():
        for p in base_module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_denoiser(base_module.denoiser, base_module.scheduler, tmp_path / "base")
    ft_cfg = compose_tmp(
        [
            "data=toy2d",
            "model=mlp",
            "model.hidden=32",
            "stage=finetune",
            f"base={tmp_path / 'base'}",
            "cond_dropout=0.1",
        ]
    )
    module, meta = build_module(ft_cfg, dm)
    x, y = dm.val_set.tensors
    t = torch.randint(0, 1000, (len(x),))
    with torch.no_grad():
        assert torch.equal(
            module.denoiser.eval()(x, t, y, force_drop=True),
            base_module.denoiser.eval()(x, t, y, force_drop=True),
        )
    assert meta["base"]["sha256"] and meta["cond_dropout"] == 0.1


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_training_reduces_loss_and_drops_labels_at_rate_p(compose_tmp, prediction_type):
    cfg = compose_tmp(
        [
            "data=toy2d",
            "model=mlp",
            "model.hidden=64",
            "data.batch_size=256",
            "logger=csv",
            "stage=finetune",
            f"diffusion.prediction_type={prediction_type}",
        ]
    )
    dm = instantiate(cfg.data)
    dm.setup()
    cfg.stage.name = "base"  # a base-shaped module, then the dropout of a fine-tune
    module, _ = build_module(cfg, dm)
    module.cond_dropout = 0.3
    rates, losses = [], []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            rates.append(trainer.callback_metrics["train/drop_rate"].item())
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(
        max_steps=60,
        logger=False,
        callbacks=[Record()],
        enable_progress_bar=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        accelerator="cpu",
        log_every_n_steps=1,  # the metrics are logged at the steps that Lightning writes
    )
    trainer.fit(module, dm)
    # 60 batches of 256 labels: the standard error of the mean rate is about 0.004
    assert sum(rates) / len(rates) == pytest.approx(0.3, abs=0.02)
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_throughput_excludes_validation_and_checkpoint_time(compose_tmp, tmp_path):
    """On a clock that the test advances itself: each training step takes 1 s, each validation 100 s and each
    checkpoint written after it 1,000 s. The meter times the 10 steps after its 2 of warm-up, and nothing else."""
    import json

    from priorlab.training.callbacks import Throughput

    cfg, dm, module = _module(compose_tmp, TINY_MLP)
    now = [0.0]

    def advance(seconds: float) -> None:
        now[0] += seconds

    class Step(L.Callback):  # listed before the meter: its step's end is read after the step's second
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            advance(1.0)

    class SlowValidation(L.Callback):  # like the evaluation callbacks, which run at validation epoch start
        def on_validation_epoch_start(self, trainer, pl_module):
            advance(100.0)

    class SlowCheckpoint(L.Callback):  # like ModelCheckpoint, which Lightning runs after every other callback
        def on_validation_end(self, trainer, pl_module):
            advance(1000.0)

    meter = Throughput(tmp_path / "throughput.json", warmup=2, clock=lambda: now[0])
    callbacks = [Step(), SlowValidation(), meter, SlowCheckpoint()]
    trainer = L.Trainer(max_steps=12, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        accelerator="cpu", val_check_interval=5, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, callbacks=callbacks)  # fmt: skip
    trainer.fit(module, dm)
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert now[0] == 12 + 2 * 1100  # the clock ran through both validations (steps 5 and 10) and checkpoints
    assert result["steps"] == 10 and result["world_size"] == 1
    assert result["seconds"] == 10.0  # steps 3 to 12, one second each: the 2,200 s of validation left out
    assert result["images_per_s"] == 10 * 32 / 10.0 == result["images_per_s_per_device"]


def test_progress_bar_reads_the_metrics_only_every_n_steps(compose_tmp, monkeypatch, capsys):
    """Reading train/loss for display waits for the GPU (.item()). Lightning does it after every batch for metrics
    logged with prog_bar=True, and its bar reads the metrics after every batch: neither may happen every step.
    On a terminal the bar is Lightning's live bar, redrawn in place at every step."""
    from priorlab.training.progress_bar import StepProgressBar as ProgressBar

    cfg = compose_tmp(["data=toy2d", "model=mlp", "model.hidden=16", "data.batch_size=32"])
    assert cfg.callbacks.progress._target_ == "priorlab.training.progress_bar.StepProgressBar"
    assert instantiate(cfg.callbacks.progress).metrics_every_n_steps == cfg.trainer.log_every_n_steps
    dm = instantiate(cfg.data)
    dm.setup()
    module, _ = build_module(cfg, dm)
    read_at = []
    get_metrics = ProgressBar.get_metrics
    monkeypatch.setattr(
        ProgressBar, "get_metrics", lambda self, trainer, pl_module: (read_at.append(trainer.global_step),
                                                                      get_metrics(self, trainer, pl_module))[1]
    )  # fmt: skip
    bar = ProgressBar(metrics_every_n_steps=5)
    trainer = L.Trainer(max_steps=12, logger=False, enable_checkpointing=False, accelerator="cpu",
                        limit_val_batches=0, num_sanity_val_steps=0, callbacks=[bar])  # fmt: skip
    pbar_metrics = []

    class Watch(L.Callback):  # what Lightning converted to numbers (with .item()) for the bar at this step
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pbar_metrics.append(dict(trainer._logger_connector._progress_bar_metrics))

    trainer.callbacks.append(Watch())
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # Lightning's bars write to stdout
    trainer.fit(module, dm)
    shown = capsys.readouterr().out
    assert re.search(r"\rstep 11/12 \|█+.*\rstep 12/12 \|█+\|", shown) and "step: " not in shown, shown[-500:]
    assert {1, 5, 10} <= set(read_at) and set(read_at) <= {1, 5, 10, 12}  # never at steps 2-4, 6-9, 11
    assert len(pbar_metrics) == 12 and not any(pbar_metrics)  # no metric is logged with prog_bar=True
    shown = bar.get_metrics(trainer, module)
    assert trainer.progress_bar_callback is bar
    assert float(shown["train/loss"]) == pytest.approx(float(trainer.callback_metrics["train/loss"]), rel=1e-3)


KNOWN_NOISE = (
    "Tip:",
    "LeafSpec",
    "does not have many workers",
    "exists and is not empty",
    "set_float32_matmul_precision",
)


def test_a_run_in_a_log_file_prints_ten_step_lines_and_none_of_the_known_warnings(compose_tmp, capfd, caplog,
                                                                                  recwarn, monkeypatch):  # fmt: skip
    """Not on a terminal (a study's per-run log) the bar prints one line per tenth of max_steps, with the total,
    and no carriage return or cursor move (it read `step N/None`, redrawn at every step: 165 KB per fine-tune). A
    fresh run's loggers find its folder empty (Lightning warns of an "Experiment logs directory ... not empty" and
    drops metrics.csv); neither it nor its resumption prints the notices `training.quiet` silences."""
    import lightning.pytorch.trainer.connectors.data_connector as data_connector

    from priorlab.commands.train import train

    # Lightning's num_workers warning needs more than 2 cores; this machine may have 2
    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda num_devices: 15)
    cfg_args = ["data=toy2d", "model=mlp", "model.hidden=16", "logger=default", "trainer.log_every_n_steps=1",
                "trainer.val_check_interval=10", "trainer.limit_val_batches=1"]  # fmt: skip
    cfg = compose_tmp([*cfg_args, "trainer.max_steps=20"])
    train(cfg)
    first = capfd.readouterr()
    lines = [line for line in first.out.splitlines() if line.startswith("step")]
    assert [line.split(" (")[0] for line in lines] == [f"step: {n}/20" for n in range(2, 21, 2)], first.out
    assert re.fullmatch(r"step: 20/20 \(100%\) \[.*, .*it/s, train/loss=[0-9.]+\]", lines[-1])
    assert "\r" not in first.out + first.err and "\x1b[" not in first.out + first.err
    rows = list(csv.DictReader(open(Path(cfg.paths.run_dir) / "metrics.csv")))
    assert [r["step"] for r in rows if r.get("train/loss")] == [str(s) for s in range(20)]
    run_dir = Path(cfg.paths.run_dir)  # killed after its last checkpoint: resumed from it, to 30 steps now
    (run_dir / "done.json").unlink()
    shutil.rmtree(run_dir / "model")
    train(compose_tmp([*cfg_args, "trainer.max_steps=30", "resume=force"]))
    again = capfd.readouterr()
    lines = [line.split(" (")[0] for line in again.out.splitlines() if line.startswith("step")]
    assert lines == ["step: 21/30", "step: 24/30", "step: 27/30", "step: 30/30"], again.out  # it read `step 21/None`
    assert "Restored all states from the checkpoint" in caplog.text  # it did resume (Lightning logs at INFO)
    shown = first.out + first.err + again.out + again.err + caplog.text + "\n".join(str(w.message) for w in recwarn)
    assert [text for text in KNOWN_NOISE if text in shown] == []


def test_base_with_another_schedule_or_prediction_type_is_refused():
    from diffusers import DDPMScheduler

    from priorlab.commands.train import check_same_schedule
    from priorlab.errors import UserError

    base = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon").config
    check_same_schedule(base, DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="epsilon").config)
    with pytest.raises(UserError, match="prediction_type: 'epsilon' \\(base\\) vs 'v_prediction'"):
        check_same_schedule(
            base, DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction").config
        )
    with pytest.raises(UserError, match="beta_schedule"):
        check_same_schedule(base, DDPMScheduler(beta_schedule="linear").config)


def test_ema_is_the_exponential_average_of_the_weights_after_each_step(compose_tmp):
    from priorlab.training.callbacks import EMA

    cfg, dm, module = _module(compose_tmp, [*TINY_MLP, "optimizer.lr=1e-2"])
    seen = []

    class Record(L.Callback):  # listed before EMA: sees the weights the EMA update is about to take in
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append([p.detach().clone() for p in pl_module.denoiser.parameters()])

    decay = 0.7
    ema, pairs = EMA(decay=decay), []

    class Lists(L.Callback):  # listed after EMA: the tensor lists it updated
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pairs.append(ema._pairs[1])

    trainer = L.Trainer(max_steps=5, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        accelerator="cpu", limit_val_batches=0, callbacks=[Record(), ema, Lists()])  # fmt: skip
    trainer.fit(module, dm)
    assert len(pairs) == 5 and all(p is pairs[0] for p in pairs)  # the lists are built once, not at every step
    expected = seen[0]
    for weights in seen[1:]:
        expected = [decay * a + (1 - decay) * w for a, w in zip(expected, weights, strict=True)]
    final = list(module.denoiser.parameters())  # the average is copied into the module at the end of fit
    assert not torch.equal(seen[-1][0], seen[0][0])  # the weights moved, so the average is not trivial
    for got, want in zip(final, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_each_run_seed_has_its_own_batch_stream(compose_tmp):
    def batches(seed: int) -> torch.Tensor:
        cfg = compose_tmp(["data=toy2d", "model=mlp", "model.hidden=8", "data.num_samples=512", "data.batch_size=8",
                           f"seed={seed}"])  # fmt: skip
        dm = instantiate(cfg.data)
        dm.setup()
        module, _ = build_module(cfg, dm)
        seen = []

        class Record(L.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.append(batch[0].clone())

        trainer = L.Trainer(max_steps=3, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                            accelerator="cpu", limit_val_batches=0, callbacks=[Record()])  # fmt: skip
        trainer.fit(module, dm)
        return torch.stack(seen)  # (steps, batch, 2): the same train split for every seed (data.split_seed=0)

    first = batches(0)
    assert first.shape == (3, 8, 2) and torch.equal(batches(0), first)
    other = batches(1)
    assert not torch.equal(other, first) and not torch.equal(other[0], first[0])


def test_a_non_finite_loss_on_any_process_stops_every_process(compose_tmp):
    """The decision is a collective: a rank whose own loss is finite stops too when another rank's is not."""
    from types import SimpleNamespace

    from priorlab.errors import UserError

    cfg, dm, module = _module(compose_tmp, ["data=toy2d", "model=mlp", "model.hidden=8"])

    class TwoRanks:  # this rank and another whose loss is non-finite or not; any() is what DDP's all-reduce gives
        def __init__(self, other_bad: bool):
            self.other_bad, self.calls = other_bad, []

        def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
            self.calls.append((decision, all))
            votes = (decision, self.other_bad)
            return (votes[0] and votes[1]) if all else (votes[0] or votes[1])

    strategy = TwoRanks(other_bad=True)
    module.trainer = SimpleNamespace(global_step=7, strategy=strategy)
    with pytest.raises(UserError, match="training loss became non-finite on another process at step 7"):
        module.check_finite(torch.tensor(0.5))
    assert strategy.calls == [(False, False)]  # asked with this rank's own verdict, combined with any()
    strategy = TwoRanks(other_bad=False)
    module.trainer = SimpleNamespace(global_step=8, strategy=strategy)
    module.check_finite(torch.tensor(0.5))
    with pytest.raises(UserError, match="training loss became nan at step 8"):
        module.check_finite(torch.tensor(float("nan")))
    assert strategy.calls == [(False, False), (True, False)]  # every step on the CPU


def test_metrics_are_logged_only_at_the_steps_lightning_writes(compose_tmp, tmp_path, monkeypatch):
    """self.log costs host time at every call; training_step calls it only at the steps whose metrics Lightning
    writes to the loggers (the first and every log_every_n_steps-th), and the CSV log is the same as before."""
    from lightning.pytorch.loggers import CSVLogger

    cfg, dm, module = _module(compose_tmp, TINY_MLP)
    logged_at = []
    log = L.LightningModule.log
    monkeypatch.setattr(L.LightningModule, "log", lambda self, name, *a, **k: (
        logged_at.append((self.global_step + 1, name)), log(self, name, *a, **k))[1])  # fmt: skip
    trainer = L.Trainer(max_steps=12, log_every_n_steps=5, logger=CSVLogger(tmp_path, name="", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        limit_val_batches=0)  # fmt: skip
    trainer.fit(module, dm)
    steps = sorted({s for s, name in logged_at if name == "train/loss"})
    assert steps == [1, 5, 10]
    assert {s for s, name in logged_at if name == "train/drop_rate"} == {1, 5, 10}
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    written = [int(r["step"]) + 1 for r in rows if r.get("train/loss")]
    assert written == [5, 10]  # what Lightning writes with every step logged: its steps 4 and 9 (from 0)


def test_a_step_stopped_by_a_callback_writes_its_own_loss(compose_tmp, tmp_path):
    """Lightning writes the metrics of a step at which a callback stops training (its Timer does, in
    on_train_batch_end, after training_step decided not to log): that step's values, not the last logged ones."""
    from lightning.pytorch.loggers import CSVLogger

    cfg, dm, module = _module(compose_tmp, TINY_MLP)
    losses = []

    class StopAt7(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())
            if trainer.global_step == 7:
                trainer.should_stop = True

    trainer = L.Trainer(max_steps=20, log_every_n_steps=5, logger=CSVLogger(tmp_path, name="", version=""),
                        enable_checkpointing=False, enable_progress_bar=False, accelerator="cpu",
                        limit_val_batches=0, callbacks=[StopAt7()])  # fmt: skip
    trainer.fit(module, dm)
    rows = {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(open(tmp_path / "metrics.csv"))
            if r.get("train/loss")}  # fmt: skip
    assert sorted(rows) == [4, 6]  # Lightning's step 4 (the 5th) and the stopped 7th, numbered 6
    assert rows[4] == pytest.approx(losses[4]) and rows[6] == pytest.approx(losses[6])
    assert losses[6] != pytest.approx(losses[4])


def test_cuda_graph_compile_refuses_gradient_accumulation(compose_tmp, monkeypatch):
    from priorlab.errors import UserError

    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: None)  # no GPU here: the mode is what counts
    cfg, dm, module = _module(compose_tmp, [*TINY_MLP, "compile=reduce-overhead"])
    trainer = L.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accelerator="cpu", limit_val_batches=0)  # fmt: skip
    with pytest.raises(UserError, match="compile=reduce-overhead replays the passes from CUDA graphs"):
        trainer.fit(module, dm)
    module.compile_mode = "default"  # compile=true accumulates
    L.Trainer(max_steps=2, accumulate_grad_batches=2, logger=False, enable_checkpointing=False,
              enable_progress_bar=False, accelerator="cpu", limit_val_batches=0).fit(module, dm)  # fmt: skip


def test_ema_builds_its_lists_again_when_the_weights_are_replaced():
    from torch.optim.swa_utils import AveragedModel

    from priorlab.training.callbacks import EMA

    module = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    module.device = torch.device("cpu")
    ema = EMA(decay=0.5)
    ema._average_model = AveragedModel(module, use_buffers=True)
    first = ema._tensor_pairs(ema._average_model, module)
    assert ema._tensor_pairs(ema._average_model, module) is first
    module[0].weight.data = module[0].weight.data.clone() + 1  # new storage: the kept views would not follow it
    again = ema._tensor_pairs(ema._average_model, module)
    assert again is not first and again[0][1][0].data_ptr() == module[0].weight.data_ptr()


def test_label_rows_train_at_label_lr_scale_times_the_rate(compose_tmp):
    from priorlab.models.denoiser import label_tables

    _, _, module = _module(compose_tmp, ["data=toy2d", "model=mlp", "model.hidden=16", "model.depth=1",
                                         "optimizer.lr=0.01", "label_lr_scale=25"])  # fmt: skip
    optimizer = module.configure_optimizers()
    rest, tables = optimizer.param_groups
    assert rest["lr"] == 0.01 and tables["lr"] == pytest.approx(0.25)
    table_params = {id(p) for t in label_tables(module.denoiser.net) for p in t.parameters()}
    assert {id(p) for p in tables["params"]} == table_params and not {id(p) for p in rest["params"]} & table_params
    assert len(rest["params"]) + len(tables["params"]) == len(list(module.denoiser.parameters()))
    _, _, plain = _module(compose_tmp, ["data=toy2d", "model=mlp", "model.hidden=16", "model.depth=1"])
    assert len(plain.configure_optimizers().param_groups) == 1  # the default: one group at optimizer.lr
    with pytest.raises(UserError, match="label_lr_scale=0 must be positive"):
        _module(compose_tmp, ["data=toy2d", "model=mlp", "label_lr_scale=0"])


def test_cosine_schedule_decays_every_group_to_zero_at_max_steps(compose_tmp):
    """lr_schedule=cosine: at step s both groups run at their rate × (1 + cos(π s / max_steps)) / 2."""
    cfg, dm, module = _module(compose_tmp, ["data=toy2d", "model=mlp", "model.hidden=16", "model.depth=1",
                                            "optimizer.lr=0.01", "label_lr_scale=4", "lr_schedule=cosine"])  # fmt: skip
    seen = []

    class Record(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[Record()])  # fmt: skip
    trainer.fit(module, datamodule=dm)
    expected = [[0.01 * f, 0.04 * f] for f in (0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(8))]
    assert torch.allclose(torch.tensor(seen), torch.tensor(expected), rtol=1e-6, atol=0)
    assert seen[0] == pytest.approx([0.01, 0.04]) and seen[-1][0] < 0.0005
    with pytest.raises(UserError, match="lr_schedule='step' is unknown"):
        _module(compose_tmp, ["data=toy2d", "model=mlp", "lr_schedule=step"])


def test_the_same_run_started_twice_fails_in_one_line(tmp_path):
    """While one process holds a run folder, the same command elsewhere ends with one line naming the holder's
    PID (rc 2), and writes nothing into the folder; once released, the run goes ahead."""
    import os

    from conftest import run_cli
    from priorlab.commands.train import run_lock

    args = (
        "train",
        "stage=base",
        "data=toy2d",
        "model=mlp",
        "model.hidden=16",
        "model.depth=1",
        "study=locked",
        "trainer.max_steps=2",
        "trainer.val_check_interval=1",
        "trainer.limit_val_batches=1",
        "logger=csv",
    )
    run_dir = tmp_path / "runs/locked/base"
    with run_lock(run_dir):
        out = run_cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and f"is in use by process {os.getpid()}" in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and not run_dir.exists()
    out = run_cli(*args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (run_dir / "done.json").exists()


def test_cpu_threads_auto_takes_the_free_cores_and_keeps_the_users_omp_setting(monkeypatch):
    """bench/cpu_threads.py: two threads on a 2-core machine with another busy process ran a step 2.3× slower than
    one, so auto takes the cores not busy at the start (cores − load average, at least 1)."""
    from priorlab.training import threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    for load, expected in ((0.1, 2), (0.9, 1), (1.4, 1), (3.7, 1)):
        monkeypatch.setattr(threads.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
        assert threads.cpu_threads("auto") == expected
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 16)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (5.2, 0.0, 0.0))
    assert threads.cpu_threads("auto") == 11 and threads.cpu_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert threads.cpu_threads("auto") is None  # the user's (or the study's per-job) setting stands
    for bad in (0, -1, "two", True, 1.5, 2**70):
        with pytest.raises(UserError, match="must be auto or a whole number"):
            threads.cpu_threads(bad)


def test_every_seed_is_derived_by_one_module_with_the_values_runs_have_always_used():
    from priorlab import seeds

    # values of the formulas written at each call site before `seeds` existed: old runs reproduce bit for bit
    assert seeds.noise_seed(3, 17, 1) == (3 * 1_000_003 + 17) * 1_009 + 1
    assert seeds.step_seed(seeds.batch_seed(2, 5), 9) == ((2 * 1_000_003 + 5) * 1_000_003 + 9) % 2**64
    assert seeds.validation_seed(4) == 1004
    assert torch.equal(seeds.sample_seeds("samples", 2, 3), torch.tensor([2_000_000, 2_000_001, 2_000_002]))
    assert torch.equal(seeds.sample_seeds("check", 0, 2), torch.tensor([777_000_000, 777_000_001]))
    assert (seeds.stream_seed("heldout", 1), seeds.stream_seed("calibration", 1)) == (12_346, 54_322)
    # the named streams of one evaluation seed never share a sample seed
    streams = [set(seeds.sample_seeds(name, 0, 10_000).tolist()) for name in seeds.OFFSETS]
    assert sum(map(len, streams)) == len(set().union(*streams))
    with pytest.raises(KeyError):
        seeds.stream_seed("nope", 0)


def test_the_csv_logger_continues_metrics_csv_when_a_run_resumes(tmp_path):
    import csv

    from priorlab.loggers import CSVLogger

    first = CSVLogger(save_dir=str(tmp_path), name="", version="")
    for step in range(6):
        first.log_metrics({"train/loss": float(step)}, step=step)
    first.save()
    # resumed from a checkpoint at step 4: steps 4 and 5 are logged again, with a metric the first session lacked
    again = CSVLogger(save_dir=str(tmp_path), name="", version="")
    for step in range(4, 8):
        again.log_metrics({"train/loss": 10.0 + step, "val/loss": 1.0}, step=step)
    again.save()
    with open(tmp_path / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [int(r["step"]) for r in rows] == list(range(8))  # each step once
    assert [float(r["train/loss"]) for r in rows] == [0, 1, 2, 3, 14, 15, 16, 17]  # the new session's from step 4
    assert [r["val/loss"] for r in rows] == ["", "", "", "", "1.0", "1.0", "1.0", "1.0"]
    # a run started over (from step 0) in the folder starts a fresh file
    fresh = CSVLogger(save_dir=str(tmp_path), name="", version="")
    fresh.log_metrics({"train/loss": 5.0}, step=0)
    fresh.save()
    with open(tmp_path / "metrics.csv", newline="") as file:
        assert [(r["step"], r["train/loss"]) for r in csv.DictReader(file)] == [("0", "5.0")]


def test_the_gpu_preset_sets_the_matmul_precision_that_lightnings_hint_asks_for(compose_tmp):
    """Lightning prints a hint at every start on a tensor-core GPU while torch's float32 matmul precision is
    `highest`; trainer=gpu sets `high` (trainer=cpu leaves torch's setting), and an unknown value is refused."""
    from priorlab.commands.train import check_config
    from priorlab.training.quiet import set_matmul_precision

    before = torch.get_float32_matmul_precision()
    try:
        set_matmul_precision(compose_tmp(["trainer=gpu"]).matmul_precision)  # as `priorlab train` does
        assert torch.get_float32_matmul_precision() == "high"
        set_matmul_precision(compose_tmp([]).matmul_precision)
        assert torch.get_float32_matmul_precision() == "high"  # null: left as it is
    finally:
        torch.set_float32_matmul_precision(before)
    with pytest.raises(UserError, match="matmul_precision=low is unknown; use one of highest, high, medium, or null"):
        check_config(compose_tmp(["matmul_precision=low"]))

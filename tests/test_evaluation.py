"""Evaluation: DDP invariance, the toy2d ground truth, the callbacks and `priorlab evaluate`."""

import functools
import json
import re
from dataclasses import replace

import lightning as L
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DDPMScheduler
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import run_cli
from priorlab.commands.train import build_module
from priorlab.errors import UserError
from priorlab.evaluation.conditional_quality import conditional_quality
from priorlab.evaluation.features import Classifier, Evaluator
from priorlab.evaluation.fitted import fit_priors
from priorlab.evaluation.prior_quality import prior_quality
from priorlab.evaluation.settings import EvalSettings
from priorlab.models import unet
from priorlab.priors import DenoiserPrior as Prior
from priorlab.priors import PriorWeights


def _tiny_setup():
    torch.manual_seed(0)
    model = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).eval()
    base = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).eval()
    for m in (model, base):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    net = Classifier((1, 8, 8), 3, width=8, feature_dim=16).eval()
    real = torch.randn(60, 1, 8, 8)
    with torch.no_grad():
        evaluator = Evaluator(net, net.features(real), torch.arange(60) % 3, 1.0)
    sched = DDPMScheduler()
    settings = EvalSettings(num_samples=10, num_steps=3, guidance_scales=[1.0, 2.0], heldout=10, kid_subset=5,
                            batch_size=4, buckets=2, grid_per_class=1, calibration=20,
                            priors=["self", "base", "auto", "mix"])  # fmt: skip
    return (
        model,
        sched,
        Prior(base, sched, sched.alphas_cumprod),
        evaluator,
        settings,
        (real[:30], torch.arange(30) % 3),
    )


def _evaluate_all():
    model, sched, prior, evaluator, settings, heldout = _tiny_setup()
    with torch.no_grad():
        weights = fit_priors(model, sched, prior, heldout, settings)
        cond, _ = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings, weights=weights)
        pq = prior_quality(model, sched, prior, heldout, evaluator, settings, weights=weights)
    return {**cond, **pq}


def _worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    results = _evaluate_all()
    if rank == 0:
        torch.save(results, out_file)
    dist.destroy_process_group()


def test_metrics_from_two_gloo_processes_equal_those_from_one(tmp_path):
    torch.set_num_threads(1)
    single = _evaluate_all()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out.pt")), nprocs=2, join=True)
    double = torch.load(tmp_path / "out.pt")
    assert set(single) == set(double) and len(single) > 20
    assert {"eval/cond/fd/prior=mix/w=2.0", "eval/calib/weight/prior=auto/w=2.0/t=0-499",
            "eval/prior/loss/model=mix/w=2.0/all", "eval/calib/guided_loss/model=auto/w=2.0/t=0-499",
            "eval/calib/loss/model=base/t=500-999"} <= set(single)  # fmt: skip
    for key, value in single.items():
        if "/sample_seconds/" not in key:  # wall times differ from run to run
            assert double[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def _fit(module, dm, steps):
    trainer = L.Trainer(max_steps=steps, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        limit_val_batches=0, accelerator="cpu", enable_model_summary=False)  # fmt: skip
    trainer.fit(module, dm)


def test_toy2d_ground_truth_base_prior_beats_an_untrained_unconditional_branch(compose_tmp, tmp_path):
    """With cond_dropout=0 the fine-tune's ∅ branch never trains: the base prior must give a lower exact NLL."""
    from priorlab.models import save_denoiser

    common = ["data=toy2d", "model=mlp", "model.hidden=128", "data.num_samples=4096", "optimizer.lr=1e-3"]
    base_cfg = compose_tmp(common)
    dm = instantiate(base_cfg.data)
    dm.setup()
    L.seed_everything(0, verbose=False)
    base_module, _ = build_module(base_cfg, dm)
    _fit(base_module, dm, 1200)
    save_denoiser(base_module.denoiser, base_module.scheduler, tmp_path / "base")
    ft_cfg = compose_tmp([*common, "stage=finetune", f"base={tmp_path / 'base'}", "cond_dropout=0"])
    ft_module, _ = build_module(ft_cfg, dm)
    _fit(ft_module, dm, 800)
    model, base = ft_module.denoiser.eval(), base_module.denoiser.eval()
    sched = ft_module.scheduler
    settings = EvalSettings(num_samples=800, num_steps=25, guidance_scales=[3.0], heldout=500, buckets=4)
    net = Classifier((2,), 8).eval()
    with torch.no_grad():
        evaluator = Evaluator(net, net.features(dm.val_set.tensors[0]), dm.val_set.tensors[1], 1.0)
        prior = Prior(base, sched, sched.alphas_cumprod)
        cond, _ = conditional_quality(model, sched, prior, evaluator, (2,), settings, dm.mixture)
        pq = prior_quality(model, sched, prior, dm.val_set.tensors, None, settings, dm.mixture)
    nll_self, nll_base = cond["eval/cond/nll/prior=self/w=3.0"], cond["eval/cond/nll/prior=base/w=3.0"]
    assert nll_base < nll_self - 0.5, (nll_base, nll_self)
    assert pq["eval/prior/score_error/model=base/all"] < pq["eval/prior/score_error/model=self/all"]


TINY = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.batch_size=32",
        "trainer.log_every_n_steps=1", "logger=csv", "eval=tiny", "data=digits"]  # fmt: skip


def test_callbacks_and_evaluate_command(tmp_path):
    out = run_cli("train", "study=e", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    out = run_cli("train", "stage=finetune", "study=e", "base=runs/e/base", "callbacks=eval",
                  "callbacks.prior_quality.every_n_steps=2", "callbacks.conditional_quality.every_n_steps=2", *TINY,
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # each evaluation says what it does and how long it took
    assert "[step 2] evaluating conditional quality ..." in out.stdout, out.stdout[-2000:]
    assert re.search(r"\[step 4\] prior quality evaluated in \d+ s", out.stdout), out.stdout[-2000:]
    run = tmp_path / "runs/e/finetune/p=0.1/seed=0"
    assert (tmp_path / "runs/evaluators/digits8/evaluator.json").exists()
    for step in (2, 4):
        record = json.loads((run / f"eval/step={step}_cond.json").read_text())
        assert 0 < record["seconds"] < 600  # the evaluation's wall time, for its share of a study's time
        cond = record["metrics"]
        assert {"eval/cond/fd/prior=base/w=3.0", "eval/cond/accuracy/prior=self/w=1.0"} <= set(cond)
        prior = json.loads((run / f"eval/step={step}_prior.json").read_text())["metrics"]
        assert "eval/prior/disagreement/all" in prior
        assert ("eval/uncond/fd/model=base" in prior) == (step == 4)  # unconditional samples at the end of fit only
    assert (run / "eval/grid_step=4_prior=base.png").exists() and (run / "eval/grid_step=4_prior=self.png").exists()
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "eval/cond/fd/prior=base/w=3.0" in header and "eval/prior/loss/model=self/all" in header
    out = run_cli("evaluate", "model=runs/e/finetune/p=0.1/seed=0", "base=runs/e/base", "eval=tiny",
                  "eval.guidance_scales=[1.0,5.0]", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    report = run_cli("report", "runs/e", cwd=tmp_path)  # the study's report picks the evaluation up
    assert report.returncode == 0, report.stderr[-3000:]
    results = pd.read_csv(tmp_path / "runs/e/results.csv")
    final = results[(results["metric"] == "fd") & (results["step"] == 4)]
    assert set(final["guidance_scale"]) == {1.0, 5.0}  # evaluate's record replaced the training's at step 4
    status = [line.split("] ", 1)[1] for line in out.stdout.splitlines() if line.startswith("[evaluate ")]
    assert status[0] == "starting" and status[2] == "prior quality on the held-out data", out.stdout
    assert status[1].startswith("conditional quality: 40 samples × prior self, base × w 1.0, 5.0, 4 steps each")
    record = json.loads((run / "eval/step=4_cond.json").read_text())  # the callbacks' format, replacing theirs
    assert record["step"] == 4 and record["made_by"] == "priorlab evaluate" and record["seconds"] > 0
    cond = record["metrics"]
    assert cond["eval/cond/fd/prior=self/w=1.0"] == cond["eval/cond/fd/prior=base/w=1.0"]
    assert (run / "eval/step=4_prior.json").exists() and (run / "eval/grid_step=4_prior=base.png").exists()
    assert "made_by" not in json.loads((run / "eval/replaced/step=4_cond.json").read_text())  # the training's
    out = run_cli("evaluate", "model=runs/e/finetune/p=0.1/seed=0", "eval.guidance_scales=[-1]", cwd=tmp_path)
    assert out.returncode == 2 and "guidance_scale=-1 must be" in out.stderr and "Traceback" not in out.stderr
    (tmp_path / "a_file").write_text("kept")  # out= naming a file: refused before any sampling, the file untouched
    out = run_cli("evaluate", "model=runs/e/finetune/p=0.1/seed=0", "out=a_file", cwd=tmp_path)
    assert out.returncode == 2 and "out=a_file is a file, not a folder" in out.stderr, out.stderr[-2000:]
    assert len(out.stderr.strip().splitlines()) == 1 and (tmp_path / "a_file").read_text() == "kept"
    fitted = ("model=runs/e/finetune/p=0.1/seed=0", "base=runs/e/base", "eval=tiny", "eval.priors=[self,auto,mix]")
    out = run_cli("evaluate", *fitted, "out=runs/fitted", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    cond = json.loads((tmp_path / "runs/fitted/step=4_cond.json").read_text())["metrics"]
    assert {"eval/cond/fd/prior=auto/w=3.0", "eval/cond/fd/prior=mix/w=3.0", "eval/calib/loss/model=base/all"} <= set(
        cond
    )
    mix = PriorWeights.load(tmp_path / "runs/fitted/prior_weights_mix.json")
    assert mix.objective == "guided" and mix.scales == [1.0, 3.0] and (mix.row(1.0) == 0).all()  # eval=tiny's
    assert [cond[f"eval/calib/weight/prior=mix/w=3.0/t={100 * b}-{100 * b + 99}"] for b in range(10)] == pytest.approx(
        mix.row(3.0).tolist()
    )
    out = run_cli("evaluate", *fitted, "eval.calibration_objective=null_loss", "out=runs/null", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    null = PriorWeights.load(tmp_path / "runs/null/prior_weights_mix.json")
    assert null.objective == "null_loss" and null.scales is None and null.base_weight.shape == (10,)
    (tmp_path / "all_base.json").write_text(json.dumps({**mix.to_dict(), "base_weight": [[1.0] * 10] * 2}))
    out = run_cli("evaluate", *fitted, "prior_weights=all_base.json", "eval.priors=[base,mix]", "out=runs/given",
                  cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    cond = json.loads((tmp_path / "runs/given/step=4_cond.json").read_text())["metrics"]
    assert cond["eval/cond/fd/prior=mix/w=3.0"] == pytest.approx(cond["eval/cond/fd/prior=base/w=3.0"], rel=1e-5)
    # the given file's weights are reported, the losses stored with it (another model's) are not
    assert cond["eval/calib/weight/prior=mix/w=3.0/t=0-99"] == 1.0
    assert not any(k.startswith(("eval/calib/loss", "eval/calib/guided_loss")) for k in cond)
    out = run_cli("train", "stage=finetune", "study=small", "base=runs/e/base", "callbacks=eval",
                  "eval.priors=[self,auto]", "eval.calibration=100000", *TINY, cwd=tmp_path)  # fmt: skip
    assert out.returncode == 2 and "eval.calibration=100000" in out.stderr and "Traceback" not in out.stderr
    logged = [p.read_text() for p in (tmp_path / "runs/small").rglob("metrics.csv")]
    assert not any("train/loss" in text for text in logged)  # refused before the first training step
    (tmp_path / "bad.json").write_text("{not json")
    out = run_cli("evaluate", *fitted, "prior_weights=bad.json", cwd=tmp_path)
    assert out.returncode == 2 and "prior weights file bad.json is not valid JSON" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_fitted_priors_use_a_calibration_split_disjoint_from_the_metric_heldout():
    model, sched, prior, evaluator, settings, heldout = _tiny_setup()
    with torch.no_grad():
        weights = fit_priors(model, sched, prior, heldout, settings)
        assert set(weights) == {"auto", "mix"} and sum(weights["mix"].losses["count"]) == 20
        moved = (heldout[0].clone(), heldout[1])
        moved[0][:10] += 100.0  # the metric held-out samples do not enter the fit
        again = fit_priors(model, sched, prior, moved, settings)
        assert torch.equal(again["mix"].base_weight, weights["mix"].base_weight)
        assert again["mix"].losses == weights["mix"].losses
        given = PriorWeights(torch.tensor([0, 1000]), torch.tensor([1.0]), "auto", {"self": [9.0], "base": [1.0]})
        used = fit_priors(model, sched, prior, heldout, settings, {"auto": given})["auto"]
        assert torch.equal(used.base_weight, given.base_weight) and torch.equal(used.edges, given.edges)
        assert used.losses is None  # the file's losses belong to another model or split
        assert fit_priors(model, sched, None, heldout, settings) == {}  # without a base, no fitted prior
        cond, grids = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings, weights=weights)
        assert set(grids) == {"self", "base", "auto", "mix"}
        assert cond["eval/cond/fd/prior=mix/w=1.0"] == cond["eval/cond/fd/prior=self/w=1.0"]  # w = 1: θ alone, same
        pq = prior_quality(model, sched, prior, heldout, None, settings, weights=weights)
        for b in ("t=0-499", "t=500-999"):  # loss of auto on the metric held-out set is that of its choice at w=2
            chosen = "base" if weights["auto"].row(2.0)[int(b[2] != "0")] == 1 else "self"
            assert pq[f"eval/prior/loss/model=auto/w=2.0/{b}"] == pq[f"eval/prior/loss/model={chosen}/{b}"]
    with pytest.raises(UserError, match="eval.calibration=20 held-out samples after the eval.heldout=10"):
        fit_priors(model, sched, prior, (heldout[0][:25], heldout[1][:25]), settings)
    with pytest.raises(UserError, match="prior=auto needs weights fitted"):
        conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings)
    with pytest.raises(UserError, match="eval.priors holds best"):
        EvalSettings(priors=["self", "best"])


def test_data_that_differ_only_in_classes_or_draw_do_not_share_an_evaluator(compose_tmp, tmp_path):
    from priorlab.commands.train_evaluator import main as train_evaluator
    from priorlab.data import DigitsDataModule
    from priorlab.evaluation.setup import COMMAND, ensure_evaluator, evaluator_dir, train_and_cache_evaluator

    def name(*overrides):
        return instantiate(compose_tmp(list(overrides)).data).name

    assert name("data=mnist") == "mnist16" and name("data=mnist", "data.classes=[0,1,2]") == "mnist16-classes0-1-2"
    assert name("data=digits") == "digits8" and name("data=digits", "data.classes=[3,4]") == "digits8-classes3-4"
    variants = (
        [],
        ["data.num_samples=512"],
        ["data.seed=1"],
        ["data.weights=[1,2,1,2,1,2,1,2]"],
        ["data.num_classes=2"],
    )
    toy = {name("data=toy2d", *o) for o in variants}
    assert len(toy) == 5
    # one cache folder for both (a shared data.name): an automatic cache is retrained for the other data ...
    every, subset = DigitsDataModule(), DigitsDataModule(classes=[0, 1, 2])
    path = tmp_path / "shared"
    assert len(ensure_evaluator(path, every, steps=5).reference) == 1797
    ev = ensure_evaluator(path, subset, steps=5)
    assert len(ev.reference) == len(subset.all_data()[0]) < 1797 and set(ev.reference_labels.tolist()) == {0, 1, 2}
    stamp = (path / "evaluator.json").stat().st_mtime_ns
    assert torch.equal(ensure_evaluator(path, subset, steps=5).reference, ev.reference)  # the same data: reused
    assert (path / "evaluator.json").stat().st_mtime_ns == stamp
    ensure_evaluator(path, subset, steps=6)  # other steps (eval.evaluator_steps): an automatic cache is retrained
    assert json.loads((path / "evaluator.json").read_text())["steps"] == 6
    # ... and one made by `priorlab train-evaluator` is never overwritten: the mismatch is an error
    train_and_cache_evaluator(path, every, steps=5, made_by=COMMAND)
    with pytest.raises(UserError, match=r"trained on other data \(classes: None \(cached\) vs \[0, 1, 2\]"):
        ensure_evaluator(path, subset, steps=5)
    cfg = compose_tmp(["data=digits", "steps=5"], config_name="train-evaluator")
    train_evaluator(cfg)
    assert evaluator_dir(cfg.paths.runs, every) == tmp_path / "runs/evaluators/digits8"
    with pytest.raises(UserError, match="force=true retrains it"):
        train_evaluator(compose_tmp(["data=digits", "data.name=digits8", "data.classes=[0,1,2]", "steps=5"],
                                    config_name="train-evaluator"))  # fmt: skip


def test_non_finite_weights_stop_training_before_the_evaluation_callbacks_sample(compose_tmp, tmp_path):
    """Lightning runs the callbacks' on_validation_epoch_start before the module's: the evaluation callbacks
    check the weights themselves, so they never sample (nor write results) from NaN weights."""
    from priorlab.evaluation.callbacks import ConditionalQuality, PriorQuality
    from priorlab.evaluation.setup import train_and_cache_evaluator

    cfg = compose_tmp(["data=toy2d", "model=mlp", "model.hidden=16", "data.num_samples=512", "data.batch_size=32"])
    dm = instantiate(cfg.data)
    dm.setup()
    module, _ = build_module(cfg, dm)
    train_and_cache_evaluator(tmp_path / "evaluator", dm, steps=5)

    class Poison(L.Callback):  # NaN weights after step 2: the validation there comes before the next loss check
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 2:
                with torch.no_grad():
                    next(pl_module.denoiser.parameters()).fill_(float("nan"))

    settings = dict(num_samples=16, num_steps=2, guidance_scales=[1.0, 2.0], heldout=16, batch_size=16, kid_subset=4,
                    grid_per_class=1)  # fmt: skip
    evals = [cls(str(tmp_path / "eval"), runs=str(tmp_path / "runs"), every_n_steps=2, settings=settings,
                 evaluator=str(tmp_path / "evaluator")) for cls in (PriorQuality, ConditionalQuality)]  # fmt: skip
    trainer = L.Trainer(max_steps=4, val_check_interval=2, check_val_every_n_epoch=None, limit_val_batches=1,
                        num_sanity_val_steps=0, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        accelerator="cpu", callbacks=[Poison(), *evals])  # fmt: skip
    with pytest.raises(UserError, match="the weights hold non-finite values at step 2"):
        trainer.fit(module, dm)
    assert not (tmp_path / "eval").exists()


def test_final_evaluation_runs_on_ema_weights_before_lightning_moves_the_module_to_the_cpu(
    compose_tmp, tmp_path, monkeypatch
):
    """Lightning's teardown moves the module to the CPU before `on_fit_end`; an evaluation there would sample on
    the CPU of a GPU machine. The final evaluation must run before teardown, on the EMA weights. A run resumed from
    a checkpoint of its last step skips `on_train_end`: it is evaluated at `on_fit_end` instead, on the EMA
    weights, once."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from priorlab.evaluation.callbacks import ConditionalQuality, PriorQuality
    from priorlab.evaluation.setup import train_and_cache_evaluator
    from priorlab.training.callbacks import EMA

    cfg = compose_tmp(["data=toy2d", "model=mlp", "model.hidden=16", "data.num_samples=512", "data.batch_size=32"])
    dm = instantiate(cfg.data)
    dm.setup()
    train_and_cache_evaluator(tmp_path / "evaluator", dm, steps=5)
    torn_down = []
    teardown = SingleDeviceStrategy.teardown
    monkeypatch.setattr(SingleDeviceStrategy, "teardown", lambda self: (torn_down.append(True), teardown(self)))
    settings = dict(num_samples=16, num_steps=2, guidance_scales=[1.0, 2.0], heldout=16, batch_size=16, kid_subset=4,
                    grid_per_class=1)  # fmt: skip

    def fit(ckpt_path=None):
        torn_down.clear()
        ema, seen = EMA(decay=0.5), []

        def spy(cls):
            class Spy(cls):
                def measure(self, trainer, pl_module, prior, final, weights):
                    avg = ema._average_model.module.state_dict()
                    on_ema = all(torch.equal(v, avg[k]) for k, v in pl_module.state_dict().items())
                    seen.append((self.kind, trainer.global_step, final, bool(torn_down), on_ema))
                    return super().measure(trainer, pl_module, prior, final, weights)

            return Spy

        kw = dict(runs=str(tmp_path / "runs"), every_n_steps=100, settings=settings)
        kw["evaluator"] = str(tmp_path / "evaluator")
        evals = [spy(cls)(str(tmp_path / "eval"), **kw) for cls in (PriorQuality, ConditionalQuality)]
        checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, every_n_train_steps=3)
        trainer = L.Trainer(max_steps=3, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                            enable_progress_bar=False, accelerator="cpu",
                            callbacks=[ema, *evals, checkpoint])  # fmt: skip
        torch.manual_seed(0)
        trainer.fit(build_module(cfg, dm)[0], dm, ckpt_path=ckpt_path, weights_only=False)
        assert torn_down
        return sorted(seen)

    assert fit() == [("cond", 3, True, False, True), ("prior", 3, True, False, True)]
    first = json.loads((tmp_path / "eval/step=3_prior.json").read_text())["metrics"]
    assert "eval/uncond/fd/model=self" in first
    (tmp_path / "eval/step=3_prior.json").unlink()
    # resumed at its last step: no training step, no on_train_end; evaluated at on_fit_end after teardown
    assert fit(tmp_path / "ckpt/last.ckpt") == [("cond", 3, True, True, True), ("prior", 3, True, True, True)]
    again = json.loads((tmp_path / "eval/step=3_prior.json").read_text())["metrics"]
    assert again == pytest.approx(first, rel=1e-6)  # the same EMA weights as the unbroken run evaluated


def test_checked_prior_takes_the_best_scoring_candidate_per_scale():
    """prior=checked samples self, base and the fitted mix at each guided scale and keeps the one with the lowest
    FD; its weights are that candidate's (zeros, ones or mix's row), its scores and cost are reported, and its
    samples are that candidate's samples."""
    model, sched, prior, evaluator, settings, heldout = _tiny_setup()
    settings = replace(settings, priors=["self", "base", "mix", "checked"], guidance_scales=[1.0, 2.0, 4.0],
                       check_samples=12)  # fmt: skip
    with torch.no_grad():
        weights = fit_priors(model, sched, prior, heldout, settings, evaluator=evaluator, shape=(1, 8, 8))
        cond, _ = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings, weights=weights)
    checked, mix = weights["checked"], weights["mix"]
    assert checked.scales == [1.0, 2.0, 4.0] and (checked.row(1.0) == 0).all()
    for w in (2.0, 4.0):
        scores = {c: cond[f"eval/calib/check_fd/model={c}/w={w}"] for c in ("self", "base", "mix")}
        best = min(scores, key=scores.get)
        expected = {"self": torch.zeros(2), "base": torch.ones(2), "mix": mix.row(w)}[best]
        assert torch.equal(checked.row(w), expected)
        assert cond[f"eval/calib/check_fd/model=checked/w={w}"] == scores[best]
        assert cond[f"eval/cond/fd/prior=checked/w={w}"] == pytest.approx(cond[f"eval/cond/fd/prior={best}/w={w}"],
                                                                         rel=1e-4, abs=1e-6)  # fmt: skip
    assert cond["eval/calib/check_seconds"] > 0
    alone = {"checked": weights["checked"]}  # checked alone still reports the mix's ∅ and guided losses of self, base
    with torch.no_grad():
        cond, _ = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), replace(settings, priors=["checked"]),
                                      weights=alone)  # fmt: skip
    for model_name in ("self", "base"):
        assert cond[f"eval/calib/loss/model={model_name}/all"] > 0
        assert cond[f"eval/calib/guided_loss/model={model_name}/w=2.0/all"] > 0
    with pytest.raises(UserError, match="needs the evaluator"):
        fit_priors(model, sched, prior, heldout, settings)


@pytest.mark.parametrize(
    "data, message",
    [({"_target_": "builtins.print", "_args_": ["CALLED"]}, "names 'builtins.print', not one of priorlab's"),
     ({"_target_": "priorlab.data.MNISTDataModule", "name": {"_target_": "builtins.print"}}, "instantiation keys"),
     ({"_target_": "priorlab.data.MNISTDataModule", "image_size": 16, "classes": {"_partial_": True}},
      r"instantiation keys below its datamodule \(_partial_\)"),
     ("mnist", "names None")],
)  # fmt: skip
def test_a_model_folders_data_config_cannot_choose_what_is_called(tmp_path, data, message):
    """`priorlab evaluate` rebuilds the data from the model's run folder only when it names a priorlab
    datamodule with plain values: a folder from someone else must not import or call anything."""
    import yaml

    from priorlab.commands.evaluate import _data_config

    (tmp_path / "model").mkdir()
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": data}))
    with pytest.raises(UserError, match=message):
        _data_config(OmegaConf.create({"data": None}), tmp_path / "model")
    good = {"_target_": "priorlab.data.MNISTDataModule", "image_size": 16, "classes": [0, 1]}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"data": good}))
    assert OmegaConf.to_container(_data_config(OmegaConf.create({"data": None}), tmp_path / "model")) == good


@functools.cache
def _separate_passes():
    """The tiny setup at w ∈ {1, 2, 4}, its fitted weights, and its evaluation with one pass per (prior, w): the
    reference of both one_pass modes, computed once."""
    model, sched, prior, evaluator, settings, heldout = _tiny_setup()
    settings = replace(settings, guidance_scales=[1.0, 2.0, 4.0])
    with torch.no_grad():
        weights = fit_priors(model, sched, prior, heldout, settings)
        alone, grids = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings, weights=weights)
    return model, sched, prior, evaluator, settings, weights, alone, grids


@pytest.mark.parametrize("one_pass", ["scales", "all"])
def test_one_pass_evaluation_gives_the_numbers_of_separate_passes(one_pass, monkeypatch):
    """eval.one_pass batches (prior, w) settings into shared sampling passes; the fitted priors still sample on
    their own. The metrics equal those of one pass per setting up to the rounding of other batch shapes."""
    from priorlab.evaluation import generation

    passes = []

    def counted(model, labels, seeds, scheduler, shape, batch, *args, **kwargs):
        passes.append([(s.prior.name, s.scale) for s in batch])
        return real(model, labels, seeds, scheduler, shape, batch, *args, **kwargs)

    real = generation.sample_many
    model, sched, prior, evaluator, settings, weights, alone, grids = _separate_passes()
    monkeypatch.setattr(generation, "sample_many", counted)
    with torch.no_grad():
        batched, grids_b = conditional_quality(model, sched, prior, evaluator, (1, 8, 8),
                                               replace(settings, one_pass=one_pass), weights=weights)  # fmt: skip
    expected = [[("self", 2.0), ("self", 4.0)], [("base", 2.0), ("base", 4.0)]]  # w = 1, auto, mix: alone
    assert passes == (expected if one_pass == "scales" else [expected[0] + expected[1]])
    timed = {k for k in alone if "/sample_seconds/" in k}
    if one_pass == "scales":  # each prior's own pass: its time is that prior's
        assert set(alone) == set(batched)
    else:  # one pass over several priors: no prior's time is known, so none is recorded (w = 1, auto, mix: alone)
        untimed = {k for k in timed if ("prior=self" in k or "prior=base" in k) and not k.endswith("/w=1.0")}
        assert set(alone) - set(batched) == untimed and len(untimed) == 4
    quality = [k for k in alone if "/sample_seconds/" not in k]
    assert len(quality) > 40 and "eval/cond/fd/prior=mix/w=4.0" in quality
    step = 1 / settings.num_samples  # accuracy, precision and recall count samples: a near-tie may flip one
    for k in quality:
        discrete = any(f"/{m}/" in k for m in ("accuracy", "precision", "recall"))
        assert batched[k] == pytest.approx(alone[k], rel=1e-3, abs=step + 1e-9 if discrete else 1e-4), k
    assert all(batched[k] > 0 for k in batched if "/sample_seconds/" in k)
    for p in grids:
        torch.testing.assert_close(grids_b[p], grids[p])  # the grids are sampled as before


def test_cuda_graphs_reach_the_one_pass_passes(monkeypatch, cpu_graphs):
    """eval.cuda_graphs applies to one_pass's passes too (each step of a pass replayed from one graph on a GPU),
    here replayed from graphs recorded on the CPU (`recorded_graphs`): the numbers do not change."""
    from priorlab.evaluation import generation

    flags = []

    def recorded(*args, **kwargs):
        flags.append(kwargs.get("graphs"))
        return real(*args, **kwargs)

    real = generation.sample_many
    monkeypatch.setattr(generation, "sample_many", recorded)
    model, sched, prior, evaluator, settings, heldout = _tiny_setup()
    settings = replace(settings, guidance_scales=[1.0, 2.0], priors=["self", "base"], one_pass="scales")
    with torch.no_grad():
        plain, _ = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings)
        graphed, _ = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), replace(settings, cuda_graphs=True))
    assert flags == [False, False, True, True]  # one pass per prior, without and with graphs
    assert cpu_graphs.captures > 0 and cpu_graphs.replays > cpu_graphs.captures  # the graphed passes replayed
    assert {k: v for k, v in plain.items() if "/sample_seconds/" not in k} == {
        k: v for k, v in graphed.items() if "/sample_seconds/" not in k
    }


def test_one_pass_setting_is_checked():
    with pytest.raises(UserError, match="eval.one_pass=some is unknown; use one of off, scales, all"):
        EvalSettings(one_pass="some")

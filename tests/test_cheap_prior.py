"""Extra priors (issue 17's cheap prior): a second network in the base's place, in the evaluation, `evaluate`, the
study (trained once per base seed, given to every fine-tune) and its report section."""

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from diffusers import DDPMScheduler

from conftest import run_cli
from priorlab.analysis.other_priors import advantage, extra_prior_names, null_losses, time_ratios
from priorlab.errors import UserError
from priorlab.evaluation.conditional_quality import conditional_quality
from priorlab.evaluation.features import Classifier, Evaluator
from priorlab.evaluation.prior_quality import prior_quality
from priorlab.evaluation.settings import EvalSettings
from priorlab.models import unet
from priorlab.priors import DenoiserPrior
from priorlab.priors.modes import check_extra_priors
from priorlab.study.bases import check_finished_have_priors, prior_jobs, study_bases, with_priors
from priorlab.study.compose import with_command_line
from priorlab.study.spec import check_priors


def _nets():
    torch.manual_seed(0)
    nets = [unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).eval() for _ in range(3)]
    for m in nets:
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return nets


def test_an_extra_prior_is_sampled_as_the_base_is_and_reported_under_its_name():
    model, base, small = _nets()
    sched = DDPMScheduler()
    net = Classifier((1, 8, 8), 3, width=8, feature_dim=16).eval()
    with torch.no_grad():
        real = torch.randn(60, 1, 8, 8)
        evaluator = Evaluator(net, net.features(real), torch.arange(60) % 3, 1.0)
        settings = EvalSettings(num_samples=9, num_steps=3, guidance_scales=[1.0, 3.0], kid_subset=5, batch_size=9,
                                grid_per_class=1, bootstrap=10)  # fmt: skip
        prior = DenoiserPrior(base, sched, sched.alphas_cumprod)
        extra = {"twin": DenoiserPrior(base, sched, sched.alphas_cumprod),
                 "small": DenoiserPrior(small, sched, sched.alphas_cumprod)}  # fmt: skip
        cond, grids = conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings, extra=extra)
    assert set(grids) == {"self", "base", "twin", "small"}
    for metric in ("fd", "kid", "accuracy", "precision"):  # the same network as the base: the same computation
        assert cond[f"eval/cond/{metric}/prior=twin/w=3.0"] == cond[f"eval/cond/{metric}/prior=base/w=3.0"]
    assert cond["eval/diff/fd_se/prior=twin/w=3.0"] == cond["eval/diff/fd_se/prior=base/w=3.0"]
    assert torch.equal(grids["twin"], grids["base"]) and not torch.allclose(grids["small"], grids["base"])
    assert cond["eval/cond/fd/prior=small/w=3.0"] != pytest.approx(cond["eval/cond/fd/prior=base/w=3.0"])
    for prior_name in ("self", "base", "small"):
        assert cond[f"eval/cond/sample_seconds/prior={prior_name}/w=3.0"] > 0
    with pytest.raises(UserError, match="must start with a letter"):
        conditional_quality(model, sched, prior, evaluator, (1, 8, 8), settings, extra={"base": extra["small"]})
    with torch.no_grad():  # the prior-quality measures: each extra prior's ∅ loss and unconditional FD
        pq = prior_quality(model, sched, prior, (real[:20], torch.arange(20) % 3), evaluator,
                           replace(settings, heldout=20, buckets=2), extra=extra)  # fmt: skip
    for metric in ("loss/model={}/all", "loss/model={}/t=0-499", "uncond/fd/model={}"):
        key = "eval/" + ("prior/" if metric.startswith("loss") else "") + metric
        assert pq[key.format("twin")] == pq[key.format("base")], key
        assert pq[key.format("small")] != pytest.approx(pq[key.format("base")]), key


def test_both_evaluation_callbacks_share_one_copy_of_the_base_and_each_extra_prior(tmp_path, monkeypatch):
    """The conditional- and prior-quality callbacks of a run hold the same loaded networks (one copy on the
    device, not two); a model folder whose weights were rewritten is loaded again."""
    import os
    from types import SimpleNamespace

    from priorlab.evaluation import callbacks
    from priorlab.models import save_denoiser

    model, base, small = _nets()
    sched = DDPMScheduler()
    save_denoiser(base, sched, tmp_path / "base" / "model")
    save_denoiser(small, sched, tmp_path / "small")
    monkeypatch.setattr(callbacks, "ensure_evaluator", lambda path, dm, steps: None)
    trainer = SimpleNamespace(datamodule=None, is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))
    module = SimpleNamespace(denoiser=model, scheduler=sched)
    made = []
    for cls in (callbacks.ConditionalQuality, callbacks.PriorQuality):
        cb = cls(str(tmp_path / "eval"), base=str(tmp_path / "base"), evaluator=str(tmp_path / "ev"),
                 extra_priors={"small": str(tmp_path / "small")})  # fmt: skip
        cb.setup(trainer, module, "fit")
        made.append(cb)
    cond, prior = made
    assert cond.base is prior.base and cond.extra["small"] is prior.extra["small"]
    assert torch.equal(next(iter(cond.extra["small"].denoiser.parameters())), next(iter(small.parameters())))
    assert cond.base is not cond.extra["small"]
    with torch.no_grad():  # rewritten weights: a new version of the folder, loaded anew
        next(iter(small.parameters())).add_(1.0)
    save_denoiser(small, sched, tmp_path / "small")
    weights = tmp_path / "small" / callbacks.WEIGHTS
    os.utime(weights, ns=(1, 1))  # a distinct mtime even on a file system with coarse timestamps
    again = callbacks.shared_model(tmp_path / "small", "prior small")
    assert again is not cond.extra["small"]
    assert torch.equal(next(iter(again.denoiser.parameters())), next(iter(small.parameters())))
    assert callbacks.shared_model(tmp_path / "base", "base") is cond.base  # the run folder or its model/: one


@pytest.mark.parametrize("name", ["base", "self", "exact", "a/b", "1st", "p=1"])
def test_extra_prior_names_that_would_clash_or_break_a_key_are_refused(name):
    with pytest.raises(UserError, match=f"extra_priors.{name}"):
        check_extra_priors([name])
    with pytest.raises(UserError, match="preset q"):
        check_priors({name: ["model.hidden=8"]}, "preset q")


def test_check_priors_wants_a_list_of_overrides_per_name():
    assert check_priors(None, "p") == {}
    assert check_priors({"small": ["model.hidden=8"]}, "p") == {"small": ["model.hidden=8"]}
    with pytest.raises(UserError, match="prior small takes a list of overrides"):
        check_priors({"small": "model.hidden=8"}, "p")
    with pytest.raises(UserError, match="must map each extra prior"):
        check_priors([], "p")


def test_an_extra_prior_is_trained_once_per_base_seed_and_given_to_that_seeds_fine_tunes():
    study = Path("/s")
    parts = {"sweep": {"cond_dropout": [0.0], "seed": [0, 1, 2]}, "bases": None, "base": ["trainer.max_steps=9"],
             "finetune": ["x=1"], "base_seeds": [7, 8], "priors": {"small": ["model.hidden=8"]}}  # fmt: skip
    bases = with_priors(study_bases(study, ["study=s"], parts), study, ["study=s"], parts)
    assert [b.finetune[-1] for b in bases] == ["+extra_priors.small='/s/prior/small/seed=7'",
                                               "+extra_priors.small='/s/prior/small/seed=8'"]  # fmt: skip
    jobs = prior_jobs(bases)
    assert jobs == [("small_seed=7", ["train", "stage=base", "study=s", "trainer.max_steps=9", "model.hidden=8",
                                      "seed=7", "stage.run_subdir=prior/small/seed=7"]),
                    ("small_seed=8", ["train", "stage=base", "study=s", "trainer.max_steps=9", "model.hidden=8",
                                      "seed=8", "stage.run_subdir=prior/small/seed=8"])]  # fmt: skip
    # the command line's settings apply to the prior too, but not over its own (a small prior stays small)
    bases, _ = with_command_line(bases, ["model.hidden=256", "data.std=0.2"], {"base": [], "finetune": []})
    assert prior_jobs(bases)[0][1][3:] == ["trainer.max_steps=9", "model.hidden=256", "data.std=0.2", "model.hidden=8",
                                           "seed=7", "stage.run_subdir=prior/small/seed=7"]  # fmt: skip
    one = {**parts, "base_seeds": None}  # one base: one prior, beside base/
    bases = with_priors(study_bases(study, [], one), study, [], one)
    assert bases[0].finetune[-1] == "+extra_priors.small=/s/prior/small"
    assert prior_jobs(bases) == [("prior_small", ["train", "stage=base", "trainer.max_steps=9", "model.hidden=8",
                                                  "stage.run_subdir=prior/small"])]  # fmt: skip
    with pytest.raises(UserError, match="`priors` and `bases` together are not supported yet"):
        check_priors({"small": ["model.hidden=8"]}, "p", {"a": {}, "b": {}})


def test_a_study_refuses_finished_fine_tunes_evaluated_without_its_extra_prior(tmp_path):
    run = tmp_path / "finetune/p=0.0/seed=0"
    run.mkdir(parents=True)
    (run / "done.json").write_text("{}")
    (run / "config.yaml").write_text("extra_priors: {}\n")
    with pytest.raises(UserError, match=r"1 finished fine-tune\(s\) .* \(e.g. finetune/p=0.0/seed=0\) were evaluated "
                       "without the extra prior\\(s\\) small"):  # fmt: skip
        check_finished_have_priors(tmp_path, ["small"])
    (run / "config.yaml").write_text("extra_priors: {small: /somewhere}\n")
    check_finished_have_priors(tmp_path, ["small"])  # evaluated with it: nothing to refuse
    check_finished_have_priors(tmp_path / "elsewhere", ["small"])  # a new study: nothing finished


def test_report_section_pairs_the_extra_prior_with_self_and_base_over_seeds():
    rows = []
    for seed in range(3):
        run = f"finetune/p=0.0/seed={seed}"
        for prior, fd, seconds in (("self", 10.0 + seed, 2.0), ("base", 8.0 + seed, 2.0), ("small", 7.0 + seed, 1.0)):
            for w in (1.0, 2.0):
                value = 10.0 + seed if w == 1 else fd
                rows += [(run, 0.0, seed, 6, prior, w, "fd", value), (run, 0.0, seed, 6, prior, w, "accuracy", 0.9),
                         (run, 0.0, seed, 6, prior, w, "sample_seconds", seconds)]  # fmt: skip
            rows.append((run, 0.0, seed, 6, prior, float("nan"), "loss/all", {"self": 2.0, "base": 1.0}.get(prior, 1.1)
                         + seed))  # fmt: skip
    frame = pd.DataFrame(rows, columns=["run", "cond_dropout", "seed", "step", "prior", "guidance_scale", "metric",
                                        "value"])  # fmt: skip
    assert extra_prior_names(frame) == ["small"]
    vs_self = advantage(frame, "fd", "self", "small")
    assert list(vs_self["guidance_scale"]) == [2.0]  # w = 1 never uses a prior
    assert vs_self["estimate"].iloc[0].mean == pytest.approx(3.0)  # FD(self) − FD(small), > 0: small better
    assert advantage(frame, "fd", "base", "small")["estimate"].iloc[0].mean == pytest.approx(1.0)
    assert advantage(frame, "accuracy", "base", "small")["estimate"].iloc[0].mean == pytest.approx(0.0)
    assert time_ratios(frame, "small") == {"self": 0.5, "base": 0.5}
    assert null_losses(frame, "small") == pytest.approx({"self": 3.0, "base": 2.0, "small": 2.1})


def test_figures_show_the_extra_prior_beside_self_and_base(tmp_path, monkeypatch):
    """(a) draws a line per extra prior at its own values; (e) adds a column of its sample grids where every
    condition has them, and leaves it out where one lacks them."""
    import numpy as np
    from PIL import Image

    from priorlab.analysis import figures

    rows = []
    for p in (0.0, 0.1):
        for seed in range(2):
            run = f"finetune/p={p}/seed={seed}"
            for prior, fd in (("self", 5.0), ("base", 3.0), ("small", 2.0)):
                rows += [(run, p, seed, 6, prior, w, "fd", fd * w + seed) for w in (1.0, 2.0)]
                grid = tmp_path / run / "eval" / f"grid_step=6_prior={prior}.png"
                grid.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.zeros((20, 20), np.uint8)).save(grid)
    frame = pd.DataFrame(rows, columns=["run", "cond_dropout", "seed", "step", "prior", "guidance_scale", "metric",
                                        "value"])  # fmt: skip
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    figures.fd_vs_scale(frame, tmp_path / "a.png")
    for ax in saved[-1].axes:
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert list(lines) == ["prior=self", "prior=base", "prior=small"]
        assert list(lines["prior=small"].get_ydata()) == pytest.approx([2.5, 4.5])  # mean over the two seeds
        assert lines["prior=small"].get_color() == "tab:green"
    figures.sample_grids(tmp_path, frame, tmp_path / "e.png")
    titles = [ax.get_title() for ax in saved[-1].axes]
    assert len(titles) == 6 and titles[2] == "p=0, seed=0\nprior=small, w=2"
    (tmp_path / "finetune/p=0.1/seed=0/eval/grid_step=6_prior=small.png").unlink()
    figures.sample_grids(tmp_path, frame, tmp_path / "e.png")
    assert len(saved[-1].axes) == 4 and not any("small" in ax.get_title() for ax in saved[-1].axes)


def test_cheap_prior_study_and_evaluate_with_an_extra_prior(tmp_path):
    out = run_cli("study", "cheap_prior", "preset=tiny", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    study = tmp_path / "runs" / "cheap_prior"
    prior_dir = study / "prior" / "small"
    assert (prior_dir / "done.json").exists() and (prior_dir / "model").is_dir()
    frame = pd.read_csv(study / "results.csv")
    small = frame[(frame["prior"] == "small") & (frame["metric"] == "nll") & (frame["guidance_scale"] == 3.0)]
    assert small["run"].nunique() == 4  # every fine-tune evaluated with the extra prior
    assert {"diff_nll_se", "sample_seconds", "loss/all", "score_error/all", "uncond_fd"} <= set(
        frame[frame["prior"] == "small"]["metric"]
    )
    report = (study / "report.md").read_text()
    assert "## The extra prior `small`: against the fine-tune's own ∅ branch and the base" in report
    assert "| p=0.2 | base | 3 |" in report
    # 10 steps: the small prior has not converged; its own check fails and withholds only its findings
    assert (
        "| extra prior converged (prior/small) |" in report
        and "no conclusion (an extra prior did not converge)" in report
    )
    assert "the report draws no conclusion about the extra priors (the findings about self and base stand)" in report
    assert "Held-out ∅ loss over all timesteps (mean over the fine-tunes' final evaluations): self " in report
    # `priorlab evaluate` takes extra priors too
    run = study / "finetune/p=0.0/seed=0"
    out = run_cli("evaluate", f"model={run}", f"base={study / 'base'}", f"extra_priors.small={prior_dir}",
                  "eval=tiny", "eval.guidance_scales=[3.0]", f"out={tmp_path / 'ev'}", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads(next((tmp_path / "ev").glob("step=*_cond.json")).read_text())
    assert record["extra_priors"] == {"small": str(prior_dir / "model")}  # the model folder it loaded
    assert "eval/cond/nll/prior=small/w=3.0" in record["metrics"] and "prior=small/w=3.0" in out.stdout

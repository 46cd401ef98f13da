"""prior=distilled (`priorlab.priors.DistilledPrior`) and the guidance scale as a model input (`priorlab.models.scale`):
the scale embedding on each kind of label table, the guided step of one pass alone and beside other priors, the
model's refusals, saving and loading, and an evaluation's keys (the training that makes such a model:
tests/test_distill.py)."""

import math

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import assert_close_across_shapes, perturbed_mlp
from priorlab.errors import UserError
from priorlab.guidance import guide, guide_blocks
from priorlab.models import dit, load_denoiser, save_denoiser, unet
from priorlab.models.scale import SCALE_WEIGHTS, ScaleEmbedding, scale_features
from priorlab.priors import SELF, BasePrior, DenoiserPrior, DistilledPrior, make_prior
from priorlab.sampling import sample

NULL = 4  # perturbed_mlp's null class (4 classes)


def _distilled(model, max_scale: float = 4.0, moved: bool = True, seed: int = 0):
    """`model` taking the guidance scale as an input; with `moved`, its embedding's weights moved off their start (a
    trained embedding's stand-in)."""
    model.add_scale_embedding(ScaleEmbedding(model.label_width, max_scale))
    if moved:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.scale_embedding.parameters():
                p.add_(0.3 * torch.randn_like(p))
    return model


def _inputs(model, n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *model.sample_shape, generator=g)
    return x, torch.randint(0, 1000, (n,), generator=g), torch.arange(n) % model.num_classes


NETWORKS = {  # one of each kind of label table: the MLP's and the UNet's class_embedding, a table per DiT block
    "mlp": lambda: perturbed_mlp(0),
    "unet": lambda: unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4).eval(),
    "dit": lambda: dit((4, 4, 4), 3, num_layers=2).eval(),
}


@pytest.mark.parametrize("kind", NETWORKS)
def test_a_new_scale_embedding_changes_nothing_and_w_one_is_always_the_plain_network(kind):
    model = NETWORKS[kind]()
    x, t, y = _inputs(model)
    with torch.no_grad():
        plain = model(x, t, y)
        _distilled(model, moved=False)
        for w in (1.0, 2.5, torch.tensor([1.0, 2.0, 3.0, 4.0, 1.5, 1.0])):  # the last layer starts at zero
            assert torch.equal(model(x, t, y, scale=w), plain)
        for p in model.scale_embedding.parameters():
            p.add_(0.3 * torch.randn_like(p))
        per_row = model(x, t, y, scale=torch.tensor([1.0, 3.0, 1.0, 3.0, 1.0, 3.0]))
        assert torch.equal(model(x, t, y, scale=1.0), plain)  # e(1) = 0 exactly, whatever the weights
        assert torch.equal(model(x, t, y), plain)  # and no scale is w = 1
        assert torch.equal(per_row[0::2], plain[0::2])
        assert (per_row[1::2] - plain[1::2]).abs().max() > 1e-3  # a trained embedding moves the other rows
        assert_close_across_shapes(per_row[1::2], model(x[1::2], t[1::2], y[1::2], scale=3.0))


def test_scale_features_on_hand_values():
    s = torch.tensor([0.0, 2.0])
    lo, hi = 1 / 8, 8.0  # two frequencies: the ends of the geometric range
    expected = [[0, 0, 0, 1, 1], [2, math.sin(2 * lo), math.sin(2 * hi), math.cos(2 * lo), math.cos(2 * hi)]]
    torch.testing.assert_close(scale_features(s, 2), torch.tensor(expected))


def test_prior_distilled_is_one_pass_at_w_alone_in_an_interval_and_beside_other_priors(batch):
    sched, x, t, y, abar = batch
    model = _distilled(perturbed_mlp(0))
    calls = []
    model.net.register_forward_hook(lambda *args: calls.append(1))
    prior = make_prior("distilled", prior_net=None)
    assert isinstance(prior, DistilledPrior) and prior.name == "distilled" and prior.reads is None
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 2.5, prior)
        assert len(calls) == 1 and out.uncond is None  # one pass of θ, none of a prior network
        assert torch.equal(out.guided, model(x, t, y, scale=2.5))
        sigma = ((1 - abar) / abar).sqrt()  # increasing with t: 0.018 ... 71
        lo, hi = float(sigma[:2].mean()), float(sigma[3:5].mean())
        inside = torch.tensor([False, True, True, True, False, False])  # the rows whose σ lies in [lo, hi]
        ranged = guide(model, x, t, y, abar, 2.5, prior, interval=(lo, hi))
        torch.testing.assert_close(ranged.guided, torch.where(inside[:, None], out.guided, model(x, t, y)))
        base = BasePrior(DenoiserPrior(perturbed_mlp(1), sched, sched.alphas_cumprod))
        blocks = [(prior, 2.5), (SELF, 2.0), (base, 3.0), (prior, 1.5)]
        n = len(x)
        many = guide_blocks(model, x.repeat(4, 1), t.repeat(4), y.repeat(4), abar.repeat(4), blocks)
        for j, (p, w) in enumerate(blocks):  # each block as guided alone, up to the rounding of other shapes
            assert_close_across_shapes(many[j * n : (j + 1) * n], guide(model, x, t, y, abar, w, p).guided, passes=3)


def test_prior_distilled_refuses_models_without_the_scale_input_and_scales_it_was_not_trained_for(batch):
    sched, x, t, y, abar = batch
    plain, distilled = perturbed_mlp(0), _distilled(perturbed_mlp(0), max_scale=4.0)
    prior = make_prior("distilled")
    with pytest.raises(UserError, match="prior=distilled needs a fine-tune trained with guidance_distill.max_scale"):
        prior.check_guided(plain, [2.0])
    with pytest.raises(UserError, match="needs a fine-tune trained with guidance_distill"):
        sample(plain, y, torch.arange(6), sched, (2,), 2.0, prior, num_steps=2)
    with pytest.raises(UserError, match="not trained to take the guidance scale as an input"):
        plain(x, t, y, scale=2.0)
    for w in (5.0, 0.5):
        with pytest.raises(UserError, match=rf"trained for guidance scales in \[1, 4\], not w={w:g}"):
            prior.check_guided(distilled, [1.0, w])
    prior.check_guided(distilled, [1.0, 2.0, 4.0])
    with pytest.raises(UserError, match="use one of self, base, none, auto, mix, checked, distilled"):
        make_prior("distiled")


def test_the_scale_embedding_is_saved_and_loaded_with_the_model(tmp_path):
    model = _distilled(perturbed_mlp(0), max_scale=6.0)
    x, t, y = _inputs(model)
    save_denoiser(model, DDPMScheduler(), tmp_path / "m")
    loaded = load_denoiser(tmp_path / "m").denoiser
    assert loaded.scale_embedding.max_scale == 6.0
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y, scale=3.0), model(x, t, y, scale=3.0))
        assert torch.equal(loaded(x, t, y), model(x, t, y))
    plain = tmp_path / "plain"
    save_denoiser(perturbed_mlp(0), DDPMScheduler(), plain)
    assert load_denoiser(plain).denoiser.scale_embedding is None and not (plain / SCALE_WEIGHTS).exists()
    (tmp_path / "m" / SCALE_WEIGHTS).unlink()
    with pytest.raises(UserError, match=f"records a scale embedding but lacks {SCALE_WEIGHTS}"):
        load_denoiser(tmp_path / "m")


def test_an_evaluation_reports_prior_distilled_beside_base_alone_or_in_one_pass():
    """A guidance-distilled model is evaluated with the prior it was trained for, whether eval.priors names it or not
    (a study's plain and distilled fine-tunes share their eval.priors)."""
    from dataclasses import replace

    from priorlab.evaluation.conditional_quality import conditional_quality
    from priorlab.evaluation.features import Classifier, Evaluator
    from priorlab.evaluation.settings import EvalSettings

    torch.manual_seed(0)
    model = _distilled(NETWORKS["unet"](), max_scale=3.0)
    sched = DDPMScheduler()
    base = DenoiserPrior(NETWORKS["unet"](), sched, sched.alphas_cumprod)
    net = Classifier((1, 8, 8), 3, width=8, feature_dim=16).eval()
    with torch.no_grad():
        evaluator = Evaluator(net, net.features(torch.randn(30, 1, 8, 8)), torch.arange(30) % 3, 1.0)
    settings = EvalSettings(num_samples=6, num_steps=2, guidance_scales=[1.0, 2.0, 3.0], batch_size=6, kid_subset=3,
                            grid_per_class=1, bootstrap=0, priors=["base"])  # fmt: skip
    with torch.no_grad():  # a model that takes the scale is evaluated with prior=distilled too
        alone, grids = conditional_quality(model, sched, base, evaluator, (1, 8, 8), settings)
        batched, _ = conditional_quality(model, sched, base, evaluator, (1, 8, 8), replace(settings, one_pass="all"))
        with pytest.raises(UserError, match="prior=distilled was trained for guidance scales in \\[1, 3\\], not w=4"):
            conditional_quality(model, sched, base, evaluator, (1, 8, 8), replace(settings, guidance_scales=[4.0]))
    for w in ("1.0", "2.0", "3.0"):
        assert f"eval/cond/fd/prior=distilled/w={w}" in alone and f"eval/cond/fd/prior=base/w={w}" in alone
    assert "eval/diff/accuracy_se_vs_base/prior=distilled/w=2.0" in alone and set(grids) == {"base", "distilled"}
    assert alone["eval/cond/fd/prior=distilled/w=1.0"] == alone["eval/cond/fd/prior=base/w=1.0"]  # w = 1: no prior
    assert alone["eval/cond/fd/prior=distilled/w=3.0"] != alone["eval/cond/fd/prior=base/w=3.0"]
    for k in (k for k in alone if k.startswith("eval/cond/fd/")):  # one pass: the same up to other batch shapes
        assert batched[k] == pytest.approx(alone[k], rel=1e-3, abs=1e-4), k


def test_prior_distilled_samples_from_a_recorded_graph_as_it_does_launched(batch, cpu_graphs):
    """Nothing in its step reads a GPU value (the scale is filled in on the device): the step is captured once and
    replayed, here by the CPU stand-in of CUDA graphs, with the samples of the launched step."""
    sched = batch[0]
    model = _distilled(perturbed_mlp(0))
    labels, seeds = torch.arange(8) % 4, torch.arange(8)
    with torch.no_grad():
        launched = sample(model, labels, seeds, sched, (2,), 2.5, DistilledPrior(), num_steps=4)
        replayed = sample(model, labels, seeds, sched, (2,), 2.5, DistilledPrior(), num_steps=4, graphs=True)
    assert cpu_graphs.captures == 1 and cpu_graphs.replays == 4
    torch.testing.assert_close(replayed, launched)


def test_an_evaluation_checks_prior_distilled_before_it_samples_or_trains():
    from priorlab.evaluation.generation import check_guided, usable_priors
    from priorlab.evaluation.settings import EvalSettings

    distilled, plain = _distilled(perturbed_mlp(0), max_scale=3.0), perturbed_mlp(0)
    settings = EvalSettings(guidance_scales=[1.0, 2.0, 4.0], priors=["self", "base"])
    assert usable_priors(settings, None, plain) == ["self"]  # base is left out without a base, as before
    assert usable_priors(settings, None, distilled) == ["self", "distilled"]
    check_guided(settings, plain)
    with pytest.raises(UserError, match=r"trained for guidance scales in \[1, 3\], not w=4"):
        check_guided(settings, distilled)  # the evaluation callbacks' setup: before the run trains
    with pytest.raises(UserError, match="needs a fine-tune trained with guidance_distill"):
        check_guided(EvalSettings(priors=["distilled"]), plain)


def test_a_results_table_holds_prior_distilled_for_the_distilled_runs_only():
    import pandas as pd

    from priorlab.analysis.results import check_complete

    def rows(run: str, priors: list[str]) -> list[dict]:
        return [{"run": run, "step": 2, "metric": m, "prior": p, "guidance_scale": w, "value": 0.5}
                for m in ("fd", "accuracy") for p in priors for w in (1.0, 2.0)]  # fmt: skip

    plain, both = ["self", "base"], ["self", "base", "distilled"]
    check_complete(pd.DataFrame(rows("a", plain) + rows("b", both) + rows("c", both)), "results.csv")
    short = rows("c", both)[:-1]  # run c lacks prior=distilled's last row
    with pytest.raises(UserError, match="the last evaluation of c has no accuracy prior=distilled w=2"):
        check_complete(pd.DataFrame(rows("a", plain) + rows("b", both) + short), "results.csv")
    with pytest.raises(UserError, match="the last evaluation of a has no accuracy prior=base w=2"):
        check_complete(pd.DataFrame(rows("a", plain)[:-1] + rows("b", both)), "results.csv")


def test_an_export_of_a_distilled_model_says_it_holds_the_plain_network_only(tmp_path):
    """`priorlab export` writes the diffusers network, which has no scale input: its model card says the one-pass
    guided prediction stays in the priorlab folder; a plain model's card says nothing of it."""
    from priorlab.pipelines.export import export_pipeline

    for name, distilled in (("d", True), ("p", False)):
        model = unet((1, 8, 8), 3, block_out_channels=(8, 16), norm_num_groups=4)
        if distilled:
            _distilled(model, max_scale=5.0)
        save_denoiser(model, DDPMScheduler(), tmp_path / name)
        card = (export_pipeline(tmp_path / name, tmp_path / f"{name}_exported") / "README.md").read_text()
        said = "trained with guidance_distill up to w = 5" in card and "plain network (w = 1) only" in card
        assert said == distilled, card


def test_figure_a_draws_prior_distilled_in_the_panels_of_distilled_fine_tunes_only(tmp_path, monkeypatch):
    import pandas as pd

    from priorlab.analysis import figures

    rows = []
    for distill in ("None", "4.0"):
        for seed in range(2):
            run = f"finetune/distill={distill}/p=0.1/seed={seed}"
            priors = (("self", 5.0), ("base", 3.0), *((("distilled", 4.0),) if distill == "4.0" else ()))
            for prior, fd in priors:
                rows += [(run, distill, 0.1, seed, 6, prior, w, "fd", fd * w + seed) for w in (1.0, 2.0)]
    frame = pd.DataFrame(rows, columns=["run", "distill", "cond_dropout", "seed", "step", "prior", "guidance_scale",
                                        "metric", "value"])  # fmt: skip
    saved = []
    monkeypatch.setattr(figures, "_save", lambda fig, path: saved.append(fig) or path)
    figures.fd_vs_scale(frame, tmp_path / "a.png")
    panels = {
        ax.get_title().split("\n")[0]: {line.get_label(): line for line in ax.get_lines()} for ax in saved[-1].axes
    }
    assert list(panels["distill=4.0"]) == ["prior=self", "prior=base", "prior=distilled"]
    assert list(panels["distill=None"]) == ["prior=self", "prior=base"]
    assert list(panels["distill=4.0"]["prior=distilled"].get_ydata()) == pytest.approx([4.5, 8.5])

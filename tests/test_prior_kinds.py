"""The priors as objects (`priorlab.priors.kinds`): validated when built, and each kind's guided prediction checked
against the formula computed by hand: eps = eps_prior + w·(eps_θ(x_t, c) − eps_prior), with
eps_prior = (1 − λ)·eps_θ(x_t, ∅) + λ·eps_ψ(x_t, ∅)."""

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import assert_close_across_shapes, perturbed_mlp
from priorlab.errors import UserError
from priorlab.guidance import cfg, guide, guide_blocks
from priorlab.priors import (
    NONE,
    SELF,
    BasePrior,
    CheckedPrior,
    DenoiserPrior,
    MixPrior,
    NoPrior,
    PriorWeights,
    SelfPrior,
    make_prior,
)

NULL = 4  # perturbed_mlp's null class (4 classes)


def _weights(value: float) -> PriorWeights:
    return PriorWeights(torch.tensor([0, 500, 1000]), torch.full((2,), value), "mix")


def test_self_prior_at_scale_w_is_cfg_of_the_models_own_branches(batch):
    sched, x, t, y, abar = batch
    model = perturbed_mlp(0)
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 2.5, SelfPrior())
        cond, uncond = model(x, t, y), model(x, t, torch.full_like(y, NULL))
    # guide() runs θ on the 12 rows [x; x] in one pass, the hand computation on two batches of 6
    assert_close_across_shapes(out.cond, cond)
    assert_close_across_shapes(out.uncond, uncond)
    torch.testing.assert_close(out.guided, cfg(out.cond, out.uncond, 2.5))
    assert_close_across_shapes(out.guided, uncond + 2.5 * (cond - uncond), passes=3)
    assert out.base_weight.tolist() == [0.0] * 6


def test_base_prior_takes_the_base_eps_at_its_closest_alpha_bar_converted_from_its_parameterization(batch):
    sched, x, t, y, abar = batch
    model = perturbed_mlp(0)
    vbase = perturbed_mlp(1, prediction_type="v_prediction")
    other = DDPMScheduler(beta_schedule="linear", num_train_timesteps=500)  # another schedule and parameterization
    prior = BasePrior(DenoiserPrior(vbase, other, sched.alphas_cumprod))
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 3.0, prior)
        tp = (other.alphas_cumprod[None, :] - abar[:, None]).abs().argmin(1)  # ψ's timestep of closest ᾱ
        a = other.alphas_cumprod[tp][:, None]  # ψ's own ᾱ at it: where its v was made
        expected = a.sqrt() * vbase(x, tp, torch.full_like(y, NULL)) + (1 - a).sqrt() * x
        cond = model(x, t, y)
    assert not torch.equal(tp, t)
    torch.testing.assert_close(prior.base_eps(x, abar), expected)
    torch.testing.assert_close(out.uncond, expected)
    torch.testing.assert_close(out.guided, expected + 3.0 * (cond - expected))
    assert out.base_weight.tolist() == [1.0] * 6


def test_mix_prior_of_weight_0_is_self_1_is_base_and_half_is_the_average(batch):
    sched, x, t, y, abar = batch
    model, net = perturbed_mlp(0), DenoiserPrior(perturbed_mlp(1), sched, sched.alphas_cumprod)
    with torch.no_grad():
        own, base = guide(model, x, t, y, abar, 3.0, SELF), guide(model, x, t, y, abar, 3.0, BasePrior(net))
        zero, one, half = (guide(model, x, t, y, abar, 3.0, MixPrior(net, _weights(v))) for v in (0.0, 1.0, 0.5))
    # weight 0 runs θ on the same 12 rows as self, weight 1 θ and ψ on the same 6 rows as base, and combine() picks
    # θ's (ψ's) ∅ exactly: the same computations
    for name in ("guided", "cond", "uncond"):
        assert torch.equal(getattr(zero, name), getattr(own, name)), name
        assert torch.equal(getattr(one, name), getattr(base, name)), name
    torch.testing.assert_close(half.uncond, (own.uncond + base.uncond) / 2)
    torch.testing.assert_close(half.guided, cfg(own.cond, (own.uncond + base.uncond) / 2, 3.0))
    assert (own.uncond - base.uncond).abs().max() > 0.1  # the two ∅ branches differ: the average is its own


def test_priors_are_validated_when_built():
    net = DenoiserPrior(perturbed_mlp(1), DDPMScheduler(), DDPMScheduler().alphas_cumprod)
    with pytest.raises(UserError, match="prior=base needs a base model"):
        BasePrior(None)
    with pytest.raises(UserError, match="prior=small needs a base model"):
        BasePrior(None, "small")
    with pytest.raises(UserError, match="prior=mix needs per-noise-level weights"):
        MixPrior(net, None)
    with pytest.raises(UserError, match="prior=auto needs a base model"):
        MixPrior(None, PriorWeights(torch.tensor([0, 1000]), torch.tensor([1.0]), "auto"))
    with pytest.raises(UserError, match="prior=mix was given weights fitted for prior=auto"):
        MixPrior(net, PriorWeights(torch.tensor([0, 1000]), torch.tensor([1.0]), "auto"), "mix")
    with pytest.raises(UserError, match="not prior=checked"):
        MixPrior(net, PriorWeights(torch.tensor([0, 1000]), [[1.0]], "checked", scales=[2.0], objective="guided"))
    with pytest.raises(UserError, match="prior=nope is unknown; use one of self, base, none, auto, mix, checked"):
        make_prior("nope", net)
    with pytest.raises(UserError, match="prior=self is unknown; use one of base"):
        make_prior("self", net, modes=("base",))
    with pytest.raises(UserError, match="fitted over 1000 training timesteps but the model has 500"):
        MixPrior(net, _weights(0.5)).check_model(500)


def test_make_prior_builds_each_kind_with_what_it_needs_and_names_it_by_its_mode():
    net = DenoiserPrior(perturbed_mlp(1), DDPMScheduler(), DDPMScheduler().alphas_cumprod)
    checked = PriorWeights(torch.tensor([0, 1000]), [[1.0]], "checked", scales=[2.0], objective="guided")
    given = {"self": None, "base": None, "none": None, "mix": _weights(0.5), "checked": checked}
    built = {mode: make_prior(mode, net, w) for mode, w in given.items()}
    kinds = {"self": SelfPrior, "base": BasePrior, "none": NoPrior, "mix": MixPrior, "checked": CheckedPrior}
    for mode, prior in built.items():
        assert type(prior) is kinds[mode] and prior.mode == prior.name == mode
    assert built["self"].net is None and built["self"].reads is None  # prior=self ignores a given network
    assert built["base"].reads is net and built["mix"].weights.mode == "mix"
    assert [p.per_row for p in built.values()] == [False, False, False, True, True]
    assert not NONE.guides and BasePrior(net, "small").name == "small"


def test_no_prior_and_scale_one_give_the_conditional_prediction_without_a_prior_pass(batch):
    sched, x, t, y, abar = batch
    model = perturbed_mlp(0)
    with torch.no_grad():
        cond = model(x, t, y)
        for prior in (NONE, SELF, MixPrior(DenoiserPrior(model, sched, sched.alphas_cumprod), _weights(0.5))):
            out = guide(model, x, t, y, abar, 1.0 if prior.guides else 4.0, prior)
            assert torch.equal(out.guided, cond) and out.uncond is None


def test_guide_blocks_guides_each_block_as_guide_does_alone(batch):
    sched, x, t, y, abar = batch
    model, net = perturbed_mlp(0), DenoiserPrior(perturbed_mlp(1), sched, sched.alphas_cumprod)
    blocks = [(SELF, 3.0), (BasePrior(net), 2.0), (NONE, 5.0)]
    step = torch.tensor(300)
    xs = torch.cat([x, x + 0.5, x - 0.5])
    rows = step.expand(len(xs))
    with torch.no_grad():
        out = guide_blocks(model, xs, step, y.repeat(3), sched.alphas_cumprod[rows], blocks)
        for j, (prior, w) in enumerate(blocks):
            alone = guide(model, xs[j * 6 : (j + 1) * 6], rows[:6], y, sched.alphas_cumprod[rows[:6]], w, prior)
            assert_close_across_shapes(out[j * 6 : (j + 1) * 6], alone.guided, passes=3)
        unguided = guide_blocks(model, xs, step, y.repeat(3), sched.alphas_cumprod[rows], blocks, guided=False)
    assert_close_across_shapes(unguided, model(xs, rows, y.repeat(3)))

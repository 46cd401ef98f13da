import pytest
import torch
from diffusers import DDPMScheduler

from conftest import across_shapes_atol, assert_close_across_shapes, perturbed_mlp
from priorlab import priors
from priorlab.errors import UserError
from priorlab.guidance import cfg, cfg_two_conditions, check_scale, guide, sigma
from priorlab.models import unet
from priorlab.priors import SELF, BasePrior, PriorWeights, make_prior
from priorlab.priors import DenoiserPrior as Prior

_model = perturbed_mlp


@pytest.fixture
def setup():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, generator=g)
    t = torch.tensor([5, 100, 300, 500, 700, 990])
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    return sched, x, t, y, sched.alphas_cumprod[t]


class Counting(torch.nn.Module):
    """Wraps a denoiser and counts the rows it was asked to predict."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0
        self.null_class, self.prediction_type, self.num_classes = (
            inner.null_class,
            inner.prediction_type,
            inner.num_classes,
        )

    def forward(self, x, t, labels, force_drop=None):
        self.rows += len(x)
        return self.inner(x, t, labels, force_drop)


def test_scale_one_gives_the_conditional_prediction(setup):
    sched, x, t, y, abar = setup
    model = _model()
    with torch.no_grad():
        cond = model(x, t, y)
        for prior in ("self", "base", "none"):
            base = Prior(_model(1), sched, sched.alphas_cumprod)
            out = guide(model, x, t, y, abar, 1.0, make_prior(prior, base))
            assert torch.equal(out.guided, cond) and torch.equal(out.cond, cond)  # θ alone on the same 6 rows


def test_prior_base_with_the_model_itself_is_standard_cfg(setup):
    sched, x, t, y, abar = setup
    model = _model()
    with torch.no_grad():
        standard = guide(model, x, t, y, abar, 3.0, SELF)
        swapped = guide(model, x, t, y, abar, 3.0, BasePrior(Prior(model, sched, sched.alphas_cumprod)))
        hand = model(x, t, torch.full_like(y, 4)) + 3.0 * (model(x, t, y) - model(x, t, torch.full_like(y, 4)))
        other = guide(model, x, t, y, abar, 3.0, BasePrior(Prior(_model(1), sched, sched.alphas_cumprod)))
    # self evaluates c and ∅ as one batch of 12 rows, base and the hand computation as batches of 6
    assert_close_across_shapes(swapped.guided, standard.guided)
    assert_close_across_shapes(standard.guided, hand)
    assert_close_across_shapes(swapped.uncond, standard.uncond)
    assert (other.guided - standard.guided).abs().max() > 10 * across_shapes_atol(standard.guided)  # another ψ is seen


def test_swap_uses_the_base_unconditional_prediction(setup):
    sched, x, t, y, abar = setup
    model, other = _model(0), _model(1)
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 2.5, BasePrior(Prior(other, sched, sched.alphas_cumprod)))
        eps_base = other(x, t, torch.full_like(y, 4))
        torch.testing.assert_close(out.uncond, eps_base)
        torch.testing.assert_close(out.guided, eps_base + 2.5 * (model(x, t, y) - eps_base))


def test_v_prediction_prior_guides_an_eps_model(setup):
    sched, x, t, y, abar = setup
    model, vbase = _model(0), _model(1, prediction_type="v_prediction")
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 2.0, BasePrior(Prior(vbase, sched, sched.alphas_cumprod)))
        v = vbase(x, t, torch.full_like(y, 4))
        expected = abar.sqrt()[:, None] * v + (1 - abar).sqrt()[:, None] * x
    torch.testing.assert_close(out.uncond, expected)


def test_prior_with_another_schedule_is_queried_at_the_closest_alpha_bar(setup):
    sched, x, t, y, abar = setup
    other_sched = DDPMScheduler(beta_schedule="linear", num_train_timesteps=500)
    base = _model(1)
    prior = Prior(base, other_sched, sched.alphas_cumprod)
    with torch.no_grad():
        tp = priors.match_timesteps(sched.alphas_cumprod, other_sched.alphas_cumprod, t)
        torch.testing.assert_close(prior(x, t), base(x, tp, torch.full_like(y, 4)))
    assert not torch.equal(tp, t)


def test_two_condition_formula_against_hand_computation():
    uu, cu, cc = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -1.0]), torch.tensor([0.5, 4.0])
    out = cfg_two_conditions(uu, cu, cc, 1.5, 7.5)
    # 1 + 1.5·(3 − 1) + 7.5·(0.5 − 3) = −14.75 ; 2 + 1.5·(−1 − 2) + 7.5·(4 + 1) = 35
    torch.testing.assert_close(out, torch.tensor([-14.75, 35.0]))
    swapped = cfg_two_conditions(torch.tensor([0.0, 0.0]), cu, cc, 1.5, 7.5)
    torch.testing.assert_close(out - swapped, (1 - 1.5) * uu)  # only eps(∅,∅) changed


def test_guidance_interval_skips_the_prior_outside(setup):
    sched, x, t, y, abar = setup
    model = _model()
    base = Counting(_model(1))
    s = sigma(abar)
    lo, hi = float(s[2]), float(s[4])
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 4.0, BasePrior(Prior(base, sched, sched.alphas_cumprod)), (lo, hi))
        full = guide(model, x, t, y, abar, 4.0, BasePrior(Prior(_model(1), sched, sched.alphas_cumprod)))
    inside = out.guided_rows
    assert inside.tolist() == [False, False, True, True, True, False]
    assert base.rows == 3
    torch.testing.assert_close(out.guided[~inside], out.cond[~inside])
    assert_close_across_shapes(out.guided[inside], full.guided[inside])  # ψ ran on 3 rows here, on all 6 there
    assert (full.guided[inside] - out.cond[inside]).abs().max() > 10 * across_shapes_atol(full.guided)  # guided


def test_prior_shape_mismatch_is_an_error_unless_channels_are_given():
    from priorlab.priors import check_prior_fits

    sched = DDPMScheduler()
    base = unet((1, 16, 16), 10)
    prior = Prior(base, sched, sched.alphas_cumprod)
    with pytest.raises(UserError, match="prior takes inputs of shape"):
        check_prior_fits((2, 16, 16), base.sample_shape, prior)
    with pytest.raises(UserError, match="prior takes inputs of shape"):
        check_prior_fits((1, 8, 8), base.sample_shape, prior)
    check_prior_fits((2, 16, 16), base.sample_shape, Prior(base, sched, sched.alphas_cumprod, slice(0, 1)))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_guidance_scales_are_refused(bad):
    with pytest.raises(UserError, match="guidance_scale"):
        check_scale(bad)


def test_unknown_prior_and_missing_base(setup):
    sched, x, t, y, abar = setup
    with pytest.raises(UserError, match="prior=nope is unknown; use one of self, base, none, auto, mix"):
        guide(_model(), x, t, y, abar, 2.0, make_prior("nope"))
    with pytest.raises(UserError, match="prior=base needs a base"):
        guide(_model(), x, t, y, abar, 2.0, make_prior("base"))
    base = Prior(_model(1), sched, sched.alphas_cumprod)
    with pytest.raises(UserError, match="prior=auto needs a base"):
        guide(_model(), x, t, y, abar, 2.0, make_prior("auto"))
    with pytest.raises(UserError, match="prior=mix needs per-noise-level weights"):
        guide(_model(), x, t, y, abar, 2.0, make_prior("mix", base))
    auto = PriorWeights(torch.tensor([0, 500, 1000]), torch.tensor([0.0, 1.0]), "auto")
    with pytest.raises(UserError, match="prior=mix was given weights fitted for prior=auto"):
        guide(_model(), x, t, y, abar, 2.0, make_prior("mix", base, auto))


def test_cfg_is_linear_in_the_scale():
    c, u = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(cfg(c, u, 3.0) - cfg(c, u, 2.0), c - u)


class SyncOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the operators that read a tensor's values on the host (on a GPU each waits for it to finish):
    `.item()`/`bool()` (`_local_scalar_dense`) and boolean-mask indexing (`nonzero`)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (
            torch.ops.aten._local_scalar_dense,
            torch.ops.aten.nonzero,
            torch.ops.aten.is_nonzero,
        ):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("prior", ["self", "base"])
def test_unmasked_guidance_reads_nothing_on_the_host_and_equals_the_row_selecting_path(setup, prior):
    sched, x, t, y, abar = setup
    model = _model()
    base = Prior(_model(1), sched, sched.alphas_cumprod)
    with torch.no_grad():
        with SyncOps() as ops:
            fast = guide(model, x, t, y, abar, 3.0, make_prior(prior, base))
        # an interval holding every row takes the general path, which selects rows with boolean masks
        general = guide(model, x, t, y, abar, 3.0, make_prior(prior, base), (0.0, float("inf")))
        with SyncOps() as masked:
            guide(model, x, t, y, abar, 3.0, make_prior(prior, base), (0.0, float("inf")))
    assert ops.seen == [] and masked.seen  # the general path does read on the host: the mode sees such reads
    assert general.guided_rows.all()
    # bit for bit: with every row selected both paths run θ on the same 12 (self) or 6 rows, ψ on the same 6 rows,
    # and combine() picks ψ's or θ's ∅ exactly, so this is the same computation
    for name in ("guided", "cond", "uncond", "base_weight"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    assert torch.equal(fast.guided_rows, general.guided_rows)

"""θ and the base ψ in one pass (`priorlab.priors.fused`): the stacked pass computes what the two calls compute.

Tolerance: the fused pass is a grouped convolution / batched matrix product over the same weights, so its sums are
reassociated and its GroupNorm computed from var_mean: float32 on the CPU, within 1e-4 relative to the largest
magnitude of the two calls' output (measured: about 1e-7 relative; `assert_close_rel`).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel

from priorlab.errors import UserError
from priorlab.evaluation.settings import EvalSettings
from priorlab.guidance import guide, guide_blocks
from priorlab.models import Denoiser, dit, unet
from priorlab.priors import BasePrior, DenoiserPrior, FusedPair, fused_pair, fusion_mismatch, make_prior
from priorlab.sampling import sample

SHAPE = (3, 8, 8)
SMALL = {unet: dict(block_out_channels=(8, 16), norm_num_groups=4), dit: dict(num_layers=1, attention_head_dim=8)}
OTHER_SCHEDULE = dict(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2")  # ψ's: closest ᾱ differs


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-4) -> None:
    """Equal within `rel` of the largest magnitude of `expected` (module doc)."""
    atol = rel * float(expected.abs().max())
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)


def _randomized(net: Denoiser, seed: int) -> Denoiser:
    """Weights drawn at random: DiT's adaLN-Zero and zero-initialised output layers would otherwise answer zeros,
    which any route matches."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval()


def _pair(build, prediction_type: str, base_classes: int = 3, base_type: str = "epsilon"):
    """θ of 5 classes and ψ of `base_classes` (label tables of 6 and base_classes + 1 rows) on another schedule."""
    model = _randomized(build(SHAPE, 5, prediction_type=prediction_type, **SMALL[build]), 0)
    base = _randomized(build(SHAPE, base_classes, prediction_type=base_type, **SMALL[build]), 1)
    return model, DenoiserPrior(base, DDPMScheduler(**OTHER_SCHEDULE), source="base")


def _inputs(n: int = 6, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (n,), generator=gen)
    return (
        torch.randn(n, *SHAPE, generator=gen),
        t,
        torch.randint(0, 6, (n,), generator=gen),
        DDPMScheduler().alphas_cumprod[t],
    )


@pytest.mark.parametrize("build", [unet, dit], ids=["unet", "dit"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("base_classes", [3, 9], ids=["smaller_base_table", "larger_base_table"])
def test_fused_pass_equals_the_two_calls(build, prediction_type, base_classes):
    """eps_θ(x_t, c) and eps_ψ(x_t, ∅) from the stacked pass equal θ's call and ψ's `eps` (ψ at its own timestep of
    closest ᾱ on a 500-step cosine schedule, its output converted from v), with label tables of other sizes."""
    model, prior_net = _pair(build, prediction_type, base_classes, base_type="v_prediction")
    x, t, y, abar = _inputs()
    with torch.no_grad():
        cond, base = FusedPair(model, prior_net)(x, t, y, abar)
        want_cond = torch.as_tensor(model(x, t, y))
        if prediction_type == "v_prediction":
            want_cond = abar.sqrt().reshape(-1, 1, 1, 1) * want_cond + (1 - abar).sqrt().reshape(-1, 1, 1, 1) * x
        want_base = prior_net.eps(x, abar)
    assert_close_rel(cond, want_cond)
    assert_close_rel(base, want_base)
    assert not torch.allclose(base, cond, atol=1e-2)  # two networks, not one read twice


def test_an_unconditional_unet_base_fuses_as_a_zero_label_row():
    """A diffusers UNet without a label table (a user's own unconditional base) adds nothing to its time embedding,
    as the zero rows the stacked table gives it do."""
    model = _randomized(unet(SHAPE, 5, **SMALL[unet]), 0)
    cfg = {k: v for k, v in model.net.config.items() if not k.startswith("_")} | {"num_class_embeds": None}
    base = _randomized(Denoiser(UNet2DModel(**cfg), 0, 0), 1)
    prior_net = DenoiserPrior(base, DDPMScheduler())
    assert fusion_mismatch(model, prior_net) == []
    x, t, y, abar = _inputs()
    with torch.no_grad():
        _, eps = FusedPair(model, prior_net)(x, t, y, abar)
        assert_close_rel(eps, prior_net.eps(x, abar))


def _counting(monkeypatch) -> list:
    """Count the calls of the stacked pass."""
    calls: list = []
    original = FusedPair.__call__

    def counted(self, *args):
        calls.append(1)
        return original(self, *args)

    monkeypatch.setattr(FusedPair, "__call__", counted)
    return calls


@pytest.mark.parametrize("build", [unet, dit], ids=["unet", "dit"])
def test_the_guided_step_with_fused_on_equals_fused_off(build, monkeypatch):
    """`guide` (prior=base) and `guide_blocks` (two base blocks of other scales) give the same guided eps with the
    stacked pass as with two calls, and fused=on does run the stacked pass."""
    calls = _counting(monkeypatch)
    model, prior_net = _pair(build, "v_prediction")
    x, t, y, abar = _inputs(8)
    with torch.no_grad():
        off, on = (guide(model, x, t, y, abar, 3.0, BasePrior(prior_net, fused=f)) for f in ("off", "on"))
        assert len(calls) == 1
        assert_close_rel(on.guided, off.guided)
        assert_close_rel(on.uncond, off.uncond)
        blocks = {
            f: [(BasePrior(prior_net, fused=f), 2.0), (BasePrior(prior_net, fused=f), 4.0)] for f in ("on", "off")
        }
        fused, apart = (guide_blocks(model, x, t, y, abar, blocks[f]) for f in ("on", "off"))
    assert len(calls) == 2
    assert_close_rel(fused, apart)


def test_a_step_with_own_null_rows_keeps_the_two_passes(monkeypatch):
    """Blocks of prior=self and prior=base: θ's pass holds ∅ rows of its own, ψ's rows are not θ's, no fusion."""
    calls = _counting(monkeypatch)
    model, prior_net = _pair(unet, "epsilon")
    x, t, y, abar = _inputs(8)
    with torch.no_grad():
        guide_blocks(model, x, t, y, abar, [(make_prior("self"), 2.0), (BasePrior(prior_net, fused="on"), 2.0)])
    assert calls == []


def test_graphed_sampling_with_fused_on_equals_two_passes_and_follows_weight_updates(cpu_graphs):
    """`sample(graphs=True)` (graphs recorded on the CPU: a replay reads the stacked weights it captured) with fused=on
    equals launched two-pass sampling, and after θ's weights are written in place the next call's replays use the
    new weights (the stacked copy is refreshed once per sampling call)."""
    model, prior_net = _pair(unet, "epsilon")
    sched = DDPMScheduler()
    kw = dict(train_scheduler=sched, sample_shape=SHAPE, scale=3.0, num_steps=4, batch_size=4)
    labels, seeds = torch.tensor([0, 1, 2, 3]), torch.arange(4)
    fused = sample(model, labels, seeds, prior=BasePrior(prior_net, fused="on"), graphs=True, **kw)
    apart = sample(model, labels, seeds, prior=BasePrior(prior_net, fused="off"), **kw)
    assert cpu_graphs.replays == 4
    assert_close_rel(fused, apart, 1e-3)  # 4 sampler steps
    with torch.no_grad():
        model.net.conv_out.bias.add_(0.5)
    fused = sample(model, labels, seeds, prior=BasePrior(prior_net, fused="on"), graphs=True, **kw)
    apart = sample(model, labels, seeds, prior=BasePrior(prior_net, fused="off"), **kw)
    assert cpu_graphs.replays == 8
    assert_close_rel(fused, apart, 1e-3)


def test_auto_falls_back_to_two_passes_where_architectures_differ(monkeypatch):
    """fused=auto with a base of other widths runs the two calls (and on the CPU, even where they match); fused=on
    with it is a one-line UserError that names the difference."""
    calls = _counting(monkeypatch)
    model, _ = _pair(unet, "epsilon")
    other = _randomized(unet(SHAPE, 5, block_out_channels=(8, 8), norm_num_groups=4), 1)
    prior_net = DenoiserPrior(other, DDPMScheduler())
    assert any("block_out_channels" in r for r in fusion_mismatch(model, prior_net))
    assert fused_pair(model, prior_net, "auto") is None
    x, t, y, abar = _inputs()
    with torch.no_grad():
        auto = guide(model, x, t, y, abar, 3.0, BasePrior(prior_net, fused="auto")).guided
        off = guide(model, x, t, y, abar, 3.0, BasePrior(prior_net, fused="off")).guided
        assert torch.equal(auto, off)
        same_model, same = _pair(unet, "epsilon")
        guide(same_model, x, t, y, abar, 3.0, BasePrior(same, fused="auto"))
        assert fused_pair(same_model, same, "auto") is not None and calls == []  # CPU: two calls, not timed
        with pytest.raises(UserError, match="block_out_channels") as err:
            guide(model, x, t, y, abar, 3.0, BasePrior(prior_net, fused="on"))
    assert "\n" not in str(err.value)


def test_weights_in_another_dtype_are_not_fused():
    """One stacked tensor holds both networks' weights: a base in float64 beside a float32 model stays apart."""
    model, prior_net = _pair(dit, "epsilon")
    prior_net.to("cpu", torch.float64)
    assert any("dtype" in r or "float64" in r for r in fusion_mismatch(model, prior_net))


@pytest.mark.parametrize("make", [lambda: make_prior("base", _pair(unet, "epsilon")[1], fused="yes"),
                                  lambda: BasePrior(_pair(unet, "epsilon")[1], fused=True),
                                  lambda: EvalSettings(fused="fast")])  # fmt: skip
def test_a_bad_fused_value_is_a_one_line_user_error(make):
    with pytest.raises(UserError, match="fused=.* is unknown; use one of auto, on, off") as err:
        make()
    assert "\n" not in str(err.value)


def test_the_eval_config_carries_fused(compose_tmp):
    """eval.fused reaches EvalSettings from the config and the command line, on and off as strings."""
    for value in ("on", "off", "auto"):
        cfg = compose_tmp([f"eval.fused={value}"], "evaluate")
        assert EvalSettings(**cfg.eval).fused == value


def test_auto_keeps_the_route_measured_faster_per_key_and_never_retries_a_failed_one(monkeypatch):
    """fused=auto's choice on a GPU (`FusedPair.faster`, here with the timer and the capture check stubbed): the
    faster route is kept per key, measured once; a fused pass that raises means two passes for that key."""
    import priorlab.priors.fused as fused_module

    monkeypatch.setattr(fused_module, "_capturing", lambda device: False)
    timed: list = []
    monkeypatch.setattr(fused_module, "_time", lambda fn: timed.append(fn) or fn())
    model, prior_net = _pair(unet, "epsilon")
    pair = FusedPair(model, prior_net)
    assert pair.faster(("cuda", 1), lambda: 1.0, lambda: 2.0) is True
    assert pair.faster(("cuda", 1), lambda: 9.0, lambda: 2.0) is True and len(timed) == 2  # kept, not re-measured
    assert pair.faster(("cuda", 2), lambda: 3.0, lambda: 2.0) is False
    assert pair.faster(("cuda", 3), lambda: 1 / 0, lambda: 2.0) is False and pair.choice[("cuda", 3)] is False
    assert pair.faster(("cpu", 4), lambda: 1.0, lambda: 2.0) is False and ("cpu", 4) not in pair.choice


def test_an_evaluation_hands_eval_fused_to_every_base_prior():
    """eval.fused reaches prior=base and each extra prior of an evaluation."""
    from priorlab.evaluation.generation import evaluation_priors

    _, prior_net = _pair(unet, "epsilon")
    priors = evaluation_priors(EvalSettings(fused="on"), prior_net, {}, {"small": prior_net})
    assert [(p.name, p.fused) for p in priors if p.needs_net] == [("base", "on"), ("small", "on")]  # self reads none

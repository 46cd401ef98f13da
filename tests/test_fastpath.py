"""The GPU presets' fast settings give the slow path's results within bf16 tolerance (checked on the CPU)."""

import torch
from diffusers import DDPMScheduler

from conftest import assert_close_across_shapes
from priorlab.guidance import guide
from priorlab.models import unet
from priorlab.priors import SELF, BasePrior
from priorlab.priors import DenoiserPrior as Prior
from priorlab.sampling import sample
from priorlab.training.module import DiffusionModule


def _model(seed=0):
    torch.manual_seed(seed)
    m = unet((3, 16, 16), 4, block_out_channels=(16, 32), norm_num_groups=8)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.03 * torch.randn_like(p))
    return m


def _step(channels_last: bool, fused: bool, autocast: bool, batch: int = 0) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One training step from the same weights, on batch number `batch`: the loss, the gradients and the weights
    after it."""
    module = DiffusionModule(_model(), DDPMScheduler(), lambda params: torch.optim.AdamW(params, lr=1e-3, fused=fused),
                             cond_dropout=0.1, channels_last=channels_last)  # fmt: skip
    opt = module.configure_optimizers()
    g = torch.Generator().manual_seed(batch)
    x0, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = module.loss(x0, y, generator=torch.Generator().manual_seed(1)).mean()
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in module.denoiser.parameters()])
    opt.step()
    return loss.item(), grads, torch.cat([p.detach().flatten() for p in module.denoiser.parameters()])


def test_channels_last_and_fused_adamw_match_the_plain_step():
    loss, grads, _ = _step(False, False, False)
    loss_cl, grads_cl, params_cl = _step(True, True, False)
    # channels_last convolves in another memory layout, with other kernels: the same values up to rounding
    assert_close_across_shapes(torch.tensor(loss_cl), torch.tensor(loss))
    assert_close_across_shapes(grads_cl, grads, passes=2)  # forward and backward
    # The weights after the step are compared on the same gradients: Adam divides each gradient by its own size,
    # so where a gradient is near its rounding error (a few cancel to ~1e-10 here) the step may take either sign.
    _, grads_plain, params_plain = _step(True, False, False)
    assert torch.equal(grads_plain, grads_cl)  # the same layout, weights and batch: the same computation
    # the fused kernel evaluates the same update in another order: float32 rounding, far below one step (lr 1e-3)
    torch.testing.assert_close(params_cl, params_plain)


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _adamw_first_step(params: torch.Tensor, grads: torch.Tensor, lr: float = 1e-3, weight_decay: float = 1e-2,
                      eps: float = 1e-8) -> torch.Tensor:  # fmt: skip
    """AdamW's first update by hand: its bias-corrected moments are g and g², so each weight decays by lr·wd and
    then moves by lr·g/(|g| + eps), about lr against the sign of its gradient."""
    return params * (1 - lr * weight_decay) - lr * grads / (grads.abs() + eps)


def test_bf16_autocast_training_step_within_tolerance():
    start = _flat(_model())
    loss, grads, params = _step(False, False, False)
    loss_bf, grads_bf, params_bf = _step(True, True, True)
    assert abs(loss - loss_bf) / loss < 0.02
    # each run's weights are AdamW's first step from its own gradients, to float32 rounding (a step is lr = 1e-3)
    for g, p in ((grads, params), (grads_bf, params_bf)):
        torch.testing.assert_close(p, _adamw_first_step(start, g), rtol=0, atol=1e-6)
    # bf16 keeps 8 bits of each product: the gradients agree to about 1% of their norm (3% allowed), and so the
    # weights to far below a step, but for the few whose tiny gradient changed sign and moved the other way
    _, grads_other, params_other = _step(False, False, False, batch=1)
    assert (grads_bf - grads).norm() < 0.03 * grads.norm()
    moved = ((params_bf - params).abs() > 1e-4).float().mean()  # a tenth of a step
    assert moved < 0.02
    # the tolerances tell steps apart: the same weights' step on another batch exceeds each of them tenfold
    assert (grads_other - grads).norm() > 10 * 0.03 * grads.norm()
    assert ((params_other - params).abs() > 1e-4).float().mean() > 10 * 0.02


def test_bf16_sampling_within_tolerance_of_fp32():
    model, base = _model(0).eval(), _model(1).eval()
    sched = DDPMScheduler(clip_sample=False)
    labels, seeds = torch.arange(6) % 4, torch.arange(6)
    kw = dict(train_scheduler=sched, sample_shape=(3, 16, 16), scale=2.0,
              prior=BasePrior(Prior(base, sched, sched.alphas_cumprod)), num_steps=4, batch_size=6)  # fmt: skip
    fp32 = sample(model, labels, seeds, **kw)
    bf16 = sample(model, labels, seeds, autocast=True, **kw)
    other_seeds = sample(model, labels, seeds + 100, **kw)
    # bf16 moves each sample by under 2% of the distance between samples of different seeds
    assert (bf16 - fp32).abs().mean() < 0.02 * (other_seeds - fp32).abs().mean()


def test_guidance_under_bf16_autocast_combines_the_branches_in_fp32():
    """The networks run in bf16, but eps(∅) + w·(eps(c) − eps(∅)) is formed in fp32: at w = 6, a bf16 combine
    would add a rounding error of about 2⁻⁸·|w·(eps(c) − eps(∅))| on top of the networks' own."""
    model, base = _model(0).eval(), _model(1).eval()
    sched = DDPMScheduler(clip_sample=False)
    g = torch.Generator().manual_seed(0)
    x_t, labels = torch.randn(6, 3, 16, 16, generator=g), torch.arange(6) % 4
    t = torch.tensor([50, 200, 400, 600, 800, 950])
    abar = sched.alphas_cumprod[t]
    prior = Prior(base, sched, sched.alphas_cumprod)
    for kind in (SELF, BasePrior(prior)):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            b = guide(model, x_t, t, labels, abar, 6.0, kind)
        assert b.guided.dtype == b.cond.dtype == b.uncond.dtype == torch.float32
        # given the networks' outputs, the combination is exact to fp32 rounding (a bf16 one is off by ~1e-2)
        exact = b.uncond.double() + 6.0 * (b.cond.double() - b.uncond.double())
        torch.testing.assert_close(b.guided, exact, rtol=1e-5, atol=1e-5, check_dtype=False)


def test_compile_takes_true_or_a_torch_compile_mode(monkeypatch):
    import pytest

    from priorlab.errors import UserError

    modes = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: modes.append(kw.get("mode")))
    opt = lambda params: torch.optim.AdamW(params)  # noqa: E731
    for compile in (True, "reduce-overhead", False):
        DiffusionModule(_model(), DDPMScheduler(), opt, cond_dropout=0.1, compile=compile)
    assert modes == ["default", "reduce-overhead"]
    with pytest.raises(UserError, match="compile=fast is not true, false or a torch.compile mode"):
        DiffusionModule(_model(), DDPMScheduler(), opt, cond_dropout=0.1, compile="fast")

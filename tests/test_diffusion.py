import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from priorlab import diffusion, priors

TYPES = diffusion.PREDICTION_TYPES


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0, noise = (
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    abar = torch.linspace(0.01, 0.99, 8, dtype=torch.float64)
    return x0, noise, abar, diffusion.add_noise(x0, noise, abar)


@pytest.mark.parametrize("src", TYPES)
@pytest.mark.parametrize("dst", TYPES)
def test_conversions_map_exact_targets_onto_each_other(batch, src, dst):
    x0, noise, abar, x_t = batch
    converted = diffusion.convert(diffusion.target(src, x0, noise, abar), src, dst, x_t, abar)
    torch.testing.assert_close(converted, diffusion.target(dst, x0, noise, abar))


@pytest.mark.parametrize("src", TYPES)
@pytest.mark.parametrize("dst", TYPES)
def test_conversions_round_trip_any_prediction(batch, src, dst):
    _, _, abar, x_t = batch
    pred = torch.randn_like(x_t)
    there = diffusion.convert(pred, src, dst, x_t, abar)
    torch.testing.assert_close(diffusion.convert(there, dst, src, x_t, abar), pred)


def test_noise_and_velocity_agree_with_diffusers():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    abar = sched.alphas_cumprod[t]
    torch.testing.assert_close(diffusion.add_noise(x0, noise, abar), sched.add_noise(x0, noise, t))
    torch.testing.assert_close(diffusion.target("v_prediction", x0, noise, abar), sched.get_velocity(x0, noise, t))


def test_match_timesteps_against_hand_computed_values():
    model = torch.tensor([0.99, 0.9, 0.5, 0.1, 0.01])
    prior = torch.tensor([0.999, 0.95, 0.8, 0.45, 0.2, 0.05, 0.001])
    # closest: 0.99→0.999 (0), 0.9→0.95 (1), 0.5→0.45 (3), 0.1→0.05 (5), 0.01→0.001 (6)
    out = priors.match_timesteps(model, prior, torch.tensor([0, 1, 2, 3, 4]))
    assert out.tolist() == [0, 1, 3, 5, 6]
    same = DDPMScheduler().alphas_cumprod
    t = torch.tensor([0, 17, 999])
    assert priors.match_timesteps(same, same, t).tolist() == [0, 17, 999]
    lin, cos = (
        DDIMScheduler(beta_schedule="linear").alphas_cumprod,
        DDIMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod,
    )
    matched = priors.match_timesteps(lin, cos, torch.tensor([500]))
    assert (cos[matched] - lin[500]).abs() == (cos - lin[500]).abs().min()


def test_unknown_prediction_type_is_an_error(batch):
    x0, noise, abar, x_t = batch
    with pytest.raises(ValueError, match="unknown prediction_type"):
        diffusion.target("score", x0, noise, abar)

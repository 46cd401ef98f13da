"""The prior network's edges (`priorlab.priors.nets`), each checked on values: conversion at the prior's own ᾱ,
zero terminal SNR, DiT's null label beyond 1000 classes, and fractional timesteps."""

import pytest
import torch
from diffusers import DDPMScheduler, EulerDiscreteScheduler
from torch import nn

from priorlab import diffusion, priors
from priorlab.data.toy2d import GaussianMixture
from priorlab.pipelines.families import DIT, TEXT_TO_IMAGE
from priorlab.pipelines.swap import SwappedDenoiser
from priorlab.priors import SELF, BasePrior, DenoiserPrior


class Ideal(nn.Module):
    """The exact ∅ prediction of a toy mixture under schedule `abar`, expressed as eps, v or x0."""

    def __init__(self, mixture: GaussianMixture, abar: torch.Tensor, prediction_type: str):
        super().__init__()
        self.mixture, self.abar, self.prediction_type, self.null_class = mixture, abar, prediction_type, 0
        self.scale = nn.Parameter(torch.ones(()))  # a weight, for the prior's device and dtype

    def forward(self, x, t, labels):
        abar = self.abar[t].double()
        eps = self.mixture.eps(x.double(), abar)
        return diffusion.from_eps(eps, self.prediction_type, x.double(), abar).float() * self.scale


def test_v_and_x0_priors_are_converted_at_their_own_alpha_bar_and_agree_with_eps():
    """An ideal prior gives the same eps whether it predicts eps, v or x0, because its output is turned into eps at
    its own ᾱ at the matched timestep, the noise level it answered for (not at the guided model's ᾱ)."""
    mixture = GaussianMixture.ring(4, 2.0, 0.3)
    model_abar = DDPMScheduler(beta_schedule="linear").alphas_cumprod
    prior_sched = DDPMScheduler(num_train_timesteps=50, beta_schedule="squaredcos_cap_v2")  # ᾱ_ψ ≠ ᾱ_t
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([5, 100, 300, 500, 700, 900])
    abar_t = model_abar[t]
    x_t = torch.randn(len(t), 2, generator=g) * 2
    outs = {p: DenoiserPrior(Ideal(mixture, prior_sched.alphas_cumprod, p), prior_sched).eps(x_t, abar_t)
            for p in diffusion.PREDICTION_TYPES}  # fmt: skip
    matched = priors.closest_timesteps(prior_sched.alphas_cumprod, abar_t)
    own = prior_sched.alphas_cumprod[matched]
    assert not torch.allclose(own, abar_t, rtol=1e-2)  # the schedules differ: the conversion's ᾱ matters
    expected = mixture.eps(x_t.double(), own.double()).float()  # ψ's exact eps at its own ᾱ
    for p, out in outs.items():
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5, msg=p)
    # converting a v prior at the model's ᾱ instead would give another eps, by far more than the tolerance
    v = Ideal(mixture, prior_sched.alphas_cumprod, "v_prediction")(x_t, matched, None)
    wrong = diffusion.to_eps(v, "v_prediction", x_t, abar_t)
    assert (wrong - expected).abs().max() > 1e-2


def _zero_snr():
    sched = DDPMScheduler(rescale_betas_zero_snr=True, beta_schedule="scaled_linear")
    assert float(sched.alphas_cumprod[-1]) == 0.0
    return sched


class Linear(nn.Module):
    """out = a·x + b·ᾱ-dependent term: distinct, known predictions at each row."""

    def __init__(self, a: float, prediction_type: str, abar: torch.Tensor):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.prediction_type, self.abar, self.null_class = prediction_type, abar, 0

    def forward(self, x, t, labels=None):
        return self.a * x + self.abar[t.long()].reshape(-1, *[1] * (x.ndim - 1))


def test_zero_terminal_snr_an_eps_prior_is_undefined_for_v_and_the_swap_keeps_theta_there():
    sched = _zero_snr()
    abar = sched.alphas_cumprod
    eps_prior = DenoiserPrior(Linear(0.3, "epsilon", abar), sched)
    abar_t = abar[torch.tensor([999, 500])]
    assert eps_prior.defined(abar_t, "v_prediction").tolist() == [False, True]
    assert eps_prior.defined(abar_t, "epsilon").tolist() == [True, True]
    x = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="zero terminal SNR"):
        eps_prior.predict(x, abar_t, "v_prediction")
    # A v prior on the same schedule predicts v itself at ᾱ = 0: defined, and returned unconverted.
    v_prior = DenoiserPrior(Linear(0.7, "v_prediction", abar), sched)
    assert v_prior.defined(abar_t, "v_prediction").tolist() == [True, True]
    torch.testing.assert_close(v_prior.predict(x, abar_t[:1].expand(2), "v_prediction"), 0.7 * x + 0.0)

    # The swap (θ predicts v) falls back to θ's own ∅ prediction at ᾱ_t = 0, and uses ψ's elsewhere.
    theta = _RecordingNet(0.9)
    swapped = SwappedDenoiser(theta, TEXT_TO_IMAGE, abar, "v_prediction", 4, BasePrior(eps_prior))
    sample = torch.cat([x, x])  # [∅ chunk, conditional chunk], the same latents
    out = swapped(sample, torch.tensor(999), encoder_hidden_states=torch.zeros(4, 1, 1), return_dict=False)[0]
    torch.testing.assert_close(out, 0.9 * sample)  # θ's own prediction in every row: no ψ, no clamp
    assert swapped.fallback_rows == 2
    out = swapped(sample, torch.tensor(500), encoder_hidden_states=torch.zeros(4, 1, 1), return_dict=False)[0]
    a500 = abar[500].expand(2)
    eps = 0.3 * x + abar[500]  # ψ's eps at t = 500 (the same schedule: matched to 500)
    expected_v = diffusion.from_eps(eps, "v_prediction", x, a500)
    torch.testing.assert_close(out[:2], expected_v)
    torch.testing.assert_close(out[2:], 0.9 * x)
    assert swapped.fallback_rows == 2


class _Config(dict):
    __getattr__ = dict.__getitem__


class _RecordingNet(nn.Module):
    """θ: out = a·sample; records the class labels it was given."""

    def __init__(self, a: float, num_classes: int | None = None):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.config = _Config(in_channels=4, num_embeds_ada_norm=num_classes)
        self.labels = []

    def forward(self, sample, timestep, class_labels=None, encoder_hidden_states=None, return_dict=True):
        self.labels.append(None if class_labels is None else class_labels.tolist())
        return (self.a * sample,)


def test_dit_with_more_than_1000_classes_maps_1000_to_its_null_class_only_in_the_unconditional_chunk():
    theta = _RecordingNet(1.0, num_classes=1001)  # classes 0..1000, null class 1001
    swapped = SwappedDenoiser(theta, DIT, _zero_snr().alphas_cumprod, "epsilon", 4, SELF)
    x = torch.randn(2, 4, 2, 2)
    # DiTPipeline's guidance batch: [class labels, 1000 for ∅]; here the first sample asks for class 1000
    swapped(torch.cat([x, x]), torch.tensor(10), class_labels=torch.tensor([1000, 3, 1000, 1000]))
    assert theta.labels[-1] == [1000, 3, 1001, 1001]
    swapped(x, torch.tensor(10), class_labels=torch.tensor([1000, 3]))  # unguided: every label is a class
    assert theta.labels[-1] == [1000, 3]


@pytest.mark.parametrize("config", [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}])
def test_fractional_timesteps_give_the_schedulers_own_alpha_bar(config):
    """Euler places fractional timesteps by σ (linear) or log σ (Karras, exponential sigmas); interpolating the same
    quantity gives back the σ of each step, where interpolating ᾱ would be off."""
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", **config)
    sched.set_timesteps(7)
    t, sigma = sched.timesteps, sched.sigmas[:-1].double()
    assert (t != t.round()).any()  # fractional timesteps
    log_sigma = any(config.values())
    truth = 1 / (1 + sigma**2)
    got = priors.abar_at(sched.alphas_cumprod, t, log_sigma).double()
    ours = ((got - truth).abs() / truth).max()
    assert ours < 2e-6
    abar = sched.alphas_cumprod
    lo, frac = t.floor().long(), t - t.floor()
    linear_abar = abar[lo] + frac * (abar[(lo + 1).clamp(max=999)] - abar[lo])  # the former interpolation
    assert ((linear_abar.double() - truth).abs() / truth).max() > 5 * ours  # small at 1000 steps, but not exact
    # integer timesteps are exact, also at ᾱ = 0
    zero = _zero_snr().alphas_cumprod
    ints = torch.tensor([0, 10, 998, 999])
    assert torch.equal(priors.abar_at(zero, ints.float()), zero[ints])

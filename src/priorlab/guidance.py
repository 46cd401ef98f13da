"""Classifier-free guidance with a swappable unconditional prior, as pure functions of tensors.

Standard CFG (Ho & Salimans 2022; Eq. 6 of Phunyaphibarn et al. 2025):
    eps = eps_θ(x_t, ∅) + w · (eps_θ(x_t, c) − eps_θ(x_t, ∅))
The swap (their Eq. 7) takes the unconditional term from another denoiser ψ, the base or any diffusion model:
    eps = eps_ψ(x_t, ∅) + w · (eps_θ(x_t, c) − eps_ψ(x_t, ∅))
Two conditions (their Eq. 8/9, InstructPix2Pix's three-way guidance); the swap replaces only eps(∅, ∅):
    eps = eps(∅,∅) + w1 · (eps(c1,∅) − eps(∅,∅)) + w2 · (eps(c1,c2) − eps(c1,∅))
A guidance interval (Kynkäänniemi et al. 2024) applies guidance only where the noise level
σ = sqrt((1 − ᾱ)/ᾱ) lies in [lo, hi]; elsewhere the conditional prediction is used and the prior's
network is not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import Tensor

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser

PRIORS = ("self", "base", "none")


@dataclass
class Branches:
    """Every branch of one guided prediction, all as eps.

    Attributes:
        guided: the combined prediction.
        cond: eps_θ(x_t, c).
        uncond: the unconditional prediction that was combined (None where it was not evaluated).
        guided_rows: boolean mask (N,) of rows where guidance was applied.
    """

    guided: Tensor
    cond: Tensor
    uncond: Tensor | None
    guided_rows: Tensor


def cfg(cond: Tensor, uncond: Tensor, scale: float) -> Tensor:
    """uncond + scale · (cond − uncond); scale 1 returns `cond` itself."""
    if scale == 1:
        return cond
    return uncond + scale * (cond - uncond)


def cfg_two_conditions(uu: Tensor, cu: Tensor, cc: Tensor, scale1: float, scale2: float) -> Tensor:
    """eps(∅,∅) + w1·(eps(c1,∅) − eps(∅,∅)) + w2·(eps(c1,c2) − eps(c1,∅)); uu may come from another model."""
    return uu + scale1 * (cu - uu) + scale2 * (cc - cu)


def sigma(abar: Tensor) -> Tensor:
    """The noise level σ = sqrt((1 − ᾱ)/ᾱ) of the variance-exploding view (EDM)."""
    return ((1 - abar) / abar).sqrt()


def check_scale(scale: float) -> float:
    """A guidance scale must be a finite number ≥ 0."""
    if not isinstance(scale, int | float) or not torch.isfinite(torch.tensor(float(scale))) or scale < 0:
        raise UserError(f"guidance_scale={scale} must be a finite number ≥ 0 (1 means no guidance)")
    return float(scale)


class Prior:
    """An unconditional prior: a denoiser queried with its null class, returning eps for the model's x_t.

    Args:
        denoiser: the prior network ψ.
        scheduler: ψ's training schedule (its ᾱ is indexed by ψ's timesteps).
        model_alphas_cumprod: the guided model's ᾱ; ψ is queried at its timestep of closest ᾱ.
        channels: the input channels of x_t that ψ sees (e.g. the noisy latent of an 8-channel model);
            all when None.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: SchedulerMixin,
        model_alphas_cumprod: Tensor,
        channels: slice | None = None,
    ):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.abar = scheduler.alphas_cumprod
        self.model_abar = model_alphas_cumprod
        self.channels = channels
        self.same_schedule = torch.equal(self.abar.cpu(), model_alphas_cumprod.cpu())

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        x = x_t if self.channels is None else x_t[:, self.channels]
        abar = self.abar.to(x.device)
        tp = t if self.same_schedule else diffusion.match_timesteps(self.model_abar, abar, t)
        null = torch.full((len(x),), self.denoiser.null_class, device=x.device, dtype=torch.long)
        pred = self.denoiser(x, tp, null)
        return diffusion.to_eps(pred, self.denoiser.prediction_type, x, abar[tp])


def check_prior_fits(model_shape: tuple[int, ...], prior_in: tuple[int, ...], prior: Prior) -> None:
    """An image-size or channel mismatch between model and prior is an error unless channels are given."""
    seen = model_shape if prior.channels is None else (len(range(model_shape[0])[prior.channels]), *model_shape[1:])
    if tuple(seen) != tuple(prior_in):
        raise UserError(
            f"the prior takes inputs of shape {tuple(prior_in)} but the model's samples have shape "
            f"{tuple(model_shape)}; use a prior of the same image size and channels, or tell it which input "
            "channels it sees (prior_channels)"
        )


def guide(
    model: Denoiser,
    x_t: Tensor,
    t: Tensor,
    labels: Tensor,
    abar_t: Tensor,
    scale: float,
    prior: str = "self",
    base: Prior | None = None,
    interval: tuple[float, float] | None = None,
    overlap: bool = True,
) -> Branches:
    """One guided eps prediction with its branches.

    Args:
        model: the conditional model θ.
        x_t: noisy samples (N, ...); t: timesteps (N,); labels: classes (N,).
        abar_t: the model's ᾱ at t, (N,).
        scale: guidance scale w.
        prior: "self" (θ with the null class), "base" (the `base` prior ψ) or "none" (conditional only).
        interval: apply guidance only where σ(ᾱ_t) ∈ [lo, hi].
        overlap: on a GPU, run the base prior on a side CUDA stream concurrently with the model.
    """
    if prior not in PRIORS:
        raise UserError(f"prior={prior} is unknown; use one of {', '.join(PRIORS)}")
    if prior == "base" and base is None:
        raise UserError("prior=base needs a base model (base=PATH)")
    rows = torch.ones(len(x_t), dtype=torch.bool, device=x_t.device)
    if interval is not None:
        s = sigma(abar_t.to(x_t.device))
        rows = (s >= interval[0]) & (s <= interval[1])
    if prior == "none" or scale == 1 or not rows.any():
        cond = diffusion.to_eps(model(x_t, t, labels), model.prediction_type, x_t, abar_t)
        return Branches(cond, cond, None, rows & False)
    if prior == "self" and rows.all():  # one batched pass over [x_t; x_t] with [c; ∅]
        both = model(
            torch.cat([x_t, x_t]),
            torch.cat([t, t]),
            torch.cat([labels, torch.full_like(labels, model.null_class)]),
        )
        both = diffusion.to_eps(both, model.prediction_type, torch.cat([x_t, x_t]), torch.cat([abar_t, abar_t]))
        cond, uncond = both.chunk(2)
        return Branches(cfg(cond, uncond, scale), cond, uncond, rows)
    if prior == "base" and overlap and x_t.is_cuda:
        cond, prior_eps = _overlapped(model, base, x_t, t, labels, abar_t, rows)
    else:
        cond = diffusion.to_eps(model(x_t, t, labels), model.prediction_type, x_t, abar_t)
        if prior == "self":
            pred = model(x_t[rows], t[rows], torch.full_like(labels[rows], model.null_class))
            prior_eps = diffusion.to_eps(pred, model.prediction_type, x_t[rows], abar_t[rows])
        else:
            prior_eps = base(x_t[rows], t[rows])
    uncond = torch.zeros_like(cond)
    uncond[rows] = prior_eps.to(cond.dtype)
    guided = torch.where(rows.reshape(-1, *[1] * (cond.ndim - 1)), cfg(cond, uncond, scale), cond)
    return Branches(guided, cond, uncond, rows)


def _overlapped(model, base, x_t, t, labels, abar_t, rows):
    """The model's conditional pass on the current CUDA stream and the base's on a side stream, concurrently."""
    main = torch.cuda.current_stream(x_t.device)
    side = torch.cuda.Stream(x_t.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        prior_eps = base(x_t[rows], t[rows])
    cond = diffusion.to_eps(model(x_t, t, labels), model.prediction_type, x_t, abar_t)
    main.wait_stream(side)
    prior_eps.record_stream(main)
    return cond, prior_eps

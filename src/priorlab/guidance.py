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
Fitted priors (`priorlab.priors`): `auto` and `mix` take the unconditional term per timestep bucket as
(1 − w_b)·eps_θ(x_t, ∅) + w_b·eps_ψ(x_t, ∅), with w_b fitted on held-out denoising loss; `auto`'s w_b is 0 or 1,
so each row evaluates only its chosen network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser
from priorlab.priors import FITTED, PriorNet, PriorWeights, check_prior, combine


@dataclass
class Branches:
    """Every branch of one guided prediction, all as eps.

    Attributes:
        guided: the combined prediction.
        cond: eps_θ(x_t, c).
        uncond: the unconditional prediction that was combined (None where it was not evaluated); zero in rows
            outside `guided_rows`.
        guided_rows: boolean mask (N,) of rows where guidance was applied.
        base_weight: the base's weight in `uncond` per row (N,): 0 for prior=self, 1 for prior=base, fitted
            for auto and mix (read only where `guided_rows`); None when no prior was evaluated.
    """

    guided: Tensor
    cond: Tensor
    uncond: Tensor | None
    guided_rows: Tensor
    base_weight: Tensor | None = None


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


def in_interval(abar: Tensor, interval: tuple[float, float]) -> Tensor:
    """Whether σ(ᾱ) lies in the guidance interval [lo, hi], elementwise, compared in ᾱ's dtype (float32 when
    sampling) wherever it is computed: per row on the device by `guide`, per step on the host by the sampler."""
    s = sigma(abar)
    return (s >= interval[0]) & (s <= interval[1])


def check_scale(scale: float) -> float:
    """A guidance scale must be a finite number ≥ 0."""
    if not isinstance(scale, int | float) or not torch.isfinite(torch.tensor(float(scale))) or scale < 0:
        raise UserError(f"guidance_scale={scale} must be a finite number ≥ 0 (1 means no guidance)")
    return float(scale)


def guide(
    model: Denoiser,
    x_t: Tensor,
    t: Tensor,
    labels: Tensor,
    abar_t: Tensor,
    scale: float,
    prior: str = "self",
    prior_net: PriorNet | None = None,
    interval: tuple[float, float] | None = None,
    overlap: bool = True,
    weights: PriorWeights | None = None,
) -> Branches:
    """One guided eps prediction with its branches.

    Args:
        model: the conditional model θ.
        x_t: noisy samples (N, ...); t: timesteps (N,); labels: classes (N,).
        abar_t: the model's ᾱ at t, (N,).
        scale: guidance scale w.
        prior: "self" (θ with the null class), "base" (the prior network ψ, `prior_net`), "none" (conditional
            only), or the fitted "auto" / "mix" / "checked" (per timestep bucket, the `weights` convex combination
            of self and base).
        prior_net: ψ, queried at θ's ᾱ_t (`priorlab.priors.PriorNet.eps`).
        interval: apply guidance only where σ(ᾱ_t) ∈ [lo, hi].
        overlap: on a GPU, run the base prior on a side CUDA stream concurrently with the model.
        weights: the fitted base weights of prior=auto|mix|checked (`priorlab.priors.PriorWeights`).
    Each network is evaluated only on the rows that need it: θ's ∅ branch where the base weight is below 1 (in
    one batched pass with the conditional branch), ψ where it is above 0. Every branch is converted to the dtype of
    x_t before it is combined, so under autocast the combination is not computed in bf16.
    """
    check_prior(prior, prior_net, weights)
    rows = torch.ones(len(x_t), dtype=torch.bool, device=x_t.device)
    if interval is not None:
        rows = in_interval(abar_t.to(x_t.device), interval)
    if prior == "none" or scale == 1 or (interval is not None and not rows.any()):
        cond = _cond(model, x_t, t, labels, abar_t)
        return Branches(cond, cond, None, rows & False)
    w = _base_weight(prior, weights, t, x_t.device, scale)
    if interval is None and prior in ("self", "base"):
        # Every row is guided and one network gives ∅ for all of them: no row selection, so nothing here
        # waits for the GPU and the host can queue the next steps while it computes (the general path's
        # boolean masks read GPU values). The result equals the general path's bit for bit.
        if prior == "self":
            cond, uncond = _model_pass(model, x_t, t, labels, abar_t, None)
        elif overlap and x_t.is_cuda:
            cond, uncond = _overlapped(lambda: _cond(model, x_t, t, labels, abar_t), prior_net, x_t, abar_t)
        else:
            cond, uncond = _cond(model, x_t, t, labels, abar_t), prior_net.eps(x_t, abar_t)
        uncond = uncond.to(cond.dtype)
        return Branches(cfg(cond, uncond, scale), cond, uncond, rows, w)
    use_self, use_base = rows & (w < 1), rows & (w > 0)
    if use_base.any() and overlap and x_t.is_cuda:
        (cond, eps_self), eps_base = _overlapped(lambda: _model_pass(model, x_t, t, labels, abar_t, use_self),
                                                 prior_net, x_t[use_base], abar_t[use_base])  # fmt: skip
    else:
        cond, eps_self = _model_pass(model, x_t, t, labels, abar_t, use_self)
        eps_base = prior_net.eps(x_t[use_base], abar_t[use_base]) if use_base.any() else None
    uncond = combine(_rows(use_self, eps_self, cond), _rows(use_base, eps_base, cond), w)
    guided = torch.where(rows.reshape(-1, *[1] * (cond.ndim - 1)), cfg(cond, uncond, scale), cond)
    return Branches(guided, cond, uncond, rows, w)


def _eps(pred: Tensor, prediction_type: str, x_t: Tensor, abar_t: Tensor) -> Tensor:
    """A network's prediction as eps in the dtype of x_t (float32 when sampling): under bf16 autocast only the
    networks run in bf16, while the conversion and the guidance combination, which amplify rounding by up to w,
    run in float32."""
    return diffusion.to_eps(pred.to(x_t.dtype), prediction_type, x_t, abar_t)


def _base_weight(prior: str, weights: PriorWeights | None, t: Tensor, device: torch.device,
                 scale: float | None = None) -> Tensor:  # fmt: skip
    """The base's weight per row: 0 for self, 1 for base, the fitted bucket weight (at guidance scale `scale`
    where the weights hold one row per scale) for auto and mix."""
    if prior in FITTED:
        return weights.at(t.to(device), scale).float()
    return torch.full((len(t),), float(prior == "base"), device=device)


def _cond(model, x_t, t, labels, abar_t) -> Tensor:
    """eps_θ(x_t, c) for every row."""
    return _eps(model(x_t, t, labels), model.prediction_type, x_t, abar_t)


def _model_pass(model, x_t, t, labels, abar_t, sel) -> tuple[Tensor, Tensor | None]:
    """eps_θ(x_t, c) for every row and eps_θ(x_t, ∅) for rows `sel` (every row when None), in one batched pass
    over [x_t; x_t[sel]]."""
    if sel is not None and not sel.any():
        return _cond(model, x_t, t, labels, abar_t), None
    pick = (lambda v: v) if sel is None else (lambda v: v[sel])
    x = torch.cat([x_t, pick(x_t)])
    abar = torch.cat([abar_t, pick(abar_t)])
    y = torch.cat([labels, torch.full_like(pick(labels), model.null_class)])
    both = _eps(model(x, torch.cat([t, pick(t)]), y), model.prediction_type, x, abar)
    return both[: len(x_t)], both[len(x_t) :]


def _rows(sel: Tensor, values: Tensor | None, like: Tensor) -> Tensor:
    """Values of rows `sel` placed in a zero tensor shaped like `like` (all zero where no row was evaluated)."""
    if values is None:
        return torch.zeros_like(like)
    if sel.all():
        return values.to(like.dtype)
    full = torch.zeros_like(like)
    full[sel] = values.to(like.dtype)
    return full


_SIDE_STREAMS: dict = {}


def _overlapped(model_pass, prior_net: PriorNet, x_base: Tensor, abar_base: Tensor):
    """The model's pass on the current CUDA stream and the prior network's on a side stream, concurrently. The side
    stream is one per device, made once, so that a CUDA graph capturing this (`priorlab.sampling`) forks and joins the
    same stream at every replay."""
    main = torch.cuda.current_stream(x_base.device)
    side = _SIDE_STREAMS.get(x_base.device)
    if side is None:
        side = _SIDE_STREAMS[x_base.device] = torch.cuda.Stream(x_base.device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        prior_eps = prior_net.eps(x_base, abar_base)
    out = model_pass()
    main.wait_stream(side)
    if not torch.cuda.is_current_stream_capturing():  # a graph's memory is its own pool, ordered by the join
        prior_eps.record_stream(main)
    return out, prior_eps

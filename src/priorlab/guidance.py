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
The prior is an object (`priorlab.priors.kinds`): its unconditional term is (1 − λ)·eps_θ(x_t, ∅) + λ·eps_ψ(x_t, ∅)
with λ = 0 (self), 1 (base) or fitted per timestep bucket (auto, mix, checked; auto's λ is 0 or 1, so each row
evaluates only its chosen network). There is one guided step: `guide` for one (prior, w), and `guide_blocks` for
several settings side by side in one batch (`priorlab.sample_many`), both on `_shared_pass`: θ's conditional rows
and the ∅ rows of the λ = 0 priors in one pass, each prior network once over the rows of its priors. Where the prior
network runs over every row θ runs over (prior=base, or blocks of base priors only) and shares θ's architecture, both
can run as one network over a stacked model dimension (`priorlab.priors.fused`, the prior's `fused` setting).
A prior whose θ takes w as an input (prior=distilled, `Prior.scale_input`: a fine-tune trained with
`guidance_distill`) is guided by θ's one pass at w, eps = eps_θ(x_t, c, w): no ∅ branch, no prior network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser
from priorlab.priors import SELF, Prior, combine
from priorlab.priors.fused import fused_pair


@dataclass
class Branches:
    """Every branch of one guided prediction, all as eps.

    Attributes:
        guided: the combined prediction.
        cond: eps_θ(x_t, c).
        uncond: the unconditional prediction that was combined (None where it was not evaluated); zero in rows
            outside `guided_rows`.
        guided_rows: boolean mask (N,) of rows where guidance was applied.
        base_weight: the base's weight λ in `uncond` per row (N,): 0 for prior=self, 1 for prior=base, fitted
            for auto, mix and checked (read only where `guided_rows`); None when no prior was evaluated.
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
    prior: Prior = SELF,
    interval: tuple[float, float] | None = None,
    overlap: bool = True,
) -> Branches:
    """One guided eps prediction with its branches: eps_prior + w·(eps_θ(x_t, c) − eps_prior).

    Args:
        model: the conditional model θ.
        x_t: noisy samples (N, ...); t: timesteps (N,); labels: classes (N,).
        abar_t: the model's ᾱ at t, (N,).
        scale: guidance scale w; w = 1 returns the conditional prediction without evaluating the prior.
        prior: the unconditional prior (`priorlab.priors.kinds`), built and validated at the edges (`make_prior`).
        interval: apply guidance only where σ(ᾱ_t) ∈ [lo, hi].
        overlap: on a GPU, run the prior network on a side CUDA stream concurrently with the model.
    Each network is evaluated only on the rows that need it: θ's ∅ branch where the base weight is below 1 (in
    one batched pass with the conditional branch), ψ where it is above 0. Every branch is converted to the dtype of
    x_t before it is combined, so under autocast the combination is not computed in bf16. A prior of
    `scale_input` (prior=distilled) is θ's one pass at w (w = 1 outside the interval); its `cond` is that pass.
    """
    rows = torch.ones(len(x_t), dtype=torch.bool, device=x_t.device)
    if interval is not None:
        rows = in_interval(abar_t.to(x_t.device), interval)
    if not prior.guides or scale == 1 or (interval is not None and not rows.any()):
        cond = _cond(model, x_t, t, labels, abar_t)
        return Branches(cond, cond, None, rows & False)
    if prior.scale_input:  # θ's own pass at w is the guided prediction
        guided = _cond(model, x_t, t, labels, abar_t, scale if interval is None else torch.where(rows, scale, 1.0))
        return Branches(guided, guided, None, rows)
    w = prior.base_weight(t.to(x_t.device), scale)
    if interval is None and not prior.per_row:
        # Every row is guided and one network gives ∅ for all of them: no row selection, so nothing here
        # waits for the GPU and the host can queue the next steps while it computes (the general path's
        # boolean masks read GPU values). The result equals the general path's bit for bit.
        cond, (uncond,) = _shared_pass(model, x_t, t, labels, abar_t, [(slice(None), prior)], overlap)
        return Branches(cfg(cond, uncond, scale), cond, uncond, rows, w)
    use_self, use_base = rows & (w < 1), rows & (w > 0)
    own = [use_self] if use_self.any() else []
    nets = [(use_base, prior)] if use_base.any() else []
    cond, eps_self, eps_base = _passes(model, x_t, t, labels, abar_t, own, nets, overlap)
    eps_self, eps_base = (eps_self or [None])[0], (eps_base or [None])[0]  # None where no row needed it
    uncond = combine(_rows(use_self, eps_self, cond), _rows(use_base, eps_base, cond), w)
    guided = torch.where(rows.reshape(-1, *[1] * (cond.ndim - 1)), cfg(cond, uncond, scale), cond)
    return Branches(guided, cond, uncond, rows, w)


def guide_blocks(model: Denoiser, x_t: Tensor, t: Tensor, labels: Tensor, abar_t: Tensor,
                 blocks: list[tuple[Prior, float]], guided: bool = True) -> Tensor:  # fmt: skip
    """The guided eps of several (prior, w) settings side by side in one batch: block j holds rows [j·b, (j+1)·b)
    of x_t (N = k·b rows) and is guided with blocks[j] (`guide` of each block alone, up to the rounding of other
    batch shapes). θ makes one pass over every row (conditional) and the rows of the blocks whose prior is θ's own
    ∅ branch; each prior network one pass over the rows of its blocks. Only priors of one base weight for every row
    can share a batch (`Prior.per_row` false): no step reads a GPU value, so it can be captured in a CUDA graph.
    The blocks of a prior of `scale_input` (prior=distilled) take their w in θ's pass, which is their guided eps.

    Args:
        t: the step's timestep, one for every row (a 0-d or (1,) tensor) or (N,); abar_t: θ's ᾱ per row (N,).
        guided: whether the step lies in the guidance interval (else every block takes the conditional prediction).
    """
    b = len(x_t) // len(blocks)
    parts = [(slice(j * b, (j + 1) * b), prior, w) for j, (prior, w) in enumerate(blocks)]
    active = [(sl, prior, w) for sl, prior, w in parts if guided and w != 1 and prior.guides]
    scales = torch.ones(len(x_t), device=x_t.device) if any(p.scale_input for _, p, _ in active) else None
    for sl, _, w in (part for part in active if part[1].scale_input):  # θ's scale input: w there, 1 elsewhere
        scales[sl] = w
    active = [part for part in active if not part[1].scale_input]
    cond, unconds = _shared_pass(model, x_t, t.expand(len(x_t)), labels, abar_t,
                                 [(sl, prior) for sl, prior, _ in active], overlap=False, scale=scales)  # fmt: skip
    eps = cond.clone()
    for (sl, _, w), uncond in zip(active, unconds, strict=True):
        eps[sl] = cfg(cond[sl], uncond, w)
    return eps


def _shared_pass(model, x_t, t, labels, abar_t, blocks: list[tuple[slice, Prior]], overlap: bool,
                 scale: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:  # fmt: skip
    """eps_θ(x_t, c) of every row (at θ's scale input `scale` (N,) where given) and the unconditional eps of each
    block (rows, prior) of a prior with one base weight for every row: θ's ∅ (λ = 0) from θ's one pass, ψ's (λ = 1)
    from one pass of each network over the rows of its blocks."""
    own = [sl for sl, prior in blocks if not prior.needs_net]
    nets = [(sl, prior) for sl, prior in blocks if prior.needs_net]
    cond, eps_self, eps_base = _passes(model, x_t, t, labels, abar_t, own, nets, overlap, scale is None, scale)
    mine, theirs = iter(eps_self), iter(eps_base)
    return cond, [next(theirs if prior.needs_net else mine).to(cond.dtype) for _, prior in blocks]


def _passes(model, x_t, t, labels, abar_t, own: list, nets: list[tuple], overlap: bool, fuse: bool = True,
            scale: Tensor | None = None):  # fmt: skip
    """θ's pass (`_model_pass`) over every row and the ∅ rows `own` (indices of x_t), and the prior networks' passes
    (`_net_passes`) over the rows of `nets`, on a side CUDA stream concurrently where `overlap` asks and there is one.
    Returns (eps_θ(x_t, c), [eps_θ(x_t[i], ∅) for i in own], [eps_ψ(x_t[i], ∅) for (i, ψ) in nets])."""
    fused = _fused(model, x_t, t, labels, abar_t, own, nets, overlap) if fuse else None
    if fused is not None:
        return fused
    if nets and overlap and x_t.is_cuda:
        (cond, eps_self), eps_base = _overlapped(lambda: _model_pass(model, x_t, t, labels, abar_t, own, scale),
                                                 lambda: _net_passes(x_t, abar_t, nets), x_t.device)  # fmt: skip
    else:
        cond, eps_self = _model_pass(model, x_t, t, labels, abar_t, own, scale)
        eps_base = _net_passes(x_t, abar_t, nets)
    return cond, eps_self, eps_base


def _fused(model, x_t, t, labels, abar_t, own: list, nets: list[tuple], overlap: bool):
    """`_passes`' result from one pass of θ and ψ stacked (`priorlab.priors.fused.FusedPair`), or None where the
    two run apart: θ has ∅ rows of its own, several networks or none are read, ψ's rows are not θ's (only slices
    that cover every row in order qualify: a boolean mask would be read on the host), the prior's `fused` is off,
    the architectures differ, or fused=auto found two passes faster for this shape and precision."""
    if own or not nets or len({id(prior.net) for _, prior in nets}) != 1:
        return None
    starts = [range(len(x_t))[sl] if isinstance(sl, slice) else None for sl, _ in nets]
    if any(r is None or r.step != 1 for r in starts) or [i for r in starts for i in r] != list(range(len(x_t))):
        return None
    prior = nets[0][1]
    pair = fused_pair(model, prior.net, prior.fused)
    if pair is None:
        return None
    one = lambda: pair(x_t, t, labels, abar_t)  # noqa: E731
    if prior.fused == "auto":
        device = x_t.device.type
        precision = (x_t.dtype, torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device))
        separate = lambda: _passes(model, x_t, t, labels, abar_t, [], nets, overlap, fuse=False)  # noqa: E731
        if not pair.faster((device, tuple(x_t.shape), precision, overlap), one, separate):
            return None
    cond, base = one()
    return cond, [], list(base.split([len(r) for r in starts]))


def _eps(pred: Tensor, prediction_type: str, x_t: Tensor, abar_t: Tensor) -> Tensor:
    """A network's prediction as eps in the dtype of x_t (float32 when sampling): under bf16 autocast only the
    networks run in bf16, while the conversion and the guidance combination, which amplify rounding by up to w,
    run in float32."""
    return diffusion.to_eps(pred.to(x_t.dtype), prediction_type, x_t, abar_t)


def _cond(model, x_t, t, labels, abar_t, scale: Tensor | float | None = None) -> Tensor:
    """eps_θ(x_t, c) for every row, with θ's scale input where `scale` is given (a model that takes one)."""
    out = model(x_t, t, labels) if scale is None else model(x_t, t, labels, scale=scale)
    return _eps(out, model.prediction_type, x_t, abar_t)


def _cat(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _model_pass(model, x_t, t, labels, abar_t, own: list, scale: Tensor | None = None) -> tuple[Tensor, list[Tensor]]:
    """eps_θ(x_t, c) for every row and eps_θ(x_t[i], ∅) for each index i of `own` (a slice or a boolean mask), in
    one batched pass over [x_t; x_t[i_1]; ...]; θ's scale input `scale` (N,) in the conditional rows where given,
    1 in the ∅ rows."""
    if not own:
        return _cond(model, x_t, t, labels, abar_t, scale), []
    rows = [x_t[i] for i in own]
    x = torch.cat([x_t, *rows])
    null = torch.cat([torch.full_like(labels[i], model.null_class) for i in own])
    scale = None if scale is None else torch.cat([scale, scale.new_ones(len(x) - len(x_t))])
    both = _cond(model, x, torch.cat([t, *[t[i] for i in own]]), torch.cat([labels, null]),
                 torch.cat([abar_t, *[abar_t[i] for i in own]]), scale)  # fmt: skip
    return both[: len(x_t)], list(both[len(x_t) :].split([len(r) for r in rows]))


def _net_passes(x_t: Tensor, abar_t: Tensor, nets: list[tuple]) -> list[Tensor]:
    """eps_ψ(x_t[i], ∅) for each (i, prior) of `nets`, one pass per network over the rows of all its priors."""
    groups: dict[int, list[int]] = {}
    for j, (_, prior) in enumerate(nets):
        groups.setdefault(id(prior.net), []).append(j)
    out: list = [None] * len(nets)
    for members in groups.values():
        xs = [x_t[nets[j][0]] for j in members]
        eps = nets[members[0]][1].base_eps(_cat(xs), _cat([abar_t[nets[j][0]] for j in members]))
        for j, part in zip(members, eps.split([len(x) for x in xs]), strict=True):
            out[j] = part
    return out


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


def _overlapped(model_pass, net_pass, device: torch.device):
    """The model's pass on the current CUDA stream and the prior networks' (a list of eps) on a side stream,
    concurrently. The side stream is one per device, made once, so that a CUDA graph capturing this
    (`priorlab.sampling`) forks and joins the same stream at every replay."""
    main = torch.cuda.current_stream(device)
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        prior_eps = net_pass()
    out = model_pass()
    main.wait_stream(side)
    if not torch.cuda.is_current_stream_capturing():  # a graph's memory is its own pool, ordered by the join
        for eps in prior_eps:
            eps.record_stream(main)
    return out, prior_eps

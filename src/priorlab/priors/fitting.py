"""Fitting the fitted priors' per-noise-level weights of the base in the unconditional prediction (`auto`, `mix`).

On a calibration split x0 with fixed noise eps and timesteps t, the two unconditional candidates are the guided
model's own branch eps_θ(x_t, ∅) ("self") and the base's eps_ψ(x_t, ∅) ("base"). In timestep bucket b the
convex combination eps_w = (1 − w)·eps_θ + w·eps_ψ has the denoising loss (per element)

    L_b(w) = E_b ‖a + w·d‖² = E_b‖a‖² + 2w·E_b[a·d] + w²·E_b‖d‖²,   a = eps_θ − eps,  d = eps_ψ − eps_θ.

`auto` takes w_b ∈ {0, 1}, the candidate with the lower loss (self on ties); `mix` takes the least-squares
minimiser w_b = −E_b[a·d] / E_b‖d‖² clipped to [0, 1], the minimiser of the convex quadratic on [0, 1], so
L_b(w_b) ≤ min(L_b(0), L_b(1)) on the calibration data. Guidance then uses
eps_ψ,θ(x_t, ∅) = (1 − w_b)·eps_θ(x_t, ∅) + w_b·eps_ψ(x_t, ∅) in place of the unconditional prediction.

That is the `null_loss` objective. A lower ∅ loss does not make a better *guided* prediction (the fine-tune's ∅
errors are shared with its conditional branch and cancel in eps_θ(c) − eps_θ(∅), and at high noise the ∅ loss is
tiny and ranks noise), so the `guided` objective scores each candidate u where it is used, per bucket b and per
guidance scale w, on labelled calibration data (x0, c, eps, t):

    L_b^w(u) = E_b ‖ eps_θ(x_t, c) + (w − 1)(eps_θ(x_t, c) − eps_u(x_t)) − eps ‖².

The same quadratic in the mixing weight holds with a = w·eps_θ(c) − (w − 1)·eps_θ(∅) − eps (self-guided residual)
and d = −(w − 1)(eps_ψ − eps_θ(∅)). Because E[eps | x_t, c] = eps*(x_t, c) and, over c ~ p(c | x_t),
E eps*(x_t, c) = eps*(x_t, ∅), the differences between candidates equal the differences of E‖guided_u − ideal‖²,
where "ideal" guides with the true scores: no exact score is needed, so it works on images
(`tests/test_calibration.py` checks it against exact scores on toy2d). Its weights hold one row per scale.

Two conditions (InstructPix2Pix: image c_I, text c_T, scales s_I and s_T) guide with
(1 − s_I)·eps(∅, ∅) + (s_I − s_T)·eps(c_I, ∅) + s_T·eps(c_I, c_T), and only eps(∅, ∅) is a candidate, so

    a = (1 − s_I)·eps_θ(∅, ∅) + (s_I − s_T)·eps_θ(c_I, ∅) + s_T·eps_θ(c_I, c_T) − eps,
    d = (1 − s_I)(eps_ψ − eps_θ(∅, ∅)).

The same argument holds (E over c_T given x_t, c_I of eps*(c_I, c_T) is eps*(c_I, ∅), and over c_I of that,
eps*(∅, ∅)), so the rows are fitted per text scale at one image scale, which the weights record.

`fit_weights` is a pure function of tensors, for any pair of denoisers: the pipeline adapters call it with their own
predictions, and `priorlab.evaluation.calibrate` with those of priorlab's own denoisers. The weights it returns, and
`combine`, are `priorlab.priors.weights`'.
"""

from __future__ import annotations

import torch
from torch import Tensor

from priorlab.errors import UserError
from priorlab.keys import scale_name
from priorlab.priors.modes import FITTABLE
from priorlab.priors.weights import OBJECTIVES, PriorWeights, bucket_edges, bucket_index


def fit_weights(
    eps_self: Tensor, eps_base: Tensor, noise: Tensor, t: Tensor, num_train_timesteps: int, buckets: int, prior: str,
    objective: str = "null_loss", eps_cond: Tensor | None = None, scales: list[float] | None = None,
    eps_image: Tensor | None = None, image_scale: float | None = None,
) -> PriorWeights:  # fmt: skip
    """Per-bucket base weights minimising the held-out loss of the unconditional prediction (`null_loss`) or of
    the guided prediction at each of `scales` (`guided`; module doc).

    Args:
        eps_self: the guided model's ∅ predictions (N, ...), as eps; eps_base: the base's, the same shape.
        noise: the eps each x_t was made with (N, ...); t: integer timesteps (N,) of the guided model.
        num_train_timesteps: T of the guided model; buckets: K equal timestep buckets over [0, T).
        prior: "auto" (each bucket's better candidate) or "mix" (the least-squares convex weight).
        objective: "null_loss" or "guided"; the guided one needs `eps_cond`, the model's conditional predictions
            eps_θ(x_t, c) at the calibration labels (N, ...), and the guidance `scales` to fit a row for.
        eps_image, image_scale: two conditions (module doc): eps_θ(x_t, c_I, ∅) (N, ...) and the image scale
            s_I; `eps_cond` is then eps_θ(x_t, c_I, c_T) and `scales` the text scales.
    Buckets without a calibration sample take the weight of the nearest bucket that has one.
    """
    _check_fit(eps_self, eps_base, noise, t, prior, objective, eps_cond, scales, eps_image, image_scale)
    edges = bucket_edges(num_train_timesteps, buckets)
    index = bucket_index(t.cpu(), edges)
    e_self, e_base, eps = (v.double().flatten(1).cpu() for v in (eps_self, eps_base, noise))  # (N, D)
    d = e_base - e_self
    w_null, null, count = _fit_buckets(e_self - eps, d, index, buckets, prior)
    if objective == "null_loss":
        record = _record(null, count, ("self", "base", prior))
        return PriorWeights(edges, w_null.float(), prior, record)
    e_cond = eps_cond.double().flatten(1).cpu()
    e_image = None if eps_image is None else eps_image.double().flatten(1).cpu()
    rows, guided = [], {}
    for w in scales:
        s_i = w if e_image is None else float(image_scale)  # one condition: the ∅ term's weight is 1 − w
        a = w * e_cond + (1 - s_i) * e_self - eps  # the self-guided residual
        if e_image is not None:
            a = a + (s_i - w) * e_image
        fitted, losses, _ = _fit_buckets(a, (1 - s_i) * d, index, buckets, prior)
        rows.append(fitted)
        guided[scale_name(w)] = _record(losses, count, ("self", "base", prior), with_count=False)
    record = {**_record(null, count, ("self", "base")), "guided": guided}
    return PriorWeights(edges, torch.stack(rows).float(), prior, record, "guided", [float(w) for w in scales],
                        None if image_scale is None else float(image_scale))  # fmt: skip


def _check_fit(eps_self: Tensor, eps_base: Tensor, noise: Tensor, t: Tensor, prior: str, objective: str,
               eps_cond: Tensor | None, scales: list[float] | None, eps_image: Tensor | None,
               image_scale: float | None) -> None:  # fmt: skip
    """`fit_weights`' arguments agree: a fittable prior, a known objective, predictions shaped like the noise."""
    if prior not in FITTABLE:
        raise UserError(f"prior={prior} cannot be fitted; fitted priors are {', '.join(FITTABLE)}")
    if objective not in OBJECTIVES:
        raise UserError(f"calibration objective {objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if not (eps_self.shape == eps_base.shape == noise.shape) or len(t) != len(noise):
        raise ValueError(f"shapes differ: eps_self {tuple(eps_self.shape)}, eps_base {tuple(eps_base.shape)}, "
                         f"noise {tuple(noise.shape)}, t {tuple(t.shape)}")  # fmt: skip
    if objective == "guided" and (eps_cond is None or eps_cond.shape != noise.shape or not scales):
        raise ValueError("the guided objective needs eps_cond shaped like noise and at least one scale")
    if (eps_image is None) != (image_scale is None) or (
        eps_image is not None and (objective != "guided" or eps_image.shape != noise.shape)
    ):
        raise ValueError("two conditions need eps_image shaped like noise and image_scale, with the guided objective")
    if len(t) == 0:
        raise UserError("the calibration split is empty; prior=auto|mix need held-out samples to fit on")


def _fit_buckets(a: Tensor, d: Tensor, index: Tensor, buckets: int, prior: str) -> tuple[Tensor, dict, Tensor]:
    """Per bucket, the weight λ minimising E‖a + λ·d‖² (auto: λ ∈ {0, 1}, self on ties; mix: λ ∈ [0, 1]), the
    losses at 0 (self), 1 (base) and λ (under the prior's name), and the bucket counts."""

    def per_bucket(values: Tensor) -> Tensor:  # (N,) → (K,) sums
        return torch.zeros(buckets, dtype=torch.float64).index_add_(0, index, values)

    count = per_bucket(torch.ones(len(index), dtype=torch.float64))
    aa, ad, dd = (per_bucket(v.mean(1)) / count.clamp(min=1) for v in (a * a, a * d, d * d))

    def loss(w: Tensor) -> Tensor:
        return aa + 2 * w * ad + w * w * dd

    zero, one = torch.zeros(buckets, dtype=torch.float64), torch.ones(buckets, dtype=torch.float64)
    if prior == "auto":
        w = (loss(one) < loss(zero)).double()
    else:
        w = torch.where(dd > 0, -ad / dd.clamp(min=torch.finfo(torch.float64).tiny), zero).clamp(0, 1)
    w = _fill_empty(w, count > 0)
    return w, {"self": loss(zero), "base": loss(one), prior: loss(w)}, count


def _record(losses: dict, count: Tensor, keys: tuple[str, ...], with_count: bool = True) -> dict:
    """Per-bucket losses as lists (None where a bucket had no sample), with the counts."""
    out = {k: [v if n > 0 else None for v, n in zip(losses[k].tolist(), count.tolist(), strict=True)] for k in keys}
    if with_count:
        out["count"] = [int(n) for n in count.tolist()]
    return out


def _fill_empty(w: Tensor, has_data: Tensor) -> Tensor:
    """Give each bucket without data the weight of its nearest bucket with data (the earlier one on ties)."""
    full = torch.nonzero(has_data).flatten()
    if len(full) == len(w):
        return w
    nearest = full[(torch.arange(len(w))[:, None] - full[None, :]).abs().argmin(dim=1)]
    return w[nearest]

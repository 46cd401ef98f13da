"""Fitted priors (`auto`, `mix`, `checked`): per-noise-level weights of the base in the unconditional prediction.

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

`fit_weights` and `combine` are pure functions of tensors, for any pair of denoisers: the pipeline adapters call
them with their own predictions, and `priorlab.evaluation.calibrate` with those of priorlab's own denoisers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from priorlab import atomic
from priorlab.errors import UserError
from priorlab.keys import scale_name
from priorlab.priors.modes import FITTABLE, FITTED

OBJECTIVES = ("guided", "null_loss")
FORMAT = "priorlab.prior_weights"


def bucket_edges(num_train_timesteps: int, buckets: int) -> Tensor:
    """K + 1 integer boundaries splitting the training timesteps [0, T) into K equal buckets, (K + 1,)."""
    if not 1 <= buckets <= num_train_timesteps:
        raise UserError(f"buckets={buckets} must lie between 1 and the {num_train_timesteps} training timesteps")
    return torch.linspace(0, num_train_timesteps, buckets + 1).long()


def bucket_index(t: Tensor, edges: Tensor) -> Tensor:
    """The bucket b of each timestep, edges[b] ≤ t < edges[b + 1]; timesteps outside [0, T) go to the end buckets."""
    inner = edges[1:-1].to(t.device)
    return torch.bucketize(t, inner.to(t.dtype) if t.is_floating_point() else inner, right=True)


@dataclass
class PriorWeights:
    """Per-bucket convex weights of the base in the unconditional prediction (1 = all base, 0 = all self).

    Attributes:
        edges: K + 1 integer boundaries over the guided model's training timesteps [0, T].
        base_weight: (K,) weights in [0, 1], or (S, K) with one row per guidance scale of `scales`; `auto`
            weights are 0 or 1.
        mode: the prior these weights are for, "auto", "mix" or "checked" (the record's "mode").
        losses: per-bucket held-out losses it was fitted from: lists of K values under "self", "base" (the ∅
            losses) and, for the null_loss objective, the mode's name (None where a bucket had no calibration
            sample), and "count"; for the guided objective also "guided": {"w=<w>": {"self", "base", mode}}.
        objective: "null_loss" (one row, the ∅ loss) or "guided" (one row per scale, the guided loss).
        scales: the guidance scales of the rows (guided objective), else None; with two conditions, the text's.
        image_scale: with two conditions (guided objective), the image guidance scale the rows were fitted at.
    """

    edges: Tensor
    base_weight: Tensor
    mode: str
    losses: dict[str, list] | None = field(default=None)
    objective: str = "null_loss"
    scales: list[float] | None = None
    image_scale: float | None = None

    def __post_init__(self):
        self.edges = torch.as_tensor(self.edges).long().cpu()
        self.base_weight = torch.as_tensor(self.base_weight, dtype=torch.float32).cpu()
        if self.mode not in FITTED:
            raise UserError(f"prior weights of mode {self.mode!r}: the mode must be one of {', '.join(FITTED)}")
        if self.objective not in OBJECTIVES:
            raise UserError(f"prior weights of objective {self.objective!r}: use one of {', '.join(OBJECTIVES)}")
        if self.edges.ndim != 1 or len(self.edges) < 2 or self.edges[0] != 0 or (self.edges.diff() <= 0).any():
            raise UserError(f"prior weights: edges {self.edges.tolist()} must rise strictly from 0 to T")
        k = len(self.edges) - 1
        if self.scales is None:
            if self.objective == "guided":
                raise UserError("prior weights of the guided objective need the guidance scales of their rows")
            expected = (k,)
        else:
            self.scales = [float(w) for w in self.scales]
            if not self.scales or len(set(self.scales)) != len(self.scales) or not all(map(math.isfinite, self.scales)):
                raise UserError(f"prior weights: scales {self.scales} must be distinct finite numbers")
            expected = (len(self.scales), k)
        if self.base_weight.shape != expected:
            raise UserError(f"prior weights: {k} buckets{f' × {len(self.scales)} scales' if self.scales else ''} "
                            f"need weights of shape {expected}, got {tuple(self.base_weight.shape)}")  # fmt: skip
        w = self.base_weight
        if not torch.isfinite(w).all() or (w < 0).any() or (w > 1).any():
            raise UserError(f"prior weights {w.tolist()} must lie in [0, 1]")
        if self.image_scale is not None:
            self.image_scale = float(self.image_scale)
            if self.scales is None or not math.isfinite(self.image_scale):
                raise UserError(f"prior weights: image_scale {self.image_scale} needs the guided objective's scales "
                                "and must be finite")  # fmt: skip
        if self.mode == "checked" and self.scales is None:
            raise UserError("prior=checked weights hold one row per guidance scale; give the scales")
        if self.mode == "auto" and not ((w == 0) | (w == 1)).all():
            raise UserError(f"prior=auto weights must each be 0 (self) or 1 (base), got {w.tolist()}")

    @property
    def num_train_timesteps(self) -> int:
        return int(self.edges[-1])

    def row(self, scale: float | None = None) -> Tensor:
        """The (K,) bucket weights used at guidance scale `scale` (needed where the weights hold one row per scale)."""
        if self.scales is None:
            return self.base_weight
        if scale is None:
            raise UserError(f"these prior weights hold one row per guidance scale ({self.scales}); give the scale")
        for i, w in enumerate(self.scales):
            if math.isclose(w, float(scale), rel_tol=1e-6, abs_tol=1e-9):
                return self.base_weight[i]
        raise UserError(f"the prior weights were fitted (objective {self.objective}) at guidance scales "
                        f"{self.scales}, not at w={float(scale):g}; fit them at that scale")  # fmt: skip

    def check_image_scale(self, image_scale: float | None) -> None:
        """Refuse an image guidance scale other than the one two-condition weights were fitted at."""
        if self.image_scale is None:
            return
        if image_scale is None or not math.isclose(self.image_scale, float(image_scale), rel_tol=1e-6, abs_tol=1e-9):
            got = "none" if image_scale is None else f"{float(image_scale):g}"
            raise UserError(f"the prior weights were fitted at image_guidance_scale={self.image_scale:g}, not at "
                            f"{got}; fit them at the image scale the pipeline runs at")  # fmt: skip

    def at(self, t: Tensor, scale: float | None = None) -> Tensor:
        """The base weight of each row for integer timesteps t (N,) at guidance scale `scale`, on t's device."""
        return self.row(scale).to(t.device)[bucket_index(t, self.edges)]

    def to_dict(self) -> dict:
        return {"format": FORMAT, "mode": self.mode, "objective": self.objective, "scales": self.scales,
                "image_guidance_scale": self.image_scale, "edges": self.edges.tolist(),
                "base_weight": self.base_weight.tolist(), "losses": self.losses}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict) -> PriorWeights:
        """Build from `to_dict()`'s output (a record without an objective is of the null_loss one); a mapping of
        another shape is a UserError."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"not a priorlab prior-weights record (expected format {FORMAT!r})")
        try:
            return cls(torch.tensor(data["edges"]), torch.tensor(data["base_weight"]), data["mode"], data.get("losses"),
                       data.get("objective", "null_loss"), data.get("scales"),
                       data.get("image_guidance_scale"))  # fmt: skip
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise UserError(f"prior-weights record is malformed ({type(err).__name__}: {err})") from err

    def save(self, path: str | Path) -> Path:
        """Write the weights as JSON atomically (a temporary sibling renamed into place)."""
        return atomic.write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PriorWeights:
        """Read weights written by `save`; a missing, corrupt or foreign file is a one-line UserError."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"prior weights file {path} does not exist; fit weights first or pass another path")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise UserError(f"prior weights file {path} is not valid JSON ({err}); fit the weights again") from err
        try:
            return cls.from_dict(data)
        except UserError as err:
            raise UserError(f"prior weights file {path}: {err}") from err


def combine(eps_self: Tensor | None, eps_base: Tensor | None, w_base: Tensor) -> Tensor:
    """(1 − w)·eps_self + w·eps_base per row, exactly eps_self where w = 0 and eps_base where w = 1.

    Args:
        eps_self, eps_base: (N, ...) predictions; either may be None where every w is 1 (resp. 0), and the rows
            of one that the other's weight excludes are never read (they may hold anything).
        w_base: (N,) base weights.
    """
    if eps_self is None and eps_base is None:
        raise ValueError("combine needs eps_self or eps_base")
    if eps_self is None or eps_base is None:
        needed, given = (1.0, eps_base) if eps_self is None else (0.0, eps_self)
        if not (w_base == needed).all():
            raise ValueError(f"combine: every weight must be {needed:g} when only one prediction is given")
        return given
    w = w_base.to(eps_self.device, eps_self.dtype).reshape(-1, *[1] * (eps_self.ndim - 1))
    mixed = eps_self + w * (eps_base - eps_self)
    return torch.where(w == 0, eps_self, torch.where(w == 1, eps_base, mixed))


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
    if prior not in FITTABLE:
        raise UserError(f"prior={prior} cannot be fitted; fitted priors are {', '.join(FITTABLE)}")
    if objective not in OBJECTIVES:
        raise UserError(f"calibration objective {objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if not (eps_self.shape == eps_base.shape == noise.shape) or len(t) != len(noise):
        raise ValueError(f"shapes differ: eps_self {tuple(eps_self.shape)}, eps_base {tuple(eps_base.shape)}, "
                         f"noise {tuple(noise.shape)}, t {tuple(t.shape)}")  # fmt: skip
    if objective == "guided" and (eps_cond is None or eps_cond.shape != noise.shape or not scales):
        raise ValueError("the guided objective needs eps_cond shaped like noise and at least one scale")
    if (
        (eps_image is None) != (image_scale is None)
        or eps_image is not None
        and (objective != "guided" or eps_image.shape != noise.shape)
    ):
        raise ValueError("two conditions need eps_image shaped like noise and image_scale, with the guided objective")
    if len(t) == 0:
        raise UserError("the calibration split is empty; prior=auto|mix need held-out samples to fit on")
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

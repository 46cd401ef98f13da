"""The fitted priors' weights (`auto`, `mix`, `checked`): per timestep bucket b, the base's weight w_b in the
unconditional prediction eps_ψ,θ(x_t, ∅) = (1 − w_b)·eps_θ(x_t, ∅) + w_b·eps_ψ(x_t, ∅) (`combine`), one row of
weights, or one per guidance scale for the `guided` objective; `PriorWeights` is their record (saved as JSON).
How they are fitted on a calibration split is `priorlab.priors.fitting`.
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
from priorlab.priors.modes import FITTED

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
    t = t.contiguous()  # an expanded t (one timestep per batch) made bucketize copy it, with a warning
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

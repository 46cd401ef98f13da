"""Metric keys: built and parsed here, and nowhere else.

A metric key is a path (house style: `eval/cond/fd/prior=base/w=2.0`):

    eval/<group>/<metric>[/prior=<p> | /model=<m>][/w=<w>][/<bucket>]

group: cond (guided samples), prior (the unconditional branches on held-out data), uncond (unconditional
samples), calib (the fitted priors' calibration), diff (paired differences between priors), grid (sample images,
no metric); `prior=` names a mode of guidance, `model=` a network whose own prediction was measured; w: the
guidance scale (`scale_name`); bucket: a timestep bucket `t=<lo>-<hi>` (`bucket_name`) or `all`.
`parse` gives the parts back (w to the 6 significant digits `scale_name` writes), and `row_parts` the columns
of the tidy results table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

ROOT = "eval"
BUCKET = re.compile(r"t=(\d+)-(\d+)")
GROUPS_IN_METRIC = ("uncond", "calib", "diff")  # groups whose name prefixes the metric in the results table
SELF = "self"  # the prior of the fine-tune's own ∅ branch, in keys and in the results table's `prior` column
BASE = "base"  # the prior of the base the fine-tune started from


def scale_name(w: float) -> str:
    """The key part of guidance scale w: w=2.0, w=1.5, w=7.5 (whole numbers keep one decimal)."""
    w = float(w)
    return f"w={w:g}" if w != int(w) else f"w={w:.1f}"


def scale_of(part: str) -> float:
    """The guidance scale of a key part written by `scale_name`: w=2.0 → 2.0."""
    if not part.startswith("w="):
        raise ValueError(f"{part!r} is not a guidance-scale part (w=<w>)")
    return float(part[2:])


def diff_metric(metric: str, a: str) -> str:
    """The metric of the standard error of metric(a) − metric(b), reported at prior=b: `<metric>_se` where a is self
    (every prior is compared with the model's own ∅ branch), else `<metric>_se_vs_<a>`."""
    return f"{metric}_se" if a == SELF else f"{metric}_se_vs_{a}"


def bucket_name(edges: Any, b: int) -> str:
    """The key part of timestep bucket b of `edges` (K + 1 integer boundaries): t=100-199."""
    return f"t={int(edges[b])}-{int(edges[b + 1]) - 1}"


def bucket_bounds(part: str) -> tuple[int, int] | None:
    """The first and last timestep of a bucket part or of a metric ending in one (loss/t=100-199 → (100, 199));
    None for anything else."""
    m = re.search(rf"(?:^|/){BUCKET.pattern}$", part)
    return (int(m.group(1)), int(m.group(2))) if m else None


@dataclass(frozen=True)
class Key:
    """The parts of one metric key (module doc); `str(key)` builds it."""

    group: str
    metric: str | None = None
    prior: str | None = None
    model: str | None = None
    scale: float | None = None
    bucket: str | None = None

    def __post_init__(self):
        if self.prior is not None and self.model is not None:
            raise ValueError("a metric key names a prior or a model, not both")

    def __str__(self) -> str:
        parts = [ROOT, self.group]
        if self.metric is not None:
            parts.append(self.metric)
        if self.prior is not None:
            parts.append(f"prior={self.prior}")
        if self.model is not None:
            parts.append(f"model={self.model}")
        if self.scale is not None:
            parts.append(scale_name(self.scale))
        if self.bucket is not None:
            parts.append(self.bucket)
        return "/".join(parts)


def key(group: str, metric: str | None = None, *, prior: str | None = None, model: str | None = None,
        scale: float | None = None, bucket: str | None = None) -> str:  # fmt: skip
    """A metric key from its parts, e.g. key("cond", "fd", prior="base", scale=2) → eval/cond/fd/prior=base/w=2.0."""
    return str(Key(group, metric, prior, model, scale, bucket))


def parse(text: str) -> Key:
    """The parts of a metric key (the inverse of `key`). Parts after the group other than prior=, model= and w=
    form the metric, but the last of two or more such parts is the bucket where it is `all` or t=<lo>-<hi>."""
    parts = text.split("/")[1:]
    group, rest = (parts[0] if parts else ""), []
    prior = model = scale = None
    for part in parts[1:]:
        if part.startswith("prior="):
            prior = part.split("=", 1)[1]
        elif part.startswith("model="):
            model = part.split("=", 1)[1]
        elif part.startswith("w="):
            scale = scale_of(part)
        else:
            rest.append(part)
    bucket = None
    if len(rest) >= 2 and (rest[-1] == "all" or BUCKET.fullmatch(rest[-1])):
        bucket = rest.pop()
    return Key(group, "/".join(rest) if rest else None, prior, model, scale, bucket)


def row_parts(text: str) -> tuple[str, str, float]:
    """A metric key as (metric, prior, guidance_scale) columns of the results table: the metric with its bucket,
    prefixed by the group for uncond, calib and diff; the prior or model ("" for neither); the scale (NaN for
    none).

    eval/cond/fd/prior=base/w=2.0            → ("fd", "base", 2.0)
    eval/prior/loss/model=self/t=0-99        → ("loss/t=0-99", "self", nan)
    eval/prior/disagreement/all              → ("disagreement/all", "", nan)
    eval/uncond/fd/model=base                → ("uncond_fd", "base", nan)
    eval/calib/loss/model=self/t=0-99        → ("calib_loss/t=0-99", "self", nan)
    eval/diff/fd_se/prior=base/w=2.0         → ("diff_fd_se", "base", 2.0)   (SE of fd(self) − fd(base))
    eval/cond/num_classes                    → ("num_classes", "", nan)
    """
    k = parse(text)
    metric = "/".join(p for p in (k.metric, k.bucket) if p is not None)
    if k.group in GROUPS_IN_METRIC:
        metric = f"{k.group}_{metric}"
    who = k.prior if k.prior is not None else k.model if k.model is not None else ""
    return metric, who, math.nan if k.scale is None else k.scale

"""Means with 95% confidence intervals, and paired comparisons of two priors.

Two intervals answer two questions. Over seeds (Student-t on the per-seed values): what a new training run would
give; its width includes training noise, and with 3 seeds t = 4.30. Over samples (normal, from each run's
standard error over its generated samples, pooled over the runs): how precisely these trained models were
measured; it ignores training noise, so it says nothing about another run. A comparison of priors is paired in
both: identical seeds, labels and noise for every prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats


@dataclass
class Estimate:
    """A mean over n seeds with its 95% confidence interval (nan bounds when n = 1)."""

    mean: float
    lo: float
    hi: float
    n: int

    def __str__(self) -> str:
        mean, lo, hi = self.mean + 0.0, self.lo + 0.0, self.hi + 0.0  # + 0.0: no "-0" for a difference of zero
        if self.n < 2 or math.isnan(lo):
            return f"{mean:.3g} (n={self.n})"
        return f"{mean:.3g} [{lo:.3g}, {hi:.3g}]"

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)

    def negated(self) -> Estimate:
        """The estimate of minus the quantity (its interval mirrored)."""
        return Estimate(-self.mean, -self.hi, -self.lo, self.n)


def mean_ci(values) -> Estimate:
    """Mean and 95% t-interval of independent values (one per seed)."""
    x = np.asarray(list(values), dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    mean = float(x.mean())
    if n < 2:
        return Estimate(mean, float("nan"), float("nan"), n)
    half = float(stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return Estimate(mean, mean - half, mean + half, n)


def pooled_over_samples(means, ses) -> Estimate:
    """The mean of per-run estimates with a normal 95% interval from their standard errors over samples:
    SE = √(Σ se_i²) / n. Conditional on the trained runs: training noise is not in it."""
    m, s = np.asarray(list(means), dtype=float), np.asarray(list(ses), dtype=float)
    keep = ~(np.isnan(m) | np.isnan(s))
    m, s = m[keep], s[keep]
    n = len(m)
    if n == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    half = float(stats.norm.ppf(0.975) * math.sqrt((s**2).sum()) / n)
    return Estimate(float(m.mean()), float(m.mean()) - half, float(m.mean()) + half, n)


def paired_difference(
    frame: pd.DataFrame, metric: str, keys: list[str] | None = None, a: str = "self", b: str = "base"
) -> pd.DataFrame:
    """Per condition (`keys`, default cond_dropout) and guidance scale: metric(prior=a) − metric(prior=b).

    Columns: the keys, guidance_scale, `estimate` (mean and t-interval over seeds), `over_samples` (the same mean
    with the interval pooled from each run's SE of the paired difference, `diff_<metric>_se`, where the runs
    recorded it; b is the prior of that SE, a must be self) and `per_seed` (the per-seed differences).
    """
    keys = list(keys or ["cond_dropout"])
    cols = [*keys, "guidance_scale", "estimate", "over_samples", "per_seed"]
    sub = frame[frame["metric"] == metric]
    index = [*keys, "guidance_scale", "seed"]
    wide = sub.pivot_table(index=index, columns="prior", values="value")
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=cols)
    diff = (wide[a] - wide[b]).dropna()
    se_rows = frame[(frame["metric"] == f"diff_{metric}_se") & (frame["prior"] == b)]
    se = se_rows.set_index(index)["value"] if a == "self" and len(se_rows) else pd.Series(dtype=float)
    rows = []
    for cond, g in diff.groupby(level=[*keys, "guidance_scale"]):
        cond = cond if isinstance(cond, tuple) else (cond,)
        ses = se.reindex(g.index) if len(se) else pd.Series(np.nan, index=g.index)
        samples = pooled_over_samples(g.values, ses.values) if ses.notna().all() else None
        rows.append({**dict(zip([*keys, "guidance_scale"], cond, strict=True)), "estimate": mean_ci(g.values),
                     "over_samples": samples, "per_seed": g.values})  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def guided_advantage(
    frame: pd.DataFrame, metric: str, keys: list[str], a: str, b: str, higher_is_better: bool
) -> pd.DataFrame:
    """How much better prior=b did than prior=a at each guided scale (w ≠ 1, where the priors differ), paired
    over seeds: `paired_difference` a − b, negated (estimate, over_samples and per_seed) where higher is better,
    so that > 0 means b did better."""
    diffs = paired_difference(frame, metric, keys, a=a, b=b)
    diffs = diffs[diffs["guidance_scale"] != 1].copy()  # identical by construction: w = 1 never uses the prior
    if higher_is_better:
        diffs["estimate"] = diffs["estimate"].map(Estimate.negated)
        diffs["over_samples"] = diffs["over_samples"].map(lambda e: None if e is None else e.negated())
        diffs["per_seed"] = diffs["per_seed"].map(lambda v: -v)
    return diffs

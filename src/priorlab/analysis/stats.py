"""Means over seeds with 95% Student-t confidence intervals, and paired comparisons of the two priors."""

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
        if self.n < 2 or math.isnan(self.lo):
            return f"{self.mean:.3g} (n={self.n})"
        return f"{self.mean:.3g} [{self.lo:.3g}, {self.hi:.3g}]"

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.lo > 0 or self.hi < 0)


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


def paired_difference(frame: pd.DataFrame, metric: str, a: str = "self", b: str = "base") -> pd.DataFrame:
    """Per (cond_dropout, guidance_scale): the mean over seeds of metric(prior=a) − metric(prior=b), with CI."""
    sub = frame[frame["metric"] == metric]
    wide = sub.pivot_table(index=["cond_dropout", "guidance_scale", "seed"], columns="prior", values="value")
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=["cond_dropout", "guidance_scale", "estimate"])
    diff = (wide[a] - wide[b]).dropna()
    rows = [{"cond_dropout": p, "guidance_scale": w, "estimate": mean_ci(g.values)}
            for (p, w), g in diff.groupby(level=["cond_dropout", "guidance_scale"])]  # fmt: skip
    return pd.DataFrame(rows)

"""Means with 95% confidence intervals, and paired comparisons of two priors.

Two intervals answer two questions. Over seeds (Student-t on the per-seed values): what a new training run would
give; its width includes training noise, and with 3 seeds t = 4.30. Over samples (normal, from each run's
standard error over its generated samples, pooled over the runs): how precisely these trained models were
measured; it ignores training noise, so it says nothing about another run. A comparison of priors is paired in
both: identical seeds, labels and noise for every prior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from priorlab.keys import SELF


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

    @property
    def zero_width(self) -> bool:
        """Whether the interval has no width (up to rounding): every seed gave the same value, as a discrete metric
        can (one sample of 1500 at each seed). There is no spread to test against, so it is never evidence."""
        if self.n < 2 or math.isnan(self.lo) or math.isnan(self.hi):
            return False
        return self.hi - self.lo <= 1e-9 * max(abs(self.lo), abs(self.hi))

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
    with the interval pooled from each run's SE of the paired difference (`pair_se`) where the runs recorded it)
    and `per_seed` (the per-seed differences).
    """
    keys = list(keys or ["cond_dropout"])
    cols = [*keys, "guidance_scale", "estimate", "over_samples", "per_seed"]
    sub = frame[frame["metric"] == metric]
    index = [*keys, "guidance_scale", "seed"]
    wide = sub.pivot_table(index=index, columns="prior", values="value")
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=cols)
    diff = (wide[a] - wide[b]).dropna()
    se = pair_se(frame, metric, a, b, index)
    rows = []
    for cond, g in diff.groupby(level=[*keys, "guidance_scale"]):
        cond = cond if isinstance(cond, tuple) else (cond,)
        ses = se.reindex(g.index) if len(se) else pd.Series(np.nan, index=g.index)
        samples = pooled_over_samples(g.values, ses.values) if ses.notna().all() else None
        rows.append({**dict(zip([*keys, "guidance_scale"], cond, strict=True)), "estimate": mean_ci(g.values),
                     "over_samples": samples, "per_seed": g.values})  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def pair_se(frame: pd.DataFrame, metric: str, a: str, b: str, index: list[str]) -> pd.Series:
    """Each run's SE over samples of metric(a) − metric(b), indexed by `index`: `diff_<metric>_se` at prior=b where
    a is self, else `diff_<metric>_se_vs_<a>` at prior=b or `..._vs_<b>` at prior=a (the SE of a difference is that
    of its negation); empty where the runs did not record it."""
    candidates = [(f"diff_{metric}_se", other) for me, other in ((a, b), (b, a)) if me == SELF]
    candidates += [(f"diff_{metric}_se_vs_{a}", b), (f"diff_{metric}_se_vs_{b}", a)]
    for name, who in candidates:
        rows = frame[(frame["metric"] == name) & (frame["prior"] == who)]
        if len(rows):
            return rows.set_index(index)["value"]
    return pd.Series(dtype=float)


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


# What counts as a finding (issue 30): one rule, decided here for every comparison a report states.
ALPHA = 0.05
Z_975 = float(stats.norm.ppf(0.975))


def p_over_seeds(per_seed) -> float:
    """Two-sided p of the paired t-test that the per-seed differences have mean 0 (the test `mean_ci` inverts);
    nan with fewer than 2 seeds or a zero-width interval, where the test is undefined or meaningless."""
    d = np.asarray(list(per_seed), dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2 or mean_ci(d).zero_width:
        return float("nan")
    return float(stats.ttest_1samp(d, 0.0).pvalue)


def p_over_samples(e: Estimate | None) -> float:
    """Two-sided p of the normal test that `pooled_over_samples` inverts: z = mean / SE, with SE its half-width over
    z_.975; nan where it was not recorded or has zero width."""
    if e is None or e.n == 0 or math.isnan(e.lo) or e.zero_width or not e.hi - e.lo > 0:  # one run with SE 0 too
        return float("nan")
    return float(2 * stats.norm.sf(abs(e.mean) / ((e.hi - e.lo) / (2 * Z_975))))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the given order: the i-th smallest p times (m − i + 1), made monotone.
    A nan p (no test) still counts among the m hypotheses, as p = 1, and stays nan."""
    p = np.array([1.0 if math.isnan(x) else x for x in pvalues], dtype=float)
    adjusted, running = np.empty(len(p)), 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (len(p) - rank) * p[i]))
        adjusted[i] = running
    return [float("nan") if math.isnan(x) else float(a) for x, a in zip(pvalues, adjusted, strict=True)]


@dataclass(frozen=True)
class Verdict:
    """Whether one paired difference is a finding. `primary`: judged alone by both 95% intervals (the study's
    primary scale, or a single comparison such as the best over scales); otherwise by Holm-adjusted p-values over
    the secondary scales of its (condition, comparison, metric). `why_not` is empty for a finding."""

    primary: bool
    p_seeds: float
    p_samples: float
    adj_seeds: float  # Holm-adjusted (the unadjusted p at a primary scale)
    adj_samples: float
    why_not: str

    @property
    def finding(self) -> bool:
        return not self.why_not


def judge(estimate: Estimate, over_samples: Estimate | None, per_seed, primary: bool = True,
          adjusted: tuple[float, float] | None = None) -> Verdict:  # fmt: skip
    """The verdict on one difference: `estimate` over seeds, `over_samples` (None: not recorded), the per-seed
    differences. A secondary difference needs its Holm-adjusted p-values (`adjusted`, over seeds and samples)."""
    p_seeds, p_samples = p_over_seeds(per_seed), p_over_samples(over_samples)
    adj_seeds, adj_samples = (p_seeds, p_samples) if primary or adjusted is None else adjusted
    if estimate.n < 2:
        why = "fewer than 2 seeds"
    elif estimate.zero_width:
        why = "zero-width interval over seeds"
    elif over_samples is None or over_samples.n == 0:
        why = "over samples not recorded"
    elif over_samples.zero_width:
        why = "zero-width interval over samples"
    elif primary and not estimate.excludes_zero:
        why = "interval over seeds holds 0"
    elif primary:
        why = "" if over_samples.excludes_zero else "interval over samples holds 0"
    elif not adj_seeds < ALPHA:
        why = f"Holm p over seeds {adj_seeds:.2g}"
    else:
        why = "" if adj_samples < ALPHA else f"Holm p over samples {adj_samples:.2g}"
    return Verdict(primary, p_seeds, p_samples, adj_seeds, adj_samples, why)


def judge_scales(rows: pd.DataFrame, primary_scale: float | None) -> list[Verdict]:
    """The verdicts of one family, the guided scales of one (condition, comparison, metric) in `rows` (columns
    guidance_scale, estimate, over_samples, per_seed), in row order: the primary scale (if among them) alone by
    both intervals, the others by Holm's correction across them, over seeds and over samples separately."""
    primary = [primary_scale is not None and math.isclose(w, primary_scale) for w in rows["guidance_scale"]]
    secondary = [i for i, is_primary in enumerate(primary) if not is_primary]
    adjusted: dict[int, tuple[float, float]] = {}
    seeds = holm([p_over_seeds(rows["per_seed"].iloc[i]) for i in secondary])
    samples = holm([p_over_samples(rows["over_samples"].iloc[i]) for i in secondary])
    for i, a, b in zip(secondary, seeds, samples, strict=True):
        adjusted[i] = (a, b)
    return [judge(r["estimate"], r["over_samples"], r["per_seed"], primary[i], adjusted.get(i))
            for i, (_, r) in enumerate(rows.iterrows())]  # fmt: skip


def with_verdicts(diffs: pd.DataFrame, keys: list[str], primary_scale: float | None) -> pd.DataFrame:
    """`diffs` (rows of `guided_advantage`, one comparison and metric) with a `verdict` column, each condition
    (`keys`) a family of its own."""
    out = diffs.copy()
    verdicts: dict = {}
    if len(out):
        for _, g in out.groupby(keys, sort=False):
            verdicts.update(zip(g.index, judge_scales(g, primary_scale), strict=True))
    out["verdict"] = pd.Series(verdicts, index=out.index, dtype=object)
    return out

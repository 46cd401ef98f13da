"""What counts as a finding (issue 30): one rule for the report's statements, the extra priors' and the best over
scales, on built cases whose p-values and intervals are known by hand."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from priorlab.analysis.stats import Estimate, holm, judge, judge_scales, mean_ci, p_over_samples


def _rows_of(per_seed: dict[float, list[float]], samples: dict[float, Estimate | None]) -> pd.DataFrame:
    return pd.DataFrame([{"guidance_scale": w, "estimate": mean_ci(d), "over_samples": samples[w],
                          "per_seed": np.array(d)} for w, d in per_seed.items()])  # fmt: skip


def _with_p(p: float) -> list[float]:
    """3 per-seed differences whose two-sided paired t-test gives p: m + (−1, 0, 1) has sd 1, so t = m·√3."""
    m = stats.t.isf(p / 2, 2) / math.sqrt(3)
    return [m - 1, m, m + 1]


def test_at_the_primary_scale_both_intervals_must_exclude_zero():
    per_seed = [1.0, 1.2, 0.9]
    far = Estimate(1.03, 0.9, 1.16, 3)
    rows = _rows_of({2.0: per_seed, 4.0: per_seed}, {2.0: far, 4.0: far})
    primary, secondary = judge_scales(rows, primary_scale=2.0)
    assert primary.primary and primary.finding and primary.adj_seeds == primary.p_seeds  # alone: no adjustment
    assert not secondary.primary
    # the interval over seeds excludes 0 but the one over samples does not: no finding
    wide = Estimate(1.03, -0.1, 2.16, 3)
    verdict = judge(mean_ci(per_seed), wide, per_seed, primary=True)
    assert mean_ci(per_seed).excludes_zero and not verdict.finding
    assert verdict.why_not == "interval over samples holds 0"
    assert judge(mean_ci(per_seed), None, per_seed).why_not == "over samples not recorded"
    # and the reverse: over samples alone is no finding either
    noisy = [2.0, -1.0, 0.5]
    assert judge(mean_ci(noisy), far, noisy).why_not == "interval over seeds holds 0"
    # a primary scale that was not evaluated leaves every scale secondary
    assert not any(v.primary for v in judge_scales(rows, primary_scale=3.0))


def test_secondary_scales_are_holm_corrected_over_seeds_and_over_samples_separately():
    assert holm([0.03, 0.001, 0.5]) == pytest.approx([0.06, 0.003, 0.5])
    assert holm([0.01, math.nan, 0.02]) == pytest.approx([0.03, math.nan, 0.04], nan_ok=True)  # nan counts as p = 1
    seeds = {2.0: _with_p(0.001), 3.0: _with_p(0.03), 4.0: _with_p(0.5)}
    assert [stats.ttest_1samp(d, 0).pvalue for d in seeds.values()] == pytest.approx([0.001, 0.03, 0.5])
    sharp = {w: Estimate(np.mean(d), np.mean(d) - 0.01, np.mean(d) + 0.01, 3) for w, d in seeds.items()}
    verdicts = judge_scales(_rows_of(seeds, sharp), primary_scale=None)
    assert [v.adj_seeds for v in verdicts] == pytest.approx([0.003, 0.06, 0.5])
    assert [v.finding for v in verdicts] == [True, False, False]
    assert mean_ci(seeds[3.0]).excludes_zero  # p = 0.03 alone would have been stated
    assert verdicts[1].why_not == "Holm p over seeds 0.06"
    # over samples: p = 0.03 at each of three scales, adjusted to 0.09 each, withholds even sharp seed intervals
    z = stats.norm.isf(0.015)
    half = stats.norm.ppf(0.975)  # SE 1
    borderline = {w: Estimate(z, z - half, z + half, 3) for w in seeds}  # a normal test p of 0.03 each
    assert p_over_samples(borderline[2.0]) == pytest.approx(0.03)
    strong = {w: [5.0, 5.1, 4.9] for w in seeds}
    verdicts = judge_scales(_rows_of(strong, borderline), primary_scale=None)
    assert [v.adj_samples for v in verdicts] == pytest.approx([0.09, 0.09, 0.09])
    assert not any(v.finding for v in verdicts) and verdicts[0].why_not == "Holm p over samples 0.09"

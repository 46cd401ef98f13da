"""What counts as a finding (issue 30): one rule for the report's statements, the extra priors' and the best over
scales, on built cases whose p-values and intervals are known by hand."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from priorlab.analysis.findings import benefits, findings, statements, summary
from priorlab.analysis.other_priors import extra_prior_lines
from priorlab.analysis.stats import Estimate, holm, judge, judge_scales, mean_ci, p_over_samples
from priorlab.analysis.text import interval
from priorlab.analysis.validity import check_study

SEEDS = (0, 1, 2)


def _row(run, seed, prior, w, metric, value):
    return {"run": run, "cond_dropout": 0.1, "seed": seed, "step": 10, "prior": prior, "guidance_scale": w,
            "metric": metric, "value": value}  # fmt: skip


def _accuracy_study(diff_se: float = 1 / 1500) -> pd.DataFrame:
    """One condition, 3 seeds, w = 1, 2: FD where guidance pays (and the priors differ by noise), and accuracy
    over 1500 samples where prior=self got exactly one more sample right than prior=base at w = 2 at every seed;
    each run's SE of the paired accuracy difference `diff_se`."""
    rows = []
    for s in SEEDS:
        run = f"finetune/p=0.1/seed={s}"
        for w, fd_self, fd_base in ((1.0, 6.0 + 0.3 * s, 6.0 + 0.3 * s), (2.0, 4.0 + 0.2 * s, 4.1 - 0.15 * s)):
            rows += [_row(run, s, "self", w, "fd", fd_self), _row(run, s, "base", w, "fd", fd_base)]
        right = 1470 + s  # of 1500
        for w, extra in ((1.0, 0), (2.0, 1)):
            rows += [_row(run, s, "self", w, "accuracy", (right + extra) / 1500),
                     _row(run, s, "base", w, "accuracy", right / 1500)]  # fmt: skip
        rows += [_row(run, s, "base", 2.0, "diff_accuracy_se", diff_se), _row(run, s, "", np.nan, "num_classes", 10.0)]
    return pd.DataFrame(rows)


def test_a_zero_width_interval_over_seeds_is_never_a_finding(tmp_path):
    """The case of issue 30: the base prior 'hurt' accuracy at w = 2 by exactly 1 sample in 1500 at each of 3 seeds,
    an interval over seeds of zero width; over samples [−0.00142, 0.0000877]. No finding, at a secondary scale or
    at the primary one."""
    frame = _accuracy_study()
    row = benefits(frame, "accuracy").iloc[0]
    assert str(row["estimate"]) == "-0.000667 [-0.000667, -0.000667]" and row["estimate"].zero_width
    assert row["estimate"].excludes_zero  # the geometry the old rule went by
    assert interval(row["over_samples"]) == "[-0.00142, 8.77e-05]"
    assert not row["verdict"].finding and row["verdict"].why_not == "zero-width interval over seeds"
    assert math.isnan(row["verdict"].p_seeds)
    validity = check_study(tmp_path, frame)
    assert validity.valid((0.1,)) and validity.guidance_pays((0.1,)) is True
    for primary in (None, 2.0):
        lines, table = findings(frame, validity, "accuracy", primary)
        text = "\n".join(lines)
        assert "hurts" not in text and "helps" not in text
        assert "**p=0.1**: no difference between the priors is a finding" in text
        assert "w=2: -0.000667 [-0.000667, -0.000667] (zero-width interval over seeds)" in text
        assert list(table["finding"]) == ["no (zero-width interval over seeds)"]
        assert "shows no difference in 1 (p=0.1)" in summary(frame, validity, "accuracy", primary)[0]
        assert "It hurts" not in statements(frame, "accuracy", primary)[0]
    # a nonzero spread of the same size would be tested: the zero-width rule, not the mean, withholds it
    assert not mean_ci([-1 / 1500, -1 / 1500, -1.0001 / 1500]).zero_width


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
    assert math.isnan(p_over_samples(Estimate(0.0, 0.0, 0.0, 1)))  # one run whose samples all agreed: no test
    strong = {w: [5.0, 5.1, 4.9] for w in seeds}
    verdicts = judge_scales(_rows_of(strong, borderline), primary_scale=None)
    assert [v.adj_samples for v in verdicts] == pytest.approx([0.09, 0.09, 0.09])
    assert not any(v.finding for v in verdicts) and verdicts[0].why_not == "Holm p over samples 0.09"


def test_build_report_reads_the_primary_scale_and_states_the_rule(tmp_path):
    from priorlab.analysis.report import build_report

    study = tmp_path / "study"
    study.mkdir()
    frame = _accuracy_study()
    for s in SEEDS:  # FD's SE of the paired difference, so that FD's differences have an interval over samples
        frame.loc[len(frame)] = _row(f"finetune/p=0.1/seed={s}", s, "base", 2.0, "diff_fd_se", 0.05)
    frame.to_csv(study / "results.csv", index=False)
    (study / "study.json").write_text(json.dumps({"name": "t", "preset": "p", "primary_scale": 2.0}))
    report = build_report(study).read_text()
    assert "The primary guidance scale is w=2; the other guided scales are secondary." in report
    assert "at the study's primary guidance scale, w=2 (`primary_scale` in study.json), both 95% intervals" in report
    assert "| p=0.1 | 2 (primary) | -0.000667 [-0.000667, -0.000667] |" in report
    assert "hurts" not in report.split("## Headline")[0]
    (study / "study.json").write_text(json.dumps({"name": "t", "preset": "p", "primary_scale": 3.0}))
    report = build_report(study).read_text()
    assert "The declared primary scale w=3 was not evaluated, so every guided scale is secondary." in report
    (study / "study.json").write_text(json.dumps({"name": "t", "preset": "p", "primary_scale": "2"}))
    from priorlab.errors import UserError

    with pytest.raises(UserError, match="primary_scale"):
        build_report(study)


def test_extra_prior_differences_without_an_interval_over_samples_are_no_findings(tmp_path):
    """Against prior=base no SE over samples is recorded: a difference whose interval over seeds excludes 0 is
    stated as no finding, and says why; against self (SE recorded) the same rule finds it."""
    rows = []
    for s in SEEDS:
        run = f"finetune/p=0.1/seed={s}"
        for prior, fd2 in (("self", 5.0 + 0.1 * s), ("base", 4.0 + 0.05 * s), ("small", 3.5 + 0.08 * s)):
            rows += [_row(run, s, prior, 1.0, "fd", 6.0 + s), _row(run, s, prior, 2.0, "fd", fd2)]
            rows += [_row(run, s, prior, w, "accuracy", 0.97) for w in (1.0, 2.0)]
        rows += [_row(run, s, "small", 2.0, "diff_fd_se", 0.02), _row(run, s, "base", 2.0, "diff_fd_se", 0.02),
                 _row(run, s, "", np.nan, "num_classes", 10.0)]  # fmt: skip
    frame = pd.DataFrame(rows)
    text = "\n".join(extra_prior_lines(frame, check_study(tmp_path, frame), "fd"))
    assert "  - against prior=self: better at w=2: 1.52 [" in text
    assert "  - against prior=base: no finding, although the interval over seeds excludes 0 at w=2: 0.47 [" in text
    assert "(over samples not recorded)" in text
    assert "| p=0.1 | base | 2 | 0.47 [" in text and "no (over samples not recorded)" in text


def _two_bases() -> pd.DataFrame:
    """Two conditions (base_name broad, narrow; p = 0.1), 3 seeds, FD at w = 1, 2 (prior=base about 0.5 lower at
    w = 2, SE of the paired difference 0.05): guidance pays with the broad base (FD falls ~2 at w = 2), not the
    narrow."""
    rows = []
    for name, fd1, fd2 in (("broad", 5.0, 3.0), ("narrow", 3.0, 4.0)):
        for s in SEEDS:
            run = f"finetune/base={name}/p=0.1/seed={s}"
            for w, fd in ((1.0, fd1 + 0.1 * s), (2.0, fd2 + 0.15 * s)):
                base = fd - (0.5 - 0.01 * s) * (w != 1)  # w = 1 never uses the prior: the same value
                rows += [_row(run, s, "self", w, "fd", fd), _row(run, s, "base", w, "fd", base)]
                rows += [_row(run, s, prior, w, "accuracy", 0.97) for prior in ("self", "base")]
            rows += [_row(run, s, "base", 2.0, "diff_fd_se", 0.05), _row(run, s, "", np.nan, "num_classes", 10.0)]
    frame = pd.DataFrame(rows)
    frame.insert(1, "base_name", frame["run"].str.split("/").str[1].str.removeprefix("base="))
    return frame


def test_where_guidance_does_not_pay_the_best_over_scales_is_no_finding_and_findings_carry_the_caveat(tmp_path):
    from priorlab.analysis.report import build_report, headline

    frame = _two_bases()
    validity = check_study(tmp_path, frame, main={"base_name": ["broad"]})
    assert validity.guidance_pays(("broad", 0.1)) is True and validity.guidance_pays(("narrow", 0.1)) is False
    table = headline(frame, "fd", validity=validity).set_index("base_name")
    assert table.loc["narrow", "Δ best a finding"] == "no (guidance does not pay)"
    assert table.loc["broad", "Δ best a finding"] == "yes"  # both best at w=2 at every seed: SE recorded there
    lines, by_scale = findings(frame, validity, "fd")
    assert "guidance does not pay in this condition" in next(x for x in lines if "base_name=narrow" in x)
    assert "guidance does not pay" not in next(x for x in lines if "base_name=broad" in x)
    assert set(by_scale.loc[by_scale["condition"].str.contains("narrow"), "conclusive"]) == {
        "yes, but guidance does not pay here"
    }
    assert "Caveat: guidance does not pay in 1 of them (base_name=narrow, p=0.1)" in summary(frame, validity, "fd")[0]
    study = tmp_path / "study"
    study.mkdir()
    frame.to_csv(study / "results.csv", index=False)
    (study / "study.json").write_text(json.dumps({"name": "t", "preset": "p", "main": {"base_name": ["broad"]}}))
    report = build_report(study).read_text()
    assert "| guidance pays (prior=self, main conditions) | 1 of 1 main conditions pass" in report
    assert "- **base_name=narrow, p=0.1**: this condition is outside the regime where guidance pays" in report
    assert report.count("outside the regime where guidance pays") == 2  # the validity section and the headline

"""The swap's findings: per condition and guided scale, whether prior=base did better than the fine-tune's own ∅
branch, judged by the one rule of what counts as a finding (`stats.judge_scales`), and the report's text on them."""

from __future__ import annotations

import math

import pandas as pd

from priorlab.analysis.results import final_rows
from priorlab.analysis.stats import guided_advantage, with_verdicts
from priorlab.analysis.text import cond_label, fmt_p, interval
from priorlab.analysis.validity import CAVEAT, NO_GAIN, OUTSIDE_REGIME, Validity, condition_keys, power_estimate

HIGHER_IS_BETTER = {"accuracy", "precision", "recall"}
BENEFIT_NOTE = "Benefit > 0: prior=base did better than the fine-tune's own ∅ branch (prior=self)."
DETECTABLE_NOTE = (
    '"Detectable (80% power)" is the smallest benefit a paired t-test over these seeds finds with 80% power '
    "(two-sided 5%), from the spread of the per-seed benefits."
)


def rule_note(primary_scale: float | None, guided: list[float]) -> str:
    """What counts as a finding in this study: the primary scale (study.json's `primary_scale`, where it is one of
    the `guided` scales evaluated) by both intervals, every other guided scale by Holm-adjusted p-values."""
    holm = ("the p-values of a two-sided paired t-test over seeds and of a two-sided normal test over samples (from "
            "the pooled mean and its standard error) are each Holm-adjusted across the secondary scales of one "
            "condition, comparison and metric, and both adjusted p must be < 0.05")  # fmt: skip
    if primary_scale is not None and any(math.isclose(primary_scale, w) for w in guided):
        head = (f"**What counts as a finding**: at the study's primary guidance scale, w={primary_scale:g} "
                "(`primary_scale` in study.json), both 95% intervals, over seeds and over samples, must exclude 0. "
                f"At every other guided scale (secondary), {holm}.")  # fmt: skip
    else:
        declared = ("declares no primary guidance scale (`primary_scale` in study.json)" if primary_scale is None else
                    f"declares w={primary_scale:g} its primary guidance scale but did not evaluate it")  # fmt: skip
        head = f"**What counts as a finding**: this study {declared}, so every guided scale is secondary: {holm}."
    return (f"{head} A zero-width interval over seeds (every seed differed by the same amount, as a discrete metric "
            "can; likewise an SE of 0 over samples) is never a finding, whatever its mean; nor is a difference whose "
            "interval over samples was not recorded. Only a condition that passed its validity checks states "
            "findings.")  # fmt: skip


def benefits(frame: pd.DataFrame, metric: str, primary_scale: float | None = None) -> pd.DataFrame:
    """The swap's benefit per condition and w ≠ 1, signed so that > 0 means prior=base did better: metric(self) −
    metric(base) for lower-is-better metrics, the reverse for accuracy, precision and recall. Columns of
    `paired_difference` plus `verdict` (`stats.Verdict`, each condition a family) and `mde`, the smallest benefit
    3+ seeds detect with 80% power (over seeds)."""
    keys = condition_keys(frame)
    diffs = guided_advantage(final_rows(frame), metric, keys, "self", "base", metric in HIGHER_IS_BETTER)
    diffs = with_verdicts(diffs, keys, primary_scale)
    diffs["mde"] = diffs["per_seed"].map(power_estimate)
    return diffs


def _fmt_w(w: float) -> str:
    return f"{w:g}"


def scale_text(row) -> str:
    """One difference as the findings state it: `w=2 (primary): +1.2 [0.8, 1.6], over samples [1.1, 1.3]`, or at a
    secondary scale `w=4: +3.2 [2.1, 4.2] (Holm p 0.012, 0.0003)` (over seeds, over samples)."""
    est, v = row["estimate"], row["verdict"]
    head = f"w={_fmt_w(row['guidance_scale'])}{' (primary)' if v.primary else ''}: {'+' if est.mean > 0 else ''}{est}"
    if v.primary:
        return f"{head}, over samples {interval(row['over_samples'])}"
    return f"{head} (Holm p {fmt_p(v.adj_seeds)}, {fmt_p(v.adj_samples)})"


def direction(means: list[float]) -> str:
    """What a condition's findings say: helps, hurts, or both by scale (none: shows no difference)."""
    if not means:
        return "shows no difference"
    return "helps" if min(means) > 0 else "hurts" if max(means) < 0 else "helps at some scales and hurts at others"


def statements(frame: pd.DataFrame, metric: str = "fd", primary_scale: float | None = None) -> list[str]:
    """One sentence per condition: where the base prior helps or hurts (findings), and where not (with why)."""
    keys = condition_keys(frame)
    out = []
    for cond, g in benefits(frame, metric, primary_scale).groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        rows = [r for _, r in g.sort_values("guidance_scale").iterrows()]
        helps = [scale_text(r) for r in rows if r["verdict"].finding and r["estimate"].mean > 0]
        hurts = [scale_text(r) for r in rows if r["verdict"].finding and r["estimate"].mean < 0]
        rest = [f"w={_fmt_w(r['guidance_scale'])} ({r['verdict'].why_not})" for r in rows if not r["verdict"].finding]
        n = int(g["estimate"].iloc[0].n) if len(g) else 0
        parts = [f"**{cond_label(keys, cond)}** ({n} seeds; the swap's benefit in {metric.upper()}, mean [95% CI "
                 "over seeds], > 0: prior=base better):"]  # fmt: skip
        parts.append(f"the base prior helps at {'; '.join(helps)}." if helps else "the base prior helps at no scale.")
        if hurts:
            parts.append(f"It hurts at {'; '.join(hurts)}.")
        if rest:
            parts.append(f"No finding at {'; '.join(rest)}.")
        out.append(" ".join(parts))
    return out


def summary(frame: pd.DataFrame, validity: Validity, metric: str, primary_scale: float | None = None) -> list[str]:
    """One line counting the valid conditions where the base prior helps at every scale with a finding, hurts, or
    shows no difference, naming them; with the caveat for those where guidance does not pay."""
    keys = condition_keys(frame)
    groups: dict[str, list[str]] = {"helps": [], "hurts": [], "helps at some scales and hurts at others": [],
                                    "shows no difference": []}  # fmt: skip
    outside = []
    for cond, g in benefits(frame, metric, primary_scale).groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        if not validity.valid(cond):
            continue
        groups[direction([r["estimate"].mean for _, r in g.iterrows() if r["verdict"].finding])].append(
            cond_label(keys, cond)
        )
        if validity.guidance_pays(cond) is False:
            outside.append(cond_label(keys, cond))
    total = sum(len(v) for v in groups.values())
    if not total:
        return []
    parts = [f"{kind} in {len(v)} ({'; '.join(v)})" for kind, v in groups.items() if v]
    line = f"**Summary over the {total} conditions that passed**: the base prior {', '.join(parts)}."
    if outside:
        which = ("pays in none of them" if len(outside) == total else
                 f"does not pay in {len(outside)} of them ({'; '.join(outside)})")  # fmt: skip
        line += (f" Caveat: guidance {which} (see Validity), so their comparisons of priors are at guidance scales "
                 "that do not improve FD.")  # fmt: skip
    return [line, ""]


def findings(
    frame: pd.DataFrame, validity: Validity, metric: str, primary_scale: float | None = None
) -> tuple[list[str], pd.DataFrame]:
    """The statements a valid condition supports, and the table of every benefit with both intervals, the
    Holm-adjusted p-values, the smallest detectable benefit and the verdict. Invalid conditions get one line saying
    why nothing is concluded there."""
    keys = condition_keys(frame)
    table, lines = [], []
    for cond, g in benefits(frame, metric, primary_scale).groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        label = cond_label(keys, cond)
        valid, pays = validity.valid(cond), validity.guidance_pays(cond)
        g = g.sort_values("guidance_scale")
        table += [_table_row(label, r, valid, pays) for _, r in g.iterrows()]
        if not valid:
            lines.append(f"**{label}**: no conclusion ({why_not(validity, cond)}).")
            continue
        lines += _condition_lines(label, g, metric, pays)
    return lines, pd.DataFrame(table)


def _table_row(label: str, r, valid: bool, pays: bool | None) -> dict:
    v = r["verdict"]
    conclusive = "no (validity)" if not valid else "yes, but guidance does not pay here" if pays is False else "yes"
    return {"condition": label, "w": _fmt_w(r["guidance_scale"]) + (" (primary)" if v.primary else ""),
            "benefit [CI over seeds]": str(r["estimate"]), "[CI over samples]": interval(r["over_samples"]),
            "Holm p: seeds, samples": "—" if v.primary else f"{fmt_p(v.adj_seeds)}, {fmt_p(v.adj_samples)}",
            "detectable (80% power)": f"{r['mde']:.3g}" if not math.isnan(r["mde"]) else "—",
            "finding": "yes" if v.finding else f"no ({v.why_not})", "conclusive": conclusive}  # fmt: skip


def _condition_lines(label: str, g: pd.DataFrame, metric: str, pays: bool | None) -> list[str]:
    """A valid condition's statement: its findings (or none, with the power to see one), then the differences
    whose interval over seeds excludes 0 but which are no finding, and those seen over samples only."""
    rows = [r for _, r in g.iterrows()]
    found = [r for r in rows if r["verdict"].finding]
    caveat = f" Caveat: {CAVEAT}." if pays is False else ""
    if found:
        verb = direction([r["estimate"].mean for r in found])
        verb = "helps or hurts by scale" if verb.startswith("helps at some") else verb
        n, at = int(g["estimate"].iloc[0].n), "; ".join(scale_text(r) for r in found)
        line = (f"**{label}**: the base prior {verb} ({metric.upper()}, > 0: better with the base; mean [95% CI over "
                f"{n} seeds], at a secondary scale with its Holm p over seeds, over samples) at {at}."
                + caveat)  # fmt: skip
    else:
        mde = g["mde"].dropna()
        power = f"; with these seeds a benefit below {mde.median():.3g} (median over w) would go unseen"
        power = power if len(mde) else ""
        line = f"**{label}**: no difference between the priors is a finding{power}.{caveat}"
    out = [line]
    missed = [r for r in rows if not r["verdict"].finding and r["estimate"].excludes_zero]
    if missed:
        each = [f"w={_fmt_w(r['guidance_scale'])}: {r['estimate']} ({r['verdict'].why_not})" for r in missed]
        out.append(f"  - no finding although the interval over seeds excludes 0: {'; '.join(each)}.")
    samples_only = [r for r in rows if not r["estimate"].excludes_zero and r["over_samples"] is not None
                    and r["over_samples"].excludes_zero]  # fmt: skip
    if samples_only:
        ws = ", ".join(_fmt_w(r["guidance_scale"]) for r in samples_only)
        out.append(f"  - at w={ws} the interval over samples excludes 0 but the one over seeds does not: a "
                   "difference of these trained models, not shown to survive another training run.")  # fmt: skip
    return out


def why_not(validity: Validity, cond: tuple) -> str:
    """Why a condition states no conclusion: the validity checks it failed."""
    reasons = [] if validity.study_valid else ["the base did not converge"]
    rows = validity.conditions[validity.conditions["condition"] == cond]
    if rows.empty:
        return "; ".join(reasons) or "not evaluated"
    row = rows.iloc[0]
    if not row["learned"]:
        extra = f", excess NLL {row['nll_excess']:.2f} nats" if not math.isnan(row["nll_excess"]) else ""
        reasons.append(f"the fine-tunes did not learn their conditions: accuracy {row['accuracy']:.3f}, chance "
                       f"{row['chance']:.3f}{extra}")  # fmt: skip
    if not row["enough_seeds"]:
        reasons.append(f"{row['seeds']} seeds, fewer than needed")
    return "; ".join(reasons)


def regime_lines(validity: Validity) -> list[str]:
    """The plain statement, for the validity section and beside the headline, of where guidance does not pay."""
    outside = validity.outside_regime()
    if not outside:
        return []
    if len(outside) == len(validity.conditions):
        return [f"- **This study is {OUTSIDE_REGIME}, in every condition**: {NO_GAIN}. Its best over guidance "
                "scales (Δ best) is no finding anywhere, and every per-scale finding carries this caveat."]  # fmt: skip
    labels = "; ".join(cond_label(validity.keys, c) for c in outside)
    return [f"- **{labels}**: {'this condition is' if len(outside) == 1 else 'these conditions are'} {OUTSIDE_REGIME}: "
            f"{NO_GAIN}. There the best over guidance scales (Δ best) is no finding, and the per-scale findings carry "
            "this caveat."]  # fmt: skip

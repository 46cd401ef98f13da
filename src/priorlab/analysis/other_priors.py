"""The report's section on extra priors (`extra_priors`, e.g. a smaller base as a cheap prior; issue 17) and on
prior=distilled (a guidance-distilled fine-tune's one pass; issue 33): each one against the fine-tune's own ∅ branch
and against the full-size base, paired over seeds, with its sampling time.
What counts as a finding is the report's one rule (`stats.judge_scales`), each (condition, comparison, metric) a
family. Studies run before the evaluation recorded the SE of every two priors' difference have no interval over
samples against the base, so there no difference from the base is a finding."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from priorlab.analysis.results import extra_priors, final_rows
from priorlab.analysis.stats import guided_advantage, pair_se, with_verdicts
from priorlab.analysis.text import cond_label, fmt_p, interval, markdown_table
from priorlab.analysis.validity import CAVEAT, LOWER_IS_BETTER, Validity, condition_keys
from priorlab.priors.modes import DISTILLED

COMPARED = ("self", "base")  # what each extra prior is compared with


def extra_prior_names(frame: pd.DataFrame) -> list[str]:
    """The priors of the results compared with self and base, a section each: the study's extra priors (none of the
    built-in modes), then prior=distilled (a guidance-distilled fine-tune's one pass at w, `guidance_distill`)."""
    final = final_rows(frame)
    fd = final[final["metric"] == "fd"]
    return [*extra_priors(fd), *([DISTILLED] if (fd["prior"] == DISTILLED).any() else [])]


def _what(name: str) -> str:
    """What prior `name` is, for its section's title and first sentence."""
    if name == DISTILLED:
        return (f"prior={name} is the fine-tune's own single pass at w, trained to give the base-guided "
                "prediction (`guidance_distill`): against prior=base at the same w it says what one network per step "
                "costs")  # fmt: skip
    return f"prior={name} is another network in the base's place (`extra_priors`)"


def advantage(frame: pd.DataFrame, metric: str, other: str, name: str) -> pd.DataFrame:
    """Per condition and guided scale: how much better prior=`name` did than prior=`other` in `metric`, paired
    over seeds (> 0: `name` better), with the interval over samples where the runs recorded its SE."""
    return guided_advantage(final_rows(frame), metric, condition_keys(frame), other, name,
                            metric not in LOWER_IS_BETTER)  # fmt: skip


def time_ratios(frame: pd.DataFrame, name: str) -> dict[str, float]:
    """The median over runs and guided scales of prior=`name`'s sampling time over that of self and of base."""
    final = final_rows(frame)
    sub = final[(final["metric"] == "sample_seconds") & (final["guidance_scale"] != 1)]
    wide = sub.pivot_table(index=["run", "guidance_scale"], columns="prior", values="value")
    out = {}
    for other in COMPARED:
        if name in wide and other in wide:
            ratio = (wide[name] / wide[other]).dropna()
            out[other] = float(np.median(ratio)) if len(ratio) else math.nan
    return out


def null_losses(frame: pd.DataFrame, name: str) -> dict[str, float]:
    """The held-out ∅ loss over all timesteps of self, base and prior `name`, each the mean over the fine-tunes'
    final evaluations (the prior-quality measures)."""
    final = final_rows(frame)
    sub = final[final["metric"] == "loss/all"]
    return {who: float(sub.loc[sub["prior"] == who, "value"].mean()) for who in (*COMPARED, name)
            if (sub["prior"] == who).any()}  # fmt: skip


def _of(rows: pd.DataFrame, keys: list[str], cond: tuple) -> pd.DataFrame:
    """The rows of one condition."""
    return rows[(rows[keys] == pd.Series(dict(zip(keys, cond, strict=True)))).all(axis=1)]


def _verdict(rows: pd.DataFrame) -> str:
    """What the findings against one prior say (rows with a `verdict`), naming the differences whose interval over
    seeds excludes 0 but which are no finding, with why."""
    found = [r for _, r in rows.iterrows() if r["verdict"].finding]
    missed = [r for _, r in rows.iterrows() if not r["verdict"].finding and r["estimate"].excludes_zero]
    better = [_scale(r) for r in found if r["estimate"].mean > 0]
    worse = [_scale(r) for r in found if r["estimate"].mean < 0]
    parts = [f"better at {'; '.join(better)}"] if better else []
    parts += [f"worse at {'; '.join(worse)}"] if worse else []
    although = f"although the interval over seeds excludes 0 at {'; '.join(map(_missed, missed))}" if missed else ""
    if not parts:
        return f"no finding, {although}" if missed else "no finding"
    return ", ".join(parts) + (f"; no finding {although}" if missed else "")


def _scale(r) -> str:
    return f"w={r['guidance_scale']:g}{' (primary)' if r['verdict'].primary else ''}: {r['estimate']}"


def _missed(r) -> str:
    return f"{_scale(r)} ({r['verdict'].why_not})"


def _table_row(label: str, other: str, r, acc: pd.Series, unit: str, valid: bool) -> dict:
    """One row of an extra prior's table: both intervals, the Holm-adjusted p-values, the verdict."""
    w, v = r["guidance_scale"], r["verdict"]
    return {"condition": label, "against": other, "w": f"{w:g}" + (" (primary)" if v.primary else ""),
            f"{unit} advantage": str(r["estimate"]),
            "[CI over samples]": interval(r["over_samples"]),
            "Holm p: seeds, samples": "—" if v.primary else f"{fmt_p(v.adj_seeds)}, {fmt_p(v.adj_samples)}",
            "finding": "yes" if v.finding else f"no ({v.why_not})",
            "accuracy advantage": str(acc[w]) if w in acc.index else "—",
            "conclusive": "yes" if valid else "no (validity)"}  # fmt: skip


def base_recorded(frame: pd.DataFrame, metric: str, name: str) -> bool:
    """Whether the runs recorded the SE over samples of base − `name` (`stats.pair_se`): evaluations since the one
    that records it for every two priors."""
    index = ["run", "guidance_scale"]
    return not pair_se(final_rows(frame), metric, "base", name, index).empty


def _intro(frame: pd.DataFrame, metric: str, name: str) -> str:
    """The paragraph before an extra prior's statements: what counts, its sampling time and its ∅ loss."""
    ratios = time_ratios(frame, name)
    timing = ", ".join(f"{ratios[o]:.2f}× prior={o}'s" for o in COMPARED if not math.isnan(ratios.get(o, math.nan)))
    losses = null_losses(frame, name)
    loss_text = ", ".join(f"{who} {value:.4g}" for who, value in losses.items())
    return (f"{_what(name)}. Advantage > 0: prior={name} did better (lower {metric.upper()}, higher accuracy); "
            "mean [95% CI over seeds], paired. A finding "
            "follows the rule stated for the swap's findings (both intervals at the primary scale, Holm-adjusted p "
            "over seeds and over samples at the secondary ones) and needs its condition to pass the validity checks."
            + ("" if base_recorded(frame, metric, name) else " Against prior=base these runs recorded no "
               "interval over samples, so no difference from the base is a finding.")
            + (f" Its sampling took {timing} time (median over runs and guided scales of each (prior, w)'s "
               "sampling time; with eval.one_pass=scales a prior's pass is shared out over its scales)."
               if timing else "")
            + (f" Held-out ∅ loss over all timesteps (mean over the fine-tunes' final evaluations): {loss_text}."
               if name in losses else ""))  # fmt: skip


def extra_prior_lines(
    frame: pd.DataFrame, validity: Validity, metric: str, primary_scale: float | None = None
) -> list[str]:
    """Report lines for each extra prior: a statement per valid condition against self and base, the table of
    every condition and scale, and the sampling time against self and base. Empty without extra priors."""
    names = extra_prior_names(frame)
    if not names:
        return []
    keys = condition_keys(frame)
    unit = metric.upper()
    lines = []
    for name in names:
        title = "The one-pass prior `distilled`" if name == DISTILLED else f"The extra prior `{name}`"
        lines += [f"## {title}: against the fine-tune's own ∅ branch and the base", "", _intro(frame, metric, name),
                  ""]  # fmt: skip
        table = []
        per_other = {o: with_verdicts(advantage(frame, metric, o, name), keys, primary_scale) for o in COMPARED}
        accuracy = {o: advantage(frame, "accuracy", o, name) for o in COMPARED}
        for cond in sorted({tuple(r) for r in per_other["self"][keys].itertuples(index=False)}):
            label = cond_label(keys, cond)
            valid = validity.valid(cond) and validity.priors_valid
            mine = {o: _of(per_other[o], keys, cond).sort_values("guidance_scale") for o in COMPARED}
            if valid:
                caveat = f" Caveat: {CAVEAT}." if validity.guidance_pays(cond) is False else ""
                lines.append(f"- **{label}** ({unit}):{caveat}")
                lines += [f"  - against prior={o}: {_verdict(mine[o])}." for o in COMPARED]
            else:
                why = "an extra prior did not converge" if not validity.priors_valid else "it failed a validity check"
                lines.append(f"- **{label}**: no conclusion ({why}).")
            for other in COMPARED:
                acc = _of(accuracy[other], keys, cond).set_index("guidance_scale")["estimate"]
                table += [_table_row(label, other, r, acc, unit, valid) for _, r in mine[other].iterrows()]
        if table:
            lines += ["", "<details><summary>Every condition and scale</summary>", "",
                      markdown_table(pd.DataFrame(table)), "", "</details>"]  # fmt: skip
        lines.append("")
    return lines

"""When does the swap pay? The sign rule and the fitted priors, from the tidy results.

The swap's benefit at one (run, guidance scale w ≠ 1) is metric(prior=self) − metric(prior=base) for metrics where
lower is better (exact NLL on toy2d, FD otherwise), so positive means the base prior helped. The hypothesis
(issue 9) is that it helps where the base's unconditional denoising loss on the fine-tune data is below the model's
own: the sign rule predicts sign(benefit) = sign(log_ratio), with log_ratio the mean over timestep buckets of
log(L_self / L_base) on the calibration split (on the metric held-out split when no calibration was run).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from priorlab.analysis.results import axis_columns, bucket_start, final_rows
from priorlab.analysis.stats import Estimate, mean_ci
from priorlab.analysis.text import fmt_axis, markdown_table
from priorlab.keys import BASE, SELF
from priorlab.priors.modes import FITTED, FIXED


@dataclass
class Proportion:
    """k successes of n with a 95% Wilson score interval."""

    k: int
    n: int

    @property
    def interval(self) -> tuple[float, float]:
        if self.n == 0:
            return float("nan"), float("nan")
        ci = stats.binomtest(self.k, self.n).proportion_ci(confidence_level=0.95, method="wilson")
        return float(ci.low), float(ci.high)

    def __str__(self) -> str:
        if self.n == 0:
            return "0 of 0"
        lo, hi = self.interval
        return f"{self.k} of {self.n} ({self.k / self.n:.0%}, 95% CI {lo:.0%}–{hi:.0%})"


def log_ratios(final: pd.DataFrame) -> pd.Series:
    """Per run: the mean over timestep buckets of log(L_self / L_base) of the unconditional branches."""
    for prefix in ("calib_loss/t=", "loss/t="):
        sub = final[final["metric"].str.startswith(prefix) & final["prior"].isin(FIXED)]
        if len(sub):
            wide = sub.pivot_table(index=["run", "metric"], columns="prior", values="value")
            if set(FIXED) <= set(wide.columns):
                ratio = np.log(wide["self"] / wide["base"]).dropna()
                return ratio.groupby(level="run").mean()
    return pd.Series(dtype=float)


def swap_points(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per (run, guidance scale w ≠ 1) at each run's final step: the study axes, cond_dropout, seed, w, the
    metric under each prior, `benefit` = metric(self) − metric(base) and `log_ratio`."""
    final = final_rows(frame)
    index = ["run", *axis_columns(frame), "cond_dropout", "seed", "guidance_scale"]
    sub = final[(final["metric"] == metric) & final["prior"].isin(FIXED + FITTED) & (final["guidance_scale"] != 1)]
    if sub.empty:
        return pd.DataFrame(columns=[*index, "benefit", "log_ratio"])
    wide = sub.pivot_table(index=index, columns="prior", values="value").reset_index()
    wide.columns.name = None
    if not set(FIXED) <= set(wide.columns):
        return pd.DataFrame(columns=[*index, "benefit", "log_ratio"])
    wide["benefit"] = wide["self"] - wide["base"]
    wide["log_ratio"] = wide["run"].map(log_ratios(final))
    return wide


def sign_rule(points: pd.DataFrame, by: str = "guidance_scale") -> tuple[Proportion, dict[object, Proportion]]:
    """How often sign(benefit) = sign(log_ratio): over all points, and per value of column `by`.

    Points with a zero benefit or ratio, or without a ratio, are left out."""
    usable = points.dropna(subset=["benefit", "log_ratio"])
    usable = usable[(usable["benefit"] != 0) & (usable["log_ratio"] != 0)]
    holds = np.sign(usable["benefit"]) == np.sign(usable["log_ratio"])
    per_value = {value: Proportion(int(g.sum()), len(g)) for value, g in holds.groupby(usable[by], sort=True)}
    return Proportion(int(holds.sum()), len(usable)), per_value


def rank_correlation(points: pd.DataFrame) -> tuple[float, float, int]:
    """Spearman's ρ between log_ratio and benefit over the points, its two-sided p-value and the count."""
    usable = points.dropna(subset=["benefit", "log_ratio"])
    if len(usable) < 3 or usable["log_ratio"].nunique() < 2:
        return float("nan"), float("nan"), len(usable)
    result = stats.spearmanr(usable["log_ratio"], usable["benefit"])
    return float(result.statistic), float(result.pvalue), len(usable)


@dataclass
class FittedComparison:
    """A fitted prior against the better and the worse of the two fixed priors at each point (lower is better)."""

    prior: str
    beats_both: Proportion
    ties_better: int
    worse_than_better: int
    worse_than_both: int
    vs_better: Estimate  # metric(fitted) − min(self, base)
    vs_self: Estimate
    vs_base: Estimate


def fitted_vs_fixed(points: pd.DataFrame, prior: str) -> FittedComparison | None:
    """Counts of points where `prior` beats both fixed priors, ties the better, or is worse; paired differences."""
    if prior not in points:
        return None
    p = points.dropna(subset=[prior, "self", "base"])
    if p.empty:
        return None
    better, worse = np.minimum(p["self"], p["base"]), np.maximum(p["self"], p["base"])
    value = p[prior]
    return FittedComparison(
        prior,
        Proportion(int((value < better).sum()), len(p)),
        int((value == better).sum()),
        int((value > better).sum()),
        int((value > worse).sum()),
        mean_ci(value - better),
        mean_ci(value - p["self"]),
        mean_ci(value - p["base"]),
    )


def fitted_cells(points: pd.DataFrame, prior: str) -> pd.DataFrame:
    """Per cell (study axes, cond_dropout, w), `prior` against the better and the worse fixed prior of the cell
    (by the mean over seeds) as paired differences over seeds, mean [95% t-CI], with a verdict: "better than
    both" or "worse than the better" where the interval against the better excludes 0, "the better itself"
    where it gave the same values at every seed, "no spread over seeds" where it differed from the better by the
    same nonzero amount at every seed (a zero-width interval is no evidence: the report's rule), else "within
    noise of the better" (with fewer than 2 seeds, "one seed"). Seeds, not (run, w) points, are the replicates.
    These are descriptive: judged by the interval over seeds alone, with no interval over samples (none is recorded
    against a fixed prior other than self) and no correction over cells, they are not findings."""
    if prior not in points:
        return pd.DataFrame()
    keys = [c for c in points.columns if c not in ("run", "seed", "benefit", "log_ratio", *FIXED, *FITTED)]
    rows = []
    for cell, g in points.dropna(subset=[prior, *FIXED]).groupby(keys, sort=True, dropna=False):
        cell = cell if isinstance(cell, tuple) else (cell,)
        better = SELF if g[SELF].mean() <= g[BASE].mean() else BASE
        worse = BASE if better == SELF else SELF
        vs_better, vs_worse = mean_ci(g[prior] - g[better]), mean_ci(g[prior] - g[worse])
        if vs_better.n < 2:
            verdict = "one seed"
        elif vs_better.mean == 0 and vs_better.lo == vs_better.hi == 0:
            verdict = "the better itself"  # the same samples as the better fixed prior at every seed
        elif vs_better.zero_width:
            verdict = "no spread over seeds"
        elif vs_better.hi < 0:
            verdict = "better than both" if vs_worse.hi < 0 else "better than the better"
        elif vs_better.lo > 0:
            verdict = "worse than the worse" if vs_worse.lo > 0 else "worse than the better"
        else:
            verdict = "within noise of the better"
        rows.append({**dict(zip(keys, cell, strict=True)), "seeds": vs_better.n, "better fixed": better,
                     "vs better": vs_better, "vs worse": vs_worse, "verdict": verdict})  # fmt: skip
    return pd.DataFrame(rows)


def condition_table(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Per condition (study axes, cond_dropout): each prior's best metric over scales, mean [CI] over seeds."""
    final = final_rows(frame)
    keys = [*axis_columns(frame), "cond_dropout"]
    sub = final[(final["metric"] == metric) & final["prior"].isin(FIXED + FITTED)]
    best = sub.groupby(["run", *keys, "seed", "prior"], dropna=False)["value"].min().reset_index()
    rows = []
    for cond, g in best.groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        row = dict(zip(keys, cond, strict=True))
        for prior in FIXED + FITTED:
            values = g[g["prior"] == prior]["value"]
            if len(values):
                row[f"best {metric} {prior}"] = str(mean_ci(values))
        rows.append(row)
    return pd.DataFrame(rows)


def bucket_log_ratios(frame: pd.DataFrame) -> pd.DataFrame:
    """Per run and timestep bucket: log(L_self / L_base) on the calibration split and the mix weight (final step)."""
    final = final_rows(frame)
    keys = ["run", *axis_columns(frame), "cond_dropout", "seed"]
    loss = final[final["metric"].str.startswith("calib_loss/t=") & final["prior"].isin(FIXED)].copy()
    if loss.empty:
        return pd.DataFrame(columns=[*keys, "t", "log_ratio", "mix_weight"])
    loss["t"] = loss["metric"].map(bucket_start)
    wide = loss.pivot_table(index=[*keys, "t"], columns="prior", values="value").reset_index()
    wide["log_ratio"] = np.log(wide["self"] / wide["base"])
    mix = final[final["metric"].str.startswith("calib_weight/t=") & (final["prior"] == "mix")].copy()
    mix["t"] = mix["metric"].map(bucket_start)
    mix = mix[[*keys, "t", "value"]].rename(columns={"value": "mix_weight"})
    return wide[[*keys, "t", "log_ratio"]].merge(mix, on=[*keys, "t"], how="left")


def swap_sections(frame: pd.DataFrame, fig_dir: Path, validity) -> tuple[list[str], dict]:
    """The report's sections on the fitted priors' table, the sign rule and auto/mix against the fixed priors (over
    the conditions that passed their validity checks, `validity.valid`), with figures (f), (g)."""
    from priorlab.analysis import figures
    from priorlab.analysis.validity import condition_keys, study_metric

    metric = study_metric(frame)
    points = swap_points(frame, metric)
    lines: list[str] = []
    made: dict[str, tuple[str, Path | None]] = {}
    if final_rows(frame)["prior"].isin(FITTED).any():
        lines += [f"## Best {metric.upper()} over guidance scales per condition, every prior (mean [95% CI] over "
                  "seeds)", "", markdown_table(condition_table(frame, metric)), ""]  # fmt: skip
    if points.empty or points["log_ratio"].isna().all():
        return lines, made
    valid = points[condition_keys(frame)].apply(tuple, axis=1).map(validity.valid)
    left_out = int((~valid).sum())
    points = points[valid]
    lines += ["## When does the swap pay? The sign rule", ""]
    if points.empty:
        return [
            *lines,
            "Not tested: no condition passed its validity checks, so its benefits are not results.",
            "",
        ], made
    lines += _rule_lines(frame, points, metric, left_out)
    made["f"] = ("(f) the swap's benefit vs the ∅ loss ratio",
                 figures.swap_vs_loss_ratio(points, fig_dir / "f_swap_vs_loss_ratio.png", metric))  # fmt: skip
    lines += _fitted_lines(points, metric)
    made["g"] = ("(g) log(L_self / L_base) and the mix weight per timestep bucket",
                 figures.log_ratio_per_bucket(bucket_log_ratios(frame), axis_columns(frame),
                                              fig_dir / "g_log_ratio_per_bucket.png"))  # fmt: skip
    return lines, made


def _rule_lines(frame: pd.DataFrame, points: pd.DataFrame, metric: str, left_out: int) -> list[str]:
    """The sign rule's statement, its one-sidedness where the ratio has one sign, and its counts."""
    source = "calibration" if final_rows(frame)["metric"].str.startswith("calib_loss/").any() else "metric held-out"
    overall, per_scale = sign_rule(points)
    signs = set(np.sign(points["log_ratio"].dropna()).tolist()) - {0.0}
    lines = [
        f"Benefit = {metric.upper()}(self) − {metric.upper()}(base) at each fine-tune's final step and each w ≠ 1 "
        f"(> 0: the base prior helped). Loss ratio = mean over timestep buckets of log(L_self / L_base), the "
        f"held-out ∅ denoising losses on the {source} split (> 0: the base's loss is lower). The rule predicts "
        "equal signs. Intervals are Wilson 95% intervals treating points as independent; points of one run at "
        "several scales are not, so read the per-scale counts too."
        + (f" {left_out} points of conditions that failed their validity checks are left out." if left_out else ""),
        "",
    ]  # fmt: skip
    if len(signs) == 1:
        lower, verb = ("the fine-tune's own", "did not help") if signs == {-1.0} else ("the base's", "helped")
        lines += [f"**The loss ratio has one sign at every point ({lower} ∅ loss is the lower), so the rule is "
                  f"tested on one side only**: each count below is just the share of points where the swap {verb}, "
                  "not evidence that the ratio predicts the sign.", ""]  # fmt: skip
    keys = [*axis_columns(frame), "cond_dropout"]
    return [
        *lines,
        f"- all scales: the sign rule held at {overall}.",
        *[f"- w={w:g}: {p}." for w, p in per_scale.items()],
        *[f"- {key}={fmt_axis(v)}: {p}." for key in keys if points[key].nunique() > 1
          for v, p in sign_rule(points, key)[1].items()],
        "- Spearman's ρ(log ratio, benefit) = {:.2f} (p = {:.2g}, n = {}).".format(*rank_correlation(points)),
        "",
    ]  # fmt: skip


def _fitted_lines(points: pd.DataFrame, metric: str) -> list[str]:
    """The section comparing prior=auto and prior=mix with the better and the worse fixed prior at each point."""
    fitted = [c for c in (fitted_vs_fixed(points, p) for p in FITTED) if c is not None]
    if not fitted:
        return []
    title = f"## The fitted priors (auto, mix, checked) against both fixed priors ({metric.upper()}, lower is better)"
    lines = [title, "",
             "Per cell (study axes, p, w) the fitted prior's paired difference from the cell's better and worse "
             "fixed prior (the better by its mean over seeds), mean [95% t-CI] over seeds; a cell whose interval "
             "against the better includes 0 is within noise, not a failure. These verdicts describe the cells by "
             "the interval over seeds alone (no interval over samples is recorded against the better fixed prior, and "
             "there is no correction over cells), so they are not findings in the sense of the rule above; a "
             "zero-width interval counts as no spread, never as better or worse.", ""]  # fmt: skip
    for c in fitted:
        cells = fitted_cells(points, c.prior)
        counts = cells["verdict"].value_counts()
        summary = "; ".join(f"{v}: {counts[v]}" for v in counts.index)
        lines += [f"**prior={c.prior}** over {len(cells)} cells: {summary}.", ""]
        keys = [k for k in cells.columns if k not in ("seeds", "better fixed", "vs better", "vs worse", "verdict")]
        lines.append("| " + " | ".join([*keys, "seeds", "better fixed", f"{c.prior} − better", f"{c.prior} − worse",
                                         "verdict"]) + " |")  # fmt: skip
        lines.append("|" + "---|" * (len(keys) + 5))
        for _, r in cells.iterrows():
            values = [f"{r[k]:g}" if isinstance(r[k], float) else str(r[k]) for k in keys]
            lines.append("| " + " | ".join([*values, str(r["seeds"]), r["better fixed"], str(r["vs better"]),
                                            str(r["vs worse"]), r["verdict"]]) + " |")  # fmt: skip
        lines += ["", f"Pooled over every (run, w) point (not independent: for scale only): better than both at "
                      f"{c.beats_both}; {c.prior} − min(self, base) {c.vs_better}.", ""]  # fmt: skip
    return lines

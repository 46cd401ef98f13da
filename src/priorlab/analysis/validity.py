"""Can the study answer its question? The checks a report runs before it compares priors.

A comparison of priors means something only where (1) the base it swaps in had converged, (2) the fine-tune
learned the conditions it is guided towards, (3) the best guidance scale lies inside the grid, so that "best
over w" is not cut off, (4) the design has the seeds to see an effect of the size that matters, and (5) on images,
guidance pays: the fine-tune's FD is lower at its best guided scale than unguided, the regime CFG users work in.
Each check gives its number and its threshold; a failing check says what cannot be concluded. Conditions (the study
axes and cond_dropout) are judged one by one: a failing condition withholds its own findings, not the others'.

Longer than 300 lines because the checks are read together: each check's threshold, its text in the report and
the condition table it fills stay in one file (the bases' convergence is `priorlab.analysis.convergence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from priorlab.analysis.convergence import BASE_CHECK, PRIOR_CHECK, Check, check_bases
from priorlab.analysis.results import axis_columns, final_rows
from priorlab.analysis.stats import Estimate, mean_ci
from priorlab.errors import UserError
from priorlab.keys import SELF

# The defaults of an experiment preset's `validity:` thresholds.
THRESHOLDS = {
    "min_accuracy": 0.9,  # generated-sample accuracy of every fine-tune at its best prior and w
    "min_seeds": 3,  # seeds per condition before anything is concluded
    "max_base_change": 0.02,  # relative change of the base's held-out ∅ loss over its last 20% of training
    "max_nll_excess": 1.0,  # toy2d: NLL of unguided samples above the true conditional entropy, in nats
    "max_ema_start": 0.01,  # the initial weights' share in the base's EMA at its end, decay^steps
}
LOWER_IS_BETTER = {"fd", "kid", "nll", "ideal_mse"}
PAYS_CHECK = "guidance pays (prior=self, main conditions)"
PAYS = "guidance pays"  # the conditions table's column: True, False, or absent where not measured (toy2d's NLL)
GAIN = "gain at best w self"  # FD(w=1) − FD(w*) of prior=self per seed, an Estimate
OUTSIDE_REGIME = ("outside the regime where guidance pays (the fine-tune's FD at its best guidance scale is not shown "
                  "to be lower than unguided)")  # fmt: skip
NO_GAIN = "the comparisons of priors there are at guidance scales that do not improve FD (or are not shown to)"
CAVEAT = ("guidance does not pay in this condition (see Validity), so these are comparisons of priors at guidance "
          "scales that do not improve FD")  # fmt: skip


@dataclass
class Validity:
    """The study-wide checks and, per condition, whether its findings may be stated and why not."""

    checks: list[Check]
    conditions: pd.DataFrame  # one row per condition: keys, seeds, accuracy, excess NLL, best w per prior, valid
    keys: list[str]
    notes: list[str] = field(default_factory=list)

    @property
    def study_valid(self) -> bool:
        """Whether every base converged (the study-wide checks that gate findings); conditions add their own."""
        return all(c.passed is not False for c in self.checks if c.name.startswith(BASE_CHECK))

    @property
    def priors_valid(self) -> bool:
        """Whether every extra prior converged (`priors:` of a study): the gate of the report's extra-prior findings."""
        return all(c.passed is not False for c in self.checks if c.name.startswith(PRIOR_CHECK))

    def valid(self, condition: tuple) -> bool:
        if not self.study_valid:
            return False
        row = self.conditions[self.conditions["condition"] == condition]
        return bool(len(row)) and bool(row["valid"].iloc[0])

    def guidance_pays(self, condition: tuple) -> bool | None:
        """Whether guidance pays in the condition (`check_guidance`); None where not measured (toy2d's NLL)."""
        row = self.conditions[self.conditions["condition"] == condition] if PAYS in self.conditions else []
        return None if not len(row) else bool(row[PAYS].iloc[0])

    def outside_regime(self) -> list[tuple]:
        """The conditions where guidance does not pay: their comparisons of priors are at scales that do not
        improve FD, and their best over scales is no finding."""
        if PAYS not in self.conditions:
            return []
        return list(self.conditions.loc[~self.conditions[PAYS].astype(bool), "condition"])


def study_metric(frame: pd.DataFrame) -> str:
    """The metric a study ranks guidance scales by: exact NLL on toy2d, FD otherwise."""
    return "nll" if (frame["metric"] == "nll").any() else "fd"


def comparison_metrics(frame: pd.DataFrame) -> list[str]:
    """The metrics the report compares the priors on: the study's metric, then on toy2d the distance to exact
    guidance (`ideal_mse`), on images the accuracy, where the results hold them."""
    second = "ideal_mse" if study_metric(frame) == "nll" else "accuracy"
    return [m for m in (study_metric(frame), second) if (frame["metric"] == m).any()]


def condition_keys(frame: pd.DataFrame) -> list[str]:
    return [*axis_columns(frame), "cond_dropout"]


def best_scales(frame: pd.DataFrame, metric: str, priors: tuple[str, ...] = ("self", "base")) -> pd.DataFrame:
    """Per run at its final step: the prior and guidance scale at which it scores best, and the score there."""
    final = final_rows(frame)
    sub = final[(final["metric"] == metric) & final["prior"].isin(priors)].dropna(subset=["guidance_scale"])
    if sub.empty:
        return pd.DataFrame(columns=["run", "prior", "guidance_scale", "value"])
    by_run = sub.groupby("run")["value"]
    pick = by_run.idxmin() if metric in LOWER_IS_BETTER else by_run.idxmax()
    return sub.loc[pick, ["run", "prior", "guidance_scale", "value"]].reset_index(drop=True)


def _accuracy_at(final: pd.DataFrame, best: pd.DataFrame) -> pd.Series:
    """The accuracy of each run at its best (prior, scale) in `best`, indexed by run."""
    acc = final[final["metric"] == "accuracy"]
    merged = best[["run", "prior", "guidance_scale"]].merge(acc, on=["run", "prior", "guidance_scale"], how="left")
    return merged.set_index("run")["value"]


def power_estimate(differences: np.ndarray, power: float = 0.8, alpha: float = 0.05) -> float:
    """The smallest mean difference a paired t-test over these n per-seed differences detects with `power` at
    two-sided level `alpha`: (t_{1−α/2} + t_{power}) · sd / √n, with n − 1 degrees of freedom (nan for n < 2)."""
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return float("nan")
    dof = len(d) - 1
    return float((stats.t.ppf(1 - alpha / 2, dof) + stats.t.ppf(power, dof)) * d.std(ddof=1) / math.sqrt(len(d)))


def check_conditions(frame: pd.DataFrame, thresholds: dict, main: dict | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Per condition: its seeds, the lowest accuracy of its fine-tunes at their best (prior, w), the largest
    excess NLL at w = 1 (toy2d), the best w of each prior (mean over seeds) and whether that lies inside the grid,
    whether it is one of the study's `main` conditions and, on images, whether guidance pays (`check_guidance`);
    `valid` when it has the seeds and every fine-tune learned its conditions."""
    final = final_rows(frame)
    metric = study_metric(frame)
    keys = condition_keys(frame)
    runs = final.drop_duplicates("run")[["run", *keys, "seed"]]
    best = best_scales(frame, metric).merge(runs, on="run")
    best["accuracy"] = best["run"].map(_accuracy_at(final, best))
    classes = final[final["metric"] == "num_classes"].groupby("run")["value"].first()
    entropy = final[final["metric"] == "entropy"].groupby("run")["value"].first()
    unguided = final[(final["metric"] == "nll") & (final["prior"] == SELF) & (final["guidance_scale"] == 1)]
    excess = unguided.groupby("run")["value"].first() - entropy
    acc_w1 = final[(final["metric"] == "accuracy") & (final["prior"] == SELF) & (final["guidance_scale"] == 1)]
    acc_w1 = acc_w1.groupby("run")["value"].first()
    grid = sorted(final["guidance_scale"].dropna().unique())
    rows, notes = [], []
    for cond, g in best.groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        row = dict(zip(keys, cond, strict=True))
        row["condition"] = cond
        row["seeds"] = g["seed"].nunique()
        row["accuracy"] = float(g["accuracy"].min())
        row["accuracy_w1"] = float(acc_w1.reindex(g["run"]).min()) if len(acc_w1) else float("nan")
        k = classes.reindex(g["run"]).dropna()
        row["chance"] = float(1 / k.iloc[0]) if len(k) else float("nan")
        row["nll_excess"] = float(excess.reindex(g["run"]).max()) if len(excess) else float("nan")
        learned = row["accuracy"] >= thresholds["min_accuracy"]
        if not math.isnan(row["nll_excess"]):
            learned = learned and row["nll_excess"] <= thresholds["max_nll_excess"]
        row["learned"] = bool(learned)
        row["enough_seeds"] = row["seeds"] >= thresholds["min_seeds"]
        interior = True
        for prior in ("self", "base"):
            w = _best_mean_scale(final, g["run"], metric, prior)
            row[f"best w {prior}"] = w
            at_top = w is not None and len(grid) > 1 and w == grid[-1]
            at_bottom_guided = w is not None and w == grid[0] and grid[0] != 1
            interior = interior and not (at_top or at_bottom_guided)
        row["w inside grid"] = interior
        row["valid"] = row["learned"] and row["enough_seeds"]
        row["main"] = is_main(dict(zip(keys, cond, strict=True)), main)
        if metric == "fd":
            row[GAIN], row[PAYS] = check_guidance(final, g["run"], row["best w self"])
        rows.append(row)
    if not rows:
        notes.append("no fine-tune has an evaluation with prior=self at its final step")
    return pd.DataFrame(rows), notes


def is_main(condition: dict, main: dict | None) -> bool:
    """Whether a condition ({key: value}) matches every entry of study.json's `main` ({key: [values]}), values
    compared as strings or, where both are numbers, as numbers ("0" matches cond_dropout 0.0). No `main`: True.
    A key that is no condition key is a UserError: a misspelt key would otherwise leave no condition main."""
    unknown = [key for key in (main or {}) if key not in condition]
    if unknown:
        raise UserError(f"study.json: main names {unknown[0]!r}, which is not a condition key of the results (one of "
                        f"{', '.join(condition)})")  # fmt: skip

    def same(a, b) -> bool:
        try:
            return str(a) == str(b) or float(a) == float(b)
        except (TypeError, ValueError):
            return False

    return all(any(same(condition[key], v) for v in values) for key, values in (main or {}).items())


def check_guidance(final: pd.DataFrame, runs: pd.Series, best_w: float | None) -> tuple[Estimate, bool]:
    """Does guidance pay? The per-seed gain FD(w=1) − FD(w*) of prior=self at w*, its best scale by the mean over
    seeds, with its 95% t-interval; it pays when w* > 1 and the interval lies above 0 with ≥ 2 seeds."""
    sub = final[(final["metric"] == "fd") & (final["prior"] == SELF) & final["run"].isin(runs)]
    by_scale = sub.pivot_table(index="run", columns="guidance_scale", values="value")
    if best_w is None or 1.0 not in by_scale or best_w not in by_scale:
        return Estimate(math.nan, math.nan, math.nan, 0), False
    gain = mean_ci((by_scale[1.0] - by_scale[best_w]).dropna())
    return gain, bool(best_w > 1 and gain.n >= 2 and gain.lo > 0)


def _best_mean_scale(final: pd.DataFrame, runs: pd.Series, metric: str, prior: str) -> float | None:
    sub = final[(final["metric"] == metric) & (final["prior"] == prior) & final["run"].isin(runs)]
    mean = sub.groupby("guidance_scale")["value"].mean()
    if mean.empty:
        return None
    return float(mean.idxmin() if metric in LOWER_IS_BETTER else mean.idxmax())


def check_study(
    study_dir: str | Path,
    frame: pd.DataFrame,
    thresholds: dict | None = None,
    base_seeds: list | None = None,
    main: dict | None = None,
) -> Validity:
    """Every validity check of a study: the bases from their run folders, the fine-tunes from the results.

    `base_seeds` (study.json's) says whether the seeds replicate the base's training too; with one base the
    findings hold for that base (a check that fails without withholding them). `main` (study.json's) names the
    conditions whose guidance must pay ({key: [values]}; all of them by default)."""
    thresholds = {**THRESHOLDS, **(thresholds or {})}
    conditions, notes = check_conditions(frame, thresholds, main)
    checks = check_bases(Path(study_dir), thresholds) + check_bases(Path(study_dir), thresholds, priors=True)
    n_bases = len(base_seeds or [None])
    checks.append(Check("base seeds", n_bases > 1, f"{n_bases} (the fine-tune seeds are dealt out over them)",
                        "≥ 2, so that the intervals include the base's training noise",
                        "every fine-tune starts from one base, so the findings hold for that base; another base "
                        "may give others (they are still stated)"))  # fmt: skip
    checks += _condition_checks(conditions, condition_keys(frame), thresholds)
    return Validity(checks, conditions, condition_keys(frame), notes)


def _condition_checks(conditions: pd.DataFrame, keys: list[str], thresholds: dict) -> list[Check]:
    """The checks over the fine-tunes' conditions: learned, matching the true conditionals (toy2d), seeds, the
    best w inside the grid, and guidance pays (where measured)."""
    if conditions.empty:
        return []
    out: list[Check] = []
    worst = conditions.loc[conditions["accuracy"].idxmin()]
    n_bad = int((~conditions["learned"]).sum())
    out.append(Check(
        "fine-tunes learned their conditions", n_bad == 0,
        f"lowest accuracy at the best prior and w {worst['accuracy']:.3f} "
        f"({_cond_text(worst, keys)}); "
        f"chance {worst['chance']:.3f}; {n_bad} of {len(conditions)} conditions below",
        f"≥ {thresholds['min_accuracy']:g} for every fine-tune",
        "where a fine-tune did not learn its conditions, guidance has nothing to steer towards and no "
        "conclusion about priors can be drawn"))  # fmt: skip
    if conditions["nll_excess"].notna().any():
        worst = conditions.loc[conditions["nll_excess"].idxmax()]
        out.append(Check(
            "unguided samples match the true conditionals (toy2d)",
            bool((conditions["nll_excess"] <= thresholds["max_nll_excess"]).all()),
            f"largest NLL at w=1 above the true conditional entropy: {worst['nll_excess']:.2f} nats",
            f"≤ {thresholds['max_nll_excess']:g} nats", "the conditional branch is far from the true "
            "conditionals"))  # fmt: skip
    few = conditions[~conditions["enough_seeds"]]
    out.append(
        Check(
            "seeds per condition",
            few.empty,
            f"{int(conditions['seeds'].min())} (fewest)",
            f"≥ {thresholds['min_seeds']:g}",
            "with fewer seeds the intervals over seeds are too wide to conclude",
        )
    )
    edge = conditions[~conditions["w inside grid"]]
    out.append(Check(
        "best w inside the grid", edge.empty,
        "every condition" if edge.empty else f"{len(edge)} of {len(conditions)} conditions at an edge",
        "best w (mean over seeds) below the largest scale, and no guided scale best at the lowest",
        "the best-over-w comparison is cut off by the grid; per-w comparisons still stand"))  # fmt: skip
    if PAYS in conditions:
        out.append(_pays_check(conditions, keys))
    return out


def _pays_check(conditions: pd.DataFrame, keys: list[str]) -> Check:
    """The study-level check that guidance pays in every main condition, naming the gain of each failing one."""
    main = conditions[conditions["main"]]
    target = "best w of prior=self (lowest mean FD) > 1, and FD(w=1) − FD(w*) > 0 over seeds (95% t-interval, ≥ 2)"
    failure = ("the study is outside the regime that CFG users work in (guidance does not improve FD there), so the "
               "report draws no conclusion about priors at the best scale")  # fmt: skip
    if main.empty:
        return Check(PAYS_CHECK, None, "no condition matches study.json's `main`", target, failure)
    failing = main[~main[PAYS].astype(bool)]
    shown = failing if len(failing) else main
    each = [_gain_text(r, keys) for _, r in shown.iterrows()]
    listed = f": {'; '.join(each)}" if len(each) <= 4 else ""
    which = "main conditions" if len(main) < len(conditions) else "conditions (all main)"
    value = (f"{len(failing)} of {len(main)} {which} fail{listed}" if len(failing) else
             f"{len(main)} of {len(main)} {which} pass{listed}")  # fmt: skip
    return Check(PAYS_CHECK, failing.empty, value, target, failure)


def _gain_text(row, keys: list[str]) -> str:
    """A condition's best scale for prior=self and the gain of guidance there, FD(1) − FD(w*)."""
    w = row["best w self"]
    gain = " (unguided is best)" if pd.notna(w) and w <= 1 else f", FD(1) − FD(w*) {row[GAIN]}"
    return f"{_cond_text(row, keys)}: w*={_text(w)}{gain}"


def _text(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _cond_text(row, keys: list[str]) -> str:
    return ", ".join(f"{k}={_text(row[k])}" for k in keys)

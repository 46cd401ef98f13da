"""Which prior to use? Predictors of the swap's sign, each scored against the sign a study measured.

A user of a classifier-free-guided fine-tune chooses the unconditional prior before sampling: the model's own ∅
branch (prior=self) or the base's (prior=base). The measured answer at one (run, guidance scale w ≠ 1) is the sign
of the swap's benefit, metric(self) − metric(base) (`sign_rule.swap_points`, the study's metric: exact NLL on
toy2d, FD otherwise; > 0: the base helped). It is *clear* where |benefit| > 1.96 SE, the SE of the paired
difference the run recorded (`diff_<metric>_se`, prior=base). Three predictors guess that sign from what a run
records before its evaluation samples:

- `loss_ratio`: the sign of the mean over timestep buckets of log(L_self / L_base), the ∅ denoising losses
  (`sign_rule.log_ratios`: `calib_loss/t=...`, else `loss/t=...`); one value per run, so one guess at every w;
- `guided_loss`: the sign of log(guided loss of self at w / guided loss of base at w) on the calibration split
  (`calib_guided_loss/all`, model=self|base), recorded where a prior was fitted on the guided objective;
- `checked`: prior=checked's sampling check at w (`calib_check_nll` on toy2d, `calib_check_fd` on images): +1 where
  base scored better than self, −1 where self did; its third candidate, mix, is ignored for the sign (but where
  checked picked mix is counted).

A guess is +1 (use base), −1 (use self), or NaN where the study lacks the records: the predictor abstains. A tie
(a zero ratio or difference) guesses nothing and abstains too; points whose measured benefit is zero or missing
have no sign to score against and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from priorlab.analysis.results import axis_columns, final_rows
from priorlab.analysis.sign_rule import Proportion, log_ratios, swap_points
from priorlab.analysis.validity import study_metric
from priorlab.keys import BASE
from priorlab.priors.modes import FIXED

PREDICTORS = {"loss_ratio": "∅-loss ratio", "guided_loss": "guided loss", "checked": "checked prior's choice"}
GUIDED_LOSS = "calib_guided_loss/all"
CHECK_METRICS = ("calib_check_nll", "calib_check_fd")
CHECK_CANDIDATES = ("self", "base", "mix")  # prior=checked's candidates, in its tie order (`check_by_sampling`)
CLEAR_Z = 1.96
NEEDS = {  # what each predictor reads, for the note on a predictor without data
    "loss_ratio": "∅ losses per timestep bucket (calib_loss/t=... or loss/t=..., prior self and base)",
    "guided_loss": f"guided calibration losses ({GUIDED_LOSS}, model self and base at each w)",
    "checked": f"prior=checked's sampling-check scores ({' or '.join(CHECK_METRICS)}, model self and base at each w)",
}


def outcomes(frame: pd.DataFrame) -> pd.DataFrame:
    """The measured outcome per (run, w ≠ 1) at each run's final step: the study axes, cond_dropout, seed, w,
    `benefit` (> 0: the base helped), its `sign` (0 for a tie, NaN where a prior's value is missing), `se` of the
    paired difference (NaN where not recorded) and `clear`, |benefit| > 1.96 se (missing where se is)."""
    metric = study_metric(frame)
    index = ["run", *axis_columns(frame), "cond_dropout", "seed", "guidance_scale"]
    out = swap_points(frame, metric)[index + ["benefit"]].reset_index(drop=True)
    out["benefit"] = out["benefit"].astype(float)
    out["sign"] = np.sign(out["benefit"])
    final = final_rows(frame)
    se = final[(final["metric"] == f"diff_{metric}_se") & (final["prior"] == BASE)]
    out["se"] = _at(out, se.groupby(["run", "guidance_scale"])["value"].mean())
    out["clear"] = pd.array(out["benefit"].abs() > CLEAR_Z * out["se"], dtype="boolean")
    out.loc[out["se"].isna(), "clear"] = pd.NA
    return out


def _at(points: pd.DataFrame, by_run_scale: pd.Series) -> pd.Series:
    """Values of a series indexed by (run, guidance_scale), aligned to the points' rows (NaN where absent)."""
    if by_run_scale.empty:
        return pd.Series(np.nan, index=points.index)
    where = pd.MultiIndex.from_frame(points[["run", "guidance_scale"]])
    return pd.Series(by_run_scale.reindex(where).to_numpy(dtype=float), index=points.index)


def _sign(values: pd.Series) -> pd.Series:
    """+1 (use base) or −1 (use self); NaN for a missing value or a zero, which guesses nothing."""
    signs = np.sign(values.astype(float))
    return signs.where(signs != 0)


def _wide(final: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """The first of `metrics` the final rows hold, one row per (run, w) and one column per prior or model."""
    for metric in metrics:
        sub = final[(final["metric"] == metric) & final["guidance_scale"].notna()]
        if len(sub):
            return sub.pivot_table(index=["run", "guidance_scale"], columns="prior", values="value")
    return pd.DataFrame()


def loss_ratio_signs(final: pd.DataFrame, points: pd.DataFrame) -> pd.Series:
    """Predictor (a), per point: the sign of the run's mean log(L_self / L_base) over timestep buckets."""
    return _sign(points["run"].map(log_ratios(final)))


def guided_loss_signs(final: pd.DataFrame, points: pd.DataFrame) -> pd.Series:
    """Predictor (b), per point: the sign of log(guided loss of self / guided loss of base) at the point's w."""
    wide = _wide(final, (GUIDED_LOSS,))
    if not set(FIXED) <= set(wide.columns):
        return pd.Series(np.nan, index=points.index)
    with np.errstate(divide="ignore", invalid="ignore"):
        return _sign(_at(points, np.log(wide["self"] / wide["base"])))


def check_scores(final: pd.DataFrame) -> pd.DataFrame:
    """prior=checked's sampling-check scores per (run, w), one column per candidate (and `checked`), plus `pick`:
    the candidate it kept, the lowest score (ties: self, then base, then mix, as `check_by_sampling` breaks them)."""
    wide = _wide(final, CHECK_METRICS)
    if not set(FIXED) <= set(wide.columns):
        return pd.DataFrame(columns=[*CHECK_CANDIDATES, "pick"])
    candidates = wide[[c for c in CHECK_CANDIDATES if c in wide.columns]]
    scored = candidates.notna().all(axis=1)
    wide["pick"] = pd.Series(candidates[scored].idxmin(axis=1), index=wide.index)
    return wide


def checked_signs(final: pd.DataFrame, points: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Predictor (c), per point: +1 where base's check score beat self's at the point's w, −1 where self's did; and
    the candidate prior=checked picked there (mix included; NaN without a check)."""
    wide = check_scores(final)
    if wide.empty:
        return pd.Series(np.nan, index=points.index), pd.Series(np.nan, index=points.index, dtype=object)
    where = pd.MultiIndex.from_frame(points[["run", "guidance_scale"]])
    pick = pd.Series(wide["pick"].reindex(where).to_numpy(dtype=object), index=points.index)
    return _sign(_at(points, wide["self"] - wide["base"])), pick  # lower is better for both NLL and FD


def predictions(frame: pd.DataFrame) -> pd.DataFrame:
    """`outcomes` with one column per predictor (its guess: +1, −1 or NaN) and `checked_pick`."""
    final = final_rows(frame)
    out = outcomes(frame)
    out["loss_ratio"] = loss_ratio_signs(final, out)
    out["guided_loss"] = guided_loss_signs(final, out)
    out["checked"], out["checked_pick"] = checked_signs(final, out)
    return out


@dataclass
class Score:
    """One predictor against the measured signs: agreement over every point it guessed on, over the clear ones and
    per guidance scale; the points it abstained on; the distinct guesses it made (one: a constant predictor); and
    the base rate over the points it guessed on (the agreement of always answering "use base" there)."""

    predictor: str
    agrees: Proportion
    agrees_clear: Proportion
    per_scale: dict[float, Proportion]
    abstained: int
    points: int
    signs: tuple[float, ...] = field(default_factory=tuple)
    base_rate: Proportion = field(default_factory=lambda: Proportion(0, 0))

    @property
    def constant(self) -> bool:
        return len(self.signs) == 1


def scored_points(preds: pd.DataFrame, scale: float | None = None) -> pd.DataFrame:
    """The points with a measured sign (±1), at guidance scale `scale` only unless it is None."""
    out = preds[preds["sign"].isin([1.0, -1.0])]
    return out if scale is None else out[out["guidance_scale"] == scale]


def score_predictors(preds: pd.DataFrame, primary_scale: float | None = None) -> dict[str, Score]:
    """Per predictor (`PREDICTORS`), its `Score` over the points of `predictions`: at guidance scale
    `primary_scale` only, or at every scale (None)."""
    points = scored_points(preds, primary_scale)
    return {name: _score(name, points) for name in PREDICTORS}


def _score(name: str, points: pd.DataFrame) -> Score:
    """One predictor's `Score` over points with a measured sign."""
    made = points[points[name].notna()]
    hit = made[name] == made["sign"]
    clear = made["clear"].fillna(False).astype(bool)
    per_scale = {float(w): _count(g) for w, g in hit.groupby(made["guidance_scale"])}
    signs = tuple(sorted(set(made[name])))
    return Score(name, _count(hit), _count(hit[clear]), per_scale, len(points) - len(made), len(points), signs,
                 _count(made["sign"] > 0))  # fmt: skip


def _count(flags: pd.Series) -> Proportion:
    """How many of the flags are true, of how many."""
    return Proportion(int(flags.sum()), len(flags))


def base_rate(preds: pd.DataFrame, clear_only: bool = False) -> Proportion:
    """The share of points with a measured sign where the base helped (benefit > 0): what a predictor that always
    says "use base" agrees at."""
    points = scored_points(preds)
    if clear_only:
        points = points[points["clear"].fillna(False).astype(bool)]
    return _count(points["sign"] > 0)


def pooled(scores: list[dict[str, Score]]) -> dict[str, Score]:
    """Per predictor, the sum of its scores over several studies (k and n added up, the guesses' signs joined)."""
    out = {}
    for name in PREDICTORS:
        parts = [s[name] for s in scores if name in s]
        scales = sorted({w for p in parts for w in p.per_scale})
        per_scale = {w: _add(p.per_scale.get(w, Proportion(0, 0)) for p in parts) for w in scales}
        signs = tuple(sorted({s for p in parts for s in p.signs}))
        out[name] = Score(name, _add(p.agrees for p in parts), _add(p.agrees_clear for p in parts), per_scale,
                          sum(p.abstained for p in parts), sum(p.points for p in parts), signs,
                          _add(p.base_rate for p in parts))  # fmt: skip
    return out


def _add(proportions) -> Proportion:
    proportions = list(proportions)
    return Proportion(sum(p.k for p in proportions), sum(p.n for p in proportions))


TITLE = "## Which prior to use? Predictors scored against the measured sign"


def predictor_lines(frame: pd.DataFrame, primary_scale: float | None = None) -> list[str]:
    """The report section on the predictors: what is scored, the base rate, a table (predictor | agrees (all
    points) | agrees (clear points) | at the primary scale | abstained), per-scale counts and notes on constant
    predictors, predictors without data and checked's picks of mix; [] where no predictor guessed at any point."""
    preds = predictions(frame)
    scores = score_predictors(preds)
    if all(s.agrees.n == 0 for s in scores.values()):
        return []
    metric = study_metric(frame).upper()
    at_primary = score_predictors(preds, primary_scale) if primary_scale is not None else {}
    primary = "at the primary scale" + (f" (w={primary_scale:g})" if primary_scale is not None else "")
    source = "calibration" if frame["metric"].str.startswith("calib_loss/t=").any() else "metric held-out"
    lines = [TITLE, "", explanation(metric, source), "", *base_rate_lines(preds), "",
             f"| predictor | agrees (all points) | agrees (clear points) | {primary} | abstained |",
             "|---|---|---|---|---|"]  # fmt: skip
    for name, s in scores.items():
        there = str(at_primary[name].agrees) if name in at_primary else "—"
        lines.append(f"| {PREDICTORS[name]} | {s.agrees} | {s.agrees_clear} | {there} | {s.abstained} of {s.points} |")
    lines.append("")
    for name, s in scores.items():
        lines += note_lines(name, s)
    lines += ["", *mix_lines(preds)]
    return lines


def explanation(metric: str, source: str) -> str:
    """What the section scores and how to read it; `source` names the split of the ∅ losses."""
    return (f"The measured sign per (run, w ≠ 1), at each run's final step, is that of {metric}(self) − "
            f"{metric}(base): > 0 where the base prior helped; it is clear where |difference| > 1.96 × the run's SE "
            "of the paired difference. Each predictor guesses the sign before the evaluation samples: the **∅-loss "
            f"ratio** from the mean over timestep buckets of log(L_self / L_base) on the {source} split (one guess "
            "per run, the same at every w), the **guided loss** from log(guided loss of self / of base) at w on the "
            "calibration split, the **checked prior's choice** from its sampling check at w (base's score against "
            "self's; mix ignored; the check itself samples, on the calibration labels with its own seeds). Counts "
            "are k of n points where the guess equals the measured sign, with Wilson 95% intervals treating points "
            "as independent (a run's points at several scales are not); a predictor abstains where the study lacks "
            "its records or it ties. Points are not filtered by the report's validity checks.")  # fmt: skip


def base_rate_lines(preds: pd.DataFrame) -> list[str]:
    """The base rate, the agreement of always answering "use base", for comparison."""
    ties = int((preds["sign"] == 0).sum())
    everywhere, clear = base_rate(preds), base_rate(preds, clear_only=True)
    tied = f" Points with a benefit of exactly 0, left out: {ties}." if ties else ""
    return [
        f'Base rate, the share of points where the base prior helped (what always answering "use base" '
        f"agrees at): {everywhere} over all points with a measured sign, {clear} over the clear ones.{tied}"
    ]


def note_lines(name: str, score: Score) -> list[str]:
    """Per-scale counts of one predictor, and whether it is constant or had no data."""
    label = PREDICTORS[name]
    if score.agrees.n == 0:
        return [f"- **{label}**: no data; it needs {NEEDS[name]}, which this study did not record."]
    scales = "; ".join(f"w={w:g}: {p}" for w, p in score.per_scale.items())
    lines = [f"- **{label}** per scale: {scales}."]
    if score.abstained:
        lines.append(f"  Over the {score.agrees.n} points it guessed on, the base helped at {score.base_rate}.")
    if score.constant:
        says = "use base" if score.signs[0] > 0 else "use self"
        lines.append(f"  **Constant**: it says \"{says}\" at every point it guesses, so its agreement is only the "
                     "share of those points where that prior was better (the base rate), not evidence that it "
                     "predicts the sign.")  # fmt: skip
    return lines


def mix_lines(preds: pd.DataFrame) -> list[str]:
    """How often prior=checked kept mix, whose sign here is still base's check score against self's."""
    picks = scored_points(preds)["checked_pick"].dropna()
    if picks.empty:
        return []
    mix = int((picks == "mix").sum())
    return [f"prior=checked kept mix at {mix} of {len(picks)} points (self {int((picks == 'self').sum())}, base "
            f"{int((picks == 'base').sum())}); at those the guess above compares base's and self's check scores only.",
            ""]  # fmt: skip

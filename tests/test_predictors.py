"""Which prior to use? The predictors of the swap's sign (`priorlab.analysis.predictors`) on hand-made studies, and
on the committed toy2d study that evaluated prior=checked."""

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from priorlab.analysis import predictors
from priorlab.analysis.results import load_results

ROOT = Path(__file__).resolve().parents[1]
TOY2D = ROOT / "results" / "when_swap_pays_fitted_toy2d"


def _row(run: str, seed: int, prior: str, w: float, metric: str, value: float) -> dict:
    return {"run": run, "cond_dropout": 0.1, "seed": seed, "step": 10, "prior": prior, "guidance_scale": w,
            "metric": metric, "value": value}  # fmt: skip


def _each(run: str, seed: int, w: float, metric: str, values, priors=("self", "base")) -> list[dict]:
    """One row per prior of `values` (in the order of `priors`)."""
    return [_row(run, seed, p, w, metric, v) for p, v in zip(priors, values, strict=True)]


def _run(seed, fd, se=None, losses=None, guided=None, check=None, check_metric="calib_check_fd") -> list[dict]:
    """One run's final rows. fd and guided: {w: (self, base)}; se: {w: SE of the paired difference}; losses:
    [(self, base)] per timestep bucket (loss/t=...); check: {w: (self, base, mix)} sampling-check scores."""
    run = f"finetune/p=0.1/seed={seed}"
    rows = _each(run, seed, 1.0, "fd", (5.0, 5.0))  # w = 1: not a swap point
    for w, pair in fd.items():
        rows += _each(run, seed, w, "fd", pair)
    rows += [_row(run, seed, "base", w, "diff_fd_se", v) for w, v in (se or {}).items()]
    for b, pair in enumerate(losses or []):
        rows += _each(run, seed, np.nan, f"loss/t={100 * b}-{100 * b + 99}", pair)
    for w, pair in (guided or {}).items():
        rows += _each(run, seed, w, "calib_guided_loss/all", (*pair, min(pair)), ("self", "base", "mix"))
    for w, scores in (check or {}).items():
        rows += _each(run, seed, w, check_metric, (*scores, min(scores)), ("self", "base", "mix", "checked"))
    return rows


def _frame(*runs: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([row for run in runs for row in run])


def _column(preds: pd.DataFrame, name: str) -> list:
    return [None if isinstance(v, float) and math.isnan(v) else v for v in preds[name]]


def test_each_predictor_gives_its_sign_per_run_and_scale():
    """∅ ratio: one sign per run (self's loss higher → +1); guided loss: per w from self's against base's; checked:
    +1 where base's check score is lower, −1 where self's is, with the pick (mix where mix scored lowest)."""
    frame = _frame(
        _run(0, {2.0: (4.0, 3.0), 4.0: (6.0, 7.0)}, losses=[(2.0, 1.0), (1.0, 1.5)],  # mean log ratio > 0
             guided={2.0: (1.0, 2.0), 4.0: (3.0, 2.0)}, check={2.0: (9.0, 8.0, 8.5), 4.0: (7.0, 9.0, 6.0)}),
        _run(1, {2.0: (4.0, 5.0), 4.0: (6.0, 5.0)}, losses=[(1.0, 2.0)],
             guided={2.0: (2.0, 1.0), 4.0: (1.0, 2.0)}, check={2.0: (1.0, 2.0, 3.0), 4.0: (2.0, 2.0, 3.0)}),
    )  # fmt: skip
    preds = predictors.predictions(frame).sort_values(["seed", "guidance_scale"])
    assert list(preds["guidance_scale"]) == [2.0, 4.0, 2.0, 4.0]  # w = 1 is no swap point
    assert list(preds["benefit"]) == [1.0, -1.0, -1.0, 1.0] and list(preds["sign"]) == [1.0, -1.0, -1.0, 1.0]
    assert _column(preds, "loss_ratio") == [1.0, 1.0, -1.0, -1.0]
    assert _column(preds, "guided_loss") == [-1.0, 1.0, 1.0, -1.0]
    assert _column(preds, "checked") == [1.0, -1.0, -1.0, None]  # a tie between self and base guesses nothing
    assert list(preds["checked_pick"]) == ["base", "mix", "self", "self"]  # ties: self first, as checked breaks them


def test_the_check_score_is_read_under_either_metric_name():
    frame = _frame(_run(0, {2.0: (4.0, 3.0)}, check={2.0: (9.0, 8.0, 8.5)}, check_metric="calib_check_nll"))
    assert _column(predictors.predictions(frame), "checked") == [1.0]


def test_predictors_abstain_where_the_study_lacks_their_records():
    """No losses, guided losses or check: NaN everywhere; a guided loss at one scale only: NaN at the other; a zero
    log ratio: NaN (a tie guesses nothing)."""
    bare = predictors.predictions(_frame(_run(0, {2.0: (4.0, 3.0), 4.0: (6.0, 7.0)})))
    assert bare[["loss_ratio", "guided_loss", "checked"]].isna().all().all()
    assert bare["checked_pick"].isna().all()
    part = _frame(_run(0, {2.0: (4.0, 3.0), 4.0: (6.0, 7.0)}, losses=[(1.0, 1.0)], guided={2.0: (2.0, 1.0)}))
    preds = predictors.predictions(part).sort_values("guidance_scale")
    assert _column(preds, "guided_loss") == [1.0, None] and _column(preds, "loss_ratio") == [None, None]
    scores = predictors.score_predictors(preds)
    assert scores["guided_loss"].abstained == 1 and scores["guided_loss"].agrees.n == 1
    assert scores["loss_ratio"].abstained == 2 and scores["checked"].abstained == 2
    assert scores["guided_loss"].agrees_clear.n == 0  # no SE recorded: no point is clear


def test_a_zero_benefit_has_no_sign_and_is_left_out_of_the_scores():
    frame = _frame(_run(0, {2.0: (4.0, 3.0), 4.0: (5.0, 5.0)}, losses=[(2.0, 1.0)]))
    preds = predictors.predictions(frame).sort_values("guidance_scale")
    assert list(preds["sign"]) == [1.0, 0.0]
    ratio = predictors.score_predictors(preds)["loss_ratio"]
    assert (ratio.agrees.k, ratio.agrees.n, ratio.points, ratio.abstained) == (1, 1, 1, 0)
    assert "Points with a benefit of exactly 0, left out: 1." in "\n".join(predictors.predictor_lines(frame))


def test_clear_points_need_the_benefit_beyond_1_96_se_and_a_recorded_se():
    frame = _frame(_run(0, {2.0: (4.0, 3.0), 3.0: (4.0, 3.0), 4.0: (4.0, 3.0)}, se={2.0: 0.5, 3.0: 0.52}))
    preds = predictors.predictions(frame).sort_values("guidance_scale")
    assert list(preds["se"].fillna(-1)) == [0.5, 0.52, -1]
    assert [bool(v) if v is not pd.NA else None for v in preds["clear"]] == [True, False, None]  # 1/0.52 < 1.96


def _scored_study() -> pd.DataFrame:
    """Three runs at w = 2, 4: the ∅ ratio says base everywhere (constant), the guided loss is right at 4 of 5
    points (one abstention), the benefits are clear except run 2's at w = 4."""
    return _frame(
        _run(0, {2.0: (4.0, 3.0), 4.0: (6.0, 5.0)}, se={2.0: 0.1, 4.0: 0.1}, losses=[(2.0, 1.0)],
             guided={2.0: (2.0, 1.0), 4.0: (2.0, 1.0)}),
        _run(1, {2.0: (4.0, 5.0), 4.0: (6.0, 7.0)}, se={2.0: 0.1, 4.0: 0.1}, losses=[(3.0, 1.0)],
             guided={2.0: (1.0, 2.0), 4.0: (2.0, 1.0)}),
        _run(2, {2.0: (4.0, 3.0), 4.0: (6.0, 7.0)}, se={2.0: 0.1, 4.0: 1.0}, losses=[(2.0, 1.5)],
             guided={2.0: (2.0, 1.0)}),
    )  # fmt: skip


def test_agreement_counts_over_all_points_clear_points_scales_and_the_primary_scale():
    preds = predictors.predictions(_scored_study())
    scores = predictors.score_predictors(preds)
    ratio, guided = scores["loss_ratio"], scores["guided_loss"]
    assert (ratio.agrees.k, ratio.agrees.n) == (3, 6) and (ratio.agrees_clear.k, ratio.agrees_clear.n) == (3, 5)
    assert {w: (p.k, p.n) for w, p in ratio.per_scale.items()} == {2.0: (2, 3), 4.0: (1, 3)}
    assert ratio.abstained == 0 and ratio.points == 6 and ratio.constant and ratio.signs == (1.0,)
    assert (guided.agrees.k, guided.agrees.n) == (4, 5) and (guided.agrees_clear.k, guided.agrees_clear.n) == (4, 5)
    assert guided.abstained == 1 and not guided.constant and (guided.base_rate.k, guided.base_rate.n) == (3, 5)
    assert scores["checked"].agrees.n == 0 and scores["checked"].abstained == 6
    at_four = predictors.score_predictors(preds, primary_scale=4.0)
    assert (at_four["loss_ratio"].agrees.k, at_four["loss_ratio"].agrees.n) == (1, 3)
    guided_at_four = at_four["guided_loss"]  # right for run 0, wrong for run 1, abstaining for run 2
    assert (guided_at_four.agrees.k, guided_at_four.agrees.n, guided_at_four.abstained) == (1, 2, 1)
    rate, clear = predictors.base_rate(preds), predictors.base_rate(preds, clear_only=True)
    assert (rate.k, rate.n, clear.k, clear.n) == (3, 6, 3, 5)
    both = predictors.pooled([scores, scores])["guided_loss"]
    assert (both.agrees.k, both.agrees.n, both.abstained, both.per_scale[4.0].n) == (8, 10, 2, 4)


def test_the_section_states_a_constant_predictor_the_base_rate_and_a_predictor_without_data():
    lines = predictors.predictor_lines(_scored_study(), primary_scale=4.0)
    text = "\n".join(lines)
    assert lines[0] == predictors.TITLE and "log(L_self / L_base) on the metric held-out split" in lines[2]
    header = "| predictor | agrees (all points) | agrees (clear points) | at the primary scale (w=4) | abstained |"
    assert header in lines
    assert "| ∅-loss ratio | 3 of 6 (50%" in text and "| 0 of 6 |" in text
    constant = [line for line in lines if "**Constant**" in line]
    assert len(constant) == 1 and 'says "use base"' in constant[0]
    assert "Base rate" in text and "3 of 6 (50%" in text.split("Base rate", 1)[1]
    assert "**checked prior's choice**: no data" in text and "calib_check_fd" in text
    assert "at the primary scale |" in "\n".join(predictors.predictor_lines(_scored_study()))  # no scale: no w


def test_the_section_is_empty_without_any_predictor_and_notes_checked_picking_mix():
    assert predictors.predictor_lines(_frame(_run(0, {2.0: (4.0, 3.0)}, se={2.0: 0.1}))) == []
    picked = _frame(_run(0, {2.0: (4.0, 3.0), 4.0: (4.0, 3.0)}, check={2.0: (9.0, 8.0, 7.0), 4.0: (9.0, 8.0, 8.5)}))
    text = "\n".join(predictors.predictor_lines(picked))
    assert "prior=checked kept mix at 1 of 2 points (self 0, base 1)" in text
    assert not any("**Constant**" in line for line in predictors.predictor_lines(_scored_study()) if "guided" in line)


def test_the_committed_toy2d_study_scores_all_three_predictors():
    """16 runs at w = 2 and 4, each with the ∅ losses, the guided losses and prior=checked's NLL check."""
    frame = load_results(TOY2D)
    preds = predictors.predictions(frame)
    assert len(preds) == 32 and preds["clear"].notna().all()
    scores = predictors.score_predictors(preds)
    for name in predictors.PREDICTORS:
        assert scores[name].agrees.n == 32 and scores[name].abstained == 0
        assert scores[name].agrees.k / scores[name].agrees.n > predictors.base_rate(preds).k / 32
    assert set(preds["checked_pick"]) <= {"self", "base", "mix"} and preds["checked_pick"].notna().all()
    lines = predictors.predictor_lines(frame, 2.0)
    assert len(lines) > 6 and "log(L_self / L_base) on the calibration split" in lines[2]


def test_the_script_prints_each_study_and_writes_the_same_markdown(tmp_path):
    out = tmp_path / "predictors.md"
    done = subprocess.run([sys.executable, str(ROOT / "analysis" / "predictors.py"), str(TOY2D), "--out", str(out)],
                          capture_output=True, text=True, check=True, cwd=ROOT)  # fmt: skip
    assert done.stdout == out.read_text()
    assert f"# {TOY2D}" in done.stdout and "# Combined over 1 studies" in done.stdout
    assert "- checked prior's choice: agrees at 32 of 32" in done.stdout

"""(h) Which predictor tells a user, before sampling, which prior to use? The ∅-loss ratio, the guided loss and the
checked prior's choice, each scored against the measured sign of the swap's benefit per (run, w), per study and
pooled over the studies.

    python analysis/predictors.py results/dropout_vs_prior_gpu results/when_swap_pays_fitted_toy2d \
        [--primary-scale 2] [--out predictors.md]

prints each study's table (the report section of `priorlab.analysis.predictors`) and one combined line per
predictor; --out writes the same markdown to a file.
"""

import argparse
from pathlib import Path

from priorlab.analysis import predictors
from priorlab.analysis.results import load_results
from priorlab.analysis.sign_rule import Proportion


def study_lines(study: Path, primary_scale: float | None) -> tuple[list[str], dict, Proportion]:
    """One study's section (headed by its folder), its scores and its base rate."""
    frame = load_results(study)
    preds = predictors.predictions(frame)
    lines = predictors.predictor_lines(frame, primary_scale) or ["No predictor has data in this study.", ""]
    return [f"# {study}", "", *lines], predictors.score_predictors(preds), predictors.base_rate(preds)


def combined_lines(scores: list[dict], rates: list[Proportion]) -> list[str]:
    """One line per predictor pooled over the studies (points of different studies and metrics added up)."""
    base = Proportion(sum(r.k for r in rates), sum(r.n for r in rates))
    lines = [f"# Combined over {len(scores)} studies", "", f"Base rate (the base prior helped): {base}.", ""]
    for name, s in predictors.pooled(scores).items():
        constant = f"; constant (always {'base' if s.signs[0] > 0 else 'self'})" if s.constant else ""
        lines.append(f"- {predictors.PREDICTORS[name]}: agrees at {s.agrees} of the points it guessed (base rate "
                     f"there {s.base_rate}); clear points {s.agrees_clear}; abstained on {s.abstained} of "
                     f"{s.points}{constant}.")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path, help="study folders holding results.csv")
    parser.add_argument("--primary-scale", type=float, default=2.0, help="the scale of the table's 4th column")
    parser.add_argument("--out", type=Path, help="also write the markdown to this file")
    args = parser.parse_args()
    lines, scores, rates = [], [], []
    for study in args.studies:
        section, score, rate = study_lines(study, args.primary_scale)
        lines += section
        scores.append(score)
        rates.append(rate)
    lines += combined_lines(scores, rates)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

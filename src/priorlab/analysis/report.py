"""runs/NAME/report.md: the headline table, statements with numbers and intervals, and the figures.

Longer than 300 lines because it is the report's outline: every section's order, title and framing text is here,
while the numbers come from `findings`, `other_priors`, `sign_rule`, `predictors` and `validity`."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from scipy import stats

from priorlab import atomic
from priorlab.analysis import figures, sign_rule
from priorlab.analysis.findings import (
    BENEFIT_NOTE,
    DETECTABLE_NOTE,
    benefits,
    findings,
    regime_lines,
    rule_note,
    summary,
)
from priorlab.analysis.other_priors import extra_prior_lines
from priorlab.analysis.predictors import predictor_lines
from priorlab.analysis.results import (
    axis_columns,
    collect_results,
    final_rows,
    has_eval_records,
    load_results,
)
from priorlab.analysis.stats import Estimate, judge, mean_ci, pooled_over_samples
from priorlab.analysis.text import cond_label, interval, markdown_table
from priorlab.analysis.validity import (
    GAIN,
    LOWER_IS_BETTER,
    PAYS,
    Validity,
    check_study,
    comparison_metrics,
    condition_keys,
    study_metric,
)
from priorlab.keys import BASE, SELF
from priorlab.study.layout import study_record


def _fmt_w(w: float) -> str:
    return f"{w:g}"


def headline(
    frame: pd.DataFrame, metric: str = "fd", keys: list[str] | None = None, validity: Validity | None = None
) -> pd.DataFrame:
    """Per condition: best value over scales for each prior (mean and CI over seeds), its best scale by the mean
    over seeds, and Δ best (self − base, per seed). With `validity`, Δ best's interval over samples and whether it
    is a finding: judged alone by both intervals (`stats.judge`), never where the condition failed its validity
    checks or guidance does not pay there."""
    keys = keys or condition_keys(frame)
    final = final_rows(frame)
    sub = final[(final["metric"] == metric) & final["prior"].isin(["self", "base"])]
    se_rows = final[(final["metric"] == f"diff_{metric}_se") & (final["prior"] == BASE)]
    se = se_rows.set_index([*keys, "seed", "guidance_scale"])["value"]
    better_low = metric in LOWER_IS_BETTER
    rows = []
    for cond, g in sub.groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        row = dict(zip(keys, cond, strict=True))
        best = {}
        for prior in ("self", "base"):
            s = g[g["prior"] == prior]
            pick = s.groupby("seed")["value"].idxmin() if better_low else s.groupby("seed")["value"].idxmax()
            best[prior] = s.loc[pick].set_index("seed")[["guidance_scale", "value"]]
            row[f"best {metric} prior={prior}"] = str(mean_ci(best[prior]["value"]))
            mean_by_w = s.groupby("guidance_scale")["value"].mean()
            row[f"w* {prior}"] = _fmt_w(mean_by_w.idxmin() if better_low else mean_by_w.idxmax()) if len(s) else ""
        diff = (best["self"]["value"] - best["base"]["value"]).dropna()
        estimate = mean_ci(diff.values)
        row["Δ best (self − base)"] = str(estimate)
        if validity is not None:
            samples = _best_over_samples(best, diff, lambda seed, w, c=cond: se.get((*c, seed, w), math.nan))
            row["Δ best [CI over samples]"] = interval(samples)
            row["Δ best a finding"] = _best_finding(validity, cond, estimate, samples, diff.values, best)
        rows.append(row)
    return pd.DataFrame(rows)


def _best_over_samples(best: dict[str, pd.DataFrame], diff: pd.Series, se_at) -> Estimate | None:
    """Δ best's interval over samples, pooled from each seed's recorded SE of the paired difference where both
    priors are best at the same scale at every seed (w = 1: the same samples, SE 0); None elsewhere (not recorded)."""
    ws, wb = best["self"]["guidance_scale"].reindex(diff.index), best["base"]["guidance_scale"].reindex(diff.index)
    if diff.empty or not (ws == wb).all():
        return None
    ses = [0.0 if w == 1 else se_at(seed, w) for seed, w in ws.items()]
    return None if any(math.isnan(x) for x in ses) else pooled_over_samples(diff.values, ses)


def _best_finding(
    validity: Validity, cond: tuple, estimate: Estimate, samples: Estimate | None, per_seed, best: dict
) -> str:
    """Whether Δ best is a finding, or why not."""
    if not validity.valid(cond):
        return "no (validity)"
    if validity.guidance_pays(cond) is False:
        return "no (guidance does not pay)"
    verdict = judge(estimate, samples, per_seed)
    differ = not best["self"]["guidance_scale"].equals(best["base"]["guidance_scale"])
    unrecorded = verdict.why_not == "over samples not recorded" and differ
    why = verdict.why_not + (": the priors' best scales differ at some seed" if unrecorded else "")
    return "yes" if verdict.finding else f"no ({why})"


METRIC_NAMES = {"fd": "FD", "nll": "exact NLL (nats)", "accuracy": "accuracy",
                "ideal_mse": "distance to exact guidance (ideal_mse)"}  # fmt: skip
BEST_NOTE = (
    "Δ best is judged alone, as a primary scale is: a finding only if both its 95% intervals, over seeds and over "
    "samples, exclude 0, in a condition that passed its validity checks and where guidance pays. Its interval over "
    "samples pools each seed's recorded SE of the paired difference where both priors are best at the same scale at "
    "every seed (at w=1 the difference is exactly 0); elsewhere it is not recorded, and Δ best is no finding."
)
IDEAL_NOTE = (
    "ideal_mse is the mean squared distance of each sample to the sample that guidance with the true scores gives "
    "from the same noise, at the same scale and with the same sampler: unlike the NLL, which samples collapsing onto "
    "the modes lower, it asks which prior guides closer to exact guidance."
)


def drift_statement(frame: pd.DataFrame) -> list[str]:
    final = final_rows(frame)
    keys = condition_keys(frame)
    out = []
    for cond, g in final.groupby(keys, sort=True):
        cond = cond if isinstance(cond, tuple) else (cond,)
        dis = mean_ci(g[g["metric"] == "disagreement/all"]["value"])
        ls = mean_ci(g[(g["metric"] == "loss/all") & (g["prior"] == SELF)]["value"])
        lb = mean_ci(g[(g["metric"] == "loss/all") & (g["prior"] == BASE)]["value"])
        out.append(f"{cond_label(keys, cond)}: disagreement with the base {dis}; held-out ∅ loss self {ls} vs "
                   f"base {lb}.")  # fmt: skip
    return out


def interval_note(num_seeds: int) -> str:
    """The sentence on the confidence intervals for a study of `num_seeds` seeds, with its Student-t quantile."""
    if num_seeds < 2:
        return f"with {num_seeds} seed there are no intervals over seeds (values show n=1)."
    t = float(stats.t.ppf(0.975, num_seeds - 1))
    return (f"intervals are 95% Student-t over seeds unless marked \"over samples\": with {num_seeds} seeds t = "
            f"{t:.3g}, so each half-width is {t / math.sqrt(num_seeds):.3g} standard deviations of the per-seed "
            "values.")  # fmt: skip


def validity_lines(validity: Validity, metric: str) -> list[str]:
    """The validity section: the checks with their numbers, the verdict, the per-condition table."""
    lines = ["## Validity: can this study answer its question?", "",
             "| check | measured | target | result |", "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {c.name} | {c.value} | {c.target} | {c.mark} |" for c in validity.checks]
    lines.append("")
    failed = [c for c in validity.checks if c.passed is False]
    if validity.study_valid and len(validity.conditions) and validity.conditions["valid"].all():
        lead = "**Every check passed**" if not failed else "**The checks that gate the findings passed**"
        lines.append(f"{lead}: the findings below are results of this design, within the intervals stated.")
    for c in failed:
        lines.append(f"- **{c.name} failed**: {c.value}. {c.failure[:1].upper()}{c.failure[1:]}.")
    lines += regime_lines(validity)
    if not validity.study_valid:
        lines.append("- **No conclusion about priors can be drawn from this study.**")
    elif len(validity.conditions) and not validity.conditions["valid"].any():
        row = validity.conditions.loc[validity.conditions["accuracy"].idxmin()]
        lines.append(f"- **No conclusion about priors can be drawn from this study**: no condition passed "
                     f"(the lowest accuracy {row['accuracy']:.3f}, chance {row['chance']:.3f}).")  # fmt: skip
    lines += [*[f"- {n}" for n in validity.notes], ""]
    if len(validity.conditions):
        lines += [markdown_table(_conditions_table(validity, metric)), ""]
    return lines


def _conditions_table(validity: Validity, metric: str) -> pd.DataFrame:
    """The per-condition table of the validity section; `main` where study.json names main conditions, and the
    guidance-pays columns where the check applies (FD)."""
    table = validity.conditions.copy()
    table["condition"] = [cond_label(validity.keys, c) for c in table["condition"]]
    for col in ("accuracy", "accuracy_w1", "chance", "nll_excess"):
        table[col] = table[col].map(lambda v: f"{v:.3g}")
    columns = {"condition": "condition", "main": "main", "seeds": "seeds",
               "accuracy": f"lowest accuracy at the best prior and w ({metric.upper()})",
               "accuracy_w1": "lowest accuracy unguided", "chance": "chance", "nll_excess": "excess NLL at w=1",
               "best w self": "best w self", "best w base": "best w base", "w inside grid": "w inside grid",
               GAIN: "FD(w=1) − FD(best w self)", PAYS: "guidance pays", "valid": "findings stated"}  # fmt: skip
    if GAIN in table:
        table[GAIN] = table[GAIN].map(str)
    if table["main"].all():
        del columns["main"]
    table = table[[c for c in columns if c in table]].rename(columns=columns)
    if (table["excess NLL at w=1"] == "nan").all():
        table = table.drop(columns="excess NLL at w=1")
    return table


def build_report(study_dir: str | Path) -> Path:
    """Rebuild figures and report.md from results.csv (with the run folders where present: the base's loss curve
    and the sample grids); the validity checks come first and gate every conclusion."""
    study_dir = Path(study_dir)
    if has_eval_records(study_dir):
        collect_results(study_dir)  # the run folders are the source: `priorlab evaluate` adds records after a study
    frame = load_results(study_dir)
    fig_dir = study_dir / "figures"
    meta = study_record(study_dir / "study.json") if (study_dir / "study.json").exists() else {}
    metric = study_metric(frame)
    validity = check_study(study_dir, frame, meta.get("validity"), meta.get("base_seeds"), meta.get("main"))
    primary = meta.get("primary_scale")
    lines = [*_intro(study_dir, frame, meta, metric), *validity_lines(validity, metric)]
    made: dict[str, tuple[str, Path | None]] = {
        "v": ("(v) the base's held-out ∅ loss during training",
              figures.base_curves(study_dir, fig_dir / "v_base_loss.png")),
    }  # fmt: skip
    lines += _finding_sections(frame, validity, primary)
    lines += extra_prior_lines(frame, validity, metric, primary)
    made["h"] = ("(h) the swap's benefit at each guided scale, per condition",
                 figures.benefit_per_scale(benefits(frame, metric), condition_keys(frame), validity.valid, metric,
                                           fig_dir / "h_benefit_per_scale.png"))  # fmt: skip
    for section in (_per_condition_sections(study_dir, frame, fig_dir, metric, validity),
                    sign_rule.swap_sections(frame, fig_dir, validity)):  # fmt: skip
        lines += section[0]
        made.update(section[1])
    lines += predictor_lines(frame, primary)
    lines += ["## Figures", ""]
    for title, path in made.values():
        if path is not None:
            lines += [f"### {title}", "", f"![{title}](figures/{path.name})", ""]
    return atomic.write_text(study_dir / "report.md", "\n".join(lines))


def _intro(study_dir: Path, frame: pd.DataFrame, meta: dict, metric: str) -> list[str]:
    """The title and the paragraph that says what was run and how the intervals are drawn."""
    final = final_rows(frame)
    guided = sorted(w for w in final["guidance_scale"].dropna().unique() if w != 1)
    rates = ", ".join(f"{p:g}" for p in sorted(frame["cond_dropout"].unique()))
    scales = ", ".join(_fmt_w(w) for w in sorted(final["guidance_scale"].dropna().unique()))
    conditions = "".join(f"{a} ∈ {{{', '.join(map(str, sorted(frame[a].unique(), key=str)))}}}, "
                         for a in axis_columns(frame))  # fmt: skip
    base_seeds = meta.get("base_seeds")
    bases = (f" Each fine-tune seed starts from its own base: base seeds {base_seeds}, dealt out in turn, so the "
             "intervals over seeds include the base's training noise." if base_seeds and len(base_seeds) > 1 else
             " Every fine-tune starts from one base, so the intervals over seeds do not include the base's training "
             "noise.")  # fmt: skip
    return [
        f"# Study {meta.get('name', study_dir.name)} (preset {meta.get('preset', '?')})",
        "",
        f"{final['run'].nunique()} fine-tunes: {conditions}cond_dropout ∈ {{{rates}}}, "
        f"seeds {sorted(frame['seed'].unique().tolist())}; guidance scales {{{scales}}}.{bases} "
        f"Guidance scales are ranked by {metric.upper()}. FD, KID, precision and recall use the study's evaluator "
        f'features; {interval_note(frame["seed"].nunique())} Intervals "over samples" pool each run\'s standard '
        "error over its generated samples (a paired bootstrap for FD): they describe these trained models, not "
        "another training run. Scale 1 never uses the prior, so both priors coincide there. "
        + _primary_text(meta.get("primary_scale"), guided),
        "",
    ]


def _finding_sections(frame: pd.DataFrame, validity: Validity, primary: float | None) -> list[str]:
    """One section per compared metric: what counts as a finding, the findings, and every condition and scale."""
    final = final_rows(frame)
    guided = sorted(w for w in final["guidance_scale"].dropna().unique() if w != 1)
    lines: list[str] = []
    for m in comparison_metrics(frame):
        found, table = findings(frame, validity, m, primary)
        note = f"{BENEFIT_NOTE} {rule_note(primary, guided)} {DETECTABLE_NOTE}"
        note += f" {IDEAL_NOTE}" if m == "ideal_mse" else ""
        lines += [f"## Findings: the swap's benefit in {METRIC_NAMES.get(m, m)}", "", note, "",
                  *summary(frame, validity, m, primary),
                  *[f"- {line}" if not line.startswith("  ") else line for line in found], ""]  # fmt: skip
        if len(table):
            lines += ["<details><summary>Every condition and scale</summary>", "", markdown_table(table), "",
                      "</details>", ""]  # fmt: skip
    return lines


def _primary_text(primary: float | None, guided: list[float]) -> str:
    """The sentence on the study's primary guidance scale (study.json's `primary_scale`)."""
    if primary is None:
        return "No primary guidance scale is declared, so every guided scale is secondary."
    if not any(math.isclose(primary, w) for w in guided):
        return f"The declared primary scale w={primary:g} was not evaluated, so every guided scale is secondary."
    return f"The primary guidance scale is w={primary:g}; the other guided scales are secondary."


def _per_condition_sections(
    study_dir: Path, frame: pd.DataFrame, fig_dir: Path, metric: str, validity: Validity
) -> tuple[list, dict]:
    """The headline and drift sections, with figures (a)–(e)."""
    made = {
        "a": (f"(a) {metric.upper()} vs guidance scale", figures.fd_vs_scale(frame, fig_dir / "a_fd_vs_scale.png",
                                                                          metric)),
        "b": (f"(b) best {metric.upper()} vs dropout rate",
              figures.best_fd_vs_dropout(frame, fig_dir / "b_best_fd_vs_dropout.png", metric)),
        "c": ("(c) drift over fine-tuning", figures.drift(frame, fig_dir / "c_drift.png")),
        "d": ("(d) ∅ loss per timestep", figures.loss_per_timestep(frame, fig_dir / "d_loss_per_timestep.png")),
        "e": ("(e) samples, same seeds, prior=self | prior=base",
              figures.sample_grids(study_dir, frame, fig_dir / "e_sample_grids.png")),
    }  # fmt: skip
    final = final_rows(frame)
    lines = []
    for m in [x for x in ("fd", "nll", "accuracy") if (final["metric"] == x).any()]:
        name = {"fd": "FD", "nll": "exact NLL of the samples under the true conditional density",
                "accuracy": "accuracy of the samples (evaluator)"}[m]  # fmt: skip
        table = headline(frame, m, validity=validity)
        first = not lines
        lines += [f"## Headline: best {name} over guidance scales (mean [95% CI over seeds])", "",
                  markdown_table(table), ""]  # fmt: skip
        if first:
            lines += [BEST_NOTE, ""]
        if m == "fd" and regime_lines(validity):
            lines += [*regime_lines(validity), ""]
        if len(table) and ((table["w* self"] == "1") & (table["w* base"] == "1")).any():
            lines += ["Where both priors are best at w=1 they coincide by construction (w=1 never uses the prior): "
                      "guidance did not improve this metric there.", ""]  # fmt: skip
    lines += ["## Drift of the unconditional branch (final step)", "", *[f"- {s}" for s in drift_statement(frame)], ""]
    return lines, made

"""runs/NAME/report.md: the headline table, statements with numbers and intervals, and the figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
from scipy import stats

from priorlab import atomic
from priorlab.analysis import figures, swap
from priorlab.analysis.results import axis_columns, final_rows, load_results
from priorlab.analysis.stats import mean_ci, paired_difference


def _fmt_w(w: float) -> str:
    return f"{w:g}"


def _fmt_axis(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def headline(frame: pd.DataFrame, metric: str = "fd") -> pd.DataFrame:
    """Per dropout rate: best value over scales for each prior (mean and CI over seeds) and its argmin scale."""
    final = final_rows(frame)
    sub = final[(final["metric"] == metric) & final["prior"].isin(["self", "base"])]
    rows = []
    for p, g in sub.groupby("cond_dropout"):
        row = {"cond_dropout": p}
        best = {}
        for prior in ("self", "base"):
            s = g[g["prior"] == prior]
            per_seed = s.loc[s.groupby("seed")["value"].idxmin()]
            best[prior] = per_seed.set_index("seed")["value"]
            row[f"best {metric} prior={prior}"] = str(mean_ci(per_seed["value"]))
            mean_by_w = s.groupby("guidance_scale")["value"].mean()
            row[f"w* {prior}"] = _fmt_w(mean_by_w.idxmin()) if len(mean_by_w) else ""
        diff = (best["self"] - best["base"]).dropna()
        row["Δ best (self − base)"] = str(mean_ci(diff.values))
        rows.append(row)
    return pd.DataFrame(rows)


HIGHER_IS_BETTER = {"accuracy", "precision", "recall"}


def statements(frame: pd.DataFrame, metric: str = "fd") -> list[str]:
    """One sentence per dropout rate: where the base prior helps, hurts, or is within noise (paired over seeds).

    The difference is metric(self) − metric(base); the base helps where it is positive for lower-is-better
    metrics (FD, KID, NLL) and negative for higher-is-better ones (accuracy, precision, recall).
    """
    diffs = paired_difference(final_rows(frame), metric)
    sign = -1 if metric in HIGHER_IS_BETTER else 1
    out = []
    for p, g in diffs.groupby("cond_dropout"):
        helps, hurts, noise = [], [], []
        for _, row in g.sort_values("guidance_scale").iterrows():
            est, w = row["estimate"], row["guidance_scale"]
            if w == 1:
                continue  # identical by construction: scale 1 never evaluates the prior
            text = f"w={_fmt_w(w)}: {est}"
            (helps if est.excludes_zero and sign * est.mean > 0 else hurts if est.excludes_zero else noise).append(text)
        n = int(g["estimate"].iloc[0].n) if len(g) else 0
        parts = [f"**cond_dropout={p:g}** ({n} seeds; {metric.upper()}(self) − {metric.upper()}(base), mean [95% CI]):"]
        parts.append(f"the base prior helps at {'; '.join(helps)}." if helps else "the base prior helps at no scale.")
        if hurts:
            parts.append(f"It hurts at {'; '.join(hurts)}.")
        if noise:
            parts.append(f"Within noise at {'; '.join(noise)}.")
        out.append(" ".join(parts))
    return out


def drift_statement(frame: pd.DataFrame) -> list[str]:
    final = final_rows(frame)
    out = []
    for p, g in final.groupby("cond_dropout"):
        dis = mean_ci(g[g["metric"] == "disagreement/all"]["value"])
        ls = mean_ci(g[(g["metric"] == "loss/all") & (g["prior"] == "self")]["value"])
        lb = mean_ci(g[(g["metric"] == "loss/all") & (g["prior"] == "base")]["value"])
        out.append(f"cond_dropout={p:g}: disagreement with the base {dis}; held-out ∅ loss self {ls} vs base {lb}.")
    return out


def _markdown_table(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in df.values]
    return "\n".join(lines)


def interval_note(num_seeds: int) -> str:
    """The sentence on the confidence intervals for a study of `num_seeds` seeds, with its Student-t quantile."""
    if num_seeds < 2:
        return f"with {num_seeds} seed there are no intervals over seeds (values show n=1)."
    t = float(stats.t.ppf(0.975, num_seeds - 1))
    return (f"intervals are 95% Student-t over seeds: with {num_seeds} seeds t = {t:.3g}, so each half-width is "
            f"{t / math.sqrt(num_seeds):.3g} standard deviations of the per-seed values.")  # fmt: skip


def build_report(study_dir: str | Path) -> Path:
    """Rebuild figures and report.md from results.csv, and figure (e) from the sample grids in the run folders."""
    study_dir = Path(study_dir)
    frame = load_results(study_dir)
    fig_dir = study_dir / "figures"
    meta = json.loads((study_dir / "study.json").read_text()) if (study_dir / "study.json").exists() else {}
    final = final_rows(frame)
    axes = axis_columns(frame)
    rates = ", ".join(f"{p:g}" for p in sorted(frame["cond_dropout"].unique()))
    scales = ", ".join(_fmt_w(w) for w in sorted(final["guidance_scale"].dropna().unique()))
    conditions = "".join(f"{a} ∈ {{{', '.join(map(str, sorted(frame[a].unique(), key=str)))}}}, " for a in axes)
    lines = [
        f"# Study {meta.get('name', study_dir.name)} (preset {meta.get('preset', '?')})",
        "",
        f"{final['run'].nunique()} fine-tunes: {conditions}cond_dropout ∈ {{{rates}}}, "
        f"seeds {sorted(frame['seed'].unique().tolist())}; guidance scales {{{scales}}}. "
        f"FD, KID, precision and recall use the study's evaluator features; {interval_note(frame['seed'].nunique())} "
        "Scale 1 never uses the prior, so both priors coincide there.",
        "",
    ]
    made: dict[str, tuple[str, Path | None]] = {}
    if not axes:
        body, figs = _per_dropout_sections(study_dir, frame, fig_dir)
        lines += body
        made.update(figs)
    swap_lines, swap_figs = _swap_sections(frame, fig_dir)
    lines += swap_lines
    made.update(swap_figs)
    lines += ["## Figures", ""]
    for title, path in made.values():
        if path is not None:
            lines += [f"### {title}", "", f"![{title}](figures/{path.name})", ""]
    return atomic.write_text(study_dir / "report.md", "\n".join(lines))


def _per_dropout_sections(study_dir: Path, frame: pd.DataFrame, fig_dir: Path) -> tuple[list[str], dict]:
    """The headline, where-the-swap-helps and drift sections of a one-base study, with figures (a)–(e)."""
    made = {
        "a": ("(a) FD vs guidance scale", figures.fd_vs_scale(frame, fig_dir / "a_fd_vs_scale.png")),
        "b": ("(b) best FD vs dropout rate", figures.best_fd_vs_dropout(frame, fig_dir / "b_best_fd_vs_dropout.png")),
        "c": ("(c) drift over fine-tuning", figures.drift(frame, fig_dir / "c_drift.png")),
        "d": ("(d) ∅ loss per timestep", figures.loss_per_timestep(frame, fig_dir / "d_loss_per_timestep.png")),
        "e": ("(e) samples, same seeds, prior=self | prior=base",
              figures.sample_grids(study_dir, frame, fig_dir / "e_sample_grids.png")),
    }  # fmt: skip
    final = final_rows(frame)
    lines = []
    metrics = [m for m in ("fd", "nll") if (final["metric"] == m).any()]
    for metric in metrics:
        name = {"fd": "FD", "nll": "exact NLL of the samples under the true conditional density"}[metric]
        lines += [f"## Headline: best {name} over guidance scales", "", _markdown_table(headline(frame, metric)), ""]
    for metric in metrics:
        lines += [f"## Where the base prior helps ({metric.upper()}, lower is better)", "",
                  *[f"- {s}" for s in statements(frame, metric)], ""]  # fmt: skip
    lines += ["## Drift of the unconditional branch (final step)", "", *[f"- {s}" for s in drift_statement(frame)], ""]
    return lines, made


def _swap_sections(frame: pd.DataFrame, fig_dir: Path) -> tuple[list[str], dict]:
    """Per-condition table (several axes), the sign rule and auto/mix against the fixed priors, figures (f), (g)."""
    metric = swap.benefit_metric(frame)
    axes = axis_columns(frame)
    points = swap.swap_points(frame, metric)
    lines: list[str] = []
    made: dict[str, tuple[str, Path | None]] = {}
    if axes:
        lines += [f"## Best {metric.upper()} over guidance scales per condition (mean [95% CI] over seeds)", "",
                  _markdown_table(swap.condition_table(frame, metric)), ""]  # fmt: skip
    if points.empty or points["log_ratio"].isna().all():
        return lines, made
    source = "calibration" if final_rows(frame)["metric"].str.startswith("calib_loss/").any() else "metric held-out"
    rule = swap.sign_rule(points)
    lines += [
        "## When does the swap pay? The sign rule",
        "",
        f"Benefit = {metric.upper()}(self) − {metric.upper()}(base) at each fine-tune's final step and each w ≠ 1 "
        f"(> 0: the base prior helped). Loss ratio = mean over timestep buckets of log(L_self / L_base), the "
        f"held-out ∅ denoising losses on the {source} split (> 0: the base's loss is lower). The rule predicts "
        "equal signs. Intervals are Wilson 95% intervals treating points as independent; points of one run at "
        "several scales are not, so read the per-scale counts too.",
        "",
        f"- all scales: the sign rule held at {rule['all']}.",
        *[f"- w={_fmt_w(w)}: {p}." for w, p in rule.items() if w != "all"],
        *[f"- {key}={_fmt_axis(v)}: {p}." for key in [*axes, "cond_dropout"] if points[key].nunique() > 1
          for v, p in swap.sign_rule(points, key).items() if v != "all"],
        "- Spearman's ρ(log ratio, benefit) = {:.2f} (p = {:.2g}, n = {}).".format(*swap.rank_correlation(points)),
        "",
    ]  # fmt: skip
    made["f"] = ("(f) the swap's benefit vs the ∅ loss ratio",
                 figures.swap_vs_loss_ratio(points, fig_dir / "f_swap_vs_loss_ratio.png", metric))  # fmt: skip
    lines += _fitted_lines(points, metric)
    made["g"] = ("(g) log(L_self / L_base) and the mix weight per timestep bucket",
                 figures.log_ratio_per_bucket(swap.bucket_log_ratios(frame), axes,
                                              fig_dir / "g_log_ratio_per_bucket.png"))  # fmt: skip
    return lines, made


def _fitted_lines(points: pd.DataFrame, metric: str) -> list[str]:
    """The section comparing prior=auto and prior=mix with the better and the worse fixed prior at each point."""
    fitted = [c for c in (swap.fitted_vs_fixed(points, p) for p in swap.FITTED) if c is not None]
    if not fitted:
        return []
    lines = [f"## prior=auto and prior=mix against both fixed priors ({metric.upper()}, lower is better)", ""]
    for c in fitted:
        lines.append(
            f"- **prior={c.prior}** at {c.beats_both.n} (run, w) points: better than both fixed priors at "
            f"{c.beats_both}; equal to the better at {c.ties_better}; worse than the better at {c.worse_than_better} "
            f"(worse than both at {c.worse_than_both}). {metric.upper()}({c.prior}) − min(self, base): "
            f"{c.vs_better}; − self: {c.vs_self}; − base: {c.vs_base} (mean [95% t-CI] over points)."
        )
    return [*lines, ""]


def report_command(cfg) -> Path:
    """`priorlab report runs/NAME`: results.csv (and the runs' sample grids, for figure (e)) → figures, report.md."""
    path = build_report(cfg.study_dir)
    print(f"wrote {path}")
    return path

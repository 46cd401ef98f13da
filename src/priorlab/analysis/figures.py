"""The study's figures (a)–(h) and (v), each a function of the tidy results that writes one PNG.

Longer than 300 lines because it holds one function per figure, with the plotting conventions they share
(colours per prior, bands over seeds, titles); splitting it would scatter those."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from priorlab.analysis.results import axis_columns, bucket_start, extra_priors, final_rows  # noqa: E402
from priorlab.analysis.stats import mean_ci  # noqa: E402
from priorlab.keys import BASE, SELF
from priorlab.priors.modes import DISTILLED
from priorlab.study.layout import axis_label  # noqa: E402

COLORS = {SELF: "tab:red", BASE: "tab:blue", DISTILLED: "tab:olive"}
EXTRA_COLORS = ("tab:green", "tab:purple", "tab:orange", "tab:brown")  # the study's extra priors, in name order
# The values each metric can take: a band (a confidence interval) is drawn inside them, never beyond.
RANGES = {"accuracy": (0.0, 1.0), "precision": (0.0, 1.0), "recall": (0.0, 1.0), "fd": (0.0, np.inf),
          "kid": (0.0, np.inf), "loss": (0.0, np.inf), "disagreement": (0.0, np.inf),
          "ideal_mse": (0.0, np.inf)}  # fmt: skip


def metric_range(metric: str) -> tuple[float, float]:
    """The range of a metric's values (loss/all → loss's); unbounded for those not listed (NLL, benefits)."""
    return RANGES.get(metric.split("/")[0], (-np.inf, np.inf))


def panels(frame: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """One (title, rows) per combination of the study axes other than cond_dropout (one untitled without axes)."""
    axes = axis_columns(frame)
    if not axes:
        return [("", frame)]
    out = []
    for key, g in frame.groupby(axes, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        out.append((", ".join(f"{a}={v}" for a, v in zip(axes, key, strict=True)), g))
    return out


def prior_color(prior: str, extras: list[str]) -> str:
    return COLORS.get(prior) or EXTRA_COLORS[extras.index(prior) % len(EXTRA_COLORS)]


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.rename(path)
    return path


def _legend(ax, fontsize: int) -> None:
    """A legend where the axes hold labelled lines (a figure without any, e.g. one prior's, gets none: matplotlib
    warned)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=fontsize)


def _band(ax, x, groups, label, color, bounds: tuple[float, float] = (-np.inf, np.inf)):
    """Mean over seeds with its 95% t-interval as a band, clipped to the metric's range `bounds`."""
    est = [mean_ci(g) for g in groups]
    mean = np.array([e.mean for e in est])
    ax.plot(x, mean, "o-", color=color, label=label)
    lo, hi = np.array([e.lo for e in est]), np.array([e.hi for e in est])
    if not np.all(np.isnan(lo)):
        ax.fill_between(x, np.clip(lo, *bounds), np.clip(hi, *bounds), color=color, alpha=0.2)


def fd_vs_scale(frame: pd.DataFrame, path: Path, metric: str = "fd") -> Path:
    """(a) The metric against guidance scale, one panel per condition (rows: the other axes; columns: dropout
    rates), prior=self vs prior=base, prior=distilled where the study has guidance-distilled fine-tunes, and each extra
    prior, mean and 95% band over seeds."""
    final = final_rows(frame)
    extras = extra_priors(final[final["metric"] == metric])
    drawn = ["self", "base", *([DISTILLED] if (final["prior"] == DISTILLED).any() else []), *extras]
    sub = final[(final["metric"] == metric) & final["prior"].isin([*drawn, "exact"])]
    rows = panels(sub)
    rates = sorted(sub["cond_dropout"].unique())
    # each panel its own y scale: a prior that fails at one dropout rate must not flatten the others' curves
    fig, axes = plt.subplots(len(rows), len(rates), figsize=(3.2 * len(rates), 2.9 * len(rows)), squeeze=False,
                             layout="constrained")  # fmt: skip
    for row_axes, (title, part) in zip(axes, rows, strict=True):
        for ax, p in zip(row_axes, rates, strict=True):
            for prior in drawn:
                s = part[(part["cond_dropout"] == p) & (part["prior"] == prior)]
                if s.empty:  # prior=distilled in a plain fine-tune's panel
                    continue
                scales = sorted(s["guidance_scale"].unique())
                _band(ax, scales, [s[s["guidance_scale"] == w]["value"] for w in scales], f"prior={prior}",
                      prior_color(prior, extras), metric_range(metric))  # fmt: skip
            exact = part[(part["cond_dropout"] == p) & (part["prior"] == "exact")]
            if len(exact):  # toy2d: guidance with the true scores, from the same seeds
                mean = exact.groupby("guidance_scale")["value"].mean()
                ax.plot(mean.index, mean.values, "k--", lw=1, label="exact scores")
            ax.set_title(f"{title + chr(10) if title else ''}cond_dropout={p:g}", fontsize=8)  # two lines
            ax.set_xlabel("guidance scale w")
        row_axes[0].set_ylabel(metric.upper())
    _legend(axes[0][0], 7)
    return _save(fig, path)


def best_fd_vs_dropout(frame: pd.DataFrame, path: Path, metric: str = "fd") -> Path:
    """(b) The best metric over guidance scales against the dropout rate, both priors, one line pair per value of
    the other axes."""
    final = final_rows(frame)
    sub = final[(final["metric"] == metric) & final["prior"].isin(["self", "base"])]
    pick = "min" if metric not in ("accuracy", "precision", "recall") else "max"
    fig, ax = plt.subplots(figsize=(5, 3.4))
    rates = sorted(sub["cond_dropout"].unique())
    x = np.arange(len(rates))
    styles = ["o-", "s--", "^:", "d-."]
    for i, (title, part) in enumerate(panels(sub)):
        best = part.groupby(["cond_dropout", "seed", "prior"])["value"].agg(pick).reset_index()
        for prior in ("self", "base"):
            s = best[best["prior"] == prior]
            label = f"prior={prior}{', ' + title if title else ''}"
            _band(ax, x, [s[s["cond_dropout"] == p]["value"] for p in rates], label, COLORS[prior],
                  metric_range(metric))  # fmt: skip
            ax.lines[-1].set_linestyle(styles[i % len(styles)][1:])
            ax.lines[-1].set_marker(styles[i % len(styles)][0])
    ax.set_xticks(x, [f"{p:g}" for p in rates])
    ax.set_xlabel("cond_dropout")
    ax.set_ylabel(f"best {metric.upper()} over w")
    _legend(ax, 6)
    return _save(fig, path)


def benefit_per_scale(benefits: pd.DataFrame, keys: list[str], valid, metric: str, path: Path) -> Path | None:
    """(h) The swap's benefit at each guided scale, one line per condition with its 95% band over seeds (> 0: the
    base prior did better). `benefits` holds report.benefits' rows (an `estimate` per condition and scale);
    `valid(cond)` says whether the condition passed its validity checks: those that did not are drawn dashed and
    labelled so, since nothing is concluded from them."""
    if benefits.empty:
        return None
    higher = metric in ("accuracy", "precision", "recall")
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    cmap = plt.get_cmap("viridis")
    groups = list(benefits.groupby(keys, sort=True)) if keys else [((), benefits)]
    for i, (cond, g) in enumerate(groups):
        cond = cond if isinstance(cond, tuple) else (cond,)
        g = g.sort_values("guidance_scale")
        w = g["guidance_scale"].to_numpy(float)
        est = list(g["estimate"])
        mean = np.array([e.mean for e in est])
        lo, hi = np.array([e.lo for e in est]), np.array([e.hi for e in est])
        label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in zip(keys, cond, strict=True))
        ok = valid(cond)
        color = cmap(i / max(1, len(groups) - 1))
        ax.plot(w, mean, "o-" if ok else "o--", color=color, alpha=1.0 if ok else 0.5,
                label=(label or "benefit") + ("" if ok else " (failed validity)"))  # fmt: skip
        if not np.all(np.isnan(lo)):
            ax.fill_between(w, lo, hi, color=color, alpha=0.18 if ok else 0.07)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_xlabel("guidance scale w")
    ax.set_ylabel(f"{metric.upper()}: self − base" if not higher else f"{metric}: base − self")
    ax.set_title("the swap's benefit; > 0: the base prior is better (95% band over seeds)", fontsize=8)
    _legend(ax, 7)
    return _save(fig, path)


def base_curves(study_dir: Path, path: Path) -> Path | None:
    """(v) The held-out ∅ loss of each base at each validation, with the window of the convergence check."""
    from priorlab.analysis.convergence import base_curve, base_runs

    runs = base_runs(study_dir)
    curves = [(run, base_curve(run)) for run in runs]
    curves = [(run, c) for run, c in curves if len(c)]
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for run, c in curves:
        ax.plot(c["step"], c["loss"], "o-", ms=3, label=run.relative_to(study_dir).as_posix())
    last = max(int(c["step"].max()) for _, c in curves)
    ax.axvspan(0.8 * last, last, color="0.9", label="last 20% (the check)")
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out ∅ loss (eps MSE)")
    _legend(ax, 7)
    return _save(fig, path)


def drift(frame: pd.DataFrame, path: Path) -> Path:
    """(c) Drift of the unconditional branch from the base over fine-tuning steps, one line per condition."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    panel_specs = [("disagreement/all", "", "‖eps_self(∅) − eps_base(∅)‖² per element", "disagreement with base"),
                   ("loss/all", "self", "held-out loss of the ∅ branch (eps)", "held-out ∅ loss")]  # fmt: skip
    cmap = plt.get_cmap("viridis")
    groups = [(title, p, part[part["cond_dropout"] == p]) for title, part in panels(frame)
              for p in sorted(part["cond_dropout"].unique())]  # fmt: skip
    for ax, (metric, prior, title, ylabel) in zip(axes, panel_specs, strict=True):
        for i, (axis_title, p, part) in enumerate(groups):
            s = part[(part["metric"] == metric) & (part["prior"] == prior)]
            steps = sorted(s["step"].unique())
            label = f"{axis_label('cond_dropout')}={p:g}{', ' + axis_title if axis_title else ''}"
            _band(ax, steps, [s[s["step"] == t]["value"] for t in steps], label, cmap(i / max(1, len(groups) - 1)),
                  metric_range(metric))  # fmt: skip
        if metric == "loss/all":
            base = frame[(frame["metric"] == "loss/all") & (frame["prior"] == BASE)]
            if len(base):
                ax.axhline(base["value"].mean(), color="k", ls="--", label="base")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel(ylabel)
    _legend(axes[0], 6)
    return _save(fig, path)


def loss_per_timestep(frame: pd.DataFrame, path: Path) -> Path:
    """(d) Held-out denoising loss of the unconditional branch vs the base, per timestep bucket (final step)."""
    final = final_rows(frame)
    sub = final[final["metric"].str.startswith("loss/t=")].copy()
    sub["t"] = sub["metric"].map(bucket_start)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    cmap = plt.get_cmap("viridis")
    groups = [(title, p, part[part["cond_dropout"] == p]) for title, part in panels(sub)
              for p in sorted(part["cond_dropout"].unique())]  # fmt: skip
    for i, (axis_title, p, part) in enumerate(groups):
        s = part[part["prior"] == SELF]
        ts = sorted(s["t"].unique())
        label = f"self, {axis_label('cond_dropout')}={p:g}{', ' + axis_title if axis_title else ''}"
        _band(
            ax, ts, [s[s["t"] == t]["value"] for t in ts], label, cmap(i / max(1, len(groups) - 1)), (1e-12, np.inf)
        )  # log scale: the band stays above 0
    s = sub[sub["prior"] == BASE]
    ts = sorted(s["t"].unique())
    if ts:
        ax.plot(ts, [s[s["t"] == t]["value"].mean() for t in ts], "k--", label="base")
    ax.set_yscale("log")
    ax.set_xlabel("timestep bucket start")
    ax.set_ylabel("eps MSE of ∅ prediction")
    _legend(ax, 7)
    return _save(fig, path)


def sample_grids(study_dir: Path, frame: pd.DataFrame, path: Path) -> Path | None:
    """(e) The final sample grids of the lowest seed of each condition, prior=self beside prior=base (and beside
    each extra prior whose grids every condition has); each grid has one row per class."""
    final = final_rows(frame)
    keys = [*axis_columns(frame), "cond_dropout"]
    firsts = [(cond if isinstance(cond, tuple) else (cond,), g, g.sort_values("seed").iloc[0])
              for cond, g in final.groupby(keys, sort=True)]  # fmt: skip

    def grid(row, prior: str) -> Path:
        return study_dir / row["run"] / "eval" / f"grid_step={int(row['step'])}_prior={prior}.png"

    shown = ("self", "base", *(e for e in extra_priors(final) if all(grid(r, e).exists() for _, _, r in firsts)))
    pairs = []
    for cond, g, row in firsts:
        run = study_dir / row["run"]
        imgs = [grid(row, prior) for prior in shown]
        if all(i.exists() for i in imgs):
            label = ", ".join(f"{axis_label(k)}={v:g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in zip(keys, cond, strict=True))  # fmt: skip
            pairs.append((label, int(row["seed"]), imgs, _grid_scale(run, g), _grid_rows(g)))
    if not pairs:
        return None
    fig, axes = plt.subplots(len(pairs), len(shown), figsize=(4 * len(shown), 2.5 * len(pairs)), squeeze=False)
    for (label, seed, imgs, w, rows), row_axes in zip(pairs, axes, strict=True):
        for ax, img, prior in zip(row_axes, imgs, shown, strict=True):
            pixels = np.asarray(Image.open(img))
            ax.imshow(pixels, cmap="gray")
            scale = f", w={w:g}" if w is not None else ""
            ax.set_title(f"{label}, seed={seed}\nprior={prior}{scale}", fontsize=8)  # two lines: long ones overlap
            ax.set_xticks([])
            if rows:  # one row of samples per class, top to bottom
                step = pixels.shape[0] / rows
                ax.set_yticks([(r + 0.5) * step for r in range(rows)], [str(r) for r in range(rows)], fontsize=5)
                ax.set_ylabel("class", fontsize=7)
            else:
                ax.set_yticks([])
    return _save(fig, path)


def _grid_scale(run: Path, rows: pd.DataFrame) -> float | None:
    """The guidance scale of a run's sample grids: eval.grid_scale from its config, else the largest evaluated."""
    try:
        cfg = OmegaConf.load(run / "config.yaml")
        w = OmegaConf.select(cfg, "eval.grid_scale")
        return float(w) if w is not None else float(max(OmegaConf.select(cfg, "eval.guidance_scales")))
    except Exception:  # noqa: BLE001 - a packed study may lack the configs: fall back to the results
        scales = rows["guidance_scale"].dropna()
        return float(scales.max()) if len(scales) else None


def _grid_rows(frame: pd.DataFrame) -> int | None:
    """Classes of a condition's runs (the rows of their grids), from the num_classes metric."""
    k = frame[frame["metric"] == "num_classes"]["value"]
    return int(k.iloc[0]) if len(k) else None


def swap_vs_loss_ratio(points: pd.DataFrame, path: Path, metric: str = "fd") -> Path | None:
    """(f) The swap's benefit, metric(self) − metric(base), against log(L_self / L_base) of the unconditional
    branches, one point per (run, w) and a least-squares line per guidance scale."""
    p = points.dropna(subset=["benefit", "log_ratio"])
    if p.empty:
        return None
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    scales = sorted(p["guidance_scale"].unique())
    cmap = plt.get_cmap("plasma")
    for i, w in enumerate(scales):
        s = p[p["guidance_scale"] == w]
        color = cmap(i / max(1, len(scales)))
        ax.scatter(s["log_ratio"], s["benefit"], s=14, color=color, alpha=0.7, label=f"w={w:g}")
        if s["log_ratio"].nunique() > 1:
            slope, icept = np.polyfit(s["log_ratio"], s["benefit"], 1)
            xs = np.linspace(s["log_ratio"].min(), s["log_ratio"].max(), 2)
            ax.plot(xs, slope * xs + icept, color=color, lw=1.2)
    ax.axhline(0, color="k", lw=0.6)
    ax.axvline(0, color="k", lw=0.6)
    ax.set_xlabel("mean over t buckets of log(L_self / L_base)  (> 0: base's ∅ loss lower)")
    ax.set_ylabel(f"{metric.upper()}(self) − {metric.upper()}(base)  (> 0: swap helps)")
    ax.set_title("sign rule: points in the upper-right and lower-left quadrants", fontsize=8)
    _legend(ax, 7)
    return _save(fig, path)


def log_ratio_per_bucket(per_bucket: pd.DataFrame, axes: list[str], path: Path) -> Path | None:
    """(g) Per timestep bucket, log(L_self / L_base) on the calibration split and the fitted mix weight, one
    panel per base, one line per other condition (mean over seeds)."""
    if per_bucket.empty:
        return None
    panel_key = axes[0] if axes else None
    panels = sorted(per_bucket[panel_key].unique()) if panel_key else [None]
    line_keys = [*axes[1:], "cond_dropout"] if panel_key else ["cond_dropout"]
    fig, axs = plt.subplots(2, len(panels), figsize=(3.4 * len(panels), 5.2), squeeze=False, sharex=True)
    for col, panel in enumerate(panels):
        sub = per_bucket if panel is None else per_bucket[per_bucket[panel_key] == panel]
        groups = list(sub.groupby(line_keys))
        cmap = plt.get_cmap("viridis")
        for i, (key, g) in enumerate(groups):
            key = key if isinstance(key, tuple) else (key,)
            label = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in zip(line_keys, key, strict=True))  # fmt: skip
            mean = g.groupby("t")[["log_ratio", "mix_weight"]].mean()
            color = cmap(i / max(1, len(groups) - 1))
            axs[0][col].plot(mean.index, mean["log_ratio"], "o-", ms=3, color=color, label=label)
            axs[1][col].plot(mean.index, mean["mix_weight"], "o-", ms=3, color=color)
        axs[0][col].axhline(0, color="k", lw=0.6)
        axs[0][col].set_title(f"{panel_key}={panel}" if panel_key else "", fontsize=9)
        axs[1][col].set_xlabel("timestep bucket start")
        axs[1][col].set_ylim(-0.05, 1.05)
    axs[0][0].set_ylabel("log(L_self / L_base)")
    axs[1][0].set_ylabel("mix: base weight")
    _legend(axs[0][0], 6)
    return _save(fig, path)

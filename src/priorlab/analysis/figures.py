"""The study's figures (a)–(e), each a function of the tidy results that writes one PNG."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image  # noqa: E402

from priorlab.analysis.results import bucket_start, final_rows  # noqa: E402
from priorlab.analysis.stats import mean_ci  # noqa: E402

COLORS = {"self": "tab:red", "base": "tab:blue"}


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.rename(path)
    return path


def _band(ax, x, groups, label, color):
    est = [mean_ci(g) for g in groups]
    mean = np.array([e.mean for e in est])
    ax.plot(x, mean, "o-", color=color, label=label)
    lo, hi = np.array([e.lo for e in est]), np.array([e.hi for e in est])
    if not np.all(np.isnan(lo)):
        ax.fill_between(x, lo, hi, color=color, alpha=0.2)


def fd_vs_scale(frame: pd.DataFrame, path: Path, metric: str = "fd") -> Path:
    """(a) FD against guidance scale, one panel per dropout rate, prior=self vs prior=base."""
    final = final_rows(frame)
    sub = final[(final["metric"] == metric) & final["prior"].isin(["self", "base"])]
    rates = sorted(sub["cond_dropout"].unique())
    fig, axes = plt.subplots(1, len(rates), figsize=(3.2 * len(rates), 3), sharey=True, squeeze=False)
    for ax, p in zip(axes[0], rates, strict=True):
        for prior in ("self", "base"):
            s = sub[(sub["cond_dropout"] == p) & (sub["prior"] == prior)]
            scales = sorted(s["guidance_scale"].unique())
            _band(ax, scales, [s[s["guidance_scale"] == w]["value"] for w in scales], f"prior={prior}", COLORS[prior])
        ax.set_title(f"cond_dropout={p:g}")
        ax.set_xlabel("guidance scale w")
    axes[0][0].set_ylabel(metric.upper())
    axes[0][0].legend()
    return _save(fig, path)


def best_fd_vs_dropout(frame: pd.DataFrame, path: Path, metric: str = "fd") -> Path:
    """(b) The best FD over guidance scales against the dropout rate, both priors."""
    final = final_rows(frame)
    sub = final[(final["metric"] == metric) & final["prior"].isin(["self", "base"])]
    best = sub.groupby(["cond_dropout", "seed", "prior"])["value"].min().reset_index()
    rates = sorted(best["cond_dropout"].unique())
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    x = np.arange(len(rates))
    for prior in ("self", "base"):
        s = best[best["prior"] == prior]
        _band(ax, x, [s[s["cond_dropout"] == p]["value"] for p in rates], f"prior={prior}", COLORS[prior])
    ax.set_xticks(x, [f"{p:g}" for p in rates])
    ax.set_xlabel("cond_dropout")
    ax.set_ylabel(f"best {metric.upper()} over w")
    ax.legend()
    return _save(fig, path)


def drift(frame: pd.DataFrame, path: Path) -> Path:
    """(c) Drift of the unconditional branch from the base over fine-tuning steps, per dropout rate."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    panels = [("disagreement/all", "", "‖eps_self(∅) − eps_base(∅)‖² per element"),
              ("loss/all", "self", "held-out loss of the ∅ branch (eps)")]  # fmt: skip
    cmap = plt.get_cmap("viridis")
    rates = sorted(frame["cond_dropout"].unique())
    for ax, (metric, prior, title) in zip(axes, panels, strict=True):
        sub = frame[(frame["metric"] == metric) & (frame["prior"] == prior)]
        for i, p in enumerate(rates):
            s = sub[sub["cond_dropout"] == p]
            steps = sorted(s["step"].unique())
            _band(ax, steps, [s[s["step"] == t]["value"] for t in steps], f"p={p:g}", cmap(i / max(1, len(rates) - 1)))
        if metric == "loss/all":
            base = frame[(frame["metric"] == "loss/all") & (frame["prior"] == "base")]
            if len(base):
                ax.axhline(base["value"].mean(), color="k", ls="--", label="base")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fine-tuning step")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def loss_per_timestep(frame: pd.DataFrame, path: Path) -> Path:
    """(d) Held-out denoising loss of the unconditional branch vs the base, per timestep bucket (final step)."""
    final = final_rows(frame)
    sub = final[final["metric"].str.startswith("loss/t=")].copy()
    sub["t"] = sub["metric"].map(bucket_start)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    cmap = plt.get_cmap("viridis")
    rates = sorted(sub["cond_dropout"].unique())
    for i, p in enumerate(rates):
        s = sub[(sub["cond_dropout"] == p) & (sub["prior"] == "self")]
        ts = sorted(s["t"].unique())
        _band(ax, ts, [s[s["t"] == t]["value"] for t in ts], f"self, p={p:g}", cmap(i / max(1, len(rates) - 1)))
    s = sub[sub["prior"] == "base"]
    ts = sorted(s["t"].unique())
    if ts:
        ax.plot(ts, [s[s["t"] == t]["value"].mean() for t in ts], "k--", label="base")
    ax.set_yscale("log")
    ax.set_xlabel("timestep bucket start")
    ax.set_ylabel("eps MSE of ∅ prediction")
    ax.legend(fontsize=7)
    return _save(fig, path)


def sample_grids(study_dir: Path, frame: pd.DataFrame, path: Path) -> Path | None:
    """(e) The final sample grids of the lowest seed, prior=self beside prior=base, one row per dropout rate."""
    final = final_rows(frame)
    runs = final.groupby("cond_dropout").apply(lambda g: g.sort_values("seed").iloc[0], include_groups=False)
    pairs = []
    for p, row in runs.iterrows():
        run = study_dir / row["run"]
        imgs = [run / "eval" / f"grid_step={int(row['step'])}_prior={prior}.png" for prior in ("self", "base")]
        if all(i.exists() for i in imgs):
            pairs.append((p, int(row["seed"]), imgs))
    if not pairs:
        return None
    fig, axes = plt.subplots(len(pairs), 2, figsize=(8, 2.2 * len(pairs)), squeeze=False)
    for (p, seed, imgs), row_axes in zip(pairs, axes, strict=True):
        for ax, img, prior in zip(row_axes, imgs, ("self", "base"), strict=True):
            ax.imshow(np.asarray(Image.open(img)), cmap="gray")
            ax.set_title(f"p={p:g}, seed={seed}, prior={prior}", fontsize=8)
            ax.axis("off")
    return _save(fig, path)


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
    ax.legend(fontsize=7)
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
    axs[0][0].legend(fontsize=6)
    return _save(fig, path)

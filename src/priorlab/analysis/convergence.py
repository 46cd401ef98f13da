"""Did a study's bases (and extra priors) converge? Their held-out ∅ loss over the last 20% of training, the first
of the validity checks (`priorlab.analysis.validity`), and the `Check` record every validity check is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

BASE_CHECK = "base converged"  # the name of each base's convergence check, the study-wide gate
PRIOR_CHECK = "extra prior converged"  # each extra prior's, the gate of the findings about extra priors
MEANING_BASE = ("its prior is not the converged model that a swap assumes, so a swap's benefit or harm says little "
                "about a converged base")  # fmt: skip
MEANING_PRIOR = "the report draws no conclusion about the extra priors (the findings about self and base stand)"


@dataclass
class Check:
    """One validity check: what was measured, against what, and what a failure means."""

    name: str
    passed: bool | None  # None: could not be measured
    value: str
    target: str
    failure: str = ""  # the plain consequence when it fails

    def __post_init__(self):
        self.passed = None if self.passed is None else bool(self.passed)

    @property
    def mark(self) -> str:
        return {True: "pass", False: "**FAIL**", None: "not measured"}[self.passed]


def base_runs(study_dir: Path, folder: str = "base") -> list[Path]:
    """The study's finished base runs (base/, base/<name>/, base/seed=<b>/, ...), or with folder="prior" its extra
    priors' (prior/<name>/, prior/<name>/seed=<b>/)."""
    root = study_dir / folder
    return sorted(p.parent for p in root.rglob("done.json")) if root.exists() else []


def base_curve(run_dir: Path) -> pd.DataFrame:
    """The base's held-out ∅ loss at each validation (columns step, loss), steps counted from 1."""
    path = run_dir / "metrics.csv"
    if not path.exists():
        return pd.DataFrame(columns=["step", "loss"])
    log = pd.read_csv(path)
    if "val/loss_uncond" not in log:
        return pd.DataFrame(columns=["step", "loss"])
    rows = log.dropna(subset=["val/loss_uncond"])
    return pd.DataFrame({"step": rows["step"].astype(int) + 1, "loss": rows["val/loss_uncond"].astype(float)})


def base_change(curve: pd.DataFrame, max_steps: int) -> tuple[float, int, int] | None:
    """(L(end) − L(80%)) / L(end) of a base's held-out loss (< 0: it still fell, > 0: it rose), with the two
    steps; None without a validation in the first 80% of training."""
    early = curve[curve["step"] <= 0.8 * max_steps]
    if early.empty or curve.empty:
        return None
    a, b = early.iloc[-1], curve.iloc[-1]
    return (b["loss"] - a["loss"]) / b["loss"], int(a["step"]), int(b["step"])


def check_bases(study_dir: Path, thresholds: dict, priors: bool = False) -> list[Check]:
    """One check per base: the last 20% of its training changed its held-out ∅ loss by less than the threshold.
    With `priors`, the same for each extra prior (PRIOR_CHECK: it gates only the findings about that prior)."""
    limit = thresholds["max_base_change"]
    runs = base_runs(study_dir, "prior" if priors else "base")
    if not runs and not priors:
        return [Check(BASE_CHECK, None, "no finished base run found beside results.csv",
                      f"change over the last 20% < {limit:.0%}")]  # fmt: skip
    check, what = (PRIOR_CHECK, "the extra prior") if priors else (BASE_CHECK, "the base")
    out = []
    for run in runs:
        config = yaml.safe_load((run / "config.yaml").read_text()) if (run / "config.yaml").exists() else {}
        max_steps = int((config.get("trainer") or {}).get("max_steps") or 0)
        found = base_change(base_curve(run), max_steps) if max_steps else None
        name = f"{check} ({run.relative_to(study_dir).as_posix()})"
        target = (f"< {limit:.0%} over the last 20% of {max_steps} steps; EMA start weight < "
                  f"{thresholds['max_ema_start']:.0%}")  # fmt: skip
        if found is None:
            out.append(Check(name, None, "no held-out loss before 80% of training (validate more often)", target))
            continue
        change, a, b = found
        # The held-out loss is measured on the EMA weights: a run shorter than the average's memory barely moves
        # them, and a flat curve would then say nothing. decay^steps is the initial weights' share at the end.
        decay = float(((config.get("callbacks") or {}).get("ema") or {}).get("decay") or 0.0)
        start_share = decay**max_steps
        value = f"held-out ∅ loss {'rose' if change > 0 else 'fell'} {abs(change):.1%} from step {a} to {b}"
        if start_share >= thresholds["max_ema_start"]:
            value += f"; the EMA still holds {start_share:.0%} of the initial weights (decay {decay:g})"
        failure = (f"{what}'s held-out loss was rising at its end, so it was overfitting its training split"
                   if change >= limit else f"{what} was still improving (or too short to tell)")  # fmt: skip
        ok = abs(change) < limit and start_share < thresholds["max_ema_start"]
        meaning = MEANING_PRIOR if priors else MEANING_BASE
        out.append(Check(name, ok, value, target, f"{failure}: {meaning}"))
    return out

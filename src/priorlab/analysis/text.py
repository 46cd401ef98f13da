"""How the reports write conditions and tables (shared by `report` and `other_priors`)."""

from __future__ import annotations

import math

import pandas as pd

from priorlab.study.layout import axis_label


def fmt_axis(value) -> str:
    """A condition's value: floats without trailing zeros, anything else as it is."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def cond_label(keys: list[str], cond: tuple) -> str:
    """A condition as `key=value, ...`, cond_dropout written p: e.g. `train_per_class=5, p=0.1`."""
    return ", ".join(f"{axis_label(k)}={fmt_axis(v)}" for k, v in zip(keys, cond, strict=True))


def markdown_table(df: pd.DataFrame) -> str:
    """A data frame as a Markdown table, floats without trailing zeros."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in df.values]
    return "\n".join(lines)


def interval(e) -> str:
    """An Estimate's interval as `[lo, hi]`, "—" for None (not recorded)."""
    return "—" if e is None else f"[{e.lo + 0.0:.3g}, {e.hi + 0.0:.3g}]"  # + 0.0: no "-0"


def fmt_p(p: float) -> str:
    """A p-value to two significant digits, "—" for nan (no test), "<1e-10" below that."""
    return "—" if math.isnan(p) else "<1e-10" if p < 1e-10 else f"{p:.2g}"

"""The tidy results table: one row per (run, cond_dropout, seed, step, prior, guidance_scale, metric, value).

Studies with several bases or more sweep keys (finetune/base=<name>/<key>=<value>/p=<p>/seed=<s>/) get one more
column per folder level between `run` and `cond_dropout`: `base_name`, then each key (e.g. `max_steps`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from priorlab import atomic
from priorlab.errors import UserError
from priorlab.keys import bucket_bounds, row_parts
from priorlab.study.layout import run_axes

COLUMNS = ["run", "cond_dropout", "seed", "step", "prior", "guidance_scale", "metric", "value"]


def parse_key(key: str) -> tuple[str, str, float]:
    """Split a metric key into (metric, prior, guidance_scale), the table's columns (`priorlab.keys.row_parts`)."""
    return row_parts(key)


def run_rows(run_dir: Path, study_dir: Path) -> list[dict]:
    """Rows of every evaluation JSON a fine-tune wrote (eval/step=<n>_<kind>.json)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    axes = run_axes(run_dir, study_dir)
    rows = []
    for path in sorted((run_dir / "eval").glob("step=*_*.json")):
        record = json.loads(path.read_text())
        for key, value in record["metrics"].items():
            metric, prior, scale = parse_key(key)
            rows.append({"run": str(run_dir.relative_to(study_dir)), **axes,
                         "cond_dropout": float(config["cond_dropout"]), "seed": int(config["seed"]),
                         "step": int(record["step"]), "prior": prior, "guidance_scale": scale, "metric": metric,
                         "value": float(value)})  # fmt: skip
    return rows


def has_eval_records(study_dir: str | Path) -> bool:
    """Whether a study folder holds finished fine-tunes with evaluation records, from which results.csv is built
    (a results folder may hold results.csv alone)."""
    runs = (p.parent for p in (Path(study_dir) / "finetune").rglob("done.json"))
    return any(next((run / "eval").glob("step=*_*.json"), None) is not None for run in runs)


def collect_results(study_dir: str | Path) -> pd.DataFrame:
    """Gather every finished fine-tune of a study into results.csv (written atomically) and return it."""
    study_dir = Path(study_dir)
    runs = sorted(p.parent for p in (study_dir / "finetune").rglob("done.json"))
    axes = list(dict.fromkeys(axis for run in runs for axis in run_axes(run, study_dir)))
    rows = [row for run in runs for row in run_rows(run, study_dir)]
    frame = pd.DataFrame(rows, columns=[COLUMNS[0], *axes, *COLUMNS[1:]])
    order = [*axes, "cond_dropout", "seed", "step", "metric", "prior", "guidance_scale"]
    frame = frame.sort_values(order, kind="stable", key=_natural)
    atomic.write_text(study_dir / "results.csv", frame.to_csv(index=False))
    return frame


def _natural(column: pd.Series) -> pd.Series:
    """Sort folder values numerically where they are numbers (max_steps=50 before 400), a word such as `all`
    after every number (train_per_class=5, 20, all)."""
    if column.dtype != object:
        return column
    numeric = pd.to_numeric(column, errors="coerce")
    if numeric.isna().all():
        return column
    return numeric.fillna(float("inf"))


def axis_columns(frame: pd.DataFrame) -> list[str]:
    """The study-axis columns of a results table (between `run` and `cond_dropout`)."""
    cols = list(frame.columns)
    return cols[cols.index("run") + 1 : cols.index("cond_dropout")]


# The numeric columns: whether each holds whole numbers, and whether it may be empty (NaN is written as "").
NUMBERS = {"cond_dropout": (False, False), "seed": (True, False), "step": (True, False),
           "guidance_scale": (False, True), "value": (False, True)}  # fmt: skip
REBUILD = "run the study's `priorlab study NAME` command again to rebuild it from the run folders"


def load_results(study_dir: str | Path) -> pd.DataFrame:
    """results.csv of a study, checked: its columns, a number wherever one belongs, and every run's last evaluation
    complete; a UserError naming the file and the first problem otherwise."""
    path = Path(study_dir) / "results.csv"
    if not path.exists():
        raise UserError(f"{path} does not exist; run `priorlab study NAME` first (or point at a study folder)")
    try:
        frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    except pd.errors.EmptyDataError as err:
        raise UserError(f"{path} is empty; {REBUILD}") from err
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not a readable results table ({type(err).__name__}); {REBUILD}") from err
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise UserError(f"{path} lacks the column(s) {', '.join(missing)}; {REBUILD}")
    if frame.empty:
        raise UserError(f"{path} holds no rows, only its header; {REBUILD}")
    for column, (whole, optional) in NUMBERS.items():
        values = pd.to_numeric(frame[column], errors="coerce")
        given = frame[column].notna() & (frame[column].astype(str).str.strip().str.lower() != "nan")
        bad = (values.isna() & (given | (not optional))) | (whole & ((values % 1 != 0) | (values.abs() > 2**62)))
        if bad.any():
            row = int(bad.to_numpy().argmax())
            raise UserError(f"{path} line {row + 2}: {column}={frame[column].iloc[row]!r} is not a "
                            f"{'whole ' if whole else ''}number; {REBUILD}")  # fmt: skip
        frame[column] = values.astype("int64") if whole else values.astype("float64")
    for column in ("run", "metric"):
        if frame[column].isna().any():
            raise UserError(f"{path} line {int(frame[column].isna().to_numpy().argmax()) + 2}: {column} is empty; "
                            f"{REBUILD}")  # fmt: skip
    frame["prior"] = frame["prior"].fillna("").astype(str)
    check_complete(frame, path)
    return frame


def check_complete(frame: pd.DataFrame, path: Path) -> None:
    """Every run's last evaluation holds the same (metric, prior, guidance scale) rows, as every study writes them
    (prior=distilled's: every guidance-distilled run the same ones): a truncated or partly deleted table is refused
    instead of reported on."""
    final = final_rows(frame)
    metric = "nll" if (frame["metric"] == "nll").any() else "fd"  # the study's metric (validity.study_metric)
    for needed, priors in ((metric, ("self", "base")), ("accuracy", ("self", "base"))):
        if not (final["metric"].eq(needed) & final["prior"].isin(priors)).any():
            raise UserError(f"{path} has no {needed} rows of prior self or base at the runs' last evaluation, which "
                            f"the report compares; {REBUILD}")  # fmt: skip
    keys = {run: set(zip(g["metric"], g["prior"], g["guidance_scale"].fillna(-1.0), strict=True))
            for run, g in final.groupby("run", sort=False)}  # fmt: skip
    # prior=distilled's rows (and its pairs' SEs) are those of the guidance-distilled fine-tunes only: compared
    # among them, every other row among all runs
    one_pass = {run: {k for k in held if _of_distilled(k)} for run, held in keys.items()}
    for group in ({run: held - one_pass[run] for run, held in keys.items()}, {r: k for r, k in one_pass.items() if k}):
        union = set().union(*group.values())
        short = next((run for run, k in group.items() if k != union), None)
        if short is not None:
            metric, prior, scale = sorted(union - group[short], key=str)[0]
            what = f"{metric}" + (f" prior={prior}" if prior else "") + (f" w={scale:g}" if scale >= 0 else "")
            raise UserError(f"{path} is incomplete: the last evaluation of {short} has no {what}, which other runs "
                            f"have; {REBUILD}")  # fmt: skip


def _of_distilled(key: tuple) -> bool:
    """Whether a (metric, prior, scale) row is prior=distilled's, or the SE of another prior's difference from it."""
    from priorlab.priors.modes import DISTILLED

    metric, prior, _ = key
    return prior == DISTILLED or metric.endswith(f"_vs_{DISTILLED}")


def final_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last evaluation step."""
    last = frame.groupby("run")["step"].transform("max")
    return frame[frame["step"] == last]


def bucket_start(metric: str) -> int | None:
    """The first timestep of a per-bucket metric such as loss/t=100-199."""
    bounds = bucket_bounds(metric) if "/" in metric else None
    return bounds[0] if bounds else None


def extra_priors(frame: pd.DataFrame) -> list[str]:
    """The priors in `frame` that are none of the built-in modes (nor toy2d's exact scores): the study's extra
    priors (`extra_priors`), in name order."""
    from priorlab.priors import MODES

    names = frame["prior"].dropna().unique().tolist()
    return sorted(p for p in names if p and p not in MODES and p != "exact")

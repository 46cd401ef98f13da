"""The tidy results table: one row per (run, cond_dropout, seed, step, prior, guidance_scale, metric, value)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import yaml

from priorlab.errors import UserError

COLUMNS = ["run", "cond_dropout", "seed", "step", "prior", "guidance_scale", "metric", "value"]


def parse_key(key: str) -> tuple[str, str, float]:
    """Split a metric key into (metric, prior, guidance_scale).

    eval/cond/fd/prior=base/w=2.0            → ("fd", "base", 2.0)
    eval/prior/loss/model=self/t=0-99        → ("loss/t=0-99", "self", nan)
    eval/prior/disagreement/all              → ("disagreement/all", "", nan)
    eval/uncond/fd/model=base                → ("uncond_fd", "base", nan)
    """
    parts = key.split("/")[1:]
    prior, scale, rest = "", float("nan"), []
    for part in parts[1:]:
        if part.startswith(("prior=", "model=")):
            prior = part.split("=", 1)[1]
        elif part.startswith("w="):
            scale = float(part[2:])
        else:
            rest.append(part)
    metric = "/".join(rest)
    if parts[0] == "uncond":
        metric = f"uncond_{metric}"
    return metric, prior, scale


def run_rows(run_dir: Path, study_dir: Path) -> list[dict]:
    """Rows of every evaluation JSON a fine-tune wrote (eval/step=<n>_<kind>.json)."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    rows = []
    for path in sorted((run_dir / "eval").glob("step=*_*.json")):
        record = json.loads(path.read_text())
        for key, value in record["metrics"].items():
            metric, prior, scale = parse_key(key)
            rows.append({"run": str(run_dir.relative_to(study_dir)), "cond_dropout": float(config["cond_dropout"]),
                         "seed": int(config["seed"]), "step": int(record["step"]), "prior": prior,
                         "guidance_scale": scale, "metric": metric, "value": float(value)})  # fmt: skip
    return rows


def collect_results(study_dir: str | Path) -> pd.DataFrame:
    """Gather every finished fine-tune of a study into results.csv (written atomically) and return it."""
    study_dir = Path(study_dir)
    runs = sorted(p.parent for p in study_dir.glob("finetune/*/*/done.json"))
    rows = [row for run in runs for row in run_rows(run, study_dir)]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame = frame.sort_values(["cond_dropout", "seed", "step", "metric", "prior", "guidance_scale"], kind="stable")
    tmp = study_dir / ".results.csv.tmp"
    frame.to_csv(tmp, index=False)
    tmp.rename(study_dir / "results.csv")
    return frame


def load_results(study_dir: str | Path) -> pd.DataFrame:
    path = Path(study_dir) / "results.csv"
    if not path.exists():
        raise UserError(f"{path} does not exist; run `priorlab study NAME` first (or point at a study folder)")
    frame = pd.read_csv(path, keep_default_na=False, na_values=[""])
    frame["prior"] = frame["prior"].fillna("").astype(str)
    return frame


def final_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of each run's last evaluation step."""
    last = frame.groupby("run")["step"].transform("max")
    return frame[frame["step"] == last]


def bucket_start(metric: str) -> int | None:
    """The first timestep of a per-bucket metric such as loss/t=100-199."""
    m = re.search(r"/t=(\d+)-(\d+)$", metric)
    return int(m.group(1)) if m else None

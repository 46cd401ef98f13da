"""`priorlab report runs/NAME`: results.csv (and the runs' sample grids, for figure (e)) → figures, report.md."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from priorlab.analysis.report import build_report


def main(cfg: DictConfig) -> Path:
    path = build_report(cfg.study_dir)
    print(f"wrote {path}")
    return path

"""`priorlab study NAME`: an experiment's bases, fine-tunes, results and report (`priorlab.study`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from priorlab.study.run import run_study


def main(cfg: DictConfig) -> Path:
    return run_study(cfg)

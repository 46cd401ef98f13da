"""`priorlab sample model=PIPELINE base=PATH prior=...`: a diffusers pipeline's outputs with its unconditional
prediction swapped (`priorlab.pipelines.sample` holds the command's options and the sampling)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from priorlab.pipelines.sample import sample_command


def main(cfg: DictConfig) -> Path:
    return sample_command(cfg)

"""`priorlab export model=PATH out=FOLDER`: a priorlab model as a diffusers pipeline (`priorlab.pipelines.export`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from priorlab.errors import UserError
from priorlab.pipelines.export import export_pipeline


def main(cfg: DictConfig) -> Path:
    if cfg.out is None:
        raise UserError("out is required: out=FOLDER, the pipeline folder to write")
    names = cfg.get("class_names")
    if names is not None and not OmegaConf.is_list(names):
        raise UserError(f"class_names={names} must be a list of names, one per class: class_names=[cat,dog]")
    names = OmegaConf.to_container(names) if names is not None else None
    out = export_pipeline(str(cfg.model_dir), str(cfg.out), bool(cfg.overwrite), names)
    print(f"wrote the diffusers pipeline of {cfg.model_dir} to {out}")
    return out

"""`priorlab train-evaluator data=...`: train (or reuse) the evaluator of a data set, the feature network and
classifier of FD and accuracy, cached where evaluations find it (`priorlab.evaluation.setup`)."""

from __future__ import annotations

from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig

from priorlab.errors import UserError
from priorlab.evaluation.features import describe_evaluator
from priorlab.evaluation.setup import COMMAND, evaluator_dir, identity_diff, train_and_cache_evaluator


def main(cfg: DictConfig) -> Path:
    """Train (or reuse) the evaluator of a data set and print its held-out accuracy."""
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    out = Path(cfg.out) if cfg.out else evaluator_dir(cfg.paths.runs, datamodule)
    desc = describe_evaluator(out)
    if desc is not None and not cfg.force:
        diff = identity_diff(desc.get("identity"), datamodule.identity())
        if not diff:
            msg = f"evaluator for {datamodule.name} already at {out} (held-out accuracy {desc['accuracy']:.4f})"
            print(msg + "; force=true retrains")
            return out
        if desc.get("made_by") == COMMAND:
            raise UserError(f"the evaluator at {out} was trained on other data ({diff}); force=true retrains it for "
                            "this data, or give this data another data.name or out=")  # fmt: skip
    ev = train_and_cache_evaluator(out, datamodule, steps=cfg.steps, seed=cfg.seed, progress=True, made_by=COMMAND)
    print(f"evaluator for {datamodule.name} written to {out}: held-out accuracy {ev.accuracy:.4f}")
    return out

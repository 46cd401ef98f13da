"""Building what an evaluation needs: the evaluator (trained and cached on first use) and the base prior."""

from __future__ import annotations

from pathlib import Path

import torch

from priorlab.data.base import TensorDataModule
from priorlab.evaluation.features import Evaluator, fit_classifier, load_evaluator, save_evaluator
from priorlab.guidance import Prior, check_prior_fits
from priorlab.models.io import SavedModel


def evaluator_dir(runs: str | Path, datamodule: TensorDataModule) -> Path:
    return Path(runs) / "evaluators" / datamodule.name


def ensure_evaluator(
    path: str | Path, datamodule: TensorDataModule, steps: int = 1500, progress: bool = False
) -> Evaluator:
    """Load the cached evaluator at `path`, training and caching it first when it is missing."""
    path = Path(path)
    if not (path / "evaluator.json").exists():
        train_and_cache_evaluator(path, datamodule, steps=steps, progress=progress)
    return load_evaluator(path)


def train_and_cache_evaluator(
    path: str | Path, datamodule: TensorDataModule, steps: int = 1500, seed: int = 0, progress: bool = False
) -> Evaluator:
    """Train the domain classifier on the train split, measure held-out accuracy, cache it with reference features."""
    datamodule.setup()
    train, val = datamodule.train_set.tensors, datamodule.val_set.tensors
    net, acc = fit_classifier(train, val, datamodule.num_classes, steps=steps, seed=seed, progress=progress)
    x, y = datamodule.all_data()
    with torch.no_grad():
        ref = torch.cat([net.features(c) for c in x.split(1024)])
    ev = Evaluator(net, ref, y, acc)
    save_evaluator(ev, path, {"data": datamodule.name, "steps": steps, "seed": seed, "num_reference": len(x)})
    return ev


def make_prior(model: SavedModel | tuple, base: SavedModel | None, channels: slice | None = None) -> Prior | None:
    """The base as a Prior for `model` (timesteps matched by ᾱ when the schedules differ)."""
    if base is None:
        return None
    denoiser, scheduler = (model.denoiser, model.scheduler) if isinstance(model, SavedModel) else model
    prior = Prior(base.denoiser, base.scheduler, scheduler.alphas_cumprod, channels)
    check_prior_fits(denoiser.sample_shape, base.denoiser.sample_shape, prior)
    return prior

"""Building what an evaluation needs: the evaluator (trained and cached on first use) and the base prior."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from priorlab.data.base import TensorDataModule
from priorlab.errors import UserError
from priorlab.evaluation.features import (
    Evaluator,
    describe_evaluator,
    fit_classifier,
    load_evaluator,
    save_evaluator,
)
from priorlab.models.io import SavedModel
from priorlab.priors import DenoiserPrior, check_prior_fits


def evaluator_dir(runs: str | Path, datamodule: TensorDataModule) -> Path:
    return Path(runs) / "evaluators" / datamodule.name


AUTO, COMMAND = "auto", "train-evaluator"  # who made a cached evaluator: trained on first use, or on request


def identity_diff(cached: dict | None, identity: dict) -> str:
    """The data settings in which a cached evaluator's identity differs from `identity` ("" when equal)."""
    if cached is None:
        return "it records no data settings (made by an older priorlab)"
    identity = json.loads(json.dumps(identity))  # as it reads back from evaluator.json (tuples become lists)
    keys = [k for k in dict.fromkeys([*cached, *identity]) if cached.get(k) != identity.get(k)]
    return "; ".join(f"{k}: {cached.get(k)!r} (cached) vs {identity.get(k)!r}" for k in keys)


def ensure_evaluator(
    path: str | Path, datamodule: TensorDataModule, steps: int = 1500, progress: bool = False
) -> Evaluator:
    """The cached evaluator at `path` when it was made from this data (the same `identity()`).

    A missing one is trained and cached. One made from other data is retrained when it was made automatically
    (here), and an error when it was made by `priorlab train-evaluator`, which is never overwritten silently. One
    made automatically with another number of training steps is retrained too.
    """
    path = Path(path)
    desc = describe_evaluator(path)
    if desc is not None:
        diff = identity_diff(desc.get("identity"), datamodule.identity())
        if not diff and desc.get("made_by") != COMMAND and desc.get("steps", steps) != steps:
            diff = f"steps: {desc.get('steps')!r} (cached) vs {steps!r}"
        if not diff:
            return load_evaluator(path)
        if desc.get("made_by") == COMMAND:
            raise UserError(
                f"the evaluator at {path} was trained on other data ({diff}); run `priorlab train-evaluator "
                "data=... force=true` to retrain it for this data, or give this data another data.name"
            )
        print(f"the evaluator at {path} was made from other data or settings ({diff}); retraining it")
    train_and_cache_evaluator(path, datamodule, steps=steps, progress=progress)
    return load_evaluator(path)


def train_and_cache_evaluator(
    path: str | Path, datamodule: TensorDataModule, steps: int = 1500, seed: int = 0, progress: bool = False,
    made_by: str = AUTO,
) -> Evaluator:  # fmt: skip
    """Train the domain classifier on the train split, measure held-out accuracy, cache it with reference features
    and the data's identity."""
    datamodule.setup()
    train, val = datamodule.full_train_set.tensors, datamodule.val_set.tensors
    net, acc = fit_classifier(train, val, datamodule.num_classes, steps=steps, seed=seed, progress=progress)
    x, y = datamodule.all_data()
    with torch.no_grad():
        ref = torch.cat([net.features(c) for c in x.split(1024)])
    ev = Evaluator(net, ref, y, acc)
    save_evaluator(ev, path, {"data": datamodule.name, "identity": datamodule.identity(), "made_by": made_by,
                              "steps": steps, "seed": seed, "num_reference": len(x)})  # fmt: skip
    return ev


def make_prior_net(model: SavedModel | tuple, base: SavedModel | None,
                   channels: slice | None = None) -> DenoiserPrior | None:  # fmt: skip
    """The base as the prior network of `model` (queried at its timestep of closest ᾱ)."""
    if base is None:
        return None
    denoiser, scheduler = (model.denoiser, model.scheduler) if isinstance(model, SavedModel) else model
    prior_net = DenoiserPrior(base.denoiser, base.scheduler, scheduler.alphas_cumprod, channels)
    check_prior_fits(denoiser.sample_shape, base.denoiser.sample_shape, prior_net)
    return prior_net

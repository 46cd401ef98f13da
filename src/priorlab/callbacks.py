"""Training callbacks that are not evaluation: writing the denoiser in diffusers format."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import EMAWeightAveraging

from priorlab.models.io import save_denoiser


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging that also puts the average into the module at the end of fit.

    Lightning copies the average at `on_train_end`, which does not run when a run is resumed from a
    checkpoint taken at its last step; copying again at `on_fit_end` (idempotent otherwise) makes the saved
    and evaluated weights the EMA weights in both cases. List it before callbacks that use the weights.
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None:
            self._copy_average_to_current(pl_module)


class SaveDenoiser(L.Callback):
    """At the end of fit, save the (EMA-averaged, when EMA is on) denoiser to `path` in diffusers format.

    Lightning's EMAWeightAveraging copies the average into the module at `on_train_end`, which runs before
    `on_fit_end`, so the saved weights are the EMA weights.

    Args:
        path: the model folder to write.
        meta: extra entries for priorlab.json (stage, cond_dropout, base path and hash).
    """

    def __init__(self, path: str | Path, meta: dict | None = None):
        self.path = Path(path)
        self.meta = meta or {}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            save_denoiser(pl_module.denoiser, pl_module.scheduler, self.path, step=trainer.global_step, **self.meta)
        trainer.strategy.barrier()

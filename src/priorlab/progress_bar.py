"""The training progress bar: the run's steps out of trainer.max_steps, with the time left."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from priorlab.checks import whole


class StepProgressBar(TQDMProgressBar):
    """Lightning's TQDMProgressBar counting the run's optimizer steps (`step 120/400`) rather than epochs.

    priorlab's runs are set by trainer.max_steps (max_epochs=-1), for which Lightning's bars read `Epoch 0/-2`.
    This bar's total is max_steps and its count the trainer's global step, so a resumed run starts where it
    stopped. train/loss is read for display on the first step and every `metrics_every_n_steps` steps only:
    reading a GPU metric waits for the GPU to finish its queued work (priorlab logs nothing with prog_bar=True).

    Args:
        metrics_every_n_steps: steps between readings of train/loss (the presets: trainer.log_every_n_steps).
        refresh_rate: steps between redraws of the count.
    """

    BAR_FORMAT = "step {n}/{total} |{bar:20}| {elapsed}<{remaining}, {rate_fmt}{postfix}"

    def __init__(self, metrics_every_n_steps: int = 50, refresh_rate: int = 1, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics_every_n_steps = whole(metrics_every_n_steps, "callbacks.progress.metrics_every_n_steps", 1)

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.bar_format = self.BAR_FORMAT
        return bar

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # the rate counts this session's steps

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step, bar = trainer.global_step, self.train_progress_bar
        if step == 1 or step % self.metrics_every_n_steps == 0:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
        if step % self.refresh_rate == 0 or step == bar.total:
            bar.n = step
            bar.refresh()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        items.pop("v_num", None)
        loss = trainer.callback_metrics.get("train/loss")
        if loss is not None:
            items["train/loss"] = f"{float(loss):.4g}"
        return items

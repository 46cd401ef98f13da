"""The training progress bar: Lightning's TQDMProgressBar counting optimizer steps, drawn through
`priorlab.progress` (a live bar on a terminal, ten lines in a log file)."""

from __future__ import annotations

import sys

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

from priorlab.checks import whole
from priorlab.progress import progress_bar


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

    STEP_FORMAT = "step {n}/{total} |{bar:20}| {elapsed}<{remaining}, {rate_fmt}{postfix}"

    def __init__(self, metrics_every_n_steps: int = 50, refresh_rate: int = 1, **kwargs):
        super().__init__(refresh_rate=refresh_rate, **kwargs)
        self.metrics_every_n_steps = whole(metrics_every_n_steps, "callbacks.progress.metrics_every_n_steps", 1)

    # Lightning's bars, made through `priorlab.progress` (its keywords otherwise): live on a terminal; in a file,
    # ten lines of training and one line per validation (none for the sanity check).
    def _bar(self, lines: int, **kwargs) -> Tqdm:
        kwargs = {"disable": self.is_disabled, "dynamic_ncols": True, "file": sys.stdout, **kwargs}
        return progress_bar(lines=lines, live=Tqdm, **kwargs)

    def init_train_tqdm(self) -> Tqdm:
        # the train bar only in STEP_FORMAT: validation bars keep Lightning's format
        # the total and count here as well as at the epoch's start: a run resumed within its epoch does not start
        # the epoch again (resumed runs read `step 1001/None`)
        max_steps = self.trainer.max_steps
        return self._bar(10, desc="step", position=2 * self.process_position, leave=True, smoothing=0,
                         bar_format=self.STEP_FORMAT, total=max_steps if max_steps > 0 else None,
                         initial=self.trainer.global_step)  # fmt: skip

    def init_validation_tqdm(self) -> Tqdm:
        has_main_bar = self.trainer.state.fn != "validate"
        return self._bar(1, desc=self.validation_description, position=2 * self.process_position + has_main_bar,
                         leave=not has_main_bar, bar_format=self.BAR_FORMAT)  # fmt: skip

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(0, desc=self.sanity_check_description, position=2 * self.process_position, leave=False,
                         bar_format=self.BAR_FORMAT)  # fmt: skip

    def on_train_epoch_start(self, trainer: L.Trainer, *_) -> None:
        super().on_train_epoch_start(trainer)  # Lightning's count: the epoch's batches (of an endless epoch: None)
        bar = self.train_progress_bar
        bar.set_description("step", refresh=False)  # Lightning's `Epoch 0`: a file's lines show it
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

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)  # closes the bar: its last line ends
        # written out now, not when the process exits: a study prints its own lines on the same output when this
        # run's done.json appears, and they would otherwise follow the bar on one line
        for stream in (sys.stdout, sys.stderr):
            stream.flush()

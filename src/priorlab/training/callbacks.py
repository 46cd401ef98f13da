"""Training callbacks that are not evaluation: atomic checkpoints, EMA, the denoiser in diffusers format, throughput
and divergence (the progress bar: `priorlab.training.progress_bar`)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.plugins.io import CheckpointIO

from priorlab.checks import number, whole
from priorlab.errors import UserError
from priorlab.models.io import save_denoiser
from priorlab.training import lightning_private


class AtomicCheckpointIO(CheckpointIO):
    """A CheckpointIO that writes through another one to a temporary sibling, then renames it into place."""

    def __init__(self, inner: CheckpointIO):
        self.inner = inner

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        tmp = f"{path}.tmp"
        self.inner.save_checkpoint(checkpoint, tmp, storage_options=storage_options)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with every checkpoint of the run written to a temporary file that is then renamed
    into place, so a process killed while saving leaves the previous checkpoint whole, never a truncated one.

    At setup it wraps the strategy's CheckpointIO (Lightning's public plugin interface for writing checkpoints) in
    `AtomicCheckpointIO`; the strategy writes on rank 0 only, as before."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(trainer.strategy.checkpoint_io)


class EMA(EMAWeightAveraging):
    """Lightning's EMAWeightAveraging that also puts the average into the module at the end of fit.

    Lightning copies the average at `on_train_end`, which does not run when a run is resumed from a
    checkpoint taken at its last step; copying again at `on_fit_end` (idempotent otherwise) makes the saved
    and evaluated weights the EMA weights in both cases. List it before callbacks that use the weights.

    The update is one fused `torch._foreach_lerp_` over all floating-point parameters and buffers, with no
    host-device synchronisation: Lightning's version calls `AveragedModel.update_parameters`, which applies the
    average tensor by tensor and reads its step counter from the GPU twice per step, stalling the queue of
    kernels at every optimizer step (`bench/gpu.py --ablate` times both). The average is the same,
    avg ← avg + (1 − decay) · (θ − avg), starting from a copy of θ at the first update.
    """

    def __init__(self, decay: float = 0.999, use_buffers: bool = True, **kwargs):
        if number(decay, "callbacks.ema.decay", strict=False) > 1:
            raise UserError(f"callbacks.ema.decay={decay} must lie in [0, 1]")
        super().__init__(decay=decay, use_buffers=use_buffers, **kwargs)
        self.decay = decay
        self.use_buffers = use_buffers
        self._count: int | None = None  # updates so far, read once from the averaged model's counter
        self._pairs: tuple | None = None  # (key, float dst/src lists, other dst/src lists), built once

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._count = None  # after a checkpoint restore the counter may differ
        self._pairs = None
        super().on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step_idx = trainer.global_step - 1
        if trainer.global_step > lightning_private.latest_update_step(self) and self.should_update(step_idx=step_idx):
            self.update_average(pl_module)
            lightning_private.set_latest_update_step(self, trainer.global_step)

    @torch.no_grad()
    def update_average(self, pl_module: L.LightningModule) -> None:
        """One EMA step of the averaged model towards the module's current weights."""
        avg = lightning_private.average_model(self)
        if self._count is None:
            self._count = int(avg.n_averaged)
        (dst_f, src_f), (dst_o, src_o) = self._tensor_pairs(avg, pl_module)
        if self._count == 0:
            torch._foreach_copy_(dst_f + dst_o, src_f + src_o)
        else:
            if dst_f:
                torch._foreach_lerp_(dst_f, src_f, 1.0 - self.decay)
            if dst_o:
                torch._foreach_copy_(dst_o, src_o)
        avg.n_averaged.add_(1)
        self._count += 1

    def _tensor_pairs(self, avg, pl_module: L.LightningModule) -> tuple:
        """The averaged tensors and the module's, split into floating-point (averaged) and other (copied).

        Built once and kept while the two models are the same objects on the same device: walking the modules'
        parameters at every step cost more host time than the fused update itself. (The optimizer updates the
        parameters in place, so the detached views stay current.)
        """
        first = next(pl_module.parameters())  # storage replaced (a cast, an assigning load) → build again
        key = (id(avg), id(pl_module), pl_module.device, first.data_ptr(), first.dtype)
        if self._pairs is not None and self._pairs[0] == key:
            return self._pairs[1]
        dst = [*avg.module.parameters(), *(avg.module.buffers() if self.use_buffers else [])]
        src = [*pl_module.parameters(), *(pl_module.buffers() if self.use_buffers else [])]
        same_device = all(d.device == s.device for d, s in zip(dst, src, strict=True))
        # an average kept on another device: the module's tensors are copied to it at every update
        src = [s.detach().to(d.device) for d, s in zip(dst, src, strict=True)]
        floats = [i for i, d in enumerate(dst) if d.is_floating_point()]
        others = [i for i, d in enumerate(dst) if not d.is_floating_point()]
        split = tuple(([dst[i] for i in idx], [src[i] for i in idx]) for idx in (floats, others))
        if same_device:
            self._pairs = (key, split)
        return split

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if lightning_private.average_model(self) is not None:
            super().on_train_end(trainer, pl_module)  # WeightAveraging's copy of the average into the module


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


class Throughput(L.Callback):
    """Training images per second over all processes, after `warmup` steps; logged and written to a JSON.

    Time from the start of each validation to the next training batch is excluded: validation, the evaluation
    callbacks, and the checkpoint that ModelCheckpoint writes after validation (Lightning runs checkpoint
    callbacks last, after this one's `on_validation_end`). The figure is the training loop's own pace.

    Args:
        path: where to write {images_per_s, images_per_s_per_device, world_size, steps, seconds}.
        warmup: steps excluded from the timing (compilation, allocator warm-up).
        clock: seconds from a fixed start; the tests give one that they advance themselves.
    """

    def __init__(self, path: str | Path, warmup: int = 20, clock: Callable[[], float] = time.perf_counter):
        self.path = Path(path)
        self.warmup = whole(warmup, "callbacks.throughput.warmup", 0)
        self.clock = clock
        self.start: float | None = None
        self.start_step = 0
        self.images = 0
        self.paused = 0.0
        self.pause_start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        if self.pause_start is not None:  # validation, evaluation and the checkpoint written after them are over
            self.paused += self.clock() - self.pause_start
            self.pause_start = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self.start is None:  # the only per-step synchronisation is this one, when timing starts
            if trainer.global_step >= self.warmup:
                _sync(pl_module)
                self.start, self.start_step = self.clock(), trainer.global_step
            return
        self.images += len(batch[0]) * trainer.world_size
        self.end = self.clock()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.start is not None and self.pause_start is None:
            _sync(pl_module)
            self.pause_start = self.clock()

    def measured(self) -> dict | None:
        """The figures so far, or None before two timed steps."""
        if self.start is None or self.end is None or self.images == 0:
            return None
        seconds = self.end - self.start - self.paused
        return {"images_per_s": self.images / seconds, "seconds": seconds}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.pause_start is not None:  # training ended with a validation: its start ends the timing
            self.end, self.pause_start = self.pause_start, None
        elif self.end is not None:
            _sync(pl_module)  # the queued steps finish
            self.end = self.clock()
        result = self.measured()
        if result is None:
            return
        rate = result["images_per_s"]
        result.update({"images_per_s_per_device": rate / trainer.world_size, "world_size": trainer.world_size,
                       "steps": trainer.global_step - self.start_step})  # fmt: skip
        for logger in trainer.loggers:
            logger.log_metrics({"perf/images_per_s": rate}, step=trainer.global_step)
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(result, indent=1))


def _sync(pl_module: L.LightningModule) -> None:
    if pl_module.device.type == "cuda":
        torch.cuda.synchronize(pl_module.device)


class DivergenceWatch(L.Callback):
    """Notices a training that diverged without a NaN (optimizer.lr=10000 ended at a loss of 7.7e15, marked done).

    It keeps the lowest training loss of the first `window` steps and the losses of the last `window` steps on the
    device (no sync per step); `verdict()` at the end compares the last window's mean with that lowest loss (a run
    may diverge within its first steps): above `factor` times it, the run diverged, returned as a record for
    done.json. The lowest loss and the count of first steps seen travel with the checkpoint, so a resumed run
    compares with the run's own start, whenever its checkpoints were written.
    """

    def __init__(self, window: int = 20, factor: float = 10.0):
        from collections import deque

        self.window, self.factor = window, factor
        self.seen = 0  # steps of the first window seen so far
        self.low: torch.Tensor | float | None = None  # their lowest loss (a float when restored from a checkpoint)
        self.last: deque = deque(maxlen=window)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        loss = loss.detach().float()
        if self.seen < self.window:
            low = loss.new_tensor(self.low) if isinstance(self.low, float) else self.low
            self.low = loss if low is None else torch.minimum(low, loss)
            self.seen += 1
        self.last.append(loss)

    def state_dict(self) -> dict:
        return {"first_low": None if self.low is None else float(self.low), "first_seen": self.seen}

    def load_state_dict(self, state: dict) -> None:
        self.low, self.seen = state.get("first_low"), state.get("first_seen", self.window)

    def verdict(self) -> dict | None:
        """{"first_loss", "last_loss", "factor", "window"} when the loss ended `factor` times above its start, else
        None."""
        if self.low is None or len(self.last) < self.window:
            return None
        first, last = float(self.low), float(torch.stack(list(self.last)).mean())
        if not last > self.factor * first:
            return None
        return {"first_loss": first, "last_loss": last, "factor": self.factor, "window": self.window}

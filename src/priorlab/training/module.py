"""DiffusionModule: one LightningModule for the base (every label null) and the fine-tune (dropout p)."""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser, drop_labels, label_tables
from priorlab.seeds import noise_seed, validation_seed
from priorlab.training.distill import DistillTeacher

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay CUDA graphs


class DiffusionModule(L.LightningModule):
    """Denoising training of a class-conditional denoiser with conditioning dropout.

    A base model is this module with `cond_dropout=1` (every label replaced by the null class, so it learns
    the unconditional model only); a fine-tune starts from the base's weights (`init_from_base`) with a
    smaller `cond_dropout`, the fraction of labels replaced by null at each step.

    Args:
        denoiser: the network with its null class.
        scheduler: the diffusers noise schedule (its ᾱ_t and training timestep count are used).
        optimizer: a partial optimizer, called with the parameters.
        cond_dropout: probability p of replacing a label by the null class during training.
        compile: wrap the network in torch.compile (GPU runs): true (torch's default mode) or a mode name, e.g.
            "reduce-overhead", which replays the compiled forward and backward passes from CUDA graphs.
        channels_last: keep convolution weights and inputs in channels-last memory format (GPU runs).
        label_lr_scale: the learning rate of the label-embedding tables as a multiple of the optimizer's. A
            fine-tune's class rows all start at the base's null row (`init_from_base`) and must move apart before
            the classes can steer anything; at the rate that suits the pretrained weights they barely move in a
            short fine-tune, so new embeddings are commonly given a higher rate.
        lr_schedule: "constant", or "cosine": every group's rate decays from its value to 0 along a half cosine
            over trainer.max_steps, so that training ends settled rather than at full rate.
        seed: seeds the noise, timesteps and dropout of each step, drawn from (seed, step, rank), and the batches,
            drawn from (seed, data.split_seed, step) (`data.base.StepBatchSampler`), so a run resumed from a
            checkpoint continues exactly as an unbroken one and each seed of a sweep sees its own data order.
        distill: with `guidance_distill`, the frozen base, the teacher and the settings with which the denoiser
            (which takes the guidance scale as an input) also learns the base-guided prediction
            (`training.distill`); the scales are drawn from the step's generator after the dropout, the teacher
            follows the weights after each step and travels with the checkpoint.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        scheduler: DDPMScheduler,
        optimizer: Callable[..., torch.optim.Optimizer],
        cond_dropout: float,
        compile: bool | str = False,
        seed: int = 0,
        channels_last: bool = False,
        label_lr_scale: float = 1.0,
        lr_schedule: str = "constant",
        distill: DistillTeacher | None = None,
    ):
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise UserError(f"lr_schedule={lr_schedule!r} is unknown; use constant or cosine")
        if not label_lr_scale > 0:
            raise UserError(
                f"label_lr_scale={label_lr_scale} must be positive (1 trains the label rows at optimizer.lr)"
            )
        if not 0.0 <= cond_dropout <= 1.0:
            raise UserError(f"cond_dropout={cond_dropout} is outside [0, 1]; pass a rate such as cond_dropout=0.1")
        if scheduler.config.prediction_type != denoiser.prediction_type:
            raise UserError(
                f"the schedule predicts {scheduler.config.prediction_type} but the denoiser "
                f"{denoiser.prediction_type}; set diffusion.prediction_type to one of them"
            )
        if distill is not None and denoiser.scale_embedding is None:
            raise ValueError("guidance distillation needs a denoiser with a scale embedding (distilled_finetune)")
        self.denoiser = denoiser
        self.distill = distill  # a plain object: base and teacher are no sub-modules (neither optimised nor averaged)
        self.scheduler = scheduler
        self.optimizer_factory = optimizer
        self.cond_dropout = cond_dropout
        self.seed = seed
        self.label_lr_scale = float(label_lr_scale)
        self.lr_schedule = lr_schedule
        self.finite_check_every = 25
        self._unlogged: tuple[Tensor, Tensor] | None = None  # a step's metrics that training_step did not log
        self.register_buffer("alphas_cumprod", scheduler.alphas_cumprod.clone().float(), persistent=False)
        self.channels_last = channels_last and denoiser.sample_shape.__len__() == 3
        if self.channels_last:
            denoiser.net.to(memory_format=torch.channels_last)
        self.compile_mode = None
        if compile:
            mode = self.compile_mode = "default" if compile is True else compile
            if mode not in COMPILE_MODES:
                raise UserError(f"compile={compile} is not true, false or a torch.compile mode "
                                f"({', '.join(COMPILE_MODES)})")  # fmt: skip
            denoiser.net.compile(mode=mode)  # in place: parameter names stay those of the plain network

    def loss(self, x0: Tensor, labels: Tensor, generator: torch.Generator | None = None,
             scale: Tensor | None = None) -> Tensor:  # fmt: skip
        """Mean squared error of the denoiser's prediction at a random timestep, per sample (N,); with the guidance
        scales of guidance distillation (`scale`, (N,)), of its prediction at w against the guided target."""
        n = len(x0)
        t = torch.randint(0, len(self.alphas_cumprod), (n,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, generator=generator)
        abar = self.alphas_cumprod[t]
        x_t = diffusion.add_noise(x0, noise, abar)
        target = diffusion.target(self.denoiser.prediction_type, x0, noise, abar)
        if scale is None:
            pred = self.denoiser(x_t, t, labels)
        else:
            pred = self.denoiser(x_t, t, labels, scale=scale)
            target = self.distill.target(self.denoiser, target, x_t, t, labels, scale)
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x0, labels = batch
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        gen = torch.Generator(device=x0.device).manual_seed(noise_seed(self.seed, self.global_step, self.global_rank))
        labels = drop_labels(labels, self.cond_dropout, self.denoiser.null_class, generator=gen)
        scale = None if self.distill is None else self.distill.scales(labels, self.denoiser.null_class, gen)
        loss = self.loss(x0, labels, generator=gen, scale=scale).mean()
        self.check_finite(loss)
        self._unlogged = None
        if self.logs_this_step():
            self.log_step(loss, labels)
        else:  # logged after all, should a callback stop training at the end of this step
            self._unlogged = (loss.detach(), labels)
        return loss

    def log_step(self, loss: Tensor, labels: Tensor) -> None:
        # Not prog_bar=True: Lightning converts progress-bar metrics to numbers after every batch, an `.item()`
        # that waits for the GPU at every step. priorlab's StepProgressBar shows train/loss every N steps instead.
        self.log("train/loss", loss)
        self.log("train/drop_rate", (labels == self.denoiser.null_class).float().mean())

    def logs_this_step(self) -> bool:
        """Whether training_step logs its metrics: at the steps whose metrics Lightning writes to the loggers
        (every `log_every_n_steps`-th, as Lightning counts them, and the last when training is stopped) and at
        the first step (for the progress bar). `self.log` took about a third of Lightning's host time per step
        (cProfile, CPU), and a small compiled model on a GPU waits for its host, so the other steps skip it."""
        trainer, step = self.trainer, self.global_step + 1  # the step this one completes
        n = trainer.log_every_n_steps
        return step == 1 or (n > 0 and step % n == 0) or trainer.should_stop or bool(trainer.fast_dev_run)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.distill is not None:
            self.distill.update(self.denoiser, self.global_step)
        # A callback may stop training in its on_train_batch_end (Lightning's Timer does), after training_step;
        # Lightning then writes this step's metrics, so they are logged here (after the callbacks' hooks).
        if self._unlogged is not None and self.trainer.should_stop:
            self.log_step(*self._unlogged)
        self._unlogged = None

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.distill is not None:  # the teacher of guidance distillation is no sub-module (`DistillTeacher`)
            checkpoint["distill_teacher"] = self.distill.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.distill is not None and "distill_teacher" in checkpoint:
            self.distill.load_state_dict(checkpoint["distill_teacher"])

    def check_finite(self, loss: Tensor) -> None:
        """Stop on a non-finite loss on any process, naming the step; no checkpoint is written after it.

        The processes decide together (`reduce_boolean_decision`, a collective over DDP ranks), so all of them
        stop at the same step: a rank stopping alone would leave the others waiting in the next gradient
        all-reduce forever. On the CPU every step is checked; on a GPU every `finite_check_every` steps (each
        check waits for the GPU), the same steps on every rank; and the weights are checked before every
        validation and evaluation, so the checkpoint written after a validation is always finite.
        """
        if loss.device.type != "cpu" and self.global_step % self.finite_check_every:
            return
        local = not bool(torch.isfinite(loss))
        if self.trainer.strategy.reduce_boolean_decision(local, all=False):
            value = loss.item() if local else "non-finite on another process"
            raise UserError(
                f"the training loss became {value} at step {self.global_step}; training stopped and the last "
                "checkpoint (from before) is kept. Lower optimizer.lr or use a more stable precision"
            )

    def on_validation_epoch_start(self) -> None:
        # Lightning calls the callbacks' hooks before this one: the evaluation callbacks check the weights
        # themselves before they sample (`evaluation.callbacks`); this covers runs without them.
        if not self.trainer.sanity_checking:
            check_finite_weights(self.denoiser, self.global_step)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, labels = batch
        # The same noise and timesteps at every validation, so curves compare across steps and runs.
        gen = torch.Generator(device=x0.device).manual_seed(validation_seed(batch_idx))
        state = gen.get_state()
        cond = self.loss(x0, labels, generator=gen).mean()
        gen.set_state(state)
        uncond = self.loss(x0, torch.full_like(labels, self.denoiser.null_class), generator=gen).mean()
        self.log("val/loss_cond", cond, sync_dist=True)
        self.log("val/loss_uncond", uncond, sync_dist=True)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.compile_mode in GRAPH_MODES and self.trainer.accumulate_grad_batches > 1:
            raise UserError(
                f"compile={self.compile_mode} replays the passes from CUDA graphs, which do not support gradient "
                f"accumulation (trainer.accumulate_grad_batches={self.trainer.accumulate_grad_batches}); use "
                "compile=true or accumulate_grad_batches=1"
            )

    def configure_optimizers(self):
        """The optimizer over every parameter; the label tables form a second group at `label_lr_scale` × lr.
        With `lr_schedule=cosine`, a per-step schedule decaying every group to 0 at trainer.max_steps."""
        if self.label_lr_scale == 1.0:
            optimizer = self.optimizer_factory(params=self.denoiser.parameters())
        else:
            labels = {id(p) for table in label_tables(self.denoiser.net) for p in table.parameters()}
            rest = [p for p in self.denoiser.parameters() if id(p) not in labels]
            tables = [p for p in self.denoiser.parameters() if id(p) in labels]
            optimizer = self.optimizer_factory(params=[{"params": rest}, {"params": tables}])
            optimizer.param_groups[1]["lr"] *= self.label_lr_scale
        if self.lr_schedule == "constant":
            return optimizer
        total = self.trainer.max_steps
        if total is None or total <= 0:
            raise UserError("lr_schedule=cosine decays over trainer.max_steps; set trainer.max_steps")
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, CosineDecay(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class CosineDecay:
    """The factor of a half-cosine decay from 1 at step 0 to 0 at step `total` (0 after it)."""

    def __init__(self, total: int):
        self.total = int(total)

    def __call__(self, step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total) / self.total))


def check_finite_weights(denoiser: Denoiser, step: int) -> None:
    """Stop with a UserError naming the step when the denoiser's weights hold NaN or infinite values.

    Called before every validation and before every evaluation, so neither a checkpoint nor evaluation results
    are written from non-finite weights.
    """
    if not all(torch.isfinite(p).all() for p in denoiser.parameters()):
        raise UserError(
            f"the weights hold non-finite values at step {step}; training stopped and the last checkpoint (from "
            "before) is kept. Lower optimizer.lr or use a more stable precision"
        )

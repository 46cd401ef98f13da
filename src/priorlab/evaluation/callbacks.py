"""Evaluation callbacks: every N steps (at validation, with EMA weights) and at the end of training.

The final evaluation runs at `on_train_end`, after the EMA callback has put the average into the module and
before Lightning's teardown, which moves the module to the CPU ahead of `on_fit_end`: evaluating at
`on_fit_end` would sample on the CPU on a GPU machine. Where `on_train_end` does not run (a run resumed from a
checkpoint of its last step), `on_fit_end` evaluates instead, moving the module back to the accelerator for it.

Each first checks that the weights are finite (Lightning calls callback hooks before the module's own check),
then shards its sampling over DDP ranks (`evaluation.distributed`), logs on rank 0 to every logger, and writes
`<run>/eval/step=<n>_<kind>.json`. Where the settings ask for prior=auto|mix, each evaluation first
fits their weights on the calibration split of the validation data (`evaluation.fitted.fit_priors`).
"""

from __future__ import annotations

import time
import weakref
from pathlib import Path

import lightning as L
import torch
from tqdm.auto import tqdm

from priorlab import atomic, keys
from priorlab.evaluation.conditional_quality import conditional_quality
from priorlab.evaluation.fitted import calibration_split, fit_priors
from priorlab.evaluation.generation import check_guided, extra_prior_paths
from priorlab.evaluation.images import log_image, save_grid
from priorlab.evaluation.prior_quality import prior_quality
from priorlab.evaluation.settings import EvalSettings
from priorlab.evaluation.setup import ensure_evaluator, evaluator_dir, make_prior_net
from priorlab.models.io import WEIGHTS, SavedModel, load_denoiser, resolve_model_dir
from priorlab.models.latent import DecodingEvaluator, Latent, check_same_latents, images_view
from priorlab.priors import FITTED
from priorlab.training.module import check_finite_weights

# The fitted prior weights of the last evaluated step, per trained module: both evaluation callbacks of a run use
# the same fit, held here rather than as an attribute on the training module (and dropped with the module).
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# The networks the evaluation callbacks load (the base, the extra priors), one copy per model folder and version of
# its weights: both callbacks of a run need each of them, and would otherwise hold two copies on the device.
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


def shared_model(path: str | Path, role: str) -> SavedModel:
    """The model folder `path` (or a run folder holding model/) loaded once per process while anything holds it;
    weights rewritten since (a new mtime or size) are loaded again."""
    folder = resolve_model_dir(path, role).resolve()
    stat = (folder / WEIGHTS).stat()
    key = (str(folder), stat.st_mtime_ns, stat.st_size)
    saved = _LOADED.get(key)
    if saved is None:
        saved = _LOADED[key] = load_denoiser(folder, role)
    return saved


class _Evaluation(L.Callback):
    """What both evaluation callbacks share. `base`: the base's folder (the prior=base network); `extra_priors`: name
    → folder of more prior networks (any diffusion model of the sample shape, e.g. a smaller base), each used as
    prior=base is and reported as prior=<name> (model=<name> in the prior-quality measures)."""

    kind = ""

    def __init__(
        self, out_dir: str, runs: str = "runs", base: str | None = None, every_n_steps: int = 1000,
        settings: dict | None = None, evaluator: str | None = None, extra_priors: dict | None = None,
    ):  # fmt: skip
        self.extra_paths = extra_prior_paths(extra_priors)
        self.out_dir = Path(out_dir)
        self.runs = runs
        self.base_path = base
        self.every_n_steps = every_n_steps
        self.settings = EvalSettings(**(settings or {}))
        self.evaluator_path = evaluator
        self.last_key: tuple[int, bool] | None = None
        self.latent: Latent | None = None  # a latent run's VAE codec (`models.latent`), set up in `setup`

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        images = images_view(dm)  # a latent run's data (`models.latent`): the evaluator is trained on the images
        path = self.evaluator_path or evaluator_dir(self.runs, images)
        steps = self.settings.evaluator_steps
        if trainer.is_global_zero:
            ensure_evaluator(path, images, steps=steps)
        trainer.strategy.barrier()
        self.evaluator = ensure_evaluator(path, images, steps=steps)
        self.latent = getattr(dm, "latent", None)
        if self.latent is not None:  # it measures the decoded samples
            self.evaluator = DecodingEvaluator(self.evaluator, self.latent)
        self.base = None if not self.base_path else shared_model(self.base_path, role="base")
        self.extra = {name: shared_model(path, role=f"prior {name}") for name, path in self.extra_paths.items()}
        sha = self.latent.sha256 if self.latent is not None else None
        for role, saved in [("base", self.base), *((f"extra_priors.{n}", s) for n, s in self.extra.items())]:
            if saved is not None:  # a prior of other latents or another sample shape fails now, not after training
                check_same_latents(sha, saved, role)
        for saved in self.extra.values():
            make_prior_net((pl_module.denoiser, pl_module.scheduler), saved)
        check_guided(self.settings, pl_module.denoiser)  # prior=distilled out of its range fails now, not at the end
        if self.base is not None and any(p in FITTED for p in self.settings.priors):
            calibration_split(dm.val_set.tensors, self.settings)  # too small a split fails now, not after training

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.sanity_checking and step % self.every_n_steps == 0:
            self.run(trainer, pl_module, final=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, final=True)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.run(trainer, pl_module, final=True)  # a no-op where on_train_end evaluated this step

    def run(self, trainer: L.Trainer, pl_module: L.LightningModule, final: bool) -> None:
        step = trainer.global_step
        key = (step, final and self.final_differs)
        if key == self.last_key:  # already measured at this step (validation at the last step, then fit end)
            return
        self.last_key = key
        denoiser = pl_module.denoiser
        check_finite_weights(denoiser, step)  # before sampling: non-finite weights give non-finite samples
        was_training = denoiser.training
        denoiser.eval()
        device, home = trainer.strategy.root_device, pl_module.device
        if home != device:  # after teardown (on_fit_end), the module is on the CPU
            pl_module.to(device)
        self.evaluator.net.to(device)
        if self.latent is not None:
            self.latent.to(device)
        started = time.perf_counter()
        what = {"cond": "conditional quality", "prior": "prior quality"}.get(self.kind, self.kind)
        if trainer.is_global_zero:  # sampling takes minutes, with nothing else on screen
            tqdm.write(f"[step {step}] evaluating {what} ...")
        prior_net = None
        if self.base is not None:
            self.base.denoiser.to(device)
            prior_net = make_prior_net((denoiser, pl_module.scheduler), self.base)
        # Eager, even where the network is compiled for training: evaluation batch shapes differ from the
        # training batch, and each new shape would recompile the network in the middle of training.
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            weights = self.fitted_priors(trainer, pl_module, prior_net)
            metrics, grids = self.measure(trainer, pl_module, prior_net, final, weights)
        seconds = time.perf_counter() - started  # metrics are Python floats by now: the GPU work has finished
        if trainer.is_global_zero:
            tqdm.write(f"[step {step}] {what} evaluated in {seconds:.0f} s")
        denoiser.train(was_training)
        if home != device:
            pl_module.to(home)
            self.evaluator.net.to(home)
            if self.latent is not None:
                self.latent.to(home)
            if self.base is not None:
                self.base.denoiser.to(home)
            for saved in self.extra.values():
                saved.denoiser.to(home)
        if trainer.is_global_zero:
            self.write_record(trainer, pl_module.denoiser.num_classes, metrics, round(seconds, 3), weights, grids)
        trainer.strategy.barrier()

    def write_record(self, trainer: L.Trainer, num_classes: int, metrics: dict, seconds: float, weights: dict,
               grids: dict) -> None:  # fmt: skip
        """Log the metrics to every logger, write <out>/step=<n>_<kind>.json (with the wall time, issue 17), the
        fitted priors' weights (cond) and the sample grids."""
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        atomic.write_json(self.out_dir / f"step={step}_{self.kind}.json",
                          {"step": step, "metrics": metrics, "seconds": seconds})  # fmt: skip
        if self.kind == "cond":
            for prior, w in weights.items():
                w.save(self.out_dir / f"prior_weights_{prior}_step={step}.json")
        for prior, x in grids.items():
            x = self.latent.decode(x) if self.latent is not None else x
            path = save_grid(x, num_classes, self.out_dir / f"grid_step={step}_prior={prior}.png")
            log_image(trainer.loggers, keys.key("grid", prior=prior), path, step)

    def extra_nets(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        """The extra priors as prior networks of the module, on the evaluation's device."""
        out = {}
        for name, saved in self.extra.items():
            saved.denoiser.to(trainer.strategy.root_device)
            out[name] = make_prior_net((pl_module.denoiser, pl_module.scheduler), saved)
        return out

    def fitted_priors(self, trainer: L.Trainer, pl_module: L.LightningModule, prior_net) -> dict:
        """prior=auto|mix weights for this step, fitted once per step and shared by the evaluation callbacks."""
        s = self.settings
        key = (trainer.global_step, tuple(s.priors), s.buckets, s.heldout, s.calibration, s.seed, s.batch_size)
        cached = _FITTED.get(pl_module)
        if cached is not None and cached[0] == key:
            return cached[1]
        dm = trainer.datamodule
        weights = fit_priors(pl_module.denoiser, pl_module.scheduler, prior_net, dm.val_set.tensors, s,
                             evaluator=self.evaluator, mixture=getattr(dm, "mixture", None),
                             shape=tuple(dm.sample_shape))  # fmt: skip
        _FITTED[pl_module] = (key, weights)
        return weights

    @property
    def final_differs(self) -> bool:
        """Whether the evaluation at the end of fit measures more than the ones during fit."""
        return False

    def measure(self, trainer, pl_module, prior_net, final: bool, weights: dict) -> tuple[dict, dict]:
        raise NotImplementedError


class PriorQuality(_Evaluation):
    """The fine-tune's unconditional branch vs the base: per-bucket loss, disagreement, unconditional FD/KID.

    Args:
        samples_during_fit: also sample unconditionally (FD/KID) at the intermediate evaluations, not only at
            the end of fit; the per-bucket losses and the disagreement are measured every time.
    """

    kind = "prior"

    def __init__(self, *args, samples_during_fit: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.samples_during_fit = samples_during_fit

    @property
    def final_differs(self) -> bool:
        return not self.samples_during_fit

    def measure(self, trainer, pl_module, prior_net, final: bool, weights: dict):
        dm = trainer.datamodule
        evaluator = self.evaluator if final or self.samples_during_fit else None
        return prior_quality(pl_module.denoiser, pl_module.scheduler, prior_net, dm.val_set.tensors, evaluator,
                             self.settings, getattr(dm, "mixture", None), weights,
                             self.extra_nets(trainer, pl_module)), {}  # fmt: skip


class ConditionalQuality(_Evaluation):
    """FD, KID, precision, recall and accuracy for each prior and guidance scale, plus sample grids."""

    kind = "cond"

    def measure(self, trainer, pl_module, prior_net, final: bool, weights: dict):
        dm = trainer.datamodule
        return conditional_quality(pl_module.denoiser, pl_module.scheduler, prior_net, self.evaluator, dm.sample_shape,
                                   self.settings, getattr(dm, "mixture", None), weights,
                                   self.extra_nets(trainer, pl_module))  # fmt: skip

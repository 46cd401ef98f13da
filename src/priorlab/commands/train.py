"""`priorlab train`: build data, denoiser, module, callbacks and loggers from the config, then fit.

Over 300 lines: the base of a fine-tune (a priorlab folder, a diffusers folder or a hub name), its record and checks,
and the guidance-distill teacher are all set up here, between the config and the fit; each is a short function.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from priorlab import atomic
from priorlab.checks import check_train_values
from priorlab.errors import UserError
from priorlab.loggers import finish_wandb, sync_hint
from priorlab.models.hub import parse_hub_name
from priorlab.models.io import META, content_hash, init_from_base, load_denoiser, resolve_model_dir
from priorlab.models.latent import Latent
from priorlab.models.pretrained import base_schedule, conditional_copy, is_pretrained
from priorlab.models.text import TextDenoiser, text_copy
from priorlab.training.callbacks import DivergenceWatch, SaveDenoiser
from priorlab.training.distill import distill_settings, distilled_finetune
from priorlab.training.module import DiffusionModule
from priorlab.training.quiet import MATMUL_PRECISIONS, quiet, set_matmul_precision
from priorlab.training.resume import BASE_RECORD, CONFIG, RESUME_MODES, check_resume, record_forced, recorded_base
from priorlab.training.threads import set_cpu_threads

STAGES = ("base", "finetune")


def check_config(cfg: DictConfig) -> None:
    """Reject settings a run cannot use, with a message that says what to change."""
    check_train_values(cfg)
    if cfg.stage.name not in STAGES:
        raise UserError(f"stage={cfg.stage.name} is unknown; use stage=base or stage=finetune")
    p = cfg.cond_dropout
    if not isinstance(p, int | float) or not 0.0 <= p <= 1.0:
        raise UserError(f"cond_dropout={p} is outside [0, 1]; pass a rate such as cond_dropout=0.1")
    if cfg.stage.name == "finetune" and not cfg.base:
        raise UserError("stage=finetune needs base=PATH, the base's run folder or its model/ folder, a diffusers "
                        "folder, or a hub name (org/name)")  # fmt: skip
    if cfg.get("matmul_precision") not in (None, *MATMUL_PRECISIONS):
        choices = ", ".join(MATMUL_PRECISIONS)
        raise UserError(f"matmul_precision={cfg.matmul_precision} is unknown; use one of {choices}, or null")
    if cfg.get("resume", "check") not in RESUME_MODES:
        raise UserError(f"resume={cfg.resume} is unknown; use resume=check (the default) or resume=force")
    distill_settings(cfg)


def build_module(cfg: DictConfig, datamodule: L.LightningDataModule) -> tuple[DiffusionModule, dict]:
    """The DiffusionModule for this stage and the metadata its saved model records. A fine-tune of a diffusers
    base (`models.pretrained`) is the base's architecture, made class-conditional, or conditioned on the data's
    captions for a text base (`models.text`); model=... is not used. A latent base's fine-tune trains on the data's
    latents (`models.latent`), encoded here (in place) or read from the cache. With guidance_distill, the fine-tune
    takes the guidance scale as an input and the base is its teacher too (`training.distill`)."""
    base = load_denoiser(cfg.base, role="base") if cfg.stage.name == "finetune" else None
    meta = {"stage": cfg.stage.name, "seed": cfg.seed, "data": cfg.data.get("_target_")}
    if base is not None and is_pretrained(base.meta):
        denoiser = pretrained_finetune(cfg, base, datamodule, meta)
    else:
        denoiser = instantiate(cfg.model)(
            sample_shape=datamodule.sample_shape,
            num_classes=datamodule.num_classes,
            prediction_type=cfg.diffusion.prediction_type,
        )
    scheduler = instantiate(cfg.diffusion)
    datamodule.run_seed = int(cfg.seed)  # the run's stream of batches (`seeds.batch_seed`)
    distill = None
    if base is None:
        cond_dropout = 1.0
    else:
        cond_dropout = float(cfg.cond_dropout)
        check_same_schedule(base.scheduler.config, scheduler.config)
        init_from_base(denoiser, base.denoiser)
        meta["base"] = {"path": str(base.path.resolve()), "sha256": content_hash(base.path)}
        if is_pretrained(base.meta):
            meta["base"]["format"] = base.meta["format"]
        if "hub" in base.meta:  # a base given by its hub name (`models.hub`): its name, revision and commit
            meta["base"]["hub"] = base.meta["hub"]
        if "text_encoder" in base.meta:
            meta["base"]["text_encoder"] = base.meta["text_encoder"]
        if "vae" in meta:  # base.json: a resumed run is checked against its VAE too (`resume.vae_difference`)
            meta["base"]["vae"] = meta["vae"]
        distill = distilled_finetune(denoiser, base.denoiser, distill_settings(cfg), meta)
    meta["cond_dropout"] = cond_dropout
    module = DiffusionModule(
        denoiser,
        scheduler,
        instantiate(cfg.optimizer),
        cond_dropout=cond_dropout,
        compile=cfg.compile,
        seed=cfg.seed,
        channels_last=cfg.get("channels_last", False),
        label_lr_scale=cfg.get("label_lr_scale", 1.0),
        lr_schedule=cfg.get("lr_schedule", "constant"),
        distill=distill,
    )
    return module, meta


def pretrained_finetune(cfg: DictConfig, base, datamodule, meta: dict):
    """The fine-tune of a diffusers base (`pretrained.conditional_copy`, or `text_finetune` for a text base), its
    data encoded first for a latent base; `meta` gains the VAE and the new classes' names (id2label)."""
    role = f"base={base.path}"
    vae = base.meta.get("vae")
    if vae is not None:
        Latent.load(vae, role).encode_data(datamodule, Path(cfg.paths.runs) / "latents")
        meta["vae"] = vae
    if isinstance(base.denoiser, TextDenoiser):
        return text_finetune(cfg, base, datamodule)
    names = getattr(datamodule, "class_names", None)
    names = names() if callable(names) else [str(k) for k in range(datamodule.num_classes)]
    meta["id2label"] = {str(k): str(name) for k, name in enumerate(names)}
    return conditional_copy(base.denoiser, datamodule.num_classes, datamodule.sample_shape, role=role,
                            latent=vae is not None)  # fmt: skip


def text_finetune(cfg: DictConfig, base, datamodule: L.LightningDataModule) -> TextDenoiser:
    """The fine-tune of a text base (`models.text`) on image–caption data, its prompt table from the prompt cache."""
    captions = getattr(datamodule, "captions", None)
    if not captions:
        raise UserError(f"base={base.path.parent} is text-conditioned (a Stable-Diffusion-layout pipeline): give it "
                        "image–caption data, e.g. data=hf data.source=FOLDER data.caption_column=text")  # fmt: skip
    return text_copy(base.denoiser, captions, datamodule.sample_shape, cfg.get("prompt_cache"),
                     role=f"base={base.path.parent}")  # fmt: skip


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run folder for the run (a `.<name>.lock` file beside it), so that the same run
    started twice fails in one line instead of two trainers writing one folder. Processes that DDP starts for the
    run (LOCAL_RANK > 0 or RANK > 0) share the launcher's lock."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("RANK", "0") or 0) > 0:
        yield
        return
    import fcntl

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.parent / f".{run_dir.name}.lock"
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise UserError(f"{run_dir} is in use by process {holder} (the same run started twice); wait for it "
                            "to finish or stop it, then run the command again") from None  # fmt: skip
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def adopt_base_schedule(cfg: DictConfig) -> None:
    """A fine-tune of a diffusers base trains with the base's schedule and prediction type: its scheduler config
    replaces diffusion.*, so that the run's config.yaml records what it trains with. A missing base is left to the
    checks that name it; a hub name (`models.hub`) is fetched, or found in the cache, here."""
    if cfg.stage.name != "finetune" or not cfg.base:
        return
    if not Path(str(cfg.base)).expanduser().exists() and parse_hub_name(str(cfg.base)) is None:
        return
    net_dir = resolve_model_dir(str(cfg.base), role="base")
    if (net_dir / META).exists():
        return
    with open_dict(cfg):
        cfg.diffusion = {"_target_": "diffusers.DDPMScheduler", **base_schedule(net_dir)}


def check_same_schedule(base_cfg, cfg) -> None:
    """A fine-tune continues its base's schedule and parameterization; differences are a user error."""
    keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "prediction_type")
    diff = [f"{k}: {base_cfg.get(k)!r} (base) vs {cfg.get(k)!r}" for k in keys if base_cfg.get(k) != cfg.get(k)]
    if diff:
        raise UserError("the base was trained with another schedule: " + "; ".join(diff) + ". Set diffusion.* to match")


def check_launch(trainer: L.Trainer) -> None:
    """Refuse a Hydra multirun (`-m`) whose trainer starts its DDP processes by re-running the command line.

    Lightning's DDP launcher starts ranks 1, 2, ... by running `sys.argv` again; in a multirun that command holds
    `-m` and the whole sweep, so each of those processes would start the whole multirun itself. Processes made by
    a cluster (SLURM tasks) or spawned (`ddp_spawn`) are not started that way and pass.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = getattr(trainer.strategy, "launcher", None)
    if (isinstance(launcher, _SubprocessScriptLauncher) and launcher.num_processes > 1
            and not launcher.cluster_environment.creates_processes_externally):  # fmt: skip
        raise UserError(
            f"`priorlab train -m` cannot run a trainer of {launcher.num_processes} DDP processes: Lightning starts "
            "each extra process by re-running this command line, -m and the whole sweep included. Run the points "
            "one at a time without -m, or run the sweep as a study (`priorlab study NAME`, basic launcher), which "
            "trains a DDP fine-tune per point"
        )


DONE = "done.json"


def check_checkpoint(path: Path) -> int | None:
    """A checkpoint must load as tensors and plain data (weights-only: no pickled code is ever run); returns its
    step."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or holding objects that weights-only loading refuses
        raise UserError(
            f"the checkpoint {path} cannot be loaded ({type(err).__name__}); nothing was changed. Delete it to "
            "start the run over, or restore it"
        ) from err
    if not isinstance(state, dict) or "state_dict" not in state:
        raise UserError(f"{path} is not a Lightning checkpoint; delete it to start the run over")
    return state.get("global_step")


def train(cfg: DictConfig) -> Path:
    """Fit one run and return its model folder.

    A run folder holding `done.json` is finished and skipped; one holding `checkpoints/last.ckpt` is resumed
    from it, and ends with the same weights as an unbroken run (batches are drawn from (seed, data.split_seed,
    step), noise, timesteps and dropout from (seed, step, rank)). Either must be given the settings and base it
    recorded (`priorlab.training.resume`), checked before anything in the folder is written.
    """
    adopt_base_schedule(cfg)
    check_config(cfg)
    set_cpu_threads(cfg.get("cpu_threads", "auto"))
    if cfg.dry_run:
        print(OmegaConf.to_yaml(cfg, resolve=True))
        return Path(cfg.paths.run_dir) / "model"
    run_dir = Path(cfg.paths.run_dir)
    if (run_dir / DONE).exists():
        return _finished(cfg, run_dir)
    set_matmul_precision(cfg.get("matmul_precision"))
    with run_lock(run_dir), atomic.removed_unless_started(run_dir, "checkpoints/last.ckpt", "model"), quiet():
        return _train(cfg, run_dir)


def _finished(cfg: DictConfig, run_dir: Path) -> Path:
    check_resume(cfg, run_dir, finished=True)
    print(f"{run_dir} is finished ({DONE} present); skipping")
    return run_dir / "model"


def _train(cfg: DictConfig, run_dir: Path) -> Path:
    if (run_dir / DONE).exists():  # finished while this command waited to start
        return _finished(cfg, run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    step = check_checkpoint(last) if last.exists() else None
    forced = check_resume(cfg, run_dir, finished=False) if last.exists() else {}
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module, meta = build_module(cfg, datamodule)
    record = recorded_base(run_dir, finished=False) if last.exists() and "base" in meta else None
    if record is not None and record["sha256"] != meta["base"]["sha256"]:  # resume=force with another base
        meta["base"] = {**record, "resumed_with": meta["base"]}  # the weights started from the recorded one
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    callbacks.append(SaveDenoiser(run_dir / "model", meta))
    watch = DivergenceWatch()
    callbacks.append(watch)
    loggers = [instantiate(c) for c in cfg.logger.values()] if cfg.get("logger") else False
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, default_root_dir=str(run_dir))
    check_launch(trainer)
    if trainer.is_global_zero:
        # The loggers first: the CSV logger's folder is the run folder, and it warns (and drops metrics.csv) when
        # it finds that folder holding files as it starts.
        params = OmegaConf.to_container(cfg, resolve=True)
        params["cond_dropout"] = module.cond_dropout  # a base drops every label, whatever cond_dropout says
        for logger in trainer.loggers:
            logger.log_hyperparams(params)
        atomic.write_text(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
        if "base" in meta and not last.exists():
            atomic.write_json(run_dir / BASE_RECORD, meta["base"])
        if forced:
            record_forced(run_dir, forced, step)
    trainer.fit(module, datamodule, ckpt_path=str(last) if last.exists() else None, weights_only=True)
    offline_wandb = finish_wandb()
    diverged = watch.verdict()
    if trainer.is_global_zero:
        done = {"step": trainer.global_step, "stage": cfg.stage.name}
        if diverged:
            done["diverged"] = diverged
            print(f"priorlab: warning: {run_dir} diverged: its training loss rose from {diverged['first_loss']:.4g} "
                  f"(the lowest of its first {diverged['window']} steps) to {diverged['last_loss']:.4g} (the mean of "
                  f"its last {diverged['window']}); the model is unlikely to be of use: lower optimizer.lr and train "
                  f"it again (recorded in {DONE})", file=sys.stderr, flush=True)  # fmt: skip
        atomic.write_json(run_dir / DONE, done, indent=None)
        if offline_wandb and os.environ.get("WANDB_SILENT", "").lower() not in ("true", "1"):
            print(sync_hint(offline_wandb, f"the runs of study {cfg.study}"), flush=True)
    return run_dir / "model"


main = train  # the command's entry point (`priorlab.cli`)

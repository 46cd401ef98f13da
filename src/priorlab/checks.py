"""Checks of user input that the configs cannot express: the ranges of a run's settings, the device asked for, and
records read back from disk. Each failure is a UserError that names the setting or file and says what to change."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from priorlab.errors import UserError

if TYPE_CHECKING:
    import torch

MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range
MAX_TORCH_SEED = 2**63 - 1  # torch.Generator.manual_seed's
# Lightning's precisions that keep float32 weights (the full names and their short forms)
PRECISIONS = ("32-true", "32", "16-mixed", "16", "bf16-mixed", "bf16")


def is_list(value) -> bool:
    """A list, tuple or ListConfig (not a string)."""
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def is_whole(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def whole(value, key: str, low: int, high: int | None = None, example: str = "") -> int:
    """`value` as a whole number in [low, high] (high: 2^63 − 1 at most); a UserError naming `key` otherwise."""
    if high is None and is_whole(value) and value > MAX_TORCH_SEED:
        raise UserError(f"{key}={value} is too large (at most {MAX_TORCH_SEED})")
    if not is_whole(value) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
        raise UserError(f"{key}={value!r} must be a whole number {bound}{example}")
    return value


def finite(value, key: str) -> float:
    """`value` as a finite float; a UserError naming `key` otherwise (also for a whole number beyond 2^53, which
    torch cannot take as a scalar)."""
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise UserError(f"{key}={value!r} must be a finite number")
    if isinstance(value, int) and abs(value) > 2**53:
        raise UserError(f"{key}={value} is too large a whole number; write it as a float (e.g. 1e30)")
    return float(value)


def flag(value, key: str) -> bool:
    """`value` as true or false; a UserError naming `key` otherwise."""
    if not isinstance(value, bool):
        raise UserError(f"{key}={value!r} must be true or false")
    return value


def number(value, key: str, low: float = 0.0, strict: bool = True, example: str = "") -> float:
    """`value` as a finite float above `low` (or at least `low` when not strict); a UserError otherwise."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and isinstance(value, int) and abs(value) > 2**53:
        raise UserError(f"{key}={value} is too large a whole number; write it as a float (e.g. 1e30)")
    if not ok or value < low or (strict and value == low):
        side = "above" if strict else "at least"
        raise UserError(f"{key}={value!r} must be a finite number {side} {low:g}{example}")
    return float(value)


def check_train_values(cfg: DictConfig) -> None:
    """The settings of `priorlab train` that Lightning, torch or numpy would reject late (once the run folder is
    made) or not at all (max_steps=0 trains nothing and marks the run done)."""
    whole(cfg.seed, "seed", 0, MAX_SEED, " (e.g. seed=0)")
    trainer = cfg.trainer
    whole(trainer.get("max_steps"), "trainer.max_steps", 1, example=" (the optimizer steps to train)")
    whole(trainer.get("val_check_interval"), "trainer.val_check_interval", 1,
          example=" (steps between validations and checkpoints)")  # fmt: skip
    whole(trainer.get("log_every_n_steps"), "trainer.log_every_n_steps", 1)
    limit = trainer.get("limit_val_batches")
    if not (is_whole(limit) and limit >= 0) and not (isinstance(limit, float) and 0.0 <= limit <= 1.0):
        raise UserError(f"trainer.limit_val_batches={limit!r} must be a whole number of batches or a fraction in "
                        "[0, 1]")  # fmt: skip
    precision = trainer.get("precision", "32-true")
    if str(precision) not in PRECISIONS:
        raise UserError(f"trainer.precision={precision!r} is not supported (the EMA and the evaluation keep float32 "
                        "weights); use 32-true, bf16-mixed or 16-mixed")  # fmt: skip
    number(cfg.optimizer.get("lr"), "optimizer.lr", example=" (e.g. optimizer.lr=3e-4)")
    if cfg.optimizer.get("weight_decay") is not None:
        number(cfg.optimizer.weight_decay, "optimizer.weight_decay", strict=False)
    number(cfg.get("label_lr_scale", 1.0), "label_lr_scale")
    from priorlab.diffusion import PREDICTION_TYPES  # here: priorlab.diffusion imports torch

    prediction_type = cfg.diffusion.get("prediction_type")
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"diffusion.prediction_type={prediction_type!r} is unknown; use one of "
                        f"{', '.join(PREDICTION_TYPES)}")  # fmt: skip
    whole(cfg.diffusion.get("num_train_timesteps"), "diffusion.num_train_timesteps", 2, example=" (e.g. 1000)")
    for key, value in cfg.diffusion.items():
        if key != "trained_betas" and OmegaConf.is_config(value):
            raise UserError(f"diffusion.{key} must be a single value, not {OmegaConf.to_container(value)!r}")
    if "clip_sample" in cfg.diffusion:
        flag(cfg.diffusion.clip_sample, "diffusion.clip_sample")
    if not cfg.get("dry_run"):
        check_accelerator(str(trainer.get("accelerator", "cpu")))


def check_paths(cfg: DictConfig, keys: set[str], required: dict[str, str]) -> None:
    """The settings among `keys` that hold paths or names must hold text (prior_weights may be a list of paths);
    those in `required` (key → how to give it) must be given."""
    for key, how in required.items():
        if key in cfg and OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False) is None:
            raise UserError(f"{key} is required: {how}")
    for key in sorted(keys):
        value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
        paths = value if key == "prior_weights" and is_list(value) else [value]
        if not all(v is None or isinstance(v, str) for v in paths):
            shown = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
            raise UserError(f"{key}={shown!r} must be a path or a name")


def output_folder(out: str | Path, overwrite: bool, *inputs: str | Path | None) -> Path:
    """`out` as a folder that a command writes whole (`atomic.folder` replaces it), checked before any work:
    refused where it holds files and overwrite is false, and always where it holds the working folder or one of
    the command's inputs (a model folder), which replacing it would delete."""
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise UserError(f"out={out} exists and is not empty; choose another out= or pass overwrite=true")
    kept = [Path.cwd(), *(Path(p) for p in inputs if isinstance(p, str | Path) and Path(p).exists())]
    held = [p for p in kept if p.resolve().is_relative_to(out.resolve())]
    if held:
        raise UserError(f"out={out} holds {held[0]}, which writing out= would delete; choose a new folder for out=")
    return out


def check_accelerator(accelerator: str) -> None:
    """A GPU trainer needs a visible CUDA GPU."""
    import torch

    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UserError(f"trainer.accelerator={accelerator} (trainer=gpu) but no CUDA GPU is visible; use trainer=cpu")


def device(name) -> torch.device:
    """The torch device for `device=auto|cpu|cuda[:i]`; a UserError for a GPU that is not there or a wrong name."""
    import torch

    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise UserError(f"device={name} is not a device; use auto, cpu or cuda (cuda:1 for the second GPU)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but no CUDA GPU is visible; use device=cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UserError(f"device={name} but only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"device={name} is not supported; use auto, cpu or cuda")
    return dev


def read_json_object(path: str | Path, what: str, remedy: str) -> dict:
    """A JSON object read from `path`; a UserError naming the file, what it should be and `remedy` otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path} is not readable as {what} ({type(err).__name__}); {remedy}") from err
    if not isinstance(data, dict):
        raise UserError(f"{path} is not {what} (it holds a JSON {type(data).__name__}); {remedy}")
    return data


# The least value of each count of eval.*: precision and recall need more samples than their k = 3 neighbours, the
# unbiased KID two samples per subset.
EVAL_COUNTS = {"num_samples": 4, "num_steps": 1, "batch_size": 1, "buckets": 1, "heldout": 2, "calibration": 1,
               "check_samples": 1, "kid_subset": 2, "grid_per_class": 1, "bootstrap": 0,
               "evaluator_steps": 1}  # fmt: skip


def check_eval_settings(settings) -> None:
    """The kinds and ranges of the eval.* settings (priorlab.evaluation.settings.EvalSettings)."""
    for key, low in EVAL_COUNTS.items():
        whole(getattr(settings, key), f"eval.{key}", low)
    whole(settings.seed, "eval.seed", 0, MAX_SEED)
    for key in ("guidance_scales", "priors"):
        if not is_list(getattr(settings, key)) or not getattr(settings, key):
            raise UserError(f"eval.{key}={getattr(settings, key)!r} must be a list, e.g. eval.{key}=[...]")
    if not all(isinstance(p, str) for p in settings.priors):
        raise UserError(f"eval.priors={settings.priors!r} must be a list of prior names such as [self,base]")
    for key in ("sampler", "features", "calibration_objective"):
        if not isinstance(getattr(settings, key), str):
            raise UserError(f"eval.{key}={getattr(settings, key)!r} must be a name")
    for key in ("per_class_fd", "autocast"):
        flag(getattr(settings, key), f"eval.{key}")
    if settings.grid_scale is not None:
        number(settings.grid_scale, "eval.grid_scale", strict=False)
    interval = settings.interval
    if interval is not None:
        if not is_list(interval) or len(interval) != 2:
            raise UserError(f"eval.interval={interval!r} must be [lo, hi] (in σ) or null")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) and v >= 0 for v in interval):
            raise UserError(f"eval.interval={list(interval)} must hold two numbers ≥ 0 (σ), lo < hi")
        if not interval[0] < interval[1]:
            raise UserError(f"eval.interval={list(interval)} must have lo < hi")

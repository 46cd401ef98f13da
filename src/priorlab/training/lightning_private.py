"""Lightning's private API that priorlab still relies on, in one place.

Lightning 2.6 has no public hook for these; `tests/test_lightning_private.py` pins every name of `PINNED`, so an
upgrade that renames or removes one fails there, naming it, rather than deep inside a training run:

- WeightAveraging keeps its AveragedModel in `_average_model` and the step of its last update in
  `_latest_update_step` (saved in its state_dict); `training.callbacks.EMA` replaces the per-step update with a fused
  one and must keep both as Lightning does.
- CSVLogger's ExperimentWriter deletes metrics.csv in `_check_log_dir_exists()`; `loggers.CSVLogger` builds its own
  writer (`_experiment`, `_fs`), which keeps it and continues it from its `metrics`, `metrics_keys`,
  `metrics_file_path` and `_fs`.
- DDPStrategy builds DistributedDataParallel in `_setup_model(model)` from the `_ddp_kwargs` it was given;
  `ddp.DDPStrategy` builds it on the current CUDA stream instead of a side stream.

What has a public hook uses it: checkpoints are written atomically through a `CheckpointIO` plugin set on the
strategy (`training.callbacks.AtomicCheckpoint`), the EMA average is copied into the module through WeightAveraging's
public `on_train_end`, and DDP's communication hook is checked in the public `configure_ddp`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning.pytorch.callbacks import WeightAveraging
    from lightning.pytorch.strategies import DDPStrategy
    from torch.optim.swa_utils import AveragedModel

# (class, name, kind): "attribute" is set on instances by __init__; "method" is the method's parameter names
PINNED: tuple[tuple[str, str, Any], ...] = (
    ("lightning.pytorch.callbacks.WeightAveraging", "_average_model", "attribute"),
    ("lightning.pytorch.callbacks.WeightAveraging", "_latest_update_step", "attribute"),
    ("lightning.pytorch.strategies.DDPStrategy", "_ddp_kwargs", "attribute"),
    ("lightning.pytorch.strategies.DDPStrategy", "_setup_model", ("self", "model")),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_check_log_dir_exists", ("self",)),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "metrics", "attribute"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "metrics_keys", "attribute"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "metrics_file_path", "attribute"),
    ("lightning.pytorch.loggers.csv_logs.ExperimentWriter", "_fs", "attribute"),
    ("lightning.pytorch.loggers.CSVLogger", "_experiment", "attribute"),
    ("lightning.pytorch.loggers.CSVLogger", "_fs", "attribute"),
)


def average_model(callback: WeightAveraging) -> AveragedModel | None:
    """The averaged model of a WeightAveraging callback (None before its setup)."""
    return callback._average_model


def latest_update_step(callback: WeightAveraging) -> int:
    """The global step of a WeightAveraging callback's last update."""
    return callback._latest_update_step


def set_latest_update_step(callback: WeightAveraging, step: int) -> None:
    callback._latest_update_step = step


def ddp_kwargs(strategy: DDPStrategy) -> dict:
    """The keyword arguments of DistributedDataParallel a DDPStrategy was given."""
    return strategy._ddp_kwargs

"""The warnings and notices a priorlab run used to print at every start that say nothing about it, silenced here,
each with the reason it does not apply. What priorlab could fix at its source is fixed there instead:

- torch's hint to `set_float32_matmul_precision` on CUDA: `matmul_precision=high` in trainer=gpu
  (`set_matmul_precision`);
- the data loaders' `persistent_workers` spawn warning: set whenever `data.num_workers` > 0 (`data.base`).

`quiet()` applies the rest for the duration of a fit, leaving the process's own warning filters and logging as they
were after it.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator

import torch

# (message regex, category, why it does not concern a priorlab run)
WARNINGS = [
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
     "Lightning's CombinedLoader builds a torch LeafSpec for every data loader (lightning/pytorch/utilities/"
     "_pytree.py); no priorlab code calls it, and Lightning, not priorlab, must move to TreeSpec"),
    (r"The '\w+' does not have many workers", Warning,
     "priorlab's data sets are tensors in memory, a batch one indexing of them (`data.base`); worker processes "
     "would only copy them. data.num_workers is there for a data module that decodes files"),
    (r"Checkpoint directory .* exists and is not empty", Warning,
     "a run's checkpoints/ holds only its own last.ckpt: a run that finds it resumes from it (the folder of a run "
     "that failed before its first checkpoint is removed), so the folder is expected to hold it"),
]  # fmt: skip

# Lightning's notices (logged at INFO) that advertise its products, not the run: matched at the start of a message
NOTICES = ("💡 Tip:",)
_LIGHTNING_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")

MATMUL_PRECISIONS = ("highest", "high", "medium")


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOTICES)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Within the block: the WARNINGS ignored and Lightning's NOTICES not logged."""
    drop = _DropNotices()
    loggers = [logging.getLogger(name) for name in _LIGHTNING_LOGGERS]
    with warnings.catch_warnings():
        for message, category, _why in WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category)
        for logger in loggers:
            logger.addFilter(drop)
        try:
            yield
        finally:
            for logger in loggers:
                logger.removeFilter(drop)


def set_matmul_precision(precision: str | None) -> None:
    """torch.set_float32_matmul_precision(precision) (None: torch's setting as it is). `high` lets float32 matrix
    products use TF32 tensor cores on CUDA (the GPU presets' autocast computes in bf16 already); Lightning prints a
    hint at every start on a tensor-core GPU while it is `highest`, torch's default."""
    if precision is not None:  # checked against MATMUL_PRECISIONS with the run's config (`commands.train`)
        torch.set_float32_matmul_precision(precision)

"""The shared in-memory datamodule: load once, validate, split deterministically."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from priorlab.checks import MAX_TORCH_SEED, is_whole, whole
from priorlab.errors import UserError
from priorlab.seeds import batch_seed, step_seed


def resize_images(x: Tensor, image_size: int) -> Tensor:
    """Resize (N, C, H, W) images to image_size × image_size with antialiased bilinear filtering."""
    if x.shape[-1] == image_size and x.shape[-2] == image_size:
        return x
    return F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)


class TensorDataModule(L.LightningDataModule):
    """A datamodule over tensors (x, label) that fit in memory.

    Subclasses implement `load()`. The split is a permutation drawn from `split_seed`, so the same
    config gives the same train and validation sets on every machine and every DDP rank.

    The evaluator cache (`runs/evaluators/<name>`) is keyed by `name` and checked against `identity()`, the
    settings that change the samples; the split, batch size and workers do not enter either.

    Args:
        name: names the data set and its settings; None derives it from them (`default_name`).
        batch_size: samples per batch on each process.
        val_fraction: share of the data held out for validation and evaluation.
        split_seed: seed of the train/val permutation.
        num_workers: DataLoader workers (0 keeps everything in the main process).
        train_per_class: train on only the first n samples of each class of the training split ("all" or None:
            every sample). The validation split, the evaluator and its reference statistics keep all the data,
            so fine-tunes on 5, 20 or all samples per class are measured against the same distribution, as in
            the paper's fine-tunes on small data sets. The subsets are nested: the 5 are among the 20.
    """

    def __init__(
        self, name: str | None = None, batch_size: int = 128, val_fraction: float = 0.1, split_seed: int = 0,
        num_workers: int = 0, train_per_class: int | str | None = None,
    ):  # fmt: skip
        super().__init__()
        if train_per_class == "all":
            train_per_class = None
        per_class_ok = is_whole(train_per_class) and 1 <= train_per_class <= MAX_TORCH_SEED
        if train_per_class is not None and not per_class_ok:
            raise UserError(f"data.train_per_class={train_per_class!r} must be a positive whole number or `all`")
        self.train_per_class = train_per_class
        if name is not None and not isinstance(name, str):
            raise UserError(f"data.name={name!r} must be a name (or null for the default)")
        self._name = name
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, float | int) or not 0.0 < val_fraction < 1.0:
            raise UserError(f"data.val_fraction={val_fraction!r} must lie strictly between 0 and 1")
        whole(batch_size, "data.batch_size", 1)
        whole(split_seed, "data.split_seed", 0, MAX_TORCH_SEED)
        whole(num_workers, "data.num_workers", 0)
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.run_seed = 0  # the run's seed, which picks its stream of batches (set by `train.build_module`)
        self.num_workers = num_workers
        self.train_set: TensorDataset | None = None  # what training draws from (train_per_class applied)
        self.full_train_set: TensorDataset | None = None  # the whole training split (evaluator, reference)
        self.val_set: TensorDataset | None = None
        self.num_classes: int = 0

    def load(self) -> tuple[Tensor, Tensor, int]:
        """Return all samples x (N, ...), integer labels (N,) and the number of classes."""
        raise NotImplementedError

    def data_settings(self) -> dict:
        """The settings that change the samples (source, size, classes, ...), JSON-serialisable."""
        return {}

    def default_name(self) -> str:
        """The name derived from `data_settings` when none is given."""
        return type(self).__name__.removesuffix("DataModule").lower()

    @property
    def name(self) -> str:
        return self._name or self.default_name()

    def identity(self) -> dict:
        """What identifies the data: the datamodule class, `data_settings`, the sample shape and class count.

        An evaluator records it, and a cached one is used only for data with the same identity.
        """
        self.setup()
        return {"data": type(self).__name__, **self.data_settings(), "sample_shape": list(self.sample_shape),
                "num_classes": self.num_classes}  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y, num_classes = self.load()
        check_labels(y, num_classes, source=type(self).__name__)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.split_seed))
        n_val = max(1, round(self.val_fraction * len(x)))
        if n_val >= len(x):
            raise UserError(f"{type(self).__name__}: {len(x)} sample(s) with data.val_fraction={self.val_fraction} "
                            "leave none to train on; use more data or a smaller data.val_fraction")  # fmt: skip
        val_idx, train_idx = perm[:n_val], perm[n_val:]
        self.full_train_set = TensorDataset(x[train_idx].float(), y[train_idx].long())
        if self.train_per_class is not None:
            train_idx = first_per_class(train_idx, y, self.train_per_class)
        self.train_set = TensorDataset(x[train_idx].float(), y[train_idx].long())
        self.val_set = TensorDataset(x[val_idx].float(), y[val_idx].long())
        self.num_classes = num_classes

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. (1, 16, 16) or (2,)."""
        if self.train_set is None:
            self.setup()
        return tuple(self.train_set.tensors[0].shape[1:])

    def all_data(self) -> tuple[Tensor, Tensor]:
        """The whole training split and the validation split together, (x, labels) (`train_per_class` aside)."""
        self.setup()
        return (torch.cat([self.full_train_set.tensors[0], self.val_set.tensors[0]]),
                torch.cat([self.full_train_set.tensors[1], self.val_set.tensors[1]]))  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        """Batches that are a pure function of (run seed, split_seed, step, rank): a resumed run sees the same data,
        and each seed of a sweep its own stream. The run seed is `run_seed`, which
        `train.build_module` sets to the run's `seed` (0 otherwise)."""
        trainer = getattr(self, "trainer", None)
        start = trainer.global_step if trainer is not None else 0
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        seed = batch_seed(self.run_seed, self.split_seed)
        sampler = StepBatchSampler(len(self.train_set), self.batch_size, seed, start, rank, world)
        # A batch is one indexing of the tensors (not a stack of single samples); pinned host memory lets the
        # copy to the GPU run without stalling the queue of kernels.
        return DataLoader(_Indexable(*self.train_set.tensors), batch_sampler=sampler, collate_fn=_as_batch,
                          pin_memory=torch.cuda.is_available(), **self._workers())  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, **self._workers())

    def _workers(self) -> dict:
        """Worker processes, when data.num_workers asks for them, kept between validations rather than started
        again for each (Lightning warns of the restart where processes are spawned)."""
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0}


class _Indexable(TensorDataset):
    """A TensorDataset that returns a whole batch from one index list (DataLoader's `__getitems__`)."""

    def __getitems__(self, idx: list[int]) -> list[Tensor]:
        index = torch.as_tensor(idx, dtype=torch.long)
        return [t[index] for t in self.tensors]


def _as_batch(items: list[Tensor]) -> list[Tensor]:
    return items


class StepBatchSampler:
    """An endless stream of batches, batch k drawn with replacement from a generator seeded by (seed, k).

    All ranks draw the same global batch of batch_size · world indices and each takes its own slice, so the
    data of optimizer step k depends only on the seed and k: resuming at step s continues the same stream,
    and the union over ranks equals a single-process batch of the global size.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.rank, self.world = start_step, rank, world

    def __iter__(self):
        step = self.start_step
        while True:
            g = torch.Generator().manual_seed(step_seed(self.seed, step))
            idx = torch.randint(0, self.n, (self.batch_size * self.world,), generator=g)
            yield idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()
            step += 1


def first_per_class(idx: Tensor, y: Tensor, n: int) -> Tensor:
    """The indices of `idx` (in its order) that are among the first n of their class y[idx]."""
    labels = y[idx]
    order = torch.zeros_like(labels)  # (N,) the rank of each index within its class, in the order of idx
    for k in labels.unique():
        members = labels == k
        order[members] = torch.arange(int(members.sum()))
    return idx[order < n]


def check_labels(y: Tensor, num_classes: int, source: str) -> None:
    """Raise a UserError naming the offending label when a label is outside [0, num_classes)."""
    if len(y) == 0:
        raise UserError(f"{source}: the data set is empty")
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        first = int(y[bad][0])
        raise UserError(
            f"{source}: label {first} is outside [0, {num_classes}) ({int(bad.sum())} labels out of range); "
            "set data.num_classes to cover every label or fix the label column"
        )

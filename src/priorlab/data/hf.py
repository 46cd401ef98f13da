"""Any Hugging Face `datasets` source: a hub name (online), or a local imagefolder or parquet (offline).

With `caption_column`, the data are image–caption pairs for a text-conditioned fine-tune (`models.text`): each
distinct caption is a class, numbered in sorted order (`captions`), so labels are caption indices.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from priorlab.checks import whole
from priorlab.data.base import TensorDataModule
from priorlab.errors import UserError


class HFDataModule(TensorDataModule):
    """Images and integer labels from a `datasets` source, resized and scaled to [-1, 1].

    Args:
        source: a local folder of class sub-folders (imagefolder), a folder of or path to parquet files,
            or a hub data set name (needs network).
        split: the split to read.
        image_column: column holding the images.
        label_column: column holding integer (or ClassLabel) labels.
        image_size: side length after resizing.
        channels: 1 (grayscale) or 3 (RGB).
        num_classes: number of classes; taken from a ClassLabel column or the largest label when None.
        caption_column: column holding each image's caption (text data): labels are then the index of each
            image's caption among the distinct captions (`captions`), and label_column and num_classes are unused.
    """

    def __init__(
        self,
        source: str,
        split: str = "train",
        image_column: str = "image",
        label_column: str = "label",
        image_size: int = 32,
        channels: int = 3,
        num_classes: int | None = None,
        caption_column: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise UserError(f"data.channels={channels}: use 1 (grayscale) or 3 (RGB)")
        whole(image_size, "data.image_size", 1)
        if num_classes is not None:
            whole(num_classes, "data.num_classes", 1)
        for key, value in (("source", source), ("split", split), ("image_column", image_column),
                           ("label_column", label_column)):  # fmt: skip
            if not isinstance(value, str) or not value:
                raise UserError(f"data.{key}={value!r} must be a name or path")
        self.source = source
        self.split = split
        self.image_column = image_column
        self.label_column = label_column
        self.image_size = image_size
        self.channels = channels
        self.configured_classes = num_classes
        if caption_column is not None and (not isinstance(caption_column, str) or not caption_column):
            raise UserError(f"data.caption_column={caption_column!r} must be a column name (or null: class labels)")
        self.caption_column = caption_column
        self.captions: list[str] | None = None  # the distinct captions, in label order (text data)

    def data_settings(self) -> dict:
        path = Path(self.source).expanduser()
        source = str(path.resolve()) if path.exists() else self.source
        return {"source": source, "split": self.split, "image_column": self.image_column,
                "label_column": self.label_column, "image_size": self.image_size, "channels": self.channels,
                "num_classes": self.configured_classes, "caption_column": self.caption_column}  # fmt: skip

    def default_name(self) -> str:
        """hf-<source folder, file or hub name>-<split>-<channels>x<image_size>, e.g. hf-my_images-train-3x32."""
        stem = Path(self.source.rstrip("/")).name or "source"
        return f"hf-{stem}-{self.split}-{self.channels}x{self.image_size}"

    def _open(self):
        import datasets

        path = Path(self.source).expanduser()
        looks_local = self.source.startswith((".", "/", "~")) or path.exists()
        if looks_local and not path.exists():
            raise UserError(f"data.source={self.source}: no such file or folder")
        if path.is_dir() and not any(p.is_file() for p in path.rglob("*")):
            raise UserError(f"data.source={self.source} is an empty folder; put class sub-folders of images or "
                            "parquet files there")  # fmt: skip
        try:
            if path.is_file() or (path.is_dir() and any(path.rglob("*.parquet"))):
                files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
                ds = datasets.load_dataset("parquet", data_files={self.split: files}, split=self.split)
            elif path.is_dir():
                ds = datasets.load_dataset("imagefolder", data_dir=str(path), split=self.split)
            else:
                ds = datasets.load_dataset(self.source, split=self.split)
        except UserError:
            raise
        except Exception as err:  # datasets raises many types; the user needs the source and the reason
            raise UserError(f"data.source={self.source}: could not load split {self.split!r}: {err}") from err
        labels = ("caption_column", self.caption_column) if self.caption_column else ("label_column", self.label_column)
        for role, column in (("image_column", self.image_column), labels):
            if column not in ds.column_names:
                raise UserError(
                    f"data.{role}={column!r} is not a column of {self.source}; its columns are {ds.column_names}"
                )
        return ds

    def load(self) -> tuple[Tensor, Tensor, int]:
        ds = self._open()
        if len(ds) < 2:
            raise UserError(f"data.source={self.source}: split {self.split!r} holds {len(ds)} row(s); training needs "
                            "at least 2 (one is held out for validation)")  # fmt: skip
        if self.caption_column:
            y = self._captions(ds[self.caption_column])
        else:
            y = self._labels(ds[self.label_column])
        x = torch.from_numpy(np.stack(self._images(ds))).float() / 127.5 - 1  # (N, H, W[, C])
        x = x[:, None] if self.channels == 1 else x.permute(0, 3, 1, 2)
        if self.caption_column:
            return x, y, len(self.captions)
        feature = ds.features[self.label_column]
        num_classes = self.configured_classes or getattr(feature, "num_classes", None) or int(y.max()) + 1
        return x, y, num_classes

    def _labels(self, values: list) -> Tensor:
        """The label column as class indices: whole numbers (whole floats such as 3.0 too); a UserError naming the
        first row that holds anything else (a string, an empty cell, 0.5, true)."""
        for row, v in enumerate(values):
            if isinstance(v, bool) or not isinstance(v, int | float) or v != v or v % 1:
                what = "an empty cell" if v is None else repr(v)
                raise UserError(f"data.label_column={self.label_column!r} of {self.source}: row {row} holds {what}, "
                                "not a class index (a whole number); fix the labels or use another column")  # fmt: skip
        return torch.as_tensor([int(v) for v in values], dtype=torch.long)

    def _captions(self, values: list) -> Tensor:
        """The caption column as indices into the sorted distinct captions (kept in `captions`); a UserError naming
        the first row that holds no text."""
        for row, v in enumerate(values):
            if not isinstance(v, str):
                what = "an empty cell" if v is None else repr(v)
                raise UserError(f"data.caption_column={self.caption_column!r} of {self.source}: row {row} holds "
                                f"{what}, not a caption; fix the captions or use another column")  # fmt: skip
        self.captions = sorted(set(values))
        index = {c: i for i, c in enumerate(self.captions)}
        return torch.as_tensor([index[v] for v in values], dtype=torch.long)

    def _images(self, ds) -> list[np.ndarray]:
        """Each image decoded, converted and resized; a UserError naming the first that cannot be read."""
        import datasets

        mode = "L" if self.channels == 1 else "RGB"
        if not isinstance(ds.features[self.image_column], datasets.Image):
            return [self._to_array(img, mode, row) for row, img in enumerate(ds[self.image_column])]
        raw = ds.cast_column(self.image_column, datasets.Image(decode=False))[self.image_column]
        return [self._to_array(item, mode, row) for row, item in enumerate(raw)]

    def _to_array(self, img, mode: str, row: int) -> np.ndarray:
        from PIL import Image

        if isinstance(img, dict) and ("bytes" in img or "path" in img):  # an undecoded datasets.Image
            where = img.get("path") or f"row {row}"
            try:
                img = Image.open(io.BytesIO(img["bytes"])) if img.get("bytes") else Image.open(img["path"])
                img.load()
            except Image.DecompressionBombError as err:  # PIL's guard against huge images (its message gives sizes)
                raise UserError(f"data.source={self.source}: the image {where} is too large to decode safely ({err}); "
                                "shrink it or remove it") from err  # fmt: skip
            except (OSError, ValueError, SyntaxError) as err:
                raise UserError(f"data.source={self.source}: the image {where} cannot be read ({type(err).__name__}: "
                                f"{err}); remove or replace it") from err  # fmt: skip
        if not isinstance(img, Image.Image):
            raise UserError(
                f"data.image_column={self.image_column!r} does not hold images (found {type(img).__name__})"
            )
        img = img.convert(mode).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)

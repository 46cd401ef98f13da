"""Emoji in several art styles (`priorlab data emoji` prepares them): the data of the paper's setting.

A base is trained on some styles and fine-tuned on another: the same classes (the emoji categories) in a new
domain, as DiT-XL/2 trained on ImageNet is fine-tuned on SUN397 (Phunyaphibarn et al. 2025, Sec. 5).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from priorlab.checks import is_list, whole
from priorlab.data.base import TensorDataModule
from priorlab.data.emoji_sources import STYLES
from priorlab.errors import UserError


class EmojiDataModule(TensorDataModule):
    """The images of one or more prepared emoji styles, labelled by category, scaled to [-1, 1].

    Args:
        root: the folder `priorlab data emoji` wrote (card.json, one folder per style).
        styles: the styles to draw from, e.g. [twitter] for a fine-tune, [google, openmoji, fluent] for a base.
        image_size: side length; images are resized from the prepared size (Lanczos) when it differs.
        classes: a subset of the categories by folder name (e.g. [flags, smileys-emotion]), labelled 0..k−1 in
            the card's order; None: every category.
    """

    def __init__(self, root: str = "data/emoji", styles: list[str] | None = None, image_size: int = 32,
                 classes: list[str] | None = None, **kwargs):  # fmt: skip
        super().__init__(**kwargs)
        styles = ["twitter"] if styles is None else styles
        if isinstance(styles, str) or not is_list(styles) or not styles or any(s not in STYLES for s in styles):
            raise UserError(f"data.styles={styles!r} must be a list of emoji styles from {', '.join(STYLES)}")
        if classes is not None and (isinstance(classes, str) or not is_list(classes) or not classes):
            raise UserError(f"data.classes={classes!r} must be a list of category folders (or null: all)")
        self.root = str(root)
        self.styles = list(styles)
        self.image_size = whole(image_size, "data.image_size", 4)
        self.classes = None if classes is None else [str(c) for c in classes]

    def card(self) -> dict:
        """The data card (card.json) of the root; a UserError saying how to prepare it when it is missing."""
        path = Path(self.root).expanduser() / "card.json"
        hint = f"run `priorlab data emoji styles=[{','.join(self.styles)}] out={self.root}` first"
        if not path.exists():
            raise UserError(f"data.root={self.root} holds no prepared emoji (no card.json); {hint}")
        card = json.loads(path.read_text())
        missing = [s for s in self.styles if s not in card.get("styles", {})]
        if missing:
            raise UserError(f"data.root={self.root} holds no style {', '.join(missing)}; {hint}")
        return card

    def class_names(self) -> list[str]:
        known = self.card()["classes"]
        if self.classes is None:
            return known
        unknown = [c for c in self.classes if c not in known]
        if unknown:
            raise UserError(f"data.classes holds {', '.join(unknown)}; the categories are {', '.join(known)}")
        return [c for c in known if c in self.classes]

    def load(self) -> tuple[Tensor, Tensor, int]:
        from PIL import Image

        names = self.class_names()
        images, labels = [], []
        for style in self.styles:
            for k, name in enumerate(names):
                for path in sorted((Path(self.root).expanduser() / style / name).glob("*.png")):
                    with Image.open(path) as img:
                        img = img.convert("RGB")
                        if img.size != (self.image_size, self.image_size):
                            img = img.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
                        images.append(np.asarray(img, dtype=np.uint8))
                    labels.append(k)
        if not images:
            raise UserError(f"data.root={self.root} holds no image of styles {self.styles} and classes {names}")
        x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (N, 3, H, W)
        return x, torch.as_tensor(labels, dtype=torch.long), len(names)

    def data_settings(self) -> dict:
        card = self.card()
        sources = {s: f"{card['styles'][s]['package']}@{card['styles'][s]['version']}" for s in self.styles}
        # where the images lie is not what they are: an evaluator made from a copy elsewhere serves this data too
        return {"styles": self.styles, "sources": sources, "image_size": self.image_size,
                "classes": self.class_names()}  # fmt: skip

    def default_name(self) -> str:
        """emoji-<styles>-<size>[-classes-<names>]: emoji-twitter-32, emoji-google+fluent-16-classes-flags."""
        subset = "" if self.classes is None else "-classes-" + "-".join(self.class_names())
        return f"emoji-{'+'.join(self.styles)}-{self.image_size}{subset}"

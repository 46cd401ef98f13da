"""A tiny generated image–caption data set: coloured shapes captioned "a red square", "a blue disc", ...

It needs no download, so a text-conditioned fine-tune (`models.text`) can be tried and tested offline:
`write_captioned_shapes(folder)` writes a parquet file that `data=hf data.source=FOLDER data.caption_column=text`
reads. Six captions (three colours × two shapes) repeat, so the evaluator's classifier over captions
(`evaluation.setup`) is a caption-match score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 230)}
SHAPES = ("square", "disc")


def captioned_shapes(n: int, size: int = 8, seed: int = 0) -> tuple[list[np.ndarray], list[str]]:
    """n RGB images (size, size, 3) of uint8, each one shape of one colour at a random place, and their captions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, captions = [], []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        shape = SHAPES[(i // len(COLOURS)) % len(SHAPES)]
        r = max(1, size // 4)
        cy, cx = rng.integers(r, size - r + 1, size=2)
        if shape == "square":
            mask = (abs(yy - cy) <= r - 1) & (abs(xx - cx) <= r - 1)
        else:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img = np.zeros((size, size, 3), dtype=np.uint8)
        img[mask] = COLOURS[colour]
        images.append(img)
        captions.append(f"a {colour} {shape}")
    return images, captions


def write_captioned_shapes(folder: str | Path, n: int = 96, size: int = 8, seed: int = 0) -> Path:
    """Write `captioned_shapes` as folder/train.parquet with columns image (PNG) and text; returns the folder."""
    import datasets
    from PIL import Image

    images, captions = captioned_shapes(n, size, seed)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ds = datasets.Dataset.from_dict({"image": [Image.fromarray(x) for x in images], "text": captions},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "text": datasets.Value("string")}))  # fmt: skip
    ds.to_parquet(str(folder / "train.parquet"))
    return folder

"""Small npm tarballs in the layout of the real emoji packages (no network): emoji-datasource's emoji.json, two PNG
styles and one Iconify SVG style, for `priorlab data emoji tarballs=DIR`."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image

from priorlab.data.emoji_sources import METADATA, STYLES

# (unified, category, skin-tone variants): three categories of three, a skin-tone swatch, and a duplicate drawing
ENTRIES = [
    ("1F600", "Smileys & Emotion", 0), ("1F603", "Smileys & Emotion", 0), ("2764-FE0F", "Smileys & Emotion", 0),
    ("1F1EB-1F1F7", "Flags", 0), ("1F1E9-1F1EA", "Flags", 0), ("1F3C1", "Flags", 0),
    ("1F44B", "People & Body", 5), ("1F385", "People & Body", 5), ("1F9D1", "People & Body", 5),
    ("1F3FB", "Component", 0),
]  # fmt: skip
DUPLICATE = "1F603"  # drawn exactly as 1F600 in every style: kept once


def colour(unified: str, style: str) -> tuple[int, int, int]:
    """A drawing's colour, distinct per emoji and per style (the duplicate shares its twin's)."""
    code = "1F600" if unified == DUPLICATE else unified
    h = sum(ord(c) * (i + 1) for i, c in enumerate(code + style))
    return (h * 37) % 256, (h * 91) % 256, (h * 53) % 256


def _png(rgb: tuple[int, int, int], size: int = 64) -> bytes:
    img = Image.new("RGBA", (size, size), (0, 0, 0, 0))  # transparent: flattened on white when prepared
    img.paste((*rgb, 255), (8, 8, size - 8, size - 8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _tar(path: Path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def emoji_json() -> bytes:
    rows = []
    for i, (unified, category, variants) in enumerate(ENTRIES):
        tones = {f"1F3F{b}": {"unified": f"{unified}-1F3F{b}", "image": f"{unified.lower()}-1f3f{b}.png"}
                 for b in "BCDEF"[:variants]}  # fmt: skip
        rows.append({"unified": unified, "image": f"{unified.lower()}.png", "category": category,
                     "subcategory": "x", "sort_order": i, **({"skin_variations": tones} if tones else {})})  # fmt: skip
    return json.dumps(rows).encode()


def build_tarballs(folder: Path, corrupt: str | None = None) -> Path:
    """Write the fake packages' tarballs (named as `npm pack` names them) into `folder`; `corrupt`: a style whose
    first image is not a PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    _tar(folder / METADATA.tarball, {"package/emoji.json": emoji_json()})
    for name in ("google", "twitter"):
        files = {"package/emoji.json": emoji_json()}
        for i, (unified, _, variants) in enumerate(ENTRIES):
            data = b"not a png" if corrupt == name and i == 0 else _png(colour(unified, name))
            files[f"package/img/{name}/64/{unified.lower()}.png"] = data
            for b in "BCDEF"[:variants]:
                files[f"package/img/{name}/64/{unified.lower()}-1f3f{b}.png"] = _png((0, 0, 0))
        _tar(folder / STYLES[name].tarball, files)
    icons, chars = {}, {}
    for unified, _, _ in ENTRIES[:-3]:  # openmoji lacks two emoji (and the swatch): "not drawn"
        r, g, b = colour(unified, "openmoji")
        name = f"icon-{unified.lower()}"
        icons[name] = {"body": f'<rect x="8" y="8" width="56" height="56" fill="rgb({r},{g},{b})"/>'}
        chars[unified.lower()] = name
    iconify = {"prefix": "openmoji", "icons": icons, "aliases": {}, "width": 72, "height": 72}
    _tar(folder / STYLES["openmoji"].tarball, {"package/icons.json": json.dumps(iconify).encode(),
                                               "package/chars.json": json.dumps(chars).encode()})  # fmt: skip
    return folder

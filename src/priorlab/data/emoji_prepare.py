"""`priorlab data emoji`: fetch emoji styles with `npm pack` and write one imagefolder per style and a data card.

Layout of `out` (default data/emoji): <style>/<class>/<code points>.png at `size` px, RGB on white, one
<style>/style.json each (source, licence, counts), and card.json + README.md, the data card of every style present.
Each style's folder is written under a temporary name and renamed into place when complete, so a failure leaves
no half-written style; a style already prepared from the same package version at the same size is kept.

Near-duplicates: emoji-datasource lists an emoji's skin-tone variants under the emoji itself (about 1,900 of each
style's 3,780 images). Only the emoji's own image is kept, so no class holds five recolourings of one drawing.
Images that come out pixel-identical within a style (the same drawing under two code points) are kept once.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from priorlab import atomic
from priorlab.checks import is_list, whole
from priorlab.data.emoji_sources import (
    METADATA,
    NATIVE_SIZE,
    SKIPPED_CATEGORIES,
    STYLES,
    Style,
    class_folder,
    codepoints,
)
from priorlab.errors import UserError


@dataclass(frozen=True)
class Emoji:
    """One emoji of the metadata: its code points (`codepoints` form), class folder and image file name."""

    code: str
    label: str
    image: str
    variants: int  # skin-tone variants left out


def check_styles(styles) -> list[str]:
    """`styles` as a list of known style names, in the given order, without repeats."""
    if isinstance(styles, str):
        styles = [styles]
    if not is_list(styles) or not styles:
        raise UserError(f"styles={styles!r} must be a list of emoji styles, e.g. [google,twitter]; known: "
                        f"{', '.join(STYLES)}")  # fmt: skip
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise UserError(f"styles holds {', '.join(map(str, unknown))}; known styles: {', '.join(STYLES)} (Apple's "
                        "images are not licensed for this use, Facebook's licence is unclear)")  # fmt: skip
    return list(dict.fromkeys(styles))


def fetch(style: Style, sources: Path, offline: bool) -> Path:
    """The package's tarball in `sources`, fetched there with `npm pack` unless it is there already or `offline`."""
    path = sources / style.tarball
    if path.exists():
        return path
    if offline:
        raise UserError(f"tarballs={sources} holds no {style.tarball}; put the file `npm pack {style.package}@"
                        f"{style.version}` writes there, or leave tarballs unset to fetch it")  # fmt: skip
    if shutil.which("npm") is None:
        raise UserError("npm is not installed: install Node.js with npm (Debian: apt-get install npm) to fetch the "
                        "emoji packages, or pass tarballs=DIR holding the .tgz files `npm pack` makes")  # fmt: skip
    sources.mkdir(parents=True, exist_ok=True)
    print(f"fetching {style.package}@{style.version} with npm pack", flush=True)
    done = subprocess.run(["npm", "pack", f"{style.package}@{style.version}", "--pack-destination", str(sources)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0 or not path.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise UserError(f"`npm pack {style.package}@{style.version}` failed: {' | '.join(tail) or 'no output'}")
    return path


def read_members(tarball: Path, wanted: set[str]) -> dict[str, bytes]:
    """The named members of a .tgz, read in one pass over the stream; a UserError for an unreadable archive."""
    out = {}
    try:
        with tarfile.open(tarball, "r:gz") as tar:
            for member in tar:
                if member.name in wanted and member.isfile():
                    out[member.name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UserError(f"{tarball} is not a readable npm tarball ({err}); delete it to fetch it again") from err
    return out


def read_metadata(tarball: Path) -> list[Emoji]:
    """The emoji of emoji-datasource's emoji.json in its sort order, skin-tone swatches left out."""
    raw = read_members(tarball, {"package/emoji.json"}).get("package/emoji.json")
    if raw is None:
        raise UserError(f"{tarball} holds no package/emoji.json; is it {METADATA.package}@{METADATA.version}?")
    entries = sorted(json.loads(raw), key=lambda e: e.get("sort_order", 0))
    return [Emoji(codepoints(e["unified"]), class_folder(e["category"]), e["image"],
                  len(e.get("skin_variations") or {}))
            for e in entries if e["category"] not in SKIPPED_CATEGORIES]  # fmt: skip


def png_images(style: Style, tarball: Path, emoji: list[Emoji]) -> dict[str, bytes]:
    """code → the style's 64-px PNG of each emoji it draws."""
    names = {f"package/img/{style.folder}/64/{e.image}": e.code for e in emoji}
    return {names[k]: v for k, v in read_members(tarball, set(names)).items()}


def svg_images(style: Style, tarball: Path, emoji: list[Emoji]) -> dict[str, bytes]:
    """code → a PNG of each emoji the Iconify set draws, rendered at the native size on white."""
    try:
        import resvg_py
    except ImportError as err:
        raise UserError(f"style {style.package} is SVG and needs resvg-py: pip install resvg-py") from err
    files = read_members(tarball, {"package/icons.json", "package/chars.json"})
    if len(files) < 2:
        raise UserError(f"{tarball} lacks package/icons.json or package/chars.json; is it {style.package}?")
    icons, chars = json.loads(files["package/icons.json"]), json.loads(files["package/chars.json"])
    by_code = {codepoints(k): name for k, name in chars.items()}
    out = {}
    for e in emoji:
        icon = resolve_icon(icons, by_code.get(e.code))
        if icon is None:
            continue
        w, h = icon.get("width", icons.get("width", 16)), icon.get("height", icons.get("height", 16))
        left, top = icon.get("left", 0), icon.get("top", 0)
        flip = f' transform="translate({2 * left + w} 0) scale(-1 1)"' if icon.get("hFlip") else ""  # x → 2l + w − x
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="{left} {top} {w} {h}" width="{NATIVE_SIZE}" '
               f'height="{NATIVE_SIZE}"><g{flip}>{icon["body"]}</g></svg>')  # fmt: skip
        out[e.code] = bytes(resvg_py.svg_to_bytes(svg_string=svg, width=NATIVE_SIZE, height=NATIVE_SIZE))
    return out


def resolve_icon(icons: dict, name: str | None) -> dict | None:
    """An icon's body and box by name, following Iconify aliases to their parent (a horizontal flip kept)."""
    seen = set()
    flip = False
    while name is not None and name not in seen:
        seen.add(name)
        if name in icons.get("icons", {}):
            return {**icons["icons"][name], "hFlip": flip != bool(icons["icons"][name].get("hFlip"))}
        alias = icons.get("aliases", {}).get(name)
        if alias is None:
            return None
        flip = flip != bool(alias.get("hFlip"))
        name = alias.get("parent")
    return None


def write_style(name: str, tarball: Path, emoji: list[Emoji], folder: Path, size: int) -> dict:
    """Write the style's images into `folder` (<class>/<code>.png) and return its style.json record."""
    from PIL import Image

    from priorlab.progress import progress_bar

    style = STYLES[name]
    found = (png_images if style.kind == "png" else svg_images)(style, tarball, emoji)
    counts, seen, duplicates = Counter(), set(), 0
    for e in progress_bar(emoji, desc=f"{name} images", unit="img", mininterval=2):
        if e.code not in found:
            continue
        img = Image.open(io.BytesIO(found[e.code])).convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        white.alpha_composite(img)
        rgb = white.convert("RGB")
        if rgb.size != (size, size):
            rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
        digest = hashlib.sha256(rgb.tobytes()).hexdigest()
        if digest in seen:
            duplicates += 1
            continue
        seen.add(digest)
        (folder / e.label).mkdir(exist_ok=True)
        rgb.save(folder / e.label / f"{e.code}.png")
        counts[e.label] += 1
    return {"style": name, "package": style.package, "version": style.version, "licence": style.licence,
            "attribution": style.attribution, "url": style.url, "size": size, "images": sum(counts.values()),
            "counts": dict(sorted(counts.items())), "not_drawn": len(emoji) - len(found),
            "pixel_duplicates_dropped": duplicates, "skin_tone_variants_left_out": sum(e.variants for e in emoji),
            "metadata": f"{METADATA.package}@{METADATA.version}"}  # fmt: skip


def prepare_emoji(styles, out: str | Path = "data/emoji", size: int = 64, tarballs: str | Path | None = None,
                  force: bool = False) -> Path:  # fmt: skip
    """Prepare each style under `out` and rewrite the data card; returns `out`.

    `tarballs`: a folder that holds the packages' .tgz files (as `npm pack` names them), for a machine without
    the registry; unset, they are fetched into <out>/.sources with `npm pack`."""
    styles = check_styles(styles)
    size = whole(size, "size", 8, 1024)
    out = Path(out)
    sources, offline = (Path(tarballs), True) if tarballs else (out / ".sources", False)
    if offline and not sources.is_dir():
        raise UserError(f"tarballs={tarballs} is not a folder")
    emoji = read_metadata(fetch(METADATA, sources, offline))
    classes = sorted({e.label for e in emoji})
    for name in styles:
        record = out / name / "style.json"
        held = json.loads(record.read_text()) if record.exists() else {}
        if not force and (held.get("version"), held.get("size"), held.get("classes")) == (
            STYLES[name].version, size, classes):  # fmt: skip
            print(f"{name}: kept ({held.get('images')} images at {size} px in {out / name})")
            continue
        tarball = fetch(STYLES[name], sources, offline)
        with atomic.folder(out / name) as tmp:
            info = {**write_style(name, tarball, emoji, tmp, size), "classes": classes}
            atomic.write_json(tmp / "style.json", info, indent=1)
        print(f"{name}: {info['images']} images at {size} px in {out / name}")
    write_card(out, classes)
    return out


def write_card(out: Path, classes: list[str]) -> None:
    """card.json (classes and every prepared style's record) and README.md, the human data card."""
    from priorlab.data.emoji_card import card_markdown

    styles = {p.parent.name: json.loads(p.read_text()) for p in sorted(out.glob("*/style.json"))}
    card = {"classes": classes, "styles": styles}
    atomic.write_json(out / "card.json", card, indent=1)
    atomic.write_text(out / "README.md", card_markdown(card))

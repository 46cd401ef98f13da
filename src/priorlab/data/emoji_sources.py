"""Emoji art styles from the npm registry: one set of classes drawn in several independent styles.

Each style is an npm package of a pinned version whose licence allows training on it. The classes are the
Unicode emoji categories of `emoji-datasource`'s `emoji.json` (MIT), the same for every style, so that a base can
be trained on some styles and fine-tuned on another (a new domain with the same classes, as ImageNet → SUN397 is
a new domain for DiT). Apple's images (not licensed for this use) and Facebook's (licence unclear) are not offered.

`prepare_emoji` (the `priorlab data emoji` command) fetches the packages with npm's own client (`npm pack`) at
set-up, never at training time, and writes one imagefolder per style plus a data card.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Style:
    """One emoji art style: the npm package that holds it and what its licence asks."""

    package: str
    version: str
    kind: str  # "png": emoji-datasource images (img/<folder>/64/*.png); "svg": an Iconify JSON icon set
    licence: str
    attribution: str
    url: str
    folder: str = ""  # png: the style's folder under img/

    @property
    def tarball(self) -> str:
        """The file name `npm pack` gives the package: @scope/name@v → scope-name-v.tgz."""
        return f"{self.package.lstrip('@').replace('/', '-')}-{self.version}.tgz"


METADATA = Style("emoji-datasource", "16.0.0", "json", "MIT", "emoji-datasource by Cal Henderson (iamcal)",
                 "https://github.com/iamcal/emoji-data")  # fmt: skip
STYLES = {
    "google": Style("emoji-datasource-google", "16.0.0", "png", "Apache-2.0",
                    "Noto Emoji, Copyright Google Inc. (via emoji-datasource)",
                    "https://github.com/googlefonts/noto-emoji", "google"),
    "twitter": Style("emoji-datasource-twitter", "16.0.0", "png", "CC-BY-4.0",
                     "Twemoji, Copyright Twitter, Inc. and other contributors (jdecked fork, via emoji-datasource)",
                     "https://github.com/jdecked/twemoji", "twitter"),
    "openmoji": Style("@iconify-json/openmoji", "1.2.29", "svg", "CC-BY-SA-4.0",
                      "OpenMoji, the open-source emoji and icon project (HfG Schwäbisch Gmünd), via Iconify",
                      "https://github.com/hfg-gmuend/openmoji"),
    "fluent": Style("@iconify-json/fluent-emoji-flat", "1.2.6", "svg", "MIT",
                    "Fluent Emoji (flat), Copyright Microsoft Corporation, via Iconify",
                    "https://github.com/microsoft/fluentui-emoji"),
}  # fmt: skip
SKIPPED_CATEGORIES = ("Component",)  # the five skin-tone swatches: colour patches, not emoji of any class
NATIVE_SIZE = 64  # emoji-datasource's PNG size; SVG styles are rendered at it, so every style is resized alike


def class_folder(category: str) -> str:
    """A category as a folder name: 'Smileys & Emotion' → 'smileys-emotion'."""
    return re.sub(r"[^a-z0-9]+", "-", category.lower()).strip("-")


def codepoints(unified: str) -> str:
    """A code-point sequence in one form for every source: lower case, variation selector FE0F dropped
    ('2764-FE0F' → '2764'), so that emoji-datasource's `unified` and Iconify's `chars` keys meet."""
    return "-".join(p for p in unified.lower().split("-") if p != "fe0f")

"""The data card of prepared emoji styles (README.md beside card.json): sources, licences, counts per class."""

from __future__ import annotations

NEAR_DUPLICATES = (
    "emoji-datasource lists each emoji's skin-tone variants under the emoji itself (about half of a style's images); "
    "only the emoji's own image is kept, so no class holds five recolourings of one drawing. Gendered variants "
    "(man, woman, person running) are distinct emoji and are kept: they make People & Body the most repetitive "
    "class. Images that come out pixel-identical within a style are kept once. The skin-tone swatches (category "
    "Component) are left out."
)


def card_markdown(card: dict) -> str:
    """The human data card of `card` (card.json: classes, and per style its style.json record)."""
    styles = card["styles"]
    lines = [
        "# Emoji styles: one set of classes in several art styles",
        "",
        "Prepared by `priorlab data emoji` from npm packages fetched with `npm pack` (pinned versions below). The "
        "classes are the Unicode emoji categories of emoji-datasource's `emoji.json` (MIT), the same in every style, "
        "so a base can be trained on some styles and fine-tuned on another. Each image is the style's drawing, "
        "flattened on white and resized (Lanczos) to the size below.",
        "",
        f"**Classes** ({len(card['classes'])}): {', '.join(card['classes'])}.",
        "",
        f"**Near-duplicates.** {NEAR_DUPLICATES}",
        "",
        "**Licences.** The prepared images are derivatives (flattened, resized) and stay under their style's "
        "licence. CC-BY-4.0 and CC-BY-SA-4.0 ask for the attribution below; CC-BY-SA-4.0 also asks that derivatives "
        "be shared under the same licence. Apple's images (not licensed for this use) and Facebook's (licence "
        "unclear) are not offered.",
        "",
        "| style | package | licence | attribution | images | size | not drawn | pixel duplicates dropped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in styles.items():
        source = f"{s['package']}@{s['version']} | {s['licence']} | {s['attribution']} ({s['url']})"
        lines.append(f"| {name} | {source} | {s['images']} | {s['size']} px | {s['not_drawn']} | "
                     f"{s['pixel_duplicates_dropped']} |")  # fmt: skip
    lines += ["", "**Images per class.**", "", "| class | " + " | ".join(styles) + " |",
              "|---|" + "---|" * len(styles)]  # fmt: skip
    for label in card["classes"]:
        lines.append(f"| {label} | " + " | ".join(str(s["counts"].get(label, 0)) for s in styles.values()) + " |")
    variants = next(iter(styles.values()))["skin_tone_variants_left_out"] if styles else 0
    lines += ["", f"Skin-tone variants left out per style: {variants}.", ""]
    return "\n".join(lines)

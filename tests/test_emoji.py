"""`priorlab data emoji` and `data=emoji`: preparation from npm tarballs (built here, no network), the data card,
near-duplicates, failures that leave nothing half-written, and the datamodule over several styles."""

from __future__ import annotations

import json

import pytest
import torch

from emoji_fixture import ENTRIES, build_tarballs, colour
from priorlab.data.emoji import EmojiDataModule
from priorlab.data.emoji_prepare import check_styles, prepare_emoji, resolve_icon
from priorlab.data.emoji_sources import class_folder, codepoints
from priorlab.errors import UserError

STYLES = ["google", "twitter", "openmoji"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji")
    tarballs = build_tarballs(root / "tarballs")
    out = prepare_emoji(STYLES, root / "data", size=16, tarballs=tarballs)
    return out, tarballs


def test_each_style_is_an_imagefolder_of_the_categories_without_variants_swatches_or_duplicates(prepared):
    out, _ = prepared
    card = json.loads((out / "card.json").read_text())
    assert card["classes"] == ["flags", "people-body", "smileys-emotion"]  # Component left out, sorted
    for style in ("google", "twitter"):
        record = card["styles"][style]
        # 9 emoji of three classes, one pixel-identical twin dropped; the 15 skin-tone variants never written
        assert record["counts"] == {"flags": 3, "people-body": 3, "smileys-emotion": 2}
        assert record["images"] == 8 and record["pixel_duplicates_dropped"] == 1
        assert record["skin_tone_variants_left_out"] == 15 and record["not_drawn"] == 0
        assert len(list((out / style).rglob("*.png"))) == 8
    om = card["styles"]["openmoji"]
    assert om["not_drawn"] == 2 and om["images"] == 6 and om["licence"] == "CC-BY-SA-4.0"
    assert (out / "twitter" / "smileys-emotion" / f"{codepoints('2764-FE0F')}.png").exists()  # FE0F dropped


def test_images_are_flattened_on_white_at_the_asked_size(prepared):
    from PIL import Image

    out, _ = prepared
    img = Image.open(out / "google" / "flags" / "1f3c1.png")
    assert img.size == (16, 16) and img.mode == "RGB"
    assert img.getpixel((0, 0)) == (255, 255, 255)  # the transparent margin became white
    centre = img.getpixel((8, 8))
    assert max(abs(a - b) for a, b in zip(centre, colour("1F3C1", "google"), strict=True)) <= 2
    svg = Image.open(out / "openmoji" / "flags" / "1f3c1.png").convert("RGB")
    expected = colour("1F3C1", "openmoji")  # the SVG's rectangle, rendered by resvg
    assert max(abs(a - b) for a, b in zip(svg.getpixel((8, 8)), expected, strict=True)) <= 2


def test_the_data_card_names_every_source_licence_and_count(prepared):
    out, _ = prepared
    text = (out / "README.md").read_text()
    for needle in ("emoji-datasource-twitter@16.0.0", "CC-BY-4.0", "Apache-2.0", "@iconify-json/openmoji@1.2.29",
                   "Twemoji", "Skin-tone variants left out per style: 15", "| flags | 3 | 3 | 3 |"):  # fmt: skip
        assert needle in text, needle


def test_a_prepared_style_is_kept_and_force_prepares_it_again(prepared, tmp_path, capsys):
    out, tarballs = prepared
    marker = out / "google" / "flags" / "1f3c1.png"
    before = marker.stat().st_mtime_ns
    prepare_emoji(["google"], out, size=16, tarballs=tarballs)
    assert "google: kept" in capsys.readouterr().out and marker.stat().st_mtime_ns == before
    again = tmp_path / "copy"
    prepare_emoji(["google"], again, size=16, tarballs=tarballs)
    first = (again / "google" / "flags" / "1f3c1.png").stat().st_mtime_ns
    prepare_emoji(["google"], again, size=16, tarballs=tarballs, force=True)
    assert (again / "google" / "flags" / "1f3c1.png").stat().st_mtime_ns != first


def test_a_failed_style_leaves_no_half_written_folder(tmp_path):
    tarballs = build_tarballs(tmp_path / "tarballs", corrupt="twitter")
    with pytest.raises(Exception, match="cannot identify image|image file"):
        prepare_emoji(["google", "twitter"], tmp_path / "data", size=16, tarballs=tarballs)
    assert (tmp_path / "data" / "google" / "style.json").exists()  # the style before it is complete
    assert not (tmp_path / "data" / "twitter").exists()
    assert [p.name for p in (tmp_path / "data").iterdir() if p.name.startswith(".")] == []


def test_bad_inputs_are_user_errors_that_say_what_to_do(tmp_path):
    with pytest.raises(UserError, match="known styles: google, twitter, openmoji, fluent.*Apple"):
        check_styles(["apple"])
    with pytest.raises(UserError, match="must be a list"):
        check_styles([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="holds no emoji-datasource-16.0.0.tgz"):
        prepare_emoji(["google"], tmp_path / "out", tarballs=tmp_path / "empty")
    (tmp_path / "empty" / "emoji-datasource-16.0.0.tgz").write_bytes(b"broken")
    with pytest.raises(UserError, match="not a readable npm tarball"):
        prepare_emoji(["google"], tmp_path / "out", tarballs=tmp_path / "empty")


def test_iconify_aliases_resolve_to_their_parent_with_the_flip():
    icons = {"icons": {"a": {"body": "<g/>"}}, "aliases": {"b": {"parent": "a", "hFlip": True}, "c": {"parent": "b"},
                                                           "loop": {"parent": "loop"}}}  # fmt: skip
    assert resolve_icon(icons, "a") == {"body": "<g/>", "hFlip": False}
    assert resolve_icon(icons, "c") == {"body": "<g/>", "hFlip": True}
    assert resolve_icon(icons, "loop") is None and resolve_icon(icons, None) is None
    assert class_folder("Smileys & Emotion") == "smileys-emotion"


def test_the_datamodule_reads_styles_and_classes_with_one_label_per_category(prepared):
    out, _ = prepared
    dm = EmojiDataModule(root=str(out), styles=["google", "twitter"], image_size=8, val_fraction=0.25)
    x, y, k = dm.load()
    assert x.shape == (16, 3, 8, 8) and k == 3 and float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.bincount(y).tolist() == [6, 6, 4]  # flags, people-body, smileys-emotion over two styles
    sub = EmojiDataModule(root=str(out), styles=["openmoji"], image_size=16, classes=["smileys-emotion", "flags"])
    xs, ys, ks = sub.load()
    assert ks == 2 and torch.bincount(ys).tolist() == [3, 2]  # flags → 0, smileys-emotion → 1 (the card's order)
    assert sub.name == "emoji-openmoji-16-classes-flags-smileys-emotion"
    assert sub.identity()["sources"] == {"openmoji": "@iconify-json/openmoji@1.2.29"}


def test_the_datamodule_says_how_to_prepare_what_is_missing(prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(UserError, match=r"no prepared emoji.*priorlab data emoji styles=\[twitter\] out="):
        EmojiDataModule(root=str(tmp_path / "none")).load()
    with pytest.raises(UserError, match="holds no style fluent"):
        EmojiDataModule(root=str(out), styles=["fluent"]).load()
    with pytest.raises(UserError, match="data.classes holds cats"):
        EmojiDataModule(root=str(out), classes=["cats"]).load()
    with pytest.raises(UserError, match="data.styles"):
        EmojiDataModule(root=str(out), styles=["apple"])


def test_the_command_prepares_from_tarballs_and_refuses_other_data_sets(tmp_path, cli):
    tarballs = build_tarballs(tmp_path / "tarballs")
    done = cli("data", "emoji", "styles=[twitter]", "size=8", f"out={tmp_path / 'out'}", f"tarballs={tarballs}",
               cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(list((tmp_path / "out" / "twitter").rglob("*.png"))) == len(ENTRIES) - 2  # swatch, twin
    bad = cli("data", "cifar", cwd=tmp_path)
    assert bad.returncode == 2 and "priorlab: error: priorlab data cifar" in bad.stderr

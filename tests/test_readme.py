"""The README is kept true: its shape (a user's guide of at most 250 lines), every `priorlab` command in its code
blocks composes as the CLI would compose it (the command exists, every key and config group is real, a study's
experiment and preset exist), the make targets it names exist, and every repository file or folder it names (in a
link or in backticks) is there. The docs it links to are checked the same way for files."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from priorlab.cli import COMMANDS
from priorlab.overrides import CONFIG_DIR, rewrite_overrides
from priorlab.study.settings import route_study_args
from priorlab.study.spec import chosen_preset, load_experiment

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = [README, ROOT / "docs" / "GUIDE.md", ROOT / "docs" / "FINDINGS.md"]
# Names the README uses for the user's own files and folders (placeholders), never the repository's.
PLACEHOLDERS = {
    "my_images",
    "my-ip2p",
    "my-sd15",
    "in.png",
    "samples",
    "my-pipeline",
    "path/to/mine.yaml",
    "path/to/my_pipeline",
}
# Top-level folders whose paths in the docs name files of the repository (runs/ and data/ are made by commands).
REPO_DIRS = ("results/", "docs/", "experiments/", "configs/", "bench/", "tests/", "src/", "analysis/")


def code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.M | re.S)


def priorlab_lines(text: str) -> list[str]:
    """The `priorlab ...` command lines of the code blocks, comments and continuation lines joined."""
    out = []
    for block in code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line.startswith("priorlab "):
                out.append(re.sub(r"\s+#.*$", "", line))
    return out


def composed(line: str):
    """The line composed as `priorlab` composes it (cli.main), without running it."""
    command, *args = shlex.split(line)[1:]
    assert command in COMMANDS, f"{line}: no command {command}"
    args = rewrite_overrides(command, args)
    if command == "study":
        args = route_study_args(args)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name=command, overrides=args)
        if command == "study":  # every run's settings must be settings of `priorlab train`
            compose(config_name="train", overrides=["stage=finetune", *cfg.overrides])
    return command, cfg


def test_readme_is_a_short_guide():
    lines = README.read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120 and not line.startswith("![")]
    assert not long, f"README.md lines over 120 characters: {long}"
    text = "\n".join(lines)
    assert not re.search(r"\bissue \d+", text), "README.md names a tracker issue, which users cannot see"
    for heading in ("Quick start", "Install", "Concepts", "Commands", "Your own data", "Your own model",
                    "Scaling out", "Weights & Biases", "Licence and citing"):  # fmt: skip
        assert f"## {heading}" in text, heading


def test_quick_start_is_two_make_targets_that_exist():
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1]
    commands = [line.split("#")[0].strip() for line in code_blocks(quick)[0].splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make ([\w-]+)`", text) + ["run", "test"]:
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"Makefile has no target {target}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_priorlab_command_composes(doc):
    lines = priorlab_lines(doc.read_text())
    if doc == README:
        assert len(lines) >= 15, "the README's commands were not found"
    for line in lines:
        if any(p in line.split() or f"={p}" in line for p in ("path/to/mine.yaml",)):
            continue  # the user's own experiment file
        command, cfg = composed(line)
        if command == "study":
            spec = load_experiment(cfg.name)
            preset = chosen_preset(spec, cfg.preset)
            assert preset in spec["presets"], f"{line}: experiment {cfg.name} has no preset {preset}"


def test_a_wrong_command_is_caught():
    """The check above fails on a key or preset that does not exist (so it can fail)."""
    with pytest.raises(Exception):  # noqa: B017 - Hydra's ConfigCompositionException or an AssertionError
        composed("priorlab train stage=base no_such_key=1")
    with pytest.raises(Exception):  # noqa: B017
        composed("priorlab train data=no_such_data")
    _, cfg = composed("priorlab study dropout_vs_prior preset=no_such_preset")
    assert chosen_preset(load_experiment(cfg.name), cfg.preset) not in load_experiment(cfg.name)["presets"]


def named_paths(text: str) -> set[str]:
    """Repository paths named in links and backticks."""
    found = set(re.findall(r"\]\(([^)#\s]+)", text))
    found |= {m for m in re.findall(r"`([^`\s]+)`", text) if m.startswith(REPO_DIRS)}
    found |= {m for m in re.findall(r"`([A-Z][A-Z_]*\.(?:md|cff)|Makefile|LICENSE|pyproject\.toml)`", text)}
    return {p for p in found if not p.startswith(("http", "mailto")) and not any(c in p for c in "<>*{}$")}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_file_the_docs_name_exists(doc):
    missing = []
    for path in named_paths(doc.read_text()):
        if path in PLACEHOLDERS:
            continue
        base = doc.parent if not path.startswith(REPO_DIRS) or doc == README else ROOT
        if not ((base / path).exists() or (ROOT / path).exists()):
            missing.append(path)
    assert not missing, f"{doc.name} names files that do not exist: {sorted(missing)}"

"""The README's "Your own data" walkthrough, run as written on a generated imagefolder (tiny settings appended)."""

import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image

from conftest import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = {"blue": (40, 60, 220), "green": (40, 200, 60), "red": (220, 40, 40)}
# Appended to the README's commands so that the walkthrough runs in about a minute on 2 cores: 8 px, one base,
# two fine-tunes (cond_dropout 0 and 0.2) of 2 steps. Later settings win, as on any Hydra command line.
TINY = {
    "train-evaluator": "data.image_size=8 steps=10".split(),
    "study": "preset=tiny_images data.image_size=8 sweep.data.train_per_class=null sweep.cond_dropout=[0.0,0.2] "
    "sweep.seed=[0] base_seeds=[0] "
    "base_steps=4 finetune_steps=2".split(),
    "report": [],
}


def walkthrough() -> list[list[str]]:
    """The `priorlab ...` commands of the README's code block under "## Your own data"."""
    section = README.read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```\n(.*?)```", section, re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    commands = [shlex.split(line, comments=True) for line in lines if line.startswith("priorlab ")]
    assert [c[1] for c in commands] == ["train-evaluator", "study", "study", "report"], commands
    return commands


def make_imagefolder(root: Path, per_class: int = 12) -> None:
    """Three classes of 8×8 RGB PNGs: noisy images of one colour each."""
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_the_readme_walkthrough_runs_a_study_on_your_own_images(tmp_path):
    make_imagefolder(tmp_path / "my_images")
    outputs = []
    for command in walkthrough():
        out = run_cli(*command[1:], *TINY[command[1]], cwd=tmp_path, timeout=300)
        assert out.returncode == 0, f"{shlex.join(command)}\n{out.stderr[-4000:]}"
        outputs.append(out.stdout + out.stderr)
    dry_run, study_output = outputs[1], outputs[2]
    assert re.search(r"data: +hf \(.*source=my_images.*image_size=8", dry_run), dry_run
    assert "fine-tunes: 2 of trainer.max_steps=2: cond_dropout=[0.0, 0.2] × seed=[0]" in dry_run
    assert "fine-tune 2 of 2 done (p=0.2, seed=0)" in study_output
    assert "exists and is not empty" not in study_output  # Lightning's warning of a run folder written early
    study = tmp_path / "runs/my_images/dropout_vs_prior"
    assert (study / "report.md").stat().st_size > 0
    config = yaml.safe_load((study / "finetune/p=0.2/seed=0/config.yaml").read_text())
    assert config["data"]["_target_"] == "priorlab.data.HFDataModule" and config["data"]["source"] == "my_images"
    assert config["trainer"]["max_steps"] == 2
    frame = pd.read_csv(study / "results.csv")
    assert set(frame["run"]) == {"finetune/p=0.0/seed=0", "finetune/p=0.2/seed=0"}
    assert set(frame.loc[frame["metric"] == "num_classes", "value"]) == {float(len(CLASSES))}
    assert {"fd", "accuracy"} <= set(frame["metric"])

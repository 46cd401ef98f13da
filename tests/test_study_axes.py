"""Studies with several bases, base seeds and a data-size axis (when_swap_pays, tiny_images), end to end: a module
of their own, so that the test workers share the study tests out."""

import json

import pandas as pd
import pytest
import yaml

from conftest import run_cli, tiny_study


@pytest.fixture(scope="module")
def swap_study(tmp_path_factory):
    return tiny_study(tmp_path_factory, "when_swap_pays")


def test_when_swap_pays_trains_each_base_once_and_sweeps_every_axis(swap_study):
    _, study = swap_study
    assert sorted(p.parent.name for p in study.glob("base/*/done.json")) == ["narrow", "shifted"]
    hidden = {name: json.loads((study / f"base/{name}/model/config.json").read_text())["hidden"]
              for name in ("narrow", "shifted")}  # fmt: skip
    assert hidden == {"narrow": 16, "shifted": 32}
    assert yaml.safe_load((study / "base/shifted/config.yaml").read_text())["data"]["rotation"] == 0.3927
    run = study / "finetune/base=shifted/max_steps=6/p=0.2/seed=0"
    narrow_ft = study / "finetune/base=narrow/max_steps=3/p=0.0/seed=0/model/config.json"
    assert json.loads(narrow_ft.read_text())["hidden"] == 16  # the width of a base is its fine-tunes' width
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["rotation"] == 0.0 and config["base"].endswith("base/shifted")  # fine-tuned on the target
    frame = pd.read_csv(study / "results.csv")
    assert list(frame.columns) == ["run", "base_name", "max_steps", "cond_dropout", "seed", "step", "prior",
                                   "guidance_scale", "metric", "value"]  # fmt: skip
    assert frame["run"].nunique() == 8 and sorted(frame["max_steps"].unique()) == [3, 6]
    assert set(frame.groupby("run")["step"].max()) == {3, 6}  # the fine-tune length axis sets the steps
    nll = frame[frame["metric"] == "nll"]
    assert set(nll["prior"]) == {"self", "base", "auto", "mix", "exact"}
    assert set(nll["guidance_scale"]) == {1.0, 2.0, 4.0}
    calib = frame[frame["metric"].str.startswith("calib_loss/t=")]  # the ∅ losses, for the sign rule
    assert set(calib["prior"]) == {"self", "base"} and calib.groupby("run").size().min() == 20
    guided = frame[frame["metric"].str.startswith("calib_guided_loss/t=")]  # what auto and mix were fitted on
    assert set(guided["prior"]) == {"self", "base", "auto", "mix"} and set(guided["guidance_scale"]) == {1, 2, 4}
    weights = json.loads((run / "eval/prior_weights_mix_step=6.json").read_text())
    assert weights["objective"] == "guided" and weights["scales"] == [1.0, 2.0, 4.0]
    assert [len(row) for row in weights["base_weight"]] == [10] * 3 and sum(weights["losses"]["count"]) == 40
    heldout = frame[(frame["run"] == str(run.relative_to(study))) & (frame["metric"] == "loss/all")]
    assert set(heldout["prior"]) == {"self", "base", "auto", "mix"}  # fitted weights scored on the other split
    report = (study / "report.md").read_text()
    assert "| seeds per condition | 1 (fewest) | ≥ 1 | pass |" in report  # the preset turns its thresholds off
    assert "## When does the swap pay? The sign rule" in report and "- all scales: the sign rule held at" in report
    assert "**prior=auto** over 16 cells:" in report and "**prior=mix** over 16 cells:" in report
    assert "| base_name | max_steps | cond_dropout | guidance_scale | seeds | better fixed |" in report
    assert "one seed" in report  # one seed per cell: no interval, and the report says so
    assert "| base_name | max_steps | cond_dropout |" in report
    for name in ("f_swap_vs_loss_ratio.png", "g_log_ratio_per_bucket.png"):
        assert (study / "figures" / name).stat().st_size > 1000 and f"figures/{name}" in report


def test_when_swap_pays_again_trains_nothing(swap_study):
    """Run again, a finished study of two bases skips every run: no model file is written again, the results
    are the same (the toy2d study's own check of this, one base, was folded in here)."""
    root, study = swap_study
    before = {p: p.stat().st_mtime_ns for p in study.glob("**/model/diffusion_pytorch_model.safetensors")}
    results = (study / "results.csv").read_text()
    out = run_cli("study", "when_swap_pays", "preset=tiny", cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("is finished") == 2 + 8
    assert "[study when_swap_pays] 8 of 8 fine-tunes done already" in out.stdout and " done (p=" not in out.stdout
    assert {p: p.stat().st_mtime_ns for p in before} == before and len(before) == 2 + 8
    assert (study / "results.csv").read_text() == results


def test_images_with_base_seeds_and_a_data_size_axis(tmp_path):
    """tiny_images: two bases (seeds 0 and 1), fine-tune seed s from base seed s mod 2, fine-tunes on 5 digits per
    class or all of them; the data-size axis becomes a results column and the report's conditions. Run with
    jobs=2: the two bases at once, then the four fine-tunes two at a time, each logging to logs/."""
    out = run_cli("study", "dropout_vs_prior", "preset=tiny_images", "jobs=2", cwd=tmp_path, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    study = tmp_path / "runs/dropout_vs_prior"
    assert (study / "base/seed=0/done.json").exists() and (study / "base/seed=1/done.json").exists()
    for seed in (0, 1):
        meta = json.loads((study / f"finetune/train_per_class=5/p=0.2/seed={seed}/model/priorlab.json").read_text())
        assert meta["base"]["path"] == str(study / f"base/seed={seed}/model")
    frame = pd.read_csv(study / "results.csv")
    assert list(frame.columns[:3]) == ["run", "train_per_class", "cond_dropout"]
    assert set(frame["train_per_class"].astype(str)) == {"5", "all"} and frame["run"].nunique() == 4
    assert {"accuracy", "fd_se", "diff_fd_se", "diff_accuracy_se", "num_classes"} <= set(frame["metric"])
    assert "[study dropout_vs_prior] 2 base(s), 2 at a time" in out.stdout
    assert "[study dropout_vs_prior] 4 fine-tunes, 2 at a time" in out.stdout
    assert out.stdout.count("finished in") == 6 and "(6 of" not in out.stdout and "(4 of 4)" in out.stdout
    logs = sorted(p.name for p in (study / "logs").iterdir())
    assert len(logs) == 6 and "base_seed=0.log" in logs
    assert "finetune_base_seed=1_train_per_class=all_p=0.2_seed=1.log" in logs
    assert len(list((tmp_path / "runs/evaluators").iterdir())) == 1  # trained once, before the fine-tunes
    report = (study / "report.md").read_text()
    assert "base seeds [0, 1], dealt out in turn" in report and "| base converged (base/seed=1) |" in report
    assert "train_per_class=5, p=0.2" in report
    assert (study / "figures/e_sample_grids.png").exists() and (study / "figures/h_benefit_per_scale.png").exists()
    again = run_cli("study", "dropout_vs_prior", "preset=tiny_images", "jobs=2", cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stderr[-4000:]
    # a resumed study skips its finished runs without starting a process for each (checked as `train` would)
    assert again.stdout.count("is finished; skipping") == 6 and "started" not in again.stdout

"""The study pipeline end to end at minimal settings: results, report, figures, skip, kill and resume."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import run_cli
from priorlab.analysis.results import parse_key
from priorlab.analysis.stats import mean_ci
from priorlab.errors import UserError
from priorlab.studies import claim_study_dir, load_experiment, preset_overrides

FIGURES = ["a_fd_vs_scale.png", "b_best_fd_vs_dropout.png", "c_drift.png", "d_loss_per_timestep.png",
           "e_sample_grids.png"]  # fmt: skip


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = run_cli("study", "toy2d", "preset=tiny", cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return root, root / "runs/toy2d"


def test_toy2d_study_writes_results_report_and_every_figure(toy_study):
    _, study = toy_study
    frame = pd.read_csv(study / "results.csv")
    assert list(frame.columns) == ["run", "cond_dropout", "seed", "step", "prior", "guidance_scale", "metric", "value"]
    assert sorted(frame["cond_dropout"].unique()) == [0.0, 0.2] and sorted(frame["seed"].unique()) == [0, 1]
    assert frame["run"].nunique() == 4 and sorted(frame["step"].unique()) == [3, 6]
    nll = frame[(frame["metric"] == "nll") & (frame["step"] == 6)]
    assert set(nll["prior"]) == {"self", "base"} and set(nll["guidance_scale"]) == {1.0, 3.0}
    assert len(nll) == 4 * 2 * 2
    assert {"disagreement/all", "score_error/all", "uncond_fd", "fd", "kid", "precision", "recall"} <= set(
        frame["metric"]
    )
    for name in FIGURES:
        assert (study / "figures" / name).stat().st_size > 1000, name
    report = (study / "report.md").read_text()
    assert "## Headline: best FD" in report and "exact NLL" in report and "cond_dropout=0.2" in report
    assert all(f"figures/{name}" in report for name in FIGURES)
    assert (study / "wandb_sweep.yaml").exists()


def test_running_the_study_again_trains_nothing(toy_study):
    root, study = toy_study
    before = {p: p.stat().st_mtime_ns for p in study.glob("**/model/diffusion_pytorch_model.safetensors")}
    results = (study / "results.csv").read_text()
    out = run_cli("study", "toy2d", "preset=tiny", cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("is finished") == 5
    assert {p: p.stat().st_mtime_ns for p in before} == before and len(before) == 5
    assert (study / "results.csv").read_text() == results


def test_report_rebuilds_from_results_alone(toy_study):
    root, study = toy_study
    for name in FIGURES[:4]:
        (study / "figures" / name).unlink()
    (study / "report.md").unlink()
    out = run_cli("report", "runs/toy2d", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all((study / "figures" / n).exists() for n in FIGURES) and (study / "report.md").exists()


def test_dashboard_offline_says_what_to_run(tmp_path):
    study = tmp_path / "runs/s/finetune/p=0/seed=0/wandb/offline-run-1"
    study.mkdir(parents=True)
    out = run_cli("dashboard", "s", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert out.returncode == 0 and "wandb sync" in out.stdout and "offline-run-1" in out.stdout


def test_killed_study_resumes_to_the_same_results(toy_study, tmp_path):
    _, unbroken = toy_study
    exe = str(Path(sys.executable).parent / "priorlab")
    env = {**os.environ, "WANDB_MODE": "offline"}
    proc = subprocess.Popen([exe, "study", "toy2d", "preset=tiny"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 300
    while not list(tmp_path.glob("runs/toy2d/finetune/*/*/done.json")) and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(list(tmp_path.glob("runs/toy2d/finetune/*/*/done.json"))) < 4
    out = run_cli("study", "toy2d", "preset=tiny", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "runs/toy2d/results.csv").read_text() == (unbroken / "results.csv").read_text()


def test_dropout_vs_prior_tiny_runs(tmp_path):
    out = run_cli("study", "dropout_vs_prior", "preset=tiny", cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    frame = pd.read_csv(tmp_path / "runs/dropout_vs_prior/results.csv")
    assert frame["run"].nunique() == 4 and (frame["metric"] == "accuracy").any()
    assert (tmp_path / "runs/dropout_vs_prior/figures/e_sample_grids.png").exists()


def test_a_folder_of_another_study_is_refused(tmp_path):
    claim_study_dir(tmp_path / "s", "toy2d", "quick")
    claim_study_dir(tmp_path / "s", "toy2d", "quick")  # the same study may continue
    with pytest.raises(UserError, match="holds the runs of study toy2d preset quick"):
        claim_study_dir(tmp_path / "s", "toy2d", "tiny")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(UserError, match="not a priorlab study"):
        claim_study_dir(tmp_path / "other", "toy2d", "quick")


def test_experiment_errors_name_what_exists():
    with pytest.raises(UserError, match="known: dropout_vs_prior, toy2d"):
        load_experiment("nope")
    with pytest.raises(UserError, match="presets: quick, full"):
        preset_overrides(load_experiment("toy2d"), "huge")


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("eval/cond/fd/prior=base/w=2.0", ("fd", "base", 2.0)),
        ("eval/cond/fd_class=3/prior=self/w=1.5", ("fd_class=3", "self", 1.5)),
        ("eval/prior/loss/model=self/t=0-99", ("loss/t=0-99", "self", float("nan"))),
        ("eval/prior/disagreement/all", ("disagreement/all", "", float("nan"))),
        ("eval/uncond/kid/model=base", ("uncond_kid", "base", float("nan"))),
    ],
)
def test_parse_key(key, parsed):
    metric, prior, w = parse_key(key)
    assert (metric, prior) == parsed[:2] and (w == parsed[2] or (w != w and parsed[2] != parsed[2]))


def test_mean_ci_matches_the_t_interval():
    est = mean_ci([1.0, 2.0, 3.0])
    # mean 2, sd 1, t(0.975, 2) = 4.3027: half-width 4.3027 / sqrt(3) = 2.4841
    assert est.mean == pytest.approx(2.0) and est.hi - est.mean == pytest.approx(2.4841, rel=1e-4)
    assert mean_ci([5.0]).n == 1 and str(mean_ci([5.0])) == "5 (n=1)"
    assert mean_ci([1.0, 1.1]).excludes_zero and not mean_ci([-1.0, 1.0]).excludes_zero


def test_analysis_scripts_run_on_a_study(toy_study):
    root, study = toy_study
    for script in sorted((Path(__file__).parents[1] / "analysis").glob("*.py")):
        out = subprocess.run([sys.executable, str(script), str(study)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (script.name, out.stderr[-2000:])
        assert out.stdout.strip(), script.name

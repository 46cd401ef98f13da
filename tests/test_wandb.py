"""W&B on by default: offline without an API key, one group per study, each run tagged with its condition, the
workspace's panels the keys the runs log and the HTML dashboard charts; read back from the offline runs' files."""

from __future__ import annotations

import json
import math
import os

import pandas as pd
import pytest

from conftest import run_cli
from priorlab.analysis.wandb_runs import offline_runs
from priorlab.keys import row_parts
from priorlab.loggers import condition_tags, wandb_logged_in

STUDY = "dropout_vs_prior"


def test_condition_tags_name_every_axis_of_the_run_as_results_csv_does():
    tags = condition_tags("finetune", "finetune/base=broad/train_per_class=5/p=0.1/seed=2", 2, 0.1, 5)
    assert tags == ["stage=finetune", "base_name=broad", "train_per_class=5", "cond_dropout=0.1", "seed=2"]
    assert condition_tags("base", "base/broad/seed=1", 1, 0.1, "all") == [
        "stage=base", "base_name=broad", "seed=1", "train_per_class=all"]  # fmt: skip
    assert condition_tags("finetune", "finetune/p=0.0/seed=0", 0, 0.0, "all") == [
        "stage=finetune", "cond_dropout=0.0", "seed=0", "train_per_class=all"]  # fmt: skip


def test_logged_in_reads_the_api_key_where_wandb_does(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("NETRC", raising=False)
    assert not wandb_logged_in()
    (tmp_path / "_netrc").write_text("machine api.wandb.ai login user password k" + "0" * 39 + "\n")
    assert wandb_logged_in()  # wandb's second choice
    monkeypatch.setenv("NETRC", str(tmp_path / "elsewhere"))  # $NETRC first: a missing file means no key
    assert not wandb_logged_in()
    monkeypatch.setenv("WANDB_API_KEY", "k")
    assert wandb_logged_in()


@pytest.fixture(scope="module")
def wandb_study(tmp_path_factory):
    """The tiny study with W&B on (the tiny preset logs to CSV only, for the speed of the other tests), one seed: a
    base and two fine-tunes."""
    root = tmp_path_factory.mktemp("wandb")
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(root / "wandb_dir")}
    out = run_cli("study", STUDY, "preset=tiny", "logger=default", "sweep.seed=[1]", cwd=root, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    return root, root / "runs" / STUDY, out


def test_a_study_is_one_w_and_b_group_of_runs_tagged_with_their_condition(wandb_study):
    root, study, out = wandb_study
    runs = {run.name: run for run in offline_runs(study)}
    assert len(list((study / "wandb").glob("offline-run-*/run-*.wandb"))) == 3  # in the study's one W&B folder
    finetunes = [f"{STUDY}/finetune/p={p}/seed={s}" for p in (0.0, 0.2) for s in (1,)]
    assert sorted(runs) == sorted([f"{STUDY}/base", *finetunes])
    assert {run.group for run in runs.values()} == {STUDY}
    assert runs[f"{STUDY}/base"].tags == ["stage=base", "seed=0", "train_per_class=all"]
    run = runs[f"{STUDY}/finetune/p=0.2/seed=1"]
    assert run.job_type == "finetune"
    assert run.tags == ["stage=finetune", "cond_dropout=0.2", "seed=1", "train_per_class=all"]
    assert run.config["cond_dropout"] == 0.2 and run.config["seed"] == 1 and run.config["data"]["num_samples"] == 512
    assert runs[f"{STUDY}/base"].config["cond_dropout"] == 1.0  # what the base trained with
    assert not any(line.startswith("wandb:") for line in out.stdout.splitlines())  # the runs' banners silenced
    last = out.stdout.strip().splitlines()[-1]
    assert last == ("W&B ran offline (no API key): to upload its 3 W&B runs (group dropout_vs_prior), run  "
                    f"wandb login && wandb sync runs/{STUDY}/wandb")  # fmt: skip
    assert (study / "finetune/p=0.2/seed=1/metrics.csv").exists() and (study / "results.csv").exists()


def test_w_and_b_holds_the_metrics_results_csv_and_both_dashboards_read(wandb_study):
    """Every panel of the workspace has data in the runs; its values are the evaluation's (results.csv's); every
    chart of the HTML dashboard is a panel."""
    from omegaconf import OmegaConf

    from priorlab.analysis.html import chart_data
    from priorlab.analysis.results import load_results
    from priorlab.commands.dashboard import study_panels

    root, study, _ = wandb_study
    runs = {run.name: run for run in offline_runs(study)}
    cfg = OmegaConf.create({"name": STUDY, "guidance_scales": None})
    panels = study_panels(cfg, study)
    keys = [k for section in panels.values() for k in section]
    logged = set().union(*(run.summary for run in runs.values()))
    assert not [k for k in keys if k not in logged]
    assert "eval/cond/nll/prior=exact/w=3.0" in keys and "train/loss" in keys  # toy2d's metric, its exact prior
    frame = load_results(study)
    run = runs[f"{STUDY}/finetune/p=0.2/seed=1"]
    row = next(r for r in run.history if r.get("trainer/global_step") == 6 and "eval/cond/fd/prior=base/w=3.0" in r)
    for k in ("eval/cond/fd/prior=base/w=3.0", "eval/cond/nll/prior=self/w=1.0"):
        metric, prior, scale = row_parts(k)
        csv = frame[(frame["run"] == "finetune/p=0.2/seed=1") & (frame["step"] == 6) & (frame["metric"] == metric)
                    & (frame["prior"] == prior) & (frame["guidance_scale"] == scale)]  # fmt: skip
        assert math.isclose(csv["value"].item(), row[k], rel_tol=1e-12)
    charts = chart_data(frame)
    for metric, per_condition in charts["scales"].items():
        for prior, points in next(iter(per_condition.values())).items():
            assert all(f"eval/cond/{metric}/prior={prior}/w={w:.1f}" in keys for w, *_ in points)
    assert set(charts["drift"]) == {row_parts(k)[0] for k in panels["Drift of the unconditional branch"][:2]}
    out = run_cli("dashboard", STUDY, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"  wandb sync runs/{STUDY}/wandb\n" in out.stdout
    assert f"the workspace's {len(keys)} panels: {len(keys)} have data in these runs" in out.stdout


def test_train_alone_says_how_to_sync_in_one_line(tmp_path):
    args = ["data=toy2d", "model=mlp", "model.hidden=8", "data.num_samples=200", "trainer.max_steps=2",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1"]  # fmt: skip
    out = run_cli("train", "study=w", *args, cwd=tmp_path, env={"WANDB_SILENT": "false"})
    assert out.returncode == 0, out.stderr[-3000:]
    hint = [line for line in out.stdout.splitlines() if line.startswith("W&B ran offline")]
    assert hint == ["W&B ran offline (no API key): to upload the runs of study w, run  wandb login && wandb sync "
                    "runs/w/wandb"]  # fmt: skip
    (run,) = offline_runs(tmp_path / "runs/w")
    assert run.group == "w" and run.tags == ["stage=base", "seed=0", "train_per_class=all"]
    steps = [r["trainer/global_step"] for r in run.history if "train/loss" in r]
    metrics = pd.read_csv(tmp_path / "runs/w/base/metrics.csv")
    assert steps == metrics.dropna(subset=["train/loss"])["step"].tolist() == [0, 1]
    assert json.loads((tmp_path / "runs/w/base/done.json").read_text())["step"] == 2


def test_a_study_starts_one_w_and_b_service_for_its_runs(monkeypatch):
    """shared_wandb_service puts the service's address in os.environ, which the study's runs inherit, and takes it
    away at the end; nothing where the runs log to CSV only or W&B is disabled."""
    import wandb

    from priorlab.loggers import shared_wandb_service

    wandb.teardown()  # as in a study's own process, where no W&B service runs yet (a test before may have one)
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with shared_wandb_service(False):
        assert "WANDB_SERVICE" not in os.environ
    with shared_wandb_service(True):
        address = os.environ["WANDB_SERVICE"]  # e.g. 3-<pid>-unix-<socket>: a service this process started
        assert address.split("-")[1] == str(os.getpid())
    assert "WANDB_SERVICE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with shared_wandb_service(True):
        assert "WANDB_SERVICE" not in os.environ

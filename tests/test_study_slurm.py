"""launcher=slurm against a stand-in for submitit (`FakeSubmitit`, which records each submission and, when asked,
runs its job here): which runs become jobs, their dependencies, and the command line's settings on each."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_cli
from priorlab.errors import UserError
from priorlab.study.settings import route_study_args

PRESET = {
    "common": ["data=toy2d", "model=mlp", "model.hidden=16", "model.depth=1", "data.num_samples=256",
               "data.batch_size=32", "trainer=cpu", "logger=csv", "eval=tiny", "eval.guidance_scales=[1.0,2.0]"],
    "base": ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"],
    "finetune": ["callbacks=eval", "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                 "callbacks.prior_quality.every_n_steps=2", "callbacks.conditional_quality.every_n_steps=2"],
    "sweep": {"cond_dropout": [0.2], "seed": [0]},
}  # fmt: skip


class FakeJob:
    """A submitted job: done at once; with `run`, it ran its function when submitted (failed if that raised)."""

    def __init__(self, job_id: str, folder: Path, fn, args: tuple, run):
        self.job_id, self.cancelled, self.error = job_id, False, None
        self.paths = types.SimpleNamespace(stderr=folder / f"{job_id}_0_log.err")
        if run:
            try:
                run(fn, *args)
            except Exception as err:  # noqa: BLE001 - as submitit keeps a job's error
                self.error = err
        self.state = "FAILED" if self.error else "COMPLETED"

    def done(self) -> bool:
        return True

    def exception(self):
        return self.error

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


def fake_submitit(run=None) -> types.ModuleType:
    """A module standing in for submitit: `AutoExecutor` as the study uses it; `.submitted` lists each submission
    (its job ids, the executor's parameters, the function and its arguments). `run(fn, *args)` runs each job as it
    is submitted (the study submits a run's job after those of the runs it needs)."""
    module = types.ModuleType("submitit")
    module.submitted = []

    class AutoExecutor:
        def __init__(self, folder, cluster=None, **init):
            assert cluster == "slurm"
            self.folder, self.init, self.params = Path(str(folder).replace("%j", "")), init, {}

        def update_parameters(self, **params):
            self.params.update(params)

        def _record(self, fn, calls: list[tuple]) -> list[FakeJob]:
            first = 100 + len(module.submitted)
            ids = [str(first)] if len(calls) == 1 else [f"{first}_{i}" for i in range(len(calls))]
            jobs = [FakeJob(i, self.folder, fn, args, run) for i, args in zip(ids, calls, strict=True)]
            module.submitted.append({"ids": ids, "params": dict(self.params), "init": self.init, "fn": fn,
                                     "args": [args[0] for args in calls]})  # fmt: skip
            return jobs

        def submit(self, fn, *args):
            return self._record(fn, [args])[0]

        def map_array(self, fn, *iterables):
            return self._record(fn, list(zip(*iterables, strict=True)))

    module.AutoExecutor = AutoExecutor
    return module


def study_cfg(compose_tmp, tmp_path: Path, preset: dict, *args: str):
    """The study config of `priorlab study <spec> ARGS`, routed as the command line is (`route_study_args`)."""
    path = tmp_path / "slurmy.yaml"
    path.write_text(yaml.safe_dump({"name": "slurmy", "presets": {"tiny": preset}}))
    return compose_tmp(route_study_args([f"name={path}", "preset=tiny", *args]), config_name="study")


def test_bases_and_priors_are_jobs_and_fine_tunes_wait_for_them_with_the_command_lines_partition(
    compose_tmp, tmp_path, monkeypatch
):
    from priorlab.study.run import make_plan
    from priorlab.study.slurm import PriorlabJob, submit_study

    fake = fake_submitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    preset = {**PRESET, "priors": {"small": ["model.hidden=8"]}, "sweep": {"cond_dropout": [0.0, 0.2], "seed": [0]}}
    cfg = study_cfg(compose_tmp, tmp_path, preset, "launcher=slurm", "hydra.launcher.partition=gpu",
                    "hydra.launcher.timeout_min=30", "hydra.launcher.additional_parameters.mail-type=END")  # fmt: skip
    jobs: dict = {}
    submit_study(make_plan(cfg), jobs)

    prior, base, evaluator, finetunes = fake.submitted
    assert isinstance(base["fn"], PriorlabJob) and base["args"][0][:2] == ["train", "stage=base"]
    assert any(a.startswith("stage.run_subdir=prior/small") for a in prior["args"][0])
    assert evaluator["fn"].__name__ == "prepare_evaluator"
    assert [a[:2] for a in finetunes["args"]] == [["train", "stage=finetune"]] * 2 and len(finetunes["ids"]) == 2
    extra = finetunes["params"]["slurm_additional_parameters"]
    assert extra["dependency"] == f"afterok:{base['ids'][0]}:{prior['ids'][0]}:{evaluator['ids'][0]}"
    assert extra["kill-on-invalid-dep"] == "yes" and extra["mail-type"] == "END"
    for job in (prior, base, evaluator):  # started at once: nothing to wait for
        assert "dependency" not in job["params"]["slurm_additional_parameters"]
    for job in fake.submitted:  # the command line's settings reach every job, the config file's fill the rest
        assert job["params"]["slurm_partition"] == "gpu" and job["params"]["timeout_min"] == 30
        assert job["params"]["gpus_per_node"] == 1 and job["params"]["slurm_array_parallelism"] == 16
    assert list(jobs) == ["prior_small", "base", "evaluator", *(f"finetune_p={p}_seed=0" for p in ("0.0", "0.2"))]


def test_an_interrupted_study_cancels_its_jobs_and_a_rerun_waits_for_those_still_queued(
    compose_tmp, tmp_path, monkeypatch
):
    from priorlab.study import slurm
    from priorlab.study.progress import StudyProgress
    from priorlab.study.run import make_plan

    fake = fake_submitit()
    monkeypatch.setitem(sys.modules, "submitit", fake)
    monkeypatch.setattr(FakeJob, "done", lambda self: self.cancelled)  # queued until cancelled

    def interrupt(seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(slurm, "pause", interrupt)  # not time.sleep: every thread of the process would raise
    plan = make_plan(study_cfg(compose_tmp, tmp_path, PRESET, "launcher=slurm"))
    plan.study_dir.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        slurm.run_on_slurm(plan, StudyProgress("slurmy", plan.study_dir / "finetune", 1, 0.0))
    recorded = json.loads((plan.study_dir / slurm.RECORD).read_text())
    assert recorded == {"base": "100", "evaluator": "101", "finetune_p=0.2_seed=0": "102"}

    bin_dir = tmp_path / "bin"  # squeue still lists the base (the cancel not yet done)
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text("#!/bin/sh\necho 99\necho 100\n")
    (bin_dir / "squeue").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin")
    with pytest.raises(UserError, match=r"still queued or running \(base \(100\)\).*`scancel 100`"):
        slurm.run_on_slurm(plan, StudyProgress("slurmy", plan.study_dir / "finetune", 1, 0.0))


def test_a_failed_job_stops_the_study_in_one_line_naming_it_and_its_log(tmp_path):
    from priorlab.study.slurm import wait_for

    good = FakeJob("7", tmp_path, lambda: None, (), run=lambda fn: fn())
    bad = FakeJob("8", tmp_path, lambda: 1 / 0, (), run=lambda fn: fn())
    with pytest.raises(UserError) as err:
        wait_for({"base": good, "finetune_p=0.2_seed=0": bad}, "slurmy", poll_s=0)
    assert "\n" not in str(err.value) and "finetune_p=0.2_seed=0 (job 8, FAILED)" in str(err.value)
    assert str(tmp_path / "8_0_log.err") in str(err.value) and "base" not in str(err.value).split(":")[0]


def test_slurm_settings_mistakes_end_in_one_line(compose_tmp, tmp_path, monkeypatch):
    from priorlab.study.run import make_plan

    with pytest.raises(UserError, match=r"hydra.launcher.partitio is not a SLURM setting; did you mean .*partition\?"):
        make_plan(study_cfg(compose_tmp, tmp_path, PRESET, "launcher=slurm", "hydra.launcher.partitio=gpu"))
    with pytest.raises(UserError, match=r"is a SLURM setting; add launcher=slurm"):
        make_plan(study_cfg(compose_tmp, tmp_path, PRESET, "hydra.launcher.partition=gpu"))
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(UserError, match=r"needs submitit, which is not installed; install it with pip install"):
        make_plan(study_cfg(compose_tmp, tmp_path, PRESET, "launcher=slurm"))
    preset = {**PRESET, "jobs": 6}  # a preset's jobs is the basic launcher's: kept out of SLURM's way
    monkeypatch.setitem(sys.modules, "submitit", fake_submitit())
    assert make_plan(study_cfg(compose_tmp, tmp_path, preset, "launcher=slurm")).jobs == 1


def test_a_job_runs_priorlab_in_the_study_folder_and_fails_with_its_exit_status(tmp_path, monkeypatch):
    from priorlab.study import slurm

    script = "import os, sys; open('ran', 'w').write(' '.join(sys.argv[1:])); sys.exit(int(sys.argv[-1]))"
    monkeypatch.setattr(slurm, "_priorlab_command", lambda: [sys.executable, "-c", script])
    slurm.PriorlabJob(str(tmp_path))(["train", "stage=base", "0"])
    assert (tmp_path / "ran").read_text() == "train stage=base 0"
    with pytest.raises(RuntimeError, match=r"`priorlab train stage=base 3 ...` failed \(exit 3\)"):
        slurm.PriorlabJob(str(tmp_path))(["train", "stage=base", "3"])


def run_here(fn, *args) -> None:
    """A job of the stand-in: `priorlab ARGS` in a fork of the tests' CLI server (a fresh interpreter per job would
    spend most of the test importing), any other function as it is."""
    from priorlab.study.slurm import PriorlabJob

    if not isinstance(fn, PriorlabJob):
        return fn(*args)
    out = run_cli(*args[0], cwd=Path(fn.cwd))
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_study_on_slurm_runs_every_job_and_writes_its_results(compose_tmp, tmp_path, monkeypatch):
    """The whole study, its jobs run (here, in turn) by the stand-in: results.csv from the fine-tune's evaluation."""
    from priorlab.study.run import run_study

    fake = fake_submitit(run=run_here)
    monkeypatch.setitem(sys.modules, "submitit", fake)
    monkeypatch.chdir(tmp_path)
    study_dir = run_study(study_cfg(compose_tmp, tmp_path, PRESET, "launcher=slurm"))
    assert [len(s["ids"]) for s in fake.submitted] == [1, 1, 1]  # base, evaluator, the one fine-tune
    assert (study_dir / "base" / "done.json").exists() and (study_dir / "report.md").exists()
    results = pd.read_csv(study_dir / "results.csv")
    assert set(results["prior"].dropna()) >= {"self", "base"}

"""The study pipeline end to end at minimal settings: results, report, figures, skip, kill and resume."""

import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import run_cli, tiny_study
from priorlab.analysis.results import parse_key, run_axes
from priorlab.analysis.sign_rule import Proportion, fitted_vs_fixed, sign_rule, swap_points
from priorlab.analysis.stats import mean_ci
from priorlab.errors import UserError
from priorlab.models.io import content_hash
from priorlab.study.layout import claim_study_dir, finetune_subdir
from priorlab.study.spec import check_bases, load_experiment, preset_overrides

FIGURES = ["a_fd_vs_scale.png", "b_best_fd_vs_dropout.png", "c_drift.png", "d_loss_per_timestep.png",
           "e_sample_grids.png", "h_benefit_per_scale.png", "v_base_loss.png"]  # fmt: skip


@pytest.fixture(scope="module")
def toy_study(tmp_path_factory):
    """dropout_vs_prior on toy2d with fine-tunes of 6 steps: a study built to fail its validity checks."""
    return tiny_study(tmp_path_factory, "dropout_vs_prior")


def test_toy2d_study_writes_results_report_and_every_figure(toy_study):
    root, study = toy_study
    shown = (root / "study_output.txt").read_text()
    first = next(line for line in shown.splitlines() if "fine-tune 1 of 4 done" in line)
    assert first.startswith("[study dropout_vs_prior] fine-tune 1 of 4 done (p=0.0, seed=0) · ") and "left" in first
    assert "fine-tune 4 of 4 done (p=0.2, seed=1) · " in shown and "exists and is not empty" not in shown
    frame = pd.read_csv(study / "results.csv")
    assert list(frame.columns) == ["run", "cond_dropout", "seed", "step", "prior", "guidance_scale", "metric", "value"]
    assert sorted(frame["cond_dropout"].unique()) == [0.0, 0.2] and sorted(frame["seed"].unique()) == [0, 1]
    assert frame["run"].nunique() == 4 and sorted(frame["step"].unique()) == [3, 6]
    nll = frame[(frame["metric"] == "nll") & (frame["step"] == 6)]
    assert set(nll["prior"]) == {"self", "base", "exact"} and set(nll["guidance_scale"]) == {1.0, 3.0}
    assert len(nll) == 4 * 3 * 2  # exact: guidance with the true scores, the reference of each scale
    assert {"ideal_mse", "diff_ideal_mse_se", "diff_nll_se", "entropy"} <= set(frame["metric"])
    assert {"disagreement/all", "score_error/all", "uncond_fd", "fd", "kid", "precision", "recall"} <= set(
        frame["metric"]
    )
    for name in FIGURES:
        assert (study / "figures" / name).stat().st_size > 1000, name
    report = (study / "report.md").read_text()
    assert "## Headline: best FD" in report and "exact NLL" in report and "p=0.2" in report
    assert "with 2 seeds t = 12.7," in report
    assert all(f"figures/{name}" in report for name in FIGURES)
    assert (study / "wandb_sweep.yaml").exists()
    meta = json.loads((study / "study.json").read_text())
    assert meta["validity"]["min_seeds"] == 3 and meta["sessions"][-1]["finished"] and meta["wall_time_s"] > 0


def test_a_study_too_short_to_learn_says_it_cannot_conclude(toy_study):
    """Fine-tunes of 6 steps never learn their classes: the validity section says so before any comparison, the
    findings state nothing, and the sign rule is not tested."""
    _, study = toy_study
    report = (study / "report.md").read_text()
    validity, findings = report.index("## Validity"), report.index("## Findings")
    assert validity < findings < report.index("## Headline")
    section = report[validity:findings]
    assert "| fine-tunes learned their conditions |" in section and "**FAIL**" in section
    assert "**fine-tunes learned their conditions failed**" in section
    assert "| seeds per condition | 2 (fewest) | ≥ 3 | **FAIL** |" in section
    assert "No conclusion about priors can be drawn from this study" in section
    # a base of 10 steps with the default EMA decay: its average is still the initial weights
    assert "| base converged (base) |" in section and "the EMA still holds 99% of the initial weights" in section
    body = report[findings : report.index("## Headline")]
    assert ("- **p=0**: no conclusion (the base did not converge; the fine-tunes did not learn their conditions: "
            "accuracy") in body  # fmt: skip
    assert "helps (" not in body and "hurts (" not in body


def test_a_study_whose_base_changed_refuses_its_finished_fine_tunes(toy_study, tmp_path):
    """The study run again after its base's weights were overwritten: the first fine-tune names both hashes."""
    from safetensors.torch import load_file, save_file

    root, study = toy_study
    shutil.copytree(study, tmp_path / "runs" / study.name)
    weights = tmp_path / "runs" / study.name / "base/model/diffusion_pytorch_model.safetensors"
    recorded = content_hash(weights.parent)
    save_file({k: v + 0.5 for k, v in load_file(weights).items()}, weights)
    out = run_cli("study", "dropout_vs_prior", "preset=tiny", cwd=tmp_path, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    refused = [line for line in out.stderr.splitlines() if "is finished and was trained with other settings" in line]
    assert len(refused) == 1 and "finetune/p=0.0/seed=0" in refused[0], out.stderr[-3000:]
    given = content_hash(weights.parent)
    assert f"base weights (sha256): {recorded[:12]} (recorded) vs {given[:12]} (given, {weights.parent})" in refused[0]
    assert (tmp_path / "runs" / study.name / "results.csv").read_text() == (study / "results.csv").read_text()


def test_commands_of_a_study_in_a_folder_with_a_space_and_a_non_ascii_letter(tmp_path):
    """The children's overrides carry the study's absolute paths intact (Hydra needs them quoted)."""
    import shlex

    from hydra.core.override_parser.overrides_parser import OverridesParser

    root = tmp_path / "wü dir with space"
    root.mkdir()
    out = run_cli("study", "dropout_vs_prior", "preset=tiny", "dry_run=true", cwd=root, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    lines = [line.split(":", 1)[1] for line in out.stdout.splitlines() if line.startswith(("base:", "finetunes:"))]
    assert len(lines) == 2
    for line in lines:
        args = shlex.split(line)[2:]  # the arguments a shell passes on to `priorlab train`
        values = {o.key_or_group: o.value() for o in OverridesParser.create().parse_overrides(args[args[0] == "-m" :])}
        assert values["paths.runs"] == str(root / "runs")
    assert values["base"] == str(root / "runs/dropout_vs_prior/base")
    assert not (root / "runs").exists()


def test_report_rebuilds_from_results_alone(toy_study):
    root, study = toy_study
    for name in FIGURES[:4]:
        (study / "figures" / name).unlink()
    (study / "report.md").unlink()
    out = run_cli("report", "runs/dropout_vs_prior", cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    assert all((study / "figures" / n).exists() for n in FIGURES) and (study / "report.md").exists()


def test_dashboard_offline_says_what_to_run(tmp_path):
    study = tmp_path / "runs/s/finetune/p=0/seed=0/wandb/offline-run-1"
    study.mkdir(parents=True)
    out = run_cli("dashboard", "s", cwd=tmp_path, env={"WANDB_MODE": "offline"})
    assert out.returncode == 0 and "1 offline run(s) of s" in out.stdout
    assert "  wandb sync runs/s/finetune/p=0/seed=0/wandb\n" in out.stdout  # the folder of runs
    assert "no HTML dashboard" in out.stdout  # no results.csv yet


def _stop_midway(proc: subprocess.Popen, finetunes: Path, timeout: float = 300) -> Path:
    """Stop the study `proc` (its process group) while a fine-tune is midway: it wrote a checkpoint, not yet its
    done.json. The group is frozen (SIGSTOP) before the folder is looked at, so that what was seen still holds when
    it is killed (SIGKILL); it runs on (SIGCONT) where the fine-tune finished in between. Returns that fine-tune."""

    def midway() -> list[Path]:
        ckpts = finetunes.glob("*/*/checkpoints/last.ckpt")
        return [c.parents[1] for c in ckpts if not (c.parents[1] / "done.json").exists()]

    deadline = time.monotonic() + timeout
    while proc.poll() is None and time.monotonic() < deadline:
        if midway():
            os.killpg(proc.pid, signal.SIGSTOP)
            found = midway()
            if found:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                return found[0]
            os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.01)  # polling the folder; no timing is asserted
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise AssertionError(f"no fine-tune was seen between its first checkpoint and its end (exit {proc.returncode})")


def test_killed_study_resumes_to_the_same_results(toy_study, tmp_path):
    """Killed midway through a fine-tune, the study started again resumes that fine-tune from its checkpoint and
    ends with the unbroken study's results, bit for bit. Every process compared runs one thread: the unbroken
    study's runs fork from the CLI server (OMP_NUM_THREADS=1), and so do the resumed study's; the killed one is
    given the same."""
    import torch

    _, unbroken = toy_study
    exe = str(Path(sys.executable).parent / "priorlab")
    env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([exe, "study", "dropout_vs_prior", "preset=tiny"], cwd=tmp_path, env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    run = _stop_midway(proc, tmp_path / "runs/dropout_vs_prior/finetune")
    ckpt = run / "checkpoints/last.ckpt"
    step = torch.load(ckpt, weights_only=False, map_location="cpu")["global_step"]
    assert 0 < step < 6 and not (run / "done.json").exists()  # 6 steps a fine-tune: killed between checkpoints
    assert len(list(tmp_path.glob("runs/dropout_vs_prior/finetune/*/*/done.json"))) < 4
    out = run_cli("study", "dropout_vs_prior", "preset=tiny", cwd=tmp_path, timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    # Lightning names the checkpoint that a fit restores: the fine-tune went on from its step, not from 0
    assert f"Restoring states from the checkpoint path at {ckpt}" in out.stdout + out.stderr
    assert (run / "done.json").exists()
    resumed, whole = pd.read_csv(tmp_path / "runs/dropout_vs_prior/results.csv"), pd.read_csv(unbroken / "results.csv")
    timing = resumed["metric"] == "sample_seconds"  # wall times: the only values that differ from run to run
    assert timing.sum() == (whole["metric"] == "sample_seconds").sum() > 0
    pd.testing.assert_frame_equal(resumed[~timing].reset_index(drop=True),
                                  whole[whole["metric"] != "sample_seconds"].reset_index(drop=True),
                                  check_exact=True)  # fmt: skip


def test_jobs_at_once_stop_at_a_failure_and_name_its_log(tmp_path):
    """A failed run stops new ones from starting; the error names the failed run's log."""
    from priorlab.study.schedule import run_parallel

    jobs = [("bad", ["train", "data=no_such_data"]), ("never", ["train", "data=no_such_data_either"])]
    with pytest.raises(UserError, match=r"1 run\(s\) failed: bad \(exit [1-9]\d*\): .*bad\.log") as err:
        run_parallel(jobs, 1, tmp_path / "logs", "t")
    assert "resume" in str(err.value)
    assert (tmp_path / "logs/bad.log").read_text().strip() and not (tmp_path / "logs/never.log").exists()


def test_jobs_share_out_the_cores_and_the_gpus(tmp_path, monkeypatch):
    """Each job gets cores // jobs CPU threads (unless the user set OMP_NUM_THREADS) and, on several GPUs, the
    GPU of its slot; at most max_jobs run at once."""
    import priorlab.study.schedule as studies

    started, live = [], []

    class FakeProcess:
        def __init__(self, cmd, stdout, stderr, env):
            started.append((cmd[-1], env.get("OMP_NUM_THREADS"), env.get("CUDA_VISIBLE_DEVICES")))
            live.append(self)
            self.returncode, self.polls = None, 0
            assert len([p for p in live if p.returncode is None]) <= 2

        def poll(self):
            self.polls += 1
            if self.polls > 1:
                self.returncode = 0
            return self.returncode

    monkeypatch.setenv("PRIORLAB_FORKSERVER", "0")  # a process per job, which this test fakes
    monkeypatch.setattr(studies.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(studies, "_gpu_count", lambda: 2)
    monkeypatch.setattr(studies.os, "cpu_count", lambda: 16)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("time.sleep", lambda s: None)
    studies.run_parallel([(f"job{i}", ["train", f"seed={i}"]) for i in range(5)], 2, tmp_path, "t")
    assert [s[0] for s in started] == [f"seed={i}" for i in range(5)]
    assert {s[1] for s in started} == {"8"}  # 16 cores, 2 at a time
    assert [s[2] for s in started[:2]] == ["0", "1"] and {s[2] for s in started} <= {"0", "1"}
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert studies.job_threads(4) == {}
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert studies.job_threads(6) == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    assert studies.job_threads(64) == {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_a_job_that_ran_out_of_gpu_memory_runs_again_alone_once(tmp_path, monkeypatch):
    """Jobs sharing a GPU can exhaust it together: such a job is started again, once, when no other job runs,
    and its log keeps both attempts. A second out-of-memory failure, or any other failure, is a failure."""
    import priorlab.study.schedule as studies

    attempts, events = {}, []

    class FakeProcess:
        def __init__(self, cmd, stdout, stderr, env):
            self.name = cmd[-1]
            attempts[self.name] = attempts.get(self.name, 0) + 1
            events.append(("start", self.name, sorted(p.name for p in live if p.returncode is None)))
            live.append(self)
            oom = self.name == "seed=1" and attempts[self.name] == 1 or self.name == "seed=9"
            stdout.write("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB\n" if oom else "ok\n")
            self.result, self.returncode, self.polls = (1 if oom else 0), None, 0

        def poll(self):
            self.polls += 1
            if self.polls > 2:
                self.returncode = self.result
            return self.returncode

    live = []
    monkeypatch.setenv("PRIORLAB_FORKSERVER", "0")  # a process per job, which this test fakes
    monkeypatch.setattr(studies.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(studies, "_gpu_count", lambda: 1)
    monkeypatch.setattr("time.sleep", lambda s: None)
    studies.run_parallel([(f"job{i}", ["train", f"seed={i}"]) for i in range(4)], 3, tmp_path, "t")
    assert attempts == {"seed=0": 1, "seed=1": 2, "seed=2": 1, "seed=3": 1}
    again = [e for e in events if e[1] == "seed=1"][1]
    assert again[2] == []  # alone
    log = (tmp_path / "job1.log").read_text()
    assert "CUDA out of memory" in log and "run again alone" in log and log.rstrip().endswith("ok")
    live.clear()
    with pytest.raises(UserError, match=r"1 run\(s\) failed: job9"):
        studies.run_parallel([("job9", ["train", "seed=9"])], 2, tmp_path, "t")
    assert attempts["seed=9"] == 2
    assert studies.ran_out_of_gpu_memory(tmp_path / "job9.log")
    assert not studies.ran_out_of_gpu_memory(tmp_path / "job0.log")
    (tmp_path / "cublas.log").write_text("RuntimeError: CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling ...")
    assert studies.ran_out_of_gpu_memory(tmp_path / "cublas.log")  # the same exhaustion, reported by cuBLAS


def test_a_study_resumed_in_pieces_keeps_every_pieces_log(tmp_path, monkeypatch):
    """Each piece appends to a job's log under its own header; an out-of-memory error of an earlier piece does not
    make a later piece's failure count as one (it is not run again)."""
    import priorlab.study.schedule as studies

    attempts = {}

    class FakeProcess:
        def __init__(self, cmd, stdout, stderr, env):
            self.name = cmd[-1]
            attempts[self.name] = attempts.get(self.name, 0) + 1
            first = attempts[self.name] == 1
            stdout.write("torch.OutOfMemoryError: CUDA out of memory\n" if first else "piece two: bad config\n")
            self.returncode = None
            self.result = 1

        def poll(self):
            self.returncode = self.result
            return self.returncode

    monkeypatch.setenv("PRIORLAB_FORKSERVER", "0")  # a process per job, which this test fakes
    monkeypatch.setattr(studies.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(studies, "_gpu_count", lambda: 1)
    monkeypatch.setattr("time.sleep", lambda s: None)
    (tmp_path / "job0.log").write_text("piece one's training output\n")
    with pytest.raises(UserError, match=r"1 run\(s\) failed: job0"):
        studies.run_parallel([("job0", ["train", "seed=0"])], 1, tmp_path, "t")
    assert attempts["seed=0"] == 2  # out of memory, then run again alone: two attempts
    attempts["seed=0"] = 1  # the next piece's attempt fails otherwise
    with pytest.raises(UserError, match=r"1 run\(s\) failed: job0"):
        studies.run_parallel([("job0", ["train", "seed=0"])], 1, tmp_path, "t")
    assert attempts["seed=0"] == 2  # not run again: its earlier out-of-memory error is not this attempt's
    log = (tmp_path / "job0.log").read_text()
    assert log.startswith("piece one's training output\n")
    assert log.count("[priorlab study] job0 started ") == 3 and log.count("run again alone") == 1
    assert log.rstrip().endswith("piece two: bad config")


@pytest.mark.parametrize("jobs", ["0", "two", "true"])
def test_jobs_must_be_a_positive_whole_number(tmp_path, jobs):
    out = run_cli("study", "dropout_vs_prior", "preset=tiny", f"jobs={jobs}", cwd=tmp_path, timeout=120)
    assert out.returncode != 0 and "must be a whole number of at least 1" in out.stderr
    assert "Traceback" not in out.stderr


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
    with pytest.raises(UserError, match="known: cheap_prior, dropout_vs_prior, own_dit, paper_setting, when_swap_pays"):
        load_experiment("nope")
    with pytest.raises(UserError, match="presets: quick, gpu, mnist_cpu"):
        preset_overrides(load_experiment("dropout_vs_prior"), "huge")


def test_an_experiment_file_that_is_not_text_or_not_a_file_is_refused(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"presets:\n  quick: \x8b\xff\n")
    with pytest.raises(UserError, match="binary.yaml is not valid YAML: 'utf-8' codec can't decode byte 0x8b"):
        load_experiment(str(tmp_path / "binary.yaml"))
    (tmp_path / "folder.yaml").mkdir()
    with pytest.raises(UserError, match="folder.yaml cannot be read"):
        load_experiment(str(tmp_path / "folder.yaml"))


@pytest.mark.parametrize(
    ("key", "parsed"),
    [
        ("eval/cond/fd/prior=base/w=2.0", ("fd", "base", 2.0)),
        ("eval/cond/fd_class=3/prior=self/w=1.5", ("fd_class=3", "self", 1.5)),
        ("eval/prior/loss/model=self/t=0-99", ("loss/t=0-99", "self", float("nan"))),
        ("eval/prior/disagreement/all", ("disagreement/all", "", float("nan"))),
        ("eval/uncond/kid/model=base", ("uncond_kid", "base", float("nan"))),
        ("eval/calib/loss/model=mix/t=0-99", ("calib_loss/t=0-99", "mix", float("nan"))),
        ("eval/calib/weight/prior=auto/t=900-999", ("calib_weight/t=900-999", "auto", float("nan"))),
        ("eval/diff/fd_se/prior=base/w=2.0", ("diff_fd_se", "base", 2.0)),
        ("eval/cond/num_classes", ("num_classes", "", float("nan"))),
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


def test_analysis_scripts_run_on_a_study(toy_study, monkeypatch, capsys):
    """Each script of analysis/ runs as `python analysis/X.py STUDY` would (as __main__, with that argv), in this
    process: it ends without an error and prints something."""
    import runpy

    root, study = toy_study
    scripts = sorted((Path(__file__).parents[1] / "analysis").glob("*.py"))
    assert len(scripts) >= 3
    for script in scripts:
        monkeypatch.setattr(sys, "argv", [str(script), str(study)])
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as end:
            assert end.code in (None, 0), (script.name, end.code)
        assert capsys.readouterr().out.strip(), script.name


def test_bases_and_their_run_folders():
    bases = check_bases({"a": None, "b": {"base": ["data.rotation=1"], "common": ["model.hidden=8"]}}, "p")
    assert bases == {"a": {"common": [], "base": [], "finetune": [], "priors": {}, "sweep": {}},
                     "b": {"common": ["model.hidden=8"], "base": ["data.rotation=1"], "finetune": [], "priors": {},
                           "sweep": {}}}  # fmt: skip
    with pytest.raises(UserError, match="base b takes only `common`, `base` and `finetune`"):
        check_bases({"b": {"data": ["x"]}}, "p")
    with pytest.raises(UserError, match="base name 'a/b' may hold only"):
        check_bases({"a/b": {}}, "p")
    sweep = {"cond_dropout": [0], "trainer.max_steps": [5], "seed": [0]}
    expected = "finetune/base=a/max_steps=${trainer.max_steps}/p=${cond_dropout}/seed=${seed}"
    assert finetune_subdir("a", sweep) == expected
    assert finetune_subdir("", {"cond_dropout": [0], "seed": [0]}) is None  # the default folder of one-base studies
    assert preset_overrides(load_experiment("dropout_vs_prior"), "quick")["bases"] is None
    assert set(preset_overrides(load_experiment("when_swap_pays"), "quick_toy2d")["bases"]) == {"same", "shifted",
                                                                                              "narrow"}  # fmt: skip
    study = Path("/s")
    assert run_axes(study / "finetune/base=a/max_steps=50/p=0.1/seed=2", study) == {"base_name": "a", "max_steps": "50"}
    assert run_axes(study / "finetune/p=0.1/seed=2", study) == {}


def test_base_seeds_train_a_base_each_and_deal_out_the_fine_tune_seeds():
    from priorlab.study.bases import study_bases
    from priorlab.study.spec import check_base_seeds

    parts = {"sweep": {"cond_dropout": [0.0], "seed": [0, 1, 2, 3, 4]}, "bases": None, "base": ["trainer.max_steps=9"],
             "finetune": ["x=1"], "base_seeds": [7, 8]}  # fmt: skip
    bases = study_bases(Path("/s"), ["study=s"], parts)
    assert [(b.label, b.base_dir, b.seeds) for b in bases] == [("seed=7", Path("/s/base/seed=7"), [0, 2, 4]),
                                                              ("seed=8", Path("/s/base/seed=8"), [1, 3])]  # fmt: skip
    assert bases[0].base == ["study=s", "trainer.max_steps=9", "seed=7", "stage.run_subdir=base/seed=7"]
    named = study_bases(Path("/s"), [], {**parts, "bases": check_bases({"a": {}}, "p"), "sweep": {
        "cond_dropout": [0.0], "trainer.max_steps": [5], "seed": [0, 1]}})  # fmt: skip
    assert [(b.label, b.base_dir.as_posix(), b.seeds) for b in named] == [
        ("a_seed=7", "/s/base/a/seed=7", [0]),
        ("a_seed=8", "/s/base/a/seed=8", [1]),
    ]
    assert named[0].base[-1] == "stage.run_subdir=base/a/seed=7"
    assert check_base_seeds(None, [0], "p") is None
    with pytest.raises(UserError, match="2 base_seeds for 1 fine-tune seeds"):
        check_base_seeds([0, 1], [0], "p")
    with pytest.raises(UserError, match="distinct non-negative whole numbers"):
        check_base_seeds([0, 0], [0, 1], "p")


def test_validity_thresholds_of_a_preset_are_checked():
    spec = {"name": "x", "presets": {"p": {"sweep": {"cond_dropout": [0], "seed": [0]}, "validity": {"min_acc": 1}}}}
    with pytest.raises(UserError, match="`validity` takes only min_accuracy, min_seeds"):
        preset_overrides(spec, "p")
    spec["presets"]["p"]["validity"] = {"min_accuracy": 0.5}
    assert preset_overrides(spec, "p")["validity"]["min_accuracy"] == 0.5


def _points_frame():
    """Two runs at w = 2 and 4: run a's base has the lower ∅ loss, run b's the higher."""
    rows = []
    fd = {("a", 2.0): {"self": 10, "base": 8, "auto": 7, "mix": 8}, ("a", 4.0): {"self": 12, "base": 9, "auto": 9},
          ("b", 2.0): {"self": 5, "base": 6, "auto": 6}, ("b", 4.0): {"self": 5, "base": 4, "auto": 6}}  # fmt: skip
    for (run, w), values in fd.items():
        rows += [{"run": run, "cond_dropout": 0.0, "seed": 0, "step": 1, "prior": p, "guidance_scale": w,
                  "metric": "fd", "value": v} for p, v in values.items()]  # fmt: skip
    for run, (ls, lb) in {"a": (2.0, 1.0), "b": (1.0, 4.0)}.items():
        for t in ("t=0-499", "t=500-999"):
            rows += [{"run": run, "cond_dropout": 0.0, "seed": 0, "step": 1, "prior": p, "guidance_scale": float("nan"),
                      "metric": f"calib_loss/{t}", "value": v} for p, v in (("self", ls), ("base", lb))]  # fmt: skip
    return pd.DataFrame(rows)


def test_sign_rule_and_fitted_comparison_count_what_they_say():
    points = swap_points(_points_frame(), "fd")
    assert sorted(points["benefit"]) == [-1, 1, 2, 3]
    ratio = points.set_index("run")["log_ratio"]
    assert ratio["a"].iloc[0] == pytest.approx(math.log(2)) and ratio["b"].iloc[0] == pytest.approx(math.log(0.25))
    overall, per_scale = sign_rule(points)
    # a: ratio > 0 and benefit 2, 3 (holds twice); b: ratio < 0, benefit −1 (holds) and +1 (fails)
    assert (overall.k, overall.n) == (3, 4) and (per_scale[4.0].k, per_scale[4.0].n) == (1, 2)
    # an axis whose values include the word "all" (train_per_class) keeps that value
    points["train_per_class"] = ["5", "all", "5", "all"]
    assert set(sign_rule(points, "train_per_class")[1]) == {"5", "all"}
    auto = fitted_vs_fixed(points, "auto")
    assert (auto.beats_both.k, auto.ties_better, auto.worse_than_better, auto.worse_than_both) == (1, 1, 2, 1)
    assert auto.vs_better.mean == pytest.approx((-1 + 0 + 1 + 2) / 4)
    assert fitted_vs_fixed(points, "mix").beats_both.n == 1  # mix was measured at one point only
    lo, hi = Proportion(3, 4).interval  # Wilson: 0.75 of 4 → [0.301, 0.954]
    assert lo == pytest.approx(0.3006, abs=1e-3) and hi == pytest.approx(0.9544, abs=1e-3)


def test_wilson_interval_equals_the_hand_written_formula():
    """Proportion's interval (scipy's Wilson) equals the score-interval formula it replaced, edges included."""
    import math

    from scipy import stats

    def wilson(k: int, n: int) -> tuple[float, float]:
        z, p = stats.norm.ppf(0.975), k / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n**2))
        return centre - half, centre + half

    for k, n in [(0, 1), (1, 1), (0, 7), (3, 4), (5, 12), (12, 12), (37, 100), (1, 1000)]:
        assert Proportion(k, n).interval == pytest.approx(wilson(k, n), abs=1e-12), (k, n)
    assert all(math.isnan(v) for v in Proportion(0, 0).interval)


def test_fitted_cells_pair_seeds_within_a_cell_against_its_better_fixed_prior():
    """Per (p, w) cell, paired differences over seeds against the better fixed prior (by its mean), checked by
    hand: a cell within noise is said to be so, not counted as a failure."""
    from priorlab.analysis.sign_rule import fitted_cells

    rows = []
    for seed, (s, b, a) in enumerate([(1.0, 2.0, 0.8), (1.2, 2.1, 0.95), (1.1, 1.9, 0.95)]):  # cell w=2: self better
        rows.append({"run": f"r{seed}", "cond_dropout": 0.1, "seed": seed, "guidance_scale": 2.0, "self": s,
                     "base": b, "auto": a})  # fmt: skip
    for seed, (s, b, a) in enumerate([(3.0, 2.0, 2.5), (3.1, 2.2, 1.6), (2.9, 2.1, 2.2)]):  # w=4: base better
        rows.append({"run": f"r{seed}", "cond_dropout": 0.1, "seed": seed, "guidance_scale": 4.0, "self": s,
                     "base": b, "auto": a})  # fmt: skip
    cells = fitted_cells(pd.DataFrame(rows), "auto").set_index("guidance_scale")
    low = cells.loc[2.0]
    assert low["better fixed"] == "self" and low["seeds"] == 3
    diff = [0.8 - 1.0, 0.95 - 1.2, 0.95 - 1.1]
    expected = mean_ci(diff)
    assert low["vs better"].mean == pytest.approx(sum(diff) / 3)
    assert (low["vs better"].lo, low["vs better"].hi) == pytest.approx((expected.lo, expected.hi))
    half = 4.302653 * statistics.stdev(diff) / math.sqrt(3)  # t(0.975, 2)
    assert low["vs better"].hi == pytest.approx(sum(diff) / 3 + half, rel=1e-5)
    assert low["verdict"] == "better than both"  # −0.2 [−0.32, −0.08]
    high = cells.loc[4.0]
    assert high["better fixed"] == "base" and high["vs better"].mean == pytest.approx((0.5 - 0.6 + 0.1) / 3)
    assert high["verdict"] == "within noise of the better"
    assert high["vs worse"].mean == pytest.approx((-0.5 - 1.5 - 0.7) / 3)
    same = pd.DataFrame(rows).assign(checked=lambda f: f[["self", "base"]].min(axis=1))
    assert set(fitted_cells(same, "checked")["verdict"]) == {"the better itself"}


def test_a_study_with_a_ddp_trainer_trains_one_fine_tune_per_point(compose_tmp, tmp_path, capsys):
    """`priorlab train -m` refuses DDP (its processes would re-run the multirun), so the study runs each point."""
    import re

    from priorlab.study.run import run_study

    def finetune_commands(trainer: str) -> list[str]:
        preset = {"common": ["data=toy2d", "model=mlp", f"trainer={trainer}"],
                  "sweep": {"cond_dropout": [0.0, 0.2], "seed": [0, 1]}}  # fmt: skip
        spec = {"name": "ddp", "presets": {"tiny": preset}}
        path = tmp_path / f"{trainer}.yaml"
        path.write_text(yaml.safe_dump(spec))
        run_study(compose_tmp([f"name={path}", "preset=tiny", "dry_run=true"], config_name="study"))
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("finetunes")]

    ddp = finetune_commands("ddp_cpu")
    assert len(ddp) == 4 and not any(" -m " in line for line in ddp) and all("trainer=ddp_cpu" in line for line in ddp)
    points = sorted(re.search(r" cond_dropout=(\S+) seed=(\S+)$", line).groups() for line in ddp)
    assert points == [("0.0", "0"), ("0.0", "1"), ("0.2", "0"), ("0.2", "1")]
    (single,) = finetune_commands("cpu")
    assert " -m " in single and single.endswith("cond_dropout=0.0,0.2 seed=0,1")


@pytest.mark.parametrize(("seeds", "t", "half_width"), [(2, "12.7", "8.98"), (3, "4.3", "2.48"), (5, "2.78", "1.24")])
def test_report_states_the_t_quantile_of_its_number_of_seeds(seeds, t, half_width):
    from priorlab.analysis.report import interval_note

    assert f"with {seeds} seeds t = {t}, so each half-width is {half_width} standard deviations" in interval_note(seeds)
    assert "no intervals" in interval_note(1)


def test_online_dashboard_builds_the_w_and_b_workspace_spec():
    """The workspace that `priorlab dashboard NAME` saves online, built offline: its sections and the metric keys
    of their panels, which are the keys the evaluation callbacks log."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws
    from omegaconf import OmegaConf

    from priorlab.commands.dashboard import build_workspace

    cfg = OmegaConf.create({"name": "s", "entity": "me", "project": "priorlab", "guidance_scales": [1.0, 1.5]})
    workspace = build_workspace(cfg, ws, wr)
    assert workspace.name == "priorlab s" and workspace.entity == "me" and workspace.project == "priorlab"
    panels = {s.name: [p.y[0] for p in s.panels] for s in workspace.sections}
    fd = [f"eval/cond/fd/prior={p}/w={w}" for w in ("1.0", "1.5") for p in ("self", "base")]
    assert panels["fd per guidance scale"] == fd and "nll per guidance scale" in panels
    assert "eval/prior/disagreement/all" in panels["Drift of the unconditional branch"]
    assert {p.x for s in workspace.sections for p in s.panels} == {"trainer/global_step"}  # not W&B's row count
    spec = workspace._to_model()  # what save() sends: it serialises
    assert spec is not None


def test_study_progress_lines_start_a_line_of_their_own_after_a_bar(tmp_path, capsys):
    """A fine-tune's bar leaves its line unended on the shared output; the study's line still reads on its own."""
    import sys

    from priorlab.study.progress import StudyProgress

    progress = StudyProgress("s", tmp_path, total=2, started=100.0, clock=lambda: 142.0)
    sys.stdout.write("step 6/6 |████| 00:00, train/loss=1.2")  # a bar's last state, no newline
    (tmp_path / "p=0.1" / "seed=0").mkdir(parents=True)
    (tmp_path / "p=0.1" / "seed=0" / "done.json").write_text("{}")
    progress.poll(busy=10.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "[study s] fine-tune 1 of 2 done (p=0.1, seed=0) · 42s elapsed · about 10s left"

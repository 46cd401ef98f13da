"""Shared fixtures: configs composed from the real configs/ folder, tiny settings, runs under tmp_path."""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import torch
    from omegaconf import DictConfig

# Nothing here imports torch, Lightning or Hydra at module level: pytest's controller process loads this file before
# it starts the workers, and those imports (seconds on 2 cores) would delay every worker's start. Each helper imports
# what it uses.

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

TINY = [
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=1",
    "data.batch_size=16",
    "logger=csv",  # W&B offline starts a service process per run (seconds); tests of W&B ask for it
]


def perturbed_mlp(seed: int = 0, prediction_type: str = "epsilon", **kw):
    """A small toy2d MLP denoiser (4 classes) with its weights moved off initialisation, so its branches differ."""
    import torch

    from priorlab.models import mlp

    torch.manual_seed(seed)
    m = mlp((2,), 4, hidden=32, depth=2, prediction_type=prediction_type, **kw).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op thread count set to `n` in this process for the block: a result compared bit for bit with
    another process's must be computed with the thread count that process used (OMP_NUM_THREADS=n there), since
    CPU kernels split their reductions by it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


ULPS_PER_PASS = 4096  # rounding allowed per network pass, in units of the dtype's eps (assert_close_across_shapes)


def _eps(value: torch.Tensor) -> float:
    import torch

    return torch.finfo(value.dtype if value.is_floating_point() else torch.float32).eps


def across_shapes_atol(expected, passes: int = 1, eps: float | None = None) -> float:
    """The tolerance of `assert_close_across_shapes`: passes · 4096 · eps · max(1, max|expected|)."""
    import torch

    expected = torch.as_tensor(expected)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return passes * ULPS_PER_PASS * (eps or _eps(expected)) * scale


def assert_close_across_shapes(actual, expected, passes: int = 1) -> None:
    """Assert that `actual` holds the values of `expected` computed in batches of another shape (rows, chunks).

    CPU kernels block, vectorise and split their reductions by batch shape, machine and thread count, so the same
    value computed in another batch is a reassociated sum: a sum of n terms moves by at most
    γ_n·Σ|terms| ≈ n·eps·Σ|terms| (Higham, Accuracy and Stability of Numerical Algorithms, §3.1). Each network pass
    is allowed n = 4096 ulps relative to max(1, max|expected|) (4.9e-4 in float32, 9.1e-13 in float64; the eps of
    the less precise side), times `passes`, the sequential passes the value went through (e.g. sampler steps).
    """
    import torch

    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    atol = across_shapes_atol(expected, passes, max(_eps(actual), _eps(expected)))
    note = f"allowed across shapes: {atol:.3g} ({passes} passes)"
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol, msg=lambda message: f"{message}\n{note}")


def compose_cfg(tmp_path: Path, overrides: list[str], config_name: str = "train") -> DictConfig:
    """The real config with `overrides`, its run folders under tmp_path."""
    from hydra import compose, initialize_config_dir

    from priorlab.overrides import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name=config_name, overrides=[f"paths.runs={tmp_path}/runs", *overrides])


_SERVER: list = []  # this test process's CLI server, started on first use


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 300,
            fresh: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """Run `priorlab ARGS` and capture its output: in a fork of a server that imported priorlab once (`Server`, as
    the executable would run it, with WANDB_MODE=offline and `env` added to the environment), or with `fresh` as a
    new process of the installed executable (what a fork cannot show: imports, the interpreter's own start)."""
    extra = {"WANDB_MODE": "offline", **(env or {})}
    if fresh:
        exe = Path(sys.executable).parent / "priorlab"
        full_env = {**os.environ, **extra}
        return subprocess.run([str(exe), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = _server().run(list(args), cwd, timeout, env=extra)
    return subprocess.CompletedProcess(["priorlab", *args], out["rc"], out["stdout"], out["stderr"])


def _server() -> Server:
    """This test process's one CLI server (`run_cli` and the `cli` fixture share it: each start imports priorlab, torch
    and Lightning, seconds on 2 cores), started on first use."""
    if not _SERVER:
        _SERVER.append(Server())
        atexit.register(_SERVER[0].close)
    return _SERVER[0]


class Server:
    """tests/cli_server.py, started once: `run(args, cwd)` → {"rc", "stdout", "stderr", "seconds"}. Each command line
    runs in a fork of one interpreter that imported priorlab once (a fresh `priorlab` spends seconds importing)."""

    def __init__(self):
        env = {**os.environ, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
        here = Path(__file__).resolve().parent
        self.proc = subprocess.Popen([sys.executable, str(here / "cli_server.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip

    def run(self, args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> dict:
        case = {"args": args, "cwd": str(cwd), "timeout": timeout, "env": env or {}}
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the CLI server stopped"
        return json.loads(line)

    def __call__(self, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
        """Like `run_cli`: the command's exit status and output."""
        out = self.run(list(args), cwd, timeout)
        return subprocess.CompletedProcess(["priorlab", *args], out["rc"], out["stdout"], out["stderr"])

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="session")
def cli() -> Server:
    """`cli(*args, cwd=...)`: a `priorlab` command line run by the session's CLI server, for tests that run many
    short commands (user mistakes)."""
    return _server()


def _worker_threads() -> int | None:
    """torch's intra-op threads in a pytest-xdist worker: its share of the cores (1 for each of 2 workers on 2 cores),
    so that the workers do not oversubscribe them (OpenMP threads spinning for a core another worker holds); None
    outside xdist."""
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    return max(1, (os.cpu_count() or 1) // count) if count > 1 else None


@pytest.fixture(autouse=True)
def _threads_share():
    """Each test starts with the worker's share of torch's threads (`_worker_threads`): an in-process training may
    have set another count (`cpu_threads=auto`). The processes a test starts keep their own settings."""
    n = _worker_threads()
    if n is not None:
        import torch

        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
    yield


@pytest.fixture
def cpu_graphs(monkeypatch):
    """CUDA graphs' stand-in on the CPU (`recorded_graphs.RecordedGraphs`) in place of `sampling.GRAPHS`: the
    graphed sampling paths run here, their captures and replays counted."""
    import priorlab.sampling as sampling_module
    from recorded_graphs import RecordedGraphs

    graphs = RecordedGraphs()
    monkeypatch.setattr(sampling_module, "GRAPHS", graphs)
    return graphs


@pytest.fixture
def compose_tmp(tmp_path):
    return lambda overrides, config_name="train": compose_cfg(tmp_path, overrides, config_name)


def tiny_study(tmp_path_factory, name: str, preset: str = "tiny") -> tuple[Path, Path]:
    """Run `priorlab study NAME preset=PRESET` in a fresh folder whose path holds a space and a non-ASCII letter;
    (that folder, the study's run folder)."""
    root = tmp_path_factory.mktemp(f"{name} wü")
    out = run_cli("study", name, f"preset={preset}", cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    (root / "study_output.txt").write_text(out.stdout + out.stderr)
    return root, root / "runs" / name


@pytest.fixture
def batch():
    """A toy2d batch over the whole schedule (cosine ᾱ): (scheduler, x_t, t, labels, ᾱ_t)."""
    import torch
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([5, 100, 300, 500, 700, 990])
    return sched, x, t, torch.tensor([0, 1, 2, 3, 0, 1]), sched.alphas_cumprod[t]


# The end-to-end tier (`pytest -m e2e`; `make test-fast` leaves it out): whole studies, tests that start processes
# of their own (fresh interpreters, DDP, the fork server's lifecycle), and trainings to a quality bar. Listed here,
# each with why, rather than on each test, so that the tier reads in one place.
E2E_MODULES = {
    "test_forkserver.py": "starts and stops fork servers and their runs",
    "test_imports.py": "imports each module (and each bench script) in a process of its own",
    "test_own_data.py": "the README's walkthrough: a study on the user's own images",
    "test_fuzz.py": "hundreds of command lines through the CLI",
}
E2E_TESTS = {
    # whole studies
    "test_dit.py::test_a_study_of_a_latent_dit_base_given_by_path_runs_to_its_results": "a study",
    "test_study.py::test_toy2d_study_writes_results_report_and_every_figure": "a study",
    "test_study.py::test_a_study_too_short_to_learn_says_it_cannot_conclude": "a study",
    "test_study.py::test_a_study_whose_base_changed_refuses_its_finished_fine_tunes": "a study",
    "test_study.py::test_report_rebuilds_from_results_alone": "a study",
    "test_study.py::test_killed_study_resumes_to_the_same_results": "a study, killed and resumed",
    "test_study_axes.py::test_images_with_base_seeds_and_a_data_size_axis": "a study",
    "test_study.py::test_jobs_at_once_stop_at_a_failure_and_name_its_log": "a study",
    "test_study.py::test_analysis_scripts_run_on_a_study": "a study, then the analysis scripts",
    "test_study_axes.py::test_when_swap_pays_trains_each_base_once_and_sweeps_every_axis": "a study",
    "test_study_axes.py::test_when_swap_pays_again_trains_nothing": "a study",
    "test_paper_setting.py::test_the_tiny_preset_runs_from_tarballs_to_report": "a study from npm tarballs",
    "test_paper_setting.py::test_every_preset_of_every_experiment_composes": "dry-runs every preset (22)",
    "test_cheap_prior.py::test_cheap_prior_study_and_evaluate_with_an_extra_prior": "a study",
    "test_predictors.py::test_the_script_prints_each_study_and_writes_the_same_markdown": "an analysis script",
    "test_study_slurm.py::test_a_study_on_slurm_runs_every_job_and_writes_its_results": "a study (SLURM stand-in)",
    "test_wandb.py::test_a_study_is_one_w_and_b_group_of_runs_tagged_with_their_condition": "a study with W&B",
    "test_wandb.py::test_w_and_b_holds_the_metrics_results_csv_and_both_dashboards_read": "a study with W&B",
    # processes of their own
    "test_wandb.py::test_train_alone_says_how_to_sync_in_one_line": "a run with W&B's service process",
    "test_evaluation.py::test_metrics_from_two_gloo_processes_equal_those_from_one": "two gloo processes",
    "test_cli.py::test_two_process_ddp_fit": "two DDP processes",
    "test_resume.py::test_sigkill_then_resume_gives_identical_weights": "a run killed with SIGKILL",
    "test_configs.py::test_installing_priorlab_keeps_the_installed_torch_and_everything_else": "pip in a venv",
    "test_install.py::test_the_wheel_ships_the_folders_and_runs_a_study_from_elsewhere": "builds, installs, runs",
    "test_training.py::test_the_same_run_started_twice_fails_in_one_line": "a run while another process holds it",
    "test_dashboard.py::test_dashboard_in_headless_chromium": "starts headless Chromium on a study's dashboard",
    "test_data.py::test_mnist_split_is_deterministic_and_class_subset_works": "loads and resizes all of MNIST",
    "test_data.py::test_mnist_is_bundled_resized_and_scaled": "loads and resizes all of MNIST, at two sizes",
    "test_data.py::test_train_per_class_keeps_the_first_n_of_each_class_and_evaluation_keeps_all": "all of MNIST",
    # whole evaluations: every prior and scale sampled and scored, compared with another route's numbers
    "test_evaluation.py::test_one_pass_evaluation_gives_the_numbers_of_separate_passes": "two whole evaluations",
    "test_evaluation.py::test_checked_prior_takes_the_best_scoring_candidate_per_scale": "a whole evaluation",
    "test_evaluation.py::test_cuda_graphs_reach_the_one_pass_passes": "two whole evaluations",
    # commands that load or train models through the CLI
    "test_study.py::test_commands_of_a_study_in_a_folder_with_a_space_and_a_non_ascii_letter": "a study's dry run",
    "test_resume.py::test_corrupt_checkpoint_is_a_one_line_error_and_nothing_is_overwritten": "trains, then resumes",
    "test_pipelines.py::test_sample_command_user_mistakes_are_one_line_errors": "eight pipeline loads",
    # training to a quality bar, or a base then its fine-tune through the CLI
    "test_evaluation.py::test_toy2d_ground_truth_base_prior_beats_an_untrained_unconditional_branch": "trains",
    "test_distill.py::test_after_training_one_pass_matches_the_two_network_guided_prediction": "trains (issue 33)",
    "test_evaluation.py::test_callbacks_and_evaluate_command": "trains, then evaluates through the CLI",
    "test_evaluation.py::test_final_evaluation_runs_on_ema_weights_before_lightning_moves_the_module_to_the_cpu": (
        "trains"
    ),
    "test_evaluation.py::test_non_finite_weights_stop_training_before_the_evaluation_callbacks_sample": "trains",
    "test_cli.py::test_base_then_finetune_write_their_run_folders": "a base and a fine-tune through the CLI",
    "test_cli.py::test_base_of_another_size_and_unknown_column_are_refused": "uses that base",
    # the unit tier's longest (3.3-6.1 s each on 2 cores): whole samplings, evaluations and data loads
    "test_sampling.py::test_graphs_recorded_on_the_cpu_never_replay_stale_weights_or_tables": "records whole samplings",
    "test_evaluation.py::test_fitted_priors_use_a_calibration_split_disjoint_from_the_metric_heldout": (
        "three fits and a whole evaluation"
    ),
    "test_evaluation.py::test_data_that_differ_only_in_classes_or_draw_do_not_share_an_evaluator": "trains evaluators",
    "test_configs.py::test_data_configs": "loads all of MNIST among the data sets",
    "test_pipelines.py::test_sample_command_fits_auto_weights_on_a_calibration_folder": "samples through the CLI",
    "test_pipelines.py::test_sample_cli_fits_guided_weights_for_image_conditioned_pipelines": "fits through the CLI",
    "test_pipelines.py::test_sample_command_writes_images_settings_and_a_comparison": "samples through the CLI",
    "test_pipelines.py::test_sample_command_dit_and_video": "samples through the CLI",
    "test_training.py::test_a_run_in_a_log_file_prints_ten_step_lines_and_none_of_the_known_warnings": "trains",
    "test_resume.py::test_evaluate_refuses_the_recorded_base_changed_since_the_fine_tune": "trains, evaluates",
    "test_pretrained.py::test_finetune_from_a_diffusers_pipeline_trains_records_evaluates_and_exports": "trains",
    "test_hub.py::test_a_finetune_records_the_hub_name_and_its_checks_refuse_the_branch_moved_to_other_weights": (
        "trains, then resumes"
    ),
    # a fine-tune of a user's diffusers base trained, evaluated, resumed and exported
    "test_dit.py::test_latent_finetune_trains_evaluates_resumes_and_exports_to_a_plain_ditpipeline": "trains, resumes",
    "test_textcond.py::test_text_finetune_trains_evaluates_with_the_base_resumes_and_exports": "trains, resumes",
    "test_textcond.py::test_a_latent_stable_diffusion_base_finetunes_on_cached_latents_and_exports_with_its_vae": (
        "trains, evaluates, exports"
    ),
    "test_textcond.py::test_sample_takes_a_text_finetune_with_prompts_and_its_base_as_the_prior": "trains, samples",
}


# The modules of longest total time (118 s to 22 s each on 2 cores, measured with --durations=0), run first: with
# `--dist loadscope --no-loadscope-reorder` xdist hands whole modules to the workers in collection order. Its
# default order (most tests first) left the study modules, of few but long tests, for the end, and one worker
# alone with them for minutes.
LONGEST_FIRST = ["test_study.py", "test_study_axes.py", "test_evaluation.py", "test_paper_setting.py", "test_cli.py",
                 "test_imports.py", "test_forkserver.py", "test_user_errors.py", "test_resume.py", "test_own_data.py",
                 "test_pipelines.py", "test_data.py", "test_cheap_prior.py", "test_dit.py", "test_fuzz.py",
                 "test_install.py"]  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items) -> None:
    """Mark the end-to-end tier (E2E_MODULES, E2E_TESTS; `tests/test_tiers.py` checks that each names a test), and
    put the longest modules first (LONGEST_FIRST; the order within a module is kept)."""
    for item in items:
        if item.path.name in E2E_MODULES or f"{item.path.name}::{item.originalname}" in E2E_TESTS:
            item.add_marker(pytest.mark.e2e)
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))

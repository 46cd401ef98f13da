"""`priorlab train` end to end through the installed command, and its one-line errors."""

import csv
import json
import re

import pytest
import yaml

from conftest import run_cli

TINY = [
    "trainer.max_steps=6",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "data.batch_size=32",
    "trainer.log_every_n_steps=1",
    "logger=csv",  # W&B's runs: test_wandb.py
]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = run_cli("train", "stage=base", "study=s", *TINY, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    return root


def _check_run_folder(run, max_steps=6):
    assert (run / "config.yaml").exists()
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert (run / "model" / "diffusion_pytorch_model.safetensors").exists()
    assert (run / "model" / "config.json").exists() and (run / "model" / "scheduler_config.json").exists()
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert any(r.get("train/loss") for r in rows) and any(r.get("val/loss_uncond") for r in rows)
    return json.loads((run / "model" / "priorlab.json").read_text())


def test_base_then_finetune_write_their_run_folders(base_run):
    meta = _check_run_folder(base_run / "runs/s/base")
    assert meta["stage"] == "base" and meta["cond_dropout"] == 1.0 and meta["step"] == 6
    # the loggers' config (CSV hparams.yaml; W&B gets the same dict, test_wandb.py) says what the base trained with:
    # every label dropped, whatever the cond_dropout key of the command (0.1 by default)
    hparams = yaml.safe_load((base_run / "runs/s/base/hparams.yaml").read_text())
    assert hparams["cond_dropout"] == 1.0 and hparams["stage"]["name"] == "base"
    out = run_cli("train", "stage=finetune", "study=s", "base=runs/s/base", "cond_dropout=0.2", *TINY, cwd=base_run)
    assert out.returncode == 0, out.stderr[-3000:]
    meta = _check_run_folder(base_run / "runs/s/finetune/p=0.2/seed=0")
    assert meta["stage"] == "finetune" and meta["cond_dropout"] == 0.2
    assert meta["base"]["path"].endswith("runs/s/base/model") and len(meta["base"]["sha256"]) == 64


def test_dry_run_prints_the_resolved_config(tmp_path):
    out = run_cli("train", "dry_run=true", "study=x", "cond_dropout=0.3", cwd=tmp_path)
    assert out.returncode == 0
    assert "cond_dropout: 0.3" in out.stdout and "run_dir: runs/x/base" in out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cond_dropout=1.5"], "cond_dropout=1.5 is outside [0, 1]"),
        (["stage=finetune", "base=nowhere"], "base=nowhere: no such folder"),
        (["stage=finetune"], "stage=finetune needs base=PATH"),
        (["data=hf", "data.source=/no/such/folder"], "data.source=/no/such/folder: no such file or folder"),
    ],
)
def test_bad_input_is_one_line_without_traceback(tmp_path, args, message):
    out = run_cli("train", *args, *TINY, cwd=tmp_path)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("priorlab: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-2000:]


def test_base_of_another_size_and_unknown_column_are_refused(base_run, tmp_path):
    out = run_cli("train", "stage=finetune", "base=runs/s/base", "model.block_out_channels=[8,16]", *TINY, cwd=base_run)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "another architecture or size" in out.stderr and "block_out_channels" in out.stderr
    import numpy as np
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "imgs" / "a" / "0.png")
    out = run_cli(
        "train", "data=hf", f"data.source={tmp_path / 'imgs'}", "data.label_column=digit", *TINY, cwd=tmp_path
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "data.label_column='digit' is not a column" in out.stderr


def test_two_process_ddp_fit(tmp_path):
    out = run_cli("train", "trainer=ddp_cpu", "data=digits", "logger=csv", "study=d", *TINY, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    assert "distributed_backend=gloo" in text and "Starting with 2 processes" in text
    meta = json.loads((tmp_path / "runs/d/base/model/priorlab.json").read_text())
    assert meta["step"] == 6


def test_a_user_error_from_an_instantiated_config_class_is_one_line(tmp_path):
    """Hydra wraps errors raised while instantiating a config (here the DDP strategy's) in its own exception."""
    out = run_cli("train", "trainer=ddp_cpu", "trainer.strategy.comm_hook=int8", "data=digits", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "Error in call to target" not in out.stderr
    expected = "priorlab: error: trainer.strategy.comm_hook=int8 is not one of bf16, fp16, skip (or null)"
    assert out.stderr.strip() == expected


def test_multirun_with_ddp_is_refused_in_one_line(tmp_path):
    """Lightning starts DDP ranks by re-running the command line: with -m each rank would start the whole sweep."""
    out = run_cli("train", "-m", "trainer=ddp_cpu", "data=toy2d", "model=mlp", "model.hidden=8", "logger=csv",
                  "study=m", "seed=0,1", *TINY, cwd=tmp_path, timeout=120)  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("priorlab: error:")]
    assert len(lines) == 1 and "cannot run a trainer of 2 DDP processes" in lines[0], out.stderr[-2000:]
    assert "Starting with 2 processes" not in out.stdout + out.stderr
    assert not list(tmp_path.glob("runs/m/**/checkpoints")) and not list(tmp_path.glob("runs/m/**/done.json"))


def test_values_with_equals_signs_are_quoted_for_hydra():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from priorlab.overrides import rewrite_overrides

    args = ["model=runs/x/finetune/p=0.1/seed=0", "extra=[trainer=ddp_cpu,seed=3]", 'extra=["trainer=gpu"]',
            "eval.guidance_scales=[1.0,3.0]", "base='already=quoted'"]  # fmt: skip
    out = rewrite_overrides("evaluate", args)
    parsed = OverridesParser.create().parse_overrides(out)
    values = [o.value() for o in parsed]
    assert [o.key_or_group for o in parsed] == ["model_dir", "extra", "extra", "eval.guidance_scales", "base"]
    assert values == ["runs/x/finetune/p=0.1/seed=0", ["trainer=ddp_cpu", "seed=3"], ["trainer=gpu"], [1.0, 3.0],
                      "already=quoted"]  # fmt: skip


@pytest.mark.parametrize(
    "value",
    ["/tmp/wü dir/runs", "/runs/base/seed=0", "it's", "a\\'b\\", "[1]", " pad ", "", "all", "runs/p=0.1",
     5, 0.1, 1e-05, True, None, [1, "a b", "wü"]],
)  # fmt: skip
def test_child_overrides_keep_their_values(value):
    """Values a study writes into its child commands (paths with spaces, '=' or non-ASCII letters, quotes) are
    read back by Hydra as they were."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from priorlab.overrides import override, rewrite_overrides

    text = rewrite_overrides("train", [override("key", value)])  # as the child's CLI passes it on to Hydra
    (parsed,) = OverridesParser.create().parse_overrides(text)
    assert parsed.value() == value


COMMAND_CONFIGS = ["train", "train-evaluator", "evaluate", "study", "report", "dashboard", "sample", "export"]


@pytest.mark.parametrize("command", COMMAND_CONFIGS)
def test_each_command_has_its_own_help_describing_its_settings(tmp_path, command):
    """`priorlab COMMAND --help`: its usage and every setting of configs/COMMAND.yaml described (the part above
    the defaults that Hydra appends), not Hydra's generic text nor, but for train, train's config groups."""
    from priorlab.overrides import CONFIG_DIR, PATH_KEYS

    out = run_cli(command, "--help", cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    described = out.stdout.split("\nDefaults:\n")[0]
    assert described.startswith(f"usage: priorlab {command}") and "powered by Hydra" not in out.stdout
    aliases = {v: k for k, v in PATH_KEYS.get(command, {}).items()}  # model_dir is given as model=PATH
    config = yaml.safe_load((CONFIG_DIR / f"{command}.yaml").read_text())
    keys = [aliases.get(k, k) for k in config if k not in ("defaults", "hydra", "overrides", "launcher_overrides")]
    missing = [k for k in keys if not re.search(rf"(^|[\s(]){re.escape(k)}[=.]", described, re.M)]
    assert not missing, f"not described in `priorlab {command} --help`: {missing}"
    groups = "trainer: cpu, ddp, ddp_cpu, gpu" in out.stdout
    assert groups == (command == "train")  # train's config groups only where they are settings


def test_study_help_shows_the_study_settings_and_how_to_set_those_of_its_runs(tmp_path):
    out = run_cli("study", "--help", cwd=tmp_path, timeout=60)
    for text in ("sweep.KEY=[v1,v2]", "base_steps=N", "finetune_steps=N", "data=hf data.source=my_images",
                 "Precedence, first wins: the command line, the preset"):  # fmt: skip
        assert text in out.stdout, text
    assert "stage: base, finetune" not in out.stdout and "model: dit_b" not in out.stdout

"""User mistakes end with one `priorlab: error:` line and exit status 2, without a traceback, and leave no
half-started run folder or output behind (issue 19, item 6)."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import perturbed_mlp

RESULTS = Path(__file__).resolve().parents[1] / "results" / "dropout_vs_prior_gpu_first_preset"
TINY = ["data=toy2d", "data.num_samples=200", "model=mlp", "model.hidden=8", "model.depth=1", "logger=csv",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "data.batch_size=16"]  # fmt: skip
NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")


def one_line_error(out, message: str) -> str:
    """Assert rc 2, no traceback and one `priorlab: error:` line holding `message`; return that line."""
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr + out.stdout, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("priorlab: error:")]
    assert len(lines) == 1 and message in lines[0], out.stderr[-3000:]
    return lines[0]


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def no_run_folder(root: Path, study: str) -> None:
    """Nothing of the run under runs/<study> but the lock file beside its folder."""
    left = [p for p in (root / "runs" / study).rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    assert not left, left


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("train", ["optimzer.lr=1"], "optimzer.lr is not a setting of `priorlab train`; did you mean optimizer.lr?"),
        ("train", ["max_steps=3"], "max_steps is not a setting of `priorlab train`; did you mean trainer.max_steps?"),
        (
            "train",
            ["model=mlp", "model.hiden=3"],
            "model.hiden is not a setting of `priorlab train`; did you mean model.hidden?",
        ),
        (
            "train",
            ["data=toy2e"],
            "data=toy2e is not one of the data configs (digits, emoji, hf, mnist, toy2d); did you mean data=toy2d?",
        ),
        ("evaluate", ["model=x", "eval.guidance_scale=[1]"], "did you mean eval.guidance_scales?"),
        ("train", ["seed=["], "cannot read the override 'seed=['"),
    ],
)
def test_hydra_key_typos_name_the_closest_key(tmp_path, command, args, message, cli):
    out = cli(command, *args, cwd=tmp_path)
    one_line_error(out, message)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("seed=-1", "seed=-1 must be a whole number from 0 to 4294967295"),
        ("optimizer.lr=-1", "optimizer.lr=-1 must be a finite number above 0"),
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0 must be a whole number of at least 1"),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be a whole number of at least 1"),
    ],
)
def test_values_a_run_cannot_use_are_refused_before_its_folder_is_made(tmp_path, arg, message, cli):
    out = cli("train", "study=v", *TINY, arg, cwd=tmp_path)
    one_line_error(out, message)
    assert not (tmp_path / "runs").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_run_folder(tmp_path, cli):
    """A learning rate of 1e30 makes the loss non-finite before the first validation writes a checkpoint."""
    out = cli("train", "study=nan", *TINY, "optimizer.lr=1e30", cwd=tmp_path)
    one_line_error(out, "the training loss became")
    no_run_folder(tmp_path, "nan")


def test_a_training_that_diverges_without_a_nan_says_so_in_its_log_and_done_json(tmp_path, cli):
    """optimizer.lr=10000 drives the loss of toy2d from about 1 to about 1e14 within 60 steps, never to NaN: the
    run finishes (its weights are written), and warns on stderr and in done.json. A healthy run records nothing."""
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.val_check"))]
    out = cli("train", "study=dv", *args, "trainer.max_steps=60", "trainer.val_check_interval=30",
              "optimizer.lr=10000", cwd=tmp_path)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    warning = [line for line in out.stderr.splitlines() if "priorlab: warning:" in line]
    assert len(warning) == 1 and "runs/dv/base diverged: its training loss rose from" in warning[0]
    assert "lower optimizer.lr" in warning[0] and "Traceback" not in out.stderr
    done = json.loads((tmp_path / "runs/dv/base/done.json").read_text())
    assert done["step"] == 60 and done["diverged"]["last_loss"] > 1e6 * done["diverged"]["first_loss"] > 0
    out = cli("train", "study=ok", *args, "trainer.max_steps=60", "trainer.val_check_interval=30", cwd=tmp_path)
    assert out.returncode == 0 and "diverged" not in out.stderr
    assert "diverged" not in json.loads((tmp_path / "runs/ok/base/done.json").read_text())


def test_the_divergence_watch_compares_the_last_steps_with_the_lowest_first_ones():
    from priorlab.training.callbacks import DivergenceWatch

    def fed(losses, window=4):
        watch = DivergenceWatch(window=window, factor=10.0)
        for v in losses:
            watch.on_train_batch_end(None, None, {"loss": torch.tensor(v)}, None, 0)
        return watch

    assert fed([1.0, 0.9, 0.8, 0.7, 0.5, 0.4, 0.4, 0.3]).verdict() is None  # learning
    assert fed([1.0, 3.0, 2.0, 1.5, 9.0, 9.5, 9.9, 9.0]).verdict() is None  # below 10 x the first lowest (1.0)
    blown = fed([1.0, 1e9, 1e9, 1e9, 1e8, 1e8, 1e8, 1e8]).verdict()  # diverged at step 2, inside the first window
    assert blown == {"first_loss": 1.0, "last_loss": 1e8, "factor": 10.0, "window": 4}
    assert fed([1.0, 1e9]).verdict() is None  # fewer steps than a window: no verdict
    resumed = DivergenceWatch(window=4)  # a resumed run keeps the first window's lowest loss from its checkpoint
    resumed.load_state_dict(fed([0.5, 0.6, 0.7, 0.8]).state_dict())
    for v in (50.0, 60.0, 70.0, 80.0):
        resumed.on_train_batch_end(None, None, torch.tensor(v), None, 0)
    assert resumed.verdict() == {"first_loss": 0.5, "last_loss": 65.0, "factor": 10.0, "window": 4}
    early = DivergenceWatch(window=4)  # checkpointed after 2 of the first 4 steps: the other 2 still count
    early.load_state_dict(fed([0.9, 0.8]).state_dict())
    for v in (0.2, 0.7, 9.0, 9.0, 9.0, 9.0):
        early.on_train_batch_end(None, None, torch.tensor(v), None, 0)
    assert early.verdict() == {"first_loss": pytest.approx(0.2), "last_loss": 9.0, "factor": 10.0, "window": 4}


def _model_folder(path: Path) -> Path:
    from diffusers import DDPMScheduler

    from priorlab.models.io import save_denoiser

    return save_denoiser(perturbed_mlp(), DDPMScheduler(num_train_timesteps=1000), path, stage="base")


@pytest.mark.parametrize(("command", "key"), [("evaluate", "num_classes"), ("evaluate", "prediction_type"),
                                              ("train", "null_class"), ("train", "class_name")])  # fmt: skip
def test_a_priorlab_json_with_a_missing_key_is_one_line(tmp_path, command, key, cli):
    model = _model_folder(tmp_path / "base" / "model")
    meta = json.loads((model / "priorlab.json").read_text())
    del meta[key]
    (model / "priorlab.json").write_text(json.dumps(meta))
    before = files_under(tmp_path)
    if command == "evaluate":
        out = cli("evaluate", f"model={model}", "data=toy2d", "eval=tiny", cwd=tmp_path)
    else:
        out = cli("train", "study=f", "stage=finetune", f"base={model}", *TINY, "data.num_classes=4", cwd=tmp_path)
    one_line_error(out, f"{model / 'priorlab.json'} lacks {key}; restore the model folder or train it again")
    assert files_under(tmp_path / "base") == {k[5:]: v for k, v in before.items() if k.startswith("base/")}
    assert not (tmp_path / "base" / "eval").exists()
    no_run_folder(tmp_path, "f")


def test_priorlab_json_keys_are_checked_for_their_kind(tmp_path):
    from priorlab.errors import UserError
    from priorlab.models.io import check_meta

    good = {"class_name": "MLPDenoiser", "num_classes": 4, "null_class": 4, "prediction_type": "epsilon"}
    check_meta(good, tmp_path / "priorlab.json")
    for key, bad in [("class_name", "Nope"), ("class_name", []), ("num_classes", "4"), ("null_class", -1),
                     ("null_class", 5), ("prediction_type", None)]:  # fmt: skip
        with pytest.raises(UserError, match=key):
            check_meta({**good, key: bad}, tmp_path / "priorlab.json")


def _hf_source(tmp_path: Path, kind: str) -> Path:
    import datasets
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(4)]
    if kind in ("corrupt image", "huge image"):
        for c in ("a", "b"):
            (tmp_path / "imgs" / c).mkdir(parents=True)
            for i, image in enumerate(images):
                image.save(tmp_path / "imgs" / c / f"{i}.png")
        bad = b"\x89PNG\r\n\x1a\nnot an image"
        if kind == "huge image":  # a PNG header of 20,000 × 20,000 px (PIL refuses it on opening: a decompression bomb)
            ihdr = b"IHDR" + struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
            chunks = [ihdr, b"IDAT" + zlib.compress(b"\0"), b"IEND"]
            bad = b"\x89PNG\r\n\x1a\n" + b"".join(struct.pack(">I", len(c) - 4) + c + struct.pack(">I", zlib.crc32(c))
                                                 for c in chunks)  # fmt: skip
        (tmp_path / "imgs" / "a" / "bad.png").write_bytes(bad)
        return tmp_path / "imgs"
    labels = {"string labels": ["a", "b", "a", "b"], "null labels": [0, None, 1, 0], "a single row": [0],
              "float labels": [0.0, 0.5, 1.0, 1.0]}[kind]  # fmt: skip
    ds = datasets.Dataset.from_dict({"image": images[: len(labels)], "label": labels})
    ds.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "train.parquet"))
    return tmp_path / "train.parquet"


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("corrupt image", "bad.png cannot be read ("),
        ("huge image", "bad.png is too large to decode safely (Image size (400000000 pixels) exceeds limit"),
        ("string labels", "data.label_column='label' of {source}: row 0 holds 'a', not a class index"),
        ("null labels", "row 1 holds an empty cell, not a class index"),
        ("a single row", "split 'train' holds 1 row(s); training needs at least 2"),
        ("float labels", "row 1 holds 0.5, not a class index (a whole number)"),
    ],
)
def test_hf_data_mistakes_are_one_line(tmp_path, kind, message, cli):
    source = _hf_source(tmp_path, kind)
    out = cli("train", "study=hf", "data=hf", f"data.source={source}", "data.image_size=8", "model=unet_tiny",
                  *TINY[5:], cwd=tmp_path)  # fmt: skip
    one_line_error(out, message.format(source=source))
    no_run_folder(tmp_path, "hf")


def test_hf_whole_float_labels_are_class_indices(tmp_path):
    import datasets
    from PIL import Image

    from priorlab.data import HFDataModule

    images = [Image.new("RGB", (8, 8), (i * 40, 0, 0)) for i in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "label": [0.0, 1.0, 1.0, 0.0]})
    ds.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "train.parquet"))
    dm = HFDataModule(source=str(tmp_path / "train.parquet"), image_size=8, val_fraction=0.25)
    dm.setup()
    assert dm.num_classes == 2 and sorted(dm.all_data()[1].tolist()) == [0, 0, 1, 1]


def _results_csv(path: Path, kind: str) -> None:
    text = (RESULTS / "results.csv").read_text()
    header = text.split("\n", 1)[0]
    step = header.split(",").index("step")
    without_step = "\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != step) for line in text.split())
    path.write_text({"empty": "", "header only": header + "\n", "garbled": "\x00\x01,,\"\n\"\"x\n" + text[5000:7000],
                     "missing column": without_step + "\n"}[kind])  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("empty", "results.csv is empty; run the study's `priorlab study NAME` command again"),
        ("header only", "results.csv holds no rows, only its header"),
        ("garbled", "results.csv is not a readable results table (ParserError)"),
        ("missing column", "results.csv lacks the column(s) step"),
    ],
)
def test_report_on_a_broken_results_csv_is_one_line(tmp_path, kind, message, cli):
    study = tmp_path / "runs" / "s"
    study.mkdir(parents=True)
    shutil.copy(RESULTS / "study.json", study / "study.json")
    _results_csv(study / "results.csv", kind)
    before = files_under(study)
    one_line_error(cli("report", "runs/s", cwd=tmp_path), message)
    assert files_under(study) == before  # no figures, no report.md


def test_results_csv_cells_and_completeness_are_checked(tmp_path):
    from priorlab.analysis.results import load_results
    from priorlab.errors import UserError

    text = (RESULTS / "results.csv").read_text()
    lines = text.splitlines()
    for bad, match in [(lines[:1] + [lines[1].replace(",250,", ",x,")] + lines[2:], "line 2: step='x' is not a whole"),
                       (lines[:-1], "is incomplete: the last evaluation of")]:  # fmt: skip
        (tmp_path / "results.csv").write_text("\n".join(bad) + "\n")
        with pytest.raises(UserError, match=match):
            load_results(tmp_path)
    (tmp_path / "results.csv").write_text(text)
    assert len(load_results(tmp_path)) == len(lines) - 1


@pytest.mark.parametrize("command", ["report", "study"])
def test_a_garbled_study_json_is_one_line(tmp_path, command, cli):
    study = tmp_path / "runs" / "dropout_vs_prior"
    study.mkdir(parents=True)
    shutil.copy(RESULTS / "results.csv", study / "results.csv")
    (study / "study.json").write_text('{"name": "dropout_vs_prior", "pres')
    before = files_under(study)
    args = ["report", "runs/dropout_vs_prior"] if command == "report" else ["study", "dropout_vs_prior", "preset=tiny"]
    one_line_error(cli(*args, cwd=tmp_path), "study.json is not readable as a study record (JSONDecodeError)")
    assert files_under(study) == before


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """A tiny Stable Diffusion pipeline, a DDPMPipeline (a family priorlab does not know) and a priorlab MLP."""
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    import pipeline_models as pm

    root = tmp_path_factory.mktemp("pipes")
    torch.manual_seed(0)
    blocks = {"down_block_types": ("DownBlock2D",) * 2, "up_block_types": ("UpBlock2D",) * 2}
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, **blocks)  # fmt: skip
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(root / "ddpm")
    return {"sd": pm.stable_diffusion(root / "sd", seed=1), "ddpm": root / "ddpm", "mlp": _model_folder(root / "mlp")}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        (
            "mlp base",
            "base={mlp} is a priorlab MLPDenoiser over vectors of shape (2,) (toy2d); the prior of a pipeline "
            "must denoise its images or latents",
        ),
        ("unknown family", "DDPMPipeline is not a pipeline priorlab knows"),
    ],
)
def test_sample_mistakes_are_one_line(pipelines, tmp_path, case, message, cli):
    if case == "mlp base":
        args = [f"model={pipelines['sd']}", f"base={pipelines['mlp']}", "prompt=a cat"]
    else:
        args = [f"model={pipelines['ddpm']}", "prior=self"]
    out = cli("sample", *args, "num_steps=1", "height=16", "width=16", f"out={tmp_path / 'o'}", cwd=tmp_path)
    line = one_line_error(out, message.format(mlp=pipelines["mlp"]))
    assert "family=" not in line.split("In Python")[0]  # the command line takes no family= setting
    assert not list(tmp_path.iterdir())


@NO_GPU
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["train", "trainer=gpu", *TINY],
            "trainer.accelerator=gpu (trainer=gpu) but no CUDA GPU is visible; use trainer=cpu",
        ),
        (["evaluate", "model=runs/x", "device=cuda"], "device=cuda but no CUDA GPU is visible; use device=cpu"),
        (["sample", "model=x", "device=cuda", "out=o"], "device=cuda but no CUDA GPU is visible; use device=cpu"),
    ],
)
def test_a_gpu_asked_for_without_one_is_one_line(tmp_path, args, message, cli):
    one_line_error(cli(*args, cwd=tmp_path), message)
    assert not list(tmp_path.iterdir())


def read_only(monkeypatch, folder: Path) -> None:
    """Refuse, with EACCES, whatever would create, write or rename anything inside `folder`: a folder without write
    permission as any user but root sees it (root writes into one all the same, and the machines here run as root,
    so a chmod cannot make one). The calls refused are those that every write of Python's reaches: os.mkdir (under
    Path.mkdir and tempfile's folders), os.open (tempfile's files), open and io.open (Path.write_*), os.replace and
    os.rename."""
    folder = folder.resolve()

    def refuse(path) -> None:
        if folder in Path(os.path.abspath(os.fsdecode(path))).parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    def writes(mode: str = "r", flags: int = 0) -> bool:
        return bool(set(mode) & set("wax+")) or bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))

    def guard(real, check):
        def guarded(*args, **kwargs):
            check(*args, **kwargs)
            return real(*args, **kwargs)

        return guarded

    def opening(file, mode="r", *args, **kwargs):
        if isinstance(file, str | bytes | os.PathLike) and writes(mode):
            refuse(file)

    monkeypatch.setattr(os, "mkdir", guard(os.mkdir, lambda path, *a, **k: refuse(path)))
    monkeypatch.setattr(os, "open", guard(os.open, lambda path, flags, *a, **k: writes(flags=flags) and refuse(path)))
    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, guard(getattr(os, name), lambda src, dst, *a, **k: refuse(dst)))
    monkeypatch.setattr(io, "open", guard(io.open, opening))
    monkeypatch.setattr(builtins, "open", guard(builtins.open, opening))


def test_read_only_stands_in_for_a_folder_without_write_permission(tmp_path, monkeypatch):
    """The stand-in refuses every way of writing inside the folder, and nothing beside it."""
    import tempfile

    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "old").write_text("kept")
    read_only(monkeypatch, tmp_path / "ro")
    attempts = [lambda: (tmp_path / "ro" / "a").mkdir(), lambda: (tmp_path / "ro" / "b").write_text("x"),
                lambda: open(tmp_path / "ro" / "c", "a+"), lambda: tempfile.mkdtemp(dir=tmp_path / "ro"),
                lambda: tempfile.mkstemp(dir=tmp_path / "ro"),
                lambda: os.replace(tmp_path / "ro" / "old", tmp_path / "ro" / "new")]  # fmt: skip
    for attempt in attempts:
        with pytest.raises(PermissionError, match="Permission denied"):
            attempt()
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["old"]
    assert (tmp_path / "ro" / "old").read_text() == "kept"  # reading is allowed
    (tmp_path / "rw").mkdir()
    (tmp_path / "rw" / "f").write_text("x")  # beside it, writing is allowed


def _train_error_lines(monkeypatch, capsys, tmp_path: Path, study: str) -> list[str]:
    """`priorlab train study=STUDY` (tiny) in this process, in tmp_path: it must end with exit status 2 and no
    traceback; its `priorlab: error:` lines."""
    from priorlab import cli

    monkeypatch.delenv("PRIORLAB_COMMAND", raising=False)  # main sets it; put back after the test
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["priorlab", "train", f"study={study}", *TINY])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    return [ln for ln in err.splitlines() if ln.startswith("priorlab: error:")]


def test_a_read_only_output_folder_is_one_line(tmp_path, monkeypatch, capsys):
    """The runs folder is not writable: in-process (`read_only`), since root would write into a chmod-ed one."""
    (tmp_path / "runs").mkdir()
    read_only(monkeypatch, tmp_path / "runs")
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # train keeps this process's thread count
    lines = _train_error_lines(monkeypatch, capsys, tmp_path, "ro")
    assert lines == ["priorlab: error: cannot write runs/ro: Permission denied; make it writable, or write elsewhere "
                     "(paths.runs=, out=)"]  # fmt: skip
    assert not list((tmp_path / "runs").iterdir())


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_full_or_read_only_disk_is_one_line(tmp_path, monkeypatch, capsys, code):
    """The disk fills up (or turns read-only) as the run writes its config: in-process, with that write failing."""

    write_text = Path.write_text

    def failing(self, data, *args, **kwargs):
        if self.name in ("config.yaml", ".config.yaml.tmp"):  # written directly, or atomically via a temporary
            raise OSError(code, os.strerror(code), str(self))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)
    lines = _train_error_lines(monkeypatch, capsys, tmp_path, "full")
    assert lines == [f"priorlab: error: cannot write runs/full/base/config.yaml: {os.strerror(code)}; "
                     + ("free some space" if code == errno.ENOSPC else "make it writable")
                     + ", or write elsewhere (paths.runs=, out=)"]  # fmt: skip
    no_run_folder(tmp_path, "full")

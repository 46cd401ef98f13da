"""The CLI fuzzed: random overrides and corrupted files end with rc 0, or with rc 2 and one `priorlab: error:` line;
never with a traceback, and never with changed bytes in a run folder that the command was not meant to write.
The commands: train (dry runs and tiny real runs), evaluate, report, sample and export (on a tiny image model), and
study (dry runs, on the shipped experiments and on a corrupted copy of one).

Case i is drawn from random.Random(f"priorlab-fuzz-{i}") alone, so a failure names the case and its command line
and repeats on its own: `FUZZ_CASES=i-i pytest -m slow tests/test_fuzz.py -k many`. The default suite runs the
first FEW cases; `pytest -m slow tests/test_fuzz.py` runs MANY. The commands run in forks of one interpreter that
imported priorlab once (tests/cli_server.py: the `priorlab` executable's own `main`, its own folder, output and
exit status), so each starts in milliseconds instead of the ~5 s of importing Lightning.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import Server, _server, compose_cfg
from priorlab.study.spec import EXPERIMENTS_DIR

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results" / "dropout_vs_prior_gpu_first_preset"
FEW, MANY = 11, 240
TINY = ["data=toy2d", "data.num_samples=600", "model=mlp", "model.hidden=8", "model.depth=1", "logger=csv",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.batch_size=16",
        "callbacks.progress.metrics_every_n_steps=1"]  # fmt: skip
FINETUNE = "runs/t/finetune/p=0.1/seed=0"
IMAGES = "runs/img"  # a tiny class-conditional UNet base and fine-tune: `sample` and `export` refuse toy2d models
IMAGE_FT = f"{IMAGES}/finetune/p=0.1/seed=0"
# Case i is of kind KINDS[i % 15]; the first FEW (the default suite) hold every kind.
KINDS = ["dry", "real", "sample", "evaluate", "study", "report", "export", "dry", "corrupt", "sample", "real",
         "study", "report", "evaluate", "dry"]  # fmt: skip

# Values: the edges of numbers, wrong types, empty, quoting, unicode, interpolations, lists and mappings.
VALUES = ["-1", "-0.5", "0", "1", "2", "0.5", "1e308", "-1e308", "1e-300", str(10**30), "nan", "inf", "-inf",
          "abc", "", "''", "' '", "null", "true", "false", "[1,2]", "[]", "[a,b]", "{a:1}", "é", "日本語", "🙂",
          "${seed}", "${nope}", "a b", "x=y", "3,4", "'[1'", "-", "0x10", "1_000", ".5", "\\", "'", '"', "[[1]]",
          "${oc.env:HOME}", "tru", "None", "1.5e3", "-0"]  # fmt: skip
# Values for settings whose large values are valid but would run for hours or fill the memory: no large ones.
SMALL = [v for v in VALUES if v not in ("1e308", str(10**30), "inf", "1.5e3", "1_000", "0x10")] + ["3"]
SIZE_KEYS = ("max_steps", "num_samples", "hidden", "depth", "batch_size", "num_train_timesteps", "num_classes",
             "num_steps", "heldout", "calibration", "check_samples", "kid_subset", "grid_per_class", "bootstrap",
             "buckets", "warmup", "metrics_every_n_steps", "num_images", "num_frames", "height", "width", "fps",
             "calibration_size", "calibration_buckets")  # fmt: skip
REAL_KEYS = ["seed", "cond_dropout", "optimizer.lr", "optimizer.weight_decay", "trainer.max_steps",
             "trainer.val_check_interval", "trainer.limit_val_batches", "trainer.log_every_n_steps",
             "trainer.precision", "trainer.accelerator", "lr_schedule", "label_lr_scale",
             "diffusion.num_train_timesteps", "diffusion.beta_schedule", "diffusion.prediction_type",
             "diffusion.clip_sample", "model.hidden", "model.depth", "data.batch_size", "data.val_fraction",
             "data.num_samples", "data.num_classes", "data.radius", "data.std", "data.weights", "data.rotation",
             "data.seed", "data.split_seed", "data.train_per_class", "data.name", "callbacks.ema.decay",
             "callbacks.throughput.warmup", "channels_last", "stage", "base"]  # fmt: skip
EVAL_KEYS = ["eval.num_samples", "eval.num_steps", "eval.sampler", "eval.guidance_scales", "eval.priors",
             "eval.interval", "eval.batch_size", "eval.seed", "eval.buckets", "eval.heldout", "eval.calibration",
             "eval.calibration_objective", "eval.check_samples", "eval.kid_subset", "eval.per_class_fd",
             "eval.grid_scale", "eval.grid_per_class", "eval.features", "eval.bootstrap", "device",
             "prior_channels", "prior_weights", "base", "data", "model"]  # fmt: skip
# Valid values off the beaten track, half of the draws for these keys: they take a run past the checks, deeper.
PLAUSIBLE = {"seed": ["1", "4294967295"], "cond_dropout": ["0", "1", "0.999"], "optimizer.lr": ["1e-1", "10", "1e-9"],
             "optimizer.weight_decay": ["0.1", "1"], "trainer.max_steps": ["1", "3", "7"],
             "trainer.val_check_interval": ["1", "3", "100"], "trainer.limit_val_batches": ["0", "0.5", "1.0", "3"],
             "trainer.log_every_n_steps": ["1", "100"], "trainer.precision": ["bf16-mixed", "64-true", "16-true"],
             "trainer.accelerator": ["cpu", "auto"], "lr_schedule": ["cosine"], "label_lr_scale": ["10", "1e-6"],
             "diffusion.num_train_timesteps": ["2", "10"], "diffusion.beta_schedule": ["linear", "scaled_linear"],
             "diffusion.prediction_type": ["v_prediction", "sample"], "diffusion.clip_sample": ["true"],
             "model.hidden": ["1", "3"], "model.depth": ["1", "3"], "data.batch_size": ["1", "2", "600"],
             "data.val_fraction": ["0.01", "0.5", "0.99"], "data.num_samples": ["2", "3", "20"],
             "data.num_classes": ["1", "2", "30"], "data.radius": ["0", "-2", "100"], "data.std": ["1e-6", "10"],
             "data.weights": ["[1,0,0,0,0,0,0,0]", "[1,2]", "[0,0,0,0,0,0,0,0]"], "data.rotation": ["7", "-1e6"],
             "data.seed": ["3"], "data.split_seed": ["7"], "data.train_per_class": ["1", "2", "all", "1000"],
             "data.name": ["x", "'a/b'", "../up"], "callbacks.ema.decay": ["0", "1", "0.5"],
             "callbacks.throughput.warmup": ["0", "1"], "channels_last": ["true"],
             "eval.num_samples": ["1", "3"], "eval.num_steps": ["1", "2"],
             "eval.sampler": ["ddpm", "euler", "euler_a", "dpm", "unipc", "PNDMScheduler", "nope"],
             "eval.guidance_scales": ["[0]", "[1]", "[0,7.5]", "[1,1]"],
             "eval.priors": ["[self]", "[base]", "[auto,mix]", "[checked]", "[self,self]", "[none]"],
             "eval.interval": ["[0.1,5]", "[0,100]", "[5,0.1]"], "eval.batch_size": ["1", "7"], "eval.seed": ["3"],
             "eval.buckets": ["1", "3", "1000"], "eval.heldout": ["1", "5"], "eval.calibration": ["1", "5"],
             "eval.calibration_objective": ["null_loss"], "eval.check_samples": ["1", "4"],
             "eval.kid_subset": ["1", "2"], "eval.per_class_fd": ["true"], "eval.grid_scale": ["0", "2"],
             "eval.grid_per_class": ["1", "2"], "eval.features": ["inception", "dinov2"], "eval.bootstrap": ["0", "2"],
             "device": ["cpu", "auto", "cuda:0", "mps"], "prior_channels": ["[0,1]", "[0,2]", "[1,0]", "[0,5]"],
             "prior_weights": ["runs/st/study.json", "runs/t/base/model/config.json"],
             "base": ["runs/t", "runs/t/base/model", "runs/t/finetune/p=0.1/seed=0"]}  # fmt: skip
SAMPLE_KEYS = ["prior", "prior_weights", "calibration", "calibration_size", "calibration_buckets",
               "calibration_objective", "prompt", "negative_prompt", "image", "class_labels", "guidance_scale",
               "image_guidance_scale", "num_steps", "num_images", "num_frames", "height", "width", "seed", "compare",
               "out", "overwrite", "device", "dtype", "base_check", "base", "model"]  # fmt: skip
SAMPLE_PLAUSIBLE = {"prior": ["base", "self", "auto", "mix", "none"], "class_labels": ["[0]", "[3]", "[-1]", "[]"],
                    "guidance_scale": ["0", "1", "3", "-2"], "num_steps": ["1", "2"], "num_images": ["1", "2"],
                    "height": ["8", "16", "4"], "width": ["8", "12"], "seed": ["1", "4294967295"],
                    "compare": ["true"], "overwrite": ["true"], "device": ["cpu", "auto", "cuda", "mps"],
                    "dtype": ["float16", "bfloat16", "float64", "int8"], "base_check": ["false"],
                    "prior_weights": ["runs/st/study.json", f"{IMAGES}/base/model/config.json"],
                    "calibration": ["runs", f"{IMAGES}/base/model"], "calibration_buckets": ["1", "2"],
                    "calibration_objective": ["null_loss", "guided"], "image": [f"{IMAGES}/base/model/config.json"],
                    "base": [IMAGES, f"{IMAGES}/base/model", IMAGE_FT, "runs/t/base"],
                    "model": [f"{IMAGE_FT}/model", f"{IMAGES}/base", FINETUNE, "exported"],
                    "class_names": ["[a,b,c]", "[a]", "[a,a,a]", "[1,2,3]", "[]"]}  # fmt: skip
# Where `sample` and `export` may write: never a value that names a folder outside the case (${oc.env:HOME}).
OUTS = ["out", "'out/a b'", "'out/日本'", "''", "x=y", "runs_out", "."]
STUDY_KEYS = ["preset", "sweep.cond_dropout", "sweep.seed", "sweep.data.train_per_class", "sweep.nope", "base_steps",
              "finetune_steps", "base_seeds", "launcher", "jobs", "experiments", "extra", "name"]  # fmt: skip
STUDY_PLAUSIBLE = {"preset": ["tiny", "quick", "gpu", "full_dit", "nope"], "sweep.cond_dropout": ["[0,0.1]", "[2]"],
                   "sweep.seed": ["[0,1]", "[0,0]"], "sweep.data.train_per_class": ["[5,all]"],
                   "base_steps": ["1", "0"], "finetune_steps": ["1"], "base_seeds": ["[0,1]", "[0]", "[5]"],
                   "launcher": ["basic", "slurm"], "jobs": ["1", "2", "0"], "experiments": ["exp", "runs"],
                   "extra": ["[trainer=gpu]", "[data=mnist]", "[nope=1]"],
                   "name": ["cheap_prior", "exp/mine.yaml"]}  # fmt: skip
GROUPS = {"data": ["toy2d", "digits", "mnist", "hf"], "model": ["mlp", "unet_tiny", "dit_s", "unet_b"],
          "trainer": ["cpu", "ddp_cpu", "gpu", "ddp"], "callbacks": ["default", "eval"],
          "stage": ["base", "finetune"], "eval": ["default", "tiny"], "logger": ["csv", "default"]}  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished toy2d base and fine-tune with an evaluator (runs/t, runs/evaluators), a study folder with
    results.csv and study.json (runs/st), a tiny image base and fine-tune (runs/img) and a copy of an experiment
    (exp/mine.yaml), made once; each case works on its own copy."""
    root = tmp_path_factory.mktemp("fuzz_world")
    server = _server()  # the test process's shared CLI server
    for args in (["train", "study=t", *TINY], ["train", "study=t", "stage=finetune", "base=runs/t/base", *TINY],
                 ["evaluate", f"model={FINETUNE}", "base=runs/t/base", "eval=tiny", "progress=false"]):  # fmt: skip
        out = server.run(args, root)
        assert out["rc"] == 0, out["stderr"][-3000:]
    (root / "runs" / "st").mkdir()
    for name in ("results.csv", "study.json"):
        shutil.copy(RESULTS / name, root / "runs" / "st" / name)
    _image_runs(root)
    (root / "exp").mkdir()
    shutil.copy(EXPERIMENTS_DIR / "dropout_vs_prior.yaml", root / "exp" / "mine.yaml")
    yield root, server


def _image_runs(root: Path) -> None:
    """A base and a fine-tune of a tiny class-conditional UNet (1×8×8 images, 3 classes, untrained), saved as a
    study saves them. The fine-tune records its base by a relative path, so that in each case's copy the recorded
    base is the copy's (a damaged one is refused, not taken for another prior)."""
    import torch
    from diffusers import DDPMScheduler

    from priorlab.models import content_hash, save_denoiser, unet

    schedule = DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False)

    def build(seed: int):
        torch.manual_seed(seed)
        return unet((1, 8, 8), 3, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4).eval()

    base = save_denoiser(build(1), schedule, root / IMAGES / "base" / "model", stage="base", step=4)
    record = {"path": f"{IMAGES}/base/model", "sha256": content_hash(base)}
    save_denoiser(build(2), schedule, root / IMAGE_FT / "model", stage="finetune", step=4, base=record)


@dataclass
class Case:
    index: int
    kind: str
    args: list[str]
    allowed: list[str] = field(default_factory=list)  # path prefixes (relative to the case folder) it may write
    study: str | None = None  # train: runs/<study> must hold no run file after an error
    note: str = ""  # the corruption made
    watch: str = ""  # the folder (relative to the case folder) whose files are compared: all of it by default

    def describe(self) -> str:
        note = f" after {self.note}" if self.note else ""
        return f"case {self.index} ({self.kind}{note}): priorlab {' '.join(map(repr, self.args))}"


def _typo(rng: random.Random, key: str) -> str:
    i = rng.randrange(len(key))
    edit = rng.choice(["drop", "double", "swap", "replace"])
    if edit == "drop" and len(key) > 1:
        return key[:i] + key[i + 1 :]
    if edit == "double":
        return key[:i] + key[i] + key[i:]
    if edit == "swap" and i + 1 < len(key):
        return key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    return key[:i] + rng.choice("abcdefghijklmnopqrstuvwxyz_.") + key[i + 1 :]


def _override(rng: random.Random, key: str, values: list[str]) -> str:
    if rng.random() < 0.15:
        key = _typo(rng, key)
    prefix = rng.choices(["", "+", "++", "~"], weights=[85, 5, 5, 5])[0]
    if prefix == "~":
        return f"~{key}"
    return f"{prefix}{key}={rng.choice(values)}"


def _values(key: str, rng: random.Random, plausible: dict = PLAUSIBLE) -> list[str]:
    """The values to draw for `key` in a run that trains or evaluates: half of the time its plausible ones."""
    if key in plausible and rng.random() < 0.5:
        return plausible[key]
    return SMALL if key.rsplit(".", 1)[-1] in SIZE_KEYS else VALUES


def _command_overrides(rng: random.Random, keys: list[str], plausible: dict, most: int) -> list[str]:
    """Up to `most` overrides of `sample`, `export` or `study` keys; `out` only ever names a folder in the case,
    and no value reads the environment (a path from ${oc.env:HOME} would be the user's home)."""
    out = []
    for key in rng.sample(keys, rng.randint(0, most)):
        values = OUTS if key == "out" else [v for v in _values(key, rng, plausible) if "oc.env" not in v]
        out.append(_override(rng, key, values))
    return out


_KEYS: dict[tuple, list[str]] = {}


def _train_keys(choices: tuple[str, ...], tmp: Path) -> list[str]:
    """The dotted leaf keys of the train config with these config choices (composed once per choice)."""
    if choices not in _KEYS:
        try:
            cfg = compose_cfg(tmp, list(choices))
        except Exception:  # noqa: BLE001 - a choice that does not compose: the defaults' keys
            cfg = compose_cfg(tmp, [])
        from omegaconf import OmegaConf

        def walk(node, prefix=""):
            if isinstance(node, dict):
                for k, v in node.items():
                    yield from walk(v, f"{prefix}{k}.")
            else:
                yield prefix[:-1]

        _KEYS[choices] = [k for k in walk(OmegaConf.to_container(cfg, resolve=False)) if k != "dry_run"]
    return _KEYS[choices]


def _choices(rng: random.Random) -> list[str]:
    out = []
    for group, options in GROUPS.items():
        if rng.random() < 0.3:
            option = rng.choice(options)
            out.append(f"{group}={_typo(rng, option) if rng.random() < 0.1 else option}")
    return out


def dry_case(i: int, rng: random.Random, tmp: Path) -> Case:
    choices = _choices(rng)
    keys = _train_keys(tuple(choices), tmp)
    overrides = [_override(rng, k, VALUES) for k in rng.sample(keys, rng.randint(1, 3))]
    return Case(i, "dry", ["train", "dry_run=true", "study=t", *choices, *overrides])


def real_case(i: int, rng: random.Random, tmp: Path) -> Case:
    study = f"f{i}"
    overrides = []
    for key in rng.sample(REAL_KEYS, rng.randint(1, 2)):
        if key == "stage":
            overrides += ["stage=finetune", "base=runs/t/base"]
        elif key == "base":
            overrides += ["stage=finetune", f"base={rng.choice(['runs/t', 'runs/t/base/model', *VALUES])}"]
        else:
            overrides.append(_override(rng, key, _values(key, rng)))
    return Case(i, "real", ["train", f"study={study}", *TINY, *overrides], [f"runs/{study}"], study)


def evaluate_case(i: int, rng: random.Random, case_dir: Path) -> Case:
    note = ""
    if rng.random() < 0.5:
        files = [f"{FINETUNE}/model/priorlab.json", f"{FINETUNE}/model/config.json", f"{FINETUNE}/config.yaml",
                 f"{FINETUNE}/model/scheduler_config.json", f"{FINETUNE}/model/diffusion_pytorch_model.safetensors",
                 "runs/t/base/model/priorlab.json", "runs/t/base/model/config.json"]  # fmt: skip
        note = corrupt(rng, case_dir / rng.choice(files), case_dir)
    overrides = []
    for key in rng.sample(EVAL_KEYS, rng.randint(0, 2)):
        if key == "data":
            overrides.append(f"data={rng.choice(['toy2d', 'digits', 'mnist', 'toy2e'])}")
        else:
            overrides.append(_override(rng, key, _values(key, rng)))
    base = ["base=runs/t/base"] if rng.random() < 0.5 else []
    args = ["evaluate", f"model={FINETUNE}", "eval=tiny", "progress=false", *base, *overrides]
    return Case(i, "evaluate", args, [f"{FINETUNE}/eval", "runs/evaluators"], note=note)


def report_case(i: int, rng: random.Random, case_dir: Path) -> Case:
    note = ""
    if rng.random() < 0.8:
        note = corrupt(rng, case_dir / "runs/st" / rng.choice(["results.csv", "results.csv", "study.json"]), case_dir)
    args = ["report", "runs/st"]
    if rng.random() < 0.2:
        args.append(_override(rng, rng.choice(["study_dir", "dry_run", "name"]), VALUES))
    return Case(i, "report", args, ["runs/st/figures", "runs/st/report.md", "runs/st/.report.md.tmp"], note=note)


def _maybe_corrupt(rng: random.Random, case_dir: Path, p: float) -> str:
    """With probability p, one of the image runs' files damaged (`corrupt`); what was done, or ""."""
    if rng.random() >= p:
        return ""
    model, base = f"{IMAGE_FT}/model", f"{IMAGES}/base/model"
    files = [f"{model}/priorlab.json", f"{model}/config.json", f"{model}/scheduler_config.json",
             f"{model}/diffusion_pytorch_model.safetensors", f"{base}/priorlab.json",
             f"{base}/diffusion_pytorch_model.safetensors"]  # fmt: skip
    return corrupt(rng, case_dir / rng.choice(files), case_dir)


def sample_case(i: int, rng: random.Random, case_dir: Path) -> Case:
    note = _maybe_corrupt(rng, case_dir, 0.3)
    base = [f"base={IMAGES}/base"] if rng.random() < 0.7 else []
    args = ["sample", f"model={IMAGE_FT}", *base, "class_labels=[0,2]", "num_steps=2", "progress=false", "out=out",
            *_command_overrides(rng, SAMPLE_KEYS, SAMPLE_PLAUSIBLE, 3)]  # fmt: skip
    return Case(i, "sample", args, note=note, watch="runs")  # it may write anywhere in the case, but not in runs/


def export_case(i: int, rng: random.Random, case_dir: Path) -> Case:
    note = _maybe_corrupt(rng, case_dir, 0.3)
    model = rng.choice([IMAGE_FT, f"{IMAGES}/base/model", FINETUNE, IMAGES])
    overrides = _command_overrides(rng, ["out", "class_names", "overwrite", "model"], SAMPLE_PLAUSIBLE, 2)
    return Case(i, "export", ["export", f"model={model}", "out=exported", *overrides], note=note, watch="runs")


def study_case(i: int, rng: random.Random, case_dir: Path) -> Case:
    """A dry run (`dry_run` is never drawn): of a shipped experiment, or of a copy that may be damaged; sometimes
    with a setting of its runs. It writes nothing."""
    name = rng.choice(["dropout_vs_prior", "when_swap_pays", "paper_setting", "exp/mine.yaml", "exp/mine.yaml"])
    note = corrupt(rng, case_dir / name, case_dir) if name.endswith(".yaml") and rng.random() < 0.6 else ""
    overrides = _command_overrides(rng, STUDY_KEYS, STUDY_PLAUSIBLE, 3)
    if rng.random() < 0.3:
        overrides.append(_override(rng, rng.choice(_train_keys((), case_dir.parent)), SMALL))
    return Case(i, "study", ["study", name, "dry_run=true", *overrides], note=note)


def corrupt_case(i: int, rng: random.Random, case_dir: Path) -> Case:
    base = case_dir / "runs/t/base"
    files = ["model/priorlab.json", "model/config.json", "model/scheduler_config.json", "config.yaml",
             "model/diffusion_pytorch_model.safetensors", "checkpoints/last.ckpt"]  # fmt: skip
    note = corrupt(rng, base / rng.choice(files), case_dir)
    if rng.random() < 0.5:  # a fine-tune of the corrupted base: the base must stay as it is
        args = ["train", "study=n", "stage=finetune", "base=runs/t/base", *TINY]
        return Case(i, "corrupt", args, ["runs/n"], "n", note)
    (base / "done.json").unlink()  # the corrupted run is resumed
    allowed = ["runs/t/base", "runs/t/.base.lock"]
    return Case(i, "corrupt", ["train", "study=t", *TINY], allowed, note=f"{note}, resumed")


def corrupt(rng: random.Random, path: Path, root: Path) -> str:
    """Damage `path` in one of many ways; return what was done."""
    data = path.read_bytes()
    kinds = ["truncate", "garble", "empty", "junk"]
    if path.suffix == ".json":
        kinds += ["json_drop_key", "json_wrong_type", "json_not_object"] * 2
    if path.suffix == ".csv":
        kinds += ["csv_header_only", "csv_drop_column", "csv_bad_cell", "csv_few_rows", "csv_shuffle"] * 2
    if path.suffix == ".yaml":
        kinds += ["yaml_drop_data", "yaml_bad_target"]
    kind = rng.choice(kinds)
    if kind == "truncate":
        data = data[: rng.randrange(max(1, len(data)))]
    elif kind == "garble":
        data = bytearray(data)
        for _ in range(rng.randint(1, 20)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        data = bytes(data)
    elif kind == "empty":
        data = b""
    elif kind == "junk":
        data = rng.randbytes(rng.randint(1, 4096))
    elif kind.startswith("json"):
        obj = json.loads(data)
        if kind == "json_not_object" or not isinstance(obj, dict) or not obj:
            obj = rng.choice([[1, 2], "text", 3, None])
        elif kind == "json_drop_key":
            obj.pop(rng.choice(sorted(obj)))
        else:
            obj[rng.choice(sorted(obj))] = rng.choice(["x", -1, None, [], {}, 1.5, True])
        data = json.dumps(obj).encode()
    elif kind.startswith("csv"):
        lines = data.decode().splitlines()
        header, rows = lines[0], lines[1:]
        if kind == "csv_header_only":
            rows = []
        elif kind == "csv_drop_column":
            j = rng.randrange(len(header.split(",")))
            header, *rows = (",".join(c for n, c in enumerate(r.split(",")) if n != j) for r in [header, *rows])
        elif kind == "csv_bad_cell":
            for _ in range(rng.randint(1, 5)):
                r = rng.randrange(len(rows))
                cells = rows[r].split(",")
                cells[rng.randrange(len(cells))] = rng.choice(VALUES).replace(",", ";")
                rows[r] = ",".join(cells)
        elif kind == "csv_few_rows":
            rows = rng.sample(rows, rng.randint(1, min(len(rows), 20)))
        else:
            rng.shuffle(rows)
        data = "\n".join([header, *rows]).encode() + b"\n"
    elif kind == "yaml_drop_data":
        data = b"\n".join(line for line in data.split(b"\n") if not line.startswith(b"data:")) + b"\n"
    else:
        data = data.replace(b"priorlab.data.Toy2DDataModule", rng.choice([b"builtins.print", b"os.system", b"x"]))
    path.write_bytes(data)
    return f"{kind} of {path.relative_to(root)}"


def snapshot(root: Path, allowed: list[str]) -> dict[str, str]:
    """sha256 of every file under root except those below an allowed prefix."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and not any(rel == a or rel.startswith(a + "/") for a in allowed):
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def make_case(i: int, case_dir: Path) -> Case:
    rng = random.Random(f"priorlab-fuzz-{i}")
    kind = KINDS[i % len(KINDS)]
    if kind == "dry":
        return dry_case(i, rng, case_dir.parent)
    if kind == "real":
        return real_case(i, rng, case_dir.parent)
    builders = {"evaluate": evaluate_case, "report": report_case, "corrupt": corrupt_case, "sample": sample_case,
                "export": export_case, "study": study_case}  # fmt: skip
    return builders[kind](i, rng, case_dir)


def check_case(i: int, world: tuple[Path, Server], scratch: Path) -> tuple[str, int, float]:
    """Run case i in a copy of the world and assert its outcome; returns its kind, exit status and seconds."""
    root, server = world
    case_dir = scratch / f"case{i}"
    shutil.copytree(root, case_dir)
    case = make_case(i, case_dir)
    before = snapshot(case_dir / case.watch, case.allowed)
    out = server.run(case.args, case_dir, timeout=240)
    what = f"{case.describe()}\nrc={out['rc']}\nstderr: {out['stderr'][-2500:]}"
    assert out["rc"] in (0, 2), what
    assert "Traceback" not in out["stderr"] and "Traceback" not in out["stdout"], what
    errors = [line for line in out["stderr"].splitlines() if line.startswith("priorlab: error:")]
    assert len(errors) == (1 if out["rc"] == 2 else 0), what
    after = snapshot(case_dir / case.watch, case.allowed)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"{what}\nchanged outside {case.allowed}: {changed}"
    if out["rc"] == 2 and case.study:
        study = case_dir / "runs" / case.study
        left = [p.relative_to(case_dir).as_posix() for p in study.rglob("*") if p.is_file()] if study.exists() else []
        assert all(Path(p).name.startswith(".") and p.endswith(".lock") for p in left), f"{what}\nleft: {left}"
    shutil.rmtree(case_dir)
    if os.environ.get("FUZZ_VERBOSE"):
        print(f"{case.describe()} -> rc {out['rc']} {errors[0] if errors else ''}")
    return case.kind, out["rc"], out["seconds"]


def _cases(default: range) -> range:
    """FUZZ_CASES=a-b picks the cases a..b (inclusive), to repeat a failure."""
    spec = os.environ.get("FUZZ_CASES")
    if not spec:
        return default
    first, _, last = spec.partition("-")
    return range(int(first), int(last or first) + 1)


def run_cases(cases: range, world: tuple[Path, Server], scratch: Path) -> None:
    """Every case, then one assertion listing each failure."""
    failures, seconds, tally = [], 0.0, {}
    for i in cases:
        try:
            kind, rc, took = check_case(i, world, scratch)
            seconds += took
            tally[kind, rc] = tally.get((kind, rc), 0) + 1
        except AssertionError as err:
            failures.append(str(err))
    outcomes = ", ".join(f"{kind} rc {rc}: {n}" for (kind, rc), n in sorted(tally.items()))
    print(f"{len(cases)} cases, {len(failures)} failed, {seconds:.0f} s in the commands ({outcomes})")
    assert not failures, f"{len(failures)} of {len(cases)} cases failed:\n\n" + "\n\n".join(failures)


def test_fuzz_few(world, tmp_path):
    run_cases(_cases(range(FEW)), world, tmp_path)


@pytest.mark.slow
def test_fuzz_many(world, tmp_path):
    run_cases(_cases(range(MANY)), world, tmp_path)

"""Every config under configs/ composes and instantiates."""

import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from priorlab.models.denoiser import Denoiser
from priorlab.overrides import CONFIG_DIR

ROOT = Path(__file__).resolve().parent.parent

DATA_FOR_MODEL = {"mlp": "toy2d"}


def _options(group):
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


def test_every_group_has_options():
    for group in ("data", "model", "stage", "trainer", "callbacks", "logger", "paths"):
        assert _options(group), group


@pytest.mark.parametrize("model", _options("model"))
def test_model_configs_build_denoisers(compose_tmp, model):
    data = DATA_FOR_MODEL.get(model, "digits")
    overrides = [f"model={model}", f"data={data}"] + (["data.image_size=16"] if data == "digits" else [])
    cfg = compose_tmp(overrides)
    dm = instantiate(cfg.data)
    dm.setup()
    denoiser = instantiate(cfg.model)(sample_shape=dm.sample_shape, num_classes=dm.num_classes)
    assert isinstance(denoiser, Denoiser) and denoiser.null_class == dm.num_classes


@pytest.mark.parametrize("data", [d for d in _options("data") if d != "hf"])
def test_data_configs(compose_tmp, data, tmp_path):
    extra = []
    if data == "emoji":  # prepared from tarballs built here (`priorlab data emoji` fetches with npm)
        from emoji_fixture import build_tarballs
        from priorlab.data.emoji_prepare import prepare_emoji

        prepare_emoji(["twitter"], tmp_path / "emoji", size=8, tarballs=build_tarballs(tmp_path / "tarballs"))
        extra = [f"data.root={tmp_path / 'emoji'}", "data.image_size=8"]
    dm = instantiate(compose_tmp([f"data={data}", *extra]).data)
    dm.setup()
    assert len(dm.train_set) > 0


def test_hf_config_needs_a_source(compose_tmp, tmp_path):
    cfg = compose_tmp(["data=hf", f"data.source={tmp_path / 'missing'}"])
    assert cfg.data.image_column == "image"
    from priorlab.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        instantiate(cfg.data).setup()


@pytest.mark.parametrize("trainer", _options("trainer"))
def test_trainer_configs(compose_tmp, trainer):
    cfg = compose_tmp([f"trainer={trainer}"])
    if cfg.trainer.accelerator == "cpu":
        assert isinstance(instantiate(cfg.trainer, logger=False), L.Trainer)
    else:  # no GPU here: check the settings the GPU presets promise
        assert cfg.trainer.precision == "bf16-mixed" and cfg.channels_last and cfg.optimizer.fused
        # one GPU replays the compiled passes from CUDA graphs (faster on an H200, BENCHMARKS.md); DDP compiles
        # without them (unmeasured there)
        assert cfg.compile == {"gpu": "reduce-overhead", "ddp": True}[trainer]
    if "ddp" in trainer:
        assert cfg.trainer.strategy._target_ == "priorlab.training.ddp.DDPStrategy" and cfg.trainer.strategy.same_stream


@pytest.mark.parametrize("logger", _options("logger"))
def test_logger_and_callback_configs(compose_tmp, logger):
    cfg = compose_tmp([f"logger={logger}"])
    loggers = [instantiate(c) for c in cfg.logger.values()]
    assert loggers and all(isinstance(lg, L.pytorch.loggers.Logger) for lg in loggers)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    assert {type(c).__name__ for c in callbacks} >= {"AtomicCheckpoint", "EMA"}


@pytest.mark.parametrize("stage", _options("stage"))
def test_stage_run_folders(compose_tmp, stage):
    cfg = compose_tmp([f"stage={stage}", "cond_dropout=0.05", "seed=3", "study=s"])
    expected = {"base": "s/base", "finetune": "s/finetune/p=0.05/seed=3", "finetune_dit": "s/finetune/p=0.05/seed=3"}
    assert cfg.paths.run_dir.endswith(expected[stage])


@pytest.mark.parametrize("trainer", ["cpu", "gpu"])
def test_the_dit_finetune_preset_holds_the_papers_settings_over_the_hardware_preset(compose_tmp, trainer):
    """stage=finetune_dit: 20k steps at batch 64, lr 1e-4, 10% dropout (Phunyaphibarn et al. 2025, Sec. 5), whatever
    trainer=; the command line still overrides each."""
    cfg = compose_tmp(["stage=finetune_dit", f"trainer={trainer}", "base=somewhere"])
    assert cfg.stage.name == "finetune" and cfg.cond_dropout == 0.1 and cfg.trainer.max_steps == 20000
    assert cfg.data.batch_size == 64 and cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.0
    assert compose_tmp(["stage=finetune_dit", "trainer.max_steps=7", "cond_dropout=0.2"]).trainer.max_steps == 7


def _conv_with_grad(in_channels: int, grad_strides: tuple | None):
    """A channels-last convolution whose weight's gradient has the given strides (None: the weight's own)."""
    import torch

    conv = torch.nn.Conv2d(in_channels, 8, 3).to(memory_format=torch.channels_last)
    w = conv.weight
    strides = grad_strides or w.stride()
    conv.weight.grad = torch.empty_strided(w.shape, strides).copy_(torch.randn(w.shape))
    return conv


def test_layout_mismatches_tell_size_one_strides_from_another_element_order():
    """DDP warned "Grad strides do not match bucket view strides" for the one-channel first convolution, whose
    channels-last weight (9, 1, 3, 1) gets cuDNN's gradient as (9, 9, 3, 1): strides that differ only in a size-1
    dimension, the same bytes. A (8, 4, 3, 3) weight's gradient in the standard layout is another element order."""
    import torch

    from priorlab.training import ddp

    benign, real, own = _conv_with_grad(1, (9, 9, 3, 1)), _conv_with_grad(4, (36, 9, 3, 1)), _conv_with_grad(4, None)
    assert benign.weight.stride() == (9, 1, 3, 1) and real.weight.stride() == (36, 1, 12, 4)
    assert ddp.same_order(benign.weight.grad, benign.weight) and not ddp.same_order(real.weight.grad, real.weight)
    net = torch.nn.ModuleDict({"benign": benign, "real": real, "own": own, "untrained": torch.nn.Linear(2, 2)})
    assert ddp.layout_mismatches(net) == (["benign.weight"], ["real.weight"])


def test_ddp_strategy_silences_ddps_stride_warning_and_names_real_mismatches_once(monkeypatch):
    """The strategy replaces DDP's warning, which also fires for strides of size-1 dimensions, by its own check
    after the first backward pass: it names weights whose gradients lie in another element order, once."""
    import warnings

    import torch

    from priorlab.training import ddp

    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()  # from a known state: every warning shown, then the strategy's filter
        warnings.simplefilter("always")
        strategy = ddp.DDPStrategy()
        warnings.warn(f"{ddp.STRIDE_WARNING}. This may indicate grad was not created ...", UserWarning, stacklevel=1)
        warnings.warn("Grad norms are large", UserWarning, stacklevel=1)  # others still show
    assert [str(w.message) for w in caught] == ["Grad norms are large"]
    module = torch.nn.ModuleDict(
        {"benign": _conv_with_grad(1, (9, 9, 3, 1)), "real": _conv_with_grad(4, (36, 9, 3, 1))}
    )
    monkeypatch.setattr(ddp.DDPStrategy, "lightning_module", property(lambda self: module))
    with pytest.warns(UserWarning, match=r"gradients of 1 weights \(real.weight\) come back in another memory layout"):
        strategy.post_backward(torch.tensor(0.0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        strategy.post_backward(torch.tensor(0.0))  # checked once
        quiet = ddp.DDPStrategy()
        monkeypatch.setattr(ddp.DDPStrategy, "lightning_module", property(lambda self: module["benign"]))
        quiet.post_backward(torch.tensor(0.0))  # only size-1 strides differ: nothing to say
    assert caught == []


def test_ddp_strategy_wraps_on_the_current_stream_and_compresses_on_request(monkeypatch):
    """Lightning builds DDP inside a new side CUDA stream; priorlab's strategy builds it on the current one unless
    same_stream=false, and comm_hook picks a gradient compression hook by name (a wrong name is a UserError)."""
    import torch
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from priorlab.errors import UserError
    from priorlab.training import ddp

    class SideStream(Exception):
        pass

    def no_stream(*args, **kwargs):
        raise SideStream

    monkeypatch.setattr(torch.cuda, "Stream", no_stream)
    monkeypatch.setattr(ddp.DDPStrategy, "determine_ddp_device_ids", lambda self: [0])
    wrapped = []

    def fake_ddp(module, device_ids, **kwargs):
        wrapped.append((device_ids, kwargs))

    monkeypatch.setattr(ddp, "DistributedDataParallel", fake_ddp)
    module = torch.nn.Linear(2, 2)
    ddp.DDPStrategy(gradient_as_bucket_view=True)._setup_model(module)
    assert wrapped == [([0], {"gradient_as_bucket_view": True})]  # DDP's own arguments reach it
    with pytest.raises(SideStream):  # Lightning's own wrapping, kept behind same_stream=false
        ddp.DDPStrategy(same_stream=False)._setup_model(module)
    assert ddp.DDPStrategy(comm_hook="bf16")._ddp_comm_hook is default_hooks.bf16_compress_hook
    assert ddp.DDPStrategy()._ddp_comm_hook is None
    with pytest.warns(UserWarning, match="comm_hook=skip all-reduces nothing"):
        assert ddp.DDPStrategy(comm_hook="skip")._ddp_comm_hook is ddp.skip_allreduce_hook

    class Bucket:  # what DDP hands a hook: its flattened gradients
        def buffer(self):
            return grads

    grads = torch.arange(4.0)
    assert ddp.skip_allreduce_hook(None, Bucket()).wait() is grads  # nothing communicated, nothing changed
    with pytest.raises(UserError, match="comm_hook=int8 is not one of bf16, fp16"):
        ddp.DDPStrategy(comm_hook="int8")
    with pytest.raises(UserError, match="compiled_ddp=whole is not one of ddp_optimizer, no_optimization"):
        ddp.DDPStrategy(compiled_ddp="whole")
    import torch._dynamo

    monkeypatch.setattr(torch._dynamo.config, "optimize_ddp", True)
    monkeypatch.setattr(ddp.LightningDDP, "configure_ddp", lambda self: None)
    ddp.DDPStrategy(compiled_ddp="no_optimization").configure_ddp()
    assert torch._dynamo.config.optimize_ddp == "no_optimization"  # set before the module is first compiled
    on_cpu = ddp.DDPStrategy(comm_hook="bf16", parallel_devices=[torch.device("cpu")] * 2)
    with pytest.raises(UserError, match="comm_hook needs GPUs"):  # Lightning would skip the hook without a word
        on_cpu.configure_ddp()  # checked in the public hook, before DDP is built


def _declared() -> list:
    import tomllib
    from packaging.requirements import Requirement

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in [*meta["dependencies"], *meta["optional-dependencies"]["dev"]]]


def test_the_lock_file_pins_every_declared_dependency_inside_its_range():
    """requirements.lock (what make and CI install) is one environment the declared ranges admit, and the ranges
    admit the torch of the GPU machines (2.11) beside the locked CPU build."""
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    for req in _declared():
        assert canonicalize_name(req.name) in pins, f"{req.name} is declared but not locked"
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"{req} excludes the locked version"
    torch = next(r for r in _declared() if r.name == "torch")
    assert torch.specifier.contains("2.11.0") and torch.specifier.contains("2.13.0")
    assert not torch.specifier.contains("3.0.0")


def test_installing_priorlab_keeps_the_installed_torch_and_everything_else(tmp_path):
    """`pip install -e .` into an environment that already satisfies the ranges installs priorlab alone: no torch
    is replaced (a pinned torch would pull another build over the user's)."""
    report = tmp_path / "report.json"
    out = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-build-isolation",
                          "-e", f"{ROOT}[dev]", "--report", str(report), "-q"], capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    installs = [item["metadata"]["name"] for item in json.loads(report.read_text())["install"]]
    assert installs == ["priorlab"]

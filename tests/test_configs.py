"""Every config under configs/ composes and instantiates."""

from pathlib import Path

import lightning as L
import pytest
from hydra.utils import instantiate

from priorlab.cli import CONFIG_DIR
from priorlab.models.denoiser import Denoiser

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
def test_data_configs(compose_tmp, data):
    dm = instantiate(compose_tmp([f"data={data}"]).data)
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
        assert cfg.trainer.precision == "bf16-mixed"
    if "ddp" in trainer:
        assert cfg.trainer.strategy == "ddp"


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
    expected = {"base": "s/base", "finetune": "s/finetune/p=0.05/seed=3"}[stage]
    assert cfg.paths.run_dir.endswith(expected)

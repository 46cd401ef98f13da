"""Pins of the private Lightning names priorlab relies on (`priorlab.training.lightning_private`): an upgrade
that renames or removes one fails here, naming it."""

import importlib
import inspect

import pytest

from priorlab.training.lightning_private import PINNED


def _instance(cls, tmp_path):
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter
    from lightning.pytorch.strategies import DDPStrategy

    if issubclass(cls, DDPStrategy):
        return cls(find_unused_parameters=False)
    if issubclass(cls, ExperimentWriter):
        return cls(log_dir=str(tmp_path))
    if issubclass(cls, CSVLogger):
        return cls(save_dir=str(tmp_path))
    return cls()


@pytest.mark.parametrize(("owner", "name", "kind"), PINNED, ids=[f"{o.rsplit('.', 1)[1]}.{n}" for o, n, _ in PINNED])
def test_lightning_still_has_the_private_name(owner, name, kind, tmp_path):
    module, cls_name = owner.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), cls_name)
    if kind == "attribute":
        obj = _instance(cls, tmp_path)
        assert hasattr(obj, name), (
            f"Lightning's {owner} no longer sets {name}: update priorlab.training.lightning_private"
        )
        if name == "_ddp_kwargs":
            assert obj._ddp_kwargs == {"find_unused_parameters": False}
    else:
        method = getattr(cls, name, None)
        assert callable(method), (
            f"Lightning's {owner} no longer has {name}(): update priorlab.training.lightning_private"
        )
        params = tuple(inspect.signature(method).parameters)
        assert params == kind, f"Lightning's {owner}.{name} now takes {params}, priorlab calls it with {kind}"


def test_the_ema_and_the_checkpoint_use_the_public_hooks_they_name():
    """WeightAveraging copies its average at on_train_end (EMA calls it at fit end); CheckpointIO is what the
    strategy writes through (AtomicCheckpoint wraps it)."""
    from lightning.pytorch.callbacks import WeightAveraging
    from lightning.pytorch.strategies import Strategy

    assert "_copy_average_to_current" in inspect.getsource(WeightAveraging.on_train_end)
    assert "checkpoint_io.save_checkpoint" in inspect.getsource(Strategy.save_checkpoint)
    assert isinstance(inspect.getattr_static(Strategy, "checkpoint_io"), property)
    assert Strategy.checkpoint_io.fset is not None

"""Datamodules; every one yields (x, label) batches held in memory with a deterministic train/val split."""

from priorlab.data.base import TensorDataModule
from priorlab.data.digits import DigitsDataModule
from priorlab.data.emoji import EmojiDataModule
from priorlab.data.hf import HFDataModule
from priorlab.data.mnist import MNISTDataModule
from priorlab.data.toy2d import GaussianMixture, Toy2DDataModule

__all__ = [
    "DigitsDataModule",
    "EmojiDataModule",
    "GaussianMixture",
    "HFDataModule",
    "MNISTDataModule",
    "TensorDataModule",
    "Toy2DDataModule",
]

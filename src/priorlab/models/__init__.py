"""Denoisers on diffusers networks, their presets, and saving, loading and fine-tune initialisation."""

from priorlab.models.denoiser import Denoiser, drop_labels, label_tables
from priorlab.models.io import SavedModel, content_hash, init_from_base, load_denoiser, save_denoiser
from priorlab.models.presets import dit, mlp, unet

__all__ = [
    "Denoiser",
    "SavedModel",
    "content_hash",
    "dit",
    "drop_labels",
    "init_from_base",
    "label_tables",
    "load_denoiser",
    "mlp",
    "save_denoiser",
    "unet",
]

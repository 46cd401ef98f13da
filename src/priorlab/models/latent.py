"""Latent diffusion: a pipeline's VAE as the codec between a run's images and the latents its network denoises.

A base from a latent pipeline (a DiTPipeline's vae/, a diffusers `AutoencoderKL`; `models.pretrained`) is
fine-tuned in its latent space. The run holds one `Latent` codec:

- `encode_data` encodes the data set once, z = scaling_factor · mean of q(z | x) (the posterior's mean, so the
  cached latents are exact; DiT's own training draws from the posterior instead), and caches the latents on disk,
  keyed by the VAE's weights hash and the data's identity (its settings, image size, split): a second run on the
  same data and VAE reads them back, another VAE or other data encodes anew;
- `decode` maps samples back to images, x = VAE decoder(z / scaling_factor) (the scaling factor from the VAE's
  config, as DiTPipeline decodes), before the evaluator (`DecodingEvaluator`) and the sample grids see them.

The codec knows nothing of the network, so a text-conditioned UNet2DConditionModel's pipeline would use it as it is.
The fine-tune records the VAE (`vae_record`: folder and sha256) and evaluation and export load it from there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import Tensor
from torch.utils.data import TensorDataset

from priorlab.checks import read_json_object
from priorlab.errors import UserError
from priorlab.models.io import WEIGHTS, content_hash

VAE_DIR = "vae"


def vae_record(net_dir: Path, role: str = "base") -> dict | None:
    """The VAE of the pipeline holding `net_dir` ({"path", "sha256"}), or None where the pipeline has none."""
    folder = net_dir.parent / VAE_DIR
    if not (net_dir.parent / "model_index.json").is_file() or not folder.is_dir():
        return None
    config = read_json_object(folder / "config.json", "a diffusers VAE config", "save the pipeline again")
    if config.get("_class_name") != "AutoencoderKL":
        raise UserError(f"{role}={folder} holds a {config.get('_class_name')}; priorlab's latent bases take a "
                        "diffusers AutoencoderKL as their VAE")  # fmt: skip
    if not (folder / WEIGHTS).is_file():
        raise UserError(f"{role}={folder} has no {WEIGHTS}; save the pipeline with safe_serialization=True")
    return {"path": str(folder.resolve()), "sha256": content_hash(folder)}


class Latent:
    """The VAE codec of a latent run (module doc).

    Args:
        vae: the pipeline's AutoencoderKL.
        sha256: the hash of its weights file, which keys the latent cache.
        batch_size: images encoded or latents decoded at once.
    """

    def __init__(self, vae: AutoencoderKL, sha256: str, batch_size: int = 256):
        self.vae = vae.eval().requires_grad_(False)
        self.sha256 = sha256
        self.batch_size = batch_size
        self.scaling_factor = float(vae.config.scaling_factor)

    @classmethod
    def load(cls, record: dict, role: str = "base") -> Latent:
        """The codec of a recorded VAE ({"path", "sha256"}); a UserError when it is gone or its weights changed."""
        path = Path(str(record.get("path")))
        if not (path / WEIGHTS).is_file():
            raise UserError(f"{role}: its VAE {path} is gone; restore the pipeline folder it came from")
        sha = content_hash(path)
        if sha != record.get("sha256"):
            raise UserError(f"{role}: its VAE {path} has changed (sha256 {sha[:12]}, recorded "
                            f"{str(record.get('sha256'))[:12]}); restore the VAE it was trained with")  # fmt: skip
        try:
            vae = AutoencoderKL.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
        except Exception as err:  # truncated safetensors, keys that do not fit the config
            raise UserError(f"{role}: its VAE {path} could not be loaded ({type(err).__name__}: {err})") from err
        return cls(vae, sha)

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """Latents (N, c, h, w) of images (N, C, H, W) in [-1, 1]: the scaled posterior means."""
        device = next(self.vae.parameters()).device
        out = [self.vae.encode(b.to(device)).latent_dist.mean * self.scaling_factor for b in x.split(self.batch_size)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Images (N, C, H, W) of latents (N, c, h, w), in the data's range [-1, 1] (not clamped)."""
        device = next(self.vae.parameters()).device
        out = [self.vae.decode(b.to(device).float() / self.scaling_factor).sample for b in z.split(self.batch_size)]
        return torch.cat(out).to(z.device)

    def encode_data(self, datamodule, cache_dir: str | Path) -> Path:
        """Replace the datamodule's splits (train, full train, validation) by their latents, in place, read from the
        cache in `cache_dir` or encoded and written there; returns the cache file. The image splits stay in
        `datamodule.image_sets` (the evaluator is trained on images: `images_view`) and the codec in
        `datamodule.latent`."""
        shape, channels = tuple(datamodule.sample_shape), self.vae.config.in_channels
        if len(shape) != 3 or shape[0] != channels:
            raise UserError(f"the data gives samples of shape {shape} but the VAE takes images of {channels} "
                            f"channel(s), (C, H, W); choose image data of {channels} channel(s)")  # fmt: skip
        identity = {**datamodule.identity(), "split_seed": datamodule.split_seed,
                    "val_fraction": datamodule.val_fraction, "train_per_class": datamodule.train_per_class,
                    "vae_sha256": self.sha256}  # fmt: skip
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(cache_dir) / datamodule.name / f"{key}.pt"
        sets = {"train": datamodule.train_set, "full_train": datamodule.full_train_set, "val": datamodule.val_set}
        latents = _read_cache(path)
        if latents is None:
            latents = {name: self.encode(s.tensors[0]) for name, s in sets.items() if name != "train"}
            full = datamodule.train_per_class is None
            latents["train"] = latents["full_train"] if full else self.encode(sets["train"].tensors[0])
            _write_cache(path, latents, identity)
        datamodule.image_sets, datamodule.latent = sets, self
        datamodule.train_set, datamodule.full_train_set, datamodule.val_set = (
            TensorDataset(latents[name], s.tensors[1]) for name, s in sets.items())  # fmt: skip
        return path

    def to(self, device) -> Latent:
        self.vae.to(device)
        return self


def _read_cache(path: Path) -> dict[str, Tensor] | None:
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["latents"]
    except Exception:  # noqa: BLE001 - a truncated or foreign cache file is encoded again
        return None


def _write_cache(path: Path, latents: dict[str, Tensor], identity: dict) -> None:
    """Written to a temporary sibling, then renamed: a run killed while writing leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save({"latents": latents, "identity": json.dumps(identity, default=str)}, tmp)
    tmp.replace(path)


def check_same_latents(sha256: str | None, prior, role: str) -> None:
    """A prior of a latent model must denoise the latents of the same VAE (`sha256`: the model's VAE's hash, None
    for a pixel-space model); a prior that records another VAE is a UserError. One that records none (a priorlab or
    a VAE-less model of the latent shape) is taken as given."""
    theirs = (prior.meta.get("vae") or {}).get("sha256") if isinstance(prior.meta.get("vae"), dict) else None
    if sha256 is not None and theirs is not None and theirs != sha256:
        raise UserError(f"{role}={prior.path} denoises the latents of another VAE (sha256 {theirs[:12]}) than the "
                        f"model's ({sha256[:12]}); its predictions mean nothing in the model's latent space: pass a "
                        "prior of the same VAE")  # fmt: skip


def images_view(datamodule):
    """The datamodule as it was before `Latent.encode_data` (its image splits), for the evaluator; the datamodule
    itself where it holds images."""
    if getattr(datamodule, "latent", None) is None:
        return datamodule
    view = copy.copy(datamodule)
    view.train_set, view.full_train_set, view.val_set = datamodule.image_sets.values()
    view.latent = None
    return view


class DecodingEvaluator:
    """An evaluator of images (`evaluation.features.Evaluator`) that is given latents: each is decoded first, so
    every metric is measured on images. Its other attributes are the evaluator's."""

    def __init__(self, evaluator, latent: Latent):
        self.evaluator = evaluator
        self.latent = latent

    def embed(self, x: Tensor, batch_size: int = 1024) -> tuple[Tensor, Tensor]:
        return self.evaluator.embed(self.latent.decode(x), batch_size)

    def __getattr__(self, name: str):
        if name in ("evaluator", "latent"):
            raise AttributeError(name)
        return getattr(self.evaluator, name)

"""A text fine-tune (`models.text`) exported as a StableDiffusionPipeline folder that plain diffusers loads.

The folder holds the fine-tune's UNet, its training schedule as a DDIM scheduler, the text encoder and tokenizer of
the base it was fine-tuned from (recorded in its priorlab.json, checked by content hash) and, for a latent base, its
VAE (`models.latent`, checked by hash too), so that `StableDiffusionPipeline.from_pretrained(folder)` loads it. Its
classifier-free guidance with `negative_prompt=""` is the model's own ∅ branch, the embedding of "" that priorlab
trained with: the pipeline samples it as priorlab's prior=self does. A pixel-space fine-tune's folder has no VAE:
diffusers then needs `from_pretrained(folder, vae=None)`, `output_type="latent"` (the image in [-1, 1]) and a
height and width 8 times the image's (it divides them by a VAE's factor of 8 even without one). The model card
gives the conditioning dropout it was trained with and the call for its layout.

`priorlab sample` builds the same pipeline in memory (`text_pipeline`), where a pixel-space fine-tune gets a
`PixelCodec` in place of the VAE: the identity, with a scaling factor of 1 and no downsampling, so that
StableDiffusionPipeline samples it at its own size and returns its images as for a latent model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, DDIMScheduler, ModelMixin, StableDiffusionPipeline
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from torch import Tensor

from priorlab import atomic, checks
from priorlab.errors import UserError
from priorlab.models.hub import source_name
from priorlab.models.io import SavedModel
from priorlab.models.latent import Latent
from priorlab.models.text import TextDenoiser, encoder_hash, load_text_encoder


def text_pipeline(saved: SavedModel, pixel_codec: bool = False) -> StableDiffusionPipeline:
    """The StableDiffusionPipeline of a text fine-tune (module doc), its components the loaded model's (not copies):
    the UNet, the base's text encoder and tokenizer (checked by hash), its VAE or none, or with `pixel_codec` a
    `PixelCodec` for a pixel-space model."""
    denoiser: TextDenoiser = saved.denoiser
    pipeline = Path(str(denoiser.text_encoder.get("path"))).parent
    if not (pipeline / "model_index.json").is_file():
        raise UserError(f"model={saved.path} was trained with the text encoder of {pipeline}, which is gone; it is "
                        "needed to encode prompts (restore the base pipeline folder)")  # fmt: skip
    if encoder_hash(pipeline) != denoiser.text_encoder.get("sha256"):
        raise UserError(f"the text encoder in {pipeline} has changed since model={saved.path} was trained with it; "
                        "restore the base pipeline folder it was fine-tuned from")  # fmt: skip
    encoder, tokenizer = load_text_encoder(pipeline, role="base")
    vae = Latent.load(saved.meta["vae"], role=f"model={saved.path}").vae if saved.meta.get("vae") else None
    if vae is None and pixel_codec:
        vae = PixelCodec(denoiser.sample_shape[0])
    keep = {k: v for k, v in saved.scheduler.config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config({**keep, "prediction_type": denoiser.prediction_type})
    return StableDiffusionPipeline(vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=denoiser.net.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)  # fmt: skip


def export_text_pipeline(saved: SavedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write the StableDiffusionPipeline folder of a text fine-tune (module doc); returns `out`."""
    pipe = text_pipeline(saved)
    out = checks.output_folder(out, overwrite, saved.path)
    with atomic.folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "README.md").write_text(model_card(saved, out.name))
    return out


class PixelCodec(ModelMixin, ConfigMixin):
    """The identity in a VAE's place, for a pixel-space text fine-tune sampled with StableDiffusionPipeline: its
    latents are the images in [-1, 1]. `block_out_channels` of one entry makes the pipeline's VAE scale factor 1
    (2 ** (len − 1)), so it samples at the UNet's own size; a scaling factor of 1 leaves the samples as they are.

    Args:
        latent_channels: the image's channels.
    """

    @register_to_config
    def __init__(self, latent_channels: int = 3, scaling_factor: float = 1.0, block_out_channels: tuple = (1,)):
        super().__init__()
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # gives the codec a device and a dtype

    def encode(self, x: Tensor, return_dict: bool = True):
        """x itself as a posterior without spread (its mean and mode are x), as the calibration encoder asks."""
        posterior = DiagonalGaussianDistribution(torch.cat([x, torch.zeros_like(x)], 1), deterministic=True)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: Tensor, return_dict: bool = True, generator=None):
        """z itself: the samples are images."""
        return DecoderOutput(sample=z) if return_dict else (z,)


def model_card(saved: SavedModel, name: str) -> str:
    """A hub model card: the fine-tune, its base, its conditioning dropout, and how to load and sample it."""
    meta, d = saved.meta, saved.denoiser
    caption = (d.captions or ["a photo"])[0]
    if meta.get("vae"):
        kind, load = "latent diffusion model (with the base's VAE)", f'"{name}"'
        call = f'pipe("{caption}", negative_prompt="", guidance_scale=3.0, generator=generator).images[0]  # PIL'
    else:
        size = d.sample_shape[-1] * 8  # without a VAE diffusers still divides height and width by 8
        kind, load = "pixel-space diffusion model (no VAE)", f'"{name}", vae=None'
        call = (f'pipe("{caption}", negative_prompt="", guidance_scale=3.0, output_type="latent", height={size}, '
                f"width={size},\n           generator=generator).images  # (1, C, H, W) in [-1, 1]")  # fmt: skip
    base = meta.get("base") if isinstance(meta.get("base"), dict) else {}
    step = f", step {meta['step']}" if "step" in meta else ""
    return f"""---
library_name: diffusers
tags:
- priorlab
- text-to-image
- classifier-free-guidance
---

# {name}

A text-conditioned {kind} fine-tuned with priorlab, as a `StableDiffusionPipeline`.

- network: {d.class_name}, predicts {d.prediction_type}, trained on {d.num_classes} distinct captions{step}
- conditioning dropout: prompts replaced by "" with probability {meta.get("cond_dropout")}
- fine-tuned from `{source_name(base)}` (weights sha256 {str(base.get("sha256"))[:12]}); text encoder from it
- exported from the priorlab model folder `{saved.path}`

```python
import torch
from diffusers import StableDiffusionPipeline

pipe = StableDiffusionPipeline.from_pretrained({load})
generator = torch.Generator().manual_seed(0)
out = {call}
```

With priorlab installed, `priorlab evaluate model=RUN base=BASE` compares guidance with this model's own ∅ branch
against the base's (Phunyaphibarn et al. 2025, "Unconditional Priors Matter!").
"""

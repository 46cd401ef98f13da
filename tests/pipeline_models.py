"""Tiny random-weight diffusers pipelines, shaped like the real ones, built from configs and saved locally."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def tokenizer(folder: Path, max_length: int = 16):
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits + " .,!?'-":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)


def text_encoder(seed: int, vocab_size: int = 88):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
            projection_dim=32,
        )
    ).eval()


def vae(seed: int = 0, scaling_factor: float = 0.18215, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=16,
        scaling_factor=scaling_factor,
    ).eval()


def unet(seed: int, in_channels: int = 4, cross_attention_dim: int = 32):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    ).eval()


TINY_3D = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(8, 16),
    norm_num_groups=4,
    attention_head_dim=2,
    down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
    up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
    cross_attention_dim=32,
)


def unet3d(seed: int):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(**TINY_3D).eval()


def dit(seed: int, num_classes: int = 1000, sample_size: int = 8):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=num_classes,
    ).eval()


def scheduler(prediction_type: str = "epsilon", beta_schedule: str = "scaled_linear"):
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def image_variation_parts(seed: int):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=32,
            patch_size=4,
            projection_dim=32,
        )
    ).eval()
    return encoder, CLIPImageProcessor(crop_size=32, size={"shortest_edge": 32})


def stable_diffusion(
    folder: Path,
    seed: int,
    prediction_type: str = "epsilon",
    beta_schedule: str = "scaled_linear",
    scaling_factor: float = 0.18215,
) -> Path:
    from diffusers import StableDiffusionPipeline

    return _text_pipeline(StableDiffusionPipeline, folder, seed, unet(seed), scheduler(prediction_type, beta_schedule),
                          vae(0, scaling_factor))  # fmt: skip


def instruct_pix2pix(folder: Path, seed: int) -> Path:
    from diffusers import StableDiffusionInstructPix2PixPipeline

    return _text_pipeline(StableDiffusionInstructPix2PixPipeline, folder, seed, unet(seed, in_channels=8))


def _text_pipeline(cls, folder: Path, seed: int, net, sched=None, autoencoder=None) -> Path:
    """A Stable-Diffusion-layout pipeline (CLIP text encoder and tokenizer, no safety checker), saved to folder."""
    pipe = cls(vae=autoencoder or vae(0), text_encoder=text_encoder(seed + 1), tokenizer=tokenizer(folder / "_tok"),
               unet=net, scheduler=sched or scheduler(), safety_checker=None, feature_extractor=None,
               requires_safety_checker=False)  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


def dit_pipeline(folder: Path, seed: int, num_classes: int = 1000, sample_size: int = 8) -> Path:
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=dit(seed, num_classes, sample_size), vae=vae(0), scheduler=scheduler())
    pipe.save_pretrained(folder)
    return folder


def image_variation(folder: Path, seed: int) -> Path:
    from diffusers import StableDiffusionImageVariationPipeline

    encoder, processor = image_variation_parts(seed + 1)
    pipe = StableDiffusionImageVariationPipeline(
        vae=vae(0),
        image_encoder=encoder,
        unet=unet(seed),
        scheduler=scheduler(),
        safety_checker=None,
        feature_extractor=processor,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


def text_to_video(folder: Path, seed: int) -> Path:
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline(
        vae=vae(0),
        text_encoder=text_encoder(seed + 1),
        tokenizer=tokenizer(folder / "_tok"),
        unet=unet3d(seed),
        scheduler=scheduler(),
    )
    pipe.save_pretrained(folder)
    return folder


def image(seed: int = 0, size: int = 32):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def i2vgen_unet(seed: int):
    from diffusers import I2VGenXLUNet

    torch.manual_seed(seed)
    return I2VGenXLUNet(**TINY_3D).eval()


def pixart(folder: Path, seed: int) -> Path:
    """A PixArt-α-shaped pipeline: a T5 encoder (here with the tiny CLIP tokenizer's ids) and a PixArt transformer."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=88, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)).eval()
    net = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        cross_attention_dim=16,
        caption_channels=32,
        norm_num_groups=4,
    ).eval()
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer(folder / "_tok"), text_encoder=encoder, vae=vae(0), transformer=net, scheduler=scheduler()
    )
    pipe.save_pretrained(folder)
    return folder


def unconditional_unet_folder(folder: Path, seed: int, in_channels: int = 3) -> Path:
    """A bare diffusers model folder: an unconditional UNet2DModel with its scheduler config beside it."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    net = UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
    )
    net.save_pretrained(folder)
    scheduler().save_pretrained(folder)
    return folder

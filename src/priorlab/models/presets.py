"""Builders of denoisers from config; the data decides sample shape and number of classes.

Configs under configs/model/ name one of these with `_partial_: true`; training calls the partial with
`sample_shape` and `num_classes` once the datamodule is set up. The null class is row `num_classes`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from diffusers import DiTTransformer2DModel, UNet2DModel
from torch import nn

from priorlab.checks import is_list, whole
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser
from priorlab.models.mlp import MLPDenoiser


def _image_shape(sample_shape: Sequence[int], model: str) -> tuple[int, int]:
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise UserError(f"model={model} needs square images (C, H, W), but the data gives {tuple(sample_shape)}")
    return sample_shape[0], sample_shape[1]


def _sizes(**sizes) -> None:
    """Each model.<key> size must be a whole number ≥ 1 (lists: each entry)."""
    for key, value in sizes.items():
        if is_list(value):
            if not value:
                raise UserError(f"model.{key}=[] needs at least one entry")
            for v in value:
                whole(v, f"model.{key}", 1)
        else:
            whole(value, f"model.{key}", 1)


def _build(cls: Callable[..., nn.Module], **kwargs) -> nn.Module:
    """The network, or a UserError with the reason diffusers refused the model.* settings."""
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, RuntimeError, ZeroDivisionError) as err:
        raise UserError(f"model: {cls.__name__} refused these settings ({type(err).__name__}: {err}); change the "
                        "model.* overrides") from err  # fmt: skip


def unet(
    sample_shape: Sequence[int],
    num_classes: int,
    block_out_channels: Sequence[int] = (32, 64),
    attention: Sequence[bool] = (False, True),
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    attention_head_dim: int = 8,
    prediction_type: str = "epsilon",
    time_scale_shift: str = "default",
) -> Denoiser:
    """A class-conditional UNet2DModel; `attention[i]` puts self-attention at resolution level i.

    The class row is added to the time embedding, which each ResNet block turns into a per-channel bias
    (`time_scale_shift=default`) or into a scale and a shift of its GroupNorm output (`scale_shift`, the
    adaptive group norm of Dhariwal & Nichol 2021).
    """
    channels, size = _image_shape(sample_shape, "unet")
    _sizes(block_out_channels=block_out_channels, layers_per_block=layers_per_block, norm_num_groups=norm_num_groups,
           attention_head_dim=attention_head_dim)  # fmt: skip
    if not is_list(attention) or not all(isinstance(a, bool) for a in attention):
        raise UserError(f"model.attention={attention!r} must be a list of true/false, one per block_out_channels")
    if time_scale_shift not in ("default", "scale_shift"):
        raise UserError(f"model.time_scale_shift={time_scale_shift!r} is unknown; use default or scale_shift")
    if len(attention) != len(block_out_channels):
        raise UserError("model.attention needs one flag per entry of model.block_out_channels")
    if size % 2 ** (len(block_out_channels) - 1):
        raise UserError(f"image size {size} is not divisible by 2^{len(block_out_channels) - 1}; use fewer levels")
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    net = _build(
        UNet2DModel,
        sample_size=size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=down,
        up_block_types=up,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        num_class_embeds=num_classes + 1,
        resnet_time_scale_shift=time_scale_shift,
    )
    return Denoiser(net, num_classes, null_class=num_classes, prediction_type=prediction_type)


def dit(
    sample_shape: Sequence[int],
    num_classes: int,
    num_layers: int = 2,
    num_attention_heads: int = 2,
    attention_head_dim: int = 16,
    patch_size: int = 2,
    prediction_type: str = "epsilon",
) -> Denoiser:
    """A class-conditional DiTTransformer2DModel (adaLN-Zero; null class = row num_classes, as in DiT)."""
    channels, size = _image_shape(sample_shape, "dit")
    _sizes(num_layers=num_layers, num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim,
           patch_size=patch_size)  # fmt: skip
    if size % patch_size:
        raise UserError(f"image size {size} is not divisible by model.patch_size={patch_size}")
    net = _build(
        DiTTransformer2DModel,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=channels,
        out_channels=channels,
        num_layers=num_layers,
        sample_size=size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes,
    )
    return Denoiser(net, num_classes, null_class=num_classes, prediction_type=prediction_type)


def mlp(
    sample_shape: Sequence[int],
    num_classes: int,
    hidden: int = 256,
    depth: int = 4,
    prediction_type: str = "epsilon",
) -> Denoiser:
    """The residual MLP for vector data such as toy2d."""
    if len(sample_shape) != 1:
        raise UserError(f"model=mlp takes vector data, but the data gives samples of shape {tuple(sample_shape)}")
    _sizes(hidden=hidden, depth=depth)
    net = _build(MLPDenoiser, dim=sample_shape[0], num_class_embeds=num_classes + 1, hidden=hidden, depth=depth)
    return Denoiser(net, num_classes, null_class=num_classes, prediction_type=prediction_type)

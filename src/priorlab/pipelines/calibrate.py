"""Fitting the fitted priors' weights for a diffusers pipeline, on the user's calibration latents.

`fit_pipeline_weights` queries the pipeline's fine-tuned network θ (its ∅ branch and, for the guided objective, each
latent's own condition) and the prior network ψ on noised calibration latents, and fits `priorlab.priors.PriorWeights`
(`priorlab.priors.fit_weights`) for `swap_prior` with a `MixPrior`. `model_conditions` and `model_null_condition`
build θ's conditions as the pipeline itself does; `encode_images` turns calibration images into latents.
"""

from __future__ import annotations

import torch
from torch import Tensor

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.pipelines.families import Family, family_of
from priorlab.pipelines.swap import model_null_class
from priorlab.priors import PriorNet, PriorWeights, fit_weights

CALIBRATED_FAMILIES = ("text-to-image", "image-to-image", "instruct-pix2pix", "dit", "image-variation",
                      "image-conditioned", "text-to-video", "class-conditional")  # fmt: skip


@torch.no_grad()
def fit_pipeline_weights(pipe, prior_net: PriorNet, latents: Tensor, null_kwargs: dict, prior: str = "auto",
                         buckets: int = 10, seed: int = 0, family: Family | None = None, batch_size: int = 16,
                         objective: str = "null_loss", cond_kwargs: dict | None = None,
                         scales: list[float] | None = None,
                         image_scale: float | None = None) -> PriorWeights:  # fmt: skip
    """Fit prior=auto|mix weights for a pipeline's θ against ψ on the user's calibration latents.

    With objective="guided" the weights minimise the loss of the guided prediction at each of `scales`
    (`priorlab.priors.fitting`), which needs each latent's own condition: `cond_kwargs`, the keyword arguments of θ
    with a leading dimension of N (`model_conditions` builds them from texts, class labels or images). For models
    that take the condition's image latents as extra input channels (InstructPix2Pix, Zero-1-to-3), cond_kwargs
    holds them under "image_latents" (N, extra, H, W); InstructPix2Pix's two-condition guidance also needs the
    `image_scale` (its image_guidance_scale), and its rows are fitted per text scale at that image scale.

    Args:
        latents: clean latents x0 of the fine-tuning domain (N, C, H, W), for video (N, C, F, H, W), at the
            resolution that will be sampled, already scaled by the VAE's scaling factor (`encode_images` does this
            for images; for video, encode the frames and stack them on dim 2).
        null_kwargs: θ's null condition for one sample (`model_null_condition` gives the pipeline's own).
            Input channels beyond the latent (InstructPix2Pix's, Zero-1-to-3's image latents) are zeros, their ∅.
        prior: "auto" or "mix"; buckets: timestep buckets; seed: of the calibration noise and timesteps;
        batch_size: latents per forward pass.
    """
    family = family or family_of(pipe)
    _check_calibration(pipe, family, latents, objective, cond_kwargs, scales, image_scale)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(pipe.scheduler.alphas_cumprod), (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    guided = objective == "guided"
    eps = _calibration_eps(pipe, family, prior_net, latents, t, noise, null_kwargs, cond_kwargs if guided else None,
                           batch_size)  # fmt: skip
    extra_args = {"eps_cond": eps["cond"], "scales": list(scales)} if guided else {}
    if "image" in eps:
        extra_args.update(eps_image=eps["image"], image_scale=float(image_scale))
    return fit_weights(eps["self"], eps["base"], noise, t, len(pipe.scheduler.alphas_cumprod), buckets, prior,
                       objective, **extra_args)  # fmt: skip


def _check_calibration(pipe, family: Family, latents: Tensor, objective: str, cond_kwargs: dict | None,
                       scales: list[float] | None, image_scale: float | None) -> None:  # fmt: skip
    """What `fit_pipeline_weights` needs: a family it supports, latents of its rank, and for the guided objective
    each latent's condition (with its image latents where θ takes them as input channels) and the scales."""
    if family.name not in CALIBRATED_FAMILIES or family.component != "unet" and not family.class_labels:
        raise UserError(f"fitting prior=auto|mix weights is not supported for {family.name} pipelines "
                        f"({type(pipe).__name__}) yet; use prior=base or prior=self")  # fmt: skip
    if latents.ndim != (5 if family.video else 4):
        shape = "(N, C, F, H, W)" if family.video else "(N, C, H, W)"
        raise UserError(f"calibration latents of a {family.name} model must be {shape}; got {tuple(latents.shape)}")
    if objective != "guided":
        return
    if not cond_kwargs or not scales:
        raise UserError("the guided objective needs each calibration latent's condition (cond_kwargs) and the "
                        "guidance scales to fit at")  # fmt: skip
    if any(len(v) != len(latents) for v in cond_kwargs.values()):
        raise UserError(f"cond_kwargs must hold one condition per calibration latent ({len(latents)})")
    extra = int(getattr(pipe, family.component).config.in_channels) - latents.shape[1]
    image_latents = cond_kwargs.get("image_latents")
    want = (extra, *latents.shape[2:])
    if extra > 0 and (image_latents is None or tuple(image_latents.shape[1:]) != want):
        raise UserError(f"{type(pipe).__name__} takes its condition's image latents as {extra} extra input channels: "
                        f"give cond_kwargs['image_latents'] of shape (N, {', '.join(map(str, want))}) "
                        "(model_conditions builds them from each latent's condition image)")  # fmt: skip
    if family.name == "instruct-pix2pix" and image_scale is None:
        raise UserError("InstructPix2Pix guides with two scales: give the image_guidance_scale to fit at")


def _calibration_eps(pipe, family: Family, prior_net: PriorNet, latents: Tensor, t: Tensor, noise: Tensor,
                     null_kwargs: dict, cond_kwargs: dict | None, batch_size: int) -> dict[str, Tensor]:  # fmt: skip
    """On x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, as eps on the CPU: θ's ∅ prediction ("self"), ψ's ("base"),
    and with `cond_kwargs` θ's conditional one ("cond") and, for InstructPix2Pix, θ's with the image condition and
    the null text ("image")."""
    net = getattr(pipe, family.component)
    param = next(net.parameters())
    abar = pipe.scheduler.alphas_cumprod.float().to(param.device)
    extra = int(net.config.in_channels) - latents.shape[1]
    cond_kwargs = None if cond_kwargs is None else dict(cond_kwargs)
    image_latents = None if cond_kwargs is None else cond_kwargs.pop("image_latents", None)
    two = cond_kwargs is not None and family.name == "instruct-pix2pix"
    out: dict[str, list[Tensor]] = {"self": [], "base": [], **({"cond": []} if cond_kwargs is not None else {}),
                                    **({"image": []} if two else {})}  # fmt: skip

    def own_eps(x_t, channels, tb, kwargs):
        inp = x_t if extra <= 0 else torch.cat([x_t, channels], dim=1)
        pred = net(inp.to(param.dtype), tb, **kwargs, return_dict=False)[0][:, : latents.shape[1]].float()
        return diffusion.to_eps(pred, pipe.scheduler.config.prediction_type, x_t, abar[tb]).cpu()

    for start in range(0, len(latents), batch_size):
        rows = slice(start, start + batch_size)
        tb = t[rows].to(param.device)
        x_t = diffusion.add_noise(latents[rows].to(param.device).float(), noise[rows].to(param.device), abar[tb])
        none = x_t.new_zeros((len(x_t), max(extra, 0), *x_t.shape[2:]))  # the ∅ of image latents
        null = {k: v.expand(len(x_t), *v.shape[1:]) for k, v in null_kwargs.items()}
        out["self"].append(own_eps(x_t, none, tb, null))
        if cond_kwargs is not None:
            channels = none if image_latents is None else image_latents[rows].to(param.device, x_t.dtype)
            cond = {k: v[rows].to(param.device) for k, v in cond_kwargs.items()}
            out["cond"].append(own_eps(x_t, channels, tb, cond))
            if two:  # eps_θ(x_t, c_I, ∅): the image condition with the null text
                out["image"].append(own_eps(x_t, channels, tb, null))
        out["base"].append(prior_net.eps(x_t, abar[tb]).cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def model_conditions(pipe, family: Family | None = None, texts: list[str] | None = None,
                     labels: list[int] | None = None, images: list | None = None,
                     size: tuple[int, int] | None = None) -> dict:  # fmt: skip
    """θ's condition for each calibration image, as the pipeline builds it for its conditional chunk, with a leading
    dimension N: the prompt embeddings of `texts` (text-conditioned families), the class `labels` (DiT), the
    image embeddings of `images` (image variation: each calibration image is its own condition), or for
    InstructPix2Pix the embeddings of the edit `texts` and the image latents of the input `images` (PIL) at
    `size` (height, width: the calibration latents' pixel size), unscaled as the pipeline makes them."""
    family = family or family_of(pipe)
    net = getattr(pipe, family.component)
    param = next(net.parameters())
    if family.name == "instruct-pix2pix":
        if texts is None or images is None or len(texts) != len(images):
            raise UserError(f"{type(pipe).__name__} is conditioned on an input image and an edit text: give each "
                            "calibration image (the edited one) both")  # fmt: skip
        embeds = torch.cat([pipe._encode_prompt(text, param.device, 1, False) for text in texts])
        height, width = size or (images[0].height, images[0].width)
        return {"encoder_hidden_states": embeds, "image_latents": _image_latents(pipe, images, height, width)}
    if family.name == "image-variation" and family.component == "unet" and hasattr(pipe, "_encode_image"):
        if images is None:
            raise UserError(f"{type(pipe).__name__} is conditioned on an image: give the calibration images")
        return {"encoder_hidden_states": torch.cat([pipe._encode_image(im, param.device, 1, False) for im in images])}
    if family.class_labels:
        if labels is None:
            raise UserError(f"{type(pipe).__name__} is conditioned on class labels: give each calibration image "
                            "its label")  # fmt: skip
        return {"class_labels": torch.tensor([int(v) for v in labels], device=param.device)}
    if family.name in ("text-to-image", "image-to-image", "text-to-video") and hasattr(pipe, "encode_prompt"):
        if texts is None:
            raise UserError(f"{type(pipe).__name__} is conditioned on text: give each calibration image its text")
        embeds = [pipe.encode_prompt(text, param.device, 1, False)[0] for text in texts]
        return {"encoder_hidden_states": torch.cat(embeds)}
    raise UserError(f"the guided calibration objective is not supported for {family.name} pipelines "
                    f"({type(pipe).__name__}) yet; use calibration_objective=null_loss")  # fmt: skip


@torch.no_grad()
def model_null_condition(pipe, family: Family | None = None, negative_prompt: str = "") -> dict:
    """θ's null condition as the pipeline itself builds it for the unconditional chunk, for one sample."""
    family = family or family_of(pipe)
    net = getattr(pipe, family.component)
    param = next(net.parameters())
    if family.class_labels:
        null = model_null_class(net) if family.pipeline_null is not None else int(pipe.config.null_class)
        return {"class_labels": torch.tensor([null], device=param.device)}
    if family.component == "unet" and family.name == "image-variation":
        return {"encoder_hidden_states": torch.zeros(1, 1, net.config.cross_attention_dim, device=param.device,
                                                     dtype=param.dtype)}  # fmt: skip
    if family.name == "instruct-pix2pix":
        return {"encoder_hidden_states": pipe._encode_prompt(negative_prompt, param.device, 1, False)}
    if family.name in ("text-to-image", "image-to-image", "image-conditioned", "text-to-video") and hasattr(
        pipe, "encode_prompt"
    ):
        return {"encoder_hidden_states": pipe.encode_prompt(negative_prompt, param.device, 1, False)[0]}
    raise UserError(f"the null condition of {type(pipe).__name__} is not known to priorlab; pass null_kwargs")


@torch.no_grad()
def _image_latents(pipe, images: list, height: int, width: int, batch_size: int = 16) -> Tensor:
    """InstructPix2Pix's conditioning latents of PIL images: the VAE's mode, not scaled (as `prepare_image_latents`)."""
    pixels = pipe.image_processor.preprocess(images, height=height, width=width)
    out = [pipe.vae.encode(pixels[i : i + batch_size].to(pipe.vae.device, pipe.vae.dtype)).latent_dist.mode().float()
           for i in range(0, len(pixels), batch_size)]  # fmt: skip
    return torch.cat(out)


@torch.no_grad()
def encode_images(pipe, images: list, height: int, width: int, batch_size: int = 16) -> Tensor:
    """Clean latents of PIL images through the pipeline's VAE at height × width, scaled by its scaling factor."""
    from diffusers.image_processor import VaeImageProcessor

    vae = getattr(pipe, "vae", None)
    if vae is None:
        raise UserError(f"{type(pipe).__name__} has no VAE to encode calibration images with")
    processor = VaeImageProcessor()
    out = []
    for start in range(0, len(images), batch_size):
        pixels = processor.preprocess(images[start : start + batch_size], height=height, width=width)
        out.append(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean.float() * vae.config.scaling_factor)
    return torch.cat(out)

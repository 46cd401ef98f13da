"""Loading the prior network ψ of the swap from a diffusers pipeline, a bare diffusers model or a priorlab model.

`load_prior` gives a `priorlab.priors.PriorNet` (`DiffusersPrior`, or `DenoiserPrior` for a priorlab model)
whose `predict(x_t, model_abar_t, prediction_type)` is ψ's unconditional prediction for the guided model's noisy
latents x_t at the guided model's ᾱ (matching and conversion: `priorlab.priors.nets`), with ψ's own null
conditioning: its empty-prompt embedding through its own text encoder, a zero image embedding, its null class,
or nothing for an unconditional network.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn

from priorlab.errors import UserError
from priorlab.priors import DenoiserPrior, DiffusersPrior, PriorNet

DENOISER_COMPONENTS = ("unet", "transformer", "image_unet")
IMAGE_EMBEDDING_PIPELINES = ("StableDiffusionImageVariationPipeline",)


def null_condition(net: nn.Module, pipe=None, negative_prompt: str = "", device: str | torch.device = "cpu") -> dict:
    """The keyword arguments of `net`'s null condition for one sample.

    Text-conditioned networks take their own pipeline's embedding of the negative prompt ("" by default), an
    image-embedding network a zero embedding (as StableDiffusionImageVariationPipeline does), a class-conditional
    network its null class, an unconditional network nothing.
    """
    kind = type(net).__name__
    config = net.config
    if kind in ("DiTTransformer2DModel", "Transformer2DModel") and config.get("num_embeds_ada_norm"):
        return {"class_labels": torch.tensor([int(config.num_embeds_ada_norm)], device=device)}
    if kind == "UNet2DModel":
        if config.get("num_class_embeds"):
            raise UserError("a class-conditional UNet2DModel prior needs its null class: save it with priorlab "
                            "(priorlab.json records the null class) or use an unconditional base")  # fmt: skip
        return {}
    if kind == "PixArtTransformer2DModel":
        if pipe is None or not hasattr(pipe, "encode_prompt"):
            raise UserError("a PixArt prior needs its pipeline (its T5 text encoder gives the empty-prompt embedding)")
        with torch.no_grad():
            embeds, mask = pipe.encode_prompt(negative_prompt, do_classifier_free_guidance=False, device=device,
                                              clean_caption=False)[:2]  # fmt: skip
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}  # fmt: skip
    if kind in ("UNet2DConditionModel", "UNet3DConditionModel"):
        if pipe is not None and type(pipe).__name__ in IMAGE_EMBEDDING_PIPELINES:
            return {"encoder_hidden_states": torch.zeros(1, 1, config.cross_attention_dim, device=device)}
        if pipe is not None and hasattr(pipe, "encode_prompt") and getattr(pipe, "text_encoder", None) is not None:
            with torch.no_grad():
                embeds = pipe.encode_prompt(negative_prompt, device, 1, False)[0]
            return {"encoder_hidden_states": embeds}
        raise UserError(f"the prior's {kind} needs a text encoder for its empty-prompt embedding: give the prior "
                        "as a pipeline folder (model_index.json with tokenizer and text_encoder)")  # fmt: skip
    raise UserError(
        f"priorlab cannot query a {kind} as an unconditional prior; supported: UNet2DModel, "
        "UNet2DConditionModel, UNet3DConditionModel, DiTTransformer2DModel, Transformer2DModel (DiT), "
        "PixArtTransformer2DModel"
    )


def latent_space(pipe) -> dict | None:
    """The VAE settings that define a pipeline's latent space, or None without a VAE."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return None
    return {"scaling_factor": float(vae.config.scaling_factor), "latent_channels": int(vae.config.latent_channels)}


def load_pipeline(path: str, dtype: torch.dtype | None = None, role: str = "model"):
    """A diffusers pipeline from a local folder, or from the hub where this machine is online."""
    from diffusers import DiffusionPipeline

    local = Path(path).exists()
    if local and not (Path(path) / "model_index.json").exists():
        raise UserError(f"{role}={path} is not a diffusers pipeline folder (no model_index.json)")
    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    if local:
        kwargs.update(_absent_parts(Path(path)))
    try:
        return DiffusionPipeline.from_pretrained(path, local_files_only=local, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {role}={path}: {first}") from err


def _absent_parts(pipeline: Path) -> dict[str, None]:
    """None for each component a local pipeline's class takes that its folder does not hold, so that
    DiffusionPipeline loads the rest: one its model_index.json lists as null or leaves out (a pipeline saved with
    vae=None, such as a pixel-space text base, `models.text`), or a safety checker listed without its weights (a
    hub base's snapshot fetches none: `models.hub`)."""
    import diffusers

    try:
        index = json.loads((pipeline / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    cls = getattr(diffusers, str(index.get("_class_name")), None) if isinstance(index, dict) else None
    if cls is None:
        return {}
    params = inspect.signature(cls.__init__).parameters.values()
    taken = [p.name for p in params if p.name != "self" and p.default is p.empty]
    absent = {name: None for name in taken if not isinstance(index.get(name), list) or index[name][:1] == [None]}
    checker, listed = pipeline / "safety_checker", index.get("safety_checker")
    if (
        isinstance(listed, list)
        and listed[:1] != [None]
        and not [*checker.glob("*.safetensors"), *checker.glob("*.bin")]
    ):
        absent["safety_checker"] = None
    return absent


def load_prior(path: str, negative_prompt: str = "", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> PriorNet:  # fmt: skip
    """ψ from a diffusers pipeline folder (or hub name), a bare diffusers model folder, or a priorlab model folder.

    A bare model folder holds config.json, its weights and scheduler_config.json; a text-conditioned network
    needs its pipeline (for its text encoder), a class-conditional one its null class (priorlab.json or
    DiT's num_embeds_ada_norm). A hub name (org/name[@revision]) that names no local path is fetched, or found in
    the Hugging Face cache offline, by `models.hub`.
    """
    from priorlab.models.hub import locate

    path = str(locate(path, "base", check=False))
    p = Path(path)
    if p.exists() and (p / "priorlab.json").exists() or (p / "model" / "priorlab.json").exists():
        return _from_priorlab(p, device, dtype)
    if not p.exists() or (p / "model_index.json").exists():
        pipe = load_pipeline(path, dtype, role="base")
        pipe.to(device)
        net = next((getattr(pipe, c) for c in DENOISER_COMPONENTS if getattr(pipe, c, None) is not None), None)
        if net is None:
            raise UserError(f"base={path}: the pipeline has none of the components {', '.join(DENOISER_COMPONENTS)}")
        null = null_condition(net, pipe, negative_prompt, device)
        sched = pipe.scheduler
        return DiffusersPrior(net, sched.alphas_cumprod, sched.config.prediction_type, null, latent_space(pipe),
                              source=f"base={path}").to(device, dtype)  # fmt: skip
    if not (p / "config.json").exists():
        raise UserError(f"base={path} is neither a diffusers pipeline (model_index.json), a diffusers model "
                        "(config.json) nor a priorlab model (priorlab.json)")  # fmt: skip
    import diffusers

    class_name = json.loads((p / "config.json").read_text()).get("_class_name")
    cls = getattr(diffusers, str(class_name), None)
    if cls is None:
        raise UserError(f"base={path}: config.json names {class_name!r}, which is not a diffusers model class")
    from priorlab.models.pretrained import load_schedule

    net = cls.from_pretrained(p, local_files_only=True).eval()
    sched = load_schedule(p)  # the schedule beside the model (or in its scheduler/), as a fine-tune's base reads it
    return DiffusersPrior(net, sched.alphas_cumprod, sched.config.prediction_type,
                          null_condition(net, None, negative_prompt, device), None,
                          source=f"base={path}").to(device, dtype)  # fmt: skip


def _from_priorlab(path: Path, device, dtype) -> DenoiserPrior:
    from priorlab.models.io import load_denoiser

    saved = load_denoiser(path, role="base")
    if len(saved.denoiser.sample_shape) != 3:
        raise UserError(f"base={path} is a priorlab {saved.denoiser.class_name} over vectors of shape "
                        f"{saved.denoiser.sample_shape} (toy2d); the prior of a pipeline must denoise its images or "
                        "latents: a priorlab UNet or DiT model, or a diffusers model or pipeline")  # fmt: skip
    saved.denoiser.eval()
    return DenoiserPrior(saved.denoiser, saved.scheduler, in_channels=saved.denoiser.sample_shape[0],
                         source=f"base={path}").to(device, dtype)  # fmt: skip


def check_latent_space(model_latent: dict | None, prior_net: PriorNet) -> None:
    """Refuse a prior network whose VAE defines another latent space than the model's."""
    if model_latent is None or prior_net.latent is None:
        return
    for key in ("latent_channels", "scaling_factor"):
        if model_latent[key] != prior_net.latent[key]:
            raise UserError(f"the model's latents and {prior_net.source}'s differ: VAE {key} {model_latent[key]} vs "
                            f"{prior_net.latent[key]}; a prior must denoise the same latent space")  # fmt: skip

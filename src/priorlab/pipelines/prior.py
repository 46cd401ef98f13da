"""The unconditional prior ψ of the swap, loaded from a diffusers pipeline, a bare diffusers model or a priorlab model.

`DiffusersPrior.predict(x_t, model_abar_t, prediction_type)` returns ψ's unconditional prediction for the guided
model's noisy latents x_t at the guided model's ᾱ: ψ is queried at its own timestep of closest ᾱ, with its own
null conditioning (its empty-prompt embedding through its own text encoder, a zero image embedding, its null
class, or nothing for an unconditional network), and its output (eps, v or x0, learned variance split off) is
converted to the guided model's parameterization.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

from priorlab import diffusion
from priorlab.errors import UserError

DENOISER_COMPONENTS = ("unet", "transformer", "image_unet")
IMAGE_EMBEDDING_PIPELINES = ("StableDiffusionImageVariationPipeline",)


class DiffusersPrior:
    """ψ: a denoiser with its schedule, its null conditioning and its latent space.

    Args:
        net: the diffusers network (UNet2DModel, UNet2DConditionModel, UNet3DConditionModel, DiT / Transformer2D).
        alphas_cumprod: ψ's training ᾱ, indexed by ψ's timesteps.
        prediction_type: what ψ predicts ("epsilon", "v_prediction", "sample").
        null: keyword arguments of ψ's null condition for one sample (tensors with batch dimension 1).
        latent: {"scaling_factor", "latent_channels"} of ψ's VAE, or None when ψ has no VAE of its own.
        source: where it came from, for messages.
    """

    def __init__(self, net: nn.Module, alphas_cumprod: Tensor, prediction_type: str, null: dict,
                 latent: dict | None = None, source: str = "prior"):  # fmt: skip
        if prediction_type not in diffusion.PREDICTION_TYPES:
            raise UserError(f"{source}: prediction_type {prediction_type!r} is not one of {diffusion.PREDICTION_TYPES}")
        self.net = net
        self.abar = alphas_cumprod.float()
        self.prediction_type = prediction_type
        self.null = null
        self.latent = latent
        self.source = source
        self.in_channels = int(net.config.in_channels)
        self.video = type(net).__name__ in ("UNet3DConditionModel", "I2VGenXLUNet")

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusersPrior:
        self.net.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        self.null = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if isinstance(v, Tensor)
                     else v for k, v in self.null.items()}  # fmt: skip
        return self

    @torch.no_grad()
    def predict(self, x_t: Tensor, model_abar_t: Tensor, prediction_type: str = "epsilon") -> Tensor:
        """ψ's unconditional prediction for the guided model's x_t (N, C, [F,] H, W), in `prediction_type`.

        Args:
            x_t: the guided model's noisy latents, on any device (ψ's device is used, the result comes back).
            model_abar_t: the guided model's ᾱ at each row's timestep (N,); ψ is queried at its timestep of
                closest ᾱ.
            prediction_type: the guided model's parameterization. Where ψ predicts the same thing and has the
                same ᾱ at the matched timestep, its output is returned unconverted; otherwise it goes through eps,
                with ᾱ kept ≥ 2⁻²⁴ (a zero-terminal-SNR step has ᾱ = 0, where x0 and v are not defined by eps).
        """
        n, frames, device = len(x_t), None, x_t.device
        if x_t.ndim == 5 and not self.video:  # an image prior for a video model: frames become samples
            frames = x_t.shape[2]
            x_t = x_t.permute(0, 2, 1, 3, 4).reshape(n * frames, *x_t.shape[1:2], *x_t.shape[3:])
            model_abar_t = model_abar_t.repeat_interleave(frames)
        if x_t.ndim == 4 and self.video:
            raise UserError(f"{self.source} is a video model; it cannot be the prior of an image model")
        if x_t.shape[1] != self.in_channels:
            raise UserError(f"{self.source} takes {self.in_channels} input channels but the model's noisy latents "
                            f"have {x_t.shape[1]}; the prior must work in the same latent space")  # fmt: skip
        param = next(self.net.parameters())
        abar = self.abar.to(param.device)
        target = model_abar_t.to(param.device).float()
        t_prior = diffusion.closest_timesteps(abar, target)
        x = x_t.to(param.device)
        null = {k: v.expand(len(x), *v.shape[1:]) if isinstance(v, Tensor) else v for k, v in self.null.items()}
        if getattr(self.net, "use_additional_conditions", False):  # PixArt-α 1024: the pixel size it renders
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            size = torch.tensor([[h, w]] * len(x), device=x.device, dtype=x.dtype)
            ratio = torch.tensor([[h / w]] * len(x), device=x.device, dtype=x.dtype)
            null["added_cond_kwargs"] = {"resolution": size, "aspect_ratio": ratio}
        out = self.net(x.to(param.dtype), timestep=t_prior, **null, return_dict=False)[0]
        out = out[:, : x.shape[1]].float()  # a learned variance (DiT, PixArt) is split off
        if prediction_type != self.prediction_type or not torch.equal(abar[t_prior], target):
            floor = torch.tensor(2.0**-24, device=param.device)
            eps = diffusion.to_eps(out, self.prediction_type, x.float(), abar[t_prior].clamp(min=floor))
            out = diffusion.from_eps(eps, prediction_type, x.float(), target.clamp(min=floor))
        if frames is not None:
            out = out.reshape(n, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return out.to(device)

    def eps(self, x_t: Tensor, model_abar_t: Tensor) -> Tensor:
        """ψ's unconditional eps for the guided model's x_t at the model's ᾱ (see `predict`)."""
        return self.predict(x_t, model_abar_t, "epsilon")


def _scheduler_config(path: Path) -> dict:
    for candidate in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if candidate.exists():
            return json.loads(candidate.read_text())
    raise UserError(f"{path} has no scheduler_config.json (nor scheduler/scheduler_config.json); the prior's "
                    "noise schedule is needed to match timesteps")  # fmt: skip


def _alphas_cumprod(config: dict) -> Tensor:
    from diffusers import DDPMScheduler

    keep = {k: v for k, v in config.items() if not k.startswith("_")}
    return DDPMScheduler.from_config(keep).alphas_cumprod


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
    try:
        return DiffusionPipeline.from_pretrained(path, local_files_only=local, **kwargs)
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {role}={path}: {first}") from err


def load_prior(path: str, negative_prompt: str = "", device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> DiffusersPrior:  # fmt: skip
    """ψ from a diffusers pipeline folder (or hub name), a bare diffusers model folder, or a priorlab model folder.

    A bare model folder holds config.json, its weights and scheduler_config.json; a text-conditioned network
    needs its pipeline (for its text encoder), a class-conditional one its null class (priorlab.json or
    DiT's num_embeds_ada_norm).
    """
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
    net = cls.from_pretrained(p, local_files_only=True).eval()
    sched = _scheduler_config(p)
    return DiffusersPrior(net, _alphas_cumprod(sched), sched.get("prediction_type", "epsilon"),
                          null_condition(net, None, negative_prompt, device), None,
                          source=f"base={path}").to(device, dtype)  # fmt: skip


class _DenoiserNet(nn.Module):
    """A priorlab Denoiser seen as a diffusers-style network: net(x, t, class_labels=..., return_dict=False)."""

    def __init__(self, denoiser):
        super().__init__()
        self.denoiser = denoiser
        self.config = denoiser.net.config

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor, return_dict: bool = False):
        return (self.denoiser(x, timestep, class_labels),)


def _from_priorlab(path: Path, device, dtype) -> DiffusersPrior:
    from priorlab.models.io import load_denoiser

    saved = load_denoiser(path, role="base")
    if len(saved.denoiser.sample_shape) != 3:
        raise UserError(f"base={path} is a priorlab {saved.denoiser.class_name} over vectors of shape "
                        f"{saved.denoiser.sample_shape} (toy2d); the prior of a pipeline must denoise its images or "
                        "latents: a priorlab UNet or DiT model, or a diffusers model or pipeline")  # fmt: skip
    net = _DenoiserNet(saved.denoiser).eval()
    null = {"class_labels": torch.tensor([saved.denoiser.null_class])}
    return DiffusersPrior(net, saved.scheduler.alphas_cumprod, saved.denoiser.prediction_type, null, None,
                          source=f"base={path}").to(device, dtype)  # fmt: skip


def check_latent_space(model_latent: dict | None, prior: DiffusersPrior) -> None:
    """Refuse a prior whose VAE defines another latent space than the model's."""
    if model_latent is None or prior.latent is None:
        return
    for key in ("latent_channels", "scaling_factor"):
        if model_latent[key] != prior.latent[key]:
            raise UserError(f"the model's latents and {prior.source}'s differ: VAE {key} {model_latent[key]} vs "
                            f"{prior.latent[key]}; a prior must denoise the same latent space")  # fmt: skip

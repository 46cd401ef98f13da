"""The prior swap inside a diffusers pipeline.

`swap_prior(pipe, prior_net, prior)` puts a `SwappedDenoiser` in place of the pipeline's denoiser for the duration of
a `with` block. On every guided call it recognises the pipeline's guidance batch (the family's `chunks` copies of
the same noisy latents), evaluates the fine-tuned network θ only where it is needed and fills the fully
unconditional chunk with the prior's prediction, converted to θ's parameterization at θ's ᾱ. The pipeline then
combines the chunks with its own formula, which for the chunk layouts of `families` is exactly priorlab's
`guidance.cfg` (two chunks) or `guidance.cfg_two_conditions` (InstructPix2Pix) with eps(∅, ∅) from ψ (Eq. 7–9
of Phunyaphibarn et al. 2025).

Priors (`priorlab.priors.IN_PIPELINES`): "self" passes every call through unchanged (the pipeline's own output,
bit for bit); "base" takes ψ's prediction for the ∅ chunk; "auto" / "mix" take the per-noise-level convex
combination of θ's and ψ's ∅ predictions given by `priorlab.priors.PriorWeights` (fitted on the user's
calibration latents with `fit_pipeline_weights`).

Edges: fractional timesteps (Euler-type samplers) are mapped to θ's ᾱ by interpolating σ, or log σ where the
scheduler places its steps by log σ (`priorlab.priors.abar_at`). At a step where θ's ᾱ_t = 0 (zero terminal SNR)
and θ predicts v or x0, ψ's prediction cannot be expressed in θ's parameterization unless ψ predicts it itself
there (`priorlab.priors.nets`): such rows fall back to self, θ's own ∅ prediction, and are counted in
`SwappedDenoiser.fallback_rows`. DiT's null label (1000, hard-coded by DiTPipeline) is mapped to θ's own null
class only in the unconditional chunk, so a fine-tune with more than 1000 classes keeps its class 1000.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.pipelines.families import Family, family_of
from priorlab.pipelines.prior import check_latent_space, latent_space
from priorlab.priors import IN_PIPELINES, PriorNet, PriorWeights, abar_at, combine, fit_weights

LOG_SIGMA_SCHEDULES = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")  # t from log σ


class SwappedDenoiser(nn.Module):
    """A stand-in for a pipeline's denoiser that routes the unconditional chunk of the guidance batch to ψ.

    Attribute reads other than its own (config, dtype, device, …) go to the wrapped network, so the pipeline
    sees the network it expects.

    Args:
        net: θ, the pipeline's fine-tuned network.
        family: the pipeline's batch layout.
        model_abar: θ's training ᾱ (the pipeline scheduler's alphas_cumprod).
        prediction_type: what θ predicts (the pipeline scheduler's prediction_type).
        latent_channels: channels of the noisy latent at the front of θ's input (the rest, e.g. InstructPix2Pix's
            image latents, are conditioning that ψ never sees).
        prior_net: ψ; prior: one of `priorlab.priors.IN_PIPELINES`; weights: the fitted per-bucket base weights
            for auto / mix.
        guided_flag: a callable returning the pipeline's own guidance flag (True, False, or None outside a call),
            used in place of recognising the guidance batch by its content.
        guidance_scale: selects the row of weights fitted per guidance scale.
        log_sigma: the scheduler places fractional timesteps by log σ (Karras and similar sigmas), else by σ.
    """

    def __init__(self, net: nn.Module, family: Family, model_abar: Tensor, prediction_type: str,
                 latent_channels: int, prior_net: PriorNet | None, prior: str,
                 weights: PriorWeights | None = None, guided_flag=None,
                 guidance_scale: float | None = None, log_sigma: bool = False):  # fmt: skip
        super().__init__()
        self.net = net
        self.family = family
        self.model_abar = model_abar.float()
        self.prediction_type = prediction_type
        self.latent_channels = latent_channels
        self.prior_net = prior_net
        self.prior = prior
        self.weights = weights
        self.log_sigma = log_sigma
        self.fallback_rows = 0  # ∅ rows that kept θ's own prediction where ψ's is undefined (zero terminal SNR)
        self.null_class = _model_null_class(net) if family.pipeline_null is not None else None
        self.calls = {"guided": 0, "unguided": 0}
        self.guided_flag = guided_flag
        self.guidance_scale = guidance_scale

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["net"], name)

    def forward(self, sample: Tensor, timestep, *args, **kwargs):
        chunk = self._guided_chunk(sample, kwargs)
        n, g, lc = len(sample), chunk, self.latent_channels
        rows = torch.arange(n, device=sample.device)
        uncond = (rows >= self.family.uncond * g) & (rows < (self.family.uncond + 1) * g)
        kwargs = self._map_null_class(kwargs, uncond if chunk else None)
        self.calls["guided" if chunk else "unguided"] += 1
        if self.prior == "self" or not chunk:
            return self.net(sample, timestep, *args, **kwargs)
        t_u = _per_row(timestep, n, sample.device)[uncond]
        abar_u = abar_at(self.model_abar.to(sample.device), t_u, self.log_sigma)
        w = torch.ones(g) if self.prior == "base" else self.weights.at(t_u.round().long().cpu(), self.guidance_scale)
        defined = self.prior_net.defined(abar_u, self.prediction_type)
        w = torch.where(defined, w.to(sample.device), 0.0)  # zero terminal SNR: self where ψ's is undefined
        self.fallback_rows += int((~defined).sum())
        need_self = bool((w < 1).any())
        out = self._call_net(sample, timestep, args, kwargs, torch.ones_like(uncond) if need_self else ~uncond)
        pred = _output_tensor(out)
        if need_self:
            full = pred.clone()
            own = full[uncond][:, :lc]
        else:  # θ ran on the conditional chunks only
            full = pred.new_zeros((n, *pred.shape[1:]))
            full[~uncond] = pred
            own = None
        base = None
        use = w > 0
        if bool(use.any()):
            x_u = sample[uncond][:, :lc]
            base = full.new_zeros(x_u.shape)  # rows of weight 0 are never read
            base[use] = self.prior_net.predict(x_u[use], abar_u[use], self.prediction_type).to(full.dtype)
        # eps, v and x0 are affine in one another at fixed x_t and ᾱ, so the convex combination may be taken in
        # θ's own parameterization: w = 0 rows keep θ's output untouched, w = 1 rows are ψ's.
        full[uncond, :lc] = combine(own, base, w)
        return _with_output(out, full)

    def _guided_chunk(self, sample: Tensor, kwargs: dict) -> int:
        """The chunk size when this call is a guidance batch, else 0.

        The pipeline's own flag is used where it has one (`do_classifier_free_guidance`); DiT's guidance batch is
        recognised by its null labels; otherwise by the same noisy latents in every chunk.
        """
        k = self.family.chunks
        if len(sample) % k or len(sample) < k:
            return 0
        g = len(sample) // k
        flag = self.guided_flag() if self.guided_flag else None
        if flag is not None:
            return g if flag else 0
        labels = kwargs.get("class_labels")
        if self.family.pipeline_null is not None and isinstance(labels, Tensor) and labels.ndim == 1:
            null = labels[self.family.uncond * g : (self.family.uncond + 1) * g]
            if not bool((null == self.family.pipeline_null).all()):
                return 0
        parts = sample[:, : self.latent_channels].chunk(k)
        return g if all(torch.equal(parts[0], p) for p in parts[1:]) else 0

    def _map_null_class(self, kwargs: dict, uncond: Tensor | None) -> dict:
        """DiTPipeline passes label 1000 for ∅ whatever the model: map it to θ's own null class in the
        unconditional chunk `uncond` (rows (N,)) of a guidance batch, and nowhere else (None: not one), so that a
        fine-tune with more than 1000 classes keeps its class 1000 in the conditional chunk."""
        labels = kwargs.get("class_labels")
        if self.null_class is None or labels is None or uncond is None or self.null_class == self.family.pipeline_null:
            return kwargs
        if not isinstance(labels, Tensor) or labels.ndim != 1 or len(labels) != len(uncond):
            return kwargs
        null = uncond.to(labels.device) & (labels == self.family.pipeline_null)
        labels = torch.where(null, torch.full_like(labels, self.null_class), labels)
        return {**kwargs, "class_labels": labels}

    def _call_net(self, sample: Tensor, timestep, args: tuple, kwargs: dict, keep: Tensor):
        """θ on the rows in `keep` only, every batched argument sliced alike."""
        n = len(sample)
        if bool(keep.all()):
            return self.net(sample, timestep, *args, **kwargs)
        idx = keep.nonzero().flatten()
        return self.net(sample[idx], _take(timestep, idx, n), *(_take(a, idx, n) for a in args),
                        **{k: _take(v, idx, n) for k, v in kwargs.items()})  # fmt: skip


def _pipeline_flag(pipe) -> bool | None:
    try:
        return bool(pipe.do_classifier_free_guidance)
    except (AttributeError, TypeError):  # read outside a call, before the pipeline set its guidance scale
        return None


def _model_null_class(net: nn.Module) -> int:
    classes = net.config.get("num_embeds_ada_norm")
    if not classes:
        raise UserError(f"{type(net).__name__} has no num_embeds_ada_norm in its config: its null class is unknown")
    return int(classes)


def _per_row(timestep, n: int, device) -> Tensor:
    t = torch.as_tensor(timestep, device=device)
    return t.expand(n) if t.ndim == 0 else t.reshape(-1).expand(n) if t.numel() == 1 else t


def _take(value, idx: Tensor, n: int):
    """Rows idx of every tensor with a leading batch dimension n (recursively in dicts, lists and tuples)."""
    if isinstance(value, Tensor):
        return value[idx.to(value.device)] if value.ndim > 0 and len(value) == n else value
    if isinstance(value, dict):
        return {k: _take(v, idx, n) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_take(v, idx, n) for v in value)
    return value


def _output_tensor(out) -> Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_output(out, tensor: Tensor):
    if isinstance(out, tuple):
        return (tensor, *out[1:])
    return type(out)(sample=tensor)


def _latent_channels(pipe, net: nn.Module) -> int:
    vae = getattr(pipe, "vae", None)
    if vae is not None:
        return int(vae.config.latent_channels)
    return int(net.config.in_channels)


@contextlib.contextmanager
def swap_prior(pipe, prior_net: PriorNet | None, prior: str = "base", weights: PriorWeights | None = None,
               family: Family | None = None, guidance_scale: float | None = None,
               image_guidance_scale: float | None = None) -> Iterator[SwappedDenoiser]:  # fmt: skip
    """Within the block, `pipe(...)` guides with the unconditional prediction of `prior` (see the module doc).
    Weights fitted per guidance scale (the guided objective) need the `guidance_scale` the pipeline runs at, and
    two-condition weights (InstructPix2Pix) also its `image_guidance_scale`, the one they were fitted at.

    Yields the stand-in network (its `calls` count guided and unguided calls). The pipeline's own denoiser is
    put back on leaving the block, also after an error.
    """
    if prior not in IN_PIPELINES:
        raise UserError(f"prior={prior} is unknown; use one of {', '.join(IN_PIPELINES)}")
    if prior != "self" and prior_net is None:
        raise UserError(f"prior={prior} needs a base model (base=PATH)")
    if prior in ("auto", "mix") and weights is None:
        raise UserError(f"prior={prior} needs fitted weights (prior_weights=PATH, or fit them on calibration images)")
    family = family or family_of(pipe)
    net = getattr(pipe, family.component, None)
    if net is None:
        raise UserError(f"{type(pipe).__name__} has no {family.component}; the family {family.name} needs it")
    if isinstance(net, SwappedDenoiser):
        raise UserError("the pipeline's prior is already swapped; nest swap_prior blocks only around other pipelines")
    sched = pipe.scheduler
    if not hasattr(sched, "alphas_cumprod"):
        raise UserError(f"{type(sched).__name__} has no discrete ᾱ schedule; the swap needs a DDPM-family scheduler "
                        "(DDIM, DDPM, Euler, DPM-Solver, UniPC, ...)")  # fmt: skip
    if sched.config.get("timestep_type") == "continuous":
        raise UserError(f"{type(sched).__name__} with timestep_type=continuous passes log-σ, not timesteps; use "
                        "timestep_type=discrete")  # fmt: skip
    if prior_net is not None:
        check_latent_space(latent_space(pipe), prior_net)
        device = next(net.parameters()).device
        if next(prior_net.module.parameters()).device != device:
            prior_net.to(device)
    if weights is not None and int(weights.edges[-1]) != len(sched.alphas_cumprod):
        raise UserError(f"the prior weights were fitted over {int(weights.edges[-1])} timesteps but the model has "
                        f"{len(sched.alphas_cumprod)}")  # fmt: skip
    if weights is not None and weights.scales is not None:
        if guidance_scale is None:
            raise UserError(f"the prior weights were fitted per guidance scale ({weights.scales}); pass the scale "
                            "the pipeline runs at (guidance_scale=...)")  # fmt: skip
        weights.row(guidance_scale)
        weights.check_image_scale(image_guidance_scale)
    flag = (lambda: _pipeline_flag(pipe)) if hasattr(type(pipe), "do_classifier_free_guidance") else None
    log_sigma = any(bool(sched.config.get(name)) for name in LOG_SIGMA_SCHEDULES)
    swapped = SwappedDenoiser(net, family, sched.alphas_cumprod, sched.config.prediction_type,
                              _latent_channels(pipe, net), prior_net, prior, weights, flag, guidance_scale,
                              log_sigma)  # fmt: skip
    object.__setattr__(pipe, family.component, swapped)
    try:
        yield swapped
    finally:
        object.__setattr__(pipe, family.component, net)


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
    (`priorlab.priors.weights`), which needs each latent's own condition: `cond_kwargs`, the keyword arguments of θ
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
    if family.name not in CALIBRATED_FAMILIES or family.component != "unet" and not family.class_labels:
        raise UserError(f"fitting prior=auto|mix weights is not supported for {family.name} pipelines "
                        f"({type(pipe).__name__}) yet; use prior=base or prior=self")  # fmt: skip
    if latents.ndim != (5 if family.video else 4):
        shape = "(N, C, F, H, W)" if family.video else "(N, C, H, W)"
        raise UserError(f"calibration latents of a {family.name} model must be {shape}; got {tuple(latents.shape)}")
    net = getattr(pipe, family.component)
    param = next(net.parameters())
    sched = pipe.scheduler
    abar = sched.alphas_cumprod.float().to(param.device)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(abar), (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    guided = objective == "guided"
    if guided and (not cond_kwargs or not scales):
        raise UserError("the guided objective needs each calibration latent's condition (cond_kwargs) and the "
                        "guidance scales to fit at")  # fmt: skip
    if guided and any(len(v) != len(latents) for v in cond_kwargs.values()):
        raise UserError(f"cond_kwargs must hold one condition per calibration latent ({len(latents)})")
    extra = int(net.config.in_channels) - latents.shape[1]
    cond_kwargs = dict(cond_kwargs or {})
    image_latents = cond_kwargs.pop("image_latents", None)
    two = family.name == "instruct-pix2pix"
    want = (extra, *latents.shape[2:])
    if guided and extra > 0 and (image_latents is None or tuple(image_latents.shape[1:]) != want):
        raise UserError(f"{type(pipe).__name__} takes its condition's image latents as {extra} extra input channels: "
                        f"give cond_kwargs['image_latents'] of shape (N, {', '.join(map(str, want))}) "
                        "(model_conditions builds them from each latent's condition image)")  # fmt: skip
    if guided and two and image_scale is None:
        raise UserError("InstructPix2Pix guides with two scales: give the image_guidance_scale to fit at")
    eps_self, eps_base, eps_cond, eps_image = [], [], [], []

    def own_eps(x_t, channels, tb, kwargs):
        inp = x_t if extra <= 0 else torch.cat([x_t, channels], dim=1)
        out = net(inp.to(param.dtype), tb, **kwargs, return_dict=False)[0][:, : latents.shape[1]].float()
        return diffusion.to_eps(out, sched.config.prediction_type, x_t, abar[tb]).cpu()

    for start in range(0, len(latents), batch_size):
        rows = slice(start, start + batch_size)
        tb = t[rows].to(param.device)
        x_t = diffusion.add_noise(latents[rows].to(param.device).float(), noise[rows].to(param.device), abar[tb])
        none = x_t.new_zeros((len(x_t), max(extra, 0), *x_t.shape[2:]))  # the ∅ of image latents
        null = {k: v.expand(len(x_t), *v.shape[1:]) for k, v in null_kwargs.items()}
        eps_self.append(own_eps(x_t, none, tb, null))
        if guided:
            channels = none if image_latents is None else image_latents[rows].to(param.device, x_t.dtype)
            eps_cond.append(own_eps(x_t, channels, tb, {k: v[rows].to(param.device) for k, v in cond_kwargs.items()}))
            if two:  # eps_θ(x_t, c_I, ∅): the image condition with the null text
                eps_image.append(own_eps(x_t, channels, tb, null))
        eps_base.append(prior_net.eps(x_t, abar[tb]).cpu())
    extra_args = {"eps_cond": torch.cat(eps_cond), "scales": list(scales)} if guided else {}
    if guided and two:
        extra_args.update(eps_image=torch.cat(eps_image), image_scale=float(image_scale))
    return fit_weights(torch.cat(eps_self), torch.cat(eps_base), noise, t, len(abar), buckets, prior, objective,
                       **extra_args)  # fmt: skip


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
        null = _model_null_class(net) if family.pipeline_null is not None else int(pipe.config.null_class)
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

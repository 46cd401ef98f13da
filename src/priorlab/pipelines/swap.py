"""The prior swap inside a diffusers pipeline.

`swap_prior(pipe, prior)` puts a `SwappedDenoiser` in place of the pipeline's denoiser for the duration of
a `with` block. On every guided call it recognises the pipeline's guidance batch (the family's `chunks` copies of
the same noisy latents), evaluates the fine-tuned network θ only where it is needed and fills the fully
unconditional chunk with the prior's prediction, converted to θ's parameterization at θ's ᾱ. The pipeline then
combines the chunks with its own formula, which for the chunk layouts of `families` is exactly priorlab's
`guidance.cfg` (two chunks) or `guidance.cfg_two_conditions` (InstructPix2Pix) with eps(∅, ∅) from ψ (Eq. 7–9
of Phunyaphibarn et al. 2025).

Priors (`priorlab.priors.kinds`, of the modes `priorlab.priors.IN_PIPELINES`): `SelfPrior` passes every call
through unchanged (the pipeline's own output, bit for bit); `BasePrior` takes ψ's prediction for the ∅ chunk;
`MixPrior` (auto, mix) takes the per-noise-level convex combination (1 − λ)·θ(∅) + λ·ψ(∅) of θ's and ψ's ∅
predictions, with λ from its `PriorWeights` (fitted on the user's calibration latents with `fit_pipeline_weights`).
The prior gives λ per row (`Prior.base_weight`), as it does to `priorlab.guidance.guide`.

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

from priorlab.errors import UserError
from priorlab.pipelines.families import Family, family_of
from priorlab.pipelines.prior import check_latent_space, latent_space
from priorlab.priors import IN_PIPELINES, Prior, PriorWeights, abar_at, combine

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
        prior: the prior (`priorlab.priors.kinds`) of a mode of `priorlab.priors.IN_PIPELINES`, with its network ψ
            and, for auto / mix, its fitted per-bucket base weights.
        guided_flag: a callable returning the pipeline's own guidance flag (True, False, or None outside a call),
            used in place of recognising the guidance batch by its content.
        guidance_scale: selects the row of weights fitted per guidance scale.
        log_sigma: the scheduler places fractional timesteps by log σ (Karras and similar sigmas), else by σ.
    """

    def __init__(self, net: nn.Module, family: Family, model_abar: Tensor, prediction_type: str,
                 latent_channels: int, prior: Prior, guided_flag=None, guidance_scale: float | None = None,
                 log_sigma: bool = False):  # fmt: skip
        super().__init__()
        self.net = net
        self.family = family
        self.model_abar = model_abar.float()
        self.prediction_type = prediction_type
        self.latent_channels = latent_channels
        self.prior = prior
        self.log_sigma = log_sigma
        self.fallback_rows = 0  # ∅ rows that kept θ's own prediction where ψ's is undefined (zero terminal SNR)
        self.null_class = model_null_class(net) if family.pipeline_null is not None else None
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
        if not self.prior.needs_net or not chunk:  # prior=self: the pipeline's own call
            return self.net(sample, timestep, *args, **kwargs)
        t_u = _per_row(timestep, n, sample.device)[uncond]
        abar_u = abar_at(self.model_abar.to(sample.device), t_u, self.log_sigma)
        w = self.prior.base_weight(t_u.round().long().cpu(), self.guidance_scale)
        prior_net = self.prior.net
        defined = prior_net.defined(abar_u, self.prediction_type)
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
            base[use] = prior_net.predict(x_u[use], abar_u[use], self.prediction_type).to(full.dtype)
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


def model_null_class(net: nn.Module) -> int:
    """θ's own null class (a DiT-type network's class count, `num_embeds_ada_norm`)."""
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
def swap_prior(pipe, prior: Prior, family: Family | None = None, guidance_scale: float | None = None,
               image_guidance_scale: float | None = None) -> Iterator[SwappedDenoiser]:  # fmt: skip
    """Within the block, `pipe(...)` guides with the unconditional prediction of `prior` (see the module doc), built
    by `priorlab.priors.make_prior` or a kind of `priorlab.priors.kinds` (e.g. `BasePrior(load_prior(PATH))`).
    Weights fitted per guidance scale (the guided objective) need the `guidance_scale` the pipeline runs at, and
    two-condition weights (InstructPix2Pix) also its `image_guidance_scale`, the one they were fitted at.

    Yields the stand-in network (its `calls` count guided and unguided calls). The pipeline's own denoiser is
    put back on leaving the block, also after an error.
    """
    if prior.mode not in IN_PIPELINES:
        raise UserError(f"prior={prior.name} cannot guide inside a pipeline; use one of {', '.join(IN_PIPELINES)}")
    family = family or family_of(pipe)
    net = getattr(pipe, family.component, None)
    if net is None:
        raise UserError(f"{type(pipe).__name__} has no {family.component}; the family {family.name} needs it")
    if isinstance(net, SwappedDenoiser):
        raise UserError("the pipeline's prior is already swapped; nest swap_prior blocks only around other pipelines")
    sched = _check_scheduler(pipe.scheduler)
    if prior.reads is not None:
        check_latent_space(latent_space(pipe), prior.reads)
        device = next(net.parameters()).device
        if next(prior.reads.module.parameters()).device != device:
            prior.reads.to(device)
    prior.check_model(len(sched.alphas_cumprod))
    _check_scales(prior.weights, guidance_scale, image_guidance_scale)
    flag = (lambda: _pipeline_flag(pipe)) if hasattr(type(pipe), "do_classifier_free_guidance") else None
    log_sigma = any(bool(sched.config.get(name)) for name in LOG_SIGMA_SCHEDULES)
    swapped = SwappedDenoiser(net, family, sched.alphas_cumprod, sched.config.prediction_type,
                              _latent_channels(pipe, net), prior, flag, guidance_scale, log_sigma)  # fmt: skip
    object.__setattr__(pipe, family.component, swapped)
    try:
        yield swapped
    finally:
        object.__setattr__(pipe, family.component, net)


def _check_scheduler(sched):
    """The swap needs a discrete ᾱ schedule, indexed by the timesteps the pipeline passes."""
    if not hasattr(sched, "alphas_cumprod"):
        raise UserError(f"{type(sched).__name__} has no discrete ᾱ schedule; the swap needs a DDPM-family scheduler "
                        "(DDIM, DDPM, Euler, DPM-Solver, UniPC, ...)")  # fmt: skip
    if sched.config.get("timestep_type") == "continuous":
        raise UserError(f"{type(sched).__name__} with timestep_type=continuous passes log-σ, not timesteps; use "
                        "timestep_type=discrete")  # fmt: skip
    return sched


def _check_scales(weights: PriorWeights | None, guidance_scale: float | None,
                  image_guidance_scale: float | None) -> None:  # fmt: skip
    """Weights fitted per guidance scale hold a row for the pipeline's scale (and its image scale)."""
    if weights is None or weights.scales is None:
        return
    if guidance_scale is None:
        raise UserError(f"the prior weights were fitted per guidance scale ({weights.scales}); pass the scale "
                        "the pipeline runs at (guidance_scale=...)")  # fmt: skip
    weights.row(guidance_scale)
    weights.check_image_scale(image_guidance_scale)

"""The prior network ψ seen from the guided model θ: ψ's prediction at θ's (x_t, ᾱ_t), in θ's parameterization.

One interface, `PriorNet.eps(x_t, abar_t)` (and `predict` for another parameterization), with two adapters:
`DenoiserPrior` for priorlab denoisers and `DiffusersPrior` for diffusers networks. Both share one timestep
matching and one conversion:

- **Matching.** ψ is queried at its own timestep of closest ᾱ (`closest_timesteps`; "the timestep of closest
  variance", Phunyaphibarn et al. 2025, Sec. 4), with its own null condition.
- **Conversion.** ψ's output (eps, v or x0) is turned into eps at *ψ's own* ᾱ at the matched timestep, ᾱ_ψ, the
  noise level its output was made for: eps = a_ψ·v + s_ψ·x_t or (x_t − a_ψ·x0)/s_ψ. For an ideal prior the
  three parameterizations then give the same eps (`tests/test_priors.py`), whatever ψ predicts. Only then is eps
  expressed in θ's parameterization at θ's ᾱ_t (`diffusion.from_eps`). Where ψ predicts what θ predicts and
  ᾱ_ψ = ᾱ_t exactly, its output is returned unconverted. Where the schedules differ, ᾱ_ψ ≠ ᾱ_t: ψ answers for
  a neighbouring noise level, an error that shrinks with the spacing of ψ's schedule.
- **Zero terminal SNR.** At ᾱ_t = 0 (a rescaled schedule's last step) x_t is pure noise, so eps = x_t carries no
  information about x0, and θ's v = −x0 (or x0 itself) cannot be computed from an eps. Such rows are *undefined*
  (`PriorNet.defined`) unless ψ predicts θ's parameterization at ᾱ_ψ = 0 itself; `predict` refuses them, and the
  swap in pipelines falls back to θ's own ∅ prediction there (`pipelines.swap`). The former clamp of ᾱ to
  2⁻²⁴ gave v off by ~959 where |v| was 3.4.
- **Fractional timesteps** (Euler-type samplers) are mapped to ᾱ by `abar_at`, interpolating σ (log σ for
  Karras, exponential and beta sigmas), as the scheduler made them, so ᾱ is the scheduler's own.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from priorlab import diffusion
from priorlab.errors import UserError

UNDEFINED_AT_ZERO_SNR = "at ᾱ_t = 0 (zero terminal SNR) an eps prediction does not determine"


def closest_timesteps(abar_prior: Tensor, target_abar: Tensor) -> Tensor:
    """The prior's timestep whose ᾱ is closest to each target ᾱ (N,) (the first of equally close ones)."""
    return (abar_prior[None, :] - target_abar.to(abar_prior.device, abar_prior.dtype)[:, None]).abs().argmin(dim=1)


def match_timesteps(abar_model: Tensor, abar_prior: Tensor, t: Tensor) -> Tensor:
    """The prior's timestep whose ᾱ is closest to the model's ᾱ at the model's integer timesteps t (N,)."""
    return closest_timesteps(abar_prior, abar_model.to(abar_prior.device)[t.to(abar_prior.device)])


def sigmas(abar: Tensor) -> Tensor:
    """σ = sqrt((1 − ᾱ)/ᾱ) of each ᾱ (inf at ᾱ = 0)."""
    return ((1 - abar) / abar).sqrt()


def abar_at(abar: Tensor, t: Tensor, log_sigma: bool = False) -> Tensor:
    """ᾱ at timesteps t that may be fractional, as a diffusers scheduler gives them.

    EulerDiscreteScheduler makes a fractional timestep's σ by linear interpolation of σ over the integer
    timesteps (interpolation_type="linear") or, for Karras, exponential and beta sigmas, finds the fractional
    timestep of a σ by interpolating log σ (`_sigma_to_t`); interpolating the same quantity gives back its σ,
    so ᾱ = 1/(1 + σ²) is the scheduler's own to float rounding. (Interpolating ᾱ linearly instead, as priorlab
    did before, is off by up to ~4e-5 relative with 1000 training timesteps, more with fewer; `tests/test_priors.py`.)
    Integer timesteps give ᾱ exactly; a σ of inf (ᾱ = 0) at an end gives ᾱ = 0 there."""
    t = t.float().clamp(0, len(abar) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(abar) - 1)
    frac = t - lo.float()
    s = sigmas(abar.double())
    s = s.log() if log_sigma else s
    mid = s[lo] + frac.double() * (s[hi] - s[lo])
    mid = mid.exp() if log_sigma else mid
    out = torch.where(frac == 0, abar.double()[lo], 1 / (1 + mid * mid))
    return out.to(abar.dtype)


def conversion_defined(prior_type: str, model_type: str, abar_prior_t: Tensor, abar_t: Tensor) -> Tensor:
    """Per row, whether ψ's output can be given in θ's parameterization (module doc: zero terminal SNR)."""
    unconverted = (prior_type == model_type) & (abar_prior_t.to(abar_t) == abar_t)
    return (abar_t > 0) | (model_type == "epsilon") | unconverted


def convert(out: Tensor, prior_type: str, model_type: str, x_t: Tensor, abar_prior_t: Tensor,
            abar_t: Tensor) -> Tensor:  # fmt: skip
    """ψ's output made at ᾱ_ψ (N,) in θ's parameterization at ᾱ_t (N,) (module doc), in x_t's dtype: eps at ψ's
    own ᾱ, then θ's parameterization; rows where ψ predicts θ's type at the same ᾱ are returned unconverted."""
    eps = diffusion.to_eps(out, prior_type, x_t, abar_prior_t)
    if model_type == "epsilon":
        return eps
    converted = diffusion.from_eps(eps, model_type, x_t, abar_t)
    if prior_type != model_type:
        return converted
    same = (abar_prior_t.to(abar_t) == abar_t).reshape(-1, *[1] * (out.ndim - 1))
    return torch.where(same, out, converted)


class PriorNet:
    """ψ: a network with its training ᾱ, queried with its null condition (subclasses: `_query`).

    Attributes:
        abar: ψ's training ᾱ, indexed by ψ's timesteps.
        prediction_type: what ψ predicts ("epsilon", "v_prediction", "sample").
        channels: the input channels of x_t that ψ sees (e.g. the noisy latent of an 8-channel model); all when None.
        in_channels: the channels ψ takes (checked), or None.
        video: ψ denoises video (N, C, F, H, W); an image prior given video sees each frame as a sample.
        latent: {"scaling_factor", "latent_channels"} of ψ's VAE, or None.
        source: where it came from, for messages.
    """

    def __init__(self, alphas_cumprod: Tensor, prediction_type: str, channels: slice | None = None,
                 in_channels: int | None = None, video: bool = False, latent: dict | None = None,
                 source: str = "prior"):  # fmt: skip
        if prediction_type not in diffusion.PREDICTION_TYPES:
            raise UserError(f"{source}: prediction_type {prediction_type!r} is not one of {diffusion.PREDICTION_TYPES}")
        self.abar = alphas_cumprod
        self.prediction_type = prediction_type
        self.channels = channels
        self.in_channels = in_channels
        self.video = video
        self.latent = latent
        self.source = source
        self._on: dict[torch.device, Tensor] = {}

    @property
    def module(self) -> nn.Module:
        """The network, for its device and dtype."""
        raise NotImplementedError

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> PriorNet:
        """Move the network (and, in dtype, its weights) to `device`."""
        self.module.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
        return self

    def _query(self, x: Tensor, t: Tensor) -> Tensor:
        """ψ's raw output at its own integer timesteps t (N,) with its null condition, on x's device."""
        raise NotImplementedError

    def _abar(self, device: torch.device) -> Tensor:
        """ψ's ᾱ on `device`, copied once: a copy from host memory at every call would wait for the GPU at every
        denoising step."""
        if device not in self._on:
            self._on[device] = self.abar.to(device)
        return self._on[device]

    def defined(self, abar_t: Tensor, prediction_type: str = "epsilon") -> Tensor:
        """Per row, whether ψ's prediction at θ's ᾱ_t (N,) exists in `prediction_type` (module doc)."""
        abar = self._abar(abar_t.device)
        return conversion_defined(self.prediction_type, prediction_type, abar[closest_timesteps(abar, abar_t)], abar_t)

    @torch.no_grad()
    def predict(self, x_t: Tensor, abar_t: Tensor, prediction_type: str = "epsilon") -> Tensor:
        """ψ's unconditional prediction for θ's x_t (N, C, [F,] H, W) at θ's ᾱ_t (N,), in θ's `prediction_type`,
        on x_t's device, in float32 or x_t's dtype where wider.

        Rows where it is not defined (zero terminal SNR, module doc) are a ValueError: leave them out.
        """
        x = x_t if self.channels is None else x_t[:, self.channels]
        n, frames, home = len(x), None, x.device
        if x.ndim == 5 and not self.video:  # an image prior for a video model: frames become samples
            frames = x.shape[2]
            x = x.permute(0, 2, 1, 3, 4).reshape(n * frames, *x.shape[1:2], *x.shape[3:])
            abar_t = abar_t.repeat_interleave(frames)
        if x.ndim == 4 and self.video:
            raise UserError(f"{self.source} is a video model; it cannot be the prior of an image model")
        if self.in_channels is not None and x.shape[1] != self.in_channels:
            raise UserError(f"{self.source} takes {self.in_channels} input channels but the model's noisy latents "
                            f"have {x.shape[1]}; the prior must work in the same latent space")  # fmt: skip
        param = next(self.module.parameters(), None)  # None: a stand-in without weights, on x's device
        device = x.device if param is None else param.device
        dtype = torch.promote_types(x.dtype, torch.float32)
        x, abar_t = x.to(device), abar_t.to(device)
        abar = self._abar(device)
        t = closest_timesteps(abar, abar_t)
        if prediction_type != "epsilon":
            defined = conversion_defined(self.prediction_type, prediction_type, abar[t], abar_t)
            if not bool(defined.all()):
                raise ValueError(f"{self.source}: {UNDEFINED_AT_ZERO_SNR} {prediction_type}; leave such rows out "
                                 "(PriorNet.defined)")  # fmt: skip
        out = self._query(x if param is None else x.to(param.dtype), t).to(dtype)
        out = convert(out, self.prediction_type, prediction_type, x.to(dtype), abar[t], abar_t)
        if frames is not None:
            out = out.reshape(n, frames, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return out.to(home)

    def eps(self, x_t: Tensor, abar_t: Tensor) -> Tensor:
        """ψ's unconditional eps for θ's x_t at θ's ᾱ_t (N,): the one interface of a prior network."""
        return self.predict(x_t, abar_t, "epsilon")


class DenoiserPrior(PriorNet):
    """A priorlab denoiser as the prior network: queried with its null class.

    Args:
        denoiser: the prior network ψ.
        scheduler: ψ's training schedule (its ᾱ is indexed by ψ's timesteps).
        model_alphas_cumprod: the guided model's ᾱ, for calls in the model's integer timesteps (`__call__`).
        channels: the input channels of x_t that ψ sees; all when None.
        in_channels: the channels ψ takes, checked at every call (None: not checked; `check_prior_fits` checks
            shapes once).
        source: where it came from, for messages.
    """

    def __init__(self, denoiser, scheduler, model_alphas_cumprod: Tensor | None = None,
                 channels: slice | None = None, in_channels: int | None = None, source: str = "base"):  # fmt: skip
        super().__init__(scheduler.alphas_cumprod, denoiser.prediction_type, channels, in_channels, source=source)
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.model_abar = model_alphas_cumprod

    @property
    def module(self) -> nn.Module:
        return self.denoiser

    def _query(self, x: Tensor, t: Tensor) -> Tensor:
        null = torch.full((len(x),), self.denoiser.null_class, device=x.device, dtype=torch.long)
        return self.denoiser(x, t, null)

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        """eps at the guided model's integer timesteps t (N,) (needs `model_alphas_cumprod`)."""
        if self.model_abar is None:
            raise ValueError("calling a DenoiserPrior with timesteps needs the model's alphas_cumprod; use .eps")
        return self.eps(x_t, self.model_abar.to(t.device)[t])


class DiffusersPrior(PriorNet):
    """A diffusers network as the prior network: queried with its own null conditioning, a learned variance split off.

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
        video = type(net).__name__ in ("UNet3DConditionModel", "I2VGenXLUNet")
        super().__init__(alphas_cumprod.float(), prediction_type, None, int(net.config.in_channels), video, latent,
                         source)  # fmt: skip
        self.net = net
        self.null = null

    @property
    def module(self) -> nn.Module:
        return self.net

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> DiffusersPrior:
        super().to(device, dtype)
        self.null = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) if isinstance(v, Tensor)
                     else v for k, v in self.null.items()}  # fmt: skip
        return self

    def _query(self, x: Tensor, t: Tensor) -> Tensor:
        null = {k: v.expand(len(x), *v.shape[1:]) if isinstance(v, Tensor) else v for k, v in self.null.items()}
        if getattr(self.net, "use_additional_conditions", False):  # PixArt-α 1024: the pixel size it renders
            h, w = x.shape[-2] * 8, x.shape[-1] * 8
            size = torch.tensor([[h, w]] * len(x), device=x.device, dtype=x.dtype)
            ratio = torch.tensor([[h / w]] * len(x), device=x.device, dtype=x.dtype)
            null["added_cond_kwargs"] = {"resolution": size, "aspect_ratio": ratio}
        out = self.net(x, timestep=t, **null, return_dict=False)[0]
        return out[:, : x.shape[1]]  # a learned variance (DiT, PixArt) is split off


def check_prior_fits(model_shape: tuple[int, ...], prior_in: tuple[int, ...], prior_net: PriorNet) -> None:
    """An image-size or channel mismatch between model and prior is an error unless channels are given."""
    ch = prior_net.channels
    seen = model_shape if ch is None else (len(range(model_shape[0])[ch]), *model_shape[1:])
    if tuple(seen) != tuple(prior_in):
        raise UserError(
            f"the prior takes inputs of shape {tuple(prior_in)} but the model's samples have shape "
            f"{tuple(model_shape)}; use a prior of the same image size and channels, or tell it which input "
            "channels it sees (prior_channels)"
        )

"""The unconditional prior of classifier-free guidance as objects, each validated once, when it is built.

Guidance (`priorlab.guidance.guide`) combines the guided model θ's conditional prediction with a prior's
unconditional one (Ho & Salimans 2022; Phunyaphibarn et al. 2025, Eq. 6–7):

    eps = eps_prior + w · (eps_θ(x_t, c) − eps_prior),   eps_prior = (1 − λ)·eps_θ(x_t, ∅) + λ·eps_ψ(x_t, ∅),

where λ, the prior's base weight, may differ per row (per noise level):

- `SelfPrior`: λ = 0, θ's own ∅ branch (standard CFG).
- `BasePrior`: λ = 1, the ∅ prediction of another network ψ: any `PriorNet`, of any schedule or parameterization,
  queried at its timestep of closest ᾱ and converted to eps (`priorlab.priors.nets`).
- `MixPrior` (modes auto and mix) and `CheckedPrior`: λ per timestep bucket, and per guidance scale where fitted per
  scale, from `PriorWeights` (`priorlab.priors.weights`).
- `NoPrior`: no guidance, the conditional prediction alone.
- `DistilledPrior`: the base-guided prediction (λ = 1) learned by θ itself, w an input (`guidance_distill`, after
  DogFit, Bahram, Shateri & Granger 2025): eps = eps_θ(x_t, c, w), one pass of θ and none of ψ.

A prior says what a guided step needs of it (`needs_model_uncond`, `needs_net`, `per_row`, `scale_input`), so that
the step batches θ's conditional and ∅ rows in one pass, runs ψ only where λ > 0, and gives θ the scale where it
takes one, without asking which kind it is. Mode strings
stay at the edges: `make_prior` builds a prior from the config's mode (`MODES`), and `name` is its key in results.
"""

from __future__ import annotations

import torch
from torch import Tensor

from priorlab.errors import UserError
from priorlab.priors.fused import check_fused
from priorlab.priors.modes import FITTABLE, MODES
from priorlab.priors.nets import PriorNet
from priorlab.priors.weights import PriorWeights


class Prior:
    """What every prior gives a guided step.

    Attributes:
        mode: the kind's mode string (`MODES`); name: its key in results (the mode, or an extra prior's own name).
        net: ψ, the network whose ∅ prediction enters (None where none does).
        weights: the fitted per-bucket weights λ (None for the fixed kinds).
        guides: False for `NoPrior` (conditional prediction only).
        fused: "auto", "on" or "off": whether a step runs θ and ψ in one pass where they share an architecture
            (`priorlab.priors.fused`); read where ψ's rows are all of θ's (prior=base, or blocks of base priors).
        needs_model_uncond: whether θ's ∅ branch may enter (λ < 1 somewhere); needs_net: whether ψ's may (λ > 0).
        per_row: λ differs by row, so a step picks rows by reading GPU values: it can neither be captured in a CUDA
            graph nor share a one-pass batch of settings (`priorlab.sample_many`).
        scale_input: θ takes w as an input and its one pass is the guided prediction (`DistilledPrior`).
    """

    mode = ""
    guides = True
    needs_model_uncond = False
    needs_net = False
    per_row = False
    scale_input = False

    def __init__(self, name: str | None = None, net: PriorNet | None = None, weights: PriorWeights | None = None,
                 fused: str = "off"):  # fmt: skip
        self.name = name or self.mode
        self.net = net
        self.weights = weights
        self.fused = check_fused(fused)

    @property
    def reads(self) -> PriorNet | None:
        """The prior network a step with this prior reads (None: θ alone)."""
        return self.net if self.needs_net else None

    def base_weight(self, t: Tensor, scale: float | None = None) -> Tensor:
        """λ of each row (N,) at the guided model's integer timesteps t, float32 on t's device."""
        return torch.full((len(t),), float(self.needs_net), device=t.device)

    def base_eps(self, x_t: Tensor, abar_t: Tensor) -> Tensor:
        """eps_ψ(x_t, ∅) at θ's x_t (N, ...) and ᾱ_t (N,): ψ queried at its own timestep of closest ᾱ, its output
        converted to eps (`PriorNet.eps`)."""
        if self.net is None:
            raise ValueError(f"prior={self.name} has no prior network")
        return self.net.eps(x_t, abar_t)

    def check_model(self, num_train_timesteps: int) -> None:
        """Refuse a guided model this prior does not fit (fitted weights: other training timesteps)."""

    @classmethod
    def check_guided(cls, model, scales) -> None:
        """Refuse a guided model θ (a `Denoiser`) or guidance scales this kind cannot guide with, before sampling
        (a class method: an evaluation checks its modes before it trains or fits anything)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class NoPrior(Prior):
    """No guidance: eps = eps_θ(x_t, c) at every scale."""

    mode = "none"
    guides = False


class SelfPrior(Prior):
    """θ's own ∅ branch, λ = 0: eps = eps_θ(x_t, ∅) + w·(eps_θ(x_t, c) − eps_θ(x_t, ∅)) (standard CFG)."""

    mode = "self"
    needs_model_uncond = True


class BasePrior(Prior):
    """Another network's ∅ prediction, λ = 1: eps = eps_ψ(x_t, ∅) + w·(eps_θ(x_t, c) − eps_ψ(x_t, ∅)) (Eq. 7).

    Args:
        net: ψ, any `PriorNet` (a priorlab denoiser or a diffusers network, of any schedule or parameterization).
        name: its key in results ("base"; an extra prior's own name, e.g. a smaller base).
        fused: θ and ψ in one pass: "auto", "on" or "off" (`Prior`, `priorlab.priors.fused`).
    """

    mode = "base"
    needs_net = True

    def __init__(self, net: PriorNet | None, name: str | None = None, fused: str = "off"):
        if net is None:
            raise UserError(f"prior={name or self.mode} needs a base model (base=PATH)")
        super().__init__(name, net, fused=fused)


class FittedPrior(Prior):
    """λ per timestep bucket (and per guidance scale where the weights hold one row per scale), fitted on held-out
    data: eps_prior = (1 − λ_b)·eps_θ(x_t, ∅) + λ_b·eps_ψ(x_t, ∅) (`priorlab.priors.weights`).

    Args:
        net: ψ; weights: the fitted weights, whose mode must be the prior's.
        mode: the prior's mode (the weights' own where None).
    """

    modes: tuple[str, ...] = ()
    needs_model_uncond = True
    needs_net = True
    per_row = True

    def __init__(self, net: PriorNet | None, weights: PriorWeights | None, mode: str | None = None):
        mode = mode or (weights.mode if weights is not None else self.modes[-1])
        if mode not in self.modes:
            raise UserError(f"{type(self).__name__} guides with prior={'|'.join(self.modes)}, not prior={mode}")
        if net is None:
            raise UserError(f"prior={mode} needs a base model (base=PATH)")
        if weights is None:
            raise UserError(f"prior={mode} needs per-noise-level weights fitted on a calibration split "
                            "(priorlab.priors.fit_weights): give calibration data or a file of fitted weights "
                            "(prior_weights=PATH)")  # fmt: skip
        if weights.mode != mode:
            raise UserError(f"prior={mode} was given weights fitted for prior={weights.mode}")
        self.mode = mode
        super().__init__(mode, net, weights)

    def base_weight(self, t: Tensor, scale: float | None = None) -> Tensor:
        return self.weights.at(t, scale).float()

    def check_model(self, num_train_timesteps: int) -> None:
        fitted = self.weights.num_train_timesteps
        if fitted != num_train_timesteps:
            raise UserError(f"the prior weights were fitted over {fitted} training timesteps but the model has "
                            f"{num_train_timesteps}; fit them for this model")  # fmt: skip


class MixPrior(FittedPrior):
    """prior=mix (λ_b ∈ [0, 1], the least-squares convex weight) or prior=auto (λ_b ∈ {0, 1}, each bucket's better
    network, so each row runs only its chosen one)."""

    modes = FITTABLE


class CheckedPrior(FittedPrior):
    """prior=checked: per guidance scale, whichever of self, base and mix scored best on sampled images (one row of
    weights per scale: all 0, all 1, or the mix's)."""

    modes = ("checked",)


class DistilledPrior(Prior):
    """The base-guided prediction learned by θ itself, w an input: eps = eps_θ(x_t, c, w), one pass, no ψ.

    A fine-tune trained with `guidance_distill` (`priorlab.training.distill`; DogFit, Bahram, Shateri & Granger, arXiv
    2508.05685) learned eps_θ(x_t, c, w) ≈ eps_ψ(x_t, ∅) + w·(eps_θ(x_t, c, 1) − eps_ψ(x_t, ∅)) (Eq. 7 of
    Phunyaphibarn et al. 2025 with its base ψ) for w in [1, max_scale]; a model without a scale embedding, or a
    scale outside that range (an extrapolation it was never trained for), is refused (`check_guided`).
    """

    mode = "distilled"
    scale_input = True

    @classmethod
    def check_guided(cls, model, scales) -> None:
        embedding = getattr(model, "scale_embedding", None)
        if embedding is None:
            raise UserError("prior=distilled needs a fine-tune trained with guidance_distill.max_scale=W (it takes "
                            "the guidance scale as an input); this model was not: guide it with prior=self or "
                            "prior=base")  # fmt: skip
        outside = [w for w in scales if not 1 <= w <= embedding.max_scale]
        if outside:
            raise UserError(f"prior=distilled was trained for guidance scales in [1, {embedding.max_scale:g}], not "
                            f"w={outside[0]:g}; evaluate it within that range, or train with "
                            f"guidance_distill.max_scale={max(outside):g}")  # fmt: skip


KINDS: dict[str, type[Prior]] = {"none": NoPrior, "self": SelfPrior, "base": BasePrior, "auto": MixPrior,
                                 "mix": MixPrior, "checked": CheckedPrior, "distilled": DistilledPrior}  # fmt: skip
SELF = SelfPrior()
NONE = NoPrior()


def make_prior(mode: str, prior_net: PriorNet | None = None, weights: PriorWeights | None = None,
               modes: tuple[str, ...] = MODES, fused: str = "off") -> Prior:  # fmt: skip
    """The prior of a mode string (the config's, the CLI's), validated here once: a mode of `modes`, with the network
    and the fitted weights it needs. Each kind takes only what it uses: prior=self and prior=distilled ignore a given
    network, and only prior=base reads `fused` (θ and ψ in one pass: `priorlab.priors.fused`)."""
    check_fused(fused)
    if mode not in modes:
        raise UserError(f"prior={mode} is unknown; use one of {', '.join(modes)}")
    kind = KINDS[mode]
    if issubclass(kind, FittedPrior):
        return kind(prior_net, weights, mode)
    if kind is BasePrior:
        return BasePrior(prior_net, fused=fused)
    return kind()

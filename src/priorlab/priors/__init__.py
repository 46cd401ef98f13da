"""The one home of the unconditional prior of classifier-free guidance.

- `modes`: the list of modes (`self`, `base`, `none`, `auto`, `mix`, `checked`), the strings of the config, the CLI
  and the result keys.
- `kinds`: the priors as objects (`SelfPrior`, `BasePrior`, `MixPrior`, `CheckedPrior`, `NoPrior`), each validated
  once when built; `make_prior` builds one from a mode string at the edges. Naming rule: `prior` is such an
  object, `prior_net` the network object.
- `nets`: the prior network's eps at the guided model's (x_t, ᾱ_t): one interface (`PriorNet`), adapters for
  priorlab denoisers (`DenoiserPrior`) and diffusers networks (`DiffusersPrior`), one timestep matching (closest
  ᾱ) and one conversion between prediction types, with their edges (zero terminal SNR, fractional timesteps).
- `fused`: θ and a base of its architecture in one pass over stacked weights (`FusedPair`), as a prior's `fused`
  setting (auto, on, off) asks.
- `weights`: the fitted priors' per-noise-level weights (`PriorWeights`) and `combine`; `fitting`: `fit_weights`.

Guidance (`priorlab.guidance.guide`) takes a prior object; fitting weights on a model's predictions is evaluation's
(`priorlab.evaluation.calibrate`), as the swap inside diffusers pipelines is `priorlab.pipelines`'.
"""

from priorlab.priors.fitting import fit_weights
from priorlab.priors.fused import FUSED, FusedPair, fused_pair, fusion_mismatch
from priorlab.priors.kinds import (
    KINDS,
    NONE,
    SELF,
    BasePrior,
    CheckedPrior,
    FittedPrior,
    MixPrior,
    NoPrior,
    Prior,
    SelfPrior,
    make_prior,
)
from priorlab.priors.modes import FITTABLE, FITTED, FIXED, IN_PIPELINES, MODES
from priorlab.priors.nets import (
    DenoiserPrior,
    DiffusersPrior,
    PriorNet,
    abar_at,
    check_prior_fits,
    closest_timesteps,
    conversion_defined,
    convert,
    match_timesteps,
    sigmas,
)
from priorlab.priors.weights import FORMAT, OBJECTIVES, PriorWeights, bucket_edges, bucket_index, combine

__all__ = [
    "FITTABLE",
    "FITTED",
    "FIXED",
    "FORMAT",
    "FUSED",
    "IN_PIPELINES",
    "KINDS",
    "MODES",
    "NONE",
    "OBJECTIVES",
    "SELF",
    "BasePrior",
    "CheckedPrior",
    "DenoiserPrior",
    "DiffusersPrior",
    "FittedPrior",
    "FusedPair",
    "MixPrior",
    "NoPrior",
    "Prior",
    "PriorNet",
    "PriorWeights",
    "SelfPrior",
    "abar_at",
    "bucket_edges",
    "bucket_index",
    "check_prior_fits",
    "closest_timesteps",
    "combine",
    "conversion_defined",
    "convert",
    "fit_weights",
    "fused_pair",
    "fusion_mismatch",
    "make_prior",
    "match_timesteps",
    "sigmas",
]

"""The one home of the unconditional prior of classifier-free guidance.

- `modes`: the list of modes (`self`, `base`, `none`, `auto`, `mix`, `checked`) and the check that a mode has
  what it needs. Naming rule: `prior` is the mode, `prior_net` the network object.
- `nets`: the prior network's eps at the guided model's (x_t, ᾱ_t): one interface (`PriorNet`), adapters for
  priorlab denoisers (`DenoiserPrior`) and diffusers networks (`DiffusersPrior`), one timestep matching (closest
  ᾱ) and one conversion between prediction types, with their edges (zero terminal SNR, fractional timesteps).
- `weights`: the fitted priors' per-noise-level weights (`PriorWeights`), `combine` and `fit_weights`.

Guidance (`priorlab.guidance`) uses a prior; fitting weights on a model's predictions is evaluation's
(`priorlab.evaluation.calibrate`), as the swap inside diffusers pipelines is `priorlab.pipelines`'.
"""

from priorlab.priors.modes import FITTABLE, FITTED, FIXED, IN_PIPELINES, MODES, check_prior
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
from priorlab.priors.weights import FORMAT, OBJECTIVES, PriorWeights, bucket_edges, bucket_index, combine, fit_weights

__all__ = [
    "FITTABLE",
    "FITTED",
    "FIXED",
    "FORMAT",
    "IN_PIPELINES",
    "MODES",
    "OBJECTIVES",
    "DenoiserPrior",
    "DiffusersPrior",
    "PriorNet",
    "PriorWeights",
    "abar_at",
    "bucket_edges",
    "bucket_index",
    "check_prior",
    "check_prior_fits",
    "closest_timesteps",
    "combine",
    "conversion_defined",
    "convert",
    "fit_weights",
    "match_timesteps",
    "sigmas",
]

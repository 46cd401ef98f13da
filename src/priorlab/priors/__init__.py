"""The one home of the unconditional prior of classifier-free guidance.

- `modes`: the list of modes (`self`, `base`, `none`, `auto`, `mix`, `checked`, `distilled`), the strings of the
  config, the CLI and the result keys.
- `kinds`: the priors as objects (`SelfPrior`, `BasePrior`, `MixPrior`, `CheckedPrior`, `NoPrior`,
  `DistilledPrior`), each validated once when built; `make_prior` builds one from a mode string at the edges. Naming
  rule: `prior` is such an object, `prior_net` the network object.
- `nets`: the prior network's eps at the guided model's (x_t, ᾱ_t): one interface (`PriorNet`), adapters for
  priorlab denoisers (`DenoiserPrior`) and diffusers networks (`DiffusersPrior`), one timestep matching (closest
  ᾱ) and one conversion between prediction types, with their edges (zero terminal SNR, fractional timesteps).
- `fused`: θ and a base of its architecture in one pass over stacked weights (`FusedPair`), as a prior's `fused`
  setting (auto, on, off) asks.
- `weights`: the fitted priors' per-noise-level weights (`PriorWeights`) and `combine`; `fitting`: `fit_weights`.

Guidance (`priorlab.guidance.guide`) takes a prior object; fitting weights on a model's predictions is evaluation's
(`priorlab.evaluation.calibrate`), as the swap inside diffusers pipelines is `priorlab.pipelines`'.
"""

import importlib

# Each name is imported from its module on first use (PEP 562), so that reading the modes (`priorlab.priors.modes`,
# which the analysis and the CLI do) does not import torch and diffusers with the networks: 6 s of a study's report.
_WHERE = {
    "DISTILLED": "modes",
    "FITTABLE": "modes",
    "FITTED": "modes",
    "FIXED": "modes",
    "FORMAT": "weights",
    "FUSED": "fused",
    "IN_PIPELINES": "modes",
    "KINDS": "kinds",
    "MODES": "modes",
    "NONE": "kinds",
    "OBJECTIVES": "weights",
    "SELF": "kinds",
    "BasePrior": "kinds",
    "CheckedPrior": "kinds",
    "DenoiserPrior": "nets",
    "DiffusersPrior": "nets",
    "DistilledPrior": "kinds",
    "FittedPrior": "kinds",
    "FusedPair": "fused",
    "MixPrior": "kinds",
    "NoPrior": "kinds",
    "Prior": "kinds",
    "PriorNet": "nets",
    "PriorWeights": "weights",
    "SelfPrior": "kinds",
    "abar_at": "nets",
    "bucket_edges": "weights",
    "bucket_index": "weights",
    "check_prior_fits": "nets",
    "closest_timesteps": "nets",
    "combine": "weights",
    "conversion_defined": "nets",
    "convert": "nets",
    "fit_weights": "fitting",
    "fused_pair": "fused",
    "fusion_mismatch": "fused",
    "make_prior": "kinds",
    "match_timesteps": "nets",
    "sigmas": "nets",
}


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'priorlab.priors' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"priorlab.priors.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "DISTILLED",
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
    "DistilledPrior",
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

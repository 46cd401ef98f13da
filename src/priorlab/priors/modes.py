"""The modes of the unconditional prior: the one list of the strings the config, the CLI and the result keys use.

Naming rule, used across priorlab: `prior` is a prior object (`priorlab.priors.kinds`, built from a mode by
`make_prior`), `prior_net` the network that gives a prior's prediction (a `priorlab.priors.PriorNet`), `weights` the
fitted `PriorWeights`; a mode string (one of `MODES`) travels only from the edges to `make_prior` and into the keys.
"""

import re

from priorlab.errors import UserError

# self: the guided model's own ∅ branch; base: the prior network's; none: no guidance (conditional only);
# auto, mix: per noise level, a convex combination of self and base fitted by least squares on a calibration
# split; checked: per guidance scale, the one of self, base and mix whose samples scored best; distilled: the
# base-guided prediction learned by the fine-tune itself, w an input (`guidance_distill`), one pass per step.
MODES = ("self", "base", "none", "auto", "mix", "checked", "distilled")
FIXED = ("self", "base")  # the two candidates: no fitting, no weights
FITTABLE = ("auto", "mix")  # fitted by least squares (`fit_weights`)
FITTED = (*FITTABLE, "checked")  # every mode that guides with fitted weights
DISTILLED = "distilled"  # the mode of a fine-tune that takes the guidance scale as an input
IN_PIPELINES = (*FIXED, *FITTABLE)  # the modes of the swap inside diffusers pipelines


def check_extra_priors(names) -> None:
    """Names of extra priors (`extra_priors`): letters, digits and '_', and none of the built-in priors' names."""
    for name in names:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(name)) or name in MODES or name == "exact":
            raise UserError(f"extra_priors.{name}: a prior's name must start with a letter, hold only letters, digits "
                            f"and '_', and not be one of {', '.join(MODES)} or exact")  # fmt: skip

"""The modes of the unconditional prior: the one list, and the check that a mode has what it needs.

Naming rule, used across priorlab: `prior` is the mode (a string of `MODES`), `prior_net` the network object
that gives the prior's prediction (a `priorlab.priors.PriorNet`), `weights` the fitted `PriorWeights`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from priorlab.errors import UserError

if TYPE_CHECKING:
    from priorlab.priors.nets import PriorNet
    from priorlab.priors.weights import PriorWeights

# self: the guided model's own ∅ branch; base: the prior network's; none: no guidance (conditional only);
# auto, mix: per noise level, a convex combination of self and base fitted by least squares on a calibration
# split; checked: per guidance scale, the one of self, base and mix whose samples scored best.
MODES = ("self", "base", "none", "auto", "mix", "checked")
FIXED = MODES[:2]  # the two candidates: no fitting, no weights
FITTABLE = MODES[3:5]  # fitted by least squares (`fit_weights`)
FITTED = MODES[3:]  # every mode that guides with fitted weights
IN_PIPELINES = (*FIXED, *FITTABLE)  # the modes of the swap inside diffusers pipelines


def check_prior(prior: str, prior_net: PriorNet | None, weights: PriorWeights | None = None,
                modes: tuple[str, ...] = MODES) -> None:  # fmt: skip
    """The prior is one of `modes`, and has the prior network and the fitted weights it needs."""
    if prior not in modes:
        raise UserError(f"prior={prior} is unknown; use one of {', '.join(modes)}")
    if prior in ("base", *FITTED) and prior_net is None:
        raise UserError(f"prior={prior} needs a base model (base=PATH)")
    if prior in FITTED:
        if weights is None:
            raise UserError(f"prior={prior} needs per-noise-level weights fitted on a calibration split "
                            "(priorlab.priors.fit_weights); give calibration data or a weights file")  # fmt: skip
        if weights.mode != prior:
            raise UserError(f"prior={prior} was given weights fitted for prior={weights.mode}")

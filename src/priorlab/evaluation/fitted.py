"""The fitted priors of an evaluation: their weights fitted on a calibration split, or checked by sampling.

`fit_priors` fits prior=auto|mix (`calibrate`) on the calibration split of the held-out data, disjoint from the
samples the prior-quality measures use, before any sampling; prior=checked (`check_by_sampling`) picks, per guidance
scale, whichever of self, base and the fitted mix samples best. Every rank fits the same weights.
"""

from __future__ import annotations

import time
from dataclasses import replace

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab.errors import UserError
from priorlab.evaluation import metrics
from priorlab.evaluation.calibrate import calibrate
from priorlab.evaluation.features import Evaluator
from priorlab.evaluation.generation import generate, usable_priors
from priorlab.evaluation.settings import EvalSettings, ExactReference
from priorlab.keys import scale_name
from priorlab.models.denoiser import Denoiser
from priorlab.priors import FITTABLE, FITTED, SELF, BasePrior, MixPrior, PriorNet, PriorWeights
from priorlab.seeds import sample_seeds, stream_seed


def calibration_split(heldout: tuple[Tensor, Tensor], settings: EvalSettings) -> tuple[Tensor, Tensor]:
    """The calibration samples and their labels: the `calibration` held-out samples after the first `heldout`."""
    x, y = heldout[0], heldout[1]
    if len(x) < settings.heldout + settings.calibration:
        raise UserError(
            f"prior=auto|mix are fitted on eval.calibration={settings.calibration} held-out samples after the "
            f"eval.heldout={settings.heldout} used for metrics, but the validation split holds {len(x)}; lower "
            "eval.heldout or eval.calibration, or raise data.val_fraction"
        )
    part = slice(settings.heldout, settings.heldout + settings.calibration)
    return x[part], y[part]


def fit_priors(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: PriorNet | None, heldout: tuple[Tensor, Tensor] | None,
    settings: EvalSettings, given: dict[str, PriorWeights] | None = None, evaluator: Evaluator | None = None,
    mixture: ExactReference | None = None, shape: tuple[int, ...] | None = None,
) -> dict[str, PriorWeights]:  # fmt: skip
    """The weights of each fitted prior (auto, mix, checked) in settings.priors: `given` ones, the others fitted
    on the calibration split of `heldout` (the validation split) before any sampling. Empty without a base.

    prior=checked (`check_by_sampling`) also needs the scorer of its samples: the toy2d `mixture` (exact NLL) or
    the `evaluator` (FD), and the sample `shape`."""
    usable = [p for p in usable_priors(settings, prior_net) if p in FITTED]
    # Given weights keep their per-bucket weights but not the losses stored with them: those were measured on
    # another model or split and must not be reported as this evaluation's calibration losses.
    out = {p: replace(w, losses=None) for p, w in (given or {}).items() if p in usable}
    for w in out.values():  # weights per scale must cover every guided scale of the evaluation (w = 1 is unguided)
        for scale in settings.guidance_scales:
            if scale != 1:
                w.row(scale)
    wanted = [p for p in usable if p not in out]
    if wanted and heldout is None:
        raise UserError(f"prior={wanted[0]} needs a calibration split (held-out data) or a weights file")
    if not wanted:
        return out
    x0, y = calibration_split(heldout, settings)
    fit = [p for p in wanted if p in FITTABLE]
    if "checked" in wanted and "mix" not in out and "mix" not in fit:
        fit.append("mix")  # a candidate of the check
    fitted = {}
    if fit:
        fitted = calibrate(model, scheduler, prior_net, x0, settings.buckets, tuple(fit),
                           seed=stream_seed("calibration", settings.seed), batch_size=settings.batch_size,
                           objective=settings.calibration_objective, labels=y,
                           scales=list(settings.guidance_scales))  # fmt: skip
    out.update({p: w for p, w in fitted.items() if p in wanted})
    if "checked" in wanted:
        out["checked"] = check_by_sampling(model, scheduler, prior_net, out.get("mix") or fitted["mix"], y, settings,
                                           evaluator, mixture, shape)  # fmt: skip
    return out


CHECK_CANDIDATES = ("self", "base", "mix")


@torch.no_grad()
def check_by_sampling(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: PriorNet, mix: PriorWeights, labels: Tensor,
    settings: EvalSettings, evaluator: Evaluator | None, mixture: ExactReference | None,
    shape: tuple[int, ...] | None,
) -> PriorWeights:  # fmt: skip
    """prior=checked: per guidance scale, the candidate among self, base and the fitted mix whose samples score
    best, on `settings.check_samples` samples with the calibration split's labels and their own seeds (the same
    for every candidate). The score is the study's metric: on toy2d the exact NLL, else FD against the evaluator's
    reference features. A step-by-step loss misses what a candidate does to a whole trajectory (at high noise
    above all); this sees it, at the cost of sampling (recorded in seconds)."""
    if (mixture is None and evaluator is None) or shape is None:
        raise UserError("prior=checked scores samples: it needs the evaluator (images) or toy2d's mixture")
    if not settings.check_samples > 0:
        raise UserError(f"eval.check_samples={settings.check_samples} must be positive for prior=checked")
    started = time.perf_counter()
    n = min(settings.check_samples, len(labels))
    check_labels = labels[:n]
    seeds = sample_seeds("check", settings.seed, n)  # not the evaluation's seeds
    metric = "nll" if mixture is not None else "fd"
    scales = list(settings.guidance_scales)
    k = len(mix.edges) - 1
    rows, scores = [], {}
    candidates = {"self": SELF, "base": BasePrior(prior_net), "mix": MixPrior(prior_net, mix, "mix")}
    for w in scales:
        if w == 1:  # unguided: the prior is never used
            rows.append(torch.zeros(k))
            continue
        score = {}
        for cand, prior in candidates.items():
            x = generate(model, scheduler, check_labels, seeds, shape, settings, w, prior)
            if mixture is not None:
                score[cand] = float(-mixture.log_prob(x.cpu(), 1.0, check_labels.cpu()).mean())
            else:
                score[cand] = metrics.frechet_distance(evaluator.embed(x)[0].cpu(), evaluator.reference)
        best = min(CHECK_CANDIDATES, key=lambda c: (score[c], CHECK_CANDIDATES.index(c)))  # ties: self first
        rows.append({"self": torch.zeros(k), "base": torch.ones(k), "mix": mix.row(w)}[best])
        scores[scale_name(w)] = {**score, "checked": score[best]}
    check = {"metric": metric, "samples": n, "scores": scores, "seconds": time.perf_counter() - started}
    # the mix's calibration losses come along: the ∅ and guided losses of self and base on the calibration split,
    # which tell before sampling which prior to use (`priorlab.analysis.predictors`)
    losses = {**(mix.losses or {}), "check": check}
    return PriorWeights(mix.edges, torch.stack(rows), "checked", losses, mix.objective, scales)

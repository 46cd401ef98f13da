"""Conditional quality: the samples of each prior and guidance scale scored against the data.

`conditional_quality` samples the same labels and seeds with every prior (`generation.evaluation_priors`) at every
scale and scores them (`sample_scores`: FD, KID, precision, recall, accuracy, and on toy2d the exact NLL and the
distance to exact guidance's samples); `paired_scores` gives the standard errors of the differences between priors,
paired sample by sample. Keys: eval/cond/<metric>/prior=<p>/w=<w> and eval/diff/... (`priorlab.keys`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab.evaluation import metrics
from priorlab.evaluation.calibrate import calibration_metrics
from priorlab.evaluation.features import Evaluator
from priorlab.evaluation.generation import (
    eval_labels_seeds,
    evaluation_priors,
    generate,
    one_pass_samples,
    timed_generate,
)
from priorlab.evaluation.settings import EvalSettings, ExactReference
from priorlab.keys import diff_metric, key
from priorlab.models.denoiser import Denoiser
from priorlab.priors import PriorNet, PriorWeights
from priorlab.seeds import sample_seeds, stream_seed


@dataclass
class Scored:
    """Per-sample quantities of one set of generated samples, kept for the paired comparisons between priors."""

    feats: Tensor  # (N, D) evaluator features, on the CPU
    values: dict[str, Tensor]  # metric → (N,) per-sample values whose mean is the metric (accuracy, nll, ideal_mse)


def sample_scores(
    x: Tensor, labels: Tensor, evaluator: Evaluator, settings: EvalSettings, mixture: ExactReference | None,
    ideal: Tensor | None = None,
) -> tuple[dict[str, float], Scored]:  # fmt: skip
    """FD, KID, precision, recall and accuracy of samples x (on toy2d also the exact NLL and, given `ideal`, the
    distance to the ideal samples), and the per-sample values.

    Precision and recall compare the samples with as many reference features (a subset drawn from
    `settings.seed`, the same for every prior and scale), as Kynkäänniemi et al. do; FD and KID use all of them.
    `ideal` holds the samples that exact guidance gives from the same seeds (`ExactReference.denoiser`):
    `ideal_mse` is the mean squared distance ‖x − x_ideal‖² of each sample to its ideal twin. Unlike the NLL, which
    a sampler collapsing onto the modes lowers, it measures how far guidance with this prior is from guidance
    with the true scores at the same scale. Non-finite samples are a UserError.
    """
    feats, logits = evaluator.embed(x)
    feats, ref = feats.cpu(), evaluator.reference
    metrics.check_finite(feats, "the evaluator features of the generated samples")
    correct = (logits.cpu().argmax(1) == labels.cpu()).double()
    out = {
        "fd": metrics.frechet_distance(feats, ref),
        "kid": metrics.kid(feats, ref, subset_size=settings.kid_subset),
    }
    out["precision"], out["recall"] = metrics.precision_recall(metrics.subsample(ref, len(feats), settings.seed), feats)
    out["accuracy"] = float(correct.mean())
    if settings.per_class_fd:
        for k in labels.unique().tolist():
            out[f"fd_class={k}"] = metrics.frechet_distance(feats[labels == k], ref[evaluator.reference_labels == k])
    values = {"accuracy": correct}
    if mixture is not None:
        values["nll"] = -mixture.log_prob(x.cpu(), 1.0, labels.cpu())
        out["nll"] = float(values["nll"].mean())
    if ideal is not None:
        values["ideal_mse"] = (x.cpu().double() - ideal.cpu().double()).pow(2).flatten(1).sum(1)
        out["ideal_mse"] = float(values["ideal_mse"].mean())
    return out, Scored(feats, values)


def paired_scores(
    scored: dict[tuple[str, float], Scored], reference: Tensor, settings: EvalSettings
) -> dict[str, float]:
    """Standard errors over the generated samples: of each FD (bootstrap), and of metric(a) − metric(b) for every
    two priors a, b at each scale w ≠ 1, paired sample by sample (the priors share seeds and labels).

    Accuracy and NLL are means of per-sample values, so the SE of their paired difference is the standard deviation
    of the per-sample differences over √N. FD is not a mean: its SEs come from `settings.bootstrap` resamples of
    the sample indices, the same resamples for every prior and scale (a paired bootstrap; the reference is fixed).
    Keys: eval/cond/fd_se/prior=<p>/w=<w>, eval/diff/<metric>_se/prior=<p>/w=<w> (of self − p), and for two priors
    a, b other than self (a before b in the evaluation's order) eval/diff/<metric>_se_vs_<a>/prior=<b>/w=<w> (of
    a − b; the same for b − a), so that any two priors' difference has an interval over samples.
    """
    out: dict[str, float] = {}
    if not scored:
        return out
    n = len(next(iter(scored.values())).feats)
    boot = {}
    if settings.bootstrap > 1 and n > 1:
        g = torch.Generator().manual_seed(stream_seed("check", settings.seed))
        draws = torch.randint(0, n, (settings.bootstrap, n), generator=g)
        boot = {key: metrics.bootstrap_fd(s.feats, reference, draws) for key, s in scored.items()}
        for (prior, w), values in boot.items():
            out[key("cond", "fd_se", prior=prior, scale=w)] = float(values.std())
    priors = list(dict.fromkeys(prior for prior, _ in scored))
    for i, a in enumerate(priors):  # every pair (a, b), a before b; a = self keeps the key without `_vs_`
        for b in priors[i + 1 :]:
            for w in {w for p, w in scored if p == b and w != 1}:
                if (a, w) not in scored:
                    continue
                mine, other = scored[(a, w)].values, scored[(b, w)].values
                for name in mine.keys() & other.keys():
                    out[key("diff", diff_metric(name, a), prior=b, scale=w)] = _se(mine[name] - other[name])
                if boot:
                    diff = boot[(a, w)] - boot[(b, w)]
                    out[key("diff", diff_metric("fd", a), prior=b, scale=w)] = float(diff.std())
    return out


def _se(d: Tensor) -> float:
    return float(d.double().std() / len(d) ** 0.5) if len(d) > 1 else float("nan")


def conditional_quality(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: PriorNet | None, evaluator: Evaluator,
    shape: tuple[int, ...], settings: EvalSettings, mixture: ExactReference | None = None,
    weights: dict[str, PriorWeights] | None = None, extra: dict[str, PriorNet] | None = None,
    heldout_labels: Tensor | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:  # fmt: skip
    """Metrics under keys eval/cond/<metric>/prior=<p>/w=<w>, and a grid of samples per prior.

    Fitted priors (auto, mix, checked) take their weights from `weights` (see `fit_priors`); their calibration losses
    and weights are reported under eval/calib/... . `extra` maps more prior networks by name (e.g. a smaller base,
    issue 17's cheap prior): each is used as prior=base is and reported as prior=<name>, paired with self. A model
    that takes the guidance scale as an input is evaluated with prior=distilled too (`generation.usable_priors`). The
    wall time of each (prior, w)'s sampling is eval/cond/sample_seconds/prior=<p>/w=<w>. `mixture`: the data's exact
    distribution where known (toy2d), for the exact NLL and exact guidance's samples. `heldout_labels`: the
    conditions to sample in their proportions instead of every class, and the grid's first 8 (a text model's
    held-out captions, `models.text`).
    """
    priors = evaluation_priors(settings, prior_net, weights or {}, extra or {}, model)
    reference = evaluator.reference_labels if settings.labels == "data" else None
    reference = heldout_labels if heldout_labels is not None else reference
    labels, seeds = eval_labels_seeds(settings.num_samples, model.num_classes, settings.seed, reference)
    results: dict[str, float] = calibration_metrics({p.name: p.weights for p in priors if p.weights is not None})
    results[key("cond", "num_classes")] = float(model.num_classes)  # chance accuracy is 1 / num_classes
    if mixture is not None:
        results[key("cond", "entropy")] = mixture.conditional_entropy()
    ideal = _exact_samples(model, scheduler, labels, seeds, shape, settings, mixture, evaluator, results)
    batched = one_pass_samples(model, scheduler, labels, seeds, shape, settings, priors)
    unguided = None  # w = 1 never evaluates the prior: the same for every prior
    scored: dict[tuple[str, float], Scored] = {}
    for prior in priors:
        for w in settings.guidance_scales:
            if w == 1 and unguided is not None:
                scores, per_sample = unguided
            else:
                x, seconds = batched.get((prior.name, w)) or timed_generate(
                    model, scheduler, labels, seeds, shape, settings, w, prior
                )
                scores, per_sample = sample_scores(x, labels, evaluator, settings, mixture, ideal.get(w))
                scores = {**scores, "sample_seconds": seconds} if seconds is not None else scores
                unguided = (scores, per_sample) if w == 1 else unguided
            scored[(prior.name, w)] = per_sample
            for name, value in scores.items():
                results[key("cond", name, prior=prior.name, scale=w)] = value
    results.update(paired_scores(scored, evaluator.reference, settings))
    return results, _grids(model, scheduler, shape, settings, priors, heldout_labels)


def _exact_samples(
    model: Denoiser, scheduler: DDPMScheduler, labels: Tensor, seeds: Tensor, shape: tuple[int, ...],
    settings: EvalSettings, mixture: ExactReference | None, evaluator: Evaluator, results: dict[str, float],
) -> dict[float, Tensor]:  # fmt: skip
    """Per guided scale, the samples of exact guidance from the same labels and seeds (toy2d; empty without a
    `mixture`), their scores recorded in `results` as prior=exact: the reference of each w."""
    if mixture is None:
        return {}
    exact = mixture.denoiser(model.num_classes, model.null_class, scheduler.alphas_cumprod)
    exact.to(next(model.parameters()).device)
    ideal = {}
    for w in settings.guidance_scales:
        ideal[w] = generate(exact, scheduler, labels, seeds, shape, settings, w)
        for name, value in sample_scores(ideal[w], labels, evaluator, settings, mixture)[0].items():
            results[key("cond", name, prior="exact", scale=w)] = value
    return ideal


def _grids(model: Denoiser, scheduler: DDPMScheduler, shape: tuple[int, ...], settings: EvalSettings,
           priors: list, heldout_labels: Tensor | None = None) -> dict[str, Tensor]:  # fmt: skip
    """A grid of samples per prior: `grid_per_class` per class (or per held-out condition, the first 8) at
    eval.grid_scale (the largest scale when unset)."""
    grid_w = settings.grid_scale if settings.grid_scale is not None else max(settings.guidance_scales)
    rows = torch.arange(model.num_classes) if heldout_labels is None else heldout_labels.unique()[:8]
    g_labels = rows.repeat_interleave(settings.grid_per_class)
    g_seeds = sample_seeds("samples", settings.seed, len(g_labels))
    return {p.name: generate(model, scheduler, g_labels, g_seeds, shape, settings, grid_w, p) for p in priors}

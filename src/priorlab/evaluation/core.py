"""The evaluation itself, shared by the training callbacks and `priorlab evaluate`.

`conditional_quality` samples with each prior and guidance scale and scores the samples; `prior_quality`
compares the fine-tune's unconditional branch with the base's on held-out data; `fit_priors` fits the weights
of prior=auto|mix on a calibration split of the held-out data, disjoint from the samples `prior_quality` uses.
All shard their work over DDP ranks by sample index and return the same numbers whatever the number of processes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab import diffusion
from priorlab.checks import check_eval_settings
from priorlab.data.toy2d import GaussianMixture
from priorlab.errors import UserError
from priorlab.evaluation import metrics
from priorlab.evaluation.calibrate import (
    calibrate,
    calibration_metrics,
    heldout_noise,
    noised_batches,
    uncond_predictions,
)
from priorlab.evaluation.distributed import gather, shard
from priorlab.evaluation.features import Evaluator, external_features
from priorlab.guidance import check_scale
from priorlab.keys import bucket_name, key, scale_name
from priorlab.models.denoiser import Denoiser
from priorlab.priors import (
    FITTABLE,
    FITTED,
    KINDS,
    MODES,
    OBJECTIVES,
    SELF,
    BasePrior,
    DenoiserPrior,
    MixPrior,
    Prior,
    PriorNet,
    PriorWeights,
    bucket_edges,
    bucket_index,
    combine,
    make_prior,
)
from priorlab.sample_many import Setting, sample_many
from priorlab.sampling import sample
from priorlab.seeds import sample_seeds, stream_seed

ONE_PASS_MODES = ("off", "scales", "all")
LABELS = ("uniform", "data")


@dataclass
class EvalSettings:
    """What an evaluation computes.

    Attributes:
        num_samples: generated samples per (prior, guidance scale).
        labels: the classes of those samples: "uniform", classes cycling 0..K-1; "data", in the proportions of the
            evaluator's reference data (`eval_labels`), so that FD against that data compares like with like where
            the classes are unbalanced (the emoji categories: 85 to 360 images).
        num_steps: sampler steps; sampler: scheduler name.
        guidance_scales: the scales w to evaluate; priors: a subset of self, base, auto, mix (auto and mix are
            fitted per timestep bucket on the calibration split, see `priorlab.priors`).
        interval: guidance interval [lo, hi] in σ, or None.
        batch_size: samples per forward pass on each process.
        seed: offset of the per-sample seeds (sample i uses seed·10⁶ + i).
        buckets: timestep buckets of the prior-quality measures and of the fitted priors; heldout: held-out
            samples the prior-quality measures use (the first ones of the validation split).
        calibration: held-out samples that auto and mix are fitted on, the next ones of the validation split
            after `heldout`, so the two sets are disjoint.
        calibration_objective: what auto and mix minimise per timestep bucket: "guided", the loss of the guided
            prediction at each guidance scale (one set of weights per scale), or "null_loss", the ∅ loss (one set
            for every scale); see `priorlab.priors`.
        check_samples: samples per candidate and guidance scale of prior=checked's sampling check.
        kid_subset: subset size of KID; per_class_fd: also FD per class.
        grid_scale: scale of the sample grids (the largest evaluated when None); grid_per_class: columns.
        autocast: sample under bf16 autocast (GPU presets).
        cuda_graphs: on a GPU, replay each step's guided prediction from a CUDA graph (prior self, base, and the
            passes of one_pass; the fitted priors run as launched; `priorlab.sampling.GraphedStep`).
        one_pass: "off", each (prior, w) sampled on its own; "scales", each prior's guidance scales in one sampling
            pass; "all", every (prior, w) in one pass (`priorlab.sample_many`; prior self, base and extra priors,
            the fitted ones sampled on their own). A pass of k settings makes up to 2k × batch_size rows per forward
            pass; its wall time is shared out equally among its settings' sample_seconds (none are recorded for a
            pass over several priors, whose time is not any one prior's). w = 1 is sampled on its own. With
            cuda_graphs, each step of a pass is replayed from one graph too.
        features: "domain", the classifier of `train-evaluator` (the only one implemented; "inception" and
            "dinov2" are refused with an error saying they are not implemented yet).
        evaluator_steps: training steps of that classifier where an evaluation trains it on first use (a cached one
            made with other steps is trained again; one made by `priorlab train-evaluator` is kept).
        bootstrap: resamples of the generated samples for the standard errors of FD and of the paired
            differences between priors (0: none).
    """

    num_samples: int = 1000
    labels: str = "uniform"
    num_steps: int = 25
    sampler: str = "ddim"
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    priors: list[str] = field(default_factory=lambda: ["self", "base"])
    interval: list[float] | None = None
    batch_size: int = 250
    seed: int = 0
    buckets: int = 10
    heldout: int = 500
    calibration: int = 500
    calibration_objective: str = "guided"
    check_samples: int = 256
    kid_subset: int = 500
    per_class_fd: bool = False
    grid_scale: float | None = None
    grid_per_class: int = 6
    autocast: bool = False
    cuda_graphs: bool = False
    one_pass: str = "off"
    features: str = "domain"
    bootstrap: int = 200
    evaluator_steps: int = 1500

    def __post_init__(self):
        check_eval_settings(self)
        self.guidance_scales = [check_scale(w) for w in self.guidance_scales]
        unknown = [p for p in self.priors if p not in MODES]
        if unknown:
            raise UserError(f"eval.priors holds {', '.join(map(str, unknown))}; use some of {', '.join(MODES)}")
        if self.features != "domain":
            external_features(self.features)
        if self.labels not in LABELS:
            raise UserError(f"eval.labels={self.labels} is unknown; use one of {', '.join(LABELS)}")
        if self.one_pass not in ONE_PASS_MODES:
            raise UserError(f"eval.one_pass={self.one_pass} is unknown; use one of {', '.join(ONE_PASS_MODES)}")
        if self.calibration_objective not in OBJECTIVES:
            raise UserError(f"eval.calibration_objective={self.calibration_objective} is unknown; use one of "
                            f"{', '.join(OBJECTIVES)}")  # fmt: skip


@dataclass
class Scored:
    """Per-sample quantities of one set of generated samples, kept for the paired comparisons between priors."""

    feats: Tensor  # (N, D) evaluator features, on the CPU
    values: dict[str, Tensor]  # metric → (N,) per-sample values whose mean is the metric (accuracy, nll, ideal_mse)


def sample_scores(
    x: Tensor, labels: Tensor, evaluator: Evaluator, settings: EvalSettings, mixture: GaussianMixture | None,
    ideal: Tensor | None = None,
) -> tuple[dict[str, float], Scored]:  # fmt: skip
    """FD, KID, precision, recall and accuracy of samples x (on toy2d also the exact NLL and, given `ideal`, the
    distance to the ideal samples), and the per-sample values.

    Precision and recall compare the samples with as many reference features (a subset drawn from
    `settings.seed`, the same for every prior and scale), as Kynkäänniemi et al. do; FD and KID use all of them.
    `ideal` holds the samples that exact guidance gives from the same seeds (`GaussianMixture.denoiser`):
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
                mine, other = scored[(a, w)], scored[(b, w)]
                tag = "" if a == "self" else f"_vs_{a}"
                for name in mine.values.keys() & other.values.keys():
                    out[key("diff", f"{name}_se{tag}", prior=b, scale=w)] = _se(mine.values[name] - other.values[name])
                if boot:
                    out[key("diff", f"fd_se{tag}", prior=b, scale=w)] = float((boot[(a, w)] - boot[(b, w)]).std())
    return out


def _se(d: Tensor) -> float:
    return float(d.double().std() / len(d) ** 0.5) if len(d) > 1 else float("nan")


def generate(
    model: Denoiser, scheduler: DDPMScheduler, labels: Tensor, seeds: Tensor, shape: tuple[int, ...],
    settings: EvalSettings, scale: float = 1.0, prior: Prior = SELF,
) -> Tensor:  # fmt: skip
    """All samples for (labels, seeds) guided with `prior` at `scale`, this rank generating its shard; gathered on
    every rank."""
    idx = shard(len(labels))
    interval = tuple(settings.interval) if settings.interval else None
    x = sample(model, labels[idx], seeds[idx], scheduler, shape, scale, prior, interval, settings.sampler,
               settings.num_steps, settings.batch_size, autocast=settings.autocast,
               graphs=settings.cuda_graphs)  # fmt: skip
    return gather(x, len(labels))


def generate_many(
    model: Denoiser, scheduler: DDPMScheduler, labels: Tensor, seeds: Tensor, shape: tuple[int, ...],
    settings: EvalSettings, batch: list[Setting],
) -> list[Tensor]:  # fmt: skip
    """`generate` for several settings in one sampling pass (`priorlab.sample_many`), gathered on every rank."""
    idx = shard(len(labels))
    interval = tuple(settings.interval) if settings.interval else None
    xs = sample_many(model, labels[idx], seeds[idx], scheduler, shape, batch, interval, settings.sampler,
                     settings.num_steps, settings.batch_size, autocast=settings.autocast,
                     graphs=settings.cuda_graphs)  # fmt: skip
    return [gather(x, len(labels)) for x in xs]


def one_pass_samples(
    model: Denoiser, scheduler: DDPMScheduler, labels: Tensor, seeds: Tensor, shape: tuple[int, ...],
    settings: EvalSettings, priors: list[Prior],
) -> dict[tuple[str, float], tuple[Tensor, float | None]]:  # fmt: skip
    """With eval.one_pass, the samples of each guided (prior name, w) that can share a pass, and each one's share of
    its pass's wall time (None for a pass over several priors). Empty with one_pass=off."""
    guided = [w for w in settings.guidance_scales if w != 1]  # w = 1 (no prior) is sampled once, on its own
    if settings.one_pass == "off" or not guided:
        return {}
    groups: list[list[tuple[tuple[str, float], Setting]]] = []
    for prior in priors:
        if prior.per_row:  # the fitted priors pick rows per step: sampled on their own
            continue
        group = [((prior.name, w), Setting(prior, w)) for w in guided]
        if settings.one_pass == "scales" or not groups:
            groups.append(group)
        else:
            groups[0] += group
    out = {}
    for group in groups:
        started = time.perf_counter()
        xs = generate_many(model, scheduler, labels, seeds, shape, settings, [s for _, s in group])  # on the CPU
        # a pass's time is shared out among its settings; one over several priors says nothing of each prior's cost
        one_prior = len({name[0] for name, _ in group}) <= 1
        seconds = (time.perf_counter() - started) / len(group) if one_prior else None
        out.update({name: (x, seconds) for (name, _), x in zip(group, xs, strict=True)})
    return out


def eval_labels_seeds(num_samples: int, num_classes: int, seed: int, reference: Tensor | None = None
                      ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The evaluation's labels and per-sample seeds: classes cycling 0..K-1, or with `reference` (labels of the
    reference data) in its proportions (`proportional_labels`)."""
    if reference is None:
        labels = torch.arange(num_samples) % num_classes
    else:
        labels = proportional_labels(torch.bincount(reference.cpu(), minlength=num_classes), num_samples)
    return labels, sample_seeds("samples", seed, num_samples)


def proportional_labels(counts: Tensor, n: int) -> Tensor:
    """n labels in the proportions of `counts` (K,), spread out: label i is the class furthest behind its share
    of the first i + 1 labels (ties to the lower class), so every prefix is close to the proportions too and the
    counts are within one of n · share."""
    share = counts.double() / counts.sum()
    given = torch.zeros_like(share)
    out = torch.empty(n, dtype=torch.long)
    for i in range(n):
        k = int(torch.argmax(share * (i + 1) - given))
        out[i] = k
        given[k] += 1
    return out


def usable_priors(settings: EvalSettings, prior_net: PriorNet | None) -> list[str]:
    """The modes of `settings` that can run: those that need a base are left out without one."""
    return [p for p in settings.priors if prior_net is not None or not KINDS[p].needs_net]


def evaluation_priors(settings: EvalSettings, prior_net: PriorNet | None, weights: dict[str, PriorWeights],
                      extra: dict[str, PriorNet]) -> list[Prior]:  # fmt: skip
    """The priors an evaluation samples with, in order: those of eval.priors that can run (`usable_priors`), the fitted
    ones with their `weights` (`fit_priors`), then each extra prior network as a `BasePrior` reported under its name."""
    check_extra_priors(extra)
    modes = usable_priors(settings, prior_net)
    missing = [p for p in modes if p in FITTED and p not in weights]
    if missing:
        raise UserError(f"prior={missing[0]} needs weights fitted on a calibration split (evaluation.fit_priors)")
    priors = [make_prior(p, prior_net, weights.get(p)) for p in modes]
    return priors + [BasePrior(net, name) for name, net in extra.items()]


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
    model: Denoiser, scheduler: DDPMScheduler, prior_net: DenoiserPrior | None, heldout: tuple[Tensor, Tensor] | None,
    settings: EvalSettings, given: dict[str, PriorWeights] | None = None, evaluator: Evaluator | None = None,
    mixture: GaussianMixture | None = None, shape: tuple[int, ...] | None = None,
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
    model: Denoiser, scheduler: DDPMScheduler, prior_net: DenoiserPrior, mix: PriorWeights, labels: Tensor,
    settings: EvalSettings, evaluator: Evaluator | None, mixture: GaussianMixture | None,
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


def check_extra_priors(names) -> None:
    """Names of extra priors (`extra_priors`): letters, digits and '_', and none of the built-in priors' names."""
    for name in names:
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", str(name)) or name in MODES or name == "exact":
            raise UserError(f"extra_priors.{name}: a prior's name must start with a letter, hold only letters, digits "
                            f"and '_', and not be one of {', '.join(MODES)} or exact")  # fmt: skip


def extra_prior_paths(value) -> dict[str, str]:
    """extra_priors={name: PATH, ...} (a mapping from the config, or None) as a dict of names to paths, checked."""
    from omegaconf import DictConfig, OmegaConf

    value = OmegaConf.to_container(value) if isinstance(value, DictConfig) else value
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) and v for v in value.values()):
        raise UserError(f"extra_priors={value!r} must map names to model folders, e.g. extra_priors.small=PATH")
    check_extra_priors(value)
    return dict(value)


def _timed_generate(*args, **kwargs) -> tuple[Tensor, float]:
    """`generate` and its wall time in seconds, the device's work included (the gathered samples are on the CPU,
    so the device has finished by the time they are returned)."""
    started = time.perf_counter()
    x = generate(*args, **kwargs)
    return x, time.perf_counter() - started


def conditional_quality(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: PriorNet | None, evaluator: Evaluator,
    shape: tuple[int, ...], settings: EvalSettings, mixture: GaussianMixture | None = None,
    weights: dict[str, PriorWeights] | None = None, extra: dict[str, PriorNet] | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:  # fmt: skip
    """Metrics under keys eval/cond/<metric>/prior=<p>/w=<w>, and a grid of samples per prior.

    Fitted priors (auto, mix, checked) take their weights from `weights` (see `fit_priors`); their calibration losses
    and weights are reported under eval/calib/... . `extra` maps more prior networks by name (e.g. a smaller base,
    issue 17's cheap prior): each is used as prior=base is and reported as prior=<name>, paired with self. The
    wall time of each (prior, w)'s sampling is eval/cond/sample_seconds/prior=<p>/w=<w>. `mixture`: the data's exact
    distribution where known (toy2d), for the exact NLL and exact guidance's samples.
    """
    priors = evaluation_priors(settings, prior_net, weights or {}, extra or {})
    reference = evaluator.reference_labels if settings.labels == "data" else None
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
                x, seconds = batched.get((prior.name, w)) or _timed_generate(
                    model, scheduler, labels, seeds, shape, settings, w, prior
                )
                scores, per_sample = sample_scores(x, labels, evaluator, settings, mixture, ideal.get(w))
                scores = {**scores, "sample_seconds": seconds} if seconds is not None else scores
                unguided = (scores, per_sample) if w == 1 else unguided
            scored[(prior.name, w)] = per_sample
            for name, value in scores.items():
                results[key("cond", name, prior=prior.name, scale=w)] = value
    results.update(paired_scores(scored, evaluator.reference, settings))
    return results, _grids(model, scheduler, shape, settings, priors)


def _exact_samples(
    model: Denoiser, scheduler: DDPMScheduler, labels: Tensor, seeds: Tensor, shape: tuple[int, ...],
    settings: EvalSettings, mixture: GaussianMixture | None, evaluator: Evaluator, results: dict[str, float],
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
           priors: list) -> dict[str, Tensor]:  # fmt: skip
    """A grid of samples per prior: `grid_per_class` per class at eval.grid_scale (the largest scale when unset)."""
    grid_w = settings.grid_scale if settings.grid_scale is not None else max(settings.guidance_scales)
    g_labels = torch.arange(model.num_classes).repeat_interleave(settings.grid_per_class)
    g_seeds = sample_seeds("samples", settings.seed, len(g_labels))
    return {p.name: generate(model, scheduler, g_labels, g_seeds, shape, settings, grid_w, p) for p in priors}


@torch.no_grad()
def prior_quality(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: DenoiserPrior | None, heldout: tuple[Tensor, Tensor],
    evaluator: Evaluator | None, settings: EvalSettings, mixture: GaussianMixture | None = None,
    weights: dict[str, PriorWeights] | None = None, extra: dict[str, DenoiserPrior] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Unconditional branch of the model (self) vs the base, per timestep bucket and by unconditional samples.
    Extra priors (`extra`, name → prior network) get their own loss (and score error, unconditional FD/KID) under
    model=<name>.

    On held-out data x0 with fixed noise and timesteps: the eps-space denoising loss of each, their
    disagreement ‖eps_self(x_t, ∅) − eps_base(x_t, ∅)‖² (per element), and on toy2d each one's error against
    the exact marginal eps; with fitted `weights` (auto, mix, fitted on another split) also their loss. Then
    FD/KID of unconditional samples of each against the data.
    """
    device = next(model.parameters()).device
    x0_all = heldout[0][: settings.heldout]
    n, num_t = len(x0_all), scheduler.config.num_train_timesteps
    t_all, noise_all = heldout_noise(n, tuple(x0_all.shape[1:]), num_t, stream_seed("heldout", settings.seed))
    idx = shard(n)
    x0, t, noise = x0_all[idx].to(device), t_all[idx].to(device), noise_all[idx].to(device)
    eps_self, eps_base = uncond_predictions(model, scheduler, prior_net, x0, t, noise, settings.batch_size)
    extra = extra or {}
    check_extra_priors(extra)
    eps_extra = {name: _prior_eps(net, scheduler, x0, t, noise, settings.batch_size) for name, net in extra.items()}
    # (metric, model, guidance scale) → per-sample values
    per_sample: dict[tuple[str, str | None, float | None], Tensor] = {("loss", "self", None): _sq(eps_self - noise)}
    truth = None
    if mixture is not None:
        abar = scheduler.alphas_cumprod.to(device)[t]
        x_t = diffusion.add_noise(x0, noise, abar)
        truth = mixture.eps(x_t.cpu(), abar.cpu()).float().to(device)
        per_sample[("score_error", "self", None)] = _sq(eps_self - truth)
    for name, eps in eps_extra.items():
        per_sample[("loss", name, None)] = _sq(eps - noise)
        if truth is not None:
            per_sample[("score_error", name, None)] = _sq(eps - truth)
    if eps_base is not None:
        per_sample[("loss", "base", None)] = _sq(eps_base - noise)
        per_sample[("disagreement", None, None)] = _sq(eps_self - eps_base)
        if truth is not None:
            per_sample[("score_error", "base", None)] = _sq(eps_base - truth)
        for prior, pw in (weights or {}).items():  # weights per guidance scale: the ∅ loss at each guided scale
            for scale in [None] if pw.scales is None else [w for w in pw.scales if w != 1]:
                per_sample[("loss", prior, scale)] = _sq(combine(eps_self, eps_base, pw.at(t, scale)) - noise)
    edges = bucket_edges(num_t, settings.buckets)
    bucket = bucket_index(t_all, edges)
    results = {}
    for (metric, who, scale), values in per_sample.items():
        values = gather(values, n)
        results[key("prior", metric, model=who, scale=scale, bucket="all")] = float(values.mean())
        for b in range(settings.buckets):
            sel = bucket == b
            if sel.any():
                results[key("prior", metric, model=who, scale=scale, bucket=bucket_name(edges, b))] = float(
                    values[sel].mean()
                )
    if evaluator is not None:
        results.update(unconditional_quality(model, scheduler, prior_net, evaluator, tuple(x0_all.shape[1:]),
                                             settings, extra))  # fmt: skip
    return results


def _sq(d: Tensor) -> Tensor:
    return d.float().pow(2).flatten(1).mean(1)


def _prior_eps(prior_net: DenoiserPrior, scheduler: DDPMScheduler, x0: Tensor, t: Tensor, noise: Tensor,
               batch_size: int) -> Tensor:  # fmt: skip
    """eps_ψ(x_t, ∅) of a prior network at x_t = noised x0 with the model's ᾱ (as `uncond_predictions` makes x_t)."""
    out = [prior_net.eps(x_t, abar) for _, _, abar, x_t in noised_batches(scheduler, x0, t, noise, batch_size)]
    return torch.cat(out) if out else noise[:0]


def unconditional_quality(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: DenoiserPrior | None, evaluator: Evaluator,
    shape: tuple[int, ...], settings: EvalSettings, extra: dict[str, DenoiserPrior] | None = None,
) -> dict[str, float]:  # fmt: skip
    """FD and KID of unconditional samples of the model's ∅ branch, of the base and of each extra prior, against
    the data."""
    n = settings.num_samples
    seeds = sample_seeds("samples", settings.seed, n)
    sources = {"self": (model, scheduler)}
    if prior_net is not None:
        sources["base"] = (prior_net.denoiser, prior_net.scheduler)
    for name, net in (extra or {}).items():
        sources[name] = (net.denoiser, net.scheduler)
    out = {}
    for name, (net, sched) in sources.items():
        x = generate(net, sched, torch.full((n,), net.null_class), seeds, shape, settings)
        feats, _ = evaluator.embed(x)
        metrics.check_finite(feats, f"the evaluator features of the unconditional samples of {name}")
        out[key("uncond", "fd", model=name)] = metrics.frechet_distance(feats.cpu(), evaluator.reference)
        out[key("uncond", "kid", model=name)] = metrics.kid(feats.cpu(), evaluator.reference,
                                                            subset_size=settings.kid_subset)  # fmt: skip
    return out

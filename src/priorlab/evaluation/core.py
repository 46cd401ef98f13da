"""The evaluation itself, shared by the training callbacks and `priorlab evaluate`.

`conditional_quality` samples with each prior and guidance scale and scores the samples; `prior_quality`
compares the fine-tune's unconditional branch with the base's on held-out data. Both shard their work over
DDP ranks by sample index and return the same numbers whatever the number of processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab import diffusion
from priorlab.data.toy2d import GaussianMixture
from priorlab.evaluation import metrics
from priorlab.evaluation.distributed import gather, shard
from priorlab.evaluation.features import Evaluator, external_features
from priorlab.guidance import Prior, check_scale
from priorlab.models.denoiser import Denoiser
from priorlab.sampling import sample


@dataclass
class EvalSettings:
    """What an evaluation computes.

    Attributes:
        num_samples: generated samples per (prior, guidance scale); classes cycle 0..K-1.
        num_steps: sampler steps; sampler: scheduler name.
        guidance_scales: the scales w to evaluate; priors: a subset of self, base.
        interval: guidance interval [lo, hi] in σ, or None.
        batch_size: samples per forward pass on each process.
        seed: offset of the per-sample seeds (sample i uses seed·10⁶ + i).
        buckets: timestep buckets of the prior-quality measures; heldout: held-out samples they use.
        kid_subset: subset size of KID; per_class_fd: also FD per class.
        grid_scale: scale of the sample grids (the largest evaluated when None); grid_per_class: columns.
        autocast: sample under bf16 autocast (GPU presets).
        features: "domain" (the classifier of `train-evaluator`), or "inception" / "dinov2", which need their
            weights on disk and say so when they are missing.
    """

    num_samples: int = 1000
    num_steps: int = 25
    sampler: str = "ddim"
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    priors: list[str] = field(default_factory=lambda: ["self", "base"])
    interval: list[float] | None = None
    batch_size: int = 250
    seed: int = 0
    buckets: int = 10
    heldout: int = 500
    kid_subset: int = 500
    per_class_fd: bool = False
    grid_scale: float | None = None
    grid_per_class: int = 6
    autocast: bool = False
    features: str = "domain"

    def __post_init__(self):
        self.guidance_scales = [check_scale(w) for w in self.guidance_scales]
        if self.features != "domain":
            external_features(self.features)


def _fmt(w: float) -> str:
    return f"{float(w):g}" if float(w) != int(w) else f"{float(w):.1f}"


def sample_scores(
    x: Tensor, labels: Tensor, evaluator: Evaluator, settings: EvalSettings, mixture: GaussianMixture | None
) -> dict[str, float]:
    """FD, KID, precision, recall and accuracy of samples x (plus exact NLL on toy2d)."""
    feats, logits = evaluator.embed(x)
    feats, ref = feats.cpu(), evaluator.reference
    out = {
        "fd": metrics.frechet_distance(feats, ref),
        "kid": metrics.kid(feats, ref, subset_size=settings.kid_subset),
    }
    out["precision"], out["recall"] = metrics.precision_recall(ref, feats)
    out["accuracy"] = metrics.accuracy(logits.cpu(), labels.cpu())
    if settings.per_class_fd:
        for k in labels.unique().tolist():
            out[f"fd_class={k}"] = metrics.frechet_distance(feats[labels == k], ref[evaluator.reference_labels == k])
    if mixture is not None:
        out["nll"] = float(-mixture.log_prob(x.cpu(), 1.0, labels.cpu()).mean())
    return out


def generate(
    model: Denoiser, scheduler: DDPMScheduler, labels: Tensor, seeds: Tensor, shape: tuple[int, ...],
    settings: EvalSettings, scale: float = 1.0, prior: str = "self", base: Prior | None = None,
) -> Tensor:  # fmt: skip
    """All samples for (labels, seeds), this rank generating its shard; gathered on every rank."""
    idx = shard(len(labels))
    interval = tuple(settings.interval) if settings.interval else None
    x = sample(model, labels[idx], seeds[idx], scheduler, shape, scale, prior, base, interval,
               settings.sampler, settings.num_steps, settings.batch_size, autocast=settings.autocast)  # fmt: skip
    return gather(x, len(labels))


def eval_labels_seeds(num_samples: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    labels = torch.arange(num_samples) % num_classes
    return labels, seed * 1_000_000 + torch.arange(num_samples)


def conditional_quality(
    model: Denoiser, scheduler: DDPMScheduler, base: Prior | None, evaluator: Evaluator, shape: tuple[int, ...],
    settings: EvalSettings, mixture: GaussianMixture | None = None,
) -> tuple[dict[str, float], dict[str, Tensor]]:  # fmt: skip
    """Metrics under keys eval/cond/<metric>/prior=<p>/w=<w>, and a grid of samples per prior."""
    labels, seeds = eval_labels_seeds(settings.num_samples, model.num_classes, settings.seed)
    results: dict[str, float] = {}
    unguided: dict[str, float] | None = None  # w = 1 never evaluates the prior: the same for every prior
    for prior in settings.priors:
        if prior == "base" and base is None:
            continue
        for w in settings.guidance_scales:
            if w == 1 and unguided is not None:
                scores = unguided
            else:
                x = generate(model, scheduler, labels, seeds, shape, settings, w, prior, base)
                scores = sample_scores(x, labels, evaluator, settings, mixture)
                unguided = scores if w == 1 else unguided
            for name, value in scores.items():
                results[f"eval/cond/{name}/prior={prior}/w={_fmt(w)}"] = value
    grids = {}
    grid_w = settings.grid_scale if settings.grid_scale is not None else max(settings.guidance_scales)
    g_labels = torch.arange(model.num_classes).repeat_interleave(settings.grid_per_class)
    g_seeds = settings.seed * 1_000_000 + torch.arange(len(g_labels))
    for prior in settings.priors:
        if prior == "base" and base is None:
            continue
        grids[prior] = generate(model, scheduler, g_labels, g_seeds, shape, settings, grid_w, prior, base)
    return results, grids


@torch.no_grad()
def prior_quality(
    model: Denoiser, scheduler: DDPMScheduler, base: Prior | None, heldout: tuple[Tensor, Tensor],
    evaluator: Evaluator | None, settings: EvalSettings, mixture: GaussianMixture | None = None,
) -> dict[str, float]:  # fmt: skip
    """Unconditional branch of the model (self) vs the base, per timestep bucket and by unconditional samples.

    On held-out data x0 with fixed noise and timesteps: the eps-space denoising loss of each, their
    disagreement ‖eps_self(x_t, ∅) − eps_base(x_t, ∅)‖² (per element), and on toy2d each one's error against
    the exact marginal eps. Then FD/KID of unconditional samples of each against the data.
    """
    device = next(model.parameters()).device
    x0_all = heldout[0][: settings.heldout]
    n, T = len(x0_all), scheduler.config.num_train_timesteps
    g = torch.Generator().manual_seed(settings.seed + 12345)
    t_all = torch.randint(0, T, (n,), generator=g)
    noise_all = torch.randn(x0_all.shape, generator=g)
    idx = shard(n)
    x0, t, noise = x0_all[idx].to(device), t_all[idx].to(device), noise_all[idx].to(device)
    abar = scheduler.alphas_cumprod.to(device)[t]
    x_t = diffusion.add_noise(x0, noise, abar)
    per_sample: dict[str, Tensor] = {}
    eps_self = diffusion.to_eps(model(x_t, t, torch.full_like(t, model.null_class)), model.prediction_type, x_t, abar)
    per_sample["loss/model=self"] = _sq(eps_self - noise)
    truth = None if mixture is None else mixture.eps(x_t.cpu(), abar.cpu()).float().to(device)
    if truth is not None:
        per_sample["score_error/model=self"] = _sq(eps_self - truth)
    if base is not None:
        eps_base = base(x_t, t)
        per_sample["loss/model=base"] = _sq(eps_base - noise)
        per_sample["disagreement"] = _sq(eps_self - eps_base)
        if truth is not None:
            per_sample["score_error/model=base"] = _sq(eps_base - truth)
    edges = torch.linspace(0, T, settings.buckets + 1).long()
    bucket = torch.bucketize(t_all, edges[1:-1], right=True)
    results = {}
    for name, values in per_sample.items():
        values = gather(values, n)
        results[f"eval/prior/{name}/all"] = float(values.mean())
        for b in range(settings.buckets):
            sel = bucket == b
            if sel.any():
                results[f"eval/prior/{name}/t={int(edges[b])}-{int(edges[b + 1]) - 1}"] = float(values[sel].mean())
    if evaluator is not None:
        results.update(unconditional_quality(model, scheduler, base, evaluator, tuple(x0_all.shape[1:]), settings))
    return results


def _sq(d: Tensor) -> Tensor:
    return d.float().pow(2).flatten(1).mean(1)


def unconditional_quality(
    model: Denoiser, scheduler: DDPMScheduler, base: Prior | None, evaluator: Evaluator, shape: tuple[int, ...],
    settings: EvalSettings,
) -> dict[str, float]:  # fmt: skip
    """FD and KID of unconditional samples of the model's ∅ branch and of the base, against the data."""
    n = settings.num_samples
    seeds = settings.seed * 1_000_000 + torch.arange(n)
    sources = {"self": (model, scheduler)}
    if base is not None:
        sources["base"] = (base.denoiser, base.scheduler)
    out = {}
    for name, (net, sched) in sources.items():
        x = generate(net, sched, torch.full((n,), net.null_class), seeds, shape, settings)
        feats, _ = evaluator.embed(x)
        out[f"eval/uncond/fd/model={name}"] = metrics.frechet_distance(feats.cpu(), evaluator.reference)
        out[f"eval/uncond/kid/model={name}"] = metrics.kid(
            feats.cpu(), evaluator.reference, subset_size=settings.kid_subset
        )
    return out

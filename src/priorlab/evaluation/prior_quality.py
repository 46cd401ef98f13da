"""Prior quality: the fine-tune's unconditional branch against the base and any extra prior networks.

On held-out data with fixed noise and timesteps (`prior_quality`): each network's ∅ denoising loss per timestep
bucket, their disagreement, on toy2d each one's error against the exact eps, and the loss of each fitted prior's
combination; then FD and KID of each network's unconditional samples against the data (`unconditional_quality`).
Keys: eval/prior/<metric>/model=<m>/... and eval/uncond/<metric>/model=<m> (`priorlab.keys`).
"""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab import diffusion
from priorlab.evaluation import metrics
from priorlab.evaluation.calibrate import heldout_noise, noised_batches, uncond_predictions
from priorlab.evaluation.distributed import gather, shard
from priorlab.evaluation.features import Evaluator
from priorlab.evaluation.generation import generate
from priorlab.evaluation.settings import EvalSettings, ExactReference
from priorlab.keys import bucket_name, key
from priorlab.models.denoiser import Denoiser
from priorlab.priors import DenoiserPrior, PriorWeights, bucket_edges, bucket_index, combine
from priorlab.priors.modes import check_extra_priors
from priorlab.seeds import sample_seeds, stream_seed


@torch.no_grad()
def prior_quality(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: DenoiserPrior | None, heldout: tuple[Tensor, Tensor],
    evaluator: Evaluator | None, settings: EvalSettings, mixture: ExactReference | None = None,
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
    truth = None  # toy2d: the exact marginal eps
    if mixture is not None:
        abar = scheduler.alphas_cumprod.to(device)[t]
        truth = mixture.eps(diffusion.add_noise(x0, noise, abar).cpu(), abar.cpu()).float().to(device)
    per_sample = _per_sample(eps_self, eps_base, eps_extra, noise, truth, t, weights or {})
    results = _by_bucket({k: gather(v, n) for k, v in per_sample.items()}, bucket_edges(num_t, settings.buckets),
                         t_all)  # fmt: skip
    if evaluator is not None:
        results.update(unconditional_quality(model, scheduler, prior_net, evaluator, tuple(x0_all.shape[1:]),
                                             settings, extra))  # fmt: skip
    return results


def _per_sample(eps_self: Tensor, eps_base: Tensor | None, eps_extra: dict[str, Tensor], noise: Tensor,
                truth: Tensor | None, t: Tensor, weights: dict[str, PriorWeights]) -> dict[tuple, Tensor]:  # fmt: skip
    """(metric, model, guidance scale) → per-sample values: each network's ∅ loss ‖eps − noise‖² and score error
    ‖eps − eps_true‖² (per element), the disagreement ‖eps_self − eps_base‖², and each fitted prior's ∅ loss of
    (1 − λ)·eps_self + λ·eps_base (at each guided scale where fitted per scale)."""
    out: dict[tuple[str, str | None, float | None], Tensor] = {("loss", "self", None): _sq(eps_self - noise)}
    if truth is not None:
        out[("score_error", "self", None)] = _sq(eps_self - truth)
    for name, eps in eps_extra.items():
        out[("loss", name, None)] = _sq(eps - noise)
        if truth is not None:
            out[("score_error", name, None)] = _sq(eps - truth)
    if eps_base is None:
        return out
    out[("loss", "base", None)] = _sq(eps_base - noise)
    out[("disagreement", None, None)] = _sq(eps_self - eps_base)
    if truth is not None:
        out[("score_error", "base", None)] = _sq(eps_base - truth)
    for prior, pw in weights.items():  # weights per guidance scale: the ∅ loss at each guided scale
        for scale in [None] if pw.scales is None else [w for w in pw.scales if w != 1]:
            out[("loss", prior, scale)] = _sq(combine(eps_self, eps_base, pw.at(t, scale)) - noise)
    return out


def _by_bucket(per_sample: dict[tuple, Tensor], edges: Tensor, t: Tensor) -> dict[str, float]:
    """The mean of each (metric, model, scale)'s per-sample values over all samples and per timestep bucket."""
    bucket = bucket_index(t, edges)
    results = {}
    for (metric, who, scale), values in per_sample.items():
        results[key("prior", metric, model=who, scale=scale, bucket="all")] = float(values.mean())
        for b in range(len(edges) - 1):
            sel = bucket == b
            if sel.any():
                name = bucket_name(edges, b)
                results[key("prior", metric, model=who, scale=scale, bucket=name)] = float(values[sel].mean())
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

"""Fitting the priors' weights on priorlab's own denoisers (`priorlab.priors.fit_weights` on their predictions).

`calibrate` queries the guided model θ and the prior network ψ on calibration samples, sharded over DDP ranks,
and fits each fitted prior's per-bucket weights; `calibration_metrics` reports what it fitted under metric keys.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.evaluation.distributed import gather, shard
from priorlab.keys import bucket_name, key, scale_of
from priorlab.priors import FITTABLE, OBJECTIVES, PriorNet, PriorWeights, fit_weights

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

    from priorlab.models.denoiser import Denoiser


def heldout_noise(n: int, shape: tuple[int, ...], num_train_timesteps: int, seed: int) -> tuple[Tensor, Tensor]:
    """Fixed timesteps (n,) and noise (n, *shape) for held-out measurements, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, num_train_timesteps, (n,), generator=g)
    return t, torch.randn((n, *shape), generator=g)


def noised_batches(scheduler: DDPMScheduler, x0: Tensor, t: Tensor, noise: Tensor, batch_size: int | None = None):
    """(rows, t, ᾱ_t, x_t) for each batch of at most `batch_size` rows (all at once without): x_t = sqrt(ᾱ_t)·x0 +
    sqrt(1 − ᾱ_t)·noise with the scheduler's ᾱ, x0, t and noise on one device."""
    abar_all = scheduler.alphas_cumprod.to(x0.device)
    step = max(1, batch_size or len(x0))
    for start in range(0, len(x0), step):
        rows = slice(start, start + step)
        abar = abar_all[t[rows]]
        yield rows, t[rows], abar, diffusion.add_noise(x0[rows], noise[rows], abar)


@torch.no_grad()
def uncond_predictions(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: PriorNet | None, x0: Tensor, t: Tensor, noise: Tensor,
    batch_size: int | None = None, labels: Tensor | None = None,
) -> tuple[Tensor, ...]:  # fmt: skip
    """eps_θ(x_t, ∅) of the model and eps_ψ(x_t, ∅) of the prior network (None without one) at x_t = noised x0;
    with `labels` (N,) also eps_θ(x_t, c) at those labels, third (in one batched pass with the ∅ branch).

    x0, t and noise lie on the model's device; x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise with the model's ᾱ.
    """
    selves, bases, conds = [], [], []
    for sl, tb, abar, x_t in noised_batches(scheduler, x0, t, noise, batch_size):
        null = torch.full_like(tb, model.null_class)
        if labels is None:
            selves.append(diffusion.to_eps(model(x_t, tb, null), model.prediction_type, x_t, abar))
        else:
            both = torch.cat([x_t, x_t])
            abar2 = torch.cat([abar, abar])
            out = diffusion.to_eps(model(both, torch.cat([tb, tb]), torch.cat([null, labels[sl].to(tb.device)])),
                                   model.prediction_type, both, abar2)  # fmt: skip
            selves.append(out[: len(x_t)])
            conds.append(out[len(x_t) :])
        if prior_net is not None:
            bases.append(prior_net.eps(x_t, abar))
    out = (torch.cat(selves), torch.cat(bases) if prior_net is not None else None)
    return (*out, torch.cat(conds)) if labels is not None else out


@torch.no_grad()
def calibrate(
    model: Denoiser, scheduler: DDPMScheduler, prior_net: PriorNet, x0: Tensor, buckets: int,
    priors: tuple[str, ...] = FITTABLE, seed: int = 0, batch_size: int | None = None, objective: str = "null_loss",
    labels: Tensor | None = None, scales: list[float] | None = None,
) -> dict[str, PriorWeights]:  # fmt: skip
    """Fit the weights of `priors` (auto, mix) for model θ and prior network ψ on calibration samples x0 (N, ...),
    one noise draw per sample; the guided objective needs the samples' `labels` (N,) and the guidance `scales`.

    The work is sharded over DDP ranks and gathered, so every rank fits the same weights.
    """
    if objective not in OBJECTIVES:
        raise UserError(f"calibration objective {objective!r} is unknown; use one of {', '.join(OBJECTIVES)}")
    if objective == "guided" and (labels is None or not scales):
        raise UserError("the guided calibration objective needs labelled calibration data and guidance scales")
    device = next(model.parameters()).device
    n, num_t = len(x0), scheduler.config.num_train_timesteps
    t, noise = heldout_noise(n, tuple(x0.shape[1:]), num_t, seed)
    idx = shard(n)
    guided = objective == "guided"
    preds = uncond_predictions(model, scheduler, prior_net, x0[idx].to(device), t[idx].to(device),
                               noise[idx].to(device), batch_size, labels[idx] if guided else None)  # fmt: skip
    eps_self, eps_base, *cond = (gather(p, n) for p in preds)
    extra = {"eps_cond": cond[0], "scales": list(scales)} if guided else {}
    return {prior: fit_weights(eps_self, eps_base, noise, t, num_t, buckets, prior, objective, **extra)
            for prior in priors}  # fmt: skip


def calibration_metrics(weights: dict[str, PriorWeights]) -> dict[str, float]:
    """The calibration losses per bucket and overall (eval/calib/loss/model=<m>/...) and each prior's weights.

    `all` is the count-weighted mean over buckets; `log_ratio` is the mean over buckets with data of
    log(L_self / L_base) of the ∅ loss, positive where the base's loss is lower. Weights fitted on the guided
    objective add, per scale, eval/calib/guided_loss/model=<m>/w=<w>/... and weights under .../prior=<p>/w=<w>/.
    """
    out: dict[str, float] = {}
    for prior, pw in weights.items():
        losses, edges = pw.losses or {}, pw.edges
        count = losses.get("count", [])
        for scale in pw.scales or [None]:
            row = pw.row(scale)
            for b in range(len(row)):
                out[key("calib", "weight", prior=prior, scale=scale, bucket=bucket_name(edges, b))] = float(row[b])
        _loss_metrics(out, "loss", None, losses, ("self", "base", prior), count, edges)
        for name, by_model in (losses.get("guided") or {}).items():
            _loss_metrics(out, "guided_loss", scale_of(name), by_model, ("self", "base", prior), count, edges)
        check = losses.get("check") or {}
        for name, by_model in (check.get("scores") or {}).items():
            for model, value in by_model.items():
                out[key("calib", f"check_{check['metric']}", model=model, scale=scale_of(name))] = float(value)
        if "seconds" in check:
            out[key("calib", "check_seconds")] = float(check["seconds"])
        ratios = [math.log(s / b) for s, b in zip(losses.get("self", []), losses.get("base", []), strict=False)
                  if s is not None and b is not None and s > 0 and b > 0]  # fmt: skip
        if ratios:
            out[key("calib", "log_ratio", bucket="all")] = sum(ratios) / len(ratios)
    return out


def _loss_metrics(out: dict, name: str, scale: float | None, losses: dict, models: tuple, count: list,
                  edges: Tensor) -> None:  # fmt: skip
    for model in models:
        values = losses.get(model, [])
        for b, v in enumerate(values):
            if v is not None:
                out[key("calib", name, model=model, scale=scale, bucket=bucket_name(edges, b))] = float(v)
        pairs = [(v, c) for v, c in zip(values, count, strict=False) if v is not None]
        if pairs:
            out[key("calib", name, model=model, scale=scale, bucket="all")] = (sum(v * c for v, c in pairs)
                                                                            / sum(c for _, c in pairs))  # fmt: skip

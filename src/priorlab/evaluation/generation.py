"""Generating an evaluation's samples: its priors built once, its labels and seeds, and the sampling itself.

`evaluation_priors` turns eval.priors (the config's mode strings) and the extra priors into prior objects
(`priorlab.priors.make_prior`: each validated once, here); from then on a prior travels as one object, through
`generate` to `sampling.sample` and `guidance.guide`. Each rank generates its shard of the samples, gathered on every
rank, so the numbers are the same whatever the number of processes; `one_pass_samples` batches the (prior, w) settings
that can share a sampling pass (`priorlab.sample_many`).
"""

from __future__ import annotations

import time

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab.errors import UserError
from priorlab.evaluation.distributed import gather, shard
from priorlab.evaluation.settings import EvalSettings
from priorlab.models.denoiser import Denoiser
from priorlab.priors import FITTED, KINDS, SELF, BasePrior, Prior, PriorNet, PriorWeights, make_prior
from priorlab.priors.modes import DISTILLED, check_extra_priors
from priorlab.sample_many import Setting, sample_many
from priorlab.sampling import sample
from priorlab.seeds import sample_seeds


def usable_priors(settings: EvalSettings, prior_net: PriorNet | None, model: Denoiser | None = None) -> list[str]:
    """The modes of `settings` that can run: those that need a base are left out without one. A model that takes the
    guidance scale as an input (a fine-tune trained with guidance_distill) is evaluated with prior=distilled too,
    the prior it was trained for, where eval.priors does not name it."""
    modes = [p for p in settings.priors if prior_net is not None or not KINDS[p].needs_net]
    takes_scale = getattr(model, "scale_embedding", None) is not None
    return [*modes, DISTILLED] if takes_scale and DISTILLED not in modes else modes


def check_guided(settings: EvalSettings, model: Denoiser, prior_net: PriorNet | None = None) -> None:
    """Refuse, before anything is sampled (or trained), a mode of the evaluation that cannot guide `model` at
    eval.guidance_scales (prior=distilled: a model without the scale input, or scales it was not trained for)."""
    for mode in usable_priors(settings, prior_net, model):
        KINDS[mode].check_guided(model, settings.guidance_scales)


def evaluation_priors(settings: EvalSettings, prior_net: PriorNet | None, weights: dict[str, PriorWeights],
                      extra: dict[str, PriorNet], model: Denoiser | None = None) -> list[Prior]:  # fmt: skip
    """The priors an evaluation samples with, in order: those of eval.priors that can run (`usable_priors`: with
    `model`, checked to guide it, `check_guided`), the fitted ones with their `weights` (`fit_priors`), then each
    extra prior network as a `BasePrior` reported under its name."""
    check_extra_priors(extra)
    modes = usable_priors(settings, prior_net, model)
    if model is not None:
        check_guided(settings, model, prior_net)
    missing = [p for p in modes if p in FITTED and p not in weights]
    if missing:
        raise UserError(f"prior={missing[0]} needs weights fitted on a calibration split (evaluation.fit_priors)")
    priors = [make_prior(p, prior_net, weights.get(p), fused=settings.fused) for p in modes]
    return priors + [BasePrior(net, name, settings.fused) for name, net in extra.items()]


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


def timed_generate(*args, **kwargs) -> tuple[Tensor, float]:
    """`generate` and its wall time in seconds, the device's work included (the gathered samples are on the CPU,
    so the device has finished by the time they are returned)."""
    started = time.perf_counter()
    x = generate(*args, **kwargs)
    return x, time.perf_counter() - started


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

"""Several (prior, guidance scale) settings of the same samples in one sampling pass (issue 17, item 3).

An evaluation samples the same labels and seeds once per prior and scale. `sample_many` runs every setting's
trajectory side by side in one batch: at each step the model θ makes one pass over every row (the conditional
branch of each setting, and the ∅ branch of the prior=self settings), and each prior network one pass over the
rows of its settings (`guidance.guide_blocks`, the guided step of `guidance.guide` over several settings). Each
setting's samples are those `sampling.sample` gives it alone, up to the rounding of other batch shapes: every row
keeps its own generator, so stochastic samplers draw the same per-step noise.
The cost is memory: a chunk of `batch_size` samples makes up to 2 × settings × `batch_size` rows per pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler
from torch import Tensor

from priorlab.errors import UserError
from priorlab.guidance import guide_blocks
from priorlab.models.denoiser import Denoiser
from priorlab.priors import Prior
from priorlab.priors.fused import refresh_pairs
from priorlab.sampling import can_graph, graphed_step, trajectory, weights_key


@dataclass(frozen=True)
class Setting:
    """One trajectory per sample: the prior (self, base, none, distilled: one base weight for every row) and the
    scale."""

    prior: Prior
    scale: float


@torch.no_grad()
def check_settings(model: Denoiser, settings: list[Setting]) -> None:
    """Refuse a setting that cannot share a pass (a prior whose weight differs by row) or that the model cannot be
    guided with (`Prior.check_guided`: prior=distilled on a model without a scale embedding, or outside its range)."""
    for s in settings:
        if s.prior.per_row:
            raise UserError(f"prior={s.prior.name} cannot share a sampling pass; one pass takes the priors of one "
                            "weight for every row (self, base, none)")  # fmt: skip
        s.prior.check_guided(model, [s.scale])


def sample_many(
    model: Denoiser, labels: Tensor, seeds: Tensor, train_scheduler: DDPMScheduler, sample_shape: tuple[int, ...],
    settings: list[Setting], interval: tuple[float, float] | None = None, sampler: str = "ddim", num_steps: int = 25,
    batch_size: int = 256, autocast: bool = False, graphs: bool = False,
) -> list[Tensor]:  # fmt: skip
    """One sample per (label, seed) pair for each setting, all in one pass; returns one (N, *sample_shape) tensor per
    setting, in order, on the model's device. `batch_size` counts samples per chunk (each with every setting).
    `graphs`: on a GPU, replay each step's prediction of the whole pass from a CUDA graph (`sampling.GraphedStep`;
    one graph per chunk size and guided/unguided step) where every base prior is a priorlab denoiser on the model's
    GPU (`sampling.can_graph`); elsewhere the same computation runs launched."""
    check_settings(model, settings)
    device = next(model.parameters()).device
    abar = train_scheduler.alphas_cumprod.to(device)
    k = len(settings)
    reads = [s.prior.reads for s in settings]  # the prior networks a step reads
    graphed = graphs and can_graph(device, *reads)
    # what a pass's graphs depend on besides the chunk size and the step's guidance, named once per pass rather than
    # at every step (weights_key reads the address of every weight of each network)
    weights = weights_key(model, *reads) if graphed else ()
    if graphed:
        refresh_pairs(model, *reads)  # a replay reads θ and ψ's stacked weights (fused=on|auto) as they are now
    pass_key = ("many", autocast, *[(s.prior.mode, float(s.scale)) for s in settings])
    blocks = [(s.prior, s.scale) for s in settings]
    out: list[list[Tensor]] = [[] for _ in settings]
    for start in range(0, len(labels), batch_size):
        y = labels[start : start + batch_size].to(device)
        b = len(y)
        y_all = y.repeat(k)

        def predict(x_in: Tensor, t: Tensor, guided: bool, y_all=y_all, b=b) -> Tensor:
            def step(x_rows: Tensor, t_step: Tensor, y_rows: Tensor, abar_all: Tensor) -> Tensor:
                # no cast cache (sampling.graphed_guide says why)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
                    abar_rows = abar_all[t_step.expand(len(x_rows))]
                    return guide_blocks(model, x_rows, t_step, y_rows, abar_rows, blocks, guided)

            inputs = (x_in, t, y_all, abar)
            if not graphed:
                return step(*inputs)
            return graphed_step(model, weights, (*pass_key, b, guided), step, inputs, keep=tuple(reads))(*inputs)

        # every setting's trajectory of a sample starts from that sample's seed
        x = trajectory(seeds[start : start + batch_size].repeat(k), sample_shape, train_scheduler, sampler, num_steps,
                       device, interval, predict)  # fmt: skip
        for j in range(k):
            out[j].append(x[j * b : (j + 1) * b])
    return [torch.cat(parts) for parts in out]

"""Every random stream's seed, derived in one place: a named stream, the run's (or evaluation's) seed, and the
indices that pick one draw of the stream (a sample, an optimizer step, a process).

Streams that must never share draws get distinct names. The numbers are the ones priorlab has always used, so
runs made before this module existed reproduce bit for bit.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Evaluation streams: the offset added to the evaluation's seed (`eval.seed`).
OFFSETS = {
    "samples": 0,  # the generated samples of an evaluation: identical for every prior, batch size and process count
    "check": 777,  # prior=checked's sampling check, apart from the evaluation's own samples
    "heldout": 12_345,  # the timesteps and noise of the prior-quality measures on held-out data
    "calibration": 54_321,  # the timesteps and noise on which prior=auto|mix are fitted
}
PER_SAMPLE = 1_000_000  # sample i of seed s: (s + offset)·10⁶ + i, distinct while an evaluation has < 10⁶ samples
PER_STEP = 1_000_003  # a prime: (seed·p + step) is distinct over (seed, step) for steps below p
PER_RANK = 1_009  # a prime above any process count: one training-noise stream per process
VALIDATION = 1_000  # validation batch k uses seed 1000 + k: the same noise at every validation of every run
MAX = 2**64


def stream_seed(stream: str, seed: int) -> int:
    """The seed of an evaluation stream (one generator for the whole stream)."""
    return int(seed) + OFFSETS[stream]


def sample_seeds(stream: str, seed: int, n: int) -> Tensor:
    """The per-sample seeds (n,) of an evaluation stream: sample i gets its own generator."""
    return stream_seed(stream, seed) * PER_SAMPLE + torch.arange(n)


def batch_seed(run_seed: int, split_seed: int) -> int:
    """The seed of a run's stream of training batches, from the run's seed and the data's split seed (distinct
    pairs give distinct seeds for split seeds below PER_STEP)."""
    return (int(run_seed) * PER_STEP + int(split_seed)) % MAX


def step_seed(seed: int, step: int) -> int:
    """The seed of optimizer step `step` of a batch stream `seed` (`batch_seed`)."""
    return (int(seed) * PER_STEP + int(step)) % MAX


def noise_seed(run_seed: int, step: int, rank: int) -> int:
    """The seed of the label dropout, timesteps and noise of optimizer step `step` on process `rank`."""
    return (int(run_seed) * PER_STEP + int(step)) * PER_RANK + int(rank)


def validation_seed(batch_idx: int) -> int:
    """The seed of validation batch `batch_idx`'s timesteps and noise."""
    return VALIDATION + int(batch_idx)

"""Sample-quality metrics over feature vectors, and the exact measures available on toy2d.

FD: Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), torchmetrics'
`FrechetInceptionDistance`. KID: unbiased polynomial-kernel MMD² averaged over subsets (Bińkowski et al. 2018),
torchmetrics' `KernelInceptionDistance`. Both classes take our domain network's features, already computed once
per evaluation and shared by every metric, through their feature-extractor argument (`Precomputed`, which passes
them on), so neither needs Inception, torch-fidelity or torchvision.

Precision and recall: the k-NN manifold estimates of Kynkäänniemi et al. (2019): precision is the share of
generated samples inside some real sample's k-NN ball, recall the share of real samples inside some generated
sample's ball. torchmetrics has no such metric, so they are written here. Their k-NN radii and ball tests are
computed in blocks of `chunk` rows, so memory grows as chunk × N rather than N²; like the paper, compare equal
numbers of real and generated samples (`subsample` draws the real ones).

Every metric refuses non-finite features with a `UserError`: they come from diverged samples, and the linear
algebra on them gives NaN at best (a crash inside MKL at worst).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from priorlab.errors import UserError

CHUNK = 1024  # rows per block of pairwise distances: 1024 × N float64 values at a time


def check_finite(features: Tensor, what: str = "the features") -> None:
    """Raise a one-line UserError when `features` (N, D) hold NaN or infinite values."""
    bad = ~torch.isfinite(features).reshape(len(features), -1).all(1)
    if bad.any():
        raise UserError(
            f"{what} hold NaN or infinite values ({int(bad.sum())} of {len(features)} samples): the samples diverged, "
            "usually because the model's weights are non-finite; lower optimizer.lr or use a more stable precision"
        )


def subsample(features: Tensor, n: int, seed: int = 0) -> Tensor:
    """At most n rows of `features`, drawn without replacement from a generator seeded by `seed` (all when n ≥ N)."""
    if n >= len(features):
        return features
    idx = torch.randperm(len(features), generator=torch.Generator().manual_seed(seed))[:n]
    return features[idx.sort().values]


class Precomputed(nn.Module):
    """The feature extractor handed to torchmetrics' FD and KID: the "images" it receives are feature vectors
    (N, D) already computed by the domain network, passed on in float64. `num_features` spares torchmetrics its
    probe with a dummy 299×299 image."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features.double()


def _fd_metric(dim: int) -> FrechetInceptionDistance:
    # sync_on_compute=False: under DDP the features are gathered before any metric is computed, so a sync would
    # count every process's features once more (or wait for processes that compute nothing)
    return FrechetInceptionDistance(feature=Precomputed(dim), reset_real_features=False, sync_on_compute=False)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FD between the Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    check_finite(a, "the features of the first set")
    check_finite(b, "the features of the second set")
    metric = _fd_metric(a.shape[1])
    metric.update(b, real=True)
    metric.update(a, real=False)
    return float(metric.compute())


def _gaussian(sums: Tensor, outer: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from a feature sum (…, D) and sum of outer products (…, D, D) over n rows: the
    running-sum formulas of torchmetrics' FrechetInceptionDistance.compute, batched."""
    mean = sums / n
    cov = (outer - n * mean[..., :, None] * mean[..., None, :]) / (n - 1)
    return mean, cov


def bootstrap_fd(features: Tensor, reference: Tensor, draws: Tensor, chunk: int = 32) -> Tensor:
    """FD against the fixed `reference` of each resample of `features` (N, D); draws (B, N) holds the indices.

    The resampling (paired over samples by the caller's shared `draws`) is ours: torchmetrics has no bootstrap. Each
    resample's statistics come from a weighted sum (the count of each row in the draw), `chunk` resamples at a
    time, and the distance from torchmetrics' formula (trace of the square root through the eigenvalues of
    Σ_ref Σ_res), which equals tr √(Σ_ref^½ Σ_res Σ_ref^½) for the symmetric PSD covariances and is computed so:
    one symmetric eigendecomposition of Σ_ref, then batched symmetric eigenvalues (eigenvalues rounded below 0
    count as 0). B resamples cost batched matrix products, not B metric objects.
    """
    check_finite(features, "the features of the generated samples")
    x, ref = features.double(), reference.double().to(features.device)
    mean_ref, cov_ref = _gaussian(ref.sum(0), ref.T @ ref, len(ref))
    vals, vecs = torch.linalg.eigh(cov_ref)
    root = (vecs * vals.clamp(min=0).sqrt()) @ vecs.T  # Σ_ref^½
    n, out = draws.shape[1], []
    for part in draws.to(features.device).split(chunk):
        counts = torch.zeros(len(part), len(x), dtype=x.dtype, device=x.device)
        counts.scatter_add_(1, part, torch.ones_like(part, dtype=x.dtype))
        sums = counts @ x
        outer = torch.einsum("bn,nd,ne->bde", counts, x, x)
        mean, cov = _gaussian(sums, outer, n)
        a = (mean_ref - mean).square().sum(-1)
        b = cov_ref.trace() + cov.diagonal(dim1=-2, dim2=-1).sum(-1)
        c = torch.linalg.eigvalsh(root @ cov @ root).clamp(min=0).sqrt().sum(-1)
        out.append(a + b - 2 * c)
    return torch.cat(out).cpu() if out else torch.zeros(0, dtype=torch.float64)


def kid(a: Tensor, b: Tensor, subsets: int = 10, subset_size: int = 500, seed: int = 0) -> float:
    """Mean unbiased MMD² with the cubic polynomial kernel over random subsets of min(subset_size, N, M) rows.

    torchmetrics draws the subsets from torch's global generator; it is seeded with `seed` inside a forked random
    state, so the value is reproducible and the caller's random stream is left as it was.
    """
    check_finite(a, "the features of the first set")
    check_finite(b, "the features of the second set")
    size = min(subset_size, len(a), len(b))
    with warnings.catch_warnings():  # "will save all extracted features": they are in memory already
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        metric = KernelInceptionDistance(feature=Precomputed(a.shape[1]), subsets=subsets, subset_size=size,
                                         sync_on_compute=False)  # fmt: skip
    # `a` is passed as the "real" set because torchmetrics draws its subset first (MMD² is symmetric)
    metric.update(a.cpu(), real=True)
    metric.update(b.cpu(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, _ = metric.compute()
    return float(mean)


def _knn_radii(x: Tensor, k: int, chunk: int = CHUNK) -> Tensor:
    """Distance from each row of x (N, D) to its k-th nearest other row, in blocks of `chunk` rows."""
    # k + 1: the nearest row is the point itself, at distance 0
    return torch.cat([torch.cdist(block, x).kthvalue(k + 1, dim=1).values for block in x.split(chunk)])


def _coverage(points: Tensor, manifold: Tensor, radii: Tensor, chunk: int = CHUNK) -> float:
    """Share of `points` inside some ball (centre a row of `manifold`, radius its entry of `radii`)."""
    inside = [(torch.cdist(block, manifold) <= radii[None, :]).any(dim=1) for block in points.split(chunk)]
    return float(torch.cat(inside).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3, chunk: int = CHUNK) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour balls.

    Memory is O(chunk × (N + M)); pass equal numbers of real and generated samples (see `subsample`).
    """
    check_finite(real, "the reference features")
    check_finite(fake, "the features of the generated samples")
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return precision, recall


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of samples the evaluator assigns to their intended class."""
    return float((logits.argmax(1) == labels).double().mean())

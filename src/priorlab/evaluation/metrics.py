"""Sample-quality metrics over feature vectors, and the exact measures available on toy2d.

FD: Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), computed with
torchmetrics' `_compute_fid`. KID: unbiased polynomial-kernel MMD² averaged over subsets (Bińkowski et al.
2018), torchmetrics' `poly_mmd`. Precision and recall: the k-NN manifold estimates of Kynkäänniemi et al.
(2019): precision is the share of generated samples inside some real sample's k-NN ball, recall the share of
real samples inside some generated sample's ball. Their k-NN radii and ball tests are computed in blocks of
`chunk` rows, so memory grows as chunk × N rather than N²; like the paper, compare equal numbers of real and
generated samples (`subsample` draws the real ones).

Every metric refuses non-finite features with a `UserError`: they come from diverged samples, and the linear
algebra on them gives NaN at best (a crash inside MKL at worst).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd

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


def mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) in float64."""
    f = features.double()
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (len(f) - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FD between the Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    check_finite(a, "the features of the first set")
    check_finite(b, "the features of the second set")
    mu_a, cov_a = mean_cov(a)
    mu_b, cov_b = mean_cov(b)
    return float(_compute_fid(mu_a, cov_a, mu_b, cov_b))


def bootstrap_fd(features: Tensor, reference: Tensor, draws: Tensor) -> Tensor:
    """FD against the fixed `reference` of each resample of `features` (N, D); draws (B, N) holds the indices."""
    check_finite(features, "the features of the generated samples")
    mu_r, cov_r = mean_cov(reference)
    f = features.double()
    out = []
    for idx in draws:
        mu, cov = mean_cov(f[idx])
        out.append(float(_compute_fid(mu, cov, mu_r, cov_r)))
    return torch.tensor(out, dtype=torch.float64)


def kid(a: Tensor, b: Tensor, subsets: int = 10, subset_size: int = 500, seed: int = 0) -> float:
    """Mean unbiased MMD² with the cubic polynomial kernel over random subsets (fixed seed)."""
    check_finite(a, "the features of the first set")
    check_finite(b, "the features of the second set")
    g = torch.Generator().manual_seed(seed)
    size = min(subset_size, len(a), len(b))
    values = []
    for _ in range(subsets):
        ia = torch.randperm(len(a), generator=g)[:size]
        ib = torch.randperm(len(b), generator=g)[:size]
        values.append(poly_mmd(a[ia].double(), b[ib].double()))
    return float(torch.stack(values).mean())


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

"""Sample-quality metrics over feature vectors, and the exact measures available on toy2d.

FD: Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017), computed with
torchmetrics' `_compute_fid`. KID: unbiased polynomial-kernel MMD² averaged over subsets (Bińkowski et al.
2018), torchmetrics' `poly_mmd`. Precision and recall: the k-NN manifold estimates of Kynkäänniemi et al.
(2019): precision is the share of generated samples inside some real sample's k-NN ball, recall the share of
real samples inside some generated sample's ball.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.image.fid import _compute_fid
from torchmetrics.image.kid import poly_mmd


def mean_cov(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (D,) and covariance (D, D) in float64."""
    f = features.double()
    mu = f.mean(0)
    centered = f - mu
    return mu, centered.T @ centered / (len(f) - 1)


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """FD between the Gaussians fitted to feature sets a (N, D) and b (M, D)."""
    mu_a, cov_a = mean_cov(a)
    mu_b, cov_b = mean_cov(b)
    return float(_compute_fid(mu_a, cov_a, mu_b, cov_b))


def kid(a: Tensor, b: Tensor, subsets: int = 10, subset_size: int = 500, seed: int = 0) -> float:
    """Mean unbiased MMD² with the cubic polynomial kernel over random subsets (fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    size = min(subset_size, len(a), len(b))
    values = []
    for _ in range(subsets):
        ia = torch.randperm(len(a), generator=g)[:size]
        ib = torch.randperm(len(b), generator=g)[:size]
        values.append(poly_mmd(a[ia].double(), b[ib].double()))
    return float(torch.stack(values).mean())


def _knn_radii(x: Tensor, k: int) -> Tensor:
    d = torch.cdist(x, x)
    return d.kthvalue(k + 1, dim=1).values  # the k-th neighbour, skipping the point itself


def _coverage(points: Tensor, manifold: Tensor, radii: Tensor) -> float:
    d = torch.cdist(points, manifold)  # (P, M)
    return float((d <= radii[None, :]).any(dim=1).double().mean())


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-nearest-neighbour balls."""
    real, fake = real.double(), fake.double()
    precision = _coverage(fake, real, _knn_radii(real, k))
    recall = _coverage(real, fake, _knn_radii(fake, k))
    return precision, recall


def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Share of samples the evaluator assigns to their intended class."""
    return float((logits.argmax(1) == labels).double().mean())

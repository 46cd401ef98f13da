import math

import pytest
import torch

from priorlab.data import GaussianMixture, Toy2DDataModule


@pytest.fixture
def mixture():
    return GaussianMixture.ring(num_classes=5, radius=2.0, std=0.4, weights=[1, 2, 3, 1, 1], rotation=0.3)


@pytest.mark.parametrize("abar", [1.0, 0.9, 0.5, 0.05, 1e-3])
def test_scores_equal_autograd_of_noised_log_density(mixture, abar):
    x = torch.randn(64, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2.5
    x.requires_grad_(True)
    labels = torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(1))
    (grad_marginal,) = torch.autograd.grad(mixture.log_prob(x, abar).sum(), x)
    (grad_conditional,) = torch.autograd.grad(mixture.log_prob(x, abar, labels).sum(), x)
    with torch.no_grad():
        torch.testing.assert_close(mixture.score(x, abar), grad_marginal, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mixture.score(x, abar, labels), grad_conditional, rtol=1e-10, atol=1e-10)
        eps = mixture.eps(x, torch.full((64,), abar, dtype=torch.float64))
        torch.testing.assert_close(eps, -math.sqrt(1 - abar) * grad_marginal)


def test_noised_density_integrates_to_one_and_matches_component_formula(mixture):
    grid = torch.linspace(-6, 6, 401, dtype=torch.float64)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.flatten(), yy.flatten()], 1)
    cell = (grid[1] - grid[0]) ** 2
    for abar in (1.0, 0.3):
        assert mixture.log_prob(pts, abar).exp().sum() * cell == pytest.approx(1.0, abs=1e-3)
    # At ᾱ = 0 every component is the standard normal.
    x = torch.tensor([[0.5, -1.0]], dtype=torch.float64)
    expected = -0.5 * (0.25 + 1.0) - math.log(2 * math.pi)
    assert mixture.log_prob(x, 0.0).item() == pytest.approx(expected, rel=1e-12)


def test_samples_follow_weights_and_means(mixture):
    x, y = mixture.sample(40_000, torch.Generator().manual_seed(0))
    freq = torch.bincount(y, minlength=5).double() / len(y)
    torch.testing.assert_close(freq, mixture.weights, atol=0.01, rtol=0)
    for k in range(5):
        torch.testing.assert_close(x[y == k].mean(0), mixture.means[k], atol=0.03, rtol=0)


def test_datamodule_split_is_deterministic_and_disjoint():
    a, b = (
        Toy2DDataModule(num_samples=500, val_fraction=0.2),
        Toy2DDataModule(num_samples=500, val_fraction=0.2),
    )
    a.setup(), b.setup()
    assert a.sample_shape == (2,) and a.num_classes == 8
    assert len(a.val_set) == 100 and len(a.train_set) == 400
    torch.testing.assert_close(a.val_set.tensors[0], b.val_set.tensors[0])
    train_rows = {tuple(r.tolist()) for r in a.train_set.tensors[0]}
    assert not any(tuple(r.tolist()) in train_rows for r in a.val_set.tensors[0])

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


def test_the_exact_denoiser_predicts_the_true_eps_and_samples_the_components():
    from diffusers import DDPMScheduler

    from priorlab.sampling import sample

    mixture = GaussianMixture.ring(num_classes=4, radius=2.0, std=0.3)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False)
    exact = mixture.denoiser(4, 4, sched.alphas_cumprod)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t, labels = torch.tensor([10, 200, 500, 700, 900, 999]), torch.tensor([0, 1, 4, 2, 4, 3])
    abar = sched.alphas_cumprod[t].double()
    out = exact(x, t, labels)
    cond = labels != 4
    torch.testing.assert_close(out[cond], mixture.eps(x[cond], abar[cond], labels[cond]).float())
    torch.testing.assert_close(out[~cond], mixture.eps(x[~cond], abar[~cond]).float())  # the null class: marginal
    torch.testing.assert_close(exact(x, t, labels, force_drop=True), mixture.eps(x, abar).float())
    # unguided sampling with the true scores lands on each class's component
    samples = sample(exact, torch.arange(400) % 4, torch.arange(400), sched, (2,), num_steps=25, batch_size=400)
    for k in range(4):
        mean = samples[torch.arange(400) % 4 == k].mean(0).double()
        assert torch.linalg.norm(mean - mixture.means[k]) < 0.15


def test_ideal_mse_is_the_distance_to_the_exact_samples_from_the_same_seeds():
    from priorlab.evaluation.conditional_quality import sample_scores
    from priorlab.evaluation.features import Classifier, Evaluator
    from priorlab.evaluation.settings import EvalSettings

    mixture = GaussianMixture.ring(num_classes=3, radius=2.0, std=0.3)
    net = Classifier((2,), 3, width=4, feature_dim=8).eval()
    x, labels = mixture.sample(50, torch.Generator().manual_seed(0))
    x = x.float()
    with torch.no_grad():
        ev = Evaluator(net, net.features(x), labels, 1.0)
    settings = EvalSettings(kid_subset=10)
    scores, per_sample = sample_scores(x, labels, ev, settings, mixture, ideal=x)
    assert scores["ideal_mse"] == 0.0
    shifted, per_sample = sample_scores(x, labels, ev, settings, mixture, ideal=x + torch.tensor([0.3, -0.4]))
    assert shifted["ideal_mse"] == pytest.approx(0.25) and per_sample.values["ideal_mse"].shape == (50,)
    assert "ideal_mse" not in sample_scores(x, labels, ev, settings, mixture)[0]

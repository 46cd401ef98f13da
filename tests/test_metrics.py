import pytest
import torch

from priorlab.evaluation import metrics


@pytest.fixture
def feats():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2000, 8, generator=g), torch.randn(2000, 8, generator=g)


def test_fd_of_a_set_against_itself_is_zero_and_grows_with_a_shift(feats):
    a, b = feats
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    fds = [metrics.frechet_distance(a, b + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert fds[0] < 0.05 and all(x < y for x, y in zip(fds, fds[1:], strict=False))
    # a pure mean shift of s in each of 8 dimensions adds 8·s² to FD
    assert fds[3] - fds[0] == pytest.approx(8 * 4.0, rel=0.05)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two(feats):
    a, b = feats
    assert abs(metrics.kid(a, b, subset_size=500)) < 0.05
    assert metrics.kid(a, b + 1.0, subset_size=500) > 1.0


def test_precision_recall_of_identical_and_disjoint_sets(feats):
    a, _ = feats
    assert metrics.precision_recall(a[:500], a[:500]) == (1.0, 1.0)
    p, r = metrics.precision_recall(a[:500], a[:500] + 100.0)
    assert p == 0.0 and r == 0.0
    # generated samples collapsed onto one real point: precise but no recall
    p, r = metrics.precision_recall(a[:500], a[:1].repeat(200, 1))
    assert p == 1.0 and r < 0.05


def test_accuracy():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert metrics.accuracy(logits, torch.tensor([0, 1, 1])) == pytest.approx(2 / 3)


@pytest.mark.parametrize("name", ["inception", "dinov2", "clip"])
def test_feature_networks_without_local_weights_give_a_clear_error(name):
    from priorlab.errors import UserError
    from priorlab.evaluation.core import EvalSettings

    with pytest.raises(UserError, match=f"features={name}"):
        EvalSettings(features=name)
    assert EvalSettings(features="domain").features == "domain"

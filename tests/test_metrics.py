import pytest
import torch

from conftest import across_shapes_atol, assert_close_across_shapes
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


@pytest.mark.parametrize(
    ("name", "message"),
    [("inception", "is not implemented yet, whatever weights are on disk"), ("dinov2", "is not implemented yet"),
     ("clip", "is unknown")],
)  # fmt: skip
def test_feature_networks_other_than_domain_are_refused_even_with_weights_on_disk(name, message, tmp_path, monkeypatch):
    from priorlab.errors import UserError
    from priorlab.evaluation.settings import EvalSettings

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # weights and code where torch.hub looks
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints/weights-inception-2015-12-05-6726825d.pth").write_bytes(b"weights")
    (tmp_path / "facebookresearch_dinov2_main").mkdir()
    with pytest.raises(UserError, match=f"features={name} {message}"):
        EvalSettings(features=name)
    assert EvalSettings(features="domain").features == "domain"


def test_precision_recall_in_blocks_equals_the_whole_computation(feats):
    """Blocks of 7 rows and the whole matrix are different cdist computations (more than 25 rows take a matmul
    kernel), so the radii agree to float64 rounding, and precision and recall may differ only by the points that lie
    within that rounding of some ball's boundary: each such point may flip, no other may."""
    a, b = feats[0][:300], feats[1][:200] + 0.3
    whole = torch.cdist(a.double(), a.double()).kthvalue(4, dim=1).values
    assert_close_across_shapes(metrics._knn_radii(a.double(), 3, chunk=7), whole)

    def on_boundary(points: torch.Tensor, manifold: torch.Tensor) -> int:
        d = torch.cdist(points.double(), manifold.double())
        radii = torch.cdist(manifold.double(), manifold.double()).kthvalue(4, dim=1).values
        tol = across_shapes_atol(d) + across_shapes_atol(radii)  # a distance and a radius may each move
        return int(((d - radii[None, :]).abs() <= tol).any(dim=1).sum())

    p, r = metrics.precision_recall(a, b, chunk=7)
    p_whole, r_whole = metrics.precision_recall(a, b, chunk=10_000)
    assert abs(p - p_whole) <= on_boundary(b, a) / len(b)
    assert abs(r - r_whole) <= on_boundary(a, b) / len(a)
    assert 0.3 < p < 1.0 and 0.3 < r < 1.0  # overlapping, not identical sets


def _evaluator(reference: torch.Tensor):
    from priorlab.evaluation.features import Classifier, Evaluator

    torch.manual_seed(0)
    net = Classifier((2,), 3, width=8, feature_dim=16).eval()
    with torch.no_grad():
        return Evaluator(net, net.features(reference), torch.arange(len(reference)) % 3, 1.0)


def test_sample_scores_compare_with_as_many_reference_features_in_bounded_memory(monkeypatch):
    """A reference of 5,000 features against 100 samples: no pairwise-distance block exceeds 100 × 100 (the
    whole 5,000² matrix is what made toy2d's 200k reference run out of memory)."""
    from priorlab.evaluation.conditional_quality import sample_scores
    from priorlab.evaluation.settings import EvalSettings

    g = torch.Generator().manual_seed(0)
    ev = _evaluator(torch.randn(5000, 2, generator=g))
    x, labels = torch.randn(100, 2, generator=g), torch.arange(100) % 3
    settings = EvalSettings(kid_subset=50)
    largest = []
    cdist = torch.cdist
    monkeypatch.setattr(torch, "cdist", lambda a, b, *args, **kw: largest.append(len(a) * len(b)) or cdist(a, b))
    scores, per_sample = sample_scores(x, labels, ev, settings, None)
    assert max(largest) <= 100 * 100
    feats, _ = ev.embed(x)
    expected = metrics.precision_recall(metrics.subsample(ev.reference, 100, settings.seed), feats)
    assert (scores["precision"], scores["recall"]) == expected  # the same features, subset and blocks: exact
    assert sample_scores(x, labels, ev, settings, None)[0] == scores  # the subset is drawn from the seed
    # the per-sample values kept for the paired comparisons are those the scores are means of
    assert per_sample.feats.shape == (100, 16) and set(per_sample.values) == {"accuracy"}
    assert float(per_sample.values["accuracy"].mean()) == scores["accuracy"]
    assert 0.5 < scores["precision"] <= 1.0 and 0.5 < scores["recall"] <= 1.0  # the same distribution
    sub = metrics.subsample(ev.reference, 100, seed=0)
    assert len(sub) == 100 and len(torch.unique(sub, dim=0)) == 100  # drawn without replacement
    assert not torch.equal(sub, metrics.subsample(ev.reference, 100, seed=1))


def test_non_finite_features_are_a_one_line_user_error(feats):
    from priorlab.errors import UserError
    from priorlab.evaluation.conditional_quality import sample_scores
    from priorlab.evaluation.settings import EvalSettings

    a, b = feats
    bad = b.clone()
    bad[3, 0] = float("nan")
    bad[7, 1] = float("inf")
    for fn in (metrics.frechet_distance, metrics.kid, metrics.precision_recall):
        with pytest.raises(UserError, match=r"NaN or infinite values \(2 of 2000 samples\)"):
            fn(a, bad)
    ev = _evaluator(torch.randn(50, 2))
    x = torch.randn(10, 2)
    x[0] = float("nan")
    with pytest.raises(UserError, match="features of the generated samples hold NaN") as err:
        sample_scores(x, torch.arange(10) % 3, ev, EvalSettings(kid_subset=5), None)
    assert "\n" not in str(err.value) and "weights are non-finite" in str(err.value)


def test_the_evaluators_translation_moves_each_image_by_its_own_offset_within_the_shift():
    from priorlab.evaluation.features import translate

    x = torch.zeros(400, 1, 7, 7)
    x[:, 0, 3, 3] = 1.0  # one bright pixel in the middle of each image
    moved = translate(x, 1, torch.Generator().manual_seed(0))
    assert moved.shape == x.shape
    where = moved[:, 0].flatten(1).argmax(1)
    rows, cols = where // 7, where % 7
    assert moved.flatten(1).sum(1).eq(1).all()  # the pixel moved, nothing was smeared or lost
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == {(r, c) for r in (2, 3, 4) for c in (2, 3, 4)}
    edge = torch.arange(49.0).reshape(1, 1, 7, 7)  # at the border, the edge row/column is repeated
    shifted = translate(edge.expand(50, 1, 7, 7), 1, torch.Generator().manual_seed(1))
    for img in shifted[:, 0]:
        assert set(img.flatten().tolist()) <= set(range(49))
    assert torch.equal(translate(edge, 0, torch.Generator()), edge)


def _old_fd(a: torch.Tensor, b: torch.Tensor) -> float:
    """The hand-written FD this module used before torchmetrics' public class: centred float64 covariances into
    torchmetrics' private `_compute_fid`."""
    from torchmetrics.image.fid import _compute_fid

    def mean_cov(f):
        f = f.double()
        mu = f.mean(0)
        return mu, (f - mu).T @ (f - mu) / (len(f) - 1)

    return float(_compute_fid(*mean_cov(a), *mean_cov(b)))


def _old_kid(a: torch.Tensor, b: torch.Tensor, subsets: int = 10, subset_size: int = 500, seed: int = 0) -> float:
    """The hand-written KID subset loop used before torchmetrics' public class."""
    from torchmetrics.image.kid import poly_mmd

    g = torch.Generator().manual_seed(seed)
    size = min(subset_size, len(a), len(b))
    values = []
    for _ in range(subsets):
        ia, ib = torch.randperm(len(a), generator=g)[:size], torch.randperm(len(b), generator=g)[:size]
        values.append(poly_mmd(a[ia].double(), b[ib].double()))
    return float(torch.stack(values).mean())


@pytest.mark.parametrize("shift", [0.0, 0.3, 3.0])
def test_fd_and_kid_equal_the_hand_written_formulas(feats, shift):
    """The library classes give what the former hand-written code gave, on features with a large common offset too
    (the covariance from running sums loses digits there, but not enough to matter in float64)."""
    a, b = feats
    a, b = a[:700] * 2 + 50.0, b[:900] + 50.0 + shift
    assert metrics.frechet_distance(a, b) == pytest.approx(_old_fd(a, b), rel=1e-9, abs=1e-9)
    for size, subsets, seed in [(100, 7, 3), (500, 10, 0), (5000, 2, 1)]:  # 5000: clipped to the smaller set
        new = metrics.kid(a, b, subsets=subsets, subset_size=size, seed=seed)
        assert new == pytest.approx(_old_kid(a, b, subsets, size, seed), rel=1e-9, abs=1e-12)
    draws = torch.randint(0, len(a), (5, len(a)), generator=torch.Generator().manual_seed(2))
    boot = metrics.bootstrap_fd(a, b, draws)
    torch.testing.assert_close(boot, torch.tensor([_old_fd(a[i], b) for i in draws], dtype=torch.float64),
                               rtol=1e-9, atol=1e-9)  # fmt: skip


def test_kid_leaves_the_global_random_state_alone(feats):
    a, b = feats
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    metrics.kid(a, b, subset_size=50)
    assert torch.equal(torch.rand(3), expected)

"""prior=auto and prior=mix: fitting per-bucket weights, combining, saving, and guiding with them."""

import json
import math

import pytest
import torch
from diffusers import DDPMScheduler

from conftest import across_shapes_atol, assert_close_across_shapes, perturbed_mlp
from priorlab.data.toy2d import GaussianMixture
from priorlab.errors import UserError
from priorlab.evaluation.calibrate import calibrate, calibration_metrics
from priorlab.guidance import guide
from priorlab.keys import scale_name
from priorlab.priors import DenoiserPrior as Prior
from priorlab.priors import MixPrior, PriorWeights, bucket_edges, combine, fit_weights, make_prior
from priorlab.sampling import sample

T = 1000


def _crossing_case(n=40_000, dim=4, seed=0):
    """Predictions whose errors are independent, self's std rising with t (0.1 → 1), the base's falling (1 → 0.1).

    In bucket b the optimal convex weight of the base is E_b[σ_s²] / (E_b[σ_s²] + E_b[σ_b²]), and the base is
    the better candidate exactly where t ≥ T/2.
    """
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, T, (n,), generator=g)
    noise = torch.randn(n, dim, generator=g)
    s_self, s_base = 0.1 + 0.9 * t / T, 1.0 - 0.9 * t / T
    eps_self = noise + s_self[:, None] * torch.randn(n, dim, generator=g)
    eps_base = noise + s_base[:, None] * torch.randn(n, dim, generator=g)
    return eps_self, eps_base, noise, t


def _expected_mix_weights(buckets=10):
    edges = bucket_edges(T, buckets)
    out = []
    for b in range(buckets):
        tt = torch.arange(int(edges[b]), int(edges[b + 1]), dtype=torch.float64)
        vs, vb = ((0.1 + 0.9 * tt / T) ** 2).mean(), ((1.0 - 0.9 * tt / T) ** 2).mean()
        out.append(float(vs / (vs + vb)))
    return torch.tensor(out)


def _bucket_loss(eps, noise, t, edges):
    per = (eps - noise).pow(2).mean(1)
    b = torch.bucketize(t, edges[1:-1], right=True)
    return torch.stack([per[b == k].mean() for k in range(len(edges) - 1)])


def test_auto_takes_base_at_high_noise_and_self_at_low_noise():
    eps_self, eps_base, noise, t = _crossing_case()
    auto = fit_weights(eps_self, eps_base, noise, t, T, 10, "auto")
    assert auto.edges.tolist() == list(range(0, 1001, 100))
    assert auto.base_weight.tolist() == [0.0] * 5 + [1.0] * 5
    assert auto.mode == "auto" and sum(auto.losses["count"]) == len(t)
    for b in range(10):  # the chosen candidate has the lower recorded loss
        chosen = "base" if auto.base_weight[b] == 1 else "self"
        assert auto.losses["auto"][b] == auto.losses[chosen][b] == min(auto.losses["self"][b], auto.losses["base"][b])


def test_mix_weights_rise_with_noise_and_match_the_optimal_convex_weight():
    eps_self, eps_base, noise, t = _crossing_case()
    mix = fit_weights(eps_self, eps_base, noise, t, T, 10, "mix")
    w = mix.base_weight
    assert (w.diff() > 0).all() and w[0] < 0.05 and w[-1] > 0.95
    torch.testing.assert_close(w, _expected_mix_weights().float(), atol=0.02, rtol=0)
    assert ((w > 0.5) == torch.tensor([False] * 5 + [True] * 5)).all()  # the same buckets as auto


def test_fitted_weights_lower_the_calibration_loss_against_both_fixed_choices():
    eps_self, eps_base, noise, t = _crossing_case(n=8000)
    edges = bucket_edges(T, 10)
    loss = {name: _bucket_loss(eps, noise, t, edges) for name, eps in (("self", eps_self), ("base", eps_base))}
    for mode in ("auto", "mix"):
        pw = fit_weights(eps_self, eps_base, noise, t, T, 10, mode)
        fitted = _bucket_loss(combine(eps_self, eps_base, pw.at(t)), noise, t, edges)
        torch.testing.assert_close(fitted.double(), torch.tensor(pw.losses[mode], dtype=torch.float64), rtol=1e-4,
                                   atol=0)  # fmt: skip
        assert (fitted <= torch.minimum(loss["self"], loss["base"]) + 1e-6).all(), mode
        overall = (combine(eps_self, eps_base, pw.at(t)) - noise).pow(2).mean()
        for fixed in (eps_self, eps_base):
            assert overall < 0.8 * (fixed - noise).pow(2).mean(), mode
    mix = fit_weights(eps_self, eps_base, noise, t, T, 10, "mix")
    auto_loss = torch.tensor(fit_weights(eps_self, eps_base, noise, t, T, 10, "auto").losses["auto"])
    assert (torch.tensor(mix.losses["mix"]) < auto_loss).all()  # interior optimum in every bucket here


def test_mix_weight_is_the_closed_form_least_squares_solution_clipped():
    # one sample per bucket: a = eps_self − noise, d = eps_base − eps_self, w* = −a·d / d·d
    noise = torch.zeros(3, 2)
    eps_self = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 1.0]])
    eps_base = torch.tensor([[0.0, 0.0], [-3.0, 0.0], [2.0, 2.0]])  # w* = 1; 0.25; −1 → clipped to 0
    t = torch.tensor([50, 550, 950])
    pw = fit_weights(eps_self, eps_base, noise, t, T, 3, "mix")
    torch.testing.assert_close(pw.base_weight, torch.tensor([1.0, 0.25, 0.0]))
    # losses per element: bucket 2 is the self loss (1 + 1) / 2 = 1; bucket 1 at w = 0.25: (1 − 1)² / 2 = 0
    assert pw.losses["mix"] == pytest.approx([0.0, 0.0, 1.0]) and pw.losses["base"][1] == pytest.approx(4.5)


def test_empty_buckets_take_the_nearest_weight_and_report_no_loss():
    noise = torch.zeros(2, 1)
    pw = fit_weights(torch.ones(2, 1), torch.zeros(2, 1), noise, torch.tensor([10, 910]), T, 4, "auto")
    assert pw.base_weight.tolist() == [1.0, 1.0, 1.0, 1.0]
    assert pw.losses["count"] == [1, 0, 0, 1] and pw.losses["self"][1] is None
    keys = calibration_metrics({"auto": pw})
    assert "eval/calib/loss/model=self/t=250-499" not in keys
    assert keys["eval/calib/loss/model=self/all"] == pytest.approx(1.0) and keys["eval/calib/loss/model=base/all"] == 0
    with pytest.raises(UserError, match="calibration split is empty"):
        fit_weights(torch.ones(0, 1), torch.ones(0, 1), torch.ones(0, 1), torch.zeros(0).long(), T, 4, "mix")
    with pytest.raises(UserError, match="prior=self cannot be fitted"):
        fit_weights(torch.ones(2, 1), torch.zeros(2, 1), noise, torch.tensor([10, 910]), T, 4, "self")


def test_calibration_metrics_log_ratio_sign():
    pw = PriorWeights(torch.tensor([0, 500, 1000]), torch.tensor([0.0, 1.0]), "auto",
                      {"self": [1.0, 4.0], "base": [2.0, 1.0], "auto": [1.0, 1.0], "count": [5, 15]})  # fmt: skip
    m = calibration_metrics({"auto": pw})
    assert m["eval/calib/log_ratio/all"] == pytest.approx((math.log(0.5) + math.log(4.0)) / 2)
    assert m["eval/calib/loss/model=self/all"] == pytest.approx((5 * 1 + 15 * 4) / 20)
    assert m["eval/calib/weight/prior=auto/t=500-999"] == 1.0


def test_weights_at_timesteps_and_their_file_round_trip(tmp_path):
    pw = PriorWeights(torch.tensor([0, 250, 500, 1000]), torch.tensor([0.0, 0.3, 1.0]), "mix", {"self": [1, 2, 3]})
    t = torch.tensor([0, 249, 250, 499, 500, 999, 1000, -3])
    assert pw.at(t).tolist() == pytest.approx([0.0, 0.0, 0.3, 0.3, 1.0, 1.0, 1.0, 0.0])
    assert pw.at(t.float() + 0.4).tolist() == pytest.approx([0.0, 0.0, 0.3, 0.3, 1.0, 1.0, 1.0, 0.0])
    path = pw.save(tmp_path / "sub" / "w.json")
    assert not list(path.parent.glob(".*tmp"))
    back = PriorWeights.load(path)
    assert torch.equal(back.edges, pw.edges) and torch.equal(back.base_weight, pw.base_weight)
    assert back.mode == "mix" and back.losses == {"self": [1, 2, 3]} and back.num_train_timesteps == 1000


def test_bad_weights_files_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        PriorWeights.load(tmp_path / "missing.json")
    (tmp_path / "corrupt.json").write_text('{"format": "priorlab.prior')
    with pytest.raises(UserError, match="not valid JSON"):
        PriorWeights.load(tmp_path / "corrupt.json")
    (tmp_path / "other.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a priorlab prior-weights record"):
        PriorWeights.load(tmp_path / "other.json")
    good = PriorWeights(torch.tensor([0, 1000]), torch.tensor([0.5]), "mix").to_dict()
    for change, message in [({"base_weight": [1.5]}, "must lie in"), ({"edges": [0, 500, 400]}, "rise strictly"),
                            ({"mode": "auto"}, "must each be 0"),
                            ({"base_weight": [0.1, 0.2]}, r"need weights of shape \(1,\), got \(2,\)"),
                            ({"edges": None}, "malformed")]:  # fmt: skip
        (tmp_path / "bad.json").write_text(json.dumps({**good, **change}))
        with pytest.raises(UserError, match=message) as err:
            PriorWeights.load(tmp_path / "bad.json")
        assert "\n" not in str(err.value)


def test_combine_is_exact_at_the_ends_and_convex_between():
    s, b = torch.randn(4, 3), torch.randn(4, 3)
    b_nan = b.clone()
    b_nan[0] = float("nan")  # a row that w = 0 never reads
    out = combine(s, b_nan, torch.tensor([0.0, 1.0, 0.25, 0.5]))
    assert torch.equal(out[0], s[0]) and torch.equal(out[1], b[1])
    torch.testing.assert_close(out[2], 0.75 * s[2] + 0.25 * b[2])
    assert torch.equal(combine(s, None, torch.zeros(4)), s) and torch.equal(combine(None, b, torch.ones(4)), b)
    with pytest.raises(ValueError, match="every weight must be 1"):
        combine(None, b, torch.tensor([1.0, 0.5, 1.0, 1.0]))


class Counting(torch.nn.Module):
    """Wraps a denoiser and counts the rows it is asked to predict."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.rows = inner, 0
        self.null_class, self.prediction_type = inner.null_class, inner.prediction_type
        self.num_classes = inner.num_classes

    def forward(self, x, t, labels, force_drop=None):
        self.rows += len(x)
        return self.inner(x, t, labels, force_drop)


_model = perturbed_mlp


def test_auto_evaluates_each_row_only_on_its_chosen_network(batch):
    sched, x, t, y, abar = batch
    model, base_net = Counting(_model(0)), Counting(_model(1))
    auto = PriorWeights(torch.tensor([0, 500, 1000]), torch.tensor([0.0, 1.0]), "auto")
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 3.0, MixPrior(Prior(base_net, sched, sched.alphas_cumprod), auto))
        assert model.rows == 6 + 3 and base_net.rows == 3  # cond for all; ∅ of self for t < 500; base for t ≥ 500
        null = torch.full_like(y, 4)
        own, other = model.inner(x, t, null), base_net.inner(x, t, null)
        uncond = torch.cat([own[:3], other[3:]])
        expected = uncond + 3.0 * (model.inner(x, t, y) - uncond)
    # guide() ran θ on 9 rows and ψ on 3, the hand computation on batches of 6
    assert_close_across_shapes(out.guided, expected)
    assert ((own - other).abs().amax(1) > 10 * across_shapes_atol(own)).all()  # either network's ∅ is seen per row
    assert out.base_weight.tolist() == [0, 0, 0, 1, 1, 1]


def test_mix_guides_with_the_convex_combination_and_respects_the_interval(batch):
    sched, x, t, y, abar = batch
    model, base_net = _model(0), Counting(_model(1))
    mix = PriorWeights(torch.tensor([0, 200, 600, 1000]), torch.tensor([0.0, 0.5, 1.0]), "mix")
    prior = Prior(base_net, sched, sched.alphas_cumprod)
    with torch.no_grad():
        out = guide(model, x, t, y, abar, 2.0, MixPrior(prior, mix))
        null = torch.full_like(y, 4)
        w = torch.tensor([0.0, 0.0, 0.5, 0.5, 1.0, 1.0])[:, None]
        own, other = model(x, t, null), base_net.inner(x, t, null)
        uncond = (1 - w) * own + w * other
        # guide() ran θ on 10 rows and ψ on 4, the hand computation on batches of 6
        assert_close_across_shapes(out.guided, uncond + 2.0 * (model(x, t, y) - uncond))
        assert ((own - other).abs().amax(1) > 10 * across_shapes_atol(own)).all()  # a wrong weight is seen per row
        assert base_net.rows == 4
        s = (1 - abar) / abar
        base_net.rows = 0
        inside = guide(model, x, t, y, abar, 2.0, MixPrior(prior, mix), (float(s[1].sqrt()), float(s[3].sqrt())))
    assert inside.guided_rows.tolist() == [False, True, True, True, False, False]
    assert base_net.rows == 2  # t = 300 and 500: inside the interval with a base weight above 0
    # θ ran on 9 rows and ψ on 2 here, on 10 and 4 rows there
    assert_close_across_shapes(inside.guided[inside.guided_rows], out.guided[inside.guided_rows])
    torch.testing.assert_close(inside.guided[~inside.guided_rows], inside.cond[~inside.guided_rows])


def test_sampling_with_all_self_or_all_base_weights_equals_the_fixed_priors():
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    model, base = _model(0), Prior(_model(1), sched, sched.alphas_cumprod)
    labels, seeds = torch.tensor([0, 1, 2, 3]), torch.arange(4)
    kw = dict(train_scheduler=sched, sample_shape=(2,), scale=3.0, num_steps=6)
    edges = bucket_edges(T, 5)
    runs = {}
    for name, prior, w in [("self", "self", None), ("base", "base", None), ("auto0", "auto", torch.zeros(5)),
                           ("auto1", "auto", torch.ones(5)), ("mix", "mix", torch.full((5,), 0.5))]:  # fmt: skip
        weights = None if w is None else PriorWeights(edges, w, prior)
        runs[name] = sample(model, labels, seeds, prior=make_prior(prior, base, weights), **kw)
    # weights of all 0 (all 1) run θ on the same 8 rows (θ on 4 rows and ψ on the same 4) as prior=self (base) at
    # every step, and combine() picks θ's (ψ's) ∅ exactly: the same computations, so these are bit for bit
    assert torch.equal(runs["auto0"], runs["self"])
    assert torch.equal(runs["auto1"], runs["base"])
    assert (runs["mix"] - runs["self"]).abs().mean() > 1e-3 and (runs["mix"] - runs["base"]).abs().mean() > 1e-3
    with pytest.raises(UserError, match="fitted over 500 training timesteps but the model has 1000"):
        sample(model, labels, seeds, prior=MixPrior(base, PriorWeights(bucket_edges(500, 5), torch.zeros(5), "auto")),
               **kw)  # fmt: skip


class Exact(torch.nn.Module):
    """A denoiser whose ∅ prediction is the toy mixture's exact eps plus an error of std err(t)."""

    def __init__(self, mixture, sched, err, seed):
        super().__init__()
        self.mixture, self.abar, self.err, self.seed = mixture, sched.alphas_cumprod, err, seed
        self.null_class, self.prediction_type, self.num_classes = mixture.num_classes, "epsilon", mixture.num_classes
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, labels, force_drop=None):
        eps = self.mixture.eps(x, self.abar[t]).float()
        g = torch.Generator().manual_seed(int(t.sum()) + self.seed)
        return eps + self.err(t.float() / len(self.abar))[:, None] * torch.randn(eps.shape, generator=g)


def test_calibrate_on_denoisers_picks_the_network_that_is_better_per_noise_level():
    mixture = GaussianMixture.ring(4, 2.0, 0.3)
    sched = DDPMScheduler(beta_schedule="squaredcos_cap_v2")
    model = Exact(mixture, sched, lambda s: 0.05 + 0.6 * s, seed=0)  # good at low noise, poor at high noise
    base = Prior(Exact(mixture, sched, lambda s: 0.65 - 0.6 * s, seed=1), sched, sched.alphas_cumprod)
    x0, _ = mixture.sample(4000, torch.Generator().manual_seed(1))
    fitted = calibrate(model, sched, base, x0.float(), buckets=4, seed=3, batch_size=1000)
    assert fitted["auto"].base_weight.tolist() == [0.0, 0.0, 1.0, 1.0]
    w = fitted["mix"].base_weight
    assert (w.diff() > 0).all() and w[0] < 0.2 and w[-1] > 0.8


def _guided_case(n=60_000, seed=0):
    """Joint samples (x0, c) of a 4-component mixture, noised at uniform t; candidates with x-dependent errors:
    the fine-tune's ∅ and conditional branches share an error (as a fine-tune's do), the base's ∅ has its own."""
    g = torch.Generator().manual_seed(seed)
    angles = torch.arange(4, dtype=torch.float64) * math.pi / 2
    mixture = GaussianMixture(torch.stack([2 * angles.cos(), 2 * angles.sin()], 1), std=0.4)
    x0, c = mixture.sample(n, generator=g)
    abar_all = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
    t = torch.randint(0, T, (n,), generator=g)
    noise = torch.randn(n, 2, dtype=torch.float64, generator=g)
    abar = abar_all[t]
    x_t = abar.sqrt()[:, None] * x0 + (1 - abar).sqrt()[:, None] * noise
    exact_c, exact_null = mixture.eps(x_t, abar, c), mixture.eps(x_t, abar)
    shared = 0.15 * torch.sin(1.3 * x_t)  # the fine-tune's error, in both of its branches
    eps_self = exact_null + shared + 0.4 * torch.cos(x_t)
    eps_base = exact_null + 0.3 * (x_t - 0.5).tanh()
    eps_cond = exact_c + shared
    return t, noise, eps_self, eps_base, eps_cond, exact_c, exact_null


def test_guided_objective_ranks_candidates_by_their_distance_to_exact_guidance():
    """The guided loss's difference between the two ∅ candidates, per bucket and scale, equals the difference of
    their mean squared distance to guidance with the true scores (no exact score used in the loss): the two agree
    within 4 standard errors of their per-sample difference, an error far below the differences themselves."""
    t, noise, eps_self, eps_base, eps_cond, exact_c, exact_null = _guided_case()
    scales = [2.0, 4.0]
    fitted = fit_weights(eps_self, eps_base, noise, t, T, 4, "mix", "guided", eps_cond=eps_cond, scales=scales)
    index = torch.bucketize(t, bucket_edges(T, 4)[1:-1], right=True)
    meaningful = 0
    for w in scales:
        ideal = w * exact_c - (w - 1) * exact_null

        def guided(u, w=w):
            return w * eps_cond - (w - 1) * u

        loss_diff = ((guided(eps_self) - noise) ** 2).mean(1) - ((guided(eps_base) - noise) ** 2).mean(1)
        ideal_diff = ((guided(eps_self) - ideal) ** 2).mean(1) - ((guided(eps_base) - ideal) ** 2).mean(1)
        record = fitted.losses["guided"][f"w={w:.1f}"]
        for b in range(4):
            rows = index == b
            z = (loss_diff - ideal_diff)[rows]
            bound = 4 * z.std() / math.sqrt(len(z))
            assert abs(z.mean()) <= bound, (w, b, float(z.mean()), float(bound))
            # the recorded per-bucket losses are these losses
            assert record["self"][b] - record["base"][b] == pytest.approx(float(loss_diff[rows].mean()), rel=1e-9)
            meaningful += abs(float(ideal_diff[rows].mean())) > 5 * bound
    assert meaningful >= 4


def test_guided_fit_minimises_the_guided_loss_per_scale():
    """mix's weight per (bucket, scale) is the minimiser over [0, 1] of the guided loss (checked on a grid),
    auto's the better end; at w = 1 the ∅ prediction is unused and the weight is 0 (self)."""
    t, noise, eps_self, eps_base, eps_cond, *_ = _guided_case(n=20_000, seed=1)
    scales = [1.0, 2.0, 4.0]
    mix = fit_weights(eps_self, eps_base, noise, t, T, 5, "mix", "guided", eps_cond=eps_cond, scales=scales)
    auto = fit_weights(eps_self, eps_base, noise, t, T, 5, "auto", "guided", eps_cond=eps_cond, scales=scales)
    assert mix.base_weight.shape == (3, 5) and mix.objective == "guided" and mix.scales == scales
    assert (mix.row(1.0) == 0).all() and (auto.row(1.0) == 0).all()
    index = torch.bucketize(t, bucket_edges(T, 5)[1:-1], right=True)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    for i, w in enumerate(scales[1:], start=1):
        for b in range(5):
            rows = index == b
            u = eps_self[rows][None] + grid[:, None, None] * (eps_base[rows] - eps_self[rows])[None]
            losses = ((w * eps_cond[rows][None] - (w - 1) * u - noise[rows][None]) ** 2).mean((1, 2))
            best = float(grid[losses.argmin()])
            assert float(mix.base_weight[i, b]) == pytest.approx(best, abs=0.006)
            assert float(auto.base_weight[i, b]) == float(losses[-1] < losses[0])
    assert not torch.equal(mix.row(2.0), mix.row(4.0))  # the weights depend on the scale


def test_weights_per_scale_round_trip_and_refuse_an_unfitted_scale(tmp_path):
    t, noise, eps_self, eps_base, eps_cond, *_ = _guided_case(n=2_000, seed=2)
    pw = fit_weights(eps_self, eps_base, noise, t, T, 3, "mix", "guided", eps_cond=eps_cond, scales=[2.0, 3.0])
    back = PriorWeights.load(pw.save(tmp_path / "w.json"))
    assert back.objective == "guided" and back.scales == [2.0, 3.0] and torch.equal(back.base_weight, pw.base_weight)
    tt = torch.tensor([0, 500, 999])
    assert torch.equal(back.at(tt, 3.0), pw.base_weight[1][[0, 1, 2]])
    with pytest.raises(UserError, match=r"at guidance scales \[2.0, 3.0\], not at w=4"):
        back.at(tt, 4.0)
    with pytest.raises(UserError, match="give the scale"):
        back.at(tt)
    old = PriorWeights(torch.tensor([0, 1000]), torch.tensor([0.5]), "mix").to_dict()
    del old["objective"], old["scales"]  # a file written before the guided objective
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert PriorWeights.load(tmp_path / "old.json").objective == "null_loss"
    keys = calibration_metrics({"mix": pw})
    assert "eval/calib/weight/prior=mix/w=3.0/t=0-332" in keys and "eval/calib/guided_loss/model=base/w=2.0/all" in keys
    assert "eval/calib/loss/model=self/all" in keys  # the ∅ losses stay, for the sign rule
    with pytest.raises(UserError, match="guided objective need the guidance scales"):
        PriorWeights(torch.tensor([0, 1000]), torch.tensor([0.5]), "mix", objective="guided")


def test_two_condition_guided_fit_scores_the_instruct_pix2pix_combination(tmp_path):
    """With an image condition and a text condition only eps(∅, ∅) is a candidate: per text scale s_T at image
    scale s_I the loss is E‖(1 − s_I)·u + (s_I − s_T)·eps(c_I, ∅) + s_T·eps(c_I, c_T) − eps‖², here checked
    against a direct computation on a grid of weights; at s_I = s_T the image term drops out and the fit is the
    one-condition one; the weights record s_I and refuse another."""
    t, noise, eps_self, eps_base, eps_cond, *_ = _guided_case(n=20_000, seed=3)
    eps_image = eps_cond + 0.3 * torch.randn(eps_cond.shape, generator=torch.Generator().manual_seed(9))
    s_i, scales = 1.5, [2.0, 7.5]
    mix = fit_weights(eps_self, eps_base, noise, t, T, 4, "mix", "guided", eps_cond=eps_cond, scales=scales,
                      eps_image=eps_image, image_scale=s_i)  # fmt: skip
    assert mix.image_scale == 1.5 and mix.base_weight.shape == (2, 4)
    index = torch.bucketize(t, bucket_edges(T, 4)[1:-1], right=True)
    grid = torch.linspace(0, 1, 201, dtype=torch.float64)
    for i, s_t in enumerate(scales):
        for b in range(4):
            rows = index == b
            u = eps_self[rows][None] + grid[:, None, None] * (eps_base[rows] - eps_self[rows])[None]
            guided = (1 - s_i) * u + (s_i - s_t) * eps_image[rows][None] + s_t * eps_cond[rows][None]
            losses = ((guided - noise[rows][None]) ** 2).mean((1, 2))
            assert float(mix.base_weight[i, b]) == pytest.approx(float(grid[losses.argmin()]), abs=0.006)
            record = mix.losses["guided"][scale_name(s_t)]
            assert record["self"][b] == pytest.approx(float(losses[0]), rel=1e-9)
            assert record["base"][b] == pytest.approx(float(losses[-1]), rel=1e-9)
    same = fit_weights(eps_self, eps_base, noise, t, T, 4, "mix", "guided", eps_cond=eps_cond, scales=[3.0],
                       eps_image=eps_image, image_scale=3.0)  # fmt: skip
    one = fit_weights(eps_self, eps_base, noise, t, T, 4, "mix", "guided", eps_cond=eps_cond, scales=[3.0])
    torch.testing.assert_close(same.base_weight, one.base_weight, rtol=0, atol=1e-6)
    back = PriorWeights.load(mix.save(tmp_path / "w.json"))
    assert back.image_scale == 1.5 and back.scales == scales
    back.check_image_scale(1.5)
    with pytest.raises(UserError, match=r"fitted at image_guidance_scale=1.5, not at 2"):
        back.check_image_scale(2.0)
    with pytest.raises(ValueError, match="two conditions need eps_image"):
        fit_weights(eps_self, eps_base, noise, t, T, 4, "mix", "guided", eps_cond=eps_cond, scales=[2.0],
                    eps_image=eps_image)  # fmt: skip


def test_uncond_predictions_are_the_networks_at_the_noised_samples_in_any_batch_size():
    """eps_θ(x_t, ∅), eps_ψ(x_t, ∅) and eps_θ(x_t, c) at x_t = sqrt(ᾱ_t)·x0 + sqrt(1 − ᾱ_t)·noise, whatever the
    batch size, without building an autograd graph (the held-out measures run on large splits)."""
    from priorlab.evaluation.calibrate import noised_batches, uncond_predictions

    sched = DDPMScheduler(num_train_timesteps=100)
    model, base = perturbed_mlp(0), perturbed_mlp(1)
    prior = Prior(base, sched, sched.alphas_cumprod)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(10, 2, generator=g), torch.randn(10, 2, generator=g)
    t, labels = torch.randint(0, 100, (10,), generator=g), torch.arange(10) % 3
    abar = sched.alphas_cumprod[t][:, None]
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    with torch.no_grad():
        want = (model(x_t, t, torch.full_like(t, model.null_class)), base(x_t, t, torch.full_like(t, base.null_class)),
                model(x_t, t, labels))  # fmt: skip
    for batch_size in (None, 3, 10):
        got = uncond_predictions(model, sched, prior, x0, t, noise, batch_size, labels=labels)
        for a, b in zip(got, want, strict=True):
            assert not a.requires_grad
            assert_close_across_shapes(a, b)
    assert [rows for rows, *_ in noised_batches(sched, x0, t, noise, 4)] == [slice(0, 4), slice(4, 8), slice(8, 12)]

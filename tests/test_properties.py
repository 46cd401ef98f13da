"""Property tests (hypothesis) of the guidance and conversion math."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from priorlab import diffusion
from priorlab.guidance import cfg, cfg_two_conditions

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)
vectors = st.lists(finite, min_size=1, max_size=8)
scales = st.floats(0, 20, allow_nan=False)
alpha_bars = st.floats(1e-4, 1 - 1e-4)


@settings(max_examples=200, deadline=None)
@given(vectors, st.data(), scales, scales)
def test_cfg_is_linear_in_the_scale(c, data, w1, w2):
    c = torch.tensor(c, dtype=torch.float64)
    u = torch.tensor(data.draw(st.lists(finite, min_size=len(c), max_size=len(c))), dtype=torch.float64)
    # cfg(w) = u + w (c − u): affine in w, so cfg(w1) − cfg(w2) = (w1 − w2)(c − u)
    torch.testing.assert_close(cfg(c, u, w1) - cfg(c, u, w2), (w1 - w2) * (c - u), rtol=1e-9, atol=1e-6)
    torch.testing.assert_close(cfg(c, u, 1.0), c)
    torch.testing.assert_close(cfg(c, u, 0.0), u)


@settings(max_examples=200, deadline=None)
@given(vectors, st.data(), scales)
def test_swapping_the_prior_moves_cfg_by_one_minus_w_times_the_change(c, data, w):
    c = torch.tensor(c, dtype=torch.float64)
    u_self, u_base = (torch.tensor(data.draw(st.lists(finite, min_size=len(c), max_size=len(c))), dtype=torch.float64)
                      for _ in range(2))  # fmt: skip
    # u + w (c − u) has weight 1 − w on u: the swap (Eq. 7 vs Eq. 6) adds (1 − w)(u_base − u_self), nothing at w = 1
    torch.testing.assert_close(cfg(c, u_base, w) - cfg(c, u_self, w), (1 - w) * (u_base - u_self), rtol=1e-9,
                               atol=1e-6)  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(vectors, scales, scales)
def test_two_condition_guidance_reduces_to_cfg(c, w1, w2):
    cc = torch.tensor(c, dtype=torch.float64)
    uu, cu = torch.cos(cc), torch.sin(cc)
    # with w2 = w1 the middle term cancels: uu + w1 (cc − uu)
    torch.testing.assert_close(cfg_two_conditions(uu, cu, cc, w1, w1), cfg(cc, uu, w1), rtol=1e-9, atol=1e-6)
    # the swap of eps(∅,∅) changes the result by (1 − w1)(uu' − uu) only
    torch.testing.assert_close(cfg_two_conditions(uu + 1, cu, cc, w1, w2) - cfg_two_conditions(uu, cu, cc, w1, w2),
                               torch.full_like(cc, 1 - w1), rtol=1e-9, atol=1e-6)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(alpha_bars, st.sampled_from(diffusion.PREDICTION_TYPES), st.sampled_from(diffusion.PREDICTION_TYPES),
       st.integers(0, 2**31 - 1))  # fmt: skip
def test_conversions_invert_each_other_for_every_alpha_bar(abar, src, dst, seed):
    g = torch.Generator().manual_seed(seed)
    x_t, pred = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    a = torch.full((3,), abar, dtype=torch.float64)
    back = diffusion.convert(diffusion.convert(pred, src, dst, x_t, a), dst, src, x_t, a)
    # dividing by sqrt(ᾱ) or sqrt(1 − ᾱ) near the ends of (0, 1) amplifies rounding by up to 1/sqrt(1e-4) = 100
    torch.testing.assert_close(back, pred, rtol=1e-7, atol=1e-7)
    x0, noise = pred, x_t
    xt = diffusion.add_noise(x0, noise, a)
    for kind in diffusion.PREDICTION_TYPES:
        target = diffusion.target(kind, x0, noise, a)
        torch.testing.assert_close(diffusion.to_eps(target, kind, xt, a), noise, rtol=1e-7, atol=1e-7)

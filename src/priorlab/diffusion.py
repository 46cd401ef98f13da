"""Noise-schedule math as pure functions of tensors.

With a = sqrt(ᾱ_t) and s = sqrt(1 - ᾱ_t) the forward process is x_t = a·x0 + s·eps, and the three
parameterizations a network may predict are related by (Salimans & Ho 2022, "Progressive Distillation"):

    v   = a·eps − s·x0
    eps = a·v + s·x_t = (x_t − a·x0) / s
    x0  = a·x_t − s·v = (x_t − s·eps) / a
"""

from __future__ import annotations

from torch import Tensor

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _expand(abar: Tensor, like: Tensor) -> Tensor:
    """Shape a per-sample ᾱ of shape (N,) to broadcast against `like` of shape (N, ...)."""
    return abar.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·eps, with ᾱ of shape (N,)."""
    a = _expand(abar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def target(prediction_type: str, x0: Tensor, noise: Tensor, abar: Tensor) -> Tensor:
    """The regression target of a network that predicts `prediction_type`."""
    a = _expand(abar, x0)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "sample":
        return x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def to_eps(pred: Tensor, prediction_type: str, x_t: Tensor, abar: Tensor) -> Tensor:
    """Convert a prediction of `prediction_type` made at x_t into an eps prediction."""
    a = _expand(abar, x_t)
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return a.sqrt() * pred + (1 - a).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - a.sqrt() * pred) / (1 - a).sqrt()
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def from_eps(eps: Tensor, prediction_type: str, x_t: Tensor, abar: Tensor) -> Tensor:
    """Convert an eps prediction made at x_t into a prediction of `prediction_type`."""
    a = _expand(abar, x_t)
    if prediction_type == "epsilon":
        return eps
    x0 = (x_t - (1 - a).sqrt() * eps) / a.sqrt()
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return a.sqrt() * eps - (1 - a).sqrt() * x0
    raise ValueError(f"unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, abar: Tensor) -> Tensor:
    """Convert a prediction between parameterizations ("epsilon", "v_prediction", "sample")."""
    if src == dst:
        return pred
    return from_eps(to_eps(pred, src, x_t, abar), dst, x_t, abar)

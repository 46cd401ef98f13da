"""A 2-D Gaussian mixture whose components are the classes, with exact noised densities and scores.

Under the forward process x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·eps, component k with mean μ_k and isotropic
standard deviation σ stays Gaussian: N(sqrt(ᾱ)·μ_k, (ᾱσ² + 1 − ᾱ)·I). So the noised conditional p_t(x | k)
and marginal p_t(x) = Σ_k w_k p_t(x | k) have closed-form log-densities and scores at every noise level
(the same construction as EDM2's toy example, Karras et al. 2024), which makes them the ground truth
against which a learned unconditional branch or prior can be measured.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from priorlab.checks import MAX_TORCH_SEED, finite, is_list, number, whole
from priorlab.data.base import TensorDataModule
from priorlab.errors import UserError


class GaussianMixture:
    """Isotropic Gaussian mixture in 2-D; component k is class k.

    Args:
        means: component means, shape (K, 2).
        std: standard deviation σ of every component.
        weights: mixture weights, shape (K,); uniform when None.
    """

    def __init__(self, means: Tensor, std: float, weights: Tensor | None = None):
        self.means = torch.as_tensor(means, dtype=torch.float64)  # (K, 2)
        self.std = float(std)
        k = len(self.means)
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != (k,) or (w < 0).any() or w.sum() <= 0:
            raise UserError(f"mixture weights must be {k} non-negative numbers with a positive sum, got {w.tolist()}")
        self.weights = w / w.sum()

    @classmethod
    def ring(
        cls,
        num_classes: int,
        radius: float,
        std: float,
        weights: list[float] | None = None,
        rotation: float = 0.0,
    ) -> GaussianMixture:
        """Components evenly spaced on a circle, turned by `rotation` radians."""
        angles = torch.arange(num_classes, dtype=torch.float64) * (2 * math.pi / num_classes) + rotation
        means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
        return cls(means, std, None if weights is None else torch.tensor(weights))

    @property
    def num_classes(self) -> int:
        return len(self.means)

    def _components(self, x: Tensor, abar: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Per-component log-densities (N, K), noised means (N, K, 2) and variances (N, 1, 1)."""
        x = x.to(torch.float64)
        abar = torch.as_tensor(abar, dtype=torch.float64).expand(len(x)).reshape(-1, 1, 1)
        mu = abar.sqrt() * self.means[None]  # (N, K, 2)
        var = abar * self.std**2 + 1 - abar  # (N, 1, 1)
        sq = ((x[:, None, :] - mu) ** 2).sum(-1)  # (N, K)
        logp = -sq / (2 * var[:, :, 0]) - math.log(2 * math.pi) - var[:, :, 0].log()
        return logp, mu, var

    def log_prob(self, x: Tensor, abar: Tensor | float = 1.0, label: Tensor | None = None) -> Tensor:
        """log p_t(x) (label None) or log p_t(x | label) at noise level ᾱ; shape (N,)."""
        logp, _, _ = self._components(x, abar)
        if label is not None:
            return logp.gather(1, label.long().reshape(-1, 1))[:, 0]
        return torch.logsumexp(logp + self.weights.log(), dim=1)

    def score(self, x: Tensor, abar: Tensor | float = 1.0, label: Tensor | None = None) -> Tensor:
        """∇_x log p_t(x) or ∇_x log p_t(x | label); shape (N, 2)."""
        logp, mu, var = self._components(x, abar)
        comp_scores = -(x.to(torch.float64)[:, None, :] - mu) / var  # (N, K, 2)
        if label is not None:
            return comp_scores[torch.arange(len(x)), label.long()]
        resp = torch.softmax(logp + self.weights.log(), dim=1)  # (N, K)
        return (resp[:, :, None] * comp_scores).sum(1)

    def eps(self, x: Tensor, abar: Tensor | float, label: Tensor | None = None) -> Tensor:
        """The exact eps prediction E[eps | x_t] = −sqrt(1 − ᾱ)·score."""
        abar = torch.as_tensor(abar, dtype=torch.float64).expand(len(x)).reshape(-1, 1)
        return -(1 - abar).sqrt() * self.score(x, abar[:, 0], label)

    def conditional_entropy(self) -> float:
        """The differential entropy H(p(x | k)) in nats, the same for every k (each component is N(μ_k, σ²I) in
        2-D, so H = log(2πeσ²)): the expected NLL of samples drawn from the true conditionals."""
        return math.log(2 * math.pi * math.e * self.std**2)

    def denoiser(self, num_classes: int, null_class: int, alphas_cumprod: Tensor) -> ExactDenoiser:
        """A denoiser that predicts the exact eps (class k: component k; `null_class`: the marginal) under the
        schedule ᾱ, for sampling with the true scores through the same sampler and guidance as a trained model."""
        return ExactDenoiser(self, num_classes, null_class, alphas_cumprod)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n samples x (n, 2) with their component labels (n,)."""
        y = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        noise = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return self.means[y] + self.std * noise, y


class ExactDenoiser(nn.Module):
    """The mixture's exact eps as a priorlab denoiser (epsilon prediction, explicit null class), on the CPU.

    Args:
        mixture: the Gaussian mixture.
        num_classes: the real classes (the mixture's components).
        null_class: the label that asks for the marginal's eps.
        alphas_cumprod: ᾱ of the training schedule, indexed by timestep.
    """

    prediction_type = "epsilon"

    def __init__(self, mixture: GaussianMixture, num_classes: int, null_class: int, alphas_cumprod: Tensor):
        super().__init__()
        self.mixture, self.num_classes, self.null_class = mixture, num_classes, null_class
        self.abar = alphas_cumprod.detach().cpu().double()
        self.anchor = nn.Parameter(torch.zeros(()), requires_grad=False)  # where it runs: sample() reads the device

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, force_drop: Tensor | bool | None = None) -> Tensor:
        abar = self.abar[t.cpu()]
        labels = labels.cpu()
        if force_drop is not None:
            labels = torch.where(torch.as_tensor(force_drop).expand(labels.shape), self.null_class, labels)
        out = torch.empty(x.shape, dtype=torch.float64)
        cond = labels != self.null_class
        if cond.any():
            out[cond] = self.mixture.eps(x.cpu()[cond], abar[cond], labels[cond])
        if (~cond).any():
            out[~cond] = self.mixture.eps(x.cpu()[~cond], abar[~cond])
        return out.to(x.device, x.dtype)


class Toy2DDataModule(TensorDataModule):
    """Samples of a ring-shaped Gaussian mixture; `mixture` gives the exact densities and scores.

    Args:
        num_samples: samples drawn (train and validation together).
        num_classes: mixture components.
        radius: distance of the means from the origin.
        std: component standard deviation.
        weights: mixture weights (uniform when None).
        rotation: angle of the first mean, in radians.
        seed: seed of the draw.
    """

    def __init__(
        self,
        num_samples: int = 8192,
        num_classes: int = 8,
        radius: float = 2.0,
        std: float = 0.3,
        weights: list[float] | None = None,
        rotation: float = 0.0,
        seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        whole(num_classes, "data.num_classes", 1)
        whole(num_samples, "data.num_samples", 2)
        radius, rotation = finite(radius, "data.radius"), finite(rotation, "data.rotation")
        std = number(std, "data.std")
        whole(seed, "data.seed", 0, MAX_TORCH_SEED)
        if weights is not None and not is_list(weights):
            raise UserError(f"data.weights={weights!r} must be a list of {num_classes} numbers (or null: uniform)")
        weights = None if weights is None else [finite(w, "data.weights") for w in weights]
        self.mixture = GaussianMixture.ring(num_classes, radius, std, weights, rotation)
        self.num_samples = num_samples
        self.seed = seed
        self.settings = {"num_samples": int(num_samples), "num_classes": int(num_classes), "radius": float(radius),
                         "std": float(std), "weights": None if weights is None else [float(w) for w in weights],
                         "rotation": float(rotation), "seed": int(seed)}  # fmt: skip

    def load(self) -> tuple[Tensor, Tensor, int]:
        x, y = self.mixture.sample(self.num_samples, torch.Generator().manual_seed(self.seed))
        return x.float(), y, self.mixture.num_classes

    def data_settings(self) -> dict:
        return dict(self.settings)

    def default_name(self) -> str:
        """toy2d-k<K>-r<radius>-s<std>-rot<rotation>[-w<weights>]-n<num_samples>-seed<seed>."""
        s = self.settings
        weights = "" if s["weights"] is None else "-w" + "_".join(f"{w:g}" for w in s["weights"])
        return (f"toy2d-k{s['num_classes']}-r{s['radius']:g}-s{s['std']:g}-rot{s['rotation']:g}{weights}"
                f"-n{s['num_samples']}-seed{s['seed']}")  # fmt: skip

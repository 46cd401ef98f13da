"""What an evaluation computes (`EvalSettings`, the eval.* config) and what it may be given besides the networks: an
exact reference (`ExactReference`: on toy2d, the data's Gaussian mixture, passed in by the caller, never imported).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from torch import Tensor, nn

from priorlab.checks import check_eval_settings
from priorlab.errors import UserError
from priorlab.evaluation.features import external_features
from priorlab.guidance import check_scale
from priorlab.priors import FUSED, MODES, OBJECTIVES


class ExactReference(Protocol):
    """A data distribution known exactly (toy2d's `priorlab.data.toy2d.GaussianMixture`): the evaluation scores
    samples by their exact likelihood, the ∅ branches by their error against the exact eps, and compares samples with
    those that exact guidance gives from the same seeds."""

    def log_prob(self, x: Tensor, abar: Tensor | float = 1.0, label: Tensor | None = None) -> Tensor:
        """log p(x | label) (N,) of x noised to ᾱ (of the marginal where label is None)."""

    def eps(self, x: Tensor, abar: Tensor | float, label: Tensor | None = None) -> Tensor:
        """The exact eps of x_t at ᾱ (N, ...)."""

    def conditional_entropy(self) -> float:
        """H(x | label), the floor of the mean NLL of perfect conditional samples."""

    def denoiser(self, num_classes: int, null_class: int, alphas_cumprod: Tensor) -> nn.Module:
        """A denoiser predicting the exact eps, conditional and ∅ (a model for `sampling.sample`)."""


ONE_PASS_MODES = ("off", "scales", "all")
LABELS = ("uniform", "data")


@dataclass
class EvalSettings:
    """What an evaluation computes.

    Attributes:
        num_samples: generated samples per (prior, guidance scale).
        labels: the classes of those samples: "uniform", classes cycling 0..K-1; "data", in the proportions of the
            evaluator's reference data (`eval_labels`), so that FD against that data compares like with like where
            the classes are unbalanced (the emoji categories: 85 to 360 images).
        num_steps: sampler steps; sampler: scheduler name.
        guidance_scales: the scales w to evaluate; priors: a subset of self, base, none, auto, mix, checked,
            distilled (auto and mix are fitted per timestep bucket on the calibration split; distilled is one pass
            of a fine-tune trained with guidance_distill; see `priorlab.priors`).
        interval: guidance interval [lo, hi] in σ, or None.
        batch_size: samples per forward pass on each process.
        seed: offset of the per-sample seeds (sample i uses seed·10⁶ + i).
        buckets: timestep buckets of the prior-quality measures and of the fitted priors; heldout: held-out
            samples the prior-quality measures use (the first ones of the validation split).
        calibration: held-out samples that auto and mix are fitted on, the next ones of the validation split
            after `heldout`, so the two sets are disjoint.
        calibration_objective: what auto and mix minimise per timestep bucket: "guided", the loss of the guided
            prediction at each guidance scale (one set of weights per scale), or "null_loss", the ∅ loss (one set
            for every scale); see `priorlab.priors`.
        check_samples: samples per candidate and guidance scale of prior=checked's sampling check.
        kid_subset: subset size of KID; per_class_fd: also FD per class.
        grid_scale: scale of the sample grids (the largest evaluated when None); grid_per_class: columns.
        autocast: sample under bf16 autocast (GPU presets).
        cuda_graphs: on a GPU, replay each step's guided prediction from a CUDA graph (prior self, base, and the
            passes of one_pass; the fitted priors run as launched; `priorlab.sampling.GraphedStep`).
        one_pass: "off", each (prior, w) sampled on its own; "scales", each prior's guidance scales in one sampling
            pass; "all", every (prior, w) in one pass (`priorlab.sample_many`; prior self, base and extra priors,
            the fitted ones sampled on their own). A pass of k settings makes up to 2k × batch_size rows per forward
            pass; its wall time is shared out equally among its settings' sample_seconds (none are recorded for a
            pass over several priors, whose time is not any one prior's). w = 1 is sampled on its own. With
            cuda_graphs, each step of a pass is replayed from one graph too.
        fused: prior=base (and extra priors) with θ and ψ in one pass where they share an architecture
            (`priorlab.priors.fused`): "auto" (on a GPU where measured faster on the first step of each batch
            shape; never on the CPU), "on" (an architecture mismatch is an error), "off" (two passes; the default:
            on an H100 the one pass took 1.7–2× the two, bench/results/guided_sampling_fused.md).
        features: "domain", the classifier of `train-evaluator` (the only one implemented; "inception" and
            "dinov2" are refused with an error saying they are not implemented yet).
        evaluator_steps: training steps of that classifier where an evaluation trains it on first use (a cached one
            made with other steps is trained again; one made by `priorlab train-evaluator` is kept).
        bootstrap: resamples of the generated samples for the standard errors of FD and of the paired
            differences between priors (0: none).
    """

    num_samples: int = 1000
    labels: str = "uniform"
    num_steps: int = 25
    sampler: str = "ddim"
    guidance_scales: list[float] = field(default_factory=lambda: [1.0, 2.0, 4.0])
    priors: list[str] = field(default_factory=lambda: ["self", "base"])
    interval: list[float] | None = None
    batch_size: int = 250
    seed: int = 0
    buckets: int = 10
    heldout: int = 500
    calibration: int = 500
    calibration_objective: str = "guided"
    check_samples: int = 256
    kid_subset: int = 500
    per_class_fd: bool = False
    grid_scale: float | None = None
    grid_per_class: int = 6
    autocast: bool = False
    cuda_graphs: bool = False
    one_pass: str = "off"
    fused: str = "off"
    features: str = "domain"
    bootstrap: int = 200
    evaluator_steps: int = 1500

    def __post_init__(self):
        check_eval_settings(self)
        self.guidance_scales = [check_scale(w) for w in self.guidance_scales]
        unknown = [p for p in self.priors if p not in MODES]
        if unknown:
            raise UserError(f"eval.priors holds {', '.join(map(str, unknown))}; use some of {', '.join(MODES)}")
        if self.features != "domain":
            external_features(self.features)
        if self.labels not in LABELS:
            raise UserError(f"eval.labels={self.labels} is unknown; use one of {', '.join(LABELS)}")
        if self.one_pass not in ONE_PASS_MODES:
            raise UserError(f"eval.one_pass={self.one_pass} is unknown; use one of {', '.join(ONE_PASS_MODES)}")
        if self.fused not in FUSED:
            raise UserError(f"eval.fused={self.fused} is unknown; use one of {', '.join(FUSED)}")
        if self.calibration_objective not in OBJECTIVES:
            raise UserError(f"eval.calibration_objective={self.calibration_objective} is unknown; use one of "
                            f"{', '.join(OBJECTIVES)}")  # fmt: skip

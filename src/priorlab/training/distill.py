"""Guidance distilled into the fine-tune: one network per sampling step (issue 33; after DogFit, Bahram, Shateri &
Granger, "Domain-guided Fine-tuning for Efficient Transfer Learning of Diffusion Models", arXiv 2508.05685, AAAI 2026).

Guidance with the base prior (Phunyaphibarn et al. 2025, Eq. 7) runs two networks per step:
eps = eps_ψ(x_t, ∅) + w·(eps_θ(x_t, c) − eps_ψ(x_t, ∅)), ψ the frozen base the fine-tune θ started from. With
`guidance_distill`, θ also takes w as an input (`priorlab.models.scale`) and learns that prediction itself. A row i
of the batch, at x_t = sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·eps with target y_i (eps, v or x0: θ's own parameterization), is
trained on DogFit's guided target

    y_i(w_i) = y_i + (w_i − 1)·sg(pred_θ̄(x_t, c_i) − pred_ψ(x_t, ∅))          (`guided_target`)

(sg: no gradient), pred_θ(x_t, c_i, w_i) regressing onto it; θ̄, the teacher, is an exponential moving average of
θ's weights (`teacher_decay`), queried without a scale (w = 1). Its mean over the noise is the guided prediction:
E[y | x_t, c] + (w − 1)·(pred_θ̄(c) − pred_ψ(∅)) = pred_ψ(∅) + w·(pred_θ̄(c) − pred_ψ(∅)) where pred_θ̄(c) = E[y |
x_t, c], a combination with weights summing to 1, so the same guidance in eps, v or x0 (their conversions are affine
in the prediction at fixed x_t). ψ is queried as it is: a fine-tune shares its base's schedule and parameterization
(`commands.train.check_same_schedule`).

The scales (`draw_scales`): rows [0, m) of each batch, m = round(N·(1 − plain_fraction)), draw w ~ U[1, max_scale)
from the step's generator (so a resumed run continues exactly), except the rows whose label was dropped to ∅, which
keep w = 1 and the plain target; rows [m, N) keep w = 1, so the plain conditional branch keeps being learned as in a
plain fine-tune (the batch's rows are drawn independently, `data.base.StepBatchSampler`, so the first m are as random
as any m). The teacher passes run over those m rows only, a fixed slice: nothing waits for the GPU.

Where this differs from DogFit's code (github.com/yaramohamadi/DogFit, `train_DogFit.py`), and why: the teacher is an
average of its own, not the EMA callback's (whose 0.999 would barely leave the base in a short fine-tune); a teacher
that is θ itself (teacher_decay=0) feeds θ's own change back into its target at once: on toy2d (the value test of
tests/test_distill.py: MLP, 600 steps) it left the one pass 50% off the two-network guided prediction and the plain
branch's error 9× a plain fine-tune's, where a decay of 0.9 gave 18% and 1.7×. w is uniform on
[1, max_scale] rather than 1 + an exponential; w's embedding is zero at w = 1 by construction (`models.scale`), so
w = 1 is the plain network at every step, not only at the first; neither DogFit's late start nor its cut-off in t is
implemented.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from omegaconf import DictConfig
from torch import Tensor

from priorlab.checks import number
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser
from priorlab.models.scale import ScaleEmbedding


def guided_target(target: Tensor, pred_cond: Tensor, pred_uncond: Tensor, scale: Tensor) -> Tensor:
    """y + (w − 1)·(pred_cond − pred_uncond) per row: the regression target whose mean is the guided prediction
    pred_uncond + w·(pred_cond − pred_uncond) (module doc). scale: w per row (N,); the rest (N, ...)."""
    w = scale.to(target.dtype).reshape(-1, *[1] * (target.ndim - 1))
    return target + (w - 1) * (pred_cond - pred_uncond)


@dataclass(frozen=True)
class GuidanceDistill:
    """The `guidance_distill` settings (configs/train.yaml).

    Attributes:
        max_scale: w is drawn from [1, max_scale]; prior=distilled samples within it.
        plain_fraction: the fraction of each batch's rows trained at w = 1 only (the plain conditional branch).
        teacher_decay: the decay of the teacher θ̄, an exponential moving average of θ updated after every
            optimizer step (0: θ itself).
    """

    max_scale: float
    plain_fraction: float = 0.5
    teacher_decay: float = 0.99

    def __post_init__(self):
        scale = number(self.max_scale, "guidance_distill.max_scale", 1.0, example=" (the largest w, e.g. 5)")
        fraction = number(self.plain_fraction, "guidance_distill.plain_fraction", strict=False)
        decay = number(self.teacher_decay, "guidance_distill.teacher_decay", strict=False)
        if decay >= 1:
            raise UserError(f"guidance_distill.teacher_decay={decay:g} must lie in [0, 1) (1 would never move the "
                            "teacher from the base; 0 takes θ itself)")  # fmt: skip
        object.__setattr__(self, "max_scale", scale)
        object.__setattr__(self, "plain_fraction", fraction)
        object.__setattr__(self, "teacher_decay", decay)
        if fraction >= 1:
            raise UserError(f"guidance_distill.plain_fraction={fraction:g} must be below 1 (1 trains no row at w > 1; "
                            "turn guidance_distill off with guidance_distill.max_scale=null instead)")  # fmt: skip

    def rows(self, n: int) -> int:
        """m: the rows of a batch of n that draw a scale (the first ones)."""
        return round(n * (1 - self.plain_fraction))


def distill_settings(cfg: DictConfig) -> GuidanceDistill | None:
    """The run's `guidance_distill` settings, or None where max_scale is null (off); a UserError for a base run."""
    node = cfg.get("guidance_distill") or {}
    if node.get("max_scale") is None:
        return None
    if cfg.stage.name != "finetune":
        raise UserError("guidance_distill is a fine-tune option (the guided prediction uses the base): train it with "
                        "stage=finetune base=PATH, or set guidance_distill.max_scale=null")  # fmt: skip
    return GuidanceDistill(node.get("max_scale"), node.get("plain_fraction", 0.5), node.get("teacher_decay", 0.99))


def draw_scales(labels: Tensor, null_class: int, settings: GuidanceDistill,
                generator: torch.Generator | None = None) -> Tensor:  # fmt: skip
    """w per row (N,): U[1, max_scale) in the first m rows (`GuidanceDistill.rows`) whose label is not ∅, 1 elsewhere.
    Draws exactly m numbers from `generator`, whatever the labels."""
    n, m = len(labels), settings.rows(len(labels))
    u = torch.rand(m, device=labels.device, generator=generator)
    w = torch.ones(n, device=labels.device)
    w[:m] = torch.where(labels[:m] == null_class, 1.0, 1 + u * (settings.max_scale - 1))
    return w


class DistillTeacher:
    """The frozen base ψ, the teacher θ̄ (an exponential moving average of θ) and the settings: the scales of a
    batch and the guided targets of its rows.

    Args:
        settings: `GuidanceDistill`.
        base: ψ, the denoiser the fine-tune started from (same schedule and parameterization), frozen here.
        model: θ, the fine-tune; the teacher starts as a copy of it (none where teacher_decay is 0: θ itself).
    Neither ψ nor θ̄ is a sub-module of the training module: neither is optimised nor averaged by the EMA callback;
    θ̄ travels with the checkpoint (`state_dict`), so a resumed run continues exactly. Each costs one copy of the
    network in memory.
    """

    def __init__(self, settings: GuidanceDistill, base: Denoiser, model: Denoiser):
        self.settings = settings
        self.base = base.eval().requires_grad_(False)
        self.teacher = None if settings.teacher_decay == 0 else copy.deepcopy(model).eval().requires_grad_(False)
        self.updated_step = 0  # the optimizer steps the teacher has followed

    def scales(self, labels: Tensor, null_class: int, generator: torch.Generator | None = None) -> Tensor:
        return draw_scales(labels, null_class, self.settings, generator)

    @torch.no_grad()
    def target(self, model: Denoiser, target: Tensor, x_t: Tensor, t: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
        """`guided_target` in the rows that draw a scale (the first m), the plain target in the others; the teacher's
        plain prediction (w = 1) and ψ's ∅ prediction are made over those m rows."""
        m = self.settings.rows(len(x_t))
        if m == 0:
            return target
        teacher = self._on(x_t.device)
        teacher = model if teacher is None else teacher
        x, tm = x_t[:m], t[:m]
        cond = teacher(x, tm, labels[:m]).to(target.dtype)
        uncond = self.base(x, tm, torch.full_like(labels[:m], self.base.null_class)).to(target.dtype)
        return torch.cat([guided_target(target[:m], cond, uncond, scale[:m]), target[m:]])

    def _on(self, device: torch.device) -> Denoiser | None:
        """The teacher (None: θ itself), ψ and the teacher moved to `device` where they are not (once)."""
        for net in (self.base, self.teacher):
            if net is not None and next(net.parameters()).device != device:
                net.to(device)
        return self.teacher

    @torch.no_grad()
    def update(self, model: Denoiser, step: int) -> None:
        """θ̄ ← θ̄ + (1 − teacher_decay)·(θ − θ̄) once per optimizer step (`step`: the optimizer steps so far)."""
        if self.teacher is None or step <= self.updated_step:
            return
        mine = [p for p in self._on(next(model.parameters()).device).parameters()]
        torch._foreach_lerp_(mine, [p.detach() for p in model.parameters()], 1.0 - self.settings.teacher_decay)
        self.updated_step = step

    def state_dict(self) -> dict:
        """The teacher's weights and step, for the checkpoint ({} where the teacher is θ itself)."""
        if self.teacher is None:
            return {}
        return {"step": self.updated_step, "weights": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.teacher is not None:
            self.teacher.load_state_dict(state["weights"])
            self.updated_step = int(state["step"])


def distilled_finetune(denoiser: Denoiser, base: Denoiser, settings: GuidanceDistill | None,
                       meta: dict) -> DistillTeacher | None:  # fmt: skip
    """With `settings` (None: off), give the fine-tune its scale embedding (zero at first: the plain fine-tune for
    every w), record the settings in `meta` (priorlab.json's `guidance_distill`) and return the teacher that trains
    it. The embedding is added to the label tables' rows: a network without them cannot take it."""
    if settings is None:
        return None
    if denoiser.label_width is None:
        raise UserError(f"guidance_distill needs a class-conditional fine-tune with label tables (UNet, DiT, MLP); a "
                        f"{denoiser.class_name} fine-tune has none to add the guidance scale to")  # fmt: skip
    denoiser.add_scale_embedding(ScaleEmbedding(denoiser.label_width, settings.max_scale))
    meta["guidance_distill"] = asdict(settings)
    return DistillTeacher(settings, base, denoiser)

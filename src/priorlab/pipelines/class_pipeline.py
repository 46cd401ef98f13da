"""A diffusers pipeline for class-conditional pixel-space denoisers with an explicit null class (priorlab's models).

This module imports only torch, numpy, PIL and diffusers: `priorlab export` copies it into the pipeline folder, so
that `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` loads the pipeline where priorlab is not
installed (the folder's `model_index.json` names it as `["class_pipeline", "ClassConditionalPipeline"]`).

Sampling follows `priorlab.sampling.sample` with prior=self: output i starts from the noise of generator i (pass
one generator per output for images that do not depend on the batch), and the guidance batch is
[class labels, null class] (Ho & Salimans 2022):
    pred = pred(x_t, ∅) + w · (pred(x_t, c) − pred(x_t, ∅)),
taken in the network's own parameterization (eps, v and x0 are affine in one another at fixed x_t and ᾱ, so the
combination is the same as in eps) and handed to the scheduler, which is configured with that parameterization.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

SOURCE = __file__  # this file, copied beside an exported pipeline as its code


class ClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional image generation with classifier-free guidance.

    Args:
        denoiser: a class-conditional network called as `denoiser(x, t, class_labels=..., return_dict=False)`
            (diffusers' UNet2DModel with `num_class_embeds`, DiTTransformer2DModel), whose label tables have
            num_classes + 1 rows.
        scheduler: a diffusers scheduler whose `prediction_type` is what the denoiser predicts.
        num_classes: number of real classes; labels are 0 … num_classes − 1.
        null_class: the row of the unconditional condition ∅.
        class_names: optional names of the classes, by index.
    """

    model_cpu_offload_seq = "denoiser"

    def __init__(self, denoiser, scheduler, num_classes: int | None = None, null_class: int | None = None,
                 class_names: list[str] | None = None):  # fmt: skip
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler)
        self.register_to_config(num_classes=num_classes, null_class=null_class, class_names=class_names)

    @property
    def null_class(self) -> int:
        return int(self.config.null_class)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the running call guides (guidance scale ≠ 1); unset outside a call."""
        return self._guidance_scale != 1

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        c = self.denoiser.config
        return int(c.in_channels), int(c.sample_size), int(c.sample_size)

    def _labels(self, class_labels) -> Tensor:
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
        bad = labels[(labels < 0) | (labels >= int(self.config.num_classes))]
        if len(labels) == 0 or len(bad):
            raise ValueError(f"class_labels must be class indices 0 … {int(self.config.num_classes) - 1}; "
                             f"got {bad.tolist() or 'none'}")  # fmt: skip
        return labels

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | list[int] | Tensor,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 25,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        """Generate one image per class label.

        Args:
            class_labels: the class of each output.
            guidance_scale: w; 1 samples the conditional model without guidance.
            num_inference_steps: denoising steps of the scheduler.
            generator: one generator per output (its noise is then the same whatever the batch), or one for all.
            output_type: "pil", "np" (N, H, W, C) in [0, 1], "pt" (N, C, H, W) in [0, 1], or "latent": the raw
                samples (N, C, H, W) in the data's range [-1, 1].
            return_dict: an ImagePipelineOutput, else a tuple.
        """
        labels = self._labels(class_labels)
        device = self._execution_device
        labels = labels.to(device)
        self._guidance_scale = float(guidance_scale)
        n = len(labels)
        x = randn_tensor((n, *self.sample_shape), generator=generator, device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(num_inference_steps)
        x = x * self.scheduler.init_noise_sigma
        # stochastic schedulers draw their per-step noise from each output's generator
        stochastic = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if stochastic else {}
        if self.do_classifier_free_guidance:
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])  # chunks [c, ∅]
        for t in self.progress_bar(self.scheduler.timesteps):
            x_in = self.scheduler.scale_model_input(x, t)
            if self.do_classifier_free_guidance:
                x_in = torch.cat([x_in, x_in])
            t_in = torch.as_tensor(t, device=device).round().long().expand(len(x_in))  # integer training steps
            out = self.denoiser(x_in.to(self.denoiser.dtype), t_in, class_labels=labels, return_dict=False)[0]
            pred = out[:, : x.shape[1]].float()  # a learned variance is split off
            if self.do_classifier_free_guidance:
                cond, uncond = pred.chunk(2)
                pred = uncond + self._guidance_scale * (cond - uncond)
            x = self.scheduler.step(pred, t, x, **step_kwargs).prev_sample
        self.maybe_free_model_hooks()
        images = self._postprocess(x, output_type)
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _postprocess(self, x: Tensor, output_type: str):
        if output_type == "latent":
            return x
        images = (x / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return images
        if output_type == "pil":
            return self.numpy_to_pil(images)
        raise ValueError(f"output_type={output_type!r} is not one of pil, np, pt, latent")

    def preprocess(self, images: list[Image.Image]) -> Tensor:
        """PIL images as samples of the model (N, C, H, W) in [-1, 1], resized to its sample size: the inverse of
        the "pt" output (e.g. for calibration images)."""
        c, h, w = self.sample_shape
        mode = "L" if c == 1 else "RGB"
        arrays = [np.asarray(im.convert(mode).resize((w, h), Image.BICUBIC), dtype=np.float32) / 255 for im in images]
        x = torch.from_numpy(np.stack(arrays)).reshape(len(images), h, w, c).permute(0, 3, 1, 2)
        return x * 2 - 1

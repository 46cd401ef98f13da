"""`priorlab sample model=PATH base=PATH prior=base|self|auto|mix prompt=... image=... guidance_scale=... seed=...`

`model=` is a diffusers pipeline folder or hub name, an exported priorlab pipeline, or a priorlab run or model folder
(made a `ClassConditionalPipeline` on the fly, or for a text fine-tune a StableDiffusionPipeline: `prompt=` gives one
prompt or a list). `base=` is a folder or a hub name (`models.hub`). Writes the images (for video: each video's
frames and a GIF) and sample.json with every setting; with `compare=true` it samples prior=self and the chosen prior
from identical seeds and writes compare.png, a grid with one row per prior. The output folder is assembled under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from priorlab import atomic, checks
from priorlab.errors import UserError
from priorlab.pipelines.export import base_note, check_class_labels, load_base, load_model
from priorlab.pipelines.families import Family, family_of
from priorlab.pipelines.sample_calibration import guidance_scale, image_guidance_scale, open_image, prior_weights
from priorlab.pipelines.swap import swap_prior
from priorlab.priors import IN_PIPELINES, Prior, PriorNet, PriorWeights, make_prior

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
NEEDS_IMAGE = ("instruct-pix2pix", "image-variation", "image-text-to-video", "image-to-image")
NEEDS_PROMPT = ("text-to-image", "image-to-image", "instruct-pix2pix", "text-to-video", "image-text-to-video")
SETTING = {"num_inference_steps": "num_steps", "guidance_scale": "guidance_scale", "height": "height",
           "width": "width", "num_frames": "num_frames", "image_guidance_scale": "image_guidance_scale",
           "negative_prompt": "negative_prompt"}  # fmt: skip


def call_arguments(cfg: DictConfig, family: Family, call) -> tuple[dict, int]:
    """The pipeline's keyword arguments for the settings (all but the generators), and the number of outputs."""
    kw: dict = {"num_inference_steps": int(cfg.num_steps)}
    if cfg.guidance_scale is not None:
        kw["guidance_scale"] = float(cfg.guidance_scale)
    if cfg.height is not None:
        kw["height"] = int(cfg.height)
    if cfg.width is not None:
        kw["width"] = int(cfg.width)
    n = int(cfg.num_images)
    check_conditions(cfg, family)
    if family.name in NEEDS_PROMPT:
        prompts = _listed(cfg.prompt)
        kw["prompt"] = prompts if len(prompts) > 1 else prompts[0]
        if cfg.negative_prompt is not None:
            negative = str(cfg.negative_prompt)
            kw["negative_prompt"] = [negative] * len(prompts) if len(prompts) > 1 else negative
        n *= len(prompts)
    if family.name in NEEDS_IMAGE:
        kw["image"] = open_image(cfg.image)
    if cfg.image_guidance_scale is not None:
        kw["image_guidance_scale"] = float(cfg.image_guidance_scale)
    if family.class_labels:
        labels = cfg.class_labels
        if labels is None:
            raise UserError(f"the {family.name} pipeline needs class_labels=[...] (class indices)")
        labels = [int(v) for v in (labels if OmegaConf.is_list(labels) or isinstance(labels, list) else [labels])]
        kw["class_labels"] = labels * n
        n = len(kw["class_labels"])
    else:
        if family.video:
            kw["num_frames"] = int(cfg.num_frames) if cfg.num_frames is not None else 16
            kw["output_type"] = "np"
        elif cfg.num_frames is not None:
            kw["num_frames"] = int(cfg.num_frames)
        accepted = inspect.signature(call).parameters
        per_prompt = next((k for k in ("num_images_per_prompt", "num_videos_per_prompt") if k in accepted), None)
        if per_prompt:
            kw[per_prompt] = int(cfg.num_images)
        elif n > 1:  # e.g. TextToVideoSDPipeline: a batch of prompts instead, each num_images times
            for key in ("prompt", "negative_prompt"):
                if key in kw:
                    kw[key] = [p for p in _listed(kw[key]) for _ in range(int(cfg.num_images))]
    if not family.video:
        kw["output_type"] = "pil"
    accepted = inspect.signature(call).parameters
    for key in kw:
        if key not in accepted:  # a named parameter (a pipeline's **kwargs only take deprecated callbacks)
            raise UserError(f"this pipeline takes no {SETTING.get(key, key)}=; leave it out")
    return kw, n


def check_conditions(cfg: DictConfig, family: Family) -> None:
    """The conditions given must be the model's: prompts for a text model, class labels for a class model."""
    if family.class_labels and cfg.prompt is not None:
        raise UserError(f"the {family.name} model is conditioned on classes, not prompts: give class_labels=[...] "
                        "(class indices) instead of prompt=")  # fmt: skip
    if not family.class_labels and cfg.class_labels is not None:
        hint = " and give prompt='...' (or prompt=['...','...'])" if family.name in NEEDS_PROMPT else ""
        raise UserError(f"the {family.name} model is not conditioned on classes: leave class_labels= out{hint}")
    if family.name in NEEDS_PROMPT and (cfg.prompt is None or not _listed(cfg.prompt)):
        raise UserError(f"the {family.name} pipeline needs prompt='...' (or a list, prompt=['...','...'])")


def _listed(value) -> list[str]:
    """A prompt or a list of prompts (prompt=['a','b'] on the command line) as a list of strings."""
    return [str(v) for v in value] if OmegaConf.is_list(value) or isinstance(value, list | tuple) else [str(value)]


def _frames(output, family: Family) -> list:
    """A list of images (PIL) or of videos (lists of PIL frames)."""
    if not family.video:
        return list(output.images)
    frames = output.frames
    frames = frames.cpu().float().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim == 4:
        frames = frames[None]
    return [[Image.fromarray((np.clip(f, 0, 1) * 255).round().astype("uint8")) for f in video] for video in frames]


def _save(results: list, folder: Path, prefix: str, video: bool, fps: int) -> list[str]:
    paths = []
    for i, item in enumerate(results):
        if video:
            frame_dir = folder / f"{prefix}{i}"
            frame_dir.mkdir()
            for k, frame in enumerate(item):
                frame.save(frame_dir / f"frame_{k:03d}.png")
            gif = folder / f"{prefix}{i}.gif"
            item[0].save(gif, save_all=True, append_images=item[1:], duration=int(1000 / fps), loop=0)
            paths.append(gif.name)
        else:
            path = folder / f"{prefix}{i}.png"
            item.save(path)
            paths.append(path.name)
    return paths


def compare_grid(rows: dict[str, list], video: bool) -> Image.Image:
    """One row per prior: its images side by side (for video, the first video's frames)."""
    cells = {name: (items[0] if video else items) for name, items in rows.items()}
    w, h = next(iter(cells.values()))[0].size
    cols = max(len(c) for c in cells.values())
    grid = Image.new("RGB", (cols * w, len(cells) * h), "white")
    for r, images in enumerate(cells.values()):
        for c, im in enumerate(images):
            grid.paste(im, (c * w, r * h))
    return grid


def _used_settings(pipe, kw: dict) -> dict:
    """The values the pipeline ran with, by their sample.yaml names: what was passed, else the pipeline's own
    default (guidance_scale: null in the command records the scale the pipeline used)."""
    params = inspect.signature(pipe.__call__).parameters
    out = {}
    for arg, name in SETTING.items():
        if arg in kw:
            out[name] = kw[arg]
        elif (
            arg in params and isinstance(params[arg].default, int | float) and not isinstance(params[arg].default, bool)
        ):
            out[name] = params[arg].default
    return out


def sample_command(cfg: DictConfig) -> Path:
    """Run `priorlab sample` (see the module doc); returns the output folder."""
    if cfg.prior not in IN_PIPELINES:
        raise UserError(f"prior={cfg.prior} is unknown; use one of {', '.join(IN_PIPELINES)}")
    if cfg.dtype not in DTYPES:
        raise UserError(f"dtype={cfg.dtype} is unknown; use one of {', '.join(DTYPES)}")
    out = checks.output_folder(cfg.out, cfg.overwrite, cfg.model_dir, cfg.base, cfg.calibration, cfg.image)
    device, dtype = checks.device(cfg.device), DTYPES[cfg.dtype]
    pipe = load_model(str(cfg.model_dir), dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not cfg.progress)
    family = family_of(pipe)
    kw, n = call_arguments(cfg, family, pipe.__call__)
    check_class_labels(pipe, kw.get("class_labels"))
    prior_net = _prior_net(cfg, device, dtype)
    weights = prior_weights(cfg, pipe, prior_net, family)
    priors = _priors(cfg, prior_net, weights)
    with atomic.folder(out) as tmp:
        results, files, seconds, calls = {}, {}, {}, {}
        for mode, prior in priors.items():
            start = time.perf_counter()
            # one generator per output, seeded seed + i: the same noise for every prior
            args = {**kw, "generator": [torch.Generator().manual_seed(int(cfg.seed) + i) for i in range(n)]}
            with swap_prior(
                pipe,
                prior,
                family,
                guidance_scale(cfg, pipe) if weights is not None and weights.scales is not None else None,
                image_guidance_scale(cfg, pipe) if weights is not None and weights.image_scale is not None else None,
            ) as swapped:
                results[mode] = _frames(pipe(**args), family)
            seconds[mode] = round(time.perf_counter() - start, 3)
            files[mode] = _save(results[mode], tmp, f"prior={mode}_", family.video, int(cfg.fps))
            calls[mode] = dict(swapped.calls)
        if cfg.compare:
            compare_grid(results, family.video).save(tmp / "compare.png")
        if weights is not None:
            weights.save(tmp / f"prior_weights_{weights.mode}.json")
        settings = OmegaConf.to_container(cfg, resolve=True)
        settings.update(_used_settings(pipe, kw))
        settings.update({"family": family.name, "pipeline": type(pipe).__name__, "files": files, "seconds": seconds,
                         "denoiser_calls": calls, "device": str(device)})  # fmt: skip
        (tmp / "sample.json").write_text(json.dumps(settings, indent=1, default=str))
    print(f"wrote {sum(len(f) for f in files.values())} outputs to {out}")
    return out


def _prior_net(cfg: DictConfig, device, dtype) -> PriorNet | None:
    """The base (base=PATH) where the prior or compare=true needs it, loaded on the device."""
    if cfg.prior == "self" and not cfg.compare:
        return None
    if cfg.base is None:
        if cfg.prior != "self":
            raise UserError(f"prior={cfg.prior} needs base=PATH (the unconditional prior)")
        return None
    prior_net = load_base(str(cfg.base), cfg.negative_prompt or "", device, dtype)
    note = base_note(str(cfg.model_dir), str(cfg.base)) if cfg.get("base_check", True) else None
    if note:
        print(note)
    return prior_net


def _priors(cfg: DictConfig, prior_net: PriorNet | None, weights: PriorWeights | None) -> dict[str, Prior]:
    """The priors to sample with by mode, built (and validated) once here: prior=, and with compare=true prior=self
    before it (prior=base where prior=self was asked for)."""
    modes = [cfg.prior]
    if cfg.compare:
        modes = list(dict.fromkeys(["self", cfg.prior if cfg.prior != "self" else "base"]))
    if "base" in modes and prior_net is None:
        raise UserError("compare=true needs base=PATH")
    return {mode: make_prior(mode, prior_net, weights, IN_PIPELINES) for mode in modes}

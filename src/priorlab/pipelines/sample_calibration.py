"""`priorlab sample`'s fitted prior: its weights read from prior_weights=PATH, or fitted on calibration=FOLDER (images
of the fine-tuning domain, with a metadata.jsonl of their conditions for the guided objective) at the guidance scales
the pipeline runs at.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from omegaconf import DictConfig
from PIL import Image

from priorlab.errors import UserError
from priorlab.pipelines.calibrate import encode_images, fit_pipeline_weights, model_conditions, model_null_condition
from priorlab.pipelines.families import Family
from priorlab.priors import FITTABLE, PriorNet, PriorWeights


def open_image(path: str | None, role: str = "image") -> Image.Image:
    """The image at `path` as RGB; a missing or unreadable one is a one-line UserError naming `role`."""
    if path is None:
        raise UserError(f"this pipeline needs {role}=PATH (an input image)")
    try:
        return Image.open(path).convert("RGB")
    except (OSError, ValueError) as err:
        raise UserError(f"{role}={path} is not a readable image ({type(err).__name__})") from err


def sampling_size(cfg: DictConfig, pipe, family: Family) -> tuple[int, int]:
    """The pixel size that will be sampled: calibration_size, else height × width, else the model's default."""
    if cfg.calibration_size is not None:
        return int(cfg.calibration_size), int(cfg.calibration_size)
    vae = getattr(pipe, "vae", None)
    if vae is None:  # a pixel-space model samples at its own size
        return tuple(pipe.sample_shape[1:])
    default = int(getattr(pipe, family.component).config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)
    return int(cfg.height or default), int(cfg.width or default)


def prior_weights(cfg: DictConfig, pipe, prior_net: PriorNet | None, family: Family) -> PriorWeights | None:
    """The fitted prior's weights: prior_weights=PATH, or fitted on calibration=FOLDER (None for the other priors)."""
    if cfg.prior not in FITTABLE:
        return None
    if cfg.prior_weights is not None:
        weights = PriorWeights.load(cfg.prior_weights)
        if weights.mode != cfg.prior:
            raise UserError(f"prior_weights={cfg.prior_weights} were fitted for prior={weights.mode}, not {cfg.prior}")
        return weights
    if cfg.calibration is None:
        raise UserError(f"prior={cfg.prior} needs prior_weights=PATH or calibration=FOLDER (images of the "
                        "fine-tuning domain) to fit them on")  # fmt: skip
    if family.video:
        raise UserError(
            "calibration=FOLDER takes images; for a video model fit the weights in Python "
            "(priorlab.pipelines.fit_pipeline_weights on video latents) and pass prior_weights=PATH"
        )
    folder = Path(cfg.calibration)
    objective = cfg.get("calibration_objective", "guided")
    if objective not in ("guided", "null_loss"):
        raise UserError(f"calibration_objective={objective} is unknown; use guided or null_loss")
    meta = _read_metadata(folder) if objective == "guided" and family.name != "image-variation" else None
    inputs = {str(row.get("input_image")) for row in (meta or {}).values() if row.get("input_image") is not None}
    files = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".png", ".jpg", ".jpeg", ".webp")
                   and p.name not in inputs)  # fmt: skip
    if not files:
        raise UserError(f"calibration={folder} holds no .png/.jpg/.webp images")
    images = [open_image(str(p), "calibration image") for p in files]
    height, width = sampling_size(cfg, pipe, family)
    extra = {}
    if objective == "guided":
        texts, labels, inputs = _calibration_conditions(folder, meta, files, family)
        extra = {"objective": "guided", "scales": [guidance_scale(cfg, pipe)],
                 "cond_kwargs": model_conditions(pipe, family, texts, labels,
                                                 inputs if family.name == "instruct-pix2pix" else images,
                                                 (height, width))}  # fmt: skip
        if family.name == "instruct-pix2pix":
            extra["image_scale"] = image_guidance_scale(cfg, pipe)
    # a pixel-space pipeline (priorlab's ClassConditionalPipeline) takes the images themselves, at its size
    latents = encode_images(pipe, images, height, width) if getattr(pipe, "vae", None) else pipe.preprocess(images)
    null = model_null_condition(pipe, family, cfg.negative_prompt or "")
    return fit_pipeline_weights(pipe, prior_net, latents, null, cfg.prior,
                                int(cfg.calibration_buckets), int(cfg.seed), family, **extra)  # fmt: skip


def _read_metadata(folder: Path) -> dict[str, dict]:
    """folder/metadata.jsonl (the imagefolder convention: one JSON object per line with its image's file_name) as
    {file_name: row}; a missing or malformed file is a one-line UserError."""
    meta = folder / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"the guided calibration objective needs each image's condition: write {meta} with one "
                        'line per image, {"file_name": "0.png", "text": ...} (or "label": ... for class-conditioned '
                        'models; InstructPix2Pix: "text" and "input_image": the unedited image\'s path in the '
                        "folder), or pass calibration_objective=null_loss")  # fmt: skip
    found = {}
    for i, line in enumerate(meta.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            found[str(row["file_name"])] = row
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise UserError(f"{meta} line {i} is not a JSON object with a file_name") from err
    return found


def _calibration_conditions(folder: Path, meta: dict[str, dict] | None, files: list[Path],
                            family: Family) -> tuple[list | None, list | None, list | None]:  # fmt: skip
    """Each calibration image's condition from its metadata row: texts for text-conditioned pipelines, labels for
    class-conditioned ones, texts and input images for InstructPix2Pix; nothing for image variation (each image is
    its own condition). Returns (texts, labels, input images)."""
    if family.name == "image-variation":
        return None, None, None
    path = folder / "metadata.jsonl"
    keys = (
        ("input_image", "text")
        if family.name == "instruct-pix2pix"
        else ("label",)
        if family.class_labels
        else ("text",)
    )
    for key in keys:
        missing = [p.name for p in files if key not in meta.get(p.name, {})]
        if missing:
            raise UserError(f"{path} gives no {key} for {len(missing)} image(s), e.g. {missing[0]}")
    values = {key: [meta[p.name][key] for p in files] for key in keys}
    if "label" in values and not all(isinstance(v, int) and not isinstance(v, bool) for v in values["label"]):
        raise UserError(f"{path}: every label must be a whole number (a class index)")
    if "text" in values and not all(isinstance(v, str) for v in values["text"]):
        raise UserError(f"{path}: every text must be a string")
    inputs = None
    if "input_image" in values:
        inputs = [open_image(str(folder / str(v)), f"input_image of {p.name}")
                  for v, p in zip(values["input_image"], files, strict=True)]  # fmt: skip
    return values.get("text"), values.get("label"), inputs


def guidance_scale(cfg: DictConfig, pipe) -> float:
    """The guidance scale the pipeline will run at: guidance_scale=, else its own default."""
    return _scale(cfg, pipe, "guidance_scale")


def _scale(cfg: DictConfig, pipe, key: str) -> float:
    """The setting `key` (guidance_scale, image_guidance_scale) as given, else the pipeline's own default."""
    if cfg[key] is not None:
        return float(cfg[key])
    default = inspect.signature(pipe.__call__).parameters.get(key)
    if default is None or not isinstance(default.default, int | float):
        raise UserError(f"{type(pipe).__name__} has no default {key.replace('_', ' ')}; pass {key}=")
    return float(default.default)


def image_guidance_scale(cfg: DictConfig, pipe) -> float:
    """InstructPix2Pix's image guidance scale: image_guidance_scale=, else the pipeline's own default."""
    return _scale(cfg, pipe, "image_guidance_scale")

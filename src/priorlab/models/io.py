"""Saving and loading denoisers in diffusers format, and building a fine-tune from a base.

A model folder holds the network (`config.json`, `diffusion_pytorch_model.safetensors`, written by
`save_pretrained`), the noise schedule (`scheduler_config.json`) and `priorlab.json` with the null class,
the prediction type and, for a fine-tune, its base's path and content hash, and for a base given by its hub name
that name, the revision and the commit (`models.hub`; a text model adds its table of prompt embeddings and its
captions, `models.text`; a guidance-distilled one its scale embedding, `models.scale`). A base or prior may also be
a plain diffusers UNet2DModel or DiT folder, or a Stable-Diffusion-layout pipeline (`models.pretrained`), each local
or given by its hub name. Weights load through safetensors only, so no pickled code is ever run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from priorlab import atomic
from priorlab.checks import is_whole, read_json_object
from priorlab.diffusion import PREDICTION_TYPES
from priorlab.errors import UserError
from priorlab.models.denoiser import CLASS_COUNT_KEYS, NETWORK_CLASSES, Denoiser, label_tables
from priorlab.models.scale import load_scale_embedding

WEIGHTS = "diffusion_pytorch_model.safetensors"
META = "priorlab.json"


@dataclass
class SavedModel:
    """A denoiser loaded from a model folder, with its schedule and metadata."""

    denoiser: Denoiser
    scheduler: DDPMScheduler
    meta: dict
    path: Path


def content_hash(model_dir: str | Path) -> str:
    """SHA-256 of a model folder's weights file."""
    digest = hashlib.sha256()
    with open(Path(model_dir) / WEIGHTS, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save_denoiser(denoiser: Denoiser, scheduler: DDPMScheduler, path: str | Path, **meta) -> Path:
    """Write the model folder atomically: into a temporary sibling first, then renamed into place."""
    path = Path(path)
    with atomic.folder(path) as tmp:
        denoiser.net.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
        extra = denoiser.save_extra(tmp)  # a text model's table of prompt embeddings (`models.text`)
        info = {
            "class_name": denoiser.class_name,
            "num_classes": denoiser.num_classes,
            "null_class": denoiser.null_class,
            "prediction_type": denoiser.prediction_type,
            **extra,
            **meta,
        }
        (tmp / META).write_text(json.dumps(info, indent=2, default=str))
    return path


def resolve_model_dir(path: str | Path, role: str = "model") -> Path:
    """The folder holding a model's weights: a priorlab model folder, a run folder holding `model/`, or a diffusers
    UNet2DModel or DiT folder or pipeline folder (`models.pretrained`: its unet/ or transformer/), local or given by
    its hub name (`models.hub`: org/name[@revision], a local path of that name first); a UserError naming what it
    looked for."""
    from priorlab.models.hub import locate
    from priorlab.models.pretrained import check_layout, diffusers_net_dir

    path = locate(path, role)
    if not path.exists():
        raise UserError(f"{role}={path}: no such folder; pass a run folder or its model/ sub-folder, or a hub name "
                        "(org/name)")  # fmt: skip
    if not (path / META).exists() and (path / "model" / META).exists():
        path = path / "model"
    if (path / META).exists() and (path / WEIGHTS).exists():
        return path
    if (path / META).exists():
        raise UserError(f"{role}={path} is not a priorlab model folder (needs {META} and {WEIGHTS})")
    check_layout(path, role)
    return diffusers_net_dir(path, role)


def load_denoiser(path: str | Path, role: str = "model", diffusers: bool | None = None) -> SavedModel:
    """Load a model folder written by `save_denoiser`, or a diffusers UNet2DModel or DiT folder as a base or prior
    (`models.pretrained.load_pretrained`), either of them local or given by its hub name (its record, `meta["hub"]`:
    `models.hub`); errors name the folder and the problem.

    Args:
        diffusers: whether a diffusers folder is taken; by default for every role but "model" (the class-conditional
            model under evaluation or export is a priorlab model, a fine-tune of such a base).
    """
    from priorlab.models.hub import hub_model

    hub = hub_model(path, role)
    saved = _load(resolve_model_dir(hub.folder if hub is not None else path, role), role, diffusers)
    if hub is not None:
        saved.meta["hub"] = hub.record()
    return saved


def _load(path: Path, role: str, diffusers: bool | None) -> SavedModel:
    if not (path / META).exists():
        if not (role != "model" if diffusers is None else diffusers):
            raise UserError(f"{role}={path} is a diffusers model, not a priorlab model folder; fine-tune it "
                            f"first (priorlab train stage=finetune base={path}) and pass the fine-tune's run "
                            "folder")  # fmt: skip
        from priorlab.models.pretrained import load_pretrained

        return load_pretrained(path, role)
    meta = read_json_object(path / META, "a priorlab model record", "restore the model folder or train it again")
    check_meta(meta, path / META)
    try:
        cls = NETWORK_CLASSES[meta["class_name"]]
        net = cls.from_pretrained(path, use_safetensors=True, low_cpu_mem_usage=False)
        scheduler = DDPMScheduler.from_pretrained(path)
        net.eval()
        if meta["class_name"] == "UNet2DConditionModel":
            from priorlab.models.text import load_text_denoiser

            denoiser = load_text_denoiser(net, path, meta)
        else:
            denoiser = Denoiser(net, meta["num_classes"], meta["null_class"], meta["prediction_type"])
        if "scale_embedding" in meta:  # a guidance-distilled fine-tune (`models.scale`)
            denoiser.add_scale_embedding(load_scale_embedding(meta["scale_embedding"], path))
            denoiser.scale_embedding.eval()
    except UserError:
        raise
    except Exception as err:  # corrupt json, truncated safetensors, unknown class: one message for the user
        raise UserError(f"{role}={path} could not be loaded ({type(err).__name__}: {err})") from err
    return SavedModel(denoiser, scheduler, meta, path)


def check_recorded_base(model: SavedModel, base: SavedModel) -> str | None:
    """Refuse the base a fine-tune recorded (the same folder, or the same hub model at any commit) when its weights
    changed since the fine-tune started from them. Another folder is another prior, which may be anything: a note is
    returned where its weights differ from the recorded base's, else None."""
    record = model.meta.get("base")
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    sha = content_hash(base.path)
    if sha == record["sha256"]:
        return None
    hub = record["hub"] if _same_repo(record, base.meta) else None  # the same hub model, maybe at another commit
    if hub or Path(str(record.get("path"))).resolve() == base.path.resolve():
        given = f"{base.meta['hub']['repo_id']}@{base.meta['hub']['commit']}" if hub else base.path
        trained = f" ({hub['repo_id']}@{hub.get('commit')})" if hub else ""
        raise UserError(
            f"base={given} has changed since {model.path} was fine-tuned from it: its weights hash to "
            f"{sha[:12]}, the fine-tune recorded {record['sha256'][:12]}. Pass the base it was trained from"
            f"{trained}, or base_check=false to use this one anyway"
        )
    return (f"note: base={base.path} is not the base {model.path} was fine-tuned from ({record.get('path')}, "
            f"sha256 {record['sha256'][:12]}); it is used as the prior as given")  # fmt: skip


def _same_repo(record: dict, meta: dict) -> bool:
    """Whether a recorded base and a loaded one are the same hub model (at any commit: `models.hub`)."""
    theirs, mine = record.get("hub"), meta.get("hub")
    return isinstance(theirs, dict) and isinstance(mine, dict) and theirs.get("repo_id") == mine.get("repo_id")


def check_meta(meta: dict, path: Path) -> None:
    """The keys of priorlab.json that loading needs, each of the right kind; a UserError naming the first that is
    missing or wrong."""
    wanted = {
        "class_name": (lambda v: isinstance(v, str) and v in NETWORK_CLASSES, f"one of {', '.join(NETWORK_CLASSES)}"),
        "num_classes": (lambda v: is_whole(v) and v >= 1, "a whole number ≥ 1"),
        "null_class": (lambda v: is_whole(v) and v >= 0, "a whole number ≥ 0"),
        "prediction_type": (lambda v: v in PREDICTION_TYPES, f"one of {', '.join(PREDICTION_TYPES)}"),
    }
    missing = [key for key in wanted if key not in meta]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; restore the model folder or train it again")
    for key, (ok, kind) in wanted.items():
        if not ok(meta[key]):
            raise UserError(f"{path}: {key}={meta[key]!r} is not {kind}; restore the model folder or train it again")
    if meta["null_class"] > meta["num_classes"]:
        raise UserError(f"{path}: null_class={meta['null_class']} is not a row of a label table of num_classes + 1 = "
                        f"{meta['num_classes'] + 1} rows; restore the model folder or train it again")  # fmt: skip


def architecture_mismatch(model: Denoiser, base: Denoiser) -> list[str]:
    """Config keys in which two denoisers differ, ignoring the number of classes."""
    if model.class_name != base.class_name:
        return [f"network {base.class_name} (base) vs {model.class_name} (model)"]
    skip = {CLASS_COUNT_KEYS[model.class_name], "_use_default_values", "_name_or_path", "_diffusers_version"}
    a, b = dict(model.net.config), dict(base.net.config)
    return [
        f"{key}: {b.get(key)!r} (base) vs {a.get(key)!r} (model)"
        for key in sorted(set(a) | set(b))
        if key not in skip and not key.startswith("_") and _norm(a.get(key)) != _norm(b.get(key))
    ]


def _norm(value):
    return list(value) if isinstance(value, tuple | list) else value


@torch.no_grad()
def init_from_base(model: Denoiser, base: Denoiser) -> None:
    """Copy the base's weights into `model` so that both predict the same for the null class at step 0.

    Every weight but the label tables is copied. Each label table's rows, the null row and every class row,
    are set to the base's null row, so at step 0 the fine-tune's unconditional and conditional predictions
    both equal the base's unconditional prediction exactly; fine-tuning then separates the classes. A base
    without label tables (an unconditional diffusers UNet, `models.pretrained`) gives zero rows instead: the
    UNet adds the class row to the time embedding before any block, so a zero row changes nothing.
    """
    mismatch = architecture_mismatch(model, base)
    if mismatch:
        raise UserError(
            "the base has another architecture or size than model=...: "
            + "; ".join(mismatch)
            + ". Choose the model preset the base was trained with, or another base"
        )
    state = {k: v for k, v in base.net.state_dict().items() if k not in _table_keys(base.net)}
    missing, unexpected = model.net.load_state_dict(state, strict=False)
    if unexpected or set(missing) != _table_keys(model.net):
        raise UserError(f"base weights do not fit the model (missing {missing}, unexpected {unexpected})")
    theirs = label_tables(base.net)
    for i, mine in enumerate(label_tables(model.net)):
        null_row = theirs[i].weight[base.null_class] if theirs else torch.zeros_like(mine.weight[0])
        mine.weight.copy_(null_row.expand_as(mine.weight))


def _table_keys(net: torch.nn.Module) -> set[str]:
    """The state-dict keys of a network's label tables."""
    tables = {id(t) for t in label_tables(net)}
    return {name + ".weight" for name, m in net.named_modules() if id(m) in tables}

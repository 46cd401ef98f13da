"""A user's own pretrained diffusers network as a base: found, loaded, and made class-conditional for a fine-tune.

A base need not be a folder priorlab wrote. A diffusers `UNet2DModel` (a pixel-space UNet) or a
`DiTTransformer2DModel` (a class-conditional DiT) is taken from

- a model folder: `config.json` and `diffusion_pytorch_model.safetensors` (`save_pretrained`), with the
  `scheduler_config.json` of its noise schedule beside them, or
- a pipeline folder (a `DDPMPipeline` or `DiTPipeline` saved with `save_pretrained`): its `unet/` or
  `transformer/`, its `scheduler/`, and for a latent pipeline its `vae/` (an `AutoencoderKL`, `models.latent`:
  the fine-tune then trains on the data's cached latents and evaluation decodes its samples). A DiTPipeline's class
  names are the `id2label` of its model_index.json, as on the hub.

Either may be given by its hub name, org/name[@revision] (`models.hub`: fetched, or offline found in the Hugging Face
cache; a local path of that name wins), and is then the snapshot folder of the cache. `check_layout` refuses, from
the configs alone (before a hub model's weights are fetched), what priorlab cannot use: a Stable Diffusion XL
pipeline (not supported yet: a second text encoder, text_encoder_2/ and tokenizer_2/, and size conditions), a
pipeline or folder with no network where priorlab looks (LOOKED_FOR), a network of another class.

`NETWORKS` maps each network class to its pipeline sub-folder and its builder of a fine-tune; a
Stable-Diffusion-layout pipeline (unet/ a UNet2DConditionModel, text_encoder/, tokenizer/, scheduler/, and vae/ or
none) is a text-conditioned base instead (`models.text`), whose ∅ is the embedding of the empty prompt. Its schedule
(any scheduler's config: the betas, the number of training timesteps, the prediction type) is read into a
`DDPMScheduler`, which priorlab's training and evaluation use. An unconditional UNet is wrapped with
`num_classes=0` (every label is ∅); a class-conditional one (`num_class_embeds` = K rows) and a DiT
(`num_embeds_ada_norm` = K classes, K + 1 rows in each block's LabelEmbedding) hold their null class in the last
row, K, as priorlab's and DiT's tables do.

A fine-tune of either is the same architecture with a table of num_classes + 1 rows for the new label set
(`conditional_copy`), whose rows `io.init_from_base` sets: to zero for an unconditional base (UNet2DModel adds the
class row to the time embedding before the first block, so a zero row is a no-op), and, for a class-conditional
base, every new class row and the null row to the base's null row (the DiT fine-tuning protocol of Phunyaphibarn et
al. 2025: the base's class rows are dropped, its null row kept). Either way, at step 0 the fine-tune's ∅ and
conditional predictions equal the base's ∅ prediction. A learned-sigma network (`out_channels = 2 × in_channels`,
DiT's learn_sigma) is used through its eps half only (`denoiser.Denoiser`). Weights load through safetensors only.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from diffusers import DDPMScheduler, DiTTransformer2DModel, UNet2DModel

from priorlab.checks import read_json_object
from priorlab.diffusion import PREDICTION_TYPES
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser
from priorlab.models.io import META, WEIGHTS, SavedModel
from priorlab.models.text import TEXT_NET, load_text_base, text_pipeline

CONFIG = "config.json"
SCHEDULER = "scheduler_config.json"
FORMAT = "diffusers"  # priorlab.json's "format" of a base loaded from a diffusers folder
# network class → the sub-folder a pipeline keeps it in; a UNet2DConditionModel in unet/ is a text base (`models.text`)
NETWORKS = {"UNet2DModel": "unet", "DiTTransformer2DModel": "transformer"}
# where a pipeline keeps its network: diffusers' names, and denoiser/ of a pipeline `priorlab export` wrote (so that
# an exported model, of priorlab or of another lab, serves as a base like any diffusers folder)
SUBFOLDERS = (*dict.fromkeys(NETWORKS.values()), "denoiser")
NET_CLASSES = {"UNet2DModel": UNet2DModel, "DiTTransformer2DModel": DiTTransformer2DModel}
LOOKED_FOR = (f"a diffusers UNet2DModel or DiTTransformer2DModel folder ({CONFIG} and {WEIGHTS}, with {SCHEDULER} "
              "beside them) or a diffusers pipeline folder (unet/ or transformer/, and scheduler/; text_encoder/ and "
              "tokenizer/ for a UNet2DConditionModel)")  # fmt: skip
XL_PARTS = ("text_encoder_2", "tokenizer_2")  # the second text encoder of a Stable Diffusion XL pipeline


def net_config_dir(path: Path) -> Path | None:
    """The folder of a diffusers network's config in `path` (itself, or its unet/, transformer/ or denoiser/), or
    None where there is none (its weights are not looked at)."""
    return next((d for d in (path, *(path / sub for sub in SUBFOLDERS)) if (d / CONFIG).is_file()), None)


def diffusers_net_dir(path: Path, role: str = "base") -> Path | None:
    """The folder of a diffusers network in `path` (`net_config_dir`), checked to hold its safetensors weights, or
    None where there is none."""
    net_dir = net_config_dir(path)
    if net_dir is None:
        return None
    if not (net_dir / WEIGHTS).is_file():
        pickled = (net_dir / "diffusion_pytorch_model.bin").is_file()
        hint = (": it holds .bin weights, and priorlab loads safetensors only (no pickled code is run); save it "
                "again with save_pretrained(folder, safe_serialization=True)") if pickled else ""  # fmt: skip
        raise UserError(f"{role}={net_dir} has {CONFIG} but no {WEIGHTS}{hint}")
    return net_dir


def scheduler_dir(net_dir: Path, role: str = "base") -> Path:
    """The folder of a diffusers network's scheduler config: beside it, in its scheduler/, or the pipeline's
    scheduler/."""
    folders = (net_dir, net_dir / "scheduler", net_dir.parent / "scheduler")
    for folder in folders:
        if (folder / SCHEDULER).is_file():
            return folder
    raise UserError(f"{role}={net_dir} has no noise schedule: priorlab looked for "
                    f"{', '.join(str(f / SCHEDULER) for f in folders)}; save the model's scheduler beside it "
                    "(scheduler.save_pretrained(folder))")  # fmt: skip


def load_schedule(net_dir: Path, role: str = "base") -> DDPMScheduler:
    """The network's training schedule as a DDPMScheduler (the keys of another scheduler's config that
    DDPMScheduler does not take, such as DDIM's set_alpha_to_one, are left out)."""
    path = scheduler_dir(net_dir, role) / SCHEDULER
    config = read_json_object(path, "a diffusers scheduler config", "save the scheduler again")
    taken = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    try:
        scheduler = DDPMScheduler.from_config({k: v for k, v in config.items() if k in taken})
    except Exception as err:  # an unknown beta_schedule, wrong types: one message for the user
        raise UserError(f"{path} could not be read as a noise schedule ({type(err).__name__}: {err})") from err
    if scheduler.config.prediction_type not in PREDICTION_TYPES:
        raise UserError(f"{path}: prediction_type={scheduler.config.prediction_type!r} is not one of "
                        f"{', '.join(PREDICTION_TYPES)}")  # fmt: skip
    return scheduler


def base_schedule(net_dir: Path, role: str = "base") -> dict:
    """The DDPMScheduler config of a diffusers network's schedule, without diffusers' private keys: what a
    fine-tune of it trains with (`diffusion.*`)."""
    config = {k: v for k, v in load_schedule(net_dir, role).config.items() if not k.startswith("_")}
    if config.get("trained_betas") is not None:
        raise UserError(f"{role}={net_dir}: its schedule lists its betas (trained_betas), which a fine-tune's "
                        "diffusion.* cannot hold; priorlab takes schedules given by beta_schedule")  # fmt: skip
    return config


def check_layout(path: Path, role: str = "base", shown: str | None = None) -> None:
    """Refuse a folder priorlab cannot use as a base or prior from its configs alone, before any weights are read
    (or fetched from the hub, `models.hub`): a Stable Diffusion XL pipeline, a pipeline or folder without a network
    where priorlab looks for one (LOOKED_FOR), a network of another class. `shown`: the name the user gave for it
    (a hub name), else the folder is named."""
    where = f"{role}={shown or path}"
    if (path / META).is_file() or (path / "model" / META).is_file():
        return
    index = path / "model_index.json"
    pipeline = None
    if index.is_file():
        pipeline = read_json_object(index, "a pipeline index", "save it again").get("_class_name")
    net_dir = net_config_dir(path)
    config = read_json_object(net_dir / CONFIG, "a diffusers model config", "save it again") if net_dir else {}
    _refuse_sdxl(path, pipeline, config, where)
    if net_dir is None:
        named = f"; its model_index.json names a {pipeline}, with none of those sub-folders" if pipeline else ""
        raise UserError(f"{where} is not a priorlab model folder (needs {META} and {WEIGHTS}) nor {LOOKED_FOR}{named}")
    _check_class(config.get("_class_name"), f"{role}={shown or net_dir}", text=True)


def _refuse_sdxl(path: Path, pipeline, config: dict, where: str) -> None:
    """Stable Diffusion XL (a second text encoder, text_encoder_2/ and tokenizer_2/; an XL pipeline class; a UNet
    conditioned on sizes and pooled text, addition_embed_type text_time) is not supported yet."""
    xl = any((path / part).is_dir() for part in XL_PARTS) or "StableDiffusionXL" in str(pipeline)
    if xl or config.get("addition_embed_type") == "text_time":
        named = f" ({pipeline})" if pipeline else ""
        raise UserError(f"{where} is a Stable Diffusion XL model{named}: priorlab does not support SDXL yet (its two "
                        "text encoders and the size conditions of its UNet). It takes a Stable-Diffusion-layout "
                        "pipeline with one text encoder (unet/ a UNet2DConditionModel, text_encoder/ a CLIPTextModel, "
                        "tokenizer/, scheduler/, and vae/ or none), such as Stable Diffusion 1.x or 2.x, or a "
                        "diffusers UNet2DModel or DiTTransformer2DModel (a folder or a pipeline)")  # fmt: skip


def _check_class(name, where: str, text: bool = False) -> None:
    """Refuse a network class priorlab cannot use as a base (`text`: a UNet2DConditionModel passes)."""
    if name not in NETWORKS and not (text and name == TEXT_NET):
        raise UserError(f"{where} holds a {name}; priorlab takes a diffusers UNet2DModel (a pixel-space "
                        f"UNet) or DiTTransformer2DModel as a base, a Stable-Diffusion-layout pipeline folder for a "
                        "UNet2DConditionModel, or a priorlab model folder")  # fmt: skip


def _check_network(config: dict, net_dir: Path, role: str) -> None:
    """Refuse the networks priorlab cannot use as a base, naming why."""
    name = config.get("_class_name")
    _check_class(name, f"{role}={net_dir}")
    index = net_dir.parent / "model_index.json"
    if index.is_file() and "vqvae" in read_json_object(index, "a pipeline index", "save it again"):
        raise UserError(f"{role}={net_dir.parent} is a VQ-VAE latent pipeline; priorlab's latent bases take an "
                        "AutoencoderKL (vae/)")  # fmt: skip
    inputs, outputs = config.get("in_channels", 3), config.get("out_channels") or config.get("in_channels", 3)
    if outputs not in (inputs, 2 * inputs):
        raise UserError(f"{role}={net_dir}: out_channels={outputs} is neither in_channels={inputs} nor twice it (a "
                        "learned variance); priorlab takes a network that predicts one value per input channel, "
                        "or that and a variance")  # fmt: skip
    if name == "UNet2DModel" and config.get("class_embed_type") is not None:
        raise UserError(f"{role}={net_dir}: class_embed_type={config['class_embed_type']!r} is not a label table; "
                        "priorlab takes UNets without class embedding or with num_class_embeds")  # fmt: skip
    if name == "DiTTransformer2DModel" and config.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
        raise UserError(f"{role}={net_dir}: norm_type={config['norm_type']!r}; priorlab takes DiTs with "
                        "ada_norm_zero, whose blocks hold the label tables")  # fmt: skip


def table_rows(net) -> int | None:
    """The rows of a diffusers network's label table (num_classes + 1), or None for an unconditional UNet."""
    if isinstance(net, DiTTransformer2DModel):
        return net.config.num_embeds_ada_norm + 1
    return net.config.num_class_embeds


def class_names(net_dir: Path) -> dict[str, str] | None:
    """The class names of a pipeline's network: model_index.json's id2label (a DiTPipeline's), or None."""
    index = net_dir.parent / "model_index.json"
    names = read_json_object(index, "a pipeline index", "save it again").get("id2label") if index.is_file() else None
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else None


def load_pretrained(net_dir: Path, role: str = "base") -> SavedModel:
    """A diffusers network folder (`diffusers_net_dir`) as a SavedModel: the network wrapped as a Denoiser
    (module doc: its null class), its schedule, and a record whose "format" is "diffusers", with its class names
    (id2label) and, for a latent pipeline, its VAE (`models.latent.vae_record`)."""
    from priorlab.models.latent import vae_record

    config = read_json_object(net_dir / CONFIG, "a diffusers model config", "save the model again")
    if text_pipeline(net_dir, config) is not None:
        return load_text_base(net_dir, load_schedule(net_dir, role), role)
    _check_network(config, net_dir, role)
    scheduler = load_schedule(net_dir, role)
    cls = NET_CLASSES[config["_class_name"]]
    try:
        net = cls.from_pretrained(net_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # truncated safetensors, keys that do not fit the config
        raise UserError(f"{role}={net_dir} could not be loaded ({type(err).__name__}: {err})") from err
    rows = table_rows(net)
    num_classes = 0 if rows is None else rows - 1
    prediction_type = scheduler.config.prediction_type
    meta = {"class_name": cls.__name__, "num_classes": num_classes, "null_class": num_classes,
            "prediction_type": prediction_type, "format": FORMAT}  # fmt: skip
    names = class_names(net_dir)
    if names is not None:
        meta["id2label"] = names
    vae = vae_record(net_dir, role)
    if vae is not None:
        meta["vae"] = vae
    denoiser = Denoiser(net.eval(), num_classes, num_classes, prediction_type)
    return SavedModel(denoiser, scheduler, meta, net_dir)


def conditional_copy(base: Denoiser, num_classes: int, sample_shape: tuple[int, ...], role: str = "base",
                     latent: bool = False) -> Denoiser:  # fmt: skip
    """A fine-tune of a diffusers base: the base's architecture with a label table of num_classes + 1 rows (the
    null class last), its weights still to be set by `io.init_from_base`. `latent`: the samples are the VAE's
    latents of the data."""
    if tuple(sample_shape) != tuple(base.sample_shape):
        what = "the data's latents are" if latent else "the data gives"
        hint = ("data of the size the VAE maps to the base's latent size (data.image_size=...)" if latent else
                "data of the base's size and channels (data.image_size=...)")  # fmt: skip
        if not latent and base.class_name == "DiTTransformer2DModel" and sample_shape[0] != base.sample_shape[0]:
            hint += "; a DiT of latents needs its VAE: pass the DiTPipeline folder (transformer/, vae/, scheduler/)"
        raise UserError(f"{role} takes samples of shape {tuple(base.sample_shape)} but {what} "
                        f"{tuple(sample_shape)}; choose {hint}")  # fmt: skip
    config = {k: v for k, v in base.net.config.items() if not k.startswith("_")}
    if base.class_name == "DiTTransformer2DModel":
        net = DiTTransformer2DModel.from_config({**config, "num_embeds_ada_norm": num_classes})
    else:
        net = UNet2DModel.from_config({**config, "class_embed_type": None, "num_class_embeds": num_classes + 1})
    return Denoiser(net, num_classes, num_classes, base.prediction_type)


def is_pretrained(meta: dict) -> bool:
    """Whether a loaded model's record says it came from a diffusers folder rather than from priorlab."""
    return meta.get("format") == FORMAT

"""Text-conditioned denoisers: a Stable-Diffusion-layout pipeline as a base, its prompts as a table of embeddings.

A text fine-tune is the class path with captions for classes. The data's distinct captions are numbered 0 … K − 1
(`data.hf` with `caption_column`), and a `TextDenoiser` holds the frozen text encoder's embedding of each, with the
embedding of the empty prompt "" as row K, its null condition ∅. A label is then a caption index, so conditioning
dropout (`drop_labels`: each caption replaced by "" with probability p, diffusers' `proportion_empty_prompts`),
guidance (`guidance.guide`: θ's ∅ branch is its prediction with the "" embedding), prior=base (the base UNet with
the "" embedding, `priors.DenoiserPrior` asking for its null class) and evaluation run unchanged.

The embeddings are computed once: `PromptCache` encodes each distinct caption (and "") once and keeps them on disk
under the content hash of the text encoder and tokenizer (`encoder_hash`), so another encoder gets its own. A
fine-tune keeps its table in its model folder (`prompts.safetensors`, the captions in priorlab.json), so it loads
and evaluates without the text encoder; export takes the encoder from the base it records.

The base is a pipeline folder with unet/ (a `UNet2DConditionModel`), text_encoder/ (a `CLIPTextModel`), tokenizer/
(a `CLIPTokenizer`), scheduler/ and vae/ (an `AutoencoderKL`), as Stable Diffusion's: its fine-tune trains on the
data's latents, encoded once and cached, and evaluation decodes its samples (`models.latent`, the codec DiT bases
use). A pipeline saved with vae=None is taken in pixel space: its UNet denoises the images themselves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from priorlab.checks import read_json_object
from priorlab.errors import UserError
from priorlab.models.denoiser import Denoiser

PROMPTS = "prompts.safetensors"  # a text fine-tune's table of prompt embeddings, in its model folder
TEXT_NET = "UNet2DConditionModel"


class TextDenoiser(Denoiser):
    """A UNet2DConditionModel conditioned on the rows of a table of prompt embeddings; row K (the last) is "".

    Args:
        net: the diffusers UNet2DConditionModel.
        prompts: (K + 1, L, D) the text encoder's last hidden states of the K captions, then of "".
        captions: the K captions, in table order (empty for a base, which is only ever asked for ∅).
        prediction_type: "epsilon", "v_prediction" or "sample".
        text_encoder: {"path", "sha256"} of the encoder that made the table (recorded, and used by export).
    """

    def __init__(self, net: UNet2DConditionModel, prompts: Tensor, captions: list[str],
                 prediction_type: str = "epsilon", text_encoder: dict | None = None):  # fmt: skip
        super().__init__(net, len(captions), len(captions), prediction_type)
        if prompts.ndim != 3 or len(prompts) != len(captions) + 1:
            raise ValueError(f"prompts of shape {tuple(prompts.shape)} do not hold {len(captions)} captions and ''")
        if prompts.shape[-1] != net.config.cross_attention_dim:
            raise UserError(f"the text encoder gives embeddings of width {prompts.shape[-1]} but the UNet attends to "
                            f"{net.config.cross_attention_dim}; use the pipeline's own text encoder")  # fmt: skip
        self.conditional = True
        self.captions = list(captions)
        self.text_encoder = dict(text_encoder or {})
        self.register_buffer("prompts", prompts.detach().float().clone(), persistent=False)  # data, not weights

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, force_drop: Tensor | bool | None = None,
                scale: Tensor | float | None = None) -> Tensor:  # fmt: skip
        """The UNet's prediction at (x_t, t) with the embedding of caption `labels` (N,); the null class is "". A
        text model has no label table to take a guidance scale (`Denoiser.add_scale_embedding`)."""
        if scale is not None:
            raise UserError("a text model does not take the guidance scale as an input; guide it with prior=self "
                            "or prior=base")  # fmt: skip
        labels = labels.to(self.prompts.device)
        if force_drop is not None:
            drop = torch.as_tensor(force_drop, device=labels.device).expand(labels.shape)
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        states = self.prompts[labels].to(self.net.dtype)  # (N, L, D)
        return self.net(x, t, encoder_hidden_states=states, return_dict=False)[0]

    def save_extra(self, folder: Path) -> dict:
        """Write the table beside the network; returns the entries priorlab.json records of it."""
        save_file({"prompts": self.prompts.cpu().contiguous()}, folder / PROMPTS)
        return {"captions": self.captions, "text_encoder": self.text_encoder}


def load_text_denoiser(net: UNet2DConditionModel, folder: Path, meta: dict) -> TextDenoiser:
    """A text fine-tune's denoiser from its model folder (network loaded, table and captions read)."""
    captions = meta.get("captions")
    listed = isinstance(captions, list) and all(isinstance(c, str) for c in captions)
    if not listed or not (folder / PROMPTS).exists():
        raise UserError(f"{folder} is a text model without its captions or {PROMPTS}; train it again")
    prompts = load_file(folder / PROMPTS)["prompts"]
    return TextDenoiser(net, prompts, captions, meta["prediction_type"], meta.get("text_encoder"))


def encoder_hash(pipeline: Path) -> str:
    """SHA-256 over the text encoder's weights and the tokenizer's files: the key of `PromptCache`."""
    digest = hashlib.sha256()
    files = [pipeline / "text_encoder" / "model.safetensors", *sorted((pipeline / "tokenizer").glob("*"))]
    for path in files:
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def load_text_encoder(pipeline: Path, role: str = "base"):
    """The pipeline's (CLIPTextModel, CLIPTokenizer), loaded from safetensors, in eval mode."""
    from transformers import CLIPTextModel, CLIPTokenizer

    index = read_json_object(pipeline / "model_index.json", "a pipeline index", "save the pipeline again")
    for part in ("text_encoder", "tokenizer"):
        if not isinstance(index.get(part), list) or index[part][0] is None or not (pipeline / part).is_dir():
            raise UserError(f"{role}={pipeline} has no {part}: a UNet2DConditionModel base is a Stable-Diffusion-"
                            "layout pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/)")  # fmt: skip
    if index["text_encoder"][1] != "CLIPTextModel":
        raise UserError(f"{role}={pipeline}: its text encoder is a {index['text_encoder'][1]}; priorlab takes a "
                        "CLIPTextModel")  # fmt: skip
    try:
        encoder = CLIPTextModel.from_pretrained(pipeline / "text_encoder", use_safetensors=True)
        tokenizer = CLIPTokenizer.from_pretrained(pipeline / "tokenizer")
    except Exception as err:  # missing or truncated files: one message for the user
        problem = f"{type(err).__name__}: {err}"
        raise UserError(f"{role}={pipeline}: its text encoder could not be loaded ({problem})") from err
    return encoder.eval().requires_grad_(False), tokenizer


@torch.no_grad()
def encode(encoder, tokenizer, captions: list[str], batch_size: int = 64) -> Tensor:
    """The last hidden states (N, L, D) of captions padded to the tokenizer's length, as StableDiffusionPipeline's
    `encode_prompt` and diffusers' train_text_to_image compute them (no attention mask for CLIP)."""
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(captions[start : start + batch_size], padding="max_length", truncation=True,
                        max_length=tokenizer.model_max_length, return_tensors="pt").input_ids  # fmt: skip
        out.append(encoder(ids.to(encoder.device), return_dict=False)[0].float().cpu())
    return torch.cat(out)


class PromptCache:
    """Prompt embeddings on disk, one file per text encoder (`<folder>/<encoder_hash>.safetensors`, keyed by each
    caption's SHA-256); a folder of None keeps them in memory only.

    Args:
        folder: where the files are kept.
        key: the text encoder's `encoder_hash`.
    """

    def __init__(self, folder: str | Path | None, key: str):
        self.path = Path(folder) / f"{key}.safetensors" if folder is not None else None
        self.key = key

    def embed(self, captions: list[str], encoder, tokenizer) -> Tensor:
        """(N, L, D) the embedding of each caption, encoding only the distinct ones not cached yet."""
        table = load_file(self.path) if self.path is not None and self.path.exists() else {}
        names = [hashlib.sha256(c.encode()).hexdigest() for c in captions]
        missing = list(dict.fromkeys(c for c, n in zip(captions, names, strict=True) if n not in table))
        if missing:
            for caption, row in zip(missing, encode(encoder, tokenizer, missing), strict=True):
                table[hashlib.sha256(caption.encode()).hexdigest()] = row.contiguous()
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
                save_file(table, tmp)
                tmp.replace(self.path)
        return torch.stack([table[n] for n in names])


def text_pipeline(net_dir: Path, config: dict) -> Path | None:
    """The pipeline folder of a UNet2DConditionModel in a pipeline's unet/, or None for anything else (a bare
    UNet2DConditionModel folder, without the text encoder it was trained with, is refused by `pretrained`)."""
    is_text = config.get("_class_name") == TEXT_NET and net_dir.name == "unet"
    return net_dir.parent if is_text and (net_dir.parent / "model_index.json").is_file() else None


def check_channels(pipeline: Path, net: UNet2DConditionModel, role: str) -> None:
    """The UNet must predict one value per input channel (no learned variance, no extra conditioning channels)."""
    if net.config.in_channels != net.config.out_channels:
        raise UserError(f"{role}={pipeline}: its UNet takes {net.config.in_channels} channels and predicts "
                        f"{net.config.out_channels}; priorlab takes one prediction per input channel")  # fmt: skip


def text_record(pipeline: Path) -> dict:
    """What a text model records of its encoder: the pipeline's text_encoder/ folder and `encoder_hash`."""
    return {"path": str((pipeline / "text_encoder").resolve()), "sha256": encoder_hash(pipeline)}


def load_text_base(net_dir: Path, scheduler, role: str = "base"):
    """A Stable-Diffusion-layout pipeline's UNet as a base or prior: a TextDenoiser whose table is "" alone."""
    from priorlab.models.io import SavedModel
    from priorlab.models.latent import vae_record
    from priorlab.models.pretrained import FORMAT

    pipeline = net_dir.parent
    encoder, tokenizer = load_text_encoder(pipeline, role)
    try:
        net = UNet2DConditionModel.from_pretrained(net_dir, use_safetensors=True, low_cpu_mem_usage=False)
    except Exception as err:  # truncated safetensors, keys that do not fit the config
        raise UserError(f"{role}={net_dir} could not be loaded ({type(err).__name__}: {err})") from err
    check_channels(pipeline, net, role)
    record = text_record(pipeline)
    prediction_type = scheduler.config.prediction_type
    denoiser = TextDenoiser(net.eval(), encode(encoder, tokenizer, [""]), [], prediction_type, record)
    meta = {"class_name": TEXT_NET, "num_classes": 0, "null_class": 0, "prediction_type": prediction_type,
            "format": FORMAT, "text_encoder": record}  # fmt: skip
    vae = vae_record(net_dir, role)
    if vae is not None:
        meta["vae"] = vae  # a latent pipeline: the fine-tune trains on the data's latents (`models.latent`)
    return SavedModel(denoiser, scheduler, meta, net_dir)


def text_copy(base: TextDenoiser, captions: list[str], sample_shape: tuple[int, ...], cache: str | Path | None,
              role: str = "base") -> TextDenoiser:  # fmt: skip
    """A fine-tune of a text base: the base's architecture (weights still to be set by `io.init_from_base`) with the
    table of the data's captions and "", from the prompt cache of the base's text encoder."""
    if tuple(sample_shape) != tuple(base.sample_shape):
        raise UserError(f"{role} takes samples of shape {tuple(base.sample_shape)} but the data gives "
                        f"{tuple(sample_shape)}; choose data of the base's size and channels "
                        "(data.image_size=..., data.channels=...)")  # fmt: skip
    pipeline = Path(base.text_encoder["path"]).parent
    encoder, tokenizer = load_text_encoder(pipeline, role)
    prompts = PromptCache(cache, base.text_encoder["sha256"]).embed([*captions, ""], encoder, tokenizer)
    config = {k: v for k, v in base.net.config.items() if not k.startswith("_")}
    net = UNet2DConditionModel.from_config(config)
    return TextDenoiser(net, prompts, captions, base.prediction_type, base.text_encoder)

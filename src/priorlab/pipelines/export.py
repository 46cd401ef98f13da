"""priorlab models as diffusers pipelines: `priorlab export model=RUN out=FOLDER`, and the loaders of `priorlab sample`.

A priorlab model folder (or a run folder holding `model/`) becomes a `ClassConditionalPipeline`: its network as the
`denoiser` component, its training schedule as a DDIM `scheduler` with the network's prediction type, and the
number of classes and the null class in the pipeline's config. `export` writes it with `save_pretrained`, adds the
pipeline's code (`class_pipeline.py`, which needs only diffusers) and a model card, and names the code in
`model_index.json`, so the folder loads with

    DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)   # anywhere diffusers is installed
    priorlab.pipelines.export.load_exported(folder)                      # priorlab's class; the folder's code not run

and can be pushed to a hub as it is. A fine-tune of a latent diffusers DiT base is written as a plain `DiTPipeline`
folder instead (`pipelines.dit_export`). `priorlab sample` exports a priorlab model on the fly, in memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from priorlab import atomic, checks
from priorlab.errors import UserError
from priorlab.models.hub import locate, source_name
from priorlab.models.io import META, SavedModel, check_recorded_base, load_denoiser
from priorlab.models.scale import export_note
from priorlab.pipelines.class_pipeline import SOURCE, ClassConditionalPipeline
from priorlab.pipelines.prior import load_pipeline, load_prior
from priorlab.priors import DiffusersPrior, PriorNet

CODE_FILE = Path(SOURCE).name  # class_pipeline.py
CLASS_NAME = [Path(CODE_FILE).stem, ClassConditionalPipeline.__name__]  # model_index.json's _class_name


def is_priorlab_model(path: str | Path) -> bool:
    """A priorlab model folder, or a run folder holding one in model/."""
    p = Path(path).expanduser()
    return (p / META).is_file() or (p / "model" / META).is_file()


def is_exported(path: str | Path) -> bool:
    """A pipeline folder whose model_index.json names ClassConditionalPipeline."""
    index = Path(path).expanduser() / "model_index.json"
    if not index.is_file():
        return False
    try:
        name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError):
        return False
    return ClassConditionalPipeline.__name__ in (name if isinstance(name, list) else [name])


def from_saved(saved: SavedModel, class_names: list[str] | None = None) -> ClassConditionalPipeline:
    """The pipeline of a loaded priorlab model (the same network object, not a copy), with optional class names."""
    denoiser = saved.denoiser
    if saved.meta.get("class_name") == "UNet2DConditionModel":
        raise UserError(f"model={saved.path} is a text fine-tune, not a class-conditional model: export it "
                        "(priorlab export model=RUN out=FOLDER) and load its StableDiffusionPipeline")  # fmt: skip
    if class_names is not None and len(class_names) != denoiser.num_classes:
        raise UserError(f"class_names has {len(class_names)} names but model={saved.path} has {denoiser.num_classes} "
                        "classes; give one name per class, in class order")  # fmt: skip
    if len(denoiser.sample_shape) != 3:
        raise UserError(f"model={saved.path} is a priorlab {denoiser.class_name} over vectors of shape "
                        f"{denoiser.sample_shape} (toy2d), not images: a diffusers pipeline makes images; sample it "
                        "with priorlab.sampling.sample")  # fmt: skip
    keep = {k: v for k, v in saved.scheduler.config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config({**keep, "prediction_type": denoiser.prediction_type})
    names = [str(v) for v in class_names] if class_names is not None else None
    return ClassConditionalPipeline(denoiser.net.eval(), scheduler, num_classes=denoiser.num_classes,
                                    null_class=denoiser.null_class, class_names=names)  # fmt: skip


def from_priorlab(path: str | Path, role: str = "model"):
    """The pipeline of a priorlab model folder or run folder, built in memory: a ClassConditionalPipeline, the
    DiTPipeline of a latent DiT base's fine-tune (`pipelines.dit_export`), or the StableDiffusionPipeline of a text
    fine-tune (`pipelines.text_export`; a pixel-space one with a `PixelCodec` for its VAE)."""
    from priorlab.pipelines.dit_export import dit_pipeline, is_dit_finetune

    saved = load_denoiser(path, role)
    if saved.meta.get("class_name") == "UNet2DConditionModel":
        from priorlab.pipelines.text_export import text_pipeline

        return text_pipeline(saved, pixel_codec=True)
    return dit_pipeline(saved) if is_dit_finetune(saved) else from_saved(saved)


def export_pipeline(model: str | Path, out: str | Path, overwrite: bool = False,
                    class_names: list[str] | None = None) -> Path:  # fmt: skip
    """Write the pipeline folder of a priorlab model (see the module doc); returns `out`. A fine-tune of a latent
    diffusers DiT base becomes a plain DiTPipeline folder instead (`pipelines.dit_export`), a text fine-tune a
    StableDiffusionPipeline folder (`pipelines.text_export`)."""
    from priorlab.pipelines.dit_export import export_dit, is_dit_finetune

    saved = load_denoiser(model)
    if saved.meta.get("class_name") == "UNet2DConditionModel":
        from priorlab.pipelines.text_export import export_text_pipeline

        return export_text_pipeline(saved, out, overwrite)
    if is_dit_finetune(saved):
        if class_names is not None:
            saved.meta["id2label"] = {str(k): str(v) for k, v in enumerate(class_names)}
        return export_dit(saved, out, overwrite)
    pipe = from_saved(saved, class_names)
    out = checks.output_folder(out, overwrite, model)
    with atomic.folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        shutil.copyfile(SOURCE, tmp / CODE_FILE)
        index = json.loads((tmp / "model_index.json").read_text())
        index["_class_name"] = CLASS_NAME  # the code shipped in the folder (diffusers' custom-pipeline convention)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(saved, out.name))
    return out


def model_card(saved: SavedModel, name: str) -> str:
    """A hub model card: what the model is, where it came from, and how to load and sample it."""
    meta = saved.meta
    base = meta.get("base") if isinstance(meta.get("base"), dict) else None
    d = saved.denoiser
    stage = f" (stage {meta['stage']}, step {meta['step']})" if "stage" in meta and "step" in meta else ""
    source = [f"- network: {d.class_name}, {d.num_classes} classes, null class {d.null_class}, predicts "
              f"{d.prediction_type}", f"- exported from the priorlab model folder `{saved.path}`{stage}"]  # fmt: skip
    if base:
        source.append(f"- fine-tuned from `{source_name(base)}` (weights sha256 {str(base.get('sha256'))[:12]})")
    lines = "\n".join(source) + export_note(d)
    return f"""---
library_name: diffusers
tags:
- priorlab
- class-conditional
- classifier-free-guidance
---

# {name}

A class-conditional diffusion model trained with priorlab, as a diffusers pipeline
(`ClassConditionalPipeline`, whose code is `{CODE_FILE}` in this folder).

{lines}

```python
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{name}", trust_remote_code=True)
generators = [torch.Generator().manual_seed(i) for i in range(4)]  # one per image
images = pipe(class_labels=[0, 1, 2, 3], guidance_scale=2.0, generator=generators).images
```

With priorlab installed, `priorlab sample model={name} base=BASE prior=base class_labels=[0,1]` guides it with
another model's unconditional prediction (Phunyaphibarn et al. 2025, "Unconditional Priors Matter!").
"""


def load_model(path: str, dtype: torch.dtype | None = None):
    """The pipeline of `model=`: a priorlab model (exported on the fly), an exported folder, or any diffusers
    pipeline folder or hub name."""
    if is_priorlab_model(path):
        pipe = from_priorlab(path)
        return pipe.to(dtype=dtype) if dtype is not None else pipe
    if is_exported(path):
        return load_exported(path, dtype)
    return load_pipeline(path, dtype, role="model")


def load_exported(path: str | Path, dtype: torch.dtype | None = None, role: str = "model") -> ClassConditionalPipeline:
    """An exported folder as priorlab's own ClassConditionalPipeline, its components loaded by their diffusers classes.

    `from_pretrained` would run the code shipped in the folder instead (and only with trust_remote_code=True), since
    model_index.json names it; here the folder's code is never run, whoever wrote it.
    """
    import diffusers

    path = Path(path).expanduser()
    try:
        index = json.loads((path / "model_index.json").read_text())
        parts = {}
        for name in ("denoiser", "scheduler"):
            library, class_name = index[name]
            cls = getattr(diffusers, str(class_name), None) if library == "diffusers" else None
            if cls is None:
                raise ValueError(f"its {name} is {library}.{class_name}, not a diffusers class")
            kwargs = {"torch_dtype": dtype} if dtype is not None and name == "denoiser" else {}
            parts[name] = cls.from_pretrained(path, subfolder=name, **kwargs)
        config = {k: index.get(k) for k in ("num_classes", "null_class", "class_names")}
        return ClassConditionalPipeline(parts["denoiser"].eval(), parts["scheduler"], **config)
    except (OSError, ValueError, KeyError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"cannot load {role}={path}: {first}") from err


def load_base(path: str, negative_prompt: str = "", device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> PriorNet:  # fmt: skip
    """The prior ψ of `base=`: an exported class-conditional folder queried with its null class, else whatever
    `priorlab.pipelines.load_prior` takes (a priorlab model, a diffusers pipeline or model), each local or given by
    its hub name (`models.hub`)."""
    path = str(locate(path, "base", check=False))
    if not is_exported(path) or is_priorlab_model(path):
        return load_prior(path, negative_prompt, device, dtype)
    pipe = load_exported(path, dtype, role="base")
    sched = pipe.scheduler
    null = {"class_labels": torch.tensor([pipe.null_class])}
    return DiffusersPrior(pipe.denoiser, sched.alphas_cumprod, sched.config.prediction_type, null, None,
                          source=f"base={path}").to(device, dtype)  # fmt: skip


def base_note(model: str, base: str | None) -> str | None:
    """For a priorlab fine-tune and a priorlab base: refuse the recorded base when its weights changed, and
    return a note when another base is given (`check_recorded_base`)."""
    if base is None or not (is_priorlab_model(model) and is_priorlab_model(locate(base, "base", check=False))):
        return None
    return check_recorded_base(load_denoiser(model), load_denoiser(base, role="base"))


def check_class_labels(pipe, labels: list[int] | None) -> None:
    """A UserError naming the class labels that a ClassConditionalPipeline's model does not have."""
    classes = getattr(getattr(pipe, "config", None), "num_classes", None) if labels is not None else None
    if type(pipe).__name__ != ClassConditionalPipeline.__name__ or classes is None:
        return
    bad = [v for v in labels if not 0 <= v < int(classes)]
    if bad:
        raise UserError(f"class_labels={bad} are not classes of this model: use indices 0 … {int(classes) - 1}")

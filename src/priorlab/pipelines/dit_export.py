"""A fine-tune of a diffusers DiT base exported back to a plain diffusers `DiTPipeline` folder (`priorlab export`).

The folder holds transformer/, vae/ (the base's VAE, recorded by the fine-tune and checked against its hash),
scheduler/ (a DDIM scheduler of the training schedule) and model_index.json with the new classes' names in
`id2label`, where the hub's DiT keeps them, so that

    DiTPipeline.from_pretrained(folder)      # plain diffusers, no priorlab and no remote code

loads it and `pipe.get_label_ids([...])` maps the new names. DiTPipeline queries the null class as label 1000
whatever the model (ImageNet's DiT), so the exported label table has 1001 rows: the fine-tune's K class rows, its
null row at row 1000, and the rows K … 999, which no class uses, set to the null row too (they predict ∅). Its
guidance then uses the fine-tune's own ∅ branch, with a learned variance split off as DiTPipeline does.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from priorlab import atomic, checks
from priorlab.errors import UserError
from priorlab.models.denoiser import label_tables
from priorlab.models.hub import source_name
from priorlab.models.io import SavedModel
from priorlab.models.latent import Latent
from priorlab.models.scale import export_note

PIPELINE_NULL = 1000  # the null label DiTPipeline passes (`pipelines.families.DIT`)


def is_dit_finetune(saved: SavedModel) -> bool:
    """A priorlab fine-tune of a latent diffusers DiT base: exported as a DiTPipeline."""
    return saved.denoiser.class_name == "DiTTransformer2DModel" and isinstance(saved.meta.get("vae"), dict)


@torch.no_grad()
def padded_transformer(saved: SavedModel) -> DiTTransformer2DModel:
    """The fine-tune's transformer with label tables of PIPELINE_NULL + 1 rows (module doc)."""
    d = saved.denoiser
    if d.num_classes > PIPELINE_NULL:
        raise UserError(f"model={saved.path} has {d.num_classes} classes; DiTPipeline takes at most {PIPELINE_NULL} "
                        f"(its null label is {PIPELINE_NULL})")  # fmt: skip
    config = {k: v for k, v in d.net.config.items() if not k.startswith("_")}
    net = DiTTransformer2DModel.from_config({**config, "num_embeds_ada_norm": PIPELINE_NULL})
    tables = {name + ".weight" for name, m in d.net.named_modules() if any(m is t for t in label_tables(d.net))}
    net.load_state_dict({k: v for k, v in d.net.state_dict().items() if k not in tables}, strict=False)
    for mine, theirs in zip(label_tables(net), label_tables(d.net), strict=True):
        mine.weight.copy_(theirs.weight[d.null_class].expand_as(mine.weight))
        mine.weight[: d.num_classes] = theirs.weight[: d.num_classes]
    return net.eval()


def class_names(saved: SavedModel) -> dict[str, str]:
    """The fine-tune's id2label (its data's class names; the indices where its data has none)."""
    return saved.meta.get("id2label") or {str(k): str(k) for k in range(saved.denoiser.num_classes)}


def dit_pipeline(saved: SavedModel) -> DiTPipeline:
    """The DiTPipeline of a DiT fine-tune, in memory (`priorlab sample model=RUN`), as `export_dit` writes it."""
    vae = Latent.load(saved.meta["vae"], role=f"model={saved.path}").vae
    keep = {k: v for k, v in saved.scheduler.config.items() if not k.startswith("_")}
    scheduler = DDIMScheduler.from_config({**keep, "prediction_type": saved.denoiser.prediction_type})
    names = {int(k): v for k, v in class_names(saved).items()}
    return DiTPipeline(padded_transformer(saved), vae, scheduler, id2label=names)


def export_dit(saved: SavedModel, out: str | Path, overwrite: bool = False) -> Path:
    """Write the DiTPipeline folder of a DiT fine-tune (module doc); returns `out`."""
    pipe, names = dit_pipeline(saved), class_names(saved)
    out = checks.output_folder(out, overwrite, saved.path)
    with atomic.folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        index = json.loads((tmp / "model_index.json").read_text())
        index["id2label"] = {str(k): str(v) for k, v in names.items()}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(model_card(saved, out.name, names))
    return out


def model_card(saved: SavedModel, name: str, names: dict) -> str:
    """A hub model card: the base, the new classes, the conditioning dropout, and how to sample."""
    meta, d = saved.meta, saved.denoiser
    base = meta.get("base") if isinstance(meta.get("base"), dict) else {}
    dropout = meta.get("cond_dropout")
    step = f", {meta['step']} steps" if "step" in meta else ""
    first = ", ".join(f'"{v}"' for v in list(names.values())[:2])
    return f"""---
library_name: diffusers
tags:
- priorlab
- dit
- class-conditional
- classifier-free-guidance
---

# {name}

A DiT fine-tuned with priorlab from `{source_name(base)}` (weights sha256 {str(base.get("sha256"))[:12]}) to
{d.num_classes} new classes ({", ".join(names.values())}){step}, with conditioning dropout p = {dropout}: each
training label was replaced by the null class with probability {dropout}, so the model's own unconditional (∅)
branch was trained on that share of the steps only. The class rows started at the base's null row, the null row is
the base's. The label table has {PIPELINE_NULL + 1} rows for DiTPipeline's null label {PIPELINE_NULL}; rows
{d.num_classes} … {PIPELINE_NULL - 1} are unused (they equal the null row).{export_note(d)}

```python
import torch
from diffusers import DiTPipeline

pipe = DiTPipeline.from_pretrained("{name}")
labels = pipe.get_label_ids([{first}])
images = pipe(class_labels=labels, guidance_scale=2.0, generator=torch.Generator().manual_seed(0)).images
```

With priorlab installed, `priorlab sample model={name} base=BASE prior=base` guides it with the base's
unconditional prediction instead (Phunyaphibarn et al. 2025, "Unconditional Priors Matter!").
"""

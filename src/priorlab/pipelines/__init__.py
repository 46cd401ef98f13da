"""The prior swap on real diffusers pipelines and checkpoints (issue 5).

pipe = load_pipeline("path/to/fine-tuned")        # a diffusers pipeline folder (or hub name)
prior_net = load_prior("path/to/base")             # a pipeline, a bare model or a priorlab folder
with swap_prior(pipe, BasePrior(prior_net)):        # or make_prior("mix", prior_net, weights), ...
    images = pipe(prompt="...", guidance_scale=7.5).images

A priorlab model becomes a pipeline with `from_priorlab("runs/.../finetune/...")` (in memory) or
`export_pipeline(run, out)` (a folder for `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`).
"""

from priorlab.pipelines.calibrate import encode_images, fit_pipeline_weights, model_conditions, model_null_condition
from priorlab.pipelines.class_pipeline import ClassConditionalPipeline
from priorlab.pipelines.export import export_pipeline, from_priorlab, load_exported
from priorlab.pipelines.families import FAMILIES, IMAGE_CONDITIONED, Family, family_of
from priorlab.pipelines.prior import load_pipeline, load_prior, null_condition
from priorlab.pipelines.swap import SwappedDenoiser, swap_prior
from priorlab.priors import BasePrior, DiffusersPrior, MixPrior, SelfPrior, make_prior

__all__ = [
    "FAMILIES",
    "IMAGE_CONDITIONED",
    "BasePrior",
    "ClassConditionalPipeline",
    "DiffusersPrior",
    "Family",
    "MixPrior",
    "SelfPrior",
    "SwappedDenoiser",
    "encode_images",
    "export_pipeline",
    "family_of",
    "fit_pipeline_weights",
    "from_priorlab",
    "load_pipeline",
    "load_exported",
    "load_prior",
    "make_prior",
    "model_conditions",
    "model_null_condition",
    "null_condition",
    "swap_prior",
]

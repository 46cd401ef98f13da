"""Where each diffusers pipeline keeps its denoiser, and how it lays out the classifier-free-guidance batch.

A guided pipeline runs its denoiser on `chunks` copies of the latents stacked along the batch, one copy per
branch, and combines the chunks afterwards. The adapters replace the predictions of one chunk, the fully
unconditional one, and leave every other step (encoding, scheduler, combination, decoding) to the pipeline:

| pipeline | denoiser | chunks (in order) | unconditional |
|---|---|---|---|
| StableDiffusionPipeline, StableDiffusionImg2ImgPipeline | unet | [negative, prompt] | 0 |
| StableDiffusionInstructPix2PixPipeline | unet (8 channels) | [text+image, image, ∅] | 2 (eps(∅,∅)) |
| DiTPipeline | transformer | [class, null class] | 1 |
| ClassConditionalPipeline (priorlab's, `export`) | denoiser | [class, null class] | 1 |
| StableDiffusionImageVariationPipeline | unet | [zero embedding, image embedding] | 0 |
| VersatileDiffusionImageVariationPipeline | image_unet | [negative, image embedding] | 0 |
| TextToVideoSDPipeline | unet (3-D) | [negative, prompt] | 0 |
| I2VGenXLPipeline | unet (3-D) | [negative text + zero image embedding, prompt + image] | 0 |

(From the pipelines' code in diffusers 0.42.) A pipeline not listed here, such as the community Zero-1-to-3
pipeline (an 8-channel UNet with [∅, image+pose] chunks), is served by passing a `Family` explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

from priorlab.errors import UserError


@dataclass(frozen=True)
class Family:
    """The layout of one pipeline family.

    Attributes:
        name: a short name for messages and settings files.
        component: the pipeline attribute that holds the denoiser.
        chunks: branches stacked along the batch when guidance is on.
        uncond: index of the fully unconditional chunk.
        class_labels: the pipeline passes class labels.
        pipeline_null: the null label the pipeline passes whatever the model (DiT: 1000), which the adapter maps to
            the model's own null class; None where the pipeline passes the model's own null class.
        video: the latents are (N, C, F, H, W).
    """

    name: str
    component: str
    chunks: int
    uncond: int
    class_labels: bool = False
    video: bool = False
    pipeline_null: int | None = None


TEXT_TO_IMAGE = Family("text-to-image", "unet", 2, 0)
INSTRUCT_PIX2PIX = Family("instruct-pix2pix", "unet", 3, 2)
DIT = Family("dit", "transformer", 2, 1, class_labels=True, pipeline_null=1000)
CLASS_CONDITIONAL = Family("class-conditional", "denoiser", 2, 1, class_labels=True)
IMAGE_VARIATION = Family("image-variation", "unet", 2, 0)
VERSATILE_IMAGE_VARIATION = Family("image-variation", "image_unet", 2, 0)
TEXT_TO_VIDEO = Family("text-to-video", "unet", 2, 0, video=True)
IMAGE_TEXT_TO_VIDEO = Family("image-text-to-video", "unet", 2, 0, video=True)
IMAGE_CONDITIONED = Family("image-conditioned", "unet", 2, 0)  # Zero-1-to-3-style [∅, cond] 8-channel UNets

FAMILIES = {
    "StableDiffusionPipeline": TEXT_TO_IMAGE,
    "StableDiffusionImg2ImgPipeline": Family("image-to-image", "unet", 2, 0),
    "StableDiffusionInstructPix2PixPipeline": INSTRUCT_PIX2PIX,
    "DiTPipeline": DIT,
    "ClassConditionalPipeline": CLASS_CONDITIONAL,
    "StableDiffusionImageVariationPipeline": IMAGE_VARIATION,
    "VersatileDiffusionImageVariationPipeline": VERSATILE_IMAGE_VARIATION,
    "TextToVideoSDPipeline": TEXT_TO_VIDEO,
    "I2VGenXLPipeline": IMAGE_TEXT_TO_VIDEO,
}


def family_of(pipe) -> Family:
    """The family of a pipeline instance, by its class."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise UserError(
            f"{name} is not a pipeline priorlab knows ({', '.join(FAMILIES)}); `priorlab sample` cannot run it. In "
            "Python, swap_prior(pipe, prior, family=priorlab.pipelines.Family(...)) takes its layout: the denoiser "
            "attribute, the number of guidance chunks, the ∅ chunk"
        )
    return FAMILIES[name]

"""Text-conditioned fine-tunes (`models.text`): a tiny pixel-space Stable-Diffusion-layout pipeline
(UNet2DConditionModel, CLIP text encoder and tokenizer from a small vocabulary, no VAE) saved here as the base,
fine-tuned on the generated captioned shapes (`data.captions`), with prompts dropped to "", the prompt cache, the
step-0 identity of the ∅ branch, evaluation with prior=base, resume, and export to a StableDiffusionPipeline."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel

import pipeline_models
from conftest import TINY
from priorlab.data.captions import write_captioned_shapes
from priorlab.errors import UserError
from priorlab.models import drop_labels, init_from_base, load_denoiser
from priorlab.models.text import PromptCache, TextDenoiser, encoder_hash, load_text_encoder, text_copy
from priorlab.overrides import override

SHAPE = (3, 8, 8)


def _unet(seed: int, channels: int = 3, size: int = 8) -> UNet2DConditionModel:
    """A UNet attending to 32-wide prompts, its weights moved off initialisation."""
    torch.manual_seed(seed)
    net = UNet2DConditionModel(sample_size=size, in_channels=channels, out_channels=channels, layers_per_block=1,
                               block_out_channels=(8, 16), norm_num_groups=4, attention_head_dim=2,
                               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.eval()


def _pipeline(folder: Path, seed: int = 0, encoder_seed: int = 1, text_encoder: bool = True,
              latent: bool = False) -> Path:  # fmt: skip
    """A StableDiffusionPipeline folder: unet/, text_encoder/, tokenizer/, scheduler/, and with `latent` vae/ (the
    tiny AutoencoderKL halves the side: 8 × 8 images, 4 × 4 × 4 latents); without, pixel space."""
    pipe = StableDiffusionPipeline(
        vae=pipeline_models.vae(0) if latent else None,
        text_encoder=pipeline_models.text_encoder(encoder_seed) if text_encoder else None,
        tokenizer=pipeline_models.tokenizer(folder / "_tok"), unet=_unet(seed, 4, 4) if latent else _unet(seed),
        scheduler=DDPMScheduler(num_train_timesteps=100, beta_schedule="linear"), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_captioned_shapes(tmp_path_factory.mktemp("data") / "shapes")


def _sample(overrides: list[str]):
    """The config of `priorlab sample` with `overrides` (model_dir= for the command line's model=)."""
    from hydra import compose, initialize_config_dir

    from priorlab.overrides import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="sample", overrides=overrides)


def _data(shapes: Path) -> list[str]:
    return ["data=hf", f"data.source={shapes}", "data.caption_column=text", "data.image_size=8", "data.channels=3"]


def test_the_finetunes_null_branch_is_the_bases_empty_prompt_prediction_at_step_0(tmp_path):
    """Both start from the base's weights; ∅ is the embedding of "" for either, so their ∅ predictions agree, while
    a caption's prediction differs (the table's rows are used)."""
    base = load_denoiser(_pipeline(tmp_path / "sd"), role="base")
    assert isinstance(base.denoiser, TextDenoiser) and base.meta["format"] == "diffusers"
    captions = ["a red square", "a blue disc"]
    model = text_copy(base.denoiser, captions, SHAPE, tmp_path / "cache").eval()
    init_from_base(model, base.denoiser)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(4, *SHAPE, generator=g), torch.tensor([3, 30, 60, 99]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        expected = base.denoiser(x, t, torch.zeros_like(y))  # the base's null class 0: its only row, ""
        torch.testing.assert_close(model(x, t, y, force_drop=True), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x, t, torch.full_like(y, model.null_class)), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x, t, y), expected, atol=1e-4)
    assert model.null_class == 2 and model.prompts.shape == (3, 16, 32)


def test_one_guided_step_takes_the_empty_prompt_of_the_model_or_of_the_base(tmp_path):
    """guidance.guide on caption indices: prior=self is θ's prediction with the "" embedding, prior=base the base
    UNet's with its own "" embedding, each combined as eps_∅ + w·(eps_θ(c) − eps_∅) (hand-computed here)."""
    from priorlab.evaluation.setup import make_prior_net
    from priorlab.guidance import guide
    from priorlab.priors import SELF, make_prior

    base = load_denoiser(_pipeline(tmp_path / "sd"), role="base")
    model = text_copy(base.denoiser, ["a red square", "a blue disc"], SHAPE, None).eval()
    init_from_base(model, base.denoiser)
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # θ's ∅ now differs from the base's
    x, t, y = (
        torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)),
        torch.tensor([5, 40, 90]),
        torch.tensor([0, 1, 0]),
    )
    abar = base.scheduler.alphas_cumprod[t]
    empty = base.denoiser.prompts[0].expand(3, -1, -1)  # (3, L, D) the base's "" embedding
    with torch.no_grad():
        cond = model.net(x, t, encoder_hidden_states=model.prompts[y]).sample
        own = model.net(x, t, encoder_hidden_states=model.prompts[[2, 2, 2]]).sample
        theirs = base.denoiser.net(x, t, encoder_hidden_states=empty).sample
        torch.testing.assert_close(model.prompts[2], base.denoiser.prompts[0])  # both ∅ are the embedding of ""
        selfish = guide(model, x, t, y, abar, 3.0, SELF)
        based = guide(model, x, t, y, abar, 3.0, make_prior("base", make_prior_net((model, base.scheduler), base)))
    torch.testing.assert_close(selfish.guided, own + 3.0 * (cond - own), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(based.guided, theirs + 3.0 * (cond - theirs), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(own, theirs, atol=1e-4)


def test_prompts_are_dropped_to_the_empty_prompt_at_rate_p():
    """drop_labels on caption indices: the fraction of rows that become the "" row is p (seeded), and those rows
    are fed the "" embedding."""
    ids = torch.arange(20000) % 5
    g = torch.Generator().manual_seed(0)
    dropped = drop_labels(ids, 0.3, 5, generator=g)
    rate = float((dropped == 5).float().mean())
    assert abs(rate - 0.3) < 0.015  # binomial sd ≈ 0.0032
    assert torch.equal(dropped[dropped != 5], ids[dropped != 5])


def test_the_prompt_cache_encodes_each_caption_once_per_text_encoder(tmp_path):
    """The encoder sees each distinct caption and "" once; a second fine-tune reuses the file; another text encoder
    (other weights, another hash) gets its own embeddings."""
    first, other = _pipeline(tmp_path / "a"), _pipeline(tmp_path / "b", encoder_seed=7)
    key, other_key = encoder_hash(first), encoder_hash(other)
    assert key != other_key and key == encoder_hash(first)
    encoder, tokenizer = load_text_encoder(first)
    rows = []
    encoder.register_forward_hook(lambda m, args, out: rows.append(len(args[0])))
    captions = ["a red square", "a blue disc", "a red square", ""]
    embedded = PromptCache(tmp_path / "cache", key).embed(captions, encoder, tokenizer)
    assert sum(rows) == 3 and embedded.shape == (4, 16, 32) and torch.equal(embedded[0], embedded[2])
    again = PromptCache(tmp_path / "cache", key).embed(["", "a blue disc"], encoder, tokenizer)
    assert sum(rows) == 3 and torch.equal(again, embedded[[3, 1]])  # read from the file
    encoder2, tokenizer2 = load_text_encoder(other)
    theirs = PromptCache(tmp_path / "cache", other_key).embed(["a blue disc"], encoder2, tokenizer2)
    assert not torch.allclose(theirs[0], embedded[1])
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([f"{key}.safetensors",
                                                                             f"{other_key}.safetensors"])  # fmt: skip


def test_user_mistakes_are_one_line_errors(tmp_path, shapes, compose_tmp):
    from priorlab.commands.train import train
    from priorlab.data import HFDataModule

    with pytest.raises(UserError, match=r"data.caption_column='caption' is not a column of .*; its columns are"):
        HFDataModule(source=str(shapes), caption_column="caption", image_size=8).setup()
    import datasets

    (tmp_path / "holes").mkdir()
    images = [pipeline_models.image(i, 8) for i in range(3)]
    datasets.Dataset.from_dict({"image": images, "text": ["a red disc", None, "a blue disc"]}).to_parquet(
        str(tmp_path / "holes" / "train.parquet"))  # fmt: skip
    with pytest.raises(UserError, match=r"caption_column='text' of .*: row 1 holds an empty cell, not a caption"):
        HFDataModule(source=str(tmp_path / "holes"), caption_column="text", image_size=8).setup()
    bare = _pipeline(tmp_path / "bare", text_encoder=False)
    with pytest.raises(UserError, match="has no text_encoder: a UNet2DConditionModel base is a Stable-Diffusion-"):
        load_denoiser(bare, role="base")
    sd = _pipeline(tmp_path / "sd")
    with pytest.raises(UserError, match="is text-conditioned .*: give it image–caption data"):
        train(compose_tmp(["data=digits", "stage=finetune", f"base={sd}", *TINY]))


def test_text_finetune_trains_evaluates_with_the_base_resumes_and_exports(compose_tmp, tmp_path, shapes):
    """`priorlab train stage=finetune base=<SD folder>` on the captioned shapes: the base's UNet and schedule, its
    text encoder recorded, the captions' table kept; `evaluate` with base= the folder gives prior=self and prior=base
    on held-out captions; a run resumed from its checkpoint ends with the unbroken run's weights; the export loads
    with plain diffusers, predicts what the fine-tune predicts, and its model card gives the dropout."""
    from safetensors.torch import load_file

    from priorlab.commands.evaluate import evaluate
    from priorlab.commands.train import train
    from priorlab.pipelines.export import export_pipeline

    folder = _pipeline(tmp_path / "sd")
    overrides = [*_data(shapes), "stage=finetune", f"base={folder}", "cond_dropout=0.2",
                 f"prompt_cache={tmp_path / 'cache'}", *TINY]  # fmt: skip
    model_dir = train(compose_tmp([*overrides, "study=unbroken"]))
    saved = load_denoiser(model_dir)
    assert isinstance(saved.denoiser, TextDenoiser) and saved.denoiser.captions[0] == "a blue disc"
    assert saved.denoiser.num_classes == 6 and saved.meta["cond_dropout"] == 0.2
    assert saved.meta["base"]["text_encoder"]["sha256"] == encoder_hash(folder)
    assert saved.scheduler.config.num_train_timesteps == 100 and len(list((tmp_path / "cache").iterdir())) == 1
    out = evaluate(compose_tmp([override("model_dir", model_dir.parent), f"base={folder}", "eval=tiny",
                                "eval.evaluator_steps=5", "eval.num_steps=2", f"out={tmp_path / 'eval'}"],
                               config_name="evaluate"))  # fmt: skip
    cond = json.loads((out / "step=4_cond.json").read_text())["metrics"]
    prior = json.loads((out / "step=4_prior.json").read_text())["metrics"]
    for p in ("self", "base"):
        assert all(f"eval/cond/{m}/prior={p}/w=3.0" in cond for m in ("fd", "kid", "accuracy")), sorted(cond)
    assert "eval/prior/disagreement/all" in prior and "eval/uncond/fd/model=base" in prior, sorted(prior)
    other = write_captioned_shapes(tmp_path / "other", n=4)  # four of the six captions
    with pytest.raises(UserError, match="is text-conditioned on 6 captions, and the data's captions differ"):
        evaluate(compose_tmp([override("model_dir", model_dir.parent), *_data(other), "eval=tiny"], "evaluate"))

    killed = train(compose_tmp([*overrides, "study=killed", "trainer.max_steps=2"])).parent
    (killed / "done.json").unlink()  # as if stopped after its step-2 checkpoint
    resumed = train(compose_tmp([*overrides, "study=killed", "resume=force"]))
    a, b = (load_file(d / "diffusion_pytorch_model.safetensors") for d in (model_dir, resumed))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    exported = export_pipeline(model_dir, tmp_path / "exported")
    plain = StableDiffusionPipeline.from_pretrained(exported, vae=None)  # pixel space: no VAE to load
    assert plain.vae is None and "with probability 0.2" in (exported / "README.md").read_text()
    states = plain.encode_prompt(["a red disc", ""], "cpu", 1, False)[0]  # (2, L, D)
    x, t = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 70])
    ids = torch.tensor([saved.denoiser.captions.index("a red disc"), saved.denoiser.null_class])
    with torch.no_grad():
        torch.testing.assert_close(plain.unet(x, t, encoder_hidden_states=states).sample, saved.denoiser(x, t, ids),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
    # 8 × 8 images: without a VAE diffusers still divides height and width by 8
    images = plain("a red disc", num_inference_steps=2, guidance_scale=2.0, output_type="latent", height=64,
                   width=64, generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert images.shape == (1, *SHAPE) and torch.isfinite(images).all()
    _pipeline(folder, encoder_seed=7)  # the same UNet, another text encoder: the finished run refuses it
    with pytest.raises(UserError, match=r"other settings: base text encoder \(sha256\)"):
        train(compose_tmp([*overrides, "study=unbroken"]))


def test_a_latent_stable_diffusion_base_finetunes_on_cached_latents_and_exports_with_its_vae(compose_tmp, tmp_path,
                                                                                            shapes):  # fmt: skip
    """A pipeline with a VAE: the fine-tune trains on the data's latents (`models.latent`, cached), records the VAE,
    is evaluated with prior=base on decoded samples (during training, callbacks=eval, and by `evaluate`), and
    exports to a StableDiffusionPipeline that plain diffusers loads whole and samples 8 × 8 images from."""
    from priorlab.commands.evaluate import evaluate
    from priorlab.commands.train import train
    from priorlab.pipelines.export import export_pipeline

    folder = _pipeline(tmp_path / "sd", latent=True)
    base = load_denoiser(folder, role="base")
    assert base.meta["vae"]["path"] == str((folder / "vae").resolve()) and base.denoiser.sample_shape == (4, 4, 4)
    evaluated = ["callbacks=eval", "eval=tiny", "eval.evaluator_steps=5", "eval.num_steps=2",
                 "callbacks.prior_quality.every_n_steps=4",
                 "callbacks.conditional_quality.every_n_steps=4"]  # fmt: skip
    model_dir = train(compose_tmp([*_data(shapes), "stage=finetune", f"base={folder}", *TINY, *evaluated]))
    saved = load_denoiser(model_dir)
    assert saved.meta["vae"] == base.meta["vae"] and saved.denoiser.sample_shape == (4, 4, 4)
    during = json.loads((model_dir.parent / "eval" / "step=4_cond.json").read_text())["metrics"]
    assert "eval/cond/fd/prior=base/w=3.0" in during  # callbacks=eval measured it while training
    assert any((tmp_path / "runs" / "latents").rglob("*.pt"))  # runs/latents/<data>/<key>.pt
    out = evaluate(compose_tmp([override("model_dir", model_dir.parent), f"base={folder}", "eval=tiny",
                                "eval.evaluator_steps=5", "eval.num_steps=2", f"out={tmp_path / 'eval'}"],
                               config_name="evaluate"))  # fmt: skip
    cond = json.loads((out / "step=4_cond.json").read_text())["metrics"]
    assert "eval/cond/fd/prior=base/w=3.0" in cond and "eval/cond/fd/prior=self/w=3.0" in cond
    exported = export_pipeline(model_dir, tmp_path / "exported")
    plain = StableDiffusionPipeline.from_pretrained(exported)
    image = plain("a red disc", num_inference_steps=2, guidance_scale=2.0, height=8, width=8,
                  generator=torch.Generator().manual_seed(0)).images[0]  # fmt: skip
    assert image.size == (8, 8) and "latent diffusion model" in (exported / "README.md").read_text()


def test_sample_takes_a_text_finetune_with_prompts_and_its_base_as_the_prior(compose_tmp, tmp_path, shapes):
    """`priorlab sample model=<text fine-tune run> base=<SD folder> prompt=[...]`: the fine-tune as a
    StableDiffusionPipeline (pixel space: decoded by the identity, `PixelCodec`), sampled with prior=self and
    prior=base from the same seeds; prior=self's images are the plain pipeline's (vae=None, output_type="latent",
    as exported) within a level of rounding. Class labels for a text model, and a prompt for a class model, are
    one-line errors."""
    import numpy as np
    from PIL import Image

    from priorlab.commands.train import train
    from priorlab.models import save_denoiser, unet
    from priorlab.pipelines.sample import sample_command
    from priorlab.pipelines.text_export import text_pipeline

    folder = _pipeline(tmp_path / "sd")
    model_dir = train(compose_tmp([*_data(shapes), "stage=finetune", f"base={folder}", *TINY,
                                   f"prompt_cache={tmp_path / 'cache'}"]))  # fmt: skip
    prompts = ["a red disc", "a blue disc"]
    common = [override("model_dir", model_dir.parent), "num_steps=2", "guidance_scale=3", "seed=5", "progress=false",
              "device=cpu"]  # fmt: skip
    out = sample_command(_sample([*common, f"base={folder}", override("prompt", prompts), "num_images=2",
                                  "compare=true", f"out={tmp_path / 'samples'}"]))  # fmt: skip
    settings = json.loads((out / "sample.json").read_text())
    assert settings["family"] == "text-to-image" and settings["pipeline"] == "StableDiffusionPipeline"
    assert settings["files"] == {m: [f"prior={m}_{i}.png" for i in range(4)] for m in ("self", "base")}
    assert settings["denoiser_calls"]["base"] == {"guided": 2, "unguided": 0} and (out / "compare.png").exists()
    images = {m: [np.asarray(Image.open(out / f), dtype=int) for f in files] for m, files in settings["files"].items()}
    assert images["self"][0].shape == (8, 8, 3)
    assert any(np.abs(a - b).max() > 1 for a, b in zip(images["self"], images["base"], strict=True))
    plain = text_pipeline(load_denoiser(model_dir))  # no VAE: the exported folder's pipeline
    generators = [torch.Generator().manual_seed(5 + i) for i in range(2)]
    x = plain(prompts[0], num_images_per_prompt=2, num_inference_steps=2, guidance_scale=3.0, output_type="latent",
              height=64, width=64, generator=generators).images  # fmt: skip
    expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).mul(255).round().numpy()  # (2, 8, 8, 3)
    for i in range(2):  # the first prompt's two images; another batch shape: a level of rounding apart at most
        assert np.abs(images["self"][i] - expected[i]).max() <= 1
    no_base = [*common, "prior=self", f"out={tmp_path / 'none'}"]
    with pytest.raises(UserError, match="text-to-image model is not conditioned on classes: leave class_labels= "
                                        "out and give prompt="):  # fmt: skip
        sample_command(_sample([*no_base, "class_labels=[0]"]))
    with pytest.raises(UserError, match=r"text-to-image pipeline needs prompt='...' \(or a list"):
        sample_command(_sample(no_base))
    classes = save_denoiser(unet(SHAPE, 3, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4),
                            DDPMScheduler(num_train_timesteps=100), tmp_path / "classes")  # fmt: skip
    with pytest.raises(UserError, match="class-conditional model is conditioned on classes, not prompts: give "
                                        "class_labels="):  # fmt: skip
        sample_command(_sample([*no_base[1:], override("model_dir", classes), "prompt=a red disc"]))

"""A user's own diffusers UNet2DModel as a base: loading, the step-0 identity of its fine-tune, fine-tuning and
evaluating from it, export back to diffusers, and the errors for folders that are neither priorlab's nor diffusers'.
Tiny random-weight UNets are saved here with save_pretrained."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from conftest import TINY
from priorlab.errors import UserError
from priorlab.evaluation.setup import make_prior_net
from priorlab.models import content_hash, init_from_base, load_denoiser, save_denoiser
from priorlab.models.pretrained import conditional_copy
from priorlab.overrides import override

SHAPE = (1, 8, 8)  # sklearn's digits: data=digits
CLASSES = 10


def _unet(seed: int, num_class_embeds: int | None = None) -> UNet2DModel:
    """A UNet with its weights moved off initialisation, so that its outputs and class rows are not trivial."""
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4, num_class_embeds=num_class_embeds)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _schedule(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="linear", prediction_type=prediction_type)


def _save(folder: Path, layout: str = "pipeline", seed: int = 0, num_class_embeds: int | None = None,
          prediction_type: str = "epsilon") -> Path:  # fmt: skip
    """A diffusers base: a DDPMPipeline folder (unet/, scheduler/) or a model folder with its scheduler beside."""
    net, scheduler = _unet(seed, num_class_embeds), _schedule(prediction_type)
    if layout == "pipeline":
        DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(folder)
    else:
        net.save_pretrained(folder)
        scheduler.save_pretrained(folder)
    return folder


def _inputs(n: int = 6, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.randint(0, 100, (n,), generator=g), torch.arange(n) % CLASSES


@pytest.mark.parametrize(("layout", "rows"), [("pipeline", None), ("model", None), ("model", 4)])
def test_finetune_of_a_diffusers_base_predicts_the_bases_null_prediction_at_step_0(tmp_path, layout, rows):
    """Unconditional base: zero class rows, a no-op added to the time embedding. Class-conditional base (4 rows,
    its null class the last): every row of the fine-tune starts at the base's null row (DiT's protocol)."""
    base = load_denoiser(_save(tmp_path / "base", layout, num_class_embeds=rows), role="base")
    assert base.meta["format"] == "diffusers" and base.denoiser.conditional == (rows is not None)
    assert base.denoiser.null_class == (0 if rows is None else 3) and base.scheduler.config.num_train_timesteps == 100
    finetune = conditional_copy(base.denoiser, CLASSES, SHAPE).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        expected = base.denoiser.net(x, t, class_labels=None if rows is None else torch.full_like(y, 3)).sample
        assert not torch.allclose(finetune(x, t, y), expected, atol=1e-3)  # random rows and weights before
        init_from_base(finetune, base.denoiser)
        torch.testing.assert_close(finetune(x, t, y, force_drop=True), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(finetune(x, t, y), expected, rtol=1e-6, atol=1e-6)
        table = finetune.net.class_embedding.weight  # (CLASSES + 1, D)
        null_row = torch.zeros_like(table[0]) if rows is None else base.denoiser.net.class_embedding.weight[3]
        assert table.shape[0] == CLASSES + 1 and torch.equal(table, null_row.expand_as(table))
        table[2].normal_()  # a class row that moved: the class now changes the prediction (the row is used)
        moved = finetune(x, t, torch.full_like(y, 2))
    assert not torch.allclose(moved, expected, atol=1e-3)


def test_the_base_as_prior_is_the_diffusers_networks_unconditional_prediction(tmp_path):
    """prior=base from a diffusers folder goes through priors.nets' DenoiserPrior: at the model's ᾱ (the same
    schedule) it is the UNet's own eps, and a v-prediction base is converted to eps."""
    base = load_denoiser(_save(tmp_path / "eps"), role="base")
    vbase = load_denoiser(_save(tmp_path / "v", seed=1, prediction_type="v_prediction"), role="base")
    model = conditional_copy(base.denoiser, CLASSES, SHAPE)
    x, t, _ = _inputs()
    abar = base.scheduler.alphas_cumprod[t]  # (N,)
    with torch.no_grad():
        eps = make_prior_net((model, base.scheduler), base).eps(x, abar)
        torch.testing.assert_close(eps, base.denoiser.net(x, t).sample, rtol=1e-5, atol=1e-5)
        v = vbase.denoiser.net(x, t).sample
        a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
        eps_v = make_prior_net((model, base.scheduler), vbase).eps(x, abar)
    torch.testing.assert_close(eps_v, a * v + s * x, rtol=1e-5, atol=1e-5)  # eps = √ᾱ·v + √(1−ᾱ)·x_t


def test_finetune_from_a_diffusers_pipeline_trains_records_evaluates_and_exports(compose_tmp, tmp_path):
    """`priorlab train stage=finetune base=<DDPMPipeline folder>` in-process: the base's architecture and schedule,
    its path and weights' hash recorded; `evaluate` takes the folder as base=; the fine-tune exports to a folder
    that plain diffusers loads; a finished or resumed run given changed base weights is refused."""
    from priorlab.commands.evaluate import evaluate
    from priorlab.commands.train import train
    from priorlab.pipelines.export import export_pipeline

    folder = _save(tmp_path / "my_model")
    overrides = ["data=digits", "stage=finetune", f"base={folder}", *TINY]
    model_dir = train(compose_tmp(overrides))
    run = model_dir.parent
    record = json.loads((run / "base.json").read_text())
    assert record["path"] == str((folder / "unet").resolve()) and record["sha256"] == content_hash(folder / "unet")
    saved = load_denoiser(model_dir)
    assert saved.meta["base"]["sha256"] == record["sha256"] and saved.meta["base"]["format"] == "diffusers"
    assert list(saved.denoiser.net.config.block_out_channels) == [8, 16] and saved.denoiser.num_classes == CLASSES
    assert saved.scheduler.config.num_train_timesteps == 100 and saved.scheduler.config.beta_schedule == "linear"
    assert "beta_schedule: linear" in (run / "config.yaml").read_text()  # diffusion.* is the base's schedule
    assert saved.denoiser.net.class_embedding.weight.abs().sum() > 0  # the zero rows trained
    out = evaluate(compose_tmp([override("model_dir", run), f"base={folder}", "eval=tiny", "eval.evaluator_steps=5",
                                "eval.num_steps=2", f"out={tmp_path / 'eval'}"], config_name="evaluate"))  # fmt: skip
    cond = json.loads((out / "step=4_cond.json").read_text())
    assert cond["base"] == str(folder / "unet") and "eval/cond/fd/prior=base/w=3.0" in cond["metrics"]
    exported = export_pipeline(model_dir, tmp_path / "exported")
    plain = UNet2DModel.from_pretrained(exported / "denoiser")
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, class_labels=y).sample, saved.denoiser(x, t, y), rtol=0, atol=1e-6)
    _save(tmp_path / "my_model", seed=5)  # the base's weights change: the finished run refuses it
    with pytest.raises(UserError, match=r"is finished and was trained with other settings: base weights \(sha256\)"):
        train(compose_tmp(overrides))
    (run / "done.json").unlink()  # as if killed after its last checkpoint: resuming refuses the changed base too
    with pytest.raises(UserError, match=r"holds a run started with other settings: base weights \(sha256\)"):
        train(compose_tmp(overrides))
    assert (run / "checkpoints" / "last.ckpt").exists() and (run / "model").exists()  # nothing was removed


def test_folders_that_are_not_a_base_are_one_line_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a priorlab model folder .* nor a diffusers UNet2DModel or DiT"):
        load_denoiser(tmp_path / "empty", role="base")
    net = _save(tmp_path / "no schedule", layout="model")
    (net / "scheduler_config.json").unlink()
    with pytest.raises(UserError, match="has no noise schedule: priorlab looked for .*scheduler_config.json"):
        load_denoiser(net, role="base")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(UserError, match="loads safetensors only"):
        load_denoiser(tmp_path / "pickled", role="base")
    other = tmp_path / "other"
    saved = _save(other, layout="model")
    config = json.loads((saved / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "_class_name": "UNet2DConditionModel"}))
    with pytest.raises(UserError, match="holds a UNet2DConditionModel; priorlab takes a diffusers UNet2DModel"):
        load_denoiser(other, role="base")
    truncated = _save(tmp_path / "truncated", layout="model")
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="could not be loaded"):
        load_denoiser(truncated, role="base")
    pipeline = _save(tmp_path / "pipeline")  # the model evaluated or exported is a priorlab fine-tune
    with pytest.raises(UserError, match="is a diffusers model, not a priorlab model folder; fine-tune it first"):
        load_denoiser(pipeline, role="model")


def test_data_of_another_shape_than_the_base_is_refused(tmp_path):
    base = load_denoiser(_save(tmp_path / "base"), role="base")
    with pytest.raises(UserError, match=r"takes samples of shape \(1, 8, 8\) but the data gives \(3, 8, 8\)"):
        conditional_copy(base.denoiser, CLASSES, (3, 8, 8))


def test_a_priorlab_folder_still_loads_as_priorlab_and_hashes_the_same(tmp_path):
    from priorlab.models import unet

    path = save_denoiser(unet(SHAPE, 3, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4),
                         _schedule(), tmp_path / "m")  # fmt: skip
    assert "format" not in load_denoiser(path).meta and len(content_hash(path)) == 64


def _write_json(path: Path, value: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def test_sdxl_and_pipelines_it_cannot_use_are_refused_from_their_configs(tmp_path, compose_tmp):
    """A Stable Diffusion base loads; with a second tokenizer beside it (SDXL's layout), or an index naming an XL
    pipeline, it is refused saying what is supported, by `load_denoiser` and by `train` before any data or weights
    are read. A pipeline with no network where priorlab looks, or with a network of another class, gets the
    LOOKED_FOR message or names the class."""
    import shutil

    import pipeline_models
    from priorlab.commands.train import train

    sd = pipeline_models.stable_diffusion(tmp_path / "sd", seed=0)
    assert type(load_denoiser(sd, role="base").denoiser).__name__ == "TextDenoiser"  # a base as it is
    shutil.copytree(sd / "tokenizer", sd / "tokenizer_2")
    sdxl = r"is a Stable Diffusion XL model.*: priorlab does not support SDXL yet .* one text encoder"
    with pytest.raises(UserError, match=rf"base={sd} {sdxl}"):
        load_denoiser(sd, role="base")
    index = tmp_path / "xl" / "model_index.json"
    _write_json(index, {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    _write_json(tmp_path / "xl" / "unet" / "config.json", {"_class_name": "UNet2DConditionModel",
                                                           "addition_embed_type": "text_time"})  # fmt: skip
    with pytest.raises(UserError, match=rf"{sdxl}.*such as Stable Diffusion 1.x or 2.x"):
        train(compose_tmp(["data=digits", "stage=finetune", f"base={tmp_path / 'xl'}", *TINY]))
    _write_json(tmp_path / "prior" / "model_index.json", {"_class_name": "MysteryPipeline",
                                                          "prior": ["diffusers", "PriorTransformer"]})  # fmt: skip
    _write_json(tmp_path / "prior" / "prior" / "config.json", {"_class_name": "PriorTransformer"})
    looked_for = r"is not a priorlab model folder .* nor a diffusers UNet2DModel or DiT"
    with pytest.raises(UserError, match=rf"{looked_for}.*; its model_index.json names a MysteryPipeline, with none"):
        load_denoiser(tmp_path / "prior", role="base")
    _write_json(tmp_path / "flux" / "model_index.json", {"_class_name": "FluxPipeline"})
    _write_json(tmp_path / "flux" / "transformer" / "config.json", {"_class_name": "FluxTransformer2DModel"})
    with pytest.raises(UserError, match=r"transformer holds a FluxTransformer2DModel; priorlab takes a diffusers"):
        load_denoiser(tmp_path / "flux", role="base")  # its class, not its missing (sharded) weights

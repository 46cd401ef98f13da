"""priorlab models as diffusers pipelines: export, loading with diffusers, the swap on them, and `priorlab sample` on
priorlab run folders, on tiny models saved here as run folders."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DiffusionPipeline
from PIL import Image

from conftest import assert_close_across_shapes, run_cli
from priorlab.errors import UserError
from priorlab.models import content_hash, dit, load_denoiser, save_denoiser, unet
from priorlab.pipelines import load_prior, swap_prior
from priorlab.pipelines.class_pipeline import ClassConditionalPipeline
from priorlab.pipelines.export import export_pipeline, from_priorlab, load_base, load_exported, load_model
from priorlab.priors import DenoiserPrior, PriorWeights, make_prior
from priorlab.sampling import sample

SHAPE = (1, 8, 8)
CLASSES = 3
STEPS = 4


def _perturbed(model, seed: int):
    """Weights moved off initialisation: DiT's adaLN-Zero starts at a zero output, and every class row of a
    fine-tune starts equal to the base's null row."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _build(kind: str, seed: int, prediction_type: str = "epsilon"):
    torch.manual_seed(seed)
    if kind == "dit":
        model = dit(SHAPE, CLASSES, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                    prediction_type=prediction_type)  # fmt: skip
    else:
        model = unet(SHAPE, CLASSES, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4,
                     prediction_type=prediction_type)  # fmt: skip
    return _perturbed(model, seed)


def _schedule(prediction_type: str = "epsilon") -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                         prediction_type=prediction_type)  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A base run and a fine-tune run of each network, in folders named as a study names them."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for kind in ("unet", "dit"):
        base = save_denoiser(_build(kind, 1), _schedule(), root / kind / "base" / "model", stage="base", step=4)
        sha = content_hash(base)
        out[kind, "base"] = base.parent
        ft = root / kind / "finetune/p=0.1/seed=0/model"
        save_denoiser(
            _build(kind, 2), _schedule(), ft, stage="finetune", step=4, base={"path": str(base), "sha256": sha}
        )
        out[kind, "ft"] = ft.parent
    v = save_denoiser(_build("unet", 3, "v_prediction"), _schedule("v_prediction"), root / "v" / "model")
    out["unet", "v"] = v.parent
    return out


def _generators(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


LABELS = [0, 2, 1, 0]


def _priorlab(run, scale: float, prior: str = "self", base=None, weights=None) -> torch.Tensor:
    """priorlab's own sampler on the run's model, seeds 0…N−1, DDIM."""
    saved = load_denoiser(run)
    prior_net = None
    if base is not None:
        b = load_denoiser(base)
        prior_net = DenoiserPrior(b.denoiser, b.scheduler, saved.scheduler.alphas_cumprod)
    return sample(saved.denoiser, torch.tensor(LABELS), torch.arange(len(LABELS)), saved.scheduler, SHAPE, scale,
                  make_prior(prior, prior_net, weights), sampler="ddim", num_steps=STEPS)  # fmt: skip


def _pipe(pipe, scale: float) -> torch.Tensor:
    return pipe(class_labels=LABELS, guidance_scale=scale, num_inference_steps=STEPS, output_type="latent",
                generator=_generators(len(LABELS))).images  # fmt: skip


@pytest.mark.parametrize(("kind", "which"), [("unet", "ft"), ("dit", "ft"), ("unet", "v")])
def test_exported_pipeline_loads_with_diffusers_and_samples_as_priorlab_does(runs, tmp_path, kind, which):
    out = export_pipeline(runs[kind, which], tmp_path / "pipe")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == ["class_pipeline", "ClassConditionalPipeline"]
    assert (out / "class_pipeline.py").is_file() and "library_name: diffusers" in (out / "README.md").read_text()
    assert not (out / "priorlab.json").exists()  # a pipeline folder, never mistaken for a priorlab model folder
    with pytest.raises(ValueError, match="trust_remote_code"):  # diffusers runs no shipped code unasked
        DiffusionPipeline.from_pretrained(out)
    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)  # the shipped code, not priorlab's import
    assert type(pipe).__name__ == "ClassConditionalPipeline" and type(pipe) is not ClassConditionalPipeline
    own = load_exported(out)  # priorlab's class, the folder's code not run
    assert type(own) is ClassConditionalPipeline
    assert own.null_class == CLASSES
    assert own.scheduler.config.prediction_type == load_denoiser(runs[kind, which]).denoiser.prediction_type
    for scale in (1.0, 3.0):
        expected = _priorlab(runs[kind, which], scale)
        assert_close_across_shapes(_pipe(pipe, scale), expected, passes=STEPS)
        assert_close_across_shapes(_pipe(own, scale), expected, passes=STEPS)
    # one generator per image: image i does not depend on the batch
    first = own(class_labels=LABELS[2:3], guidance_scale=3.0, num_inference_steps=STEPS, output_type="latent",
                generator=[torch.Generator().manual_seed(2)]).images  # fmt: skip
    assert_close_across_shapes(first[0], _pipe(own, 3.0)[2], passes=STEPS)
    images = own(class_labels=[1], num_inference_steps=2).images
    assert images[0].size == (8, 8) and images[0].mode == "L"  # one channel: a grey image


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_swap_on_an_exported_pipeline_equals_priorlab_guidance(runs, tmp_path, kind):
    """prior=self leaves the pipeline as it is, prior=base and the fitted priors guide as priorlab's sampler does
    with the same base; the base is given as a priorlab run or as an exported pipeline folder."""
    ft, base = runs[kind, "ft"], runs[kind, "base"]
    pipe = load_model(str(ft))
    reference = _pipe(pipe, 3.0)
    with swap_prior(pipe, make_prior("self", load_prior(str(base)))):
        assert torch.equal(_pipe(pipe, 3.0), reference)
    expected = _priorlab(ft, 3.0, "base", base)
    assert (expected - reference).abs().max() > 1e-2  # the base's prior changes the samples
    exported_base = str(export_pipeline(base, tmp_path / "base"))
    for prior in (load_prior(str(base)), load_base(exported_base)):
        with swap_prior(pipe, make_prior("base", prior)) as swapped:
            assert_close_across_shapes(_pipe(pipe, 3.0), expected, passes=STEPS)
        assert swapped.calls["guided"] == STEPS and swapped.calls["unguided"] == 0
    weights = PriorWeights(edges=[0, 50, 100], base_weight=[0.0, 1.0], mode="auto")  # base at high noise only
    mix = PriorWeights(edges=[0, 50, 100], base_weight=[0.25, 0.75], mode="mix")
    for w in (weights, mix):
        with swap_prior(pipe, make_prior(w.mode, load_prior(str(base)), w)):
            assert_close_across_shapes(_pipe(pipe, 3.0), _priorlab(ft, 3.0, w.mode, base, w), passes=STEPS)


def test_a_toy2d_model_is_refused_with_a_reason(tmp_path):
    from conftest import perturbed_mlp

    path = save_denoiser(perturbed_mlp(), _schedule(), tmp_path / "toy" / "model")
    with pytest.raises(UserError, match="toy2d.*not images"):
        from_priorlab(path.parent)
    with pytest.raises(UserError, match="not a priorlab model folder"):
        export_pipeline(tmp_path, tmp_path / "out")


def test_sample_and_export_commands_on_priorlab_run_folders(runs, tmp_path):
    ft, base = runs["unet", "ft"], runs["unet", "base"]
    common = ["class_labels=[0,2]", "num_images=2", "guidance_scale=3", f"num_steps={STEPS}", "progress=false"]
    result = run_cli("sample", f"model={ft}", f"base={base}", "prior=base", "compare=true", f"out={tmp_path / 's'}",
                     *common, cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((tmp_path / "s" / "sample.json").read_text())
    assert settings["family"] == "class-conditional" and settings["pipeline"] == "ClassConditionalPipeline"
    assert settings["guidance_scale"] == 3.0 and settings["denoiser_calls"]["base"]["guided"] == STEPS
    assert settings["files"]["base"] == [f"prior=base_{i}.png" for i in range(4)]
    # the images are the swapped pipeline's, seeds seed + i, labels repeated num_images times
    pipe = from_priorlab(ft)
    with swap_prior(pipe, make_prior("base", load_prior(str(base)))):
        own = pipe(class_labels=[0, 2, 0, 2], guidance_scale=3.0, num_inference_steps=STEPS,
                   generator=_generators(4)).images  # fmt: skip
    for i in range(4):
        got = np.asarray(Image.open(tmp_path / "s" / f"prior=base_{i}.png"), dtype=float)
        assert np.abs(got - np.asarray(own[i], dtype=float)).max() <= 1  # one grey level of rounding
    assert Image.open(tmp_path / "s" / "compare.png").size == (4 * 8, 2 * 8)
    # `priorlab export` writes a folder that `priorlab sample` takes in place of the run, with the same images
    exported = run_cli("export", f"model={ft}", f"out={tmp_path / 'e'}", "class_names=[zero,one,two]", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert load_exported(tmp_path / "e").config.class_names == ["zero", "one", "two"]
    again = run_cli("sample", f"model={tmp_path / 'e'}", f"base={base}", "prior=base", f"out={tmp_path / 's2'}",
                    *common, cwd=tmp_path)  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    for i in range(4):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "s2" / f"prior=base_{i}.png")),
                                      np.asarray(Image.open(tmp_path / "s" / f"prior=base_{i}.png")))  # fmt: skip


def test_sample_fits_auto_weights_on_calibration_images_of_a_pixel_model(runs, tmp_path):
    ft, base = runs["unet", "ft"], runs["unet", "base"]
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), mode="L").save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "label": i % CLASSES}))
    (folder / "metadata.jsonl").write_text("\n".join(rows))
    result = run_cli("sample", f"model={ft}", f"base={base}", "prior=auto", f"calibration={folder}",
                     "calibration_buckets=2", "class_labels=[1]", "guidance_scale=2", "num_steps=2",
                     "progress=false", f"out={tmp_path / 'a'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    weights = PriorWeights.load(tmp_path / "a" / "prior_weights_auto.json")
    assert weights.objective == "guided" and weights.edges.tolist() == [0, 50, 100]
    assert (tmp_path / "a" / "prior=auto_0.png").is_file()


def test_export_and_sample_user_mistakes_are_one_line_errors(runs, tmp_path, cli):
    ft = runs["unet", "ft"]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    cases = {
        ("export", f"model={ft}"): "out is required",
        ("export", f"model={ft}", f"out={tmp_path / 'full'}"): "exists and is not empty",
        ("export", f"model={tmp_path / 'none'}", f"out={tmp_path / 'o'}"): "no such folder",
        ("export", f"model={ft}", f"out={tmp_path / 'o'}", "class_names=[a,b]"): "class_names has 2 names",
        ("sample", f"model={ft}", "prior=self", "class_labels=[3]"): "class_labels=[3] are not classes",
        ("sample", f"model={ft}", "prior=self"): "class-conditional pipeline needs class_labels",
        ("sample", f"model={ft}", "prior=base", "class_labels=[0]"): "needs base=PATH",
    }
    for args, message in cases.items():
        extra = ["num_steps=1", "progress=false", f"out={tmp_path / 'o'}"] if args[0] == "sample" else []
        result = cli(*args, *extra, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists() and (tmp_path / "full" / "x").read_text() == "x"


def test_out_never_names_a_folder_that_holds_the_working_folder_or_an_input(runs, tmp_path, cli):
    """out= is replaced whole: out=. or a folder above the model would delete them, overwrite=true or not."""
    ft = runs["unet", "ft"]
    (tmp_path / "keep").write_text("x")
    sample = ["sample", f"model={ft}", "prior=self", "class_labels=[0]", "num_steps=1", "progress=false"]
    for args in (["export", f"model={ft}", "out=.", "overwrite=true"],
                 ["export", f"model={ft}", f"out={ft.parent}", "overwrite=true"],
                 [*sample, f"out={ft.parents[2]}", "overwrite=true"],
                 [*sample, "out=''", "overwrite=true"]):  # fmt: skip
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2 and "which writing out= would delete" in result.stderr, result.stderr[-1500:]
    assert (tmp_path / "keep").read_text() == "x" and (ft / "model" / "priorlab.json").is_file()


def test_a_changed_recorded_base_is_refused(runs, tmp_path):
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(runs["unet", "ft"], ft)
    base = tmp_path / "base"
    shutil.copytree(runs["unet", "base"], base)
    meta = json.loads((ft / "model" / "priorlab.json").read_text())
    meta["base"] = {"path": str(base / "model"), "sha256": "0" * 64}  # recorded weights that are not these
    (ft / "model" / "priorlab.json").write_text(json.dumps(meta))
    args = ["sample", f"model={ft}", f"base={base}", "class_labels=[0]", "num_steps=1", "progress=false"]
    refused = run_cli(*args, f"out={tmp_path / 'x'}", cwd=tmp_path)
    assert refused.returncode == 2 and "has changed since" in refused.stderr
    allowed = run_cli(*args, "base_check=false", f"out={tmp_path / 'y'}", cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr[-2000:]

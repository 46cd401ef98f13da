"""A user's own diffusers DiT as a base (the paper's DiT protocol): a DiTTransformer2DModel folder or a latent
DiTPipeline (transformer/, vae/, scheduler/, id2label); the step-0 identity of its fine-tune's null row, learned
sigma, the latent cache, fine-tuning, evaluating, resuming and exporting, and the errors for wrong folders and data.
Tiny random-weight networks (a few thousand parameters) are saved here with save_pretrained."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from conftest import TINY
from priorlab.data.base import TensorDataModule
from priorlab.errors import UserError
from priorlab.models import init_from_base, label_tables, load_denoiser
from priorlab.models.latent import Latent
from priorlab.models.pretrained import conditional_copy
from priorlab.overrides import override

CLASSES = 10  # sklearn's digits, 1 × 8 × 8: data=digits
BASE_CLASSES = 3
LATENT = (4, 4, 4)  # the tiny VAE halves 8 × 8 digits into 4 latent channels


def _moved(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Weights moved off initialisation (DiT's adaLN-Zero starts every block and output at zero)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def _dit(seed: int = 0, in_channels: int = 4, size: int = 4, learn_sigma: bool = True) -> DiTTransformer2DModel:
    out = 2 * in_channels if learn_sigma else in_channels
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=in_channels,
                                out_channels=out, num_layers=1, sample_size=size, patch_size=2,
                                num_embeds_ada_norm=BASE_CLASSES)  # fmt: skip
    return _moved(net, seed)


def _vae(seed: int = 0) -> AutoencoderKL:
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, sample_size=8, layers_per_block=1)  # fmt: skip
    return _moved(vae, seed)


def _schedule() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")


def _save_pipeline(folder: Path, seed: int = 0, vae_seed: int = 0) -> Path:
    """A latent DiTPipeline folder with id2label in its model_index.json (where the hub's DiT keeps it)."""
    DiTPipeline(_dit(seed), _vae(vae_seed), _schedule()).save_pretrained(folder)
    index = json.loads((folder / "model_index.json").read_text())
    index["id2label"] = {"0": "tench", "1": "goldfish", "2": "shark"}
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _save_model(folder: Path, **kwargs) -> Path:
    _dit(**kwargs).save_pretrained(folder)
    _schedule().save_pretrained(folder)
    return folder


def _inputs(n: int = 6, shape=LATENT, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, 100, (n,), generator=g), torch.arange(n) % CLASSES


def test_pipeline_base_records_its_classes_vae_and_null_row(tmp_path):
    base = load_denoiser(_save_pipeline(tmp_path / "dit"), role="base")
    assert base.meta["class_name"] == "DiTTransformer2DModel" and base.meta["format"] == "diffusers"
    assert base.denoiser.num_classes == BASE_CLASSES and base.denoiser.null_class == BASE_CLASSES
    assert base.meta["id2label"] == {"0": "tench", "1": "goldfish", "2": "shark"}
    assert base.meta["vae"]["path"] == str((tmp_path / "dit" / "vae").resolve()) and len(base.meta["vae"]["sha256"])
    assert base.denoiser.sample_shape == LATENT and base.denoiser.learned_sigma


def test_finetune_null_row_rule_gives_the_bases_null_prediction_at_step_0(tmp_path):
    """Rule: the base's class rows are dropped; every new class row and the null row start at the base's null row
    (in each block's table), so the fine-tune's ∅ and conditional predictions equal the base's ∅ at step 0."""
    base = load_denoiser(_save_model(tmp_path / "dit"), role="base")
    finetune = conditional_copy(base.denoiser, CLASSES, LATENT).eval()
    x, t, y = _inputs()
    with torch.no_grad():
        expected = base.denoiser.net(x, t, class_labels=torch.full_like(y, BASE_CLASSES)).sample[:, :4]
        init_from_base(finetune, base.denoiser)
        torch.testing.assert_close(finetune(x, t, y, force_drop=True), expected, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(finetune(x, t, y), expected, rtol=1e-6, atol=1e-6)
        tables, theirs = label_tables(finetune.net), label_tables(base.denoiser.net)
        assert len(tables) == len(theirs) == 1 and tables[0].weight.shape[0] == CLASSES + 1
        assert torch.equal(tables[0].weight, theirs[0].weight[BASE_CLASSES].expand_as(tables[0].weight))
        tables[0].weight[2].normal_()  # a class row that moved changes its class's prediction only
        assert not torch.allclose(finetune(x, t, torch.full_like(y, 2)), expected, atol=1e-3)
        torch.testing.assert_close(finetune(x, t, y, force_drop=True), expected, rtol=1e-6, atol=1e-6)


def test_learned_sigma_keeps_the_eps_half_only(tmp_path):
    """out_channels = 2 × in_channels: the Denoiser returns the first half (eps), which guidance combines and the
    loss trains, as DiTPipeline's sampler uses it; the variance half is dropped (and gets no gradient)."""
    base = load_denoiser(_save_model(tmp_path / "dit"), role="base")
    x, t, y = _inputs()
    raw = base.denoiser.net(x, t, class_labels=y % BASE_CLASSES).sample  # (N, 8, 4, 4)
    out = base.denoiser(x, t, y % BASE_CLASSES)
    assert raw.shape[1] == 8 and out.shape == x.shape
    torch.testing.assert_close(out, raw[:, :4])
    out.square().mean().backward()
    weight = base.denoiser.net.proj_out_2.weight.grad  # (patch² · 8, D): the rows of each patch's 8 channels
    per_channel = weight.view(2, 2, 8, -1).abs().sum((0, 1, 3))
    assert (per_channel[:4] > 0).all() and (per_channel[4:] == 0).all()


@pytest.fixture
def encodes(monkeypatch) -> list[int]:
    """The number of images each Latent.encode call was given."""
    calls: list[int] = []
    encode = Latent.encode
    monkeypatch.setattr(Latent, "encode", lambda self, x: calls.append(len(x)) or encode(self, x))
    return calls


def test_latent_finetune_trains_evaluates_resumes_and_exports_to_a_plain_ditpipeline(compose_tmp, tmp_path, encodes):
    """`priorlab train stage=finetune_dit base=<DiTPipeline folder>` in-process on digits (1 × 8 × 8 images,
    encoded to 4 × 4 × 4 latents once, then read from the cache); the run records the VAE and the new classes;
    `evaluate` with prior=base and extra_priors.NAME from the pipeline folder measures decoded samples; a killed run
    resumes; the export (of the resumed run) loads with plain DiTPipeline.from_pretrained, with the new classes in
    id2label."""
    from priorlab.commands.evaluate import evaluate
    from priorlab.commands.train import train
    from priorlab.pipelines.export import export_pipeline

    folder = _save_pipeline(tmp_path / "dit")
    overrides = ["data=digits", "stage=finetune_dit", f"base={folder}", *TINY]  # the paper's preset, made tiny
    model_dir = train(compose_tmp(overrides))
    assert len(encodes) == 2  # the train and validation splits, once each
    saved = load_denoiser(model_dir)
    assert saved.denoiser.sample_shape == LATENT and saved.denoiser.num_classes == CLASSES
    assert saved.meta["vae"]["path"] == str((folder / "vae").resolve()) and saved.meta["cond_dropout"] == 0.1
    assert saved.meta["id2label"] == {str(k): str(k) for k in range(CLASSES)}
    train(compose_tmp([*overrides, "seed=1"]))  # another run on the same data and VAE: the cache is read
    assert len(encodes) == 2
    evaluation = [override("model_dir", model_dir.parent), f"base={folder}", "eval=tiny", "eval.num_steps=2",
                  "eval.evaluator_steps=5", f"out={tmp_path / 'eval'}",
                  override("+extra_priors.again", folder)]  # fmt: skip
    out = evaluate(compose_tmp(evaluation, config_name="evaluate"))
    cond = json.loads((out / "step=4_cond.json").read_text())
    assert {"eval/cond/fd/prior=base/w=3.0", "eval/cond/fd/prior=again/w=3.0"} <= set(cond["metrics"])
    assert cond["metrics"]["eval/cond/fd/prior=base/w=3.0"] == cond["metrics"]["eval/cond/fd/prior=again/w=3.0"]
    assert len(encodes) == 2
    assert (out / "grid_step=4_prior=base.png").exists()
    other = _save_pipeline(tmp_path / "other", vae_seed=3)  # the same DiT over another VAE's latents
    with pytest.raises(UserError, match=r"extra_priors.again=.* denoises the latents of another VAE"):
        evaluate(compose_tmp([*evaluation[:-1], override("+extra_priors.again", other)], config_name="evaluate"))
    (model_dir.parent / "done.json").unlink()  # as if killed after its last checkpoint: resumed, not restarted
    resumed = load_denoiser(train(compose_tmp([*overrides, "trainer.max_steps=6", "resume=force"])))
    assert resumed.meta["step"] == 6 and len(encodes) == 2  # continued from step 4, on the cached latents
    exported = export_pipeline(model_dir, tmp_path / "exported")
    pipe = DiTPipeline.from_pretrained(exported)
    assert pipe.get_label_ids(["3", "9"]) == [3, 9] and "p = 0.1" in (exported / "README.md").read_text()
    x, t, y = _inputs()
    with torch.no_grad():
        ours = resumed.denoiser.net(x, t, class_labels=y).sample
        torch.testing.assert_close(pipe.transformer(x, t, class_labels=y).sample, ours, rtol=0, atol=1e-6)
        null = resumed.denoiser.net(x, t, class_labels=torch.full_like(y, CLASSES)).sample
        theirs = pipe.transformer(x, t, class_labels=torch.full_like(y, 1000)).sample
        torch.testing.assert_close(theirs, null, rtol=0, atol=1e-6)
        images = pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1)
    from priorlab.pipelines.export import load_model  # `priorlab sample model=RUN`: the same pipeline, in memory

    in_memory = load_model(str(model_dir.parent))
    assert type(in_memory).__name__ == "DiTPipeline" and in_memory.get_label_ids(["3"]) == [3]


def test_latent_finetune_is_evaluated_during_training_on_decoded_samples(compose_tmp, tmp_path):
    """callbacks=eval on a latent run: the evaluator is trained on the images, the samples decoded before it."""
    from priorlab.commands.train import train

    folder = _save_pipeline(tmp_path / "dit")
    run = train(compose_tmp(["data=digits", "stage=finetune", f"base={folder}", *TINY, "callbacks=eval", "eval=tiny",
                             "eval.evaluator_steps=5", "eval.num_steps=2", "callbacks.prior_quality.every_n_steps=4",
                             "callbacks.conditional_quality.every_n_steps=4"])).parent  # fmt: skip
    cond = json.loads((run / "eval" / "step=4_cond.json").read_text())["metrics"]
    assert "eval/cond/fd/prior=base/w=3.0" in cond and "eval/cond/accuracy/prior=self/w=1.0" in cond
    evaluator = json.loads((tmp_path / "runs" / "evaluators" / "digits8" / "evaluator.json").read_text())
    assert evaluator["identity"]["sample_shape"] == [1, 8, 8]  # images, not latents
    assert (run / "eval" / "grid_step=4_prior=base.png").exists()


def test_another_vae_invalidates_the_latent_cache(compose_tmp, tmp_path, encodes):
    """Two pipelines of the same DiT and other VAEs encode the data twice; a run whose base's VAE changed since is
    refused (the VAE's hash is part of base.json)."""
    from priorlab.commands.train import train

    for name, vae_seed in (("a", 0), ("b", 1)):
        folder = _save_pipeline(tmp_path / name, vae_seed=vae_seed)
        train(compose_tmp(["data=digits", "stage=finetune", f"base={folder}", *TINY, "trainer.max_steps=1",
                           "trainer.val_check_interval=1", f"study={name}"]))  # fmt: skip
    assert len(encodes) == 4 and len(list((tmp_path / "runs" / "latents" / "digits8").glob("*.pt"))) == 2
    _save_pipeline(tmp_path / "b", vae_seed=2)  # b's VAE changes: its finished run refuses the new one
    with pytest.raises(UserError, match=r"trained with other settings: base VAE weights \(sha256\)"):
        train(compose_tmp(["data=digits", "stage=finetune", f"base={tmp_path / 'b'}", *TINY, "trainer.max_steps=1",
                           "trainer.val_check_interval=1", "study=b"]))  # fmt: skip


def test_user_mistakes_with_dit_bases_are_one_line_errors(tmp_path):
    vaeless = load_denoiser(_save_model(tmp_path / "vaeless"), role="base")  # a 4-channel DiT, 1-channel data
    with pytest.raises(UserError, match=r"shape \(4, 4, 4\) but the data gives \(1, 8, 8\).*a DiT of latents needs"):
        conditional_copy(vaeless.denoiser, CLASSES, (1, 8, 8))
    base = load_denoiser(_save_pipeline(tmp_path / "dit"), role="base")
    with pytest.raises(UserError, match=r"shape \(4, 4, 4\) but the data's latents are \(4, 8, 8\)"):
        conditional_copy(base.denoiser, CLASSES, (4, 8, 8), latent=True)
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "model_index.json").write_text("{}")
    with pytest.raises(UserError, match="not a priorlab model folder .* nor a diffusers UNet2DModel or DiT"):
        load_denoiser(tmp_path / "neither", role="base")
    colour = TensorDataModule()
    colour.load = lambda: (torch.rand(20, 3, 8, 8) * 2 - 1, torch.arange(20) % 2, 2)
    with pytest.raises(UserError, match=r"shape \(3, 8, 8\) but the VAE takes images of 1 channel"):
        Latent.load(base.meta["vae"]).encode_data(colour, tmp_path / "latents")
    config = json.loads((tmp_path / "dit" / "vae" / "config.json").read_text())
    (tmp_path / "dit" / "vae" / "config.json").write_text(json.dumps({**config, "_class_name": "VQModel"}))
    with pytest.raises(UserError, match="holds a VQModel; priorlab's latent bases take a diffusers AutoencoderKL"):
        load_denoiser(tmp_path / "dit", role="base")


def _study(tmp_path: Path, bases: dict, base_seeds: list | None = None) -> Path:
    """An experiments/ folder holding `mine.yaml`, a tiny digits preset with these `bases`."""
    preset = {"common": ["data=digits", "trainer=cpu", "logger=csv", "eval=tiny", "data.batch_size=16"],
              "base": [], "finetune": ["trainer.max_steps=2", "trainer.val_check_interval=1",
                                       "trainer.limit_val_batches=1"],
              "bases": bases, "sweep": {"cond_dropout": [0.1], "seed": [0]}}  # fmt: skip
    if base_seeds:
        preset["base_seeds"], preset["sweep"]["seed"] = base_seeds, base_seeds
    folder = tmp_path / "experiments"
    folder.mkdir(exist_ok=True)
    (folder / "mine.yaml").write_text(json.dumps({"name": "mine", "presets": {"tiny": preset}}))
    return folder


def _dry_run(compose_tmp, capsys, experiments: Path) -> str:
    from priorlab.overrides import rewrite_overrides
    from priorlab.study.run import run_study
    from priorlab.study.settings import route_study_args

    args = ["mine", "preset=tiny", "dry_run=true", override("experiments", experiments)]
    run_study(compose_tmp(route_study_args(rewrite_overrides("study", args)), "study"))
    return capsys.readouterr().out


def test_a_study_fine_tunes_diffusers_bases_given_by_path_without_training_them(compose_tmp, capsys, tmp_path):
    """`bases: {NAME: {path: FOLDER}}`: a DiTPipeline folder and a DDPMPipeline (UNet) folder are fine-tuned as
    given, beside a base the study trains; a base given by path is another base's extra prior by its folder."""
    from test_pretrained import _save

    dit, unet = _save_pipeline(tmp_path / "dit"), _save(tmp_path / "unet")
    bases = {"dit": {"path": str(dit)}, "unet": {"path": str(unet)}, "own": {"priors": {"other": "dit"}}}
    out = _dry_run(compose_tmp, capsys, _study(tmp_path, bases))
    assert f"base (dit):      trained elsewhere: {dit.resolve()}" in out
    assert f"base (unet):      trained elsewhere: {unet.resolve()}" in out
    assert "base (own):      priorlab train stage=base" in out
    lines = [line for line in out.splitlines() if line.startswith("finetunes")]
    assert len(lines) == 3 and f"base={dit.resolve()}" in lines[0] and f"base={unet.resolve()}" in lines[1]
    assert f"+extra_priors.other={dit.resolve()}" in lines[2]


def test_a_base_given_by_path_is_checked_before_the_study_runs(compose_tmp, capsys, tmp_path):
    dit = _save_pipeline(tmp_path / "dit")
    with pytest.raises(UserError, match=r"bases.gone.path=.*gone: no such folder"):
        _dry_run(compose_tmp, capsys, _study(tmp_path, {"gone": {"path": str(tmp_path / "gone")}}))
    with pytest.raises(UserError, match="base dit has a `path` .* and `base` overrides; drop one"):
        _dry_run(compose_tmp, capsys, _study(tmp_path, {"dit": {"path": str(dit), "base": ["seed=1"]}}))
    with pytest.raises(UserError, match="a base given by `path` is trained elsewhere, once: it takes no base_seeds"):
        _dry_run(compose_tmp, capsys, _study(tmp_path, {"dit": {"path": str(dit)}}, base_seeds=[0, 1]))


def test_a_study_of_a_latent_dit_base_given_by_path_runs_to_its_results(tmp_path):
    """`priorlab study` (a process) whose only base is a DiTPipeline folder: its fine-tune trains on the cached
    latents and is evaluated with prior=self and prior=base on decoded samples; results.csv and the report follow."""
    import pandas as pd

    from conftest import run_cli

    dit = _save_pipeline(tmp_path / "dit")
    experiments = _study(tmp_path, {"dit": {"path": str(dit)}})
    spec = json.loads((experiments / "mine.yaml").read_text())
    spec["presets"]["tiny"]["finetune"] += ["callbacks=eval", "eval.evaluator_steps=5", "eval.num_steps=2",
                                            "callbacks.prior_quality.every_n_steps=2",
                                            "callbacks.conditional_quality.every_n_steps=2"]  # fmt: skip
    (experiments / "mine.yaml").write_text(json.dumps(spec))
    out = run_cli("study", "mine", "preset=tiny", override("experiments", experiments), cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp_path / "runs" / "mine" / "base").exists()  # the base was not trained
    frame = pd.read_csv(tmp_path / "runs" / "mine" / "results.csv")
    assert {"self", "base"} <= set(frame["prior"]) and (tmp_path / "runs" / "mine" / "report.md").exists()


def test_a_pipeline_priorlab_exported_is_a_base_like_any_diffusers_folder(tmp_path):
    """`priorlab export` of a priorlab DiT writes its network to denoiser/: the folder (no priorlab.json) loads as a
    diffusers base, with its schedule from scheduler/, its null row the last, and its fine-tune at step 0 predicts
    the exported network's ∅ prediction."""
    from priorlab.models import dit, save_denoiser
    from priorlab.pipelines.export import export_pipeline

    torch.manual_seed(0)
    own = dit((1, 8, 8), 3, num_layers=1, attention_head_dim=8, prediction_type="v_prediction").eval()
    with torch.no_grad():
        for p in own.parameters():
            p.add_(0.05 * torch.randn_like(p))
    schedule = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    exported = export_pipeline(save_denoiser(own, schedule, tmp_path / "model"), tmp_path / "exported")
    assert (exported / "denoiser" / "config.json").is_file() and not (exported / "priorlab.json").exists()
    base = load_denoiser(exported, role="base")
    assert base.meta["format"] == "diffusers" and base.meta["class_name"] == "DiTTransformer2DModel"
    assert base.denoiser.null_class == 3 and base.denoiser.prediction_type == "v_prediction"
    assert base.scheduler.config.num_train_timesteps == 100
    finetune = conditional_copy(base.denoiser, 5, (1, 8, 8)).eval()
    init_from_base(finetune, base.denoiser)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([3, 30, 60, 90]), torch.tensor([0, 1, 4, 2])
    with torch.no_grad():
        expected = own(x, t, y, force_drop=True)
        torch.testing.assert_close(finetune(x, t, y), expected, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(own(x, t, y % 3), expected, atol=1e-4)  # its class rows differ from its null row

"""A user's own diffusers DiT as a base (the paper's DiT protocol): a DiTTransformer2DModel folder or a latent
DiTPipeline (transformer/, vae/, scheduler/, id2label); the step-0 identity of its fine-tune's null row, learned
sigma, the latent cache, fine-tuning, evaluating, resuming and exporting, and the errors for wrong folders and data.
Tiny random-weight networks (a few thousand parameters) are saved here with save_pretrained."""

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTPipeline, DiTTransformer2DModel

from priorlab.models import init_from_base, label_tables, load_denoiser
from priorlab.models.pretrained import conditional_copy

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

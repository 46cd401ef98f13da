import json

import pytest
import torch
from diffusers import DDPMScheduler

from priorlab.errors import UserError
from priorlab.models import (
    content_hash,
    dit,
    drop_labels,
    init_from_base,
    load_denoiser,
    mlp,
    save_denoiser,
    unet,
)

BUILDERS = {
    "unet": (unet, (1, 16, 16), {}),
    "dit": (dit, (1, 16, 16), {}),
    "mlp": (mlp, (2,), {"hidden": 32, "depth": 2}),
}


def _inputs(shape, n=6, num_classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, *shape, generator=g),
        torch.randint(0, 1000, (n,), generator=g),
        torch.randint(0, num_classes, (n,), generator=g),
    )


def _perturb(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("name", BUILDERS)
def test_finetune_unconditional_prediction_equals_base_at_step_0(name):
    build, shape, kw = BUILDERS[name]
    torch.manual_seed(0)
    base = build(shape, 10, **kw).eval()
    _perturb(base)  # a trained-looking base, so that the equality is not one of zero-initialised outputs
    finetune = build(shape, 7, **kw).eval()  # a fine-tune may have another number of classes
    x, t, y = _inputs(shape, num_classes=7)
    with torch.no_grad():
        before = finetune(x, t, y, force_drop=True)
        init_from_base(finetune, base)
        expected = base(x, t, torch.full_like(y, base.null_class))
        # bit for bit: the same architecture with the base's weights, on the same 6 rows; the class embedding is a
        # lookup of rows equal to the base's null row, so this is the same computation
        assert torch.equal(finetune(x, t, y, force_drop=True), expected)
        assert torch.equal(finetune(x, t, y), expected)  # class rows start at the base's null row
    assert not torch.allclose(before, expected)


def test_force_drop_mask_selects_rows():
    model = unet((1, 16, 16), 10).eval()
    _perturb(model)
    x, t, y = _inputs((1, 16, 16))
    mask = torch.tensor([True, False, True, False, False, True])
    with torch.no_grad():
        mixed = model(x, t, y, force_drop=mask)
        uncond = model(x, t, y, force_drop=True)
        cond = model(x, t, y)
    torch.testing.assert_close(mixed[mask], uncond[mask])
    torch.testing.assert_close(mixed[~mask], cond[~mask])


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 1.0])
def test_observed_drop_rate_matches_p(p):
    labels = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    dropped = drop_labels(labels, p, null_class=10, generator=torch.Generator().manual_seed(1))
    rate = (dropped == 10).double().mean().item()
    assert rate == pytest.approx(p, abs=4 * (p * (1 - p) / len(labels)) ** 0.5 + 1e-12)
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])


def test_base_of_another_size_is_refused():
    base = unet((1, 16, 16), 10, block_out_channels=(32, 64))
    finetune = unet((1, 16, 16), 10, block_out_channels=(16, 32))
    with pytest.raises(UserError, match="block_out_channels"):
        init_from_base(finetune, base)
    with pytest.raises(UserError, match="network UNet2DModel"):
        init_from_base(dit((1, 16, 16), 10), base)


@pytest.mark.parametrize("name", BUILDERS)
def test_save_load_round_trip_records_base_hash(name, tmp_path):
    build, shape, kw = BUILDERS[name]
    model = build(shape, 10, **kw).eval()
    _perturb(model)
    base_dir = save_denoiser(model, DDPMScheduler(prediction_type="epsilon"), tmp_path / "base", stage="base")
    digest = content_hash(base_dir)
    save_denoiser(model, DDPMScheduler(), tmp_path / "ft", base={"path": str(base_dir), "sha256": digest})
    loaded = load_denoiser(tmp_path / "ft")
    x, t, y = _inputs(shape)
    with torch.no_grad():
        torch.testing.assert_close(loaded.denoiser(x, t, y), model(x, t, y), rtol=0, atol=0)  # same weights, inputs
    assert loaded.meta["base"]["sha256"] == digest and len(digest) == 64
    assert loaded.denoiser.null_class == 10 and loaded.denoiser.num_classes == 10
    assert not list(tmp_path.glob(".ft.*"))  # no temporary folder left behind


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        load_denoiser(tmp_path / "missing", role="base")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not a priorlab model folder"):
        load_denoiser(tmp_path / "empty")
    path = save_denoiser(mlp((2,), 3, hidden=8, depth=1), DDPMScheduler(), tmp_path / "m")
    weights = path / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.raises(UserError, match="could not be loaded"):
        load_denoiser(path)
    meta = json.loads((path / "priorlab.json").read_text())
    assert meta["class_name"] == "MLPDenoiser"


def test_unet_time_scale_shift_conditions_through_the_group_norm(tmp_path):
    """scale_shift: each ResNet block's time-and-class projection doubles (a scale and a shift per channel), the
    setting survives a save/load, and the class rows change the prediction; unknown values are refused."""
    from priorlab.models.presets import unet

    plain = unet((1, 8, 8), 3, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4)
    film = unet((1, 8, 8), 3, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4,
                time_scale_shift="scale_shift")  # fmt: skip
    proj = film.net.down_blocks[0].resnets[0].time_emb_proj
    assert proj.out_features == 2 * plain.net.down_blocks[0].resnets[0].time_emb_proj.out_features == 16
    save_denoiser(film, DDPMScheduler(num_train_timesteps=10), tmp_path / "m")
    loaded = load_denoiser(tmp_path / "m").denoiser
    assert loaded.net.config.resnet_time_scale_shift == "scale_shift"
    torch.manual_seed(0)
    with torch.no_grad():
        film.net.class_embedding.weight.normal_()
        x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 3])
        a = film.net(x, t, class_labels=torch.tensor([0, 0])).sample
        b = film.net(x, t, class_labels=torch.tensor([1, 1])).sample
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(UserError, match="time_scale_shift='film' is unknown"):
        unet((1, 8, 8), 3, time_scale_shift="film")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o755), (0o027, 0o750)])
def test_model_folders_are_made_with_the_users_umask(tmp_path, umask, mode):
    """A model folder is written into a temporary sibling first; it ends with the permissions mkdir would give."""
    import os

    from priorlab.models.presets import unet

    net = unet((1, 8, 8), 2, block_out_channels=(8, 16), attention=(False, False), norm_num_groups=4)
    old = os.umask(umask)
    try:
        path = save_denoiser(net, DDPMScheduler(num_train_timesteps=10), tmp_path / "m")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode

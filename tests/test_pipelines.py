"""The prior swap in diffusers pipelines, on tiny random-weight models saved locally inside the tests."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

import pipeline_models as pm
from conftest import across_shapes_atol, assert_close_across_shapes, torch_threads
from priorlab import diffusion
from priorlab.errors import UserError
from priorlab.guidance import cfg, cfg_two_conditions
from priorlab.pipelines import IMAGE_CONDITIONED, load_pipeline, load_prior, null_condition, swap_prior
from priorlab.priors import PriorWeights, make_prior


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "sd": pm.stable_diffusion(root / "sd", seed=1),
        "sd_base": pm.stable_diffusion(root / "sd_base", seed=2),
        "sd_base_v": pm.stable_diffusion(
            root / "sd_base_v", seed=3, prediction_type="v_prediction", beta_schedule="linear"
        ),  # fmt: skip
        "sd_other_vae": pm.stable_diffusion(root / "sd_other_vae", seed=4, scaling_factor=0.13025),
        "ip2p": pm.instruct_pix2pix(root / "ip2p", seed=5),
        "dit": pm.dit_pipeline(root / "dit", seed=6),
        "dit10": pm.dit_pipeline(root / "dit10", seed=7, num_classes=10),
        "dit_base": pm.dit_pipeline(root / "dit_base", seed=8),
        "dit_big": pm.dit_pipeline(root / "dit_big", seed=9, sample_size=16),
        "pixart": pm.pixart(root / "pixart", seed=14),
        "unet_rgb": pm.unconditional_unet_folder(root / "unet_rgb", seed=15, in_channels=3),
        "unet_latent": pm.unconditional_unet_folder(root / "unet_latent", seed=16, in_channels=4),
        "iv": pm.image_variation(root / "iv", seed=10),
        "t2v": pm.text_to_video(root / "t2v", seed=11),
        "t2v_base": pm.text_to_video(root / "t2v_base", seed=12),
    }


@pytest.fixture(autouse=True)
def _no_grad():
    """Every network runs without autograd here, as the pipelines and the prior run theirs: in grad mode some kernels
    split their work otherwise (matmul folds the batches of inputs that require grad differently), so a reference
    computed with grad would be another computation, e.g. PixArt's T5 embedding differs in its last bits."""
    with torch.no_grad():
        yield


def _seeded(**kw):
    return {**kw, "generator": torch.Generator().manual_seed(0)}


def _capture_steps(pipe):
    """Record the guided model output that the pipeline hands to its scheduler at each step."""
    seen = []
    step = pipe.scheduler.step

    def recording(model_output, *args, **kwargs):
        seen.append(model_output.detach().clone())
        return step(model_output, *args, **kwargs)

    pipe.scheduler.step = recording
    return seen


def _capture_inputs(swapped):
    seen = []
    forward = swapped.forward

    def recording(sample, timestep, *args, **kwargs):
        seen.append((sample.detach().clone(), timestep, args, {k: v for k, v in kwargs.items() if k != "return_dict"}))
        return forward(sample, timestep, *args, **kwargs)

    swapped.forward = recording
    return seen


def _empty_prompt(pipe):
    return pipe.encode_prompt("", "cpu", 1, False)[0]


SD_CALL = dict(prompt="a cat", num_inference_steps=3, guidance_scale=5.0, height=16, width=16, output_type="np")


def test_text_to_image_self_reproduces_diffusers_and_base_swaps_only_the_unconditional_half(folders):
    pipe = load_pipeline(str(folders["sd"]))
    base_pipe = load_pipeline(str(folders["sd_base"]))
    prior = load_prior(str(folders["sd_base"]))
    reference = pipe(**_seeded(**SD_CALL)).images
    with swap_prior(pipe, make_prior("self", prior)) as swapped:
        same = pipe(**_seeded(**SD_CALL)).images
    assert swapped.calls == {"guided": 3, "unguided": 0}
    np.testing.assert_array_equal(same, reference)  # self passes every call through: the same computation

    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        inputs = _capture_inputs(swapped)
        guided = _capture_steps(pipe)
        swapped_images = pipe(**_seeded(**SD_CALL)).images
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # put back after the block
    assert np.abs(swapped_images - reference).max() > 1e-3
    # First step by hand: θ(x, c) on the prompt half, ψ(x, ∅) with ψ's own empty-prompt embedding
    sample, t, _, kwargs = inputs[0]
    x = sample[:1]
    cond = pipe.unet(x, t, encoder_hidden_states=kwargs["encoder_hidden_states"][1:]).sample
    uncond = base_pipe.unet(x, t, encoder_hidden_states=_empty_prompt(base_pipe)).sample
    own_uncond = pipe.unet(x, t, encoder_hidden_states=kwargs["encoder_hidden_states"][:1]).sample
    assert not torch.allclose(uncond, own_uncond, atol=1e-3)  # ψ's ∅ really differs from θ's
    # the swap ran θ on the one prompt row and ψ on the one ∅ row, as here: the same 1-row computations
    torch.testing.assert_close(guided[0], cfg(cond, uncond, 5.0), rtol=0, atol=1e-5)
    out = swapped.forward(sample, t, **kwargs).sample
    assert torch.equal(out[:1], base_pipe.unet(x, t, encoder_hidden_states=_empty_prompt(base_pipe)).sample)


def test_unguided_calls_and_prior_self_pass_through(folders):
    pipe = load_pipeline(str(folders["sd"]))
    prior = load_prior(str(folders["sd_base"]))
    reference = pipe(**_seeded(**{**SD_CALL, "guidance_scale": 1.0})).images
    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        images = pipe(**_seeded(**{**SD_CALL, "guidance_scale": 1.0})).images
    assert swapped.calls == {"guided": 0, "unguided": 3}
    np.testing.assert_array_equal(images, reference)


def test_mixed_parameterization_and_schedule_are_converted(folders):
    """A v-prediction base on a linear schedule, queried at its timestep of closest ᾱ, returned as eps."""
    pipe = load_pipeline(str(folders["sd"]))
    base_pipe = load_pipeline(str(folders["sd_base_v"]))
    prior = load_prior(str(folders["sd_base_v"]))
    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, 8, 8, generator=g)
        t = torch.tensor(501)
        emb = torch.randn(2, 16, 32, generator=g)
        out = swapped(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([emb, emb])).sample
    model_abar = pipe.scheduler.alphas_cumprod
    base_abar = base_pipe.scheduler.alphas_cumprod
    tb = int((base_abar - model_abar[501]).abs().argmin())
    assert tb != 501  # the schedules differ, so matching matters
    v = base_pipe.unet(x, torch.tensor(tb), encoder_hidden_states=_empty_prompt(base_pipe).expand(2, -1, -1)).sample
    expected = diffusion.to_eps(v, "v_prediction", x, base_abar[tb].expand(2))
    torch.testing.assert_close(out[:2], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2:], pipe.unet(x, t, encoder_hidden_states=emb).sample, rtol=0, atol=1e-5)


def test_a_transformer_prior_guides_a_unet(folders):
    """DiT (null class 1000) as the unconditional prior of a text-conditioned UNet in the same latent space."""
    pipe = load_pipeline(str(folders["sd"]))
    dit_pipe = load_pipeline(str(folders["dit_base"]))
    prior = load_prior(str(folders["dit_base"]))
    assert prior.null["class_labels"].tolist() == [1000]
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    emb = torch.randn(1, 16, 32)
    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        out = swapped(torch.cat([x, x]), torch.tensor(300), encoder_hidden_states=torch.cat([emb, emb])).sample
    expected = dit_pipe.transformer(x, timestep=torch.tensor([300]), class_labels=torch.tensor([1000])).sample[:, :4]
    assert torch.equal(out[:1], expected)


def test_instruct_pix2pix_replaces_only_the_fully_unconditional_third(folders):
    pipe = load_pipeline(str(folders["ip2p"]))
    base_pipe = load_pipeline(str(folders["sd_base"]))
    prior = load_prior(str(folders["sd_base"]))
    call = dict(prompt="make it red", image=pm.image(), num_inference_steps=3, guidance_scale=7.5,
                image_guidance_scale=1.5, output_type="np")  # fmt: skip
    reference = pipe(**_seeded(**call)).images
    with swap_prior(pipe, make_prior("self", prior)):  # every call passed through: the same computation
        np.testing.assert_array_equal(pipe(**_seeded(**call)).images, reference)
    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        inputs = _capture_inputs(swapped)
        guided = _capture_steps(pipe)
        pipe(**_seeded(**call))
    sample, t, _, kwargs = inputs[0]
    assert sample.shape[1] == 8 and len(sample) == 3
    emb = kwargs["encoder_hidden_states"]
    text = pipe.unet(sample[:1], t, encoder_hidden_states=emb[:1]).sample
    image_only = pipe.unet(sample[1:2], t, encoder_hidden_states=emb[1:2]).sample
    uu = base_pipe.unet(sample[2:, :4], t, encoder_hidden_states=_empty_prompt(base_pipe)).sample  # latent only
    out = swapped.forward(sample, t, **kwargs).sample  # the pipeline's first call again: the same computation
    assert torch.equal(out[2:], uu)  # ψ on the one ∅ row, as here
    # θ ran on the text and image rows as one 2-row batch, here one row at a time
    assert_close_across_shapes(out[:2], torch.cat([text, image_only]))
    assert (text - image_only).abs().max() > 10 * across_shapes_atol(text)  # the two conditions are told apart
    # the pipeline combined exactly these chunks, its three terms added in another order (elementwise rounding)
    torch.testing.assert_close(guided[0], cfg_two_conditions(uu, out[1:2], out[:1], 1.5, 7.5))


def test_image_conditioned_8_channel_unet_with_a_two_way_layout(folders):
    """A Zero-1-to-3-style [∅, cond] 8-channel UNet through the generic family: ψ sees only the noisy latent."""
    pipe = load_pipeline(str(folders["ip2p"]))
    base_pipe = load_pipeline(str(folders["sd_base"]))
    prior = load_prior(str(folders["sd_base"]))
    g = torch.Generator().manual_seed(2)
    x, cond_latent, emb = (
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 4, 8, 8, generator=g),
        torch.randn(1, 16, 32),
    )
    sample = torch.cat([torch.cat([x, torch.zeros_like(cond_latent)], 1), torch.cat([x, cond_latent], 1)])
    with swap_prior(pipe, make_prior("base", prior), family=IMAGE_CONDITIONED) as swapped:
        out = swapped(sample, torch.tensor(700), encoder_hidden_states=torch.cat([emb, emb])).sample
    expected = base_pipe.unet(x, torch.tensor(700), encoder_hidden_states=_empty_prompt(base_pipe)).sample
    assert torch.equal(out[:1], expected)
    torch.testing.assert_close(out[1:], pipe.unet(sample[1:], torch.tensor(700), encoder_hidden_states=emb).sample,
                               rtol=0, atol=1e-5)  # fmt: skip


DIT_CALL = dict(class_labels=[3, 7], num_inference_steps=3, guidance_scale=4.0, output_type="np")


def test_dit_self_reproduces_diffusers_and_base_uses_its_null_class(folders):
    pipe = load_pipeline(str(folders["dit"]))
    base_pipe = load_pipeline(str(folders["dit_base"]))
    prior = load_prior(str(folders["dit_base"]))
    reference = pipe(**_seeded(**DIT_CALL)).images
    with swap_prior(pipe, make_prior("self", prior)):  # every call passed through: the same computation
        np.testing.assert_array_equal(pipe(**_seeded(**DIT_CALL)).images, reference)
    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        inputs = _capture_inputs(swapped)
        images = pipe(**_seeded(**DIT_CALL)).images
    assert np.abs(images - reference).max() > 1e-3
    sample, t, _, kwargs = inputs[0]
    out = swapped.forward(sample, t, **kwargs).sample
    null = torch.full((2,), 1000)  # ψ ran on the two ∅ rows, as here
    assert torch.equal(out[2:, :4], base_pipe.transformer(sample[2:], timestep=t[2:], class_labels=null).sample[:, :4])


def test_dit_fine_tuned_on_n_classes_gets_its_own_null_class(folders):
    """DiTPipeline hard-codes null = 1000; a 10-class fine-tune's null row is 10."""
    pipe = load_pipeline(str(folders["dit10"]))
    with pytest.raises(IndexError):  # diffusers alone cannot guide it
        pipe(**_seeded(**DIT_CALL))
    with swap_prior(pipe, make_prior("self", None)) as swapped:
        inputs = _capture_inputs(swapped)
        pipe(**_seeded(**DIT_CALL))
    sample, t, _, kwargs = inputs[0]
    assert kwargs["class_labels"][2:].tolist() == [1000, 1000]  # what the pipeline passes
    out = swapped.forward(sample, t, **kwargs).sample
    own = pipe.transformer(sample[2:], timestep=t[2:], class_labels=torch.tensor([10, 10])).sample
    assert_close_across_shapes(out[2:], own)  # rows of a 4-row forward against a 2-row one
    assert (out[:2] - own).abs().max() > 10 * across_shapes_atol(own)  # another class's rows differ by far more


def test_image_variation_with_a_text_to_image_base(folders):
    """The Versatile Diffusion case: an image-embedding UNet guided by a text model's empty-prompt prediction."""
    pipe = load_pipeline(str(folders["iv"]))
    base_pipe = load_pipeline(str(folders["sd_base"]))
    prior = load_prior(str(folders["sd_base"]))
    call = dict(image=pm.image(1), num_inference_steps=3, guidance_scale=3.0, height=16, width=16, output_type="np")
    reference = pipe(**_seeded(**call)).images
    with swap_prior(pipe, make_prior("self", prior)):  # every call passed through: the same computation
        np.testing.assert_array_equal(pipe(**_seeded(**call)).images, reference)
    with swap_prior(pipe, make_prior("base", prior)) as swapped:
        inputs = _capture_inputs(swapped)
        pipe(**_seeded(**call))
    sample, t, _, kwargs = inputs[0]
    assert torch.count_nonzero(kwargs["encoder_hidden_states"][:1]) == 0  # the pipeline's own ∅ is a zero embedding
    out = swapped.forward(sample, t, **kwargs).sample
    assert torch.equal(out[:1], base_pipe.unet(sample[:1], t, encoder_hidden_states=_empty_prompt(base_pipe)).sample)


def test_image_variation_base_uses_a_zero_image_embedding(folders):
    pipe = load_pipeline(str(folders["iv"]))
    null = null_condition(pipe.unet, pipe)
    assert null["encoder_hidden_states"].shape == (1, 1, 32) and not null["encoder_hidden_states"].any()


VIDEO_CALL = dict(prompt="a dog", num_frames=3, num_inference_steps=2, guidance_scale=6.0, height=16, width=16,
                  output_type="pt")  # fmt: skip


def test_video_self_reproduces_diffusers_and_base_is_a_video_or_an_image_model(folders):
    pipe = load_pipeline(str(folders["t2v"]))
    reference = pipe(**_seeded(**VIDEO_CALL)).frames
    video_base = load_pipeline(str(folders["t2v_base"]))
    with swap_prior(
        pipe, make_prior("self", load_prior(str(folders["t2v_base"])))
    ):  # passed through: the same computation
        assert torch.equal(pipe(**_seeded(**VIDEO_CALL)).frames, reference)
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["t2v_base"])))) as swapped:
        inputs = _capture_inputs(swapped)
        frames = pipe(**_seeded(**VIDEO_CALL)).frames
    assert frames.shape == reference.shape and (frames - reference).abs().max() > 1e-4
    sample, t, _, kwargs = inputs[0]
    assert sample.ndim == 5
    out = swapped.forward(sample, t, **kwargs).sample
    assert torch.equal(out[:1], video_base.unet(sample[:1], t, encoder_hidden_states=_empty_prompt(video_base)).sample)
    # An image model as the prior of a video model: every frame denoised as an image
    image_base = load_pipeline(str(folders["sd_base"]))
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["sd_base"])))) as swapped:
        out = swapped(sample, t, **kwargs).sample
    frames_as_images = sample[:1].permute(0, 2, 1, 3, 4).flatten(0, 1)
    per_frame = image_base.unet(frames_as_images, t, encoder_hidden_states=_empty_prompt(image_base).expand(3, -1, -1))
    torch.testing.assert_close(out[:1], per_frame.sample.unflatten(0, (1, 3)).permute(0, 2, 1, 3, 4), rtol=0, atol=1e-6)


def test_auto_and_mix_weights_choose_per_noise_level(folders):
    pipe = load_pipeline(str(folders["sd"]))
    base_pipe = load_pipeline(str(folders["sd_base"]))
    prior = load_prior(str(folders["sd_base"]))
    edges = torch.tensor([0, 500, 1000])
    weights = PriorWeights(edges, torch.tensor([0.0, 1.0]), "auto")  # self at low noise, base at high noise
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    neg, emb = _empty_prompt(pipe), torch.randn(1, 16, 32)
    batch = dict(encoder_hidden_states=torch.cat([neg, emb]))
    with swap_prior(pipe, make_prior("auto", prior, weights)) as swapped:
        low = swapped(torch.cat([x, x]), torch.tensor(100), **batch).sample
        high = swapped(torch.cat([x, x]), torch.tensor(900), **batch).sample
    # θ ran on the whole 2-row batch here, against a single row
    own_low = pipe.unet(x, torch.tensor(100), encoder_hidden_states=neg).sample
    assert_close_across_shapes(low[:1], own_low)
    base_low = base_pipe.unet(x, torch.tensor(100), encoder_hidden_states=_empty_prompt(base_pipe)).sample
    assert (base_low - own_low).abs().max() > 10 * across_shapes_atol(own_low)  # ψ's ∅ there would be seen
    base_high = base_pipe.unet(x, torch.tensor(900), encoder_hidden_states=_empty_prompt(base_pipe)).sample
    assert torch.equal(high[:1], base_high)  # ψ alone on the one ∅ row, as here: the same computation
    half = PriorWeights(edges, torch.tensor([0.5, 0.5]), "mix")
    with swap_prior(pipe, make_prior("mix", prior, half)) as swapped:
        mixed = swapped(torch.cat([x, x]), torch.tensor(900), **batch).sample
    own_high = pipe.unet(x, torch.tensor(900), encoder_hidden_states=neg).sample
    assert_close_across_shapes(mixed[:1], 0.5 * (own_high + base_high))  # θ's ∅ from the 2-row batch
    assert (own_high - base_high).abs().max() > 20 * across_shapes_atol(own_high)  # either alone would be seen


def _draws(pipe, latents: torch.Tensor, seed: int = 0):
    """The calibration draws of `fit_pipeline_weights` (timesteps, then noise, from one generator seeded `seed`),
    the noisy latents they make, and θ's ᾱ."""
    abar = pipe.scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, len(abar), (len(latents),), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    return t, noise, diffusion.add_noise(latents, noise, abar[t]), abar


def _unet_eps(pipe, x_t, t, abar, emb) -> torch.Tensor:
    """θ's prediction as eps at (x_t, t) with the prompt embeddings `emb` (one for all rows, or one per row)."""
    out = pipe.unet(x_t, t, encoder_hidden_states=emb.expand(len(x_t), *emb.shape[1:])).sample
    return diffusion.to_eps(out, pipe.scheduler.config.prediction_type, x_t, abar[t])


def _least_squares(a, d, t, edges) -> list[float | None]:
    """Per bucket [edges[b], edges[b + 1]) of the timesteps t, the w ∈ [0, 1] minimising mean ‖a + w·d‖²: the
    convex quadratic's minimiser −⟨a, d⟩/⟨d, d⟩, clipped (None where the bucket holds no sample)."""
    a, d = a.double().flatten(1), d.double().flatten(1)
    out = []
    for lo, hi in zip(edges[:-1].tolist(), edges[1:].tolist(), strict=True):
        rows = (t >= lo) & (t < hi)
        out.append(float((-(a[rows] * d[rows]).sum() / (d[rows] ** 2).sum()).clamp(0, 1)) if rows.any() else None)
    return out


def _assert_weights(fitted: torch.Tensor, expected: list[float | None], atol: float = 1e-4) -> None:
    """The fitted weights of the buckets that held samples are the expected ones."""
    pairs = [(float(f), e) for f, e in zip(fitted.tolist(), expected, strict=True) if e is not None]
    assert pairs and all(f == pytest.approx(e, abs=atol) for f, e in pairs), pairs


class _Oracle:
    """A prior network that knows the calibration draws: at the calibration sample x_t[i] it predicts
    own[i] + (target[i] − own[i]) / lam, so that the mix (1 − w)·own + w·eps_ψ is `target` exactly at w = lam.
    Against that target, the least-squares weight is lam clipped to [0, 1], with no loss left where lam lies
    inside: a weight known before any fit."""

    def __init__(self, x_t: torch.Tensor, own: torch.Tensor, target: torch.Tensor, lam: float):
        self.x_t, self.answer = x_t.flatten(1), own + (target - own) / lam

    def eps(self, x: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
        return self.answer[torch.cdist(x.flatten(1), self.x_t).argmin(1)]  # each row's own calibration sample


def test_fit_pipeline_weights_on_calibration_latents(folders):
    from priorlab.pipelines import fit_pipeline_weights

    pipe = load_pipeline(str(folders["sd"]))
    prior = load_prior(str(folders["sd_base"]))
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    null = {"encoder_hidden_states": _empty_prompt(pipe)}
    mix = fit_pipeline_weights(pipe, prior, latents, null, prior="mix", buckets=4)
    losses = mix.losses
    for b in range(4):
        assert losses["mix"][b] <= min(losses["self"][b], losses["base"][b]) + 1e-9
    assert ((mix.base_weight >= 0) & (mix.base_weight <= 1)).all()
    # by hand, from the fit's draws: a = eps_θ(∅) − eps, d = eps_ψ − eps_θ(∅), w = −⟨a, d⟩/⟨d, d⟩ clipped per bucket
    t, noise, x_t, abar = _draws(pipe, latents)
    own = _unet_eps(pipe, x_t, t, abar, null["encoder_hidden_states"])
    a, d = own - noise, prior.eps(x_t, abar[t]) - own
    _assert_weights(mix.base_weight, _least_squares(a, d, t, mix.edges))
    for b, (lo, hi) in enumerate(zip(mix.edges[:-1], mix.edges[1:], strict=True)):
        rows = (t >= lo) & (t < hi)
        assert losses["self"][b] == pytest.approx(float(a[rows].double().pow(2).mean()), rel=1e-4)
        assert losses["base"][b] == pytest.approx(float((a + d)[rows].double().pow(2).mean()), rel=1e-4)
    # priors whose mix with θ hits the noise exactly at w = lam: inside [0, 1] the fit finds lam, with no loss
    # left; outside, the nearer end
    for lam, expected in ((0.3, 0.3), (0.75, 0.75), (1.0, 1.0), (3.0, 1.0), (-1.0, 0.0)):
        fit = fit_pipeline_weights(pipe, _Oracle(x_t, own, noise, lam), latents, null, prior="mix", buckets=4)
        _assert_weights(fit.base_weight, [expected] * 4)
        if 0 < lam < 1:
            assert ((fit.base_weight > 0) & (fit.base_weight < 1)).all()
            assert max(fit.losses["mix"]) < 1e-6 * min(fit.losses["self"])


def test_mismatches_are_clear_errors(folders):
    pipe = load_pipeline(str(folders["sd"]))
    with pytest.raises(UserError, match="scaling_factor"):
        with swap_prior(pipe, make_prior("base", load_prior(str(folders["sd_other_vae"])))):
            pass
    with (
        swap_prior(pipe, make_prior("base", load_prior(str(folders["unet_rgb"])))),
        pytest.raises(UserError, match="3 input"),
    ):
        pipe(**_seeded(**SD_CALL))
    with pytest.raises(UserError, match="needs a base"):
        with swap_prior(pipe, make_prior("base", None)):
            pass
    with pytest.raises(UserError, match="fitted weights"):
        with swap_prior(pipe, make_prior("auto", load_prior(str(folders["sd_base"])))):
            pass
    with pytest.raises(UserError, match="unknown"):
        with swap_prior(pipe, make_prior("nope", None)):
            pass
    with pytest.raises(UserError, match="not a diffusers pipeline"):
        load_pipeline(str(folders["sd"] / "unet"))
    with pytest.raises(UserError, match="neither"):
        load_prior(str(folders["sd"] / "scheduler"))
    assert type(pipe.unet).__name__ == "UNet2DConditionModel"  # every failed block put the network back


def test_sample_command_writes_images_settings_and_a_comparison(folders, tmp_path):
    from conftest import run_cli

    out = tmp_path / "out"
    args = ["sample", f"model={folders['sd']}", f"base={folders['sd_base']}", "prompt=a red cat", "guidance_scale=5",
            "num_steps=3", "height=16", "width=16", "num_images=2", "seed=7", "compare=true", f"out={out}",
            "progress=false"]  # fmt: skip
    result = run_cli(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    settings = json.loads((out / "sample.json").read_text())
    assert settings["family"] == "text-to-image" and settings["files"] == {
        "self": ["prior=self_0.png", "prior=self_1.png"], "base": ["prior=base_0.png", "prior=base_1.png"]}  # fmt: skip
    assert Image.open(out / "compare.png").size == (2 * 16, 2 * 16)  # a row per prior, a column per image
    # prior=self is diffusers' own output for the same seeds: the same computation, bit for bit, on one thread as
    # the command ran
    pipe = load_pipeline(str(folders["sd"]))
    generators = [torch.Generator().manual_seed(7 + i) for i in range(2)]
    with torch_threads(1):
        own = pipe(prompt="a red cat", guidance_scale=5.0, num_inference_steps=3, height=16, width=16,
                   num_images_per_prompt=2, generator=generators).images  # fmt: skip
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(out / f"prior=self_{i}.png")), np.asarray(own[i]))
    assert not np.array_equal(np.asarray(Image.open(out / "prior=base_0.png")), np.asarray(own[0]))
    again = run_cli(*args, cwd=tmp_path)  # never overwrites silently
    assert again.returncode == 2 and "exists" in again.stderr and "Traceback" not in again.stderr


def test_sample_command_dit_and_video(folders, tmp_path):
    from conftest import run_cli

    common = ["num_steps=2", "progress=false"]
    dit = run_cli("sample", f"model={folders['dit10']}", f"base={folders['dit_base']}", "class_labels=[1,2]",
                  "guidance_scale=4", f"out={tmp_path / 'dit'}", *common, cwd=tmp_path)  # fmt: skip
    assert dit.returncode == 0, dit.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "dit").glob("*.png")) == ["prior=base_0.png", "prior=base_1.png"]
    video = run_cli("sample", f"model={folders['t2v']}", f"base={folders['t2v_base']}", "prompt=a dog", "num_frames=3",
                    "height=16", "width=16", f"out={tmp_path / 'video'}", *common, cwd=tmp_path)  # fmt: skip
    assert video.returncode == 0, video.stderr[-2000:]
    gif = Image.open(tmp_path / "video" / "prior=base_0.gif")
    assert gif.n_frames == 3 and len(list((tmp_path / "video" / "prior=base_0").glob("frame_*.png"))) == 3


def test_sample_command_user_mistakes_are_one_line_errors(folders, tmp_path, cli):
    cases = {
        ("sample", f"model={folders['sd']}", "prior=base", "prompt=x"): "needs base=PATH",
        ("sample", f"model={folders['sd']}", "prior=self"): "needs prompt",
        ("sample", f"model={folders['ip2p']}", "prior=self", "prompt=x"): "needs image=PATH",
        ("sample", f"model={tmp_path}", "prompt=x"): "not a diffusers pipeline",
        ("sample", f"model={folders['sd']}", f"base={folders['sd_other_vae']}", "prompt=x"): "scaling_factor",
        ("sample", f"model={folders['sd']}", f"base={folders['sd_base']}", "prior=auto", "prompt=x"): "prior_weights",
        ("sample", f"model={folders['sd']}", "prior=self", "prompt=x", "num_frames=4"): "takes no num_frames=",
        ("sample", f"model={folders['dit']}", "prior=self", "class_labels=[1]"): "takes no height=",
    }
    for args, message in cases.items():
        result = cli(*args, "num_steps=1", "height=16", "width=16", f"out={tmp_path / 'x'}", cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr[-1500:])
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


def test_image_text_to_video_unet_with_two_conditions(folders):
    """I2VGenXL's UNet (text + image → video): the [∅, cond] batch with fps, image latents and image embeddings
    sliced alike; ψ, a text-to-video model, sees only the noisy video latents. (diffusers' deprecated
    I2VGenXLPipeline itself does not run with transformers 5, so the stand-in is called as the pipeline calls it.)"""
    from types import SimpleNamespace

    from priorlab.pipelines.families import IMAGE_TEXT_TO_VIDEO

    net = pm.i2vgen_unet(13)
    pipe = SimpleNamespace(unet=net, scheduler=pm.scheduler(), vae=pm.vae(0))
    video_base = load_pipeline(str(folders["t2v_base"]))
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    kwargs = dict(
        encoder_hidden_states=torch.randn(2, 16, 32, generator=g),
        fps=torch.tensor([8, 8]),
        image_latents=torch.randn(2, 4, 3, 8, 8, generator=g),
        image_embeddings=torch.cat([torch.zeros(1, 1, 32), torch.randn(1, 1, 32, generator=g)]),
    )
    t = torch.tensor(400)
    with swap_prior(
        pipe, make_prior("base", load_prior(str(folders["t2v_base"]))), family=IMAGE_TEXT_TO_VIDEO
    ) as swapped:
        out = swapped(torch.cat([x, x]), t, **kwargs).sample
    assert swapped.calls == {"guided": 1, "unguided": 0}
    expected = video_base.unet(x, t, encoder_hidden_states=_empty_prompt(video_base)).sample
    assert torch.equal(out[:1], expected)
    cond = net(x, t, **{k: v[1:] for k, v in kwargs.items()}).sample
    torch.testing.assert_close(out[1:], cond, rtol=0, atol=1e-5)
    with swap_prior(pipe, make_prior("self", None), family=IMAGE_TEXT_TO_VIDEO) as swapped:
        same = swapped(torch.cat([x, x]), t, **kwargs).sample
    assert torch.equal(same, net(torch.cat([x, x]), t, **kwargs).sample)


def test_sample_command_fits_auto_weights_on_a_calibration_folder(folders, tmp_path):
    from conftest import run_cli

    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(6):
        pm.image(i, size=16).save(calib / f"{i}.png")
    args = (
        "sample",
        f"model={folders['sd']}",
        f"base={folders['sd_base']}",
        "prior=auto",
        "prompt=a cat",
        f"calibration={calib}",
        "calibration_buckets=3",
        "num_steps=2",
        "height=16",
        "width=16",
        "progress=false",
    )
    # the default, guided objective needs each image's own prompt
    result = run_cli(*args, f"out={tmp_path / 'none'}", cwd=tmp_path)
    assert result.returncode == 2 and "metadata.jsonl" in result.stderr and "Traceback" not in result.stderr
    out = tmp_path / "null"
    result = run_cli(*args, "calibration_objective=null_loss", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = PriorWeights.load(out / "prior_weights_auto.json")
    assert weights.mode == "auto" and weights.objective == "null_loss" and len(weights.base_weight) == 3
    assert set(weights.base_weight.tolist()) <= {0.0, 1.0} and sum(weights.losses["count"]) == 6
    settings = json.loads((out / "sample.json").read_text())
    assert settings["files"] == {"auto": ["prior=auto_0.png"]}
    assert settings["guidance_scale"] == 7.5 and settings["num_steps"] == 2  # not given: the pipeline's default
    rows = [{"file_name": f"{i}.png", "text": ["a cat", "a dog"][i % 2]} for i in range(6)]
    (calib / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "guided"
    result = run_cli(*args, "guidance_scale=3", f"out={out}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    weights = PriorWeights.load(out / "prior_weights_auto.json")
    assert weights.objective == "guided" and weights.scales == [3.0] and weights.base_weight.shape == (1, 3)
    assert set(weights.losses["guided"]) == {"w=3.0"}
    (calib / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a cat"}) + "\n")
    result = run_cli(*args, f"out={tmp_path / 'short'}", cwd=tmp_path)
    assert result.returncode == 2 and "gives no text for 5 image(s)" in result.stderr


def test_sample_cli_fits_guided_weights_for_image_conditioned_pipelines(folders, tmp_path):
    """InstructPix2Pix reads each edited image's text and input image from metadata.jsonl (the input images are
    not calibration images themselves) and fits at the image_guidance_scale it samples with; image variation
    needs no metadata: each calibration image is its own condition."""
    from conftest import run_cli

    pm.image(30, size=16).save(tmp_path / "input.png")
    calib = tmp_path / "calib"
    calib.mkdir()
    rows = []
    for i in range(4):
        pm.image(40 + i, size=16).save(calib / f"{i}.png")
        pm.image(50 + i, size=16).save(calib / f"in{i}.png")
        text = ["make it red", "make it blue"][i % 2]
        rows.append({"file_name": f"{i}.png", "text": text, "input_image": f"in{i}.png"})
    (calib / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = (f"image={tmp_path / 'input.png'}", f"base={folders['sd_base']}", f"calibration={calib}",
              "calibration_buckets=2", "calibration_size=16", "num_steps=2", "progress=false")  # fmt: skip
    out = tmp_path / "ip2p"
    result = run_cli("sample", f"model={folders['ip2p']}", "prior=mix", "prompt=make it red", "guidance_scale=4",
                     "image_guidance_scale=2", *common, f"out={out}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    weights = PriorWeights.load(out / "prior_weights_mix.json")
    assert weights.objective == "guided" and weights.scales == [4.0] and weights.image_scale == 2.0
    assert sum(weights.losses["count"]) == 4  # the four edited images; their inputs are conditions only
    (calib / "metadata.jsonl").write_text("".join(json.dumps({k: v for k, v in row.items() if k != "input_image"})
                                                  + "\n" for row in rows))  # fmt: skip
    result = run_cli("sample", f"model={folders['ip2p']}", "prior=mix", "prompt=make it red", *common,
                     f"out={tmp_path / 'no_inputs'}", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "gives no input_image for 8 image(s)" in result.stderr
    (calib / "metadata.jsonl").unlink()
    out = tmp_path / "iv"
    result = run_cli("sample", f"model={folders['iv']}", "prior=auto", "guidance_scale=3", *common, f"out={out}",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    weights = PriorWeights.load(out / "prior_weights_auto.json")
    assert weights.objective == "guided" and weights.scales == [3.0] and weights.image_scale is None
    assert sum(weights.losses["count"]) == 8  # no metadata: every image in the folder calibrates


def test_guided_pipeline_fit_scores_each_latent_with_its_own_condition(folders):
    """The guided objective on a text pipeline and on DiT: per bucket, mix's guided loss is at most either
    candidate's, and the conditions matter (other prompts give other losses)."""
    from priorlab.pipelines import fit_pipeline_weights, model_conditions

    pipe = load_pipeline(str(folders["sd"]))
    prior = load_prior(str(folders["sd_base"]))
    latents = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    null = {"encoder_hidden_states": _empty_prompt(pipe)}
    texts = ["a cat", "a dog"] * 16
    cond = model_conditions(pipe, None, texts=texts)
    assert cond["encoder_hidden_states"].shape[0] == 32
    mix = fit_pipeline_weights(pipe, prior, latents, null, "mix", buckets=4, objective="guided", cond_kwargs=cond,
                               scales=[2.0, 5.0])  # fmt: skip
    assert mix.objective == "guided" and mix.base_weight.shape == (2, 4)
    for name in ("w=2.0", "w=5.0"):
        g = mix.losses["guided"][name]
        for b in range(4):
            assert g["mix"][b] <= min(g["self"][b], g["base"][b]) + 1e-9
    # by hand, each latent with its own prompt: at scale w, a = w·eps_θ(c) + (1 − w)·eps_θ(∅) − eps and
    # d = (1 − w)(eps_ψ − eps_θ(∅))
    t, noise, x_t, abar = _draws(pipe, latents)
    own = _unet_eps(pipe, x_t, t, abar, null["encoder_hidden_states"])
    with_c = _unet_eps(pipe, x_t, t, abar, cond["encoder_hidden_states"])
    base = prior.eps(x_t, abar[t])
    for row, w in enumerate((2.0, 5.0)):
        a, d = w * with_c + (1 - w) * own - noise, (1 - w) * (base - own)
        _assert_weights(mix.base_weight[row], _least_squares(a, d, t, mix.edges))
    # a prior whose mix with θ(∅) is, at w = 0.4, the ∅ prediction that makes the guided one at scale 5 the noise:
    # the fit finds 0.4 at scale 5 (with no loss left), and at scale 2 the least-squares weight by hand
    target = (noise - 5.0 * with_c) / (1 - 5.0)
    oracle = _Oracle(x_t, own, target, 0.4)
    fit = fit_pipeline_weights(pipe, oracle, latents, null, "mix", buckets=4, objective="guided", cond_kwargs=cond,
                               scales=[2.0, 5.0])  # fmt: skip
    _assert_weights(fit.base_weight[1], [0.4] * 4)
    assert max(fit.losses["guided"]["w=5.0"]["mix"]) < 1e-6 * min(fit.losses["guided"]["w=5.0"]["self"])
    a, d = 2.0 * with_c - own - noise, -(oracle.answer - own)
    _assert_weights(fit.base_weight[0], _least_squares(a, d, t, fit.edges))
    other = fit_pipeline_weights(
        pipe,
        prior,
        latents,
        null,
        "mix",
        buckets=4,
        objective="guided",
        cond_kwargs=model_conditions(pipe, None, texts=["a house"] * 32),
        scales=[5.0],
    )
    assert other.losses["guided"]["w=5.0"]["self"] != mix.losses["guided"]["w=5.0"]["self"]
    with pytest.raises(UserError, match="one condition per calibration latent"):
        fit_pipeline_weights(pipe, prior, latents, null, "mix", objective="guided",
                             cond_kwargs=model_conditions(pipe, None, texts=["a cat"]), scales=[2.0])  # fmt: skip
    dit = load_pipeline(str(folders["dit"]))
    labels = model_conditions(dit, None, labels=[0, 1] * 8)
    assert labels["class_labels"].tolist() == [0, 1] * 8
    with pytest.raises(UserError, match="class labels"):
        model_conditions(dit, None, texts=["a cat"])


def test_guided_fit_of_instruct_pix2pix_scores_its_two_condition_combination(folders):
    """InstructPix2Pix: each calibration latent (the edited image) with its edit text and the latents of its input
    image; the guided loss is that of (1 − s_I)·eps(∅, ∅) + (s_I − s_T)·eps(c_I, ∅) + s_T·eps(c_I, c_T), here
    recomputed by hand from θ's own calls, with the noise and timesteps the fit draws from its seed."""
    from priorlab.pipelines import fit_pipeline_weights, model_conditions, model_null_condition

    pipe = load_pipeline(str(folders["ip2p"]))
    prior = load_prior(str(folders["sd_base"]))
    n, s_i, s_t = 6, 1.5, 4.0
    latents = torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    inputs = [pm.image(10 + i, size=16) for i in range(n)]
    texts = ["make it red", "make it blue"] * 3
    cond = model_conditions(pipe, None, texts=texts, images=inputs, size=(8, 8))  # the VAE halves the size
    assert cond["image_latents"].shape == (n, 4, 4, 4) and cond["encoder_hidden_states"].shape[0] == n
    null = model_null_condition(pipe)
    w = fit_pipeline_weights(pipe, prior, latents, null, "mix", buckets=1, seed=3, objective="guided",
                             cond_kwargs=cond, scales=[s_t], image_scale=s_i)  # fmt: skip
    assert w.image_scale == s_i and w.scales == [s_t] and w.base_weight.shape == (1, 1)
    # by hand: the fit's draws (seed 3), θ on [x_t, image latents or zeros] with the text or the empty prompt
    abar = pipe.scheduler.alphas_cumprod.float()
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, len(abar), (n,), generator=g)
    noise = torch.randn(latents.shape, generator=g)
    x_t = diffusion.add_noise(latents, noise, abar[t])

    def unet(channels, emb):
        return pipe.unet(torch.cat([x_t, channels], 1), t, encoder_hidden_states=emb).sample

    empty = null["encoder_hidden_states"].expand(n, -1, -1)
    uu = unet(torch.zeros_like(x_t), empty)
    iu = unet(cond["image_latents"], empty)
    it = unet(cond["image_latents"], cond["encoder_hidden_states"])
    guided_self = (1 - s_i) * uu + (s_i - s_t) * iu + s_t * it
    guided_base = (1 - s_i) * prior.eps(x_t, abar[t]) + (s_i - s_t) * iu + s_t * it
    record = w.losses["guided"]["w=4.0"]
    assert record["self"][0] == pytest.approx(float(((guided_self - noise) ** 2).mean()), rel=1e-4)
    assert record["base"][0] == pytest.approx(float(((guided_base - noise) ** 2).mean()), rel=1e-4)
    assert record["mix"][0] <= min(record["self"][0], record["base"][0]) + 1e-9
    _assert_weights(w.base_weight[0], _least_squares(guided_self - noise, guided_base - guided_self, t, w.edges))
    with pytest.raises(UserError, match="image_guidance_scale to fit at"):
        fit_pipeline_weights(pipe, prior, latents, null, "mix", objective="guided", cond_kwargs=cond, scales=[s_t])
    with pytest.raises(UserError, match=r"image latents as 4 extra input channels"):
        fit_pipeline_weights(pipe, prior, latents, null, "mix", objective="guided", scales=[s_t], image_scale=s_i,
                             cond_kwargs={"encoder_hidden_states": cond["encoder_hidden_states"]})  # fmt: skip
    with pytest.raises(UserError, match="an input image and an edit text"):
        model_conditions(pipe, None, texts=texts)
    with pytest.raises(UserError, match=r"fitted at image_guidance_scale=1.5, not at 2"):
        with swap_prior(pipe, make_prior("mix", prior, w), guidance_scale=s_t, image_guidance_scale=2.0):
            pass


def test_guided_fit_of_image_variation_takes_each_image_as_its_own_condition(folders):
    from priorlab.pipelines import fit_pipeline_weights, model_conditions, model_null_condition

    pipe = load_pipeline(str(folders["iv"]))
    prior = load_prior(str(folders["sd_base"]))
    images = [pm.image(20 + i, size=16) for i in range(8)]
    cond = model_conditions(pipe, None, images=images)
    assert cond["encoder_hidden_states"].shape == (8, 1, 32)
    assert not torch.equal(cond["encoder_hidden_states"][0], cond["encoder_hidden_states"][1])
    latents = torch.randn(8, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    w = fit_pipeline_weights(pipe, prior, latents, model_null_condition(pipe), "mix", buckets=2, objective="guided",
                             cond_kwargs=cond, scales=[3.0])  # fmt: skip
    g = w.losses["guided"]["w=3.0"]
    assert w.objective == "guided" and all(g["mix"][b] <= min(g["self"][b], g["base"][b]) + 1e-9 for b in range(2))
    # by hand, each latent with its own image's embedding (module doc of priorlab.priors.weights)
    t, noise, x_t, abar = _draws(pipe, latents)
    own = _unet_eps(pipe, x_t, t, abar, model_null_condition(pipe)["encoder_hidden_states"])
    with_c = _unet_eps(pipe, x_t, t, abar, cond["encoder_hidden_states"])
    a, d = 3.0 * with_c - 2.0 * own - noise, -2.0 * (prior.eps(x_t, abar[t]) - own)
    _assert_weights(w.base_weight[0], _least_squares(a, d, t, w.edges))
    # a prior that makes the guided prediction the noise at w = 0.6: the fit finds 0.6 in both buckets
    oracle = _Oracle(x_t, own, (noise - 3.0 * with_c) / (1 - 3.0), 0.6)
    fit = fit_pipeline_weights(pipe, oracle, latents, model_null_condition(pipe), "mix", buckets=2,
                               objective="guided", cond_kwargs=cond, scales=[3.0])  # fmt: skip
    _assert_weights(fit.base_weight[0], [0.6, 0.6])
    with pytest.raises(UserError, match="conditioned on an image"):
        model_conditions(pipe, None, texts=["a cat"])


def test_unguided_batch_of_identical_latents_is_not_taken_for_a_guidance_batch(folders):
    """Two prompts sharing one noise tensor at guidance_scale=1: the pipeline's own flag says unguided."""
    pipe = load_pipeline(str(folders["sd"]))
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(6)).repeat(2, 1, 1, 1)
    call = dict(prompt=["a cat", "a dog"], latents=latents, num_inference_steps=2, guidance_scale=1.0, height=16,
                width=16, output_type="np")  # fmt: skip
    reference = pipe(**call).images
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["sd_base"])))) as swapped:
        images = pipe(**call).images
    assert swapped.calls == {"guided": 0, "unguided": 2}
    np.testing.assert_array_equal(images, reference)


def test_zero_terminal_snr_v_prediction_stays_finite(folders):
    """ᾱ = 0 at the first trailing step: a v-prediction model guided by an eps base gives finite images."""
    from diffusers import DDIMScheduler

    pipe = load_pipeline(str(folders["sd"]))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                               prediction_type="v_prediction", timestep_spacing="trailing")  # fmt: skip
    assert float(pipe.scheduler.alphas_cumprod[-1]) == 0.0
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["sd_base"])))):
        images = pipe(**_seeded(**SD_CALL)).images
    assert np.isfinite(images).all()


def test_fractional_timesteps_interpolate_sigma():
    """Issue 18: a fractional timestep's ᾱ comes from σ interpolated as the scheduler does (log σ for Karras and
    similar sigmas), no longer from ᾱ interpolated linearly (`tests/test_priors.py` checks it against Euler)."""
    from priorlab.priors import abar_at, sigmas

    abar = torch.linspace(0.99, 0.01, 1000)
    s = sigmas(abar.double())
    t = torch.tensor([0.0, 10.0, 10.25, 998.5, 999.0])
    mid, log_mid = 0.75 * s[10] + 0.25 * s[11], (0.5 * (s[998].log() + s[999].log())).exp()
    expected = torch.stack([abar[0], abar[10], 1 / (1 + mid**2), 1 / (1 + (s[998] / 2 + s[999] / 2) ** 2), abar[999]])
    torch.testing.assert_close(abar_at(abar, t), expected.float())
    torch.testing.assert_close(abar_at(abar, t[3:4], log_sigma=True), (1 / (1 + log_mid**2)).float()[None])


def test_video_calibration_and_refusals(folders):
    from types import SimpleNamespace

    from priorlab.pipelines import fit_pipeline_weights, model_null_condition
    from priorlab.pipelines.families import IMAGE_TEXT_TO_VIDEO

    pipe = load_pipeline(str(folders["t2v"]))
    prior = load_prior(str(folders["t2v_base"]))
    latents = torch.randn(12, 4, 3, 8, 8, generator=torch.Generator().manual_seed(10))
    null = model_null_condition(pipe)
    mix = fit_pipeline_weights(pipe, prior, latents, null, "mix", buckets=3, batch_size=5)
    assert sum(mix.losses["count"]) == 12
    for b in range(3):
        if mix.losses["count"][b]:
            assert mix.losses["mix"][b] <= min(mix.losses["self"][b], mix.losses["base"][b]) + 1e-9
    # by hand, over every frame of each video; then a prior whose mix with θ is the noise at w = 0.35
    t, noise, x_t, abar = _draws(pipe, latents)
    own = _unet_eps(pipe, x_t, t, abar, null["encoder_hidden_states"])
    _assert_weights(mix.base_weight, _least_squares(own - noise, prior.eps(x_t, abar[t]) - own, t, mix.edges))
    fit = fit_pipeline_weights(pipe, _Oracle(x_t, own, noise, 0.35), latents, null, "mix", buckets=3, batch_size=5)
    _assert_weights(fit.base_weight, [0.35] * 3)  # a bucket without samples takes its neighbour's
    with pytest.raises(UserError, match=r"must be \(N, C, F, H, W\)"):
        fit_pipeline_weights(pipe, prior, torch.zeros(2, 4, 8, 8), {}, "auto")
    i2v = SimpleNamespace(unet=pm.i2vgen_unet(0), scheduler=pm.scheduler(), vae=pm.vae(0))
    with pytest.raises(UserError, match="not supported for image-text-to-video"):
        fit_pipeline_weights(i2v, prior, latents, {}, "auto", family=IMAGE_TEXT_TO_VIDEO)


def test_pixart_and_bare_model_priors(folders):
    """A T5-conditioned PixArt transformer (its own empty-prompt embedding and mask) and an unconditional UNet2DModel
    from a bare model folder, each as the prior of a text-to-image UNet; a DiT made for 16² latents runs on 8²."""
    pipe = load_pipeline(str(folders["sd"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    emb = torch.randn(1, 16, 32)
    batch = dict(encoder_hidden_states=torch.cat([emb, emb]))
    px = load_pipeline(str(folders["pixart"]))
    embeds, mask = px.encode_prompt("", do_classifier_free_guidance=False, device="cpu")[:2]
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["pixart"])))) as swapped:
        out = swapped(torch.cat([x, x]), torch.tensor(250), **batch).sample
    cond = {"resolution": None, "aspect_ratio": None}
    expected = px.transformer(
        x,
        encoder_hidden_states=embeds,
        encoder_attention_mask=mask,
        timestep=torch.tensor([250]),
        added_cond_kwargs=cond,
    ).sample[:, :4]
    assert torch.equal(out[:1], expected)  # ψ on the one ∅ row, without grad (see _no_grad): the same computation
    from diffusers import UNet2DModel

    bare = UNet2DModel.from_pretrained(folders["unet_latent"]).eval()
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["unet_latent"])))) as swapped:
        out = swapped(torch.cat([x, x]), torch.tensor(250), **batch).sample
    assert torch.equal(out[:1], bare(x, torch.tensor([250])).sample)
    dit_pipe = load_pipeline(str(folders["dit"]))
    with swap_prior(dit_pipe, make_prior("base", load_prior(str(folders["dit_big"])))):
        images = dit_pipe(**_seeded(**DIT_CALL)).images
    assert np.isfinite(images).all()


def test_versatile_diffusion_image_unet_layout(folders):
    """VersatileDiffusionImageVariationPipeline keeps its UNet in `image_unet` with [negative, image] chunks."""
    from types import SimpleNamespace

    from priorlab.pipelines import FAMILIES

    family = FAMILIES["VersatileDiffusionImageVariationPipeline"]
    net = pm.unet(17)
    pipe = SimpleNamespace(image_unet=net, scheduler=pm.scheduler(), vae=pm.vae(0))
    base_pipe = load_pipeline(str(folders["sd_base"]))
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    emb = torch.randn(2, 1, 32)
    with swap_prior(pipe, make_prior("base", load_prior(str(folders["sd_base"]))), family=family) as swapped:
        out = swapped(torch.cat([x, x]), torch.tensor(600), encoder_hidden_states=emb).sample
    assert pipe.image_unet is net  # put back
    expected = base_pipe.unet(x, torch.tensor(600), encoder_hidden_states=_empty_prompt(base_pipe)).sample
    assert torch.equal(out[:1], expected)
    torch.testing.assert_close(
        out[1:], net(x, torch.tensor(600), encoder_hidden_states=emb[1:]).sample, rtol=0, atol=1e-5
    )

"""Bases and priors given by their hub name (`models.hub`), with no network: a Hugging Face cache laid out in
tmp_path as huggingface_hub lays it out (models--org--name/refs/<branch> holding a commit, snapshots/<commit>/ a tiny
DDPMPipeline saved with save_pretrained), used offline (HF_HUB_OFFLINE=1) or with the hub unreachable. Fine-tuning
from a name, what the run records, revisions, the resume and base checks, the errors, a local folder of the same
name, a study's base and `sample`'s prior."""

import hashlib
import json
import socket
from pathlib import Path

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

import pipeline_models
from conftest import TINY
from priorlab.errors import UserError
from priorlab.models import content_hash, load_denoiser
from priorlab.models.hub import hub_model, parse_hub_name

REPO = "org/name"
A, B = (hashlib.sha1(name).hexdigest() for name in (b"a", b"b"))  # two commits of the repository


def _storage(cache: Path, repo: str) -> Path:
    return cache / f"models--{repo.replace('/', '--')}"


def _ddpm(folder: Path, seed: int) -> Path:
    """A DDPMPipeline of a 1 × 8 × 8 UNet (sklearn's digits), its weights moved off initialisation by `seed`."""
    torch.manual_seed(seed)
    net = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                      down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                      norm_num_groups=4)  # fmt: skip
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    scheduler = DDPMScheduler(num_train_timesteps=100, beta_schedule="linear")
    DDPMPipeline(unet=net, scheduler=scheduler).save_pretrained(folder)
    return folder


def _point(cache: Path, repo: str, ref: str, commit: str) -> None:
    """refs/<ref> names `commit`, as a download of that branch or tag leaves it."""
    (_storage(cache, repo) / "refs").mkdir(parents=True, exist_ok=True)
    (_storage(cache, repo) / "refs" / ref).write_text(commit)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """The cache: org/name at commit A on main and commit B (other weights) on the tag v2; HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hf_cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for commit, seed, ref in ((A, 0, "main"), (B, 1, "v2")):
        _ddpm(_storage(cache, REPO) / "snapshots" / commit, seed)
        _point(cache, REPO, ref, commit)
    return cache


def test_a_hub_name_is_found_in_the_offline_cache_at_its_branch_tag_or_commit(hub):
    from huggingface_hub import snapshot_download

    snapshots = _storage(hub, REPO) / "snapshots"
    assert Path(snapshot_download(REPO, cache_dir=hub, local_files_only=True)) == snapshots / A  # a real cache
    assert Path(snapshot_download(REPO, revision="v2", cache_dir=hub, local_files_only=True)) == snapshots / B
    assert parse_hub_name("org/name@v2") == (REPO, "v2") and parse_hub_name(REPO) == (REPO, None)
    for path in ("./org/name", "/org/name", "~/org/name", "runs/t/base", "p=0.1/seed=0", "name", "org/"):
        assert parse_hub_name(path) is None, path
    assert [hub_model(spec).commit for spec in (REPO, "org/name@v2", f"org/name@{B}", f"org/name@{A}")] == [A, B, B, A]
    main, tagged = load_denoiser(REPO, role="base"), load_denoiser("org/name@v2", role="base")
    assert main.meta["hub"] == {"repo_id": REPO, "revision": "main", "commit": A}
    assert main.path == snapshots / A / "unet"
    assert tagged.meta["hub"] == {"repo_id": REPO, "revision": "v2", "commit": B}
    assert content_hash(main.path) != content_hash(tagged.path)  # the revision chose the weights
    x, t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 90])
    with torch.no_grad():
        expected = UNet2DModel.from_pretrained(snapshots / B / "unet")(x, t).sample
        torch.testing.assert_close(tagged.denoiser(x, t, torch.zeros(2, dtype=torch.long)), expected)


def test_the_cache_serves_when_the_hub_cannot_be_reached(hub, monkeypatch):
    """Online (HF_HUB_OFFLINE=0) with the hub refusing connections (a closed local port as HF_ENDPOINT): the name
    resolves from the cache; a name the cache lacks says the hub could not be reached."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: connections are refused
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    assert hub_model(REPO).folder == _storage(hub, REPO) / "snapshots" / A
    with pytest.raises(UserError, match=r"org/missing is not in the local Hugging Face cache .*, and the hub could "
                                        r"not be reached \(ConnectError"):  # fmt: skip
        hub_model("org/missing")


def test_a_finetune_records_the_hub_name_and_its_checks_refuse_the_branch_moved_to_other_weights(hub, compose_tmp):
    """`train stage=finetune base=org/name`: the run records the name, the revision, the commit and the weights
    hash, and its export's model card names the hub model; a finished or resumed run refuses the name once main
    points to other weights, and resumes with the commit it started from; evaluate's base check refuses the same
    hub model with other weights."""
    from priorlab.commands.train import train
    from priorlab.models.io import check_recorded_base
    from priorlab.pipelines.export import export_pipeline

    overrides = ["data=digits", "stage=finetune", f"base={REPO}", *TINY]
    model_dir = train(compose_tmp(overrides))
    run = model_dir.parent
    net_dir = _storage(hub, REPO) / "snapshots" / A / "unet"
    record = json.loads((run / "base.json").read_text())
    assert record["path"] == str(net_dir.resolve()) and record["sha256"] == content_hash(net_dir)
    assert record["hub"] == {"repo_id": REPO, "revision": "main", "commit": A}
    saved = load_denoiser(model_dir)
    assert saved.meta["base"]["hub"] == record["hub"] and saved.meta["base"]["format"] == "diffusers"
    assert "beta_schedule: linear" in (run / "config.yaml").read_text()  # the hub base's schedule
    card = (export_pipeline(model_dir, hub.parent / "exported") / "README.md").read_text()
    assert f"fine-tuned from `org/name@{A}` (weights sha256 {record['sha256'][:12]})" in card
    assert check_recorded_base(saved, load_denoiser(f"org/name@{A}", role="base")) is None
    with pytest.raises(UserError, match=rf"base=org/name@{B} has changed since .* \(org/name@{A}\)"):
        check_recorded_base(saved, load_denoiser("org/name@v2", role="base"))
    _point(hub, REPO, "main", B)  # the branch moves on
    with pytest.raises(UserError, match=r"is finished and was trained with other settings: base weights \(sha256\)"):
        train(compose_tmp(overrides))
    (run / "done.json").unlink()  # as if killed after its last checkpoint
    with pytest.raises(UserError, match=r"holds a run started with other settings: base weights \(sha256\)"):
        train(compose_tmp(overrides))
    assert train(compose_tmp(["data=digits", "stage=finetune", f"base=org/name@{A}", *TINY])) == model_dir
    assert (run / "done.json").exists()


def test_a_name_missing_from_the_cache_is_a_user_error_saying_how_to_get_it(hub, compose_tmp):
    from priorlab.commands.train import train

    how = r"Download it on a machine with network \(`hf download org/missing`\) .* or pass the model's folder"
    with pytest.raises(UserError, match=r"base=org/missing: no such folder, and the hub model org/missing is not in "
                                        r"the local Hugging Face cache \(.*hf_cache\), and the hub is not used "
                                        rf"offline \(HF_HUB_OFFLINE=1\)\. {how}"):  # fmt: skip
        train(compose_tmp(["data=digits", "stage=finetune", "base=org/missing", *TINY]))
    with pytest.raises(UserError, match=r"org/name at revision v9 is not in .*`hf download org/name --revision v9`"):
        load_denoiser("org/name@v9", role="base")
    with pytest.raises(UserError, match=r"prior small=org/missing: no such folder"):
        load_denoiser("org/missing", role="prior small")


def test_a_local_folder_named_like_a_hub_name_wins(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = _ddpm(tmp_path / "org" / "name", seed=5)
    saved = load_denoiser(REPO, role="base")
    assert "hub" not in saved.meta and saved.path.resolve() == (local / "unet").resolve()
    assert content_hash(saved.path) == content_hash(local / "unet") != content_hash(_storage(hub, REPO) / "snapshots"
                                                                                    / A / "unet")  # fmt: skip
    assert hub_model(REPO) is None and hub_model("org/name@v2").commit == B  # no local folder of that name


def test_a_study_base_given_by_hub_name_is_pinned_to_the_commit_it_resolved_to(hub, tmp_path):
    from priorlab.overrides import override
    from priorlab.study.bases import base_folder

    folder = base_folder(tmp_path, "mine", {"path": REPO})
    assert folder == Path(f"{REPO}@{A}") and override("base", folder) == f"base=org/name@{A}"
    with pytest.raises(UserError, match=r"bases.gone.path=org/gone: no such folder, and the hub model org/gone"):
        base_folder(tmp_path, "gone", {"path": "org/gone"})


def test_sample_takes_a_hub_name_as_its_prior(hub):
    """`priorlab sample base=org/name`: the prior of the cached snapshot; a Stable Diffusion snapshot whose
    model_index.json lists a safety checker (whose weights a hub base does not fetch) loads without it."""
    from priorlab.pipelines.export import load_base

    x, abar = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0.9, 0.2])
    with torch.no_grad():
        by_name = load_base(REPO).predict(x, abar, "epsilon")
        by_folder = load_base(str(_storage(hub, REPO) / "snapshots" / A)).predict(x, abar, "epsilon")
    torch.testing.assert_close(by_name, by_folder)
    sd = pipeline_models.stable_diffusion(_storage(hub, "org/sd") / "snapshots" / A, seed=0)
    _point(hub, "org/sd", "main", A)
    index = json.loads((sd / "model_index.json").read_text())
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]  # listed, not fetched
    (sd / "model_index.json").write_text(json.dumps(index))
    prior = load_base("org/sd")
    assert prior.null["encoder_hidden_states"].shape == (1, 16, 32)  # the "" embedding of its own text encoder

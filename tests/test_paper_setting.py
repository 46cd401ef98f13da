"""The paper's setting end to end on the CPU: emoji styles prepared from tarballs (no network), a base trained on
other styles and a same-domain control, fine-tunes on the target style, each evaluated with self, base, the other
base (a model it did not start from) and the checked prior (and the broad base's distilled arm with its one pass),
then the report."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from emoji_fixture import build_tarballs
from priorlab.analysis.results import load_results
from priorlab.evaluation.generation import eval_labels_seeds, proportional_labels
from priorlab.overrides import override
from priorlab.study.bases import study_bases
from priorlab.study.spec import load_experiment, preset_overrides


def test_proportional_labels_follow_the_counts_in_every_prefix():
    counts = torch.tensor([85, 360, 169, 0])
    labels = proportional_labels(counts, 1000)
    got = torch.bincount(labels, minlength=4)
    share = counts / counts.sum()
    assert (got - 1000 * share).abs().max() <= 1 and got[3] == 0
    for n in (10, 100, 333):  # a prefix (the check's samples) keeps the proportions too
        assert (torch.bincount(labels[:n], minlength=4) - n * share).abs().max() <= 1
    uniform, _ = eval_labels_seeds(10, 3, 0)
    assert uniform.tolist() == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    data, seeds = eval_labels_seeds(6, 3, 0, torch.tensor([0, 0, 0, 0, 1, 2]))
    assert sorted(data.tolist()) == [0, 0, 0, 0, 1, 2] and len(seeds) == 6


def test_each_base_is_the_other_bases_prior_with_the_same_base_seed(tmp_path):
    spec = load_experiment("paper_setting")
    parts = preset_overrides(spec, "gpu")
    assert parts["primary_scale"] == 1.5 and parts["main"] == {"base_name": ["broad"]}
    bases = {b.label: b for b in study_bases(tmp_path / "paper_setting", [], parts)}
    assert sorted(bases) == ["broad_seed=0", "broad_seed=1", "same_seed=0", "same_seed=1"]
    other = [o for o in bases["broad_seed=1"].finetune if o.startswith("+extra_priors.other=")]
    assert other == [override("+extra_priors.other", tmp_path / "paper_setting/base/same/seed=1")]
    broad = override("+extra_priors.other", tmp_path / "paper_setting/base/broad/seed=0")
    assert broad in bases["same_seed=0"].finetune
    assert "data.styles=[google,openmoji,fluent]" in bases["broad_seed=0"].base


def test_a_base_prior_must_name_another_base():
    from priorlab.errors import UserError
    from priorlab.study.spec import check_bases

    with pytest.raises(UserError, match="other bases of the preset \\(b\\)"):
        check_bases({"a": {"priors": {"other": "a"}}, "b": {}}, "here")
    with pytest.raises(UserError, match="must start with a letter"):
        check_bases({"a": {"priors": {"self": "b"}}, "b": {}}, "here")


def test_the_tiny_preset_runs_from_tarballs_to_report(tmp_path):
    tarballs = build_tarballs(tmp_path / "tarballs")
    data = tmp_path / "emoji"
    prep = run_cli("data", "emoji", "styles=[google,twitter,openmoji]", "size=8", f"out={data}",
                   f"tarballs={tarballs}", cwd=tmp_path)  # fmt: skip
    assert prep.returncode == 0, prep.stderr
    done = run_cli("study", "paper_setting", "preset=tiny", f"data.root={data}", f"paths.runs={tmp_path / 'runs'}",
                   cwd=tmp_path, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    study = tmp_path / "runs" / "paper_setting"
    record = json.loads((study / "study.json").read_text())
    assert record["primary_scale"] == 1.5 and record["main"] == {"base_name": ["broad"]}
    frame = load_results(study)
    assert set(frame["base_name"]) == {"broad", "same"}
    fd = frame[(frame["metric"] == "fd") & (frame["guidance_scale"] == 1.5)]
    # the distilled arm (broad only) is evaluated with its one pass too; the plain fine-tunes are not
    assert set(fd.loc[fd["distill"] == "None", "prior"]) == {"self", "base", "other", "checked"}
    assert set(fd.loc[fd["distill"] == "3.0", "prior"]) == {"self", "base", "other", "checked", "distilled"}
    assert set(fd.loc[fd["distill"] == "3.0", "base_name"]) == {"broad"}
    for name, other in (("broad", "same"), ("same", "broad")):  # each base's fine-tunes used the other base
        config = (study / "finetune" / f"base={name}" / "distill=None" / "p=0.1" / "seed=0" / "config.yaml").read_text()
        assert f"other: {study}/base/{other}" in config
    report = (study / "report.md").read_text()
    assert (
        "## Validity" in report and "The extra prior `other`" in report and "The one-pass prior `distilled`" in report
    )


def _every_preset():
    from priorlab.study.spec import EXPERIMENTS_DIR

    return [
        (p.stem, name) for p in sorted(EXPERIMENTS_DIR.glob("*.yaml")) for name in load_experiment(p.stem)["presets"]
    ]


@pytest.mark.parametrize("experiment, preset", _every_preset())
def test_every_preset_of_every_experiment_composes(experiment, preset, compose_tmp, capsys, tmp_path, monkeypatch):
    """A dry run composes each base's and first fine-tune's training config, so a setting that no config takes, a
    base prior naming no base or a malformed sweep is caught here, not on a lent GPU. A base given by `path` (a
    model trained elsewhere, relative to the working folder) is a tiny exported DiT here."""
    from priorlab.study.run import run_study

    monkeypatch.chdir(tmp_path)
    for entry in (load_experiment(experiment)["presets"][preset].get("bases") or {}).values():
        if isinstance(entry, dict) and entry.get("path"):
            _exported_dit(tmp_path / entry["path"])
    run_study(compose_tmp([f"name={experiment}", f"preset={preset}", "dry_run=true"], config_name="study"))
    out = capsys.readouterr().out
    assert f"study {experiment}, preset {preset}" in out and "finetunes" in out


def _exported_dit(out) -> None:
    """A tiny priorlab DiT of the emoji categories' shape (3 × 16 × 16), exported as `priorlab export` writes it."""
    from diffusers import DDPMScheduler

    from priorlab.models import dit, save_denoiser
    from priorlab.pipelines.export import export_pipeline

    model = dit((3, 16, 16), 9, num_layers=1, attention_head_dim=8)
    export_pipeline(save_denoiser(model, DDPMScheduler(), out.parent / "model"), out)

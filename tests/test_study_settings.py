"""`priorlab study NAME key=value ...`: the command line's settings over the preset's, refused where unknown."""

import threading

import pytest

from conftest import run_cli
from priorlab.errors import UserError
from priorlab.overrides import rewrite_overrides
from priorlab.study.progress import StudyProgress, duration
from priorlab.study.run import run_study
from priorlab.study.settings import merge_sweep, route_study_args


def _dry_run(compose_tmp, capsys, *args: str) -> str:
    """The dry run of `priorlab study dropout_vs_prior preset=tiny ARGS`, in this process."""
    cfg = compose_tmp(
        route_study_args(rewrite_overrides("study", ["dropout_vs_prior", "preset=tiny", "dry_run=true", *args])),
        "study",
    )
    run_study(cfg)
    return capsys.readouterr().out


def test_the_study_keeps_its_own_settings_and_collects_those_of_every_run():
    args = ["preset=tiny", "data=hf", "data.source=my dir", "sweep.cond_dropout=[0,0.1]", "+sweep.x=[1]",
            "base_steps=5", "paths.runs=out", "--cfg", "+callbacks.x._target_=a.B"]  # fmt: skip
    routed = ["overrides=['data=hf','data.source=my dir','+callbacks.x._target_=a.B']"]
    assert route_study_args(args) == ["preset=tiny", "++sweep.cond_dropout=[0,0.1]", "+sweep.x=[1]", "base_steps=5",
                                      "paths.runs=out", "--cfg", *routed]  # fmt: skip


def test_a_folder_of_experiments_named_by_a_number_is_a_folder(compose_tmp, capsys):
    """experiments=2024 is the folder 2024, not the number (the fuzz found a TypeError)."""
    with pytest.raises(UserError, match="looked for 2024/dropout_vs_prior.yaml"):
        _dry_run(compose_tmp, capsys, "experiments=2024")


def test_command_line_settings_win_over_the_preset(compose_tmp, capsys):
    """tiny: toy2d, an MLP, 10 base and 6 fine-tune steps, cond_dropout [0, 0.2] × seed [0, 1]."""
    out = _dry_run(compose_tmp, capsys, "data=digits", "model=unet_tiny", "sweep.cond_dropout=[0.1]",
                   "sweep.seed=[3]", "base_steps=7", "finetune_steps=3", "eval.num_steps=2")  # fmt: skip
    assert "data:       digits (" in out and "model:      unet_tiny (" in out
    assert "bases:      1 of trainer.max_steps=7" in out
    assert "fine-tunes: 1 of trainer.max_steps=3: cond_dropout=[0.1] × seed=[3]" in out
    # the MLP's and toy2d's settings have no place in unet_tiny and digits: left out, and said so
    assert "left out:   model.hidden=32, model.depth=2, data.num_samples=512" in out
    base, finetunes = [line for line in out.splitlines() if line.startswith(("base:", "finetunes:"))]
    assert "model.hidden" not in base
    assert base.endswith("data=digits model=unet_tiny eval.num_steps=2 trainer.max_steps=7")
    assert "cond_dropout=0.1 seed=3" in finetunes and "trainer.max_steps=3" in finetunes
    assert "data.batch_size=64" in base  # the preset's setting that digits also has is kept


def test_a_sweep_axis_is_replaced_added_or_dropped():
    preset = {"data.train_per_class": [5, "all"], "cond_dropout": [0.0, 0.2], "seed": [0, 1]}
    merged = merge_sweep(preset, {"cond_dropout": [0.1], "optimizer.lr": [1e-3, 1e-4]})
    assert list(merged) == ["data.train_per_class", "optimizer.lr", "cond_dropout", "seed"]  # new axes before p, seed
    assert merged["cond_dropout"] == [0.1] and merged["optimizer.lr"] == [1e-3, 1e-4] and merged["seed"] == [0, 1]
    assert merge_sweep(preset, {"data.train_per_class": None}) == {"cond_dropout": [0.0, 0.2], "seed": [0, 1]}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.sorce=x"], "data.sorce is not a setting of `priorlab train`.*its own settings \\(name, preset, sweep"),
        (["seed=3"], "seed is set by the study for each run; give its values as sweep.seed"),
        (["cond_dropout=0.1"], "give its values as sweep.cond_dropout"),
        (["base=runs/x"], "base is set by the study for each run; leave it out"),
        (["sweep.cond_dropout=[]"], "sweep.cond_dropout=\\[\\] has no values"),
        (["sweep.seed=null"], "sweep.seed cannot be removed"),
        (["base_steps=0"], "base_steps=0 must be a whole number of steps"),
        (["sweep.seed=[0]", "base_seeds=[0,1]"], "2 base_seeds for 1 fine-tune seeds"),
    ],
)
def test_settings_the_study_cannot_use_are_refused(compose_tmp, capsys, args, message):
    with pytest.raises(UserError, match=message):
        _dry_run(compose_tmp, capsys, *args)


def test_an_unknown_setting_ends_in_one_line_naming_the_study_keys(tmp_path):
    out = run_cli("study", "dropout_vs_prior", "preset=tiny", "model.hiden=3", "dry_run=true", cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert out.stderr.startswith("priorlab: error: model.hiden is not a setting of `priorlab train`; did you mean "
                                 "model.hidden?")  # fmt: skip
    assert "sweep, base_steps, finetune_steps" in out.stderr and not (tmp_path / "runs").exists()


def test_study_progress_says_k_of_n_with_the_time_left(tmp_path, capsys, monkeypatch):
    """On a clock that the test sets: 70 s after the study's start a session begins, one fine-tune finishes 30 s into
    it (seen by the watcher's own thread while the body runs), the last 50 s into a second stretch of fine-tunes."""
    import priorlab.study.progress as study_progress

    root = tmp_path / "finetune"
    (root / "p=0.0/seed=0").mkdir(parents=True)
    (root / "p=0.0/seed=0/done.json").write_text("{}")  # finished in an earlier session
    now, shown, show = [1000.0], threading.Event(), study_progress._show
    monkeypatch.setattr(study_progress, "_show", lambda line: show(line) or shown.set())
    progress = StudyProgress("s", root, total=3, started=now[0] - 70, every_s=0.01, clock=lambda: now[0])

    def finish(run: str) -> None:
        (root / run).mkdir(parents=True)
        (root / run / "done.json").write_text("{}")

    with progress.watching():
        now[0] += 30
        finish("p=0.1/seed=0")
        assert shown.wait(timeout=60)  # printed by the polling thread, before the body ends
    now[0] += 40  # between the stretches (the evaluation, say): no fine-tune runs, none is timed
    with progress.watching():
        now[0] += 50
        finish("p=0.1/seed=1")  # seen by the thread or by the poll at the end
    lines = [line for line in capsys.readouterr().out.splitlines() if line]  # each line starts with a \r
    assert lines == ["[study s] 1 of 3 fine-tunes done already",
                     "[study s] fine-tune 2 of 3 done (p=0.1, seed=0) · 1m40s elapsed · about 30s left",
                     "[study s] fine-tune 3 of 3 done (p=0.1, seed=1) · 3m10s elapsed"]  # fmt: skip
    assert progress.busy == 30 + 50


def test_durations_read_as_people_say_them():
    assert [duration(s) for s in (0.4, 45, 130, 3599, 3900)] == ["0s", "45s", "2m10s", "59m59s", "1h05m"]


def test_a_study_without_a_preset_runs_the_experiments_default():
    """`priorlab study NAME` with no preset=: the experiment's `default_preset`, else `quick`, else a one-line error
    naming the presets (when_swap_pays has no `quick`: it failed before it declared its default)."""
    from priorlab.study.spec import chosen_preset, load_experiment

    assert chosen_preset(load_experiment("when_swap_pays"), None) == "quick_toy2d"
    assert chosen_preset(load_experiment("paper_setting"), None) == "cpu"
    assert chosen_preset(load_experiment("dropout_vs_prior"), None) == "quick"
    assert chosen_preset(load_experiment("when_swap_pays"), "tiny") == "tiny"
    for name in ("cheap_prior", "dropout_vs_prior", "paper_setting", "when_swap_pays"):
        spec = load_experiment(name)
        assert chosen_preset(spec, None) in spec["presets"]
    with pytest.raises(UserError, match="experiment x has no default preset; choose one with preset=NAME: a, b"):
        chosen_preset({"name": "x", "presets": {"a": {}, "b": {}}}, None)

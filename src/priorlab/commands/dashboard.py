"""`priorlab dashboard NAME`: a self-contained HTML dashboard of the study in its folder (always, from its
results.csv), and online a W&B workspace with the study's panels; offline it says how to sync the runs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from priorlab.analysis.html import CHART_METRICS, DRIFT_KEYS
from priorlab.errors import UserError
from priorlab.keys import BASE, SELF, key, row_parts
from priorlab.loggers import wandb_mode

DEFAULT_SCALES = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # a study without results.csv yet


TRAINING_KEYS = ("train/loss", "val/loss_cond", "val/loss_uncond")  # `training.module` logs them
STEP = "trainer/global_step"  # the x axis: Lightning logs the training step with each row (W&B's own Step counts rows)


def panel_spec(scales: list[float], priors: tuple[str, ...] = (SELF, BASE),
               metrics: tuple[str, ...] = CHART_METRICS) -> dict[str, list[str]]:  # fmt: skip
    """The workspace sections and the metric keys plotted in each (one line plot per key, grouped by dropout): the
    keys of the HTML dashboard's charts (`analysis.html`: each metric per prior and scale, the drift), then the
    base's loss, the unconditional samples and training."""
    spec = {f"{m} per guidance scale": [key("cond", m, prior=p, scale=w) for w in scales for p in priors]
            for m in metrics}  # fmt: skip
    spec["Drift of the unconditional branch"] = [*DRIFT_KEYS, key("prior", "loss", model=BASE, bucket="all")]
    spec["Unconditional samples"] = [key("uncond", "fd", model=SELF), key("uncond", "fd", model=BASE)]
    spec["Training"] = list(TRAINING_KEYS)
    return spec


def study_panels(cfg: DictConfig, study_dir: Path) -> dict[str, list[str]]:
    """`panel_spec` of the study: its scales, priors and metrics from its results.csv where it has one (the scales
    of `guidance_scales=` where given), a panel for each key its runs logged; else `guidance_scales` and the default
    priors and metrics."""
    scales = list(cfg.guidance_scales) if cfg.get("guidance_scales") else None
    if not (study_dir / "results.csv").exists():
        return panel_spec(scales or list(DEFAULT_SCALES))
    from priorlab.analysis.results import final_rows, load_results

    final = final_rows(load_results(study_dir))
    guided = final[final["guidance_scale"].notna() & (final["prior"] != "") & final["metric"].isin(CHART_METRICS)]
    priors = tuple(sorted(guided["prior"].unique(), key=lambda p: (p not in (SELF, BASE), p != SELF, p)))
    metrics = tuple(m for m in CHART_METRICS if m in set(guided["metric"]))
    spec = panel_spec(scales or sorted(guided["guidance_scale"].unique().tolist()), priors, metrics)
    held = set(zip(guided["metric"], guided["prior"], guided["guidance_scale"], strict=True))
    for m in metrics:  # a metric measured for some priors only (toy2d's ideal_mse has no exact prior)
        spec[f"{m} per guidance scale"] = [k for k in spec[f"{m} per guidance scale"] if row_parts(k) in held]
    return spec


def build_workspace(cfg: DictConfig, ws, wr, panels: dict[str, list[str]] | None = None):
    """The W&B workspace of the study (not saved): one section per `panel_spec` entry, a line plot per key against
    the training step."""
    panels = panels or panel_spec(list(cfg.guidance_scales or DEFAULT_SCALES))
    sections = [ws.Section(name=title, panels=[wr.LinePlot(x=STEP, y=[k]) for k in keys], is_open=True)
                for title, keys in panels.items()]  # fmt: skip
    return ws.Workspace(entity=cfg.entity, project=cfg.project, name=f"priorlab {cfg.name}", sections=sections)


def offline_runs(study_dir: Path) -> list[Path]:
    return sorted(study_dir.glob("**/wandb/offline-run-*"))


def print_offline(cfg: DictConfig, study_dir: Path, offline: list[Path]) -> None:
    """How to sync the study's offline runs, and how many of the workspace's panels their metrics would fill."""
    import shlex

    from priorlab.analysis.wandb_runs import read_offline_run

    print(f"W&B is offline here, so no W&B workspace is built; {len(offline)} offline run(s) of {cfg.name} to sync:")
    print("  wandb login")
    if offline:  # a study's runs share <study>/wandb; runs of older versions have a wandb/ folder each
        print(f"  wandb sync {' '.join(shlex.quote(str(p)) for p in sorted({p.parent for p in offline}))}")
    print(f"  priorlab dashboard {cfg.name}")
    runs = [read_offline_run(p) for p in offline if any(p.glob("run-*.wandb"))]
    if runs:
        logged = set().union(*(run.summary for run in runs))
        keys = [k for keys in study_panels(cfg, study_dir).values() for k in keys]
        missing = [k for k in keys if k not in logged]
        print(f"the workspace's {len(keys)} panels: {len(keys) - len(missing)} have data in these runs"
              + (f"; {len(missing)} have none (e.g. {missing[0]})" if missing else ""))  # fmt: skip


def dashboard(cfg: DictConfig) -> None:
    study_dir = Path(cfg.paths.runs) / cfg.name
    if not study_dir.exists():
        raise UserError(f"{study_dir} does not exist; run `priorlab study {cfg.name}` first")
    offline = offline_runs(study_dir)
    if (study_dir / "results.csv").exists():
        from priorlab.analysis.html import write_dashboard

        print(f"wrote {write_dashboard(study_dir)} (open it in a browser; it needs no network)")
    else:
        print(f"no {study_dir / 'results.csv'} yet, so no HTML dashboard; it is written when the study has results")
    if wandb_mode() != "online":
        print_offline(cfg, study_dir, offline)
        return
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise UserError("the dashboard needs wandb-workspaces: pip install wandb-workspaces") from err
    workspace = build_workspace(cfg, ws, wr, study_panels(cfg, study_dir))
    try:
        workspace.save()
    except Exception as err:  # network or permission problems: the user needs W&B's words
        raise UserError(f"W&B refused the workspace: {err}") from err
    print(f"dashboard for {cfg.name}: {workspace.url} (runs grouped by W&B group {cfg.name!r})")


main = dashboard  # the command's entry point (`priorlab.cli`)

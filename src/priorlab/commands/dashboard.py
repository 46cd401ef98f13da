"""`priorlab dashboard NAME`: a self-contained HTML dashboard of the study in its folder (always, from its
results.csv), and online a W&B workspace with the study's panels; offline it says how to sync the runs."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from priorlab.errors import UserError
from priorlab.keys import key
from priorlab.loggers import wandb_mode


def panel_spec(scales: list[float], priors: tuple[str, ...] = ("self", "base")) -> dict[str, list[str]]:
    """The workspace sections and the metric keys plotted in each (one line plot per key, grouped by dropout)."""
    return {
        "(a) FD per guidance scale": [key("cond", "fd", prior=p, scale=w) for w in scales for p in priors],
        "Accuracy and precision/recall": [
            key("cond", m, prior=p, scale=w)
            for m in ("accuracy", "precision", "recall")
            for w in scales
            for p in priors
        ],
        "(c) Drift of the unconditional branch": [
            key("prior", "disagreement", bucket="all"),
            key("prior", "loss", model="self", bucket="all"),
            key("prior", "loss", model="base", bucket="all"),
        ],  # fmt: skip
        "Unconditional samples": [key("uncond", "fd", model="self"), key("uncond", "fd", model="base")],
        "Training": ["train/loss", "val/loss_cond", "val/loss_uncond"],
    }


def build_workspace(cfg: DictConfig, ws, wr):
    """The W&B workspace of the study (not saved): one section per `panel_spec` entry, a line plot per key."""
    sections = [ws.Section(name=title, panels=[wr.LinePlot(x="Step", y=[k]) for k in keys], is_open=True)
                for title, keys in panel_spec(list(cfg.guidance_scales)).items()]  # fmt: skip
    return ws.Workspace(entity=cfg.entity, project=cfg.project, name=f"priorlab {cfg.name}", sections=sections)


def offline_runs(study_dir: Path) -> list[Path]:
    return sorted(study_dir.glob("**/wandb/offline-run-*"))


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
        print(
            f"W&B is offline here, so no W&B workspace is built; {len(offline)} offline run(s) of {cfg.name} to sync:"
        )
        print("  wandb login")
        if offline:
            print(f"  wandb sync {' '.join(str(p) for p in offline)}")
        print(f"  priorlab dashboard {cfg.name}")
        return
    try:
        import wandb_workspaces.reports.v2 as wr
        import wandb_workspaces.workspaces as ws
    except ImportError as err:
        raise UserError("the dashboard needs wandb-workspaces: pip install wandb-workspaces") from err
    workspace = build_workspace(cfg, ws, wr)
    try:
        workspace.save()
    except Exception as err:  # network or permission problems: the user needs W&B's words
        raise UserError(f"W&B refused the workspace: {err}") from err
    print(f"dashboard for {cfg.name}: {workspace.url} (runs grouped by W&B group {cfg.name!r})")


main = dashboard  # the command's entry point (`priorlab.cli`)

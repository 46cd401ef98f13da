"""Logger construction: W&B runs offline unless the user is logged in (WANDB_MODE wins when set); a CSV logger
whose metrics.csv survives a resume."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


def wandb_logged_in() -> bool:
    """True when an API key is in WANDB_API_KEY or in ~/.netrc for the W&B host (no network used)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].rstrip("/")
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_mode() -> str:
    """ "online", "offline" or "disabled": WANDB_MODE if set, else online only for a logged-in user."""
    return os.environ.get("WANDB_MODE") or ("online" if wandb_logged_in() else "offline")


def wandb_logger(save_dir: str, project: str, group: str, name: str, **kwargs) -> WandbLogger:
    """A WandbLogger writing under `save_dir`/wandb in the mode chosen by `wandb_mode()`."""
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    mode = wandb_mode()
    return WandbLogger(
        save_dir=save_dir,
        project=project,
        group=group,
        name=name,
        offline=mode == "offline",
        mode=mode,
        **kwargs,
    )


class _ContinuingWriter(ExperimentWriter):
    """Lightning's CSV writer, continuing an earlier session's metrics.csv instead of deleting it.

    Lightning's writer deletes metrics.csv whenever its folder is not empty, which it always is when a run
    resumes, so a resumed run lost the loss curve before the resume (and with it the base's convergence check).
    Here the first save of a session keeps the earlier rows logged before this session's first step and drops
    those at or after it (logged after the checkpoint the run resumed from, then logged again), and adopts their
    header; a run started from scratch in the folder thus starts a fresh file.
    """

    def _check_log_dir_exists(self) -> None:  # Lightning's warns and deletes metrics.csv (lightning_private)
        pass

    def save(self) -> None:
        if self.metrics and not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            first = min(row["step"] for row in self.metrics)
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                reader = csv.DictReader(file)
                header, rows = list(reader.fieldnames or []), list(reader)
            kept = [row for row in rows if row.get("step") not in (None, "") and float(row["step"]) < first]
            tmp = f"{self.metrics_file_path}.tmp"  # rewritten beside it, then renamed: a kill keeps one whole file
            with self._fs.open(tmp, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=header)
                writer.writeheader()
                writer.writerows(kept)
            self._fs.mv(tmp, self.metrics_file_path)
            self.metrics_keys.extend(sorted(set(header) - {""}))
        super().save()


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger whose metrics.csv survives a resume (`_ContinuingWriter`)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment

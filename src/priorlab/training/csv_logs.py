"""Lightning's CSVLogger whose metrics.csv survives a resume (named in the configs as `priorlab.loggers.CSVLogger`)."""

from __future__ import annotations

import csv

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


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

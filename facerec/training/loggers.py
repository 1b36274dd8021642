"""Loggers. W&B never reaches the network unless the user asks for it; CSV logs survive resumes."""
from __future__ import annotations

import csv
import logging
import netrc
import os
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

log = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")
STEP_AXIS = "trainer/global_step"  # Lightning's x axis for every metric it logs to W&B


def wandb_key_configured() -> bool:
    """True if a W&B API key is in the environment or in ~/.netrc for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def wandb_logger(mode: str = "offline", **kwargs):
    """A WandbLogger (below) in `mode` (offline by default: runs are written under
    save_dir and can be uploaded later with `wandb sync`)."""
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not wandb_key_configured():
        raise ValueError(
            "logger.wandb.mode=online needs a W&B API key (run `wandb login` or set WANDB_API_KEY). "
            "Without one, keep mode=offline and upload later with `wandb sync <run dir>/wandb/offline-run-*`."
        )
    return WandbLogger(mode=mode, **kwargs)


class WandbLogger(LightningWandbLogger):
    """Lightning's WandbLogger plus metric definitions, so the runs of a sweep line up in W&B.

    define_metrics: metric name or `prefix/*` glob -> W&B summary ("max,last", "min", ...),
    applied with `wandb.define_metric` when the run starts. Every run of a sweep then reports the
    same summaries (e.g. best and final held-out accuracy) against the same step axis, so the
    s = 30 and auto panels line up. The run still starts lazily, on rank 0 only.
    """

    def __init__(self, *args, define_metrics: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.define_metrics = dict(define_metrics or {})

    @property
    def experiment(self):
        starting = self._experiment is None
        experiment = super().experiment
        if starting and self._experiment is not None:  # the run was created just now
            for name, summary in self.define_metrics.items():
                experiment.define_metric(name, step_metric=STEP_AXIS, summary=summary)
        return experiment


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run appends to it instead. The
    steps after the checkpoint it resumed from were logged by the interrupted run and are run (and
    logged) again: at the first save, the earlier rows from the first step logged now onwards are
    dropped, the file rewritten atomically, so every step appears once."""

    def _check_log_dir_exists(self) -> None:
        self._reopened = self._fs.isfile(self.metrics_file_path)
        if self._reopened:
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])

    def save(self) -> None:
        if self._reopened and self.metrics:
            self._reopened = False
            self._drop_rows_from(min(int(row["step"]) for row in self.metrics))
        super().save()

    def _drop_rows_from(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as file:
            rows = list(csv.DictReader(file))
        kept = [row for row in rows if row.get("step") in (None, "") or int(float(row["step"])) < step]
        if len(kept) == len(rows):
            return
        partial = f"{self.metrics_file_path}.partial"
        with self._fs.open(partial, "w", newline="") as file:
            writer = csv.DictWriter(file, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(kept)
        self._fs.mv(partial, self.metrics_file_path)  # a rename: the old file or the new one, never half of either
        log.info(
            "%s: dropped %d rows of steps >= %d, logged before the resume and logged again now",
            self.metrics_file_path, len(rows) - len(kept), step,
        )


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, but a run resumed in its own directory keeps its earlier rows (each step
    once: see _AppendingWriter)."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

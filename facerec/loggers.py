"""Loggers. W&B never reaches the network unless the user asks for it; CSV logs survive resumes."""
from __future__ import annotations

import csv
import netrc
import os
from urllib.parse import urlparse

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

WANDB_MODES = ("offline", "online", "disabled")


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
    """A Lightning WandbLogger in `mode` (offline by default: runs are written under
    save_dir and can be uploaded later with `wandb sync`)."""
    from lightning.pytorch.loggers import WandbLogger

    if mode not in WANDB_MODES:
        raise ValueError(f"logger.wandb.mode must be one of {WANDB_MODES}, got {mode!r}")
    if mode == "online" and not wandb_key_configured():
        raise ValueError(
            "logger.wandb.mode=online needs a W&B API key (run `wandb login` or set WANDB_API_KEY). "
            "Without one, keep mode=offline and upload later with `wandb sync <run dir>/wandb/offline-run-*`."
        )
    return WandbLogger(mode=mode, **kwargs)


class _AppendingWriter(ExperimentWriter):
    """Lightning's writer deletes an existing metrics.csv; a resumed run must append to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys = list(csv.DictReader(file).fieldnames or [])


class CSVLogger(LightningCSVLogger):
    """Lightning's CSVLogger, but a run resumed in its own directory keeps its earlier rows."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment

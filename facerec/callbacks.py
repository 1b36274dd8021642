"""Training callbacks: a checkpoint on preemption."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facerec.checkpoints import LAST

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (or SIGUSR1, SLURM's warning before a time limit) save `last.ckpt` at the end of
    the current batch and stop cleanly; `python train.py ckpt_path=last` then resumes exactly.

    Lightning turns SIGTERM into a SIGTERMException at the end of a batch; SIGUSR1 is handled
    the same way here unless Lightning's SLURM auto-requeue owns it (it then saves its own
    hpc checkpoint and requeues the job).
    """

    def __init__(self, dirpath: str | Path, signals: tuple[str, ...] = ("SIGUSR1",)):
        self.path = Path(dirpath) / LAST
        self.signals = [getattr(signal, name) for name in signals]
        self.requested = False
        self._saved_at_step: int | None = None

    def _request(self, signum, frame) -> None:
        log.info("received %s: saving a checkpoint at the end of this batch", signal.Signals(signum).name)
        self.requested = True

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum in self.signals:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.SIG_IGN, None):
                signal.signal(signum, self._request)

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self._saved_at_step = trainer.global_step
            log.info("preemption checkpoint written: %s (step %d)", self.path, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        if trainer.received_sigterm or self.requested:
            self._save(trainer)
            if self.requested and not trainer.received_sigterm:
                raise SIGTERMException()  # stop like SIGTERM: Lightning exits cleanly

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM that arrived after this batch's on_train_batch_end: save at the batch boundary.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)

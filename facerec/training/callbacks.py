"""Training callbacks: a checkpoint on preemption (and a SLURM requeue)."""
from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facerec import distributed
from facerec.training.checkpoints import LAST
from facerec.training.cluster import requeue_slurm_job

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (or SIGUSR1, SLURM's warning before a time limit) save `last.ckpt` at the end of
    the current batch and stop cleanly; `python train.py ckpt_path=last` then resumes exactly.

    Lightning turns SIGTERM into a SIGTERMException at the end of a batch; SIGUSR1 is handled
    the same way here. This handler is installed before Lightning's, so it also stands in for
    Lightning's SLURM auto-requeue (which would save from inside the signal handler, mid-step):
    in a SLURM job whose SLURMEnvironment has `auto_requeue` (the default), rank 0 requeues the
    job after the checkpoint is written; the job restarts in the same run dir and resumes from it.
    Under DDP the ranks agree on the batch at which they stop (one all-reduce of two flags).
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
        sigterm, requested = _on_any_rank(trainer, trainer.received_sigterm, self.requested)
        if not (sigterm or requested):
            return
        self._save(trainer)
        if requested and trainer.is_global_zero and _requeues(trainer):
            requeue_slurm_job()
        if not trainer.received_sigterm:
            raise SIGTERMException()  # stop like SIGTERM (received here or on another rank): a clean exit

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM that arrived after this batch's on_train_batch_end: save at the batch boundary.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)


def _on_any_rank(trainer: L.Trainer, *flags: bool) -> list[bool]:
    """Each flag or-ed over the ranks: signals reach the ranks at slightly different times, and a
    checkpoint is a collective, so every rank must save (and stop) after the same batch."""
    if trainer.world_size == 1:
        return list(flags)
    return distributed.any_rank(torch.tensor(flags, device=trainer.strategy.root_device)).tolist()


def _requeues(trainer: L.Trainer) -> bool:
    # the environment Lightning's own signal handling reads (a single-device strategy has none of its own)
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue

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
    """On SIGTERM (or SIGUSR1, SLURM's warning before a time limit) save `last.ckpt` at the end of a
    batch and stop cleanly; `python train.py ckpt_path=last` then resumes exactly.

    While training runs this callback owns both signals: its handler only notes the signal (and, on
    the first SIGTERM, passes it on to the processes Lightning's launcher started, as Lightning's own
    handler does). In a single process the note is acted on at the end of the batch. Under DDP the
    ranks act on it together: signals reach them at different times and a checkpoint is a collective,
    so every `check_every_n_steps` steps one all-reduce of the flags (a host sync) tells every rank
    whether any of them was signalled, and all save and stop after that same batch (always one that
    ends an optimizer step: with gradient accumulation, never mid-step). This replaces
    Lightning's own per-batch broadcast of rank 0's SIGTERM flag, a host sync on every step, and its
    rank-local stop, which would leave a rank that was signalled alone at another batch than the rest.

    Requeueing: in a SLURM job whose SLURMEnvironment has `auto_requeue` (the default), rank 0
    requeues the job after a SIGUSR1's checkpoint is written; the job restarts in the same run dir
    and resumes from it (this stands in for Lightning's auto-requeue, which saves from inside the
    signal handler, mid-step).
    """

    def __init__(self, dirpath: str | Path, signals: tuple[str, ...] = ("SIGUSR1",), check_every_n_steps: int = 10):
        if check_every_n_steps < 1:
            raise ValueError(f"callbacks.preemption.check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.path = Path(dirpath) / LAST
        self.requeue_signals = [getattr(signal, name) for name in signals]
        self.check_every_n_steps = int(check_every_n_steps)
        self.received: set[int] = set()
        self._trainer: L.Trainer | None = None
        self._saved_at_step: int | None = None
        self._checked_at_step: int | None = None

    def _note(self, signum, frame) -> None:
        first_sigterm = signum == signal.SIGTERM and signal.SIGTERM not in self.received
        self.received.add(signum)
        log.info("received %s: saving a checkpoint and stopping at the end of a batch", signal.Signals(signum).name)
        launcher = self._trainer.strategy.launcher if self._trainer is not None else None
        if first_sigterm and launcher is not None:
            launcher.kill(signum)  # the ranks this process started get it too

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Before Lightning registers its handlers: it then leaves a requeue signal that has one alone.
        for signum in self.requeue_signals:
            if signal.getsignal(signum) in (signal.SIG_DFL, signal.SIG_IGN, None):
                signal.signal(signum, self._note)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's handlers are registered (it restores the original ones when fit ends).
        self._trainer = trainer
        signal.signal(signal.SIGTERM, self._note)
        epoch_loop = trainer.fit_loop.epoch_loop
        if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
            epoch_loop._broadcast_sigterm_tensor = lambda: None  # replaced by this callback's agreed check

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self._saved_at_step = trainer.global_step
            log.info("preemption checkpoint written: %s (step %d)", self.path, trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        # Only after an optimizer step (a stop mid-accumulation would lose the gradients gathered so
        # far), and under DDP every N of them: global_step is the same on every rank.
        step = trainer.global_step
        if step == self._checked_at_step or (trainer.world_size > 1 and step % self.check_every_n_steps):
            return
        self._checked_at_step = step
        stop, requeue = _on_any_rank(trainer, bool(self.received), bool(self.received & set(self.requeue_signals)))
        if not stop:
            return
        self._save(trainer)
        if requeue and trainer.is_global_zero and _requeues(trainer):
            requeue_slurm_job()
        connector = getattr(trainer, "_signal_connector", None)
        if connector is None:
            raise SIGTERMException()
        # Lightning's own SIGTERM stop, on every rank at once: it raises after this batch's metrics
        # are written (raising here would lose them), and a validation due now stops at its start.
        connector.received_sigterm = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # SIGTERM before training started (Lightning's own handler was in charge): save where it stopped.
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self._save(trainer)


def _on_any_rank(trainer: L.Trainer, *flags: bool) -> list[bool]:
    """Each flag or-ed over the ranks (one all-reduce and one host sync); no collective in one process."""
    if trainer.world_size == 1:
        return list(flags)
    # to the device without waiting for it (a copy from host memory queued on its stream), read once
    flags = torch.tensor(flags).to(trainer.strategy.root_device, non_blocking=True)
    return distributed.any_rank(flags).tolist()


def _requeues(trainer: L.Trainer) -> bool:
    # the environment Lightning's own signal handling reads (a single-device strategy has none of its own)
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue

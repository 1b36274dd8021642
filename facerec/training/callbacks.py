"""Training callbacks: the latest state for resuming (`last.ckpt`), a checkpoint on preemption (and a
SLURM requeue), an exponential moving average of the weights."""
from __future__ import annotations

import logging
import signal
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, EMAWeightAveraging
from lightning.pytorch.utilities.exceptions import SIGTERMException

from facerec import distributed, lightning_compat
from facerec.checkpoint_files import LAST
from facerec.cluster import requeue_slurm_job

log = logging.getLogger(__name__)


class LastCheckpoint(Checkpoint):
    """`last.ckpt`, the state `ckpt_path=last` resumes from: written at the end of every epoch, which
    includes the end of training whatever ended it (the epoch count, max_steps mid-epoch, a callback's
    stop: Lightning ends the epoch first), and every `every_n_train_steps` optimizer steps when that
    is set. PreemptionCheckpoint writes it on a signal. A state is written once: the end of an epoch
    that is also a multiple of N is one write.

    Lightning's ModelCheckpoint, given every_n_train_steps, stops saving at the end of epochs, so a
    finished run would resume into its last steps again. As a Checkpoint, this callback runs after
    the other callbacks at the end of an epoch (Lightning moves checkpoint callbacks last), so
    `last.ckpt` holds the best checkpoint's choice of that epoch.
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int | None = None):
        if every_n_train_steps is not None and every_n_train_steps < 1:
            raise ValueError(f"callbacks.last_checkpoint.every_n_train_steps must be >= 1 or null, got {every_n_train_steps}")
        self.path = Path(dirpath) / LAST
        self.every_n_train_steps = every_n_train_steps
        self._saved_at_step: int | None = None

    def _save(self, trainer: L.Trainer) -> None:
        if self._saved_at_step != trainer.global_step:
            trainer.save_checkpoint(self.path)
            self._saved_at_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, *args) -> None:
        # global_step counts optimizer steps: a micro-batch that ends none finds the step already saved
        if self.every_n_train_steps and trainer.global_step and trainer.global_step % self.every_n_train_steps == 0:
            self._save(trainer)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)


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
        lightning_compat.disable_sigterm_broadcast(trainer)  # replaced by this callback's agreed check

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
        if requeue and trainer.is_global_zero and lightning_compat.requeues_slurm_job(trainer):
            requeue_slurm_job()
        lightning_compat.stop_after_batch(trainer)  # Lightning's own SIGTERM stop, on every rank at once

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


class WeightEMA(EMAWeightAveraging):
    """An exponential moving average of the weights (`callbacks=ema`): Lightning's EMAWeightAveraging.

    What Lightning does: a deep copy of the whole LightningModule (torch's AveragedModel), updated
    after every optimizer step from `update_starting_at_step` on, every `update_every_n_steps`:
    average <- decay average + (1 - decay) weights, the first update a copy. Validation runs with
    the averaged tensors swapped in (so `val/...` and the `best` checkpoint's choice are the
    average's); a checkpoint's `state_dict` holds the average (so eval.py, facerec.export and
    model.weights read it) and the trained tensors go to `current_model_state`, the copy's update
    count to `averaging_state`: a resumed run continues training from the trained tensors and the
    average from its own. When fit ends the average replaces the trained tensors in the module.

    The copy covers the head too, each rank averaging its own class shard under Partial FC: the
    swaps pair the module's tensors with the copy's in order, so the copy mirrors the whole module;
    a checkpoint's `state_dict` is then one averaged model (the sharded head's rows gathered to rank
    0 like the trained ones), and a resumed run continues both exactly. Verification reads the
    backbone only; the head's copy costs one more set of its rows per rank. use_buffers=True: the
    floating-point buffers (BatchNorm statistics, the dynamic s, the margins' EMAs) are averaged
    with the weights, the integer ones (BatchNorm's batch counts, the skipped-step counters,
    ElasticFace's step) copied: an average of a count is no count.

    What this class adds to Lightning's:
    - a step the module skipped (a non-finite loss or gradient, a GradScaler overflow) is not
      averaged in: the model is as it was before the step, and so stays its average;
    - one multi-tensor lerp per update (torch's EMA multi_avg_fn, integer buffers copied) instead
      of one Python-level average per tensor (hundreds in an IResNet);
    - the copy moves to the module's device when fit starts: Lightning makes it in `setup`, before
      the strategy moves the module, and would otherwise keep a GPU run's average in host memory
      and copy every tensor there after each step (device="cpu" keeps it there on purpose);
    - a checkpoint written at the end of a step (the preemption checkpoint, LastCheckpoint's
      every_n_train_steps) holds that step's average whichever callback runs first: the update
      the step owes is made before this callback's state is saved.

    decay: the averaging horizon is about 1 / (1 - decay) optimizer steps; choose it as a small
    fraction of the run (0.999: 1,000 steps; a run of 888 steps wants ~0.99).

    Cost per update: one lerp over the module's tensors, and two reads of AveragedModel's update
    count on the host (torch's update_parameters: two host syncs on a GPU beside the step's one;
    update_every_n_steps=k makes them 2/k per step). Memory: one more copy of the module's tensors
    (under Partial FC, of this rank's rows).
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        use_buffers: bool = True,
        device: str | None = None,
    ):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must lie in [0, 1), got {decay}")
        if update_every_n_steps < 1:
            raise ValueError(f"callbacks.ema.update_every_n_steps must be >= 1, got {update_every_n_steps}")
        super().__init__(
            device=device,
            use_buffers=use_buffers,
            decay=decay,
            update_every_n_steps=update_every_n_steps,
            update_starting_at_step=update_starting_at_step,
        )
        self.decay = float(decay)
        self.on_module_device = device is None
        self._trainer: L.Trainer | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer
        with warnings.catch_warnings():
            # Lightning warns that configure_model's layers are not sharded in the copy. The module's
            # configure_model shards the head in place and only once (Lightning calls it again
            # later), so the copy made after it holds this rank's rows only.
            warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides the configure_model")
            super().setup(trainer, pl_module, stage)
        if self._average_model is not None:
            self._average_model.avg_fn, self._average_model.multi_avg_fn = None, ema_update(self.decay)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._average_model is not None and self.on_module_device:
            self._average_model.to(pl_module.device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:
        self._update_for_step(trainer, pl_module)

    def _update_for_step(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The update the last optimizer step owes, once per step (a micro-batch that ends no step
        owes none); a step the module skipped is passed over."""
        step = trainer.global_step
        if step > self._latest_update_step and self.should_update(step_idx=step - 1):
            if pl_module.last_step_taken:
                self._average_model.update_parameters(pl_module)
            self._latest_update_step = step

    def state_dict(self) -> dict:
        # Lightning reads this first when it writes a checkpoint, on every rank; between steps
        # (not while validation has the average swapped in), where the update may still be owed.
        trainer = self._trainer
        if trainer is not None and self._average_model is not None and trainer.training:
            self._update_for_step(trainer, trainer.lightning_module)
        return super().state_dict()


def ema_update(decay: float):
    """AveragedModel's multi_avg_fn: averaged += (1 - decay) (current - averaged) for floating-point
    tensors, a copy for integer ones; AveragedModel passes one device and dtype per call."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged) -> None:
        if averaged[0].is_floating_point():
            torch._foreach_lerp_(averaged, current, 1.0 - decay)
        else:
            torch._foreach_copy_(averaged, current)

    return update

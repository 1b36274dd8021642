"""The framework internals facerec reads, in one place: private members of Lightning's Trainer and
loops (and of torch's GradScaler, reached through Lightning's precision plugin) that no public API
offers. pyproject pins Lightning to the minor versions the test suite ran on; a new Lightning
release is checked against the functions here.

- whether Lightning writes the step's metrics (the heads' diagnostics are skipped otherwise);
- whether an optimizer step follows the current batch (gradient accumulation);
- how many batches of the epoch the loop has processed (an exact mid-epoch resume of the data);
- Lightning's per-batch SIGTERM broadcast, which the preemption callback replaces by its own agreed
  check, and Lightning's own stop after a batch;
- whether the cluster environment requeues a SLURM job;
- which of a GradScaler's gradients overflowed, per device.
"""
from __future__ import annotations

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes the metrics logged in this training step (`log_every_n_steps`)."""
    connector = getattr(trainer, "_logger_connector", None)
    return bool(getattr(connector, "should_update_logs", True))


def optimizer_steps_after_batch(trainer: L.Trainer) -> bool:
    """Whether the optimizer steps after the current training batch (the last micro-batch of an
    accumulated step, or the epoch's last batch)."""
    return not trainer.fit_loop._should_accumulate()


def batches_processed_in_epoch(trainer: L.Trainer) -> int:
    """Training batches the current epoch has processed (restored from a checkpoint on resume)."""
    return trainer.fit_loop.epoch_loop.batch_progress.current.processed


def disable_sigterm_broadcast(trainer: L.Trainer) -> None:
    """Turn off Lightning's broadcast of rank 0's SIGTERM flag before every batch (a host sync per step)."""
    epoch_loop = trainer.fit_loop.epoch_loop
    if hasattr(epoch_loop, "_broadcast_sigterm_tensor"):
        epoch_loop._broadcast_sigterm_tensor = lambda: None


def stop_after_batch(trainer: L.Trainer) -> None:
    """Lightning's own SIGTERM stop: it raises once this batch's metrics are written (raising at once
    would lose them), and a validation due now stops at its start."""
    connector = getattr(trainer, "_signal_connector", None)
    if connector is None:
        raise SIGTERMException()
    connector.received_sigterm = True


def requeues_slurm_job(trainer: L.Trainer) -> bool:
    """Whether the run's cluster environment is SLURM with Lightning's auto-requeue on (the environment
    Lightning's own signal handling reads; a single-device strategy has none of its own)."""
    environment = trainer._accelerator_connector.cluster_environment
    return isinstance(environment, SLURMEnvironment) and environment.auto_requeue


def gradscaler(trainer: L.Trainer) -> torch.amp.GradScaler | None:
    """The GradScaler of the precision plugin (16-mixed on a GPU), None without loss scaling."""
    return getattr(trainer.precision_plugin, "scaler", None)


def found_inf_per_device(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> dict:
    """{device: tensor} the GradScaler's unscale step set for `optimizer` (non-zero: an overflow)."""
    return scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"]

"""Fault injection for tests, as Lightning callbacks added from the command line (not production code),
and a disk that fills for where no small filesystem can be mounted.

`python train.py ... +callbacks.fault=...` with the override strings below: a real non-finite
forward (NaN input images) at given steps, or a signal the run sends itself (a preemption).
"""
from __future__ import annotations

import collections
import contextlib
import errno
import io
import os
import shutil
import signal
from unittest import mock

import lightning as L


class NonFiniteImages(L.Callback):
    """Fills the batch's images with NaN before the forward of these global steps."""

    def __init__(self, steps: list[int]):
        self.steps = frozenset(int(step) for step in steps)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            batch[0].fill_(float("nan"))


class SignalAtStep(L.Callback):
    """The process sends itself `signal` as global step `step` starts (a preemption, a SLURM warning);
    with `rank`, only that rank's process does (signals reach DDP ranks at different times)."""

    def __init__(self, step: int, signal: str = "SIGTERM", rank: int | None = None):
        self.step, self.signal, self.rank = int(step), getattr(signal_module, signal), rank

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), self.signal)


class InfiniteGradient(L.Callback):
    """Sets one backbone gradient to inf after the backward of global step `step`: what an fp16
    overflow looks like to the GradScaler (a finite loss, non-finite scaled gradients)."""

    def __init__(self, step: int):
        self.step = int(step)

    def on_after_backward(self, trainer: L.Trainer, pl_module) -> None:
        if trainer.global_step == self.step:
            next(p for p in pl_module.backbone.parameters() if p.grad is not None).grad.view(-1)[0] = float("inf")


signal_module = signal


def nonfinite_images_at(*steps: int) -> str:
    return f"+callbacks.fault={{_target_:tests.fault_injection.NonFiniteImages,steps:[{','.join(map(str, steps))}]}}"


def signal_at(step: int, name: str = "SIGTERM", rank: int | None = None) -> str:
    only = "" if rank is None else f",rank:{rank}"
    return f"+callbacks.fault={{_target_:tests.fault_injection.SignalAtStep,step:{step},signal:{name}{only}}}"


class RecordBuffers(L.Callback):
    """Saves the model's buffers (BatchNorm statistics, s, EMAs) as global step `step` starts and
    ends, to `path`: a skipped step must leave them exactly as they were."""

    def __init__(self, step: int, path: str):
        self.step, self.path, self.before = int(step), path, None

    @staticmethod
    def _buffers(pl_module) -> dict:
        return {name: buffer.detach().clone() for name, buffer in pl_module.named_buffers() if "nonfinite" not in name}  # the skip counters do change

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            self.before = self._buffers(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.before is not None and trainer.global_step == self.step + 1:
            import torch

            torch.save({"before": self.before, "after": self._buffers(pl_module)}, self.path)
            self.before = None


def record_buffers_at(step: int, path, key: str = "buffers") -> str:
    return f"+callbacks.{key}={{_target_:tests.fault_injection.RecordBuffers,step:{step},path:'{path}'}}"


def infinite_gradient_at(step: int) -> str:
    return f"+callbacks.overflow={{_target_:tests.fault_injection.InfiniteGradient,step:{step}}}"


class DiskFull(io.FileIO):
    """A file on a disk with `room` bytes left: writes beyond them fail with ENOSPC, as the kernel's do."""

    room = 200_000

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


@contextlib.contextmanager
def full_disk():
    """Within it, a file opened for writing through os.fdopen (as AtomicCheckpointIO opens its
    temporary file) is a DiskFull one, and the disk reports DiskFull.room bytes free."""
    def fdopen(fd: int, mode: str = "r", *args, **kwargs):
        return DiskFull(fd, mode.replace("b", "")) if "w" in mode else io.open(fd, mode, *args, **kwargs)

    usage = collections.namedtuple("usage", "total used free")(10 * DiskFull.room, 9 * DiskFull.room, DiskFull.room)
    with mock.patch.object(os, "fdopen", fdopen), mock.patch.object(shutil, "disk_usage", lambda path: usage):
        yield

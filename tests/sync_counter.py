"""Counts, per training step, the calls that make the host wait for the device on a GPU.

On CPU nothing waits, so the calls themselves are counted: reading a tensor's value on the host
(`item`, `tolist`, `bool`/`int`/`float` of a tensor, `numpy`) and the ops whose output size
depends on the data (`nonzero`, `unique`, `masked_select`, indexing with a boolean mask). Calls
made by the data path are not counted: it runs in the loader on host tensors. `.cpu()` is counted
(on a GPU it waits for the copy) and its result, and clones of it, are host tensors, whose reads
are then free: the progress bar reads the logged loss, a host copy, after every batch. `.to(device)` is not counted:
on a CPU run the training device is the host, so a copy to it cannot be told from a copy off it.

A step is counted from its batch's `on_train_batch_start` to the next one's: its training step,
its callbacks, Lightning's writing of its metrics and the loop's work before the next batch. The
last step of a run ends at `on_train_end`. Each rank writes `<path>.rank<r>.json`: one
{"step", "logging", "syncs", "where"} row per step ("step": the global step as it starts).
"""
from __future__ import annotations

import json
import sys
import traceback
import weakref
from pathlib import Path

import lightning as L
import torch

from facerec import lightning_compat

READS = ["item", "tolist", "__bool__", "__int__", "__float__", "numpy", "nonzero", "unique", "masked_select"]
FUNCTIONS = ["nonzero", "unique", "masked_select"]
NOT_COUNTED = ("/facerec/data/", "/torch/utils/data/", "/sync_counter.py")


class SyncCounter(L.Callback):
    def __init__(self, path: str):
        self.path = path
        self.rows: list[dict] = []
        self._where: list[str] = []
        self._originals: dict[tuple[object, str], object] = {}
        self._host_copies: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        self._step, self._logging = -1, None

    def _record(self) -> None:
        stack = traceback.extract_stack()[:-2]
        if any(part in frame.filename for frame in stack for part in NOT_COUNTED):
            return
        caller = next((f for f in reversed(stack) if "/torch/" not in f.filename and "lightning_utilities" not in f.filename), stack[-1])
        self._where.append(" < ".join(f"{Path(f.filename).name}:{f.lineno}" for f in stack[-8:][::-1]))

    def _wrap(self, owner, name: str, only_if=None, host_result=lambda *args, **kwargs: False) -> None:
        original = getattr(owner, name)
        self._originals[(owner, name)] = original
        counter = self

        def counted(*args, **kwargs):
            if only_if is None or only_if(*args, **kwargs):
                counter._record()
            result = original(*args, **kwargs)
            if host_result(*args, **kwargs):
                counter._host_copies[id(result)] = weakref.ref(result)
            return result

        setattr(owner, name, counted)

    def _is_host_copy(self, tensor) -> bool:
        ref = self._host_copies.get(id(tensor))
        return ref is not None and ref() is tensor

    def on_train_start(self, trainer: L.Trainer, pl_module) -> None:
        on_device = lambda tensor, *args, **kwargs: not self._is_host_copy(tensor)  # noqa: E731
        for name in READS:
            self._wrap(torch.Tensor, name, only_if=on_device)
        for name in FUNCTIONS:
            self._wrap(torch, name)
        self._wrap(torch.Tensor, "cpu", only_if=on_device, host_result=lambda *args, **kwargs: True)
        for name in ("clone", "detach", "squeeze", "float", "to"):  # Lightning keeps copies of the logged values
            self._wrap(torch.Tensor, name, only_if=lambda *args, **kwargs: False,
                       host_result=lambda tensor, *args, **kwargs: self._is_host_copy(tensor))
        mask = lambda tensor, index, *rest: _has_mask(index)  # noqa: E731
        self._wrap(torch.Tensor, "__getitem__", only_if=mask)
        self._wrap(torch.Tensor, "__setitem__", only_if=mask)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self._close_step()
        self._step = trainer.global_step
        self._logging = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        self._logging = lightning_compat.logs_this_step(trainer)

    def _close_step(self) -> None:
        if self._logging is not None:
            self.rows.append({"step": self._step, "logging": self._logging, "syncs": len(self._where), "where": self._where})
        self._where = []

    def on_train_end(self, trainer: L.Trainer, pl_module) -> None:
        self._close_step()
        for (owner, name), original in self._originals.items():
            setattr(owner, name, original)
        self._originals.clear()
        Path(f"{self.path}.rank{trainer.global_rank}.json").write_text(json.dumps(self.rows))

    def on_exception(self, trainer: L.Trainer, pl_module, exception: BaseException) -> None:
        self.on_train_end(trainer, pl_module)
        print(f"sync counter: {exception!r}", file=sys.stderr)


def _has_mask(index) -> bool:
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype == torch.bool for part in parts)


def sync_counter(path) -> str:
    """The override that adds a SyncCounter writing `path`.rank<r>.json."""
    return f"+callbacks.zz_sync_counter={{_target_:tests.sync_counter.SyncCounter,path:'{path}'}}"

"""Checkpoints written by training: atomic writes, and every rank's RNG states (an exact resume on any
number of ranks). Reading checkpoint files: facerec.checkpoint_files; rebuilding a backbone from
one: facerec.backbones.weights."""
from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from facerec import distributed
from facerec.checkpoint_files import load_checkpoint

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target directory, fsyncs it, then renames it over the
    target: a kill during a save leaves the previous checkpoint intact. Reads are weights-only.
    A save the disk has no room for fails naming the checkpoint, the directory, what the save had
    written and what is free, and that the previous checkpoint is intact (torch reports it as an
    internal "unexpected pos" error, the cause buried in its chain)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a writer killed mid-save
            stale.unlink(missing_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(handle, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException as error:
            written = Path(temporary).stat().st_size if Path(temporary).exists() else 0
            Path(temporary).unlink(missing_ok=True)
            if _disk_full(error):
                raise OSError(errno.ENOSPC, _disk_full_message(path, written, _tensor_bytes(checkpoint))) from error
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location or "cpu")


def _disk_full(error: BaseException) -> bool:
    """Whether `error` or any exception in its chain is "no space left on device"."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _tensor_bytes(value: Any, seen: set | None = None) -> int:
    """The bytes of the tensors in a (nested) checkpoint, each storage once: what its file needs, less
    a little metadata."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        storage = value.untyped_storage()
        if storage.data_ptr() in seen:
            return 0
        seen.add(storage.data_ptr())
        return storage.nbytes()
    if isinstance(value, dict):
        return sum(_tensor_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v, seen) for v in value)
    return 0


def _disk_full_message(path: Path, written: int, needed: int) -> str:
    free = shutil.disk_usage(path.parent).free
    previous = f"the previous {path.name} ({path.stat().st_size:,} bytes) is intact" if path.is_file() else f"no earlier {path.name} existed"
    return (
        f"no space left on the device for checkpoint {path}: it needs about {needed:,} bytes (its tensors) and the "
        f"save had written {written:,} to a temporary file in {path.parent} when the disk filled; {free:,} bytes are "
        f"free there now (the temporary file is removed). "
        f"Nothing was replaced: {previous}. Free space there (or set paths.log_dir elsewhere) and resume."
    )


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _local_rng_state() -> dict:
    """This process's RNG states as tensors and builtin types (checkpoints stay weights-only loadable);
    "cuda": the generator of this process's own device only (None where CUDA is not in use)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached),
        "python": random.getstate(),
    }


def rng_states() -> dict:
    """Every rank's RNG states, in rank order (every rank calls this; rank 0 writes the checkpoint)."""
    return {"ranks": distributed.all_gather_object(_local_rng_state())}


def set_rng_states(states: dict) -> None:
    """Restore this rank's RNG states. A checkpoint written by fewer ranks than resume it leaves the
    extra ranks with their freshly seeded generators (logged: their draws are not the ones of the
    interrupted run); one written by more ranks gives each rank its own. Checkpoints of earlier
    versions hold rank 0's states and `get_rng_state_all()` of every visible device: this device's
    entry is taken where it exists."""
    rank = distributed.world()[0]
    if "ranks" in states:
        if rank >= len(states["ranks"]):
            log.warning(
                "the checkpoint holds the RNG states of %d ranks; rank %d keeps its seeded generators",
                len(states["ranks"]), rank,
            )
            return
        states = states["ranks"][rank]
        cuda = states["cuda"]
    else:  # before per-rank states: rank 0's, and the CUDA state of every device rank 0 saw
        device = torch.cuda.current_device() if torch.cuda.is_available() else 0
        cuda = states["cuda"][device] if device < len(states["cuda"]) else None
    torch.set_rng_state(states["torch"])
    if cuda is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)
    kind, keys, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))

"""Checkpoints: atomic writes, weights-only reads, finding the one to resume, rebuilding the backbone."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes to a temporary file in the target directory, fsyncs it, then renames it over the
    target: a kill during a save leaves the previous checkpoint intact. Reads are weights-only."""

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
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location or "cpu")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def find_last_checkpoint(output_dir: str | Path, runs_dir: str | Path) -> Path | None:
    """The checkpoint `ckpt_path=last` means: this run dir's own last.ckpt (a requeued job, or a
    reused run dir), else the newest last.ckpt among earlier runs under `runs_dir`."""
    own = Path(output_dir) / "checkpoints" / LAST
    if own.is_file():
        return own
    candidates = [p for p in Path(runs_dir).glob(f"*/checkpoints/{LAST}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """torch.load with weights_only=True: a checkpoint cannot run code when it is read.
    mmap=True maps the tensors instead of reading them (to look at a large checkpoint's metadata)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # pickle.UnpicklingError and friends: say which file and why
        raise ValueError(
            f"could not load {path} as a weights-only checkpoint ({type(error).__name__}: {error}). "
            "facerec never unpickles arbitrary objects from checkpoints."
        ) from error


def checkpoint_config(checkpoint: dict, path: str | Path = "checkpoint") -> dict:
    """The resolved run config saved by FaceRecognitionModule."""
    config = checkpoint.get("facerec_config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path} holds no facerec run config ('facerec_config'); was it written by train.py?")
    return config


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(backbone in eval mode with the checkpoint's weights, the run config) from a train.py checkpoint."""
    checkpoint = load_checkpoint(path, map_location)
    config = checkpoint_config(checkpoint, path)
    backbone = instantiate(config["model"])
    prefix = "backbone."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the backbone its config describes ({config['model']}): {error}") from error
    return backbone.eval(), config

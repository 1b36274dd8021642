"""Checkpoint files: weights-only reads that say why a file is unreadable, the run config a train.py
checkpoint holds, and which checkpoint `ckpt_path=last` means.

Below every layer that reads checkpoints (backbones rebuild from them, evaluation and tools load
them, training writes and resumes them); writing lives with training (AtomicCheckpointIO).
"""
from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

LAST = "last.ckpt"
# ckpt_path values that resume the newest run: `last` starts a new run where there is none (logged),
# `last_or_fail` refuses to (a requeued job that must continue, never restart)
RESUME_LAST = ("last", "last_or_fail")
ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6: a zip archive
PICKLE_MAGIC = b"\x80"  # the legacy format: pickles (protocol >= 2 starts with this opcode)


def find_last_checkpoint(output_dir: str | Path, runs_dir: str | Path) -> Path | None:
    """The checkpoint `ckpt_path=last` means: this run dir's own last.ckpt (a requeued job, or a
    reused run dir), else the newest last.ckpt among earlier runs under `runs_dir`."""
    own = Path(output_dir) / "checkpoints" / LAST
    if own.is_file():
        return own
    candidates = [p for p in Path(runs_dir).glob(f"*/checkpoints/{LAST}") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False, what: str = "checkpoint"
) -> dict:
    """torch.load with weights_only=True: a checkpoint cannot run code when it is read.
    mmap=True maps the tensors instead of reading them (to look at a large checkpoint's metadata).
    what: how errors name the file ("checkpoint", "weights file")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as error:  # torch's own messages blame the wrong thing for a cut file: say what is wrong
        raise ValueError(f"could not load {what} {path}: {unreadable_reason(path, error)}") from error


def unreadable_reason(path: Path, error: Exception) -> str:
    """Why torch.load failed on `path`: truncated, corrupt, or refused by the weights-only rule.

    The file is looked at first: torch reports a zip cut short as "OSError: Invalid argument" or a
    missing central directory, and a damaged data.pkl as a weights-only failure.
    """
    size = path.stat().st_size
    with open(path, "rb") as file:
        head = file.read(len(ZIP_MAGIC))
    if size == 0:
        return "the file is empty (0 bytes); was the copy or the save interrupted?"
    if head == ZIP_MAGIC:
        try:
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()  # reads every member and checks its CRC-32
        except zipfile.BadZipFile:
            return (
                f"the file is truncated ({size:,} bytes): a zip archive (PyTorch's format) whose central directory, "
                "written last, is missing or cut; was the copy or the save interrupted?"
            )
        if damaged is not None:
            return f"the file is corrupt ({size:,} bytes): member {damaged} of its zip archive fails its CRC-32 check"
    elif head[:1] == PICKLE_MAGIC:
        if isinstance(error, EOFError) or "truncated" in str(error):
            return f"the file is truncated ({size:,} bytes): its pickle stream (PyTorch's legacy format) ends early"
    else:
        return (
            f"the file is corrupt ({size:,} bytes): neither a zip archive (PyTorch's format) nor a pickle "
            f"(its first bytes are {head!r})"
        )
    refusal = re.search(r"WeightsUnpickler error: (.*)", str(error))
    if isinstance(error, pickle.UnpicklingError) and refusal:
        what_torch_refused = refusal.group(1).split(". ")[0].strip()  # the rest is torch's advice to allowlist it
        return (
            f"it holds an object that needs code to unpickle, which a weights-only checkpoint may not hold "
            f"({what_torch_refused or 'an unsupported pickle opcode'}). facerec never unpickles arbitrary objects "
            "from checkpoints."
        )
    return f"torch could not read it as a weights-only checkpoint ({size:,} bytes; {type(error).__name__}: {error})"


def checkpoint_config(checkpoint: dict, path: str | Path = "checkpoint") -> dict:
    """The resolved run config train.py saves in its checkpoints ('facerec_config')."""
    config = checkpoint.get("facerec_config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path} holds no facerec run config ('facerec_config'); was it written by train.py?")
    return config


def file_sha256(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """The SHA-256 of a file's bytes (hex): how a run records which weights it started from or learnt from."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()

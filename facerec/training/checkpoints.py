"""Checkpoints: atomic writes, weights-only reads (saying why a file is unreadable), finding the one
to resume, rebuilding the backbone from a train.py checkpoint or a plain state_dict (insightface's),
and the weights a training run starts from (model.weights)."""
from __future__ import annotations

import os
import pickle
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from torch import nn

from facerec.backbones.registry import TRAINING_INIT_KEYS

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


ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since PyTorch 1.6: a zip archive
PICKLE_MAGIC = b"\x80"  # the legacy format: pickles (protocol >= 2 starts with this opcode)


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
    """The resolved run config saved by FaceRecognitionModule."""
    config = checkpoint.get("facerec_config")
    if not isinstance(config, dict) or "model" not in config:
        raise ValueError(f"{path} holds no facerec run config ('facerec_config'); was it written by train.py?")
    return config


def build_backbone(model_config) -> nn.Module:
    """The backbone a conf/model config describes, freshly initialised: the config's training
    initialisation keys (model.weights, model.freeze) are left to train.py."""
    return instantiate(model_config, **dict.fromkeys(TRAINING_INIT_KEYS))


def backbone_state(checkpoint: dict) -> dict[str, torch.Tensor]:
    """The backbone's weights in a train.py checkpoint: its state_dict's `backbone.` entries, unprefixed."""
    prefix = "backbone."
    return {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def load_backbone(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(backbone in eval mode with the checkpoint's weights, the run config) from a train.py checkpoint."""
    checkpoint = load_checkpoint(path, map_location)
    config = checkpoint_config(checkpoint, path)
    backbone = build_backbone(config["model"])
    state = backbone_state(checkpoint)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"{path}: its weights do not fit the backbone its config describes ({config['model']}): {error}") from error
    return backbone.eval(), config


LISTED_KEYS = 10  # keys named per kind of misfit; the rest are counted


def model_name(model_config) -> str:
    return model_config.get("name", model_config.get("_target_"))


def plain_state_dict(state: Any, source: str) -> dict[str, torch.Tensor]:
    """`state` (read from `source`, e.g. "weights=<path>") if it is a plain state_dict {name: tensor}."""
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        kinds = sorted({type(value).__name__ for value in state.values()}) if isinstance(state, dict) else [type(state).__name__]
        raise ValueError(
            f"{source} holds {', '.join(kinds)}; expected a plain state_dict {{parameter name: tensor}} "
            "as insightface's backbone.pth"
        )
    return state


def load_strictly(backbone: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Load `state` (from `source`) into `backbone` (model=`name`) with strict=True, after listing
    its missing, unexpected and mis-shaped keys if it does not fit."""
    expected = backbone.state_dict()
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mis_shaped = [
        f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
        for key in expected
        if key in state and state[key].shape != expected[key].shape
    ]
    if missing or unexpected or mis_shaped:
        problems = [
            f"{len(keys)} {kind}: {', '.join(keys[:LISTED_KEYS])}" + (", ..." if len(keys) > LISTED_KEYS else "")
            for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mis_shaped))
            if keys
        ]
        if unexpected and all(key.startswith("module.") for key in unexpected):
            problems.append("every key of the file starts with 'module.' (saved from a DistributedDataParallel wrapper)")
        raise ValueError(
            f"{source} do not fit model={name} ({len(state)} tensors in the file, {len(expected)} in the model): "
            + "; ".join(problems)
        )
    backbone.load_state_dict(state, strict=True)


def load_backbone_weights(model_config: dict, path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """The backbone `model_config` describes (a conf/model config), in eval mode, with the weights of
    `path`: a plain state_dict {name: tensor} such as insightface's `backbone.pth`, read weights-only
    and loaded strictly. A file that does not fit is refused with its missing, unexpected and
    mis-shaped keys listed."""
    path = Path(path)
    if model_config.get("weights"):
        raise ValueError(
            f"model.weights={model_config['weights']} is where train.py starts training from; "
            f"the weights to evaluate are weights={path}"
        )
    state = load_checkpoint(path, map_location, what="weights file")
    if isinstance(state, dict) and "facerec_config" in state:
        raise ValueError(f"weights={path} is a train.py checkpoint, not a plain state_dict: evaluate it with ckpt_path={path}")
    backbone = build_backbone(model_config)
    load_strictly(backbone, plain_state_dict(state, f"weights={path}"), f"weights={path}", model_name(model_config))
    return backbone.eval()


def initialise_backbone(backbone: nn.Module, model_config, path: str | Path) -> None:
    """Load the weights model.weights=`path` names into `backbone` (built from `model_config`), read
    weights-only and loaded strictly (a misfit lists its missing, unexpected and mis-shaped keys):
    a plain state_dict with the backbone's key names (insightface's `backbone.pth`), or a train.py
    checkpoint's backbone, refused unless it is the same backbone (model.name; its sizes are checked
    by the strict load). Options that leave the tensors alone (autocast, dropout, ...) may differ."""
    path = Path(path)
    source, name = f"model.weights={path}", model_name(model_config)
    state = load_checkpoint(path, what="weights file")
    if isinstance(state, dict) and "facerec_config" in state:
        saved = checkpoint_config(state, path)["model"]
        if model_name(saved) != name:
            raise ValueError(f"{source} is a train.py checkpoint of model={model_name(saved)}, not of model={name}")
        source += f" (the backbone of a train.py checkpoint, model config {saved})"
        state = backbone_state(state)
    load_strictly(backbone, plain_state_dict(state, source), source, name)

"""Reading facerec checkpoints safely (weights only) and rebuilding the backbone they hold."""
from __future__ import annotations

from pathlib import Path

import torch
from hydra.utils import instantiate
from torch import nn


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True: a checkpoint cannot run code when it is read."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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

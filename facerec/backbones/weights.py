"""Backbones from files: rebuilt from a train.py checkpoint's config and weights, or a conf/model
config with a plain state_dict (insightface's backbone.pth), and the weights a training run starts
from (model.weights). Every read is weights-only; a file that does not fit is refused with its
missing, unexpected and mis-shaped keys listed."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from torch import nn

from facerec.backbones.registry import TRAINING_INIT_KEYS
from facerec.checkpoint_files import checkpoint_config, load_checkpoint

LISTED_KEYS = 10  # keys named per kind of misfit; the rest are counted


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
    and loaded strictly."""
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
    weights-only and loaded strictly: a plain state_dict with the backbone's key names (insightface's
    `backbone.pth`), or a train.py checkpoint's backbone, refused unless it is the same backbone
    (model.name; its sizes are checked by the strict load). Options that leave the tensors alone
    (autocast, dropout, ...) may differ."""
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

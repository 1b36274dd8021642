"""The model eval.py evaluates, from one of three sources: a train.py checkpoint, a conf/model backbone
with a plain state_dict (insightface's backbone.pth), or an ONNX file. Each gives a torch module
mapping (B, 3, S, S) images normalised as (x - 127.5) / 127.5 to (B, d) embeddings."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from facerec.backbones.weights import load_backbone, load_backbone_weights, model_name

MODEL_SOURCES = ("ckpt_path", "weights", "onnx_path")
MODEL_SOURCE_USAGE = (
    "ckpt_path=<train.py checkpoint>, model=<conf/model name, e.g. iresnet50> weights=<insightface backbone.pth>, "
    "or onnx_path=<model.onnx>"
)


@dataclass
class EvaluationModel:
    """A model to evaluate, whatever its source."""

    embedder: nn.Module  # (B, 3, S, S) images normalised as (x - 127.5) / 127.5 -> (B, d) embeddings
    input_size: int  # S
    model_config: dict  # what set configs read as ${model...} (input_size), and results.json's "model"
    source: dict[str, str]  # results.json: {"checkpoint": path} | {"weights": path} | {"onnx": path}
    description: str  # how error messages name it
    device: torch.device  # where its torch side runs


def resolve_device(device: str) -> torch.device:
    """"auto" -> the GPU where there is one, else the CPU; anything else as torch names it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def from_checkpoint(path: str | Path, device: torch.device) -> EvaluationModel:
    backbone, run_config = load_backbone(path)
    return EvaluationModel(
        backbone, backbone.input_size, run_config["model"], {"checkpoint": str(path)},
        f"the checkpoint's backbone ({model_name(run_config['model'])})", device,
    )  # fmt: skip


def from_weights(model_config: dict, path: str | Path, device: torch.device) -> EvaluationModel:
    backbone = load_backbone_weights(model_config, path)
    return EvaluationModel(
        backbone, backbone.input_size, model_config, {"weights": str(path)}, f"the backbone model={model_name(model_config)}", device
    )


def from_onnx(path: str | Path, device: torch.device) -> EvaluationModel:
    from facerec.evaluation.onnx_model import OnnxEmbedder  # onnx and onnxruntime: the eval extra

    onnx_model = OnnxEmbedder(path, cuda=device.type == "cuda")
    model_config = {
        "onnx_path": str(path),
        "input_size": onnx_model.input_size,
        "embedding_size": onnx_model.embedding_size,
        "input_mean": onnx_model.input_mean,
        "input_std": onnx_model.input_std,
        "normalisation": onnx_model.normalisation_rule,
        "providers": onnx_model.providers,
    }
    # onnxruntime takes host arrays and moves them itself: the torch side stays on the CPU
    return EvaluationModel(
        onnx_model, onnx_model.input_size, model_config, {"onnx": str(path)}, f"the ONNX model {Path(path).name}", torch.device("cpu")
    )


def load_evaluation_model(cfg: DictConfig, device: torch.device) -> EvaluationModel:
    """The model of exactly one source among cfg.ckpt_path, cfg.weights (with cfg.model) and cfg.onnx_path."""
    given = [key for key in MODEL_SOURCES if cfg.get(key) is not None]
    if len(given) != 1:
        named = f"got {' and '.join(f'{key}={cfg[key]}' for key in given)}" if given else "got none"
        raise ValueError(f"eval.py evaluates one model, given by exactly one of {MODEL_SOURCE_USAGE}; {named}")
    (source,) = given
    model_group = cfg.get("model")
    if source == "weights":
        if model_group is None:
            raise ValueError(f"weights={cfg.weights} needs model=<conf/model name, e.g. iresnet50>: the backbone the weights are for")
        return from_weights(OmegaConf.to_container(model_group, resolve=True), cfg.weights, device)
    if model_group is not None:
        held = "the checkpoint's config" if source == "ckpt_path" else "the ONNX graph"
        raise ValueError(f"model= goes with weights= only; with {source}={cfg[source]} {held} describes the backbone")
    if source == "ckpt_path":
        return from_checkpoint(cfg.ckpt_path, device)
    if cfg.bf16:
        raise ValueError(f"bf16=true autocasts a torch backbone; onnx_path={cfg.onnx_path} runs in onnxruntime as exported")
    return from_onnx(cfg.onnx_path, device)

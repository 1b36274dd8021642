"""Evaluate a model on evaluation sets of any kind: the logic behind `python eval.py`.

One path for every model: a model source (a train.py checkpoint, insightface-layout weights, or
an ONNX file) gives a torch module mapping normalised images to embeddings; every set named in
eval_sets is an EvaluationProtocol (a pair set is wrapped in a PairProtocol), whose images are
embedded once with the flip test and then scored by the protocol.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import Dataset

from facerec.evaluation.embeddings import extract_embeddings
from facerec.evaluation.protocols import EvaluationProtocol, ProtocolResult, as_protocol
from facerec.evaluation.report import EmbeddingNorms, format_table, plot_curves, write_results
from facerec.training.checkpoints import load_backbone, load_backbone_weights

log = logging.getLogger(__name__)

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


def compose_verification_sets(names: Sequence[str]) -> DictConfig:
    """{name: config} from conf/verification/<name>.yaml, through Hydra's config search path.

    Runs inside an initialised Hydra (eval.py, or a `hydra.initialize*` context).
    Interpolations in the set configs (e.g. ${paths.data_dir}) stay unresolved:
    they resolve once the configs sit in the caller's config.
    """
    names = list(names)
    if not names or len(set(names)) != len(names):
        raise ValueError(f"eval_sets must name distinct configs of conf/verification/, got {names}")
    try:
        composed = compose(overrides=[f"+verification@verification.{name}={name}" for name in names])
    except MissingConfigException:
        available = GlobalHydra.instance().config_loader().get_group_options("verification")
        unknown = [name for name in names if name not in available]
        raise ValueError(
            f"eval_sets: no verification config {unknown} (expected conf/verification/<name>.yaml); "
            f"available: {', '.join(available)}"
        ) from None
    return composed.verification


def resolve_device(device: str) -> torch.device:
    """"auto" -> the GPU where there is one, else the CPU; anything else as torch names it."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


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
            raise ValueError(
                f"weights={cfg.weights} needs model=<conf/model name, e.g. iresnet50>: the backbone the weights are for"
            )
        model_config = OmegaConf.to_container(model_group, resolve=True)
        backbone = load_backbone_weights(model_config, cfg.weights)
        name = model_config.get("name", model_config.get("_target_"))
        return EvaluationModel(
            backbone, backbone.input_size, model_config, {"weights": str(cfg.weights)}, f"the backbone model={name}", device
        )
    if model_group is not None:
        held = "the checkpoint's config" if source == "ckpt_path" else "the ONNX graph"
        raise ValueError(f"model= goes with weights= only; with {source}={cfg[source]} {held} describes the backbone")
    if source == "ckpt_path":
        backbone, run_config = load_backbone(cfg.ckpt_path)
        name = run_config["model"].get("name", run_config["model"].get("_target_"))
        return EvaluationModel(
            backbone,
            backbone.input_size,
            run_config["model"],
            {"checkpoint": str(cfg.ckpt_path)},
            f"the checkpoint's backbone ({name})",
            device,
        )
    if cfg.bf16:
        raise ValueError(f"bf16=true autocasts a torch backbone; onnx_path={cfg.onnx_path} runs in onnxruntime as exported")
    from facerec.evaluation.onnx_model import OnnxEmbedder

    onnx_model = OnnxEmbedder(cfg.onnx_path, cuda=device.type == "cuda")
    model_config = {
        "onnx_path": str(cfg.onnx_path),
        "input_size": onnx_model.input_size,
        "embedding_size": onnx_model.embedding_size,
        "input_mean": onnx_model.input_mean,
        "input_std": onnx_model.input_std,
        "normalisation": onnx_model.normalisation_rule,
        "providers": onnx_model.providers,
    }
    return EvaluationModel(
        onnx_model,
        onnx_model.input_size,
        model_config,
        {"onnx": str(cfg.onnx_path)},
        f"the ONNX model {Path(cfg.onnx_path).name}",
        torch.device("cpu"),  # onnxruntime takes host arrays and moves them itself
    )


def check_input_size(image_set: Dataset, name: str, model: EvaluationModel) -> None:
    """The set's images must have the size the model takes."""
    size = model.input_size
    shape = tuple(image_set[0][0].shape)
    if shape != (3, size, size):
        raise ValueError(
            f"evaluation set {name!r} yields images of shape {shape}, but {model.description} takes (3, {size}, {size})"
        )


def instantiate_protocol(config: DictConfig, name: str, n_folds: int) -> EvaluationProtocol:
    """The protocol conf/verification/<name>.yaml describes (a pair set is wrapped in a PairProtocol)."""
    try:
        return as_protocol(instantiate(config), n_folds)
    except TypeError as error:
        raise TypeError(f"conf/verification/{name}.yaml: {error}") from error


def evaluate_protocol(
    embedder: nn.Module, protocol: EvaluationProtocol, **extract_options
) -> tuple[ProtocolResult, EmbeddingNorms]:
    """Embed every image of the protocol once (see extract_embeddings), then score; with the norms of the features."""
    features = extract_embeddings(embedder, protocol.image_set(), **extract_options)
    return protocol.score(features.numpy()), EmbeddingNorms.of(features)


def evaluate_set(backbone: nn.Module, evaluation_set, n_folds: int = 10, **extract_options) -> ProtocolResult:
    """The result of a VerificationSet (as a PairProtocol, its result a VerificationResult) or of any protocol."""
    return evaluate_protocol(backbone, as_protocol(evaluation_set, n_folds), **extract_options)[0]


def evaluate(cfg: DictConfig) -> dict[str, ProtocolResult]:
    """Evaluate the model of cfg's model source on cfg.eval_sets; print one table per result kind,
    write results.json and curves.png (ROC panel; CMC panel where identification sets are)."""
    stray = set(cfg.verification) - set(cfg.eval_sets)
    if stray:
        raise ValueError(f"verification overrides for {sorted(stray)}, which eval_sets={list(cfg.eval_sets)} does not name")
    device = resolve_device(cfg.device)
    model = load_evaluation_model(cfg, device)
    with open_dict(cfg):
        # Set configs may read the model's config (the synthetic set renders at model.input_size).
        cfg.model = model.model_config
        cfg.verification = OmegaConf.merge(compose_verification_sets(cfg.eval_sets), cfg.verification)
    results: dict[str, ProtocolResult] = {}
    norms: dict[str, EmbeddingNorms] = {}
    for name in cfg.eval_sets:
        protocol = instantiate_protocol(cfg.verification[name], name, cfg.n_folds)
        image_set = protocol.image_set()
        check_input_size(image_set, name, model)
        log.info("%s: %d images", name, len(image_set))
        try:
            results[name], norms[name] = evaluate_protocol(
                model.embedder,
                protocol,
                flip=cfg.flip,
                device=model.device,
                bf16=cfg.bf16,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                progress=cfg.progress,
                description=name,
            )
        except ValueError as error:
            raise ValueError(f"evaluation set {name!r}: {error}") from error
        log.info("%s: embedding norm %.3f ± %.3f (mean ± std)", name, norms[name].mean, norms[name].std)
        for note in results[name].notes:
            log.info("%s: %s", name, note)

    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    context = dict(**model.source, model=model.model_config, flip=cfg.flip, device=str(device), bf16=cfg.bf16)
    results_path = write_results(results, output_dir / "results.json", norms, **context)
    label = Path(next(iter(model.source.values()))).name
    curves_path = plot_curves(results, output_dir / "curves.png", title=label)
    print(f"{format_table(results, norms)}\n\nresults: {results_path}\ncurves: {curves_path}", flush=True)
    return results

"""Export the backbone of a train.py checkpoint to ONNX or TorchScript, verified against PyTorch,
optionally quantised to INT8 by ONNX Runtime (facerec.tools.quantize), and checked on a pair set.

    python -m facerec.tools.export ckpt_path=logs/train/runs/.../checkpoints/last.ckpt format=onnx
    python -m facerec.tools.export ckpt_path=... format=onnx quantize=int8 check_set=lfw

The exported model maps float32 (B, 3, S, S) RGB images, normalised as (x - 127.5) / 127.5,
to (B, embedding_size) embeddings, with B free. Beside it goes a model card (`<model file>.md`):
YAML front matter for programs (input size, normalisation, embedding size, precision, the checks),
then the training config.

The accuracy check (check_set=<conf/evalset name>; by default the checkpoint's first validation set)
embeds the set with the PyTorch model and with each exported one (flip test, as eval.py) and reports
each one's metrics (accuracy, TAR@FAR, AUC, ...) and the cosine between its features and PyTorch's
(mean, 1st percentile, minimum): a quantised model's cost in accuracy, measured on faces rather than
on random input.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn
from torch.utils.data import Dataset

from facerec.backbones.weights import load_backbone
from facerec.checkpoint_files import checkpoint_config, load_checkpoint
from facerec.evaluation import EvaluationProtocol, evaluate_features, extract_embeddings
from facerec.tools.quantize import CalibrationImages, QuantizationResult, quantize_onnx

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


@dataclass
class ExportResult:
    model_path: Path
    card_path: Path
    max_abs_diff: float  # largest |exported - PyTorch| over the embedding entries
    min_cosine: float  # smallest cosine similarity between exported and PyTorch embeddings
    quantized: QuantizationResult | None = None  # the INT8 model (quantize=int8)
    check: dict = field(default_factory=dict)  # the accuracy check: {"set": name, "pytorch": {...}, "exported": {...}, "int8": {...}}


def export_onnx(backbone: nn.Module, example: torch.Tensor, path: Path, opset: int) -> None:
    torch.onnx.export(
        backbone,
        (example,),
        path,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},  # keyed by forward's argument name
        opset_version=opset,
        external_data=False,  # one self-contained file (the largest backbone, IResNet-200, is 0.5 GB)
        dynamo=True,
    )


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError("verifying an ONNX export needs onnxruntime: pip install 'facerec[export]'") from error
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (embeddings,) = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})
    return torch.from_numpy(np.asarray(embeddings))


def export_torchscript(backbone: nn.Module, example: torch.Tensor, path: Path, _opset: int) -> None:
    torch.jit.save(torch.jit.trace(backbone, example), str(path))


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(str(path), map_location="cpu")(images)


EXPORTERS = {"onnx": (export_onnx, run_onnx), "torchscript": (export_torchscript, run_torchscript)}


def write_card(
    path: Path, result: ExportResult, fmt: str, ckpt_path: Path, backbone: nn.Module, config: dict, model_path: Path | None = None
) -> None:
    """The model card of `model_path` (default: the float model): facts for programs, then prose."""
    model_path = model_path or result.model_path
    quantized = result.quantized if model_path != result.model_path else None
    size = backbone.input_size
    facts = {
        "format": fmt,
        "file": model_path.name,
        "file_bytes": model_path.stat().st_size,
        "precision": f"int8 ({quantized.mode} quantisation, onnxruntime.quantization)" if quantized else "float32",
        "checkpoint": str(ckpt_path),
        "backbone": config["model"].get("name", config["model"].get("_target_")),
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32", "channel_order": "RGB"},
        "normalization": {"mean": 127.5, "std": 127.5, "formula": "(x - 127.5) / 127.5 on 0..255 pixels"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", backbone.embedding_size], "dtype": "float32"},
        "embedding_size": backbone.embedding_size,
        "verification": {
            "against": "PyTorch float32 on random input, CPU",
            "max_abs_diff": result.max_abs_diff,
            "min_cosine": result.min_cosine,
        },
    }
    lines = [
        f"# Face embedding model ({facts['backbone']}, {fmt}, {facts['precision']})\n",
        f"Input: float32 RGB face crops, {size}x{size}, aligned as in training, NCHW, pixels mapped "
        f"as (x - 127.5) / 127.5. Output: {backbone.embedding_size}-d embeddings; compare them by "
        "cosine similarity (L2-normalise first). Flip test: add the embedding of the horizontally "
        f"flipped image. File: {facts['file_bytes']:,} bytes.\n",
    ]
    if quantized:
        del facts["verification"]
        facts["quantization"] = {
            "mode": quantized.mode,
            "weights": "int8, per output channel",
            "activations": "uint8, ranges calibrated (min-max)" if quantized.mode == "static" else "uint8, ranges per batch at run time",
            "calibration": quantized.calibration,
            "float_model": result.model_path.name,
            "float_model_bytes": result.model_path.stat().st_size,
            "weighted_nodes_int8": quantized.quantised_nodes,
            "ops_without_int8_form": quantized.float_ops,
            "weighted_ops_left_float": quantized.float_weighted_ops,
        }
        calibration = quantized.calibration
        lines.append(
            f"Quantised by onnxruntime.quantization ({quantized.mode}): int8 weights per output channel"
            + (f", activation ranges calibrated on {calibration['images']} images of {calibration['set']} (seed {calibration['seed']})" if calibration else "")
            + f". {quantized.quantised_nodes} weighted nodes in int8; op types without an int8 form, computed in float32: "
            + (", ".join(f"{op} x{n}" for op, n in quantized.float_ops.items()) or "none")
            + ".\n"
        )
    else:
        lines.append(
            f"Against PyTorch on random input: max abs difference {result.max_abs_diff:.2e}, "
            f"min cosine similarity {result.min_cosine:.7f}.\n"
        )
    if result.check:
        label = "int8" if quantized else "exported"
        facts["accuracy_check"] = {key: result.check[key] for key in ("set", "images", "reference", "pytorch", label) if key in result.check}
        lines.append(f"Accuracy check on {result.check['set']} (flip test), against the PyTorch model:\n\n" + check_table(result.check, ("pytorch", label)) + "\n")
    body = "\n".join(lines) + "\n## Training config\n\n```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```\n"
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text("---\n" + yaml.safe_dump(facts, sort_keys=False) + "---\n\n" + body)
    temporary.replace(path)


CHECK_COLUMNS = ("accuracy", "tar@far=1e-03", "tar@far=1e-04", "auc")


def check_table(check: dict, models: tuple[str, ...]) -> str:
    """A markdown table of the accuracy check: one row per model, metrics in %, cosine to the reference."""
    columns = [key for key in CHECK_COLUMNS if any(key in check.get(m, {}) for m in models)]
    header = f"| model | {' | '.join(columns)} | cosine to {check['reference']}: mean / 1st pct / min |"
    rows = [header, "|---" * (len(columns) + 2) + "|"]
    for model in models:
        if model not in check:
            continue
        entry = check[model]
        cells = [f"{entry[key]:.4f}" if key == "auc" else f"{100 * entry[key]:.2f}" for key in columns if key in entry]
        cosine = entry.get("cosine_to_reference")
        cosine_cell = f"{cosine['mean']:.5f} / {cosine['p01']:.5f} / {cosine['min']:.5f}" if cosine else "-"
        rows.append(f"| {model} | " + " | ".join(cells) + f" | {cosine_cell} |")
    return "\n".join(rows)


def accuracy_check(
    name: str, protocol: EvaluationProtocol, models: dict[str, nn.Module], batch_size: int = 128, flip: str = "sum"
) -> dict:
    """{"set", "images", "reference", <model>: {its protocol metrics, "cosine_to_reference": {mean, p01, min}}}
    for `models` ({"pytorch": ..., "exported": ..., "int8": ...}), each embedding the set with the flip
    test (`flip`, as eval.py's); the first model is the reference whose features the others' are
    compared with, image by image."""
    image_set = protocol.image_set()
    check: dict = {"set": name, "images": len(image_set), "flip": flip, "reference": next(iter(models))}
    reference = None
    for label, model in models.items():
        features = extract_embeddings(model, image_set, flip=flip, device="cpu", batch_size=batch_size, description=f"{name} ({label})")
        check[label] = {key: float(value) for key, value in evaluate_features(protocol, features).result.summary().items()}
        if reference is None:
            reference = features.double()
            continue
        cosine = F.cosine_similarity(features.double(), reference, dim=1)
        check[label]["cosine_to_reference"] = {
            "mean": cosine.mean().item(), "p01": torch.quantile(cosine, 0.01).item(), "min": cosine.min().item()
        }  # fmt: skip
    return check


def export_checkpoint(
    ckpt_path: str | Path,
    format: str = "onnx",
    output_path: str | Path | None = None,
    opset: int = 18,
    verify_batch_size: int = 3,
    atol: float = 1e-4,
    rtol: float = 1e-4,
    quantize: dict | None = None,
    calibration_images: Dataset | None = None,
    check: tuple[str, EvaluationProtocol] | None = None,
) -> ExportResult:
    """Export, reload, compare on random images (a batch size other than the traced one); with
    `quantize` ({"mode": "static" | "dynamic", "calibration_set": name, "calibration_images": N, "seed": s,
    "allow_float": bool}; ONNX only) also an INT8 model `<name>.int8.onnx` from N images of
    `calibration_images`; with `check` (name, protocol) the accuracy check; then the model cards.

    Fails unless max |exported - PyTorch| <= atol + rtol * max |PyTorch|. Embeddings are compared
    by angle, so the error that matters is relative to their scale, which is large early in
    training (the embedding BN's running statistics have not settled yet). The INT8 model is held
    to no such bound: the accuracy check says what it costs.
    """
    if format not in EXPORTERS:
        raise ValueError(f"format must be one of {sorted(EXPORTERS)}, got {format!r}")
    if quantize and format != "onnx":
        raise ValueError(f"quantize=int8 quantises an ONNX model with onnxruntime; format={format} has no INT8 export here")
    ckpt_path = Path(ckpt_path)
    backbone, config = load_backbone(ckpt_path)
    # Deployed models compute in float32 on NCHW input: no autocast, contiguous weights.
    backbone.autocast = None
    backbone.channels_last = False
    backbone.to(memory_format=torch.contiguous_format)
    model_path = Path(output_path) if output_path else ckpt_path.with_suffix(SUFFIXES[format])
    model_path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    size = backbone.input_size
    example = torch.randn(2, 3, size, size, generator=generator)
    images = torch.randn(verify_batch_size, 3, size, size, generator=generator)
    export, run = EXPORTERS[format]
    with torch.no_grad():
        export(backbone, example, model_path, opset)
        expected = backbone(images)
        exported = run(model_path, images)
    result = ExportResult(
        model_path,
        model_path.with_name(model_path.name + ".md"),
        max_abs_diff=(exported - expected).abs().max().item(),
        min_cosine=F.cosine_similarity(exported.double(), expected.double()).min().item(),
    )
    log.info("exported %s -> %s; max abs diff from PyTorch %.3e", ckpt_path, model_path, result.max_abs_diff)
    largest = expected.abs().max().item()
    if not result.max_abs_diff <= atol + rtol * largest:
        raise RuntimeError(
            f"{model_path}: the exported model differs from PyTorch by up to {result.max_abs_diff:.3e} "
            f"> atol + rtol * max|embedding| = {atol} + {rtol} * {largest:.3e}"
        )
    if quantize:
        calibration = None
        if quantize["mode"] == "static":
            if calibration_images is None:
                raise ValueError("static quantisation needs calibration images (quantization.calibration_set)")
            calibration = CalibrationImages(
                calibration_images, INPUT_NAME, quantize["calibration_images"], quantize["seed"], name=quantize["calibration_set"]
            )
        int8_path = model_path.with_name(model_path.name.removesuffix(".onnx") + ".int8.onnx")
        result.quantized = quantize_onnx(model_path, int8_path, quantize["mode"], calibration, quantize.get("allow_float", False))
        log.info("quantised (%s) -> %s", quantize["mode"], int8_path)
    if check is not None:
        name, protocol = check
        models = {"pytorch": backbone, "exported": exported_model(model_path, format)}
        if result.quantized:
            models["int8"] = exported_model(result.quantized.path, format)
        result.check = accuracy_check(name, protocol, models)
    write_card(result.card_path, result, format, ckpt_path, backbone, config)
    if result.quantized:
        write_card(card_path(result.quantized.path), result, format, ckpt_path, backbone, config, result.quantized.path)
    return result


def card_path(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".md")


def exported_model(path: Path, fmt: str) -> nn.Module:
    """An exported file as a module for the accuracy check: (B, 3, S, S) images -> (B, d) embeddings."""
    if fmt == "onnx":
        from facerec.evaluation.onnx_model import OnnxEmbedder

        return OnnxEmbedder(path)
    return torch.jit.load(str(path), map_location="cpu")


def calibration_set(cfg: DictConfig, config: dict) -> Dataset:
    """The images static quantisation calibrates on: `train`, the checkpoint's training set without
    augmentation, or a conf/evalset name (its protocol's images)."""
    name = cfg.quantization.calibration_set
    if name == "train":
        train = {**config["dataset"]["train"], "augment": {"_target_": "facerec.data.augment.NoAugment"}}
        try:
            return hydra.utils.instantiate(train)
        except Exception as error:
            raise ValueError(
                f"quantization.calibration_set=train: the checkpoint's training set ({train.get('_target_')}, "
                f"{train.get('root', '')}) cannot be read: {error}"
            ) from error
    return evaluation_protocol(cfg, name, "quantization.calibration_set").image_set()


def evaluation_protocol(cfg: DictConfig, name: str, key: str) -> EvaluationProtocol:
    from facerec.evaluation.evalsets import build_protocols, compose_evalsets

    compose_evalsets(cfg, [name], key)
    return build_protocols(cfg, [name])[name]


def check_set_name(cfg: DictConfig, config: dict) -> str | None:
    """check_set: null (no check), `default` (the checkpoint's first validation set) or an evalset name."""
    name = cfg.check_set
    if name == "default":
        val_sets = config.get("val_sets") or []
        return val_sets[0] if val_sets else None
    return name


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    config = checkpoint_config(load_checkpoint(cfg.ckpt_path, mmap=True), cfg.ckpt_path)  # the config alone: export_checkpoint loads the weights
    with open_dict(cfg):
        cfg.model = config["model"]  # set configs read ${model.input_size}
    quantize = None
    if cfg.quantize is not None:
        if cfg.quantize != "int8":
            raise ValueError(f"quantize={cfg.quantize!r}; expected int8 or null")
        quantize = OmegaConf.to_container(cfg.quantization, resolve=True)
    check_name = check_set_name(cfg, config)
    result = export_checkpoint(
        cfg.ckpt_path, cfg.format, cfg.output_path, cfg.opset, cfg.verify_batch_size, cfg.atol, cfg.rtol,
        quantize=quantize,
        calibration_images=calibration_set(cfg, config) if quantize and quantize["mode"] == "static" else None,
        check=(check_name, evaluation_protocol(cfg, check_name, "check_set")) if check_name else None,
    )  # fmt: skip
    lines = [
        f"exported {result.model_path}: max abs diff from PyTorch {result.max_abs_diff:.2e}, "
        f"min cosine {result.min_cosine:.7f}; model card {result.card_path}"
    ]
    if result.quantized:
        lines.append(f"int8 ({result.quantized.mode}): {result.quantized.path}; model card {card_path(result.quantized.path)}")
    if result.check:
        lines.append(f"accuracy check on {result.check['set']} ({result.check['images']} images, flip test):\n" + check_table(result.check, ("pytorch", "exported", "int8")))
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

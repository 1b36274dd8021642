"""Export the backbone of a train.py checkpoint to ONNX or TorchScript, verified against PyTorch.

    python -m facerec.tools.export ckpt_path=logs/train/runs/.../checkpoints/last.ckpt format=onnx

The exported model maps float32 (B, 3, S, S) RGB images, normalised as (x - 127.5) / 127.5,
to (B, embedding_size) embeddings, with B free. Beside it goes a model card (`<model file>.md`):
YAML front matter for programs (input size, normalisation, embedding size, the check), then
the training config.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.nn.functional as F
import yaml
from omegaconf import DictConfig
from torch import nn

from facerec.backbones.weights import load_backbone

log = logging.getLogger(__name__)

SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


@dataclass
class ExportResult:
    model_path: Path
    card_path: Path
    max_abs_diff: float  # largest |exported - PyTorch| over the embedding entries
    min_cosine: float  # smallest cosine similarity between exported and PyTorch embeddings


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


def write_card(path: Path, result: ExportResult, fmt: str, ckpt_path: Path, backbone: nn.Module, config: dict) -> None:
    size = backbone.input_size
    facts = {
        "format": fmt,
        "file": result.model_path.name,
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
    body = (
        f"# Face embedding model ({facts['backbone']}, {fmt})\n\n"
        f"Input: float32 RGB face crops, {size}x{size}, aligned as in training, NCHW, pixels mapped "
        f"as (x - 127.5) / 127.5. Output: {backbone.embedding_size}-d embeddings; compare them by "
        "cosine similarity (L2-normalise first). Flip test: add the embedding of the horizontally "
        "flipped image.\n\n"
        f"Against PyTorch on random input: max abs difference {result.max_abs_diff:.2e}, "
        f"min cosine similarity {result.min_cosine:.7f}.\n\n"
        "## Training config\n\n```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```\n"
    )
    path.write_text("---\n" + yaml.safe_dump(facts, sort_keys=False) + "---\n\n" + body)


def export_checkpoint(
    ckpt_path: str | Path,
    format: str = "onnx",
    output_path: str | Path | None = None,
    opset: int = 18,
    verify_batch_size: int = 3,
    atol: float = 1e-4,
    rtol: float = 1e-4,
) -> ExportResult:
    """Export, reload, compare on random images (a batch size other than the traced one), write the card.

    Fails unless max |exported - PyTorch| <= atol + rtol * max |PyTorch|. Embeddings are compared
    by angle, so the error that matters is relative to their scale, which is large early in
    training (the embedding BN's running statistics have not settled yet).
    """
    if format not in EXPORTERS:
        raise ValueError(f"format must be one of {sorted(EXPORTERS)}, got {format!r}")
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
    write_card(result.card_path, result, format, ckpt_path, backbone, config)
    return result


@hydra.main(version_base="1.3", config_path="../../conf", config_name="export")
def main(cfg: DictConfig) -> None:
    result = export_checkpoint(
        cfg.ckpt_path, cfg.format, cfg.output_path, cfg.opset, cfg.verify_batch_size, cfg.atol, cfg.rtol
    )
    print(
        f"exported {result.model_path}: max abs diff from PyTorch {result.max_abs_diff:.2e}, "
        f"min cosine {result.min_cosine:.7f}; model card {result.card_path}"
    )


if __name__ == "__main__":
    main()

"""INT8 ONNX models by ONNX Runtime's quantiser (`onnxruntime.quantization`), for `facerec.tools.export
quantize=int8`; nothing here quantises by hand.

- static: weights int8 per output channel, activations uint8 with ranges calibrated (min-max) on N
  images of a named set, in QDQ form (QuantizeLinear/DequantizeLinear pairs around each quantised
  op, which ONNX Runtime fuses into integer kernels); the float model is shape-inferred and
  optimised first (`quant_pre_process`), as ONNX Runtime advises.
- dynamic: weights int8 per channel, activations quantised at run time batch by batch (no
  calibration); ONNX Runtime quantises Conv and MatMul this way (ConvInteger, MatMulInteger; a Gemm
  becomes a MatMulInteger and an Add), not ConvTranspose.

A weighted op (Conv, ConvTranspose, Gemm, MatMul) that the quantiser leaves in float32 is an error
naming it (or a warning with quantization.allow_float=true): its weights would stay float and its
cost unchanged. Other op types the quantiser has no int8 kernel for (PReLU in IResNet and
MobileFaceNet, Softmax and GELU in ViT) run in float32 between a dequantise and a quantise; they are
listed in the result and the model card.
"""
from __future__ import annotations

import logging
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

MODES = ("static", "dynamic")
WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
INTEGER_OPS = ("ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul")


@dataclass
class QuantizationResult:
    path: Path
    mode: str
    calibration: dict | None  # {"set": name, "images": N, "seed": s} (static)
    float_ops: dict[str, int] = field(default_factory=dict)  # op type -> nodes with no int8 form in this mode (float32)
    float_weighted_ops: dict[str, int] = field(default_factory=dict)  # weighted op type -> nodes left with float weights
    quantised_nodes: int = 0  # weighted nodes whose weights are int8


class CalibrationImages:
    """onnxruntime.quantization.CalibrationDataReader over `num_images` images of `images` (a dataset
    whose items start with a (3, S, S) image normalised as (x - 127.5) / 127.5), drawn without
    replacement by `seed`, in batches of `batch_size`."""

    def __init__(self, images: Dataset, input_name: str, num_images: int, seed: int = 0, batch_size: int = 32, name: str = "images"):
        available = len(images)
        if available == 0:
            raise ValueError(f"quantization.calibration_set={name}: the set holds no image to calibrate on")
        if num_images < 1:
            raise ValueError(f"quantization.calibration_images={num_images}: expected at least 1")
        chosen = np.random.default_rng(seed).choice(available, size=min(num_images, available), replace=False)
        self.images, self.input_name, self.batch_size, self.name, self.seed = images, input_name, batch_size, name, seed
        self.indices = sorted(int(i) for i in chosen)
        self._batches = None

    def _read(self, index: int) -> np.ndarray:
        try:
            image = self.images[index][0]
        except Exception as error:
            raise ValueError(f"quantization.calibration_set={self.name}: image {index} cannot be read ({type(error).__name__}: {error})") from error
        return torch.as_tensor(image, dtype=torch.float32).numpy()

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._batches is None:
            self._batches = iter([self.indices[i : i + self.batch_size] for i in range(0, len(self.indices), self.batch_size)])
        batch = next(self._batches, None)
        if batch is None:
            return None
        return {self.input_name: np.stack([self._read(index) for index in batch])}

    def rewind(self) -> None:
        self._batches = None


def _op_counts(fp32_path: Path, int8_path: Path, mode: str) -> tuple[dict[str, int], dict[str, int], int]:
    """(op type -> nodes of the float graph, weighted ops aside, that onnxruntime's quantiser has no int8
    form for in this mode, weighted op type -> nodes left with float weights, weighted nodes quantised). A weighted
    node is quantised where its weight reaches it through a DequantizeLinear (QDQ form, fused by
    ONNX Runtime into an integer kernel) or it became ConvInteger / MatMulInteger (dynamic)."""
    import onnx
    from onnxruntime.quantization.registry import IntegerOpsRegistry, QDQRegistry

    registry = QDQRegistry if mode == "static" else IntegerOpsRegistry
    without_int8 = Counter(
        node.op_type for node in onnx.load(str(fp32_path)).graph.node if node.op_type not in registry and node.op_type not in WEIGHTED_OPS
    )
    graph = onnx.load(str(int8_path)).graph
    dequantised = {node.output[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    float_weights = {init.name for init in graph.initializer if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    left, quantised = Counter(), 0
    for node in graph.node:
        if node.op_type in INTEGER_OPS:
            quantised += 1
        elif node.op_type in WEIGHTED_OPS and len(node.input) > 1:
            if node.input[1] in dequantised:
                quantised += 1
            elif node.input[1] in float_weights:  # a product of two activations (attention's) has no weight to quantise
                left[node.op_type] += 1
    return dict(sorted(without_int8.items())), dict(sorted(left.items())), quantised


def quantize_onnx(
    fp32_path: Path,
    output_path: Path,
    mode: str = "static",
    calibration: CalibrationImages | None = None,
    allow_float: bool = False,
) -> QuantizationResult:
    """Quantise the float ONNX model `fp32_path` to int8 at `output_path` (see the module doc)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise ValueError(f"quantization.mode={mode!r}; expected one of {MODES}")
    output_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = output_path.with_name(f".{output_path.name}.tmp")
    if mode == "static":
        if calibration is None:
            raise ValueError("static quantisation needs calibration images (quantization.calibration_set)")
        with tempfile.TemporaryDirectory() as scratch:
            prepared = Path(scratch) / "prepared.onnx"
            quant_pre_process(str(fp32_path), str(prepared))
            quantize_static(
                str(prepared), str(temporary), calibration,
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )  # fmt: skip
        described = {"set": calibration.name, "images": len(calibration.indices), "seed": calibration.seed}
    else:
        quantize_dynamic(str(fp32_path), str(temporary), per_channel=True, weight_type=QuantType.QInt8)
        described = None
    floats, left, quantised = _op_counts(fp32_path, temporary, mode)
    if left and not allow_float:
        temporary.unlink()
        raise ValueError(
            f"{fp32_path}: onnxruntime's {mode} quantisation left weighted ops in float32: "
            + ", ".join(f"{op} x{n}" for op, n in left.items())
            + (" (dynamic quantisation covers Conv, MatMul and Gemm: quantization.mode=static)" if mode == "dynamic" else "")
            + "; quantization.allow_float=true keeps them in float32"
        )
    temporary.replace(output_path)  # never a half-written model under the final name
    if left:
        log.warning("%s: weighted ops left in float32: %s", output_path, left)
    return QuantizationResult(output_path, mode, described, floats, left, quantised)

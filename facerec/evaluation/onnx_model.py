"""An ONNX face model as a torch module, preprocessed the way insightface's arcface_torch evaluates one.

arcface_torch's `onnx_ijbc.py` (with `onnx_helper.ArcFaceORT`) feeds the session float32 NCHW
RGB crops at the size of the model's input, as (x - input_mean) / input_std on 0..255 pixels, where

- input_mean, input_std are the two lines of `pixel_norm.txt` beside the model where there is one;
- else 0 and 1 when the first 8 graph nodes include a subtraction and a multiplication (a model
  converted from MXNet, which normalises inside the graph: node names starting "Sub"/"_minus" and
  "Mul"/"_mul");
- else 127.5 and 127.5 (the PyTorch models, and facerec's own exports).

facerec's sets yield images already normalised as (x - 127.5) / 127.5, so `OnnxEmbedder` maps
them back to pixels only where the model wants another mean/std. The batch dimension is made
free where the model fixes it (as ArcFaceORT does), so any batch size runs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger(__name__)

FACEREC_MEAN = FACEREC_STD = 127.5  # how facerec's sets normalise images
INPUT_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def pixel_normalisation(path: Path, graph) -> tuple[float, float, str]:
    """(input_mean, input_std, the rule that chose them) by arcface_torch's rules (see the module doc)."""
    pixel_norm = path.parent / "pixel_norm.txt"
    if pixel_norm.is_file():
        lines = pixel_norm.read_text().split()
        try:
            mean, std = (float(value) for value in lines)
        except ValueError:
            raise ValueError(f"{pixel_norm} must hold two numbers (input_mean, input_std), one a line; got {lines}") from None
        return mean, std, f"from {pixel_norm}"
    names = [node.name for node in graph.node[:8]]
    subtracts = any(name.startswith(("Sub", "_minus")) for name in names)
    multiplies = any(name.startswith(("Mul", "_mul")) for name in names)
    if subtracts and multiplies:
        return 0.0, 1.0, "the graph normalises its input itself (Sub and Mul among its first 8 nodes, an MXNet model)"
    return 127.5, 127.5, "the default: (x - 127.5) / 127.5"


class OnnxEmbedder(nn.Module):
    """(B, 3, S, S) images normalised as (x - 127.5) / 127.5 -> (B, d) float32 embeddings, by onnxruntime.

    Runs on CPU tensors (its inputs are copied to the host); onnxruntime runs the graph with the
    CUDA provider where `cuda` is asked for and available, else on the CPU. Attributes: input_size
    (S, read from the model's input shape), embedding_size (d, from a first run where the output
    shape does not state it), input_mean / input_std / normalisation_rule.
    """

    def __init__(self, path: str | Path, cuda: bool = False):
        super().__init__()
        try:
            import onnx
            import onnxruntime
        except ImportError as error:
            raise ImportError("evaluating an ONNX model needs onnx and onnxruntime: pip install onnx onnxruntime") from error
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"onnx_path: no such file: {self.path}")
        try:
            model = onnx.load(str(self.path))
        except Exception as error:  # protobuf's DecodeError and friends
            raise ValueError(f"onnx_path={self.path} is not a readable ONNX model ({type(error).__name__}: {error})") from error
        inputs = [i for i in model.graph.input if i.name not in {init.name for init in model.graph.initializer}]
        if len(inputs) != 1 or len(model.graph.output) != 1:
            raise ValueError(
                f"onnx_path={self.path}: a face model has one input (images) and one output (embeddings), this one has "
                f"inputs {[i.name for i in inputs]} and outputs {[o.name for o in model.graph.output]}"
            )
        dims = inputs[0].type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
        if len(shape) != 4 or shape[1] != 3 or not isinstance(shape[2], int) or shape[2] != shape[3]:
            raise ValueError(
                f"onnx_path={self.path}: input {inputs[0].name!r} has shape {shape}; expected (batch, 3, S, S) "
                "with a fixed square size S"
            )
        if dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"  # a fixed batch size (e.g. 1): free it, as arcface_torch's ArcFaceORT does
        self.input_size = int(shape[2])
        self.input_mean, self.input_std, self.normalisation_rule = pixel_normalisation(self.path, model.graph)
        providers = ["CPUExecutionProvider"]
        if cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = onnxruntime.InferenceSession(model.SerializeToString(), providers=providers)
        self.providers = self.session.get_providers()
        session_input = self.session.get_inputs()[0]
        if session_input.type not in INPUT_DTYPES:
            raise ValueError(f"onnx_path={self.path}: input type {session_input.type}; expected one of {sorted(INPUT_DTYPES)}")
        self.input_name, self.input_dtype = session_input.name, INPUT_DTYPES[session_input.type]
        self.output_name = self.session.get_outputs()[0].name
        probe = self(torch.zeros(1, 3, self.input_size, self.input_size))
        if probe.ndim != 2:
            raise ValueError(f"onnx_path={self.path}: output of shape {tuple(probe.shape)} for one image; expected (1, d)")
        self.embedding_size = int(probe.shape[1])
        log.info(
            "%s: input %s %s, pixels (x - %g) / %g (%s), %d-d embeddings, providers %s",
            self.path, self.input_name, shape, self.input_mean, self.input_std, self.normalisation_rule,
            self.embedding_size, self.providers,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().to("cpu", torch.float32)
        if (self.input_mean, self.input_std) != (FACEREC_MEAN, FACEREC_STD):
            x = (x * FACEREC_STD + FACEREC_MEAN - self.input_mean) / self.input_std
        (embeddings,) = self.session.run([self.output_name], {self.input_name: x.numpy().astype(self.input_dtype, copy=False)})
        return torch.from_numpy(np.asarray(embeddings, dtype=np.float32)).to(images.device)

"""python -m facerec.tools.export: ONNX and TorchScript exports of a checkpoint's backbone, verified, with a card."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from conftest import run_script
from facerec.backbones import build
from facerec.tools.export import export_checkpoint


@pytest.fixture(scope="module")
def trained_checkpoint(trained_run) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


def read_card(path: Path) -> tuple[dict, str]:
    _, front_matter, body = path.read_text().split("---\n", 2)
    return yaml.safe_load(front_matter), body


def write_facerec_checkpoint(path: Path, name: str, backbone: nn.Module) -> Path:
    """What load_backbone reads from a train.py checkpoint: the model config and backbone.* weights."""
    config = {"model": {"_target_": "facerec.backbones.build", "name": name}}
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    torch.save({"facerec_config": config, "state_dict": state}, path)
    return path


def calibrated(name: str) -> nn.Module:
    """A backbone whose BN running statistics are those of a batch, as after training: unit-scale embeddings."""
    torch.manual_seed(0)
    model = build(name)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: one batch sets the statistics exactly
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 112, 112))
    return model.eval()


def test_export_cli_writes_a_verified_onnx_model_and_its_card(trained_checkpoint, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    out = run_script(
        ["-m", "facerec.tools.export", f"ckpt_path={trained_checkpoint}", "format=onnx", f"hydra.run.dir={tmp_path}"]
    )
    model_path = trained_checkpoint.with_suffix(".onnx")
    assert f"exported {model_path}: max abs diff from PyTorch" in out.stdout
    facts, body = read_card(model_path.with_name("last.onnx.md"))
    assert facts["input"] == {"name": "images", "shape": ["batch", 3, 32, 32], "dtype": "float32", "channel_order": "RGB"}
    assert facts["normalization"]["mean"] == facts["normalization"]["std"] == 127.5
    assert facts["embedding_size"] == 128 and facts["backbone"] == "tiny" and facts["format"] == "onnx"
    assert facts["verification"]["max_abs_diff"] < 1e-4
    assert "## Training config" in body and "num_classes: 20" in body
    # the batch dimension stays free in the exported graph
    session = onnxruntime.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    (embeddings,) = session.run(None, {"images": torch.randn(5, 3, 32, 32).numpy()})
    assert embeddings.shape == (5, 128)


def test_export_torchscript_matches_pytorch(trained_checkpoint, tmp_path):
    result = export_checkpoint(trained_checkpoint, format="torchscript", output_path=tmp_path / "tiny.pt")
    assert result.card_path == tmp_path / "tiny.pt.md" and read_card(result.card_path)[0]["format"] == "torchscript"
    scripted = torch.jit.load(str(result.model_path))
    assert scripted(torch.randn(4, 3, 32, 32)).shape == (4, 128)
    assert result.max_abs_diff < 1e-5


@pytest.mark.parametrize("name", ["mobilefacenet", "iresnet18"])
def test_onnx_export_parity_of_face_backbones(name, tmp_path):
    pytest.importorskip("onnxruntime")
    backbone = calibrated(name)
    checkpoint = write_facerec_checkpoint(tmp_path / f"{name}.ckpt", name, backbone)
    result = export_checkpoint(checkpoint, format="onnx")
    assert result.model_path == tmp_path / f"{name}.onnx"
    assert result.max_abs_diff < 1e-4 and result.min_cosine > 1 - 1e-6
    assert read_card(result.card_path)[0]["output"]["shape"] == ["batch", 512]


def test_export_refuses_an_unknown_format(tmp_path):
    with pytest.raises(ValueError, match="format must be one of \\['onnx', 'torchscript'\\], got 'tflite'"):
        export_checkpoint(tmp_path / "any.ckpt", format="tflite")

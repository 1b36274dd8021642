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


SMALL_CHECK_SET = [  # the smoke run's held-out set, small: 80 images, 80 pairs
    "+evalset.synthetic_heldout.pairs.num_identities=20",
    "+evalset.synthetic_heldout.pairs.images_per_identity=4",
    "+evalset.synthetic_heldout.pairs.num_pairs=80",
]


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_int8_export_loads_in_onnxruntime_and_reports_its_accuracy(trained_checkpoint, tmp_path, mode):
    pytest.importorskip("onnxruntime")
    output = tmp_path / "tiny.onnx"
    result = run_script([
        "-m", "facerec.tools.export", f"ckpt_path={trained_checkpoint}", f"output_path={output}", "quantize=int8",
        f"quantization.mode={mode}", "quantization.calibration_images=64", f"hydra.run.dir={tmp_path / 'run'}", *SMALL_CHECK_SET,
    ])  # fmt: skip
    int8 = tmp_path / "tiny.int8.onnx"
    facts, body = read_card(tmp_path / "tiny.int8.onnx.md")
    assert facts["file"] == "tiny.int8.onnx" and facts["precision"].startswith(f"int8 ({mode}")
    quantization = facts["quantization"]
    assert quantization["float_model"] == "tiny.onnx" and quantization["weighted_nodes_int8"] == 8  # 7 convolutions and the embedding layer
    assert quantization["weighted_ops_left_float"] == {}
    assert quantization["calibration"] == ({"set": "train", "images": 64, "seed": 0} if mode == "static" else None)
    assert facts["file_bytes"] == int8.stat().st_size < quantization["float_model_bytes"] / 1.8
    check = facts["accuracy_check"]
    assert check["set"] == "synthetic_heldout" and check["images"] == 80 and check["reference"] == "pytorch"
    for model in ("pytorch", "int8"):
        assert 0 <= check[model]["accuracy"] <= 1 and "tar@far=1e-01" in check[model]
    assert 0.9 < check["int8"]["cosine_to_reference"]["p01"] <= check["int8"]["cosine_to_reference"]["mean"] <= 1
    assert "| int8 |" in body and "| int8 |" in result.stdout and "| exported |" in result.stdout
    float_facts, _ = read_card(output.with_name("tiny.onnx.md"))
    assert float_facts["precision"] == "float32" and float_facts["accuracy_check"]["exported"]["cosine_to_reference"]["min"] > 0.99999

    evaluated = run_script(["eval.py", f"onnx_path={int8}", "eval_sets=[synthetic_heldout]", f"hydra.run.dir={tmp_path / 'eval'}", *SMALL_CHECK_SET])
    assert f"{100 * check['int8']['accuracy']:.2f}" in evaluated.stdout  # eval.py scores the INT8 model as the check did


def test_a_weighted_op_the_quantiser_leaves_in_float_is_named(tmp_path):
    pytest.importorskip("onnxruntime")
    from facerec.tools.quantize import quantize_onnx

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.Flatten()).eval()
    path = tmp_path / "upsampling.onnx"
    torch.onnx.export(model, (torch.randn(1, 3, 8, 8),), path, input_names=["images"], dynamo=True)
    with pytest.raises(ValueError, match="left weighted ops in float32: ConvTranspose x1 \\(dynamic quantisation covers Conv, MatMul and Gemm"):
        quantize_onnx(path, tmp_path / "upsampling.int8.onnx", "dynamic")
    assert not (tmp_path / "upsampling.int8.onnx").exists() and not list(tmp_path.glob(".*.tmp"))
    result = quantize_onnx(path, tmp_path / "upsampling.int8.onnx", "dynamic", allow_float=True)
    assert result.float_weighted_ops == {"ConvTranspose": 1} and result.quantised_nodes == 1


def test_calibration_images_that_cannot_be_read_are_named():
    from facerec.tools.quantize import CalibrationImages

    class Unreadable(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            raise OSError(f"cannot identify image file 'face{index}.jpg'")

    reader = CalibrationImages(Unreadable(), "images", num_images=2, name="my_faces")
    with pytest.raises(ValueError, match="quantization.calibration_set=my_faces: image [0-3] cannot be read \\(OSError: cannot identify image file"):
        reader.get_next()
    with pytest.raises(ValueError, match="quantization.calibration_set=empty: the set holds no image"):
        CalibrationImages([], "images", num_images=2, name="empty")


def test_quantizing_a_torchscript_export_is_refused(trained_checkpoint, tmp_path):
    with pytest.raises(ValueError, match="format=torchscript has no INT8 export"):
        export_checkpoint(trained_checkpoint, format="torchscript", output_path=tmp_path / "m.pt", quantize={"mode": "dynamic"})


def test_a_product_of_two_activations_is_not_a_weight_left_in_float(tmp_path):
    """Attention's Q K^T has no weight: dynamic quantisation leaves it in float32, and that is no error."""
    pytest.importorskip("onnxruntime")
    from facerec.tools.quantize import quantize_onnx

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.project = nn.Linear(8, 8)

        def forward(self, images):
            tokens = self.project(images.flatten(2).transpose(1, 2))  # (B, 16, 8)
            return (tokens @ tokens.transpose(1, 2)).softmax(-1).flatten(1)

    path = tmp_path / "attention.onnx"
    torch.onnx.export(Attention().eval(), (torch.randn(1, 8, 4, 4),), path, input_names=["images"], dynamo=True)
    result = quantize_onnx(path, tmp_path / "attention.int8.onnx", "dynamic")
    assert result.float_weighted_ops == {} and result.quantised_nodes == 1

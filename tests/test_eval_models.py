"""eval.py's model sources: a train.py checkpoint, insightface-layout weights (model= weights=) and an
ONNX file (onnx_path=) give the same numbers for the same network; every wrong combination is refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from conftest import CONF_DIR, compose_config
from facerec.backbones import build
from facerec.data import SyntheticPairs
from facerec.evaluation import extract_embeddings
from facerec.evaluation.evaluate import evaluate
from facerec.tools.export import export_checkpoint
from facerec.backbones.weights import load_backbone_weights
from test_backbones import randomise_batchnorm

INSIGHTFACE_KEYS = Path(__file__).parent / "fixtures" / "insightface_backbone_keys.json"
# 20 images, 20 pairs in 10 folds: 80 IResNet-18 forward passes for two evaluations, ~6 s on one thread.
SMALL_SET = [
    "+evalset.synthetic_heldout.pairs.num_identities=5",
    "+evalset.synthetic_heldout.pairs.images_per_identity=4",
    "+evalset.synthetic_heldout.pairs.num_pairs=20",
]
SMOKE_SET = [
    "+evalset.synthetic_heldout.pairs.num_identities=20",
    "+evalset.synthetic_heldout.pairs.images_per_identity=4",
    "+evalset.synthetic_heldout.pairs.num_pairs=80",
]
TINY = {"_target_": "facerec.backbones.build", "name": "tiny", "width": 4, "input_size": 32, "embedding_size": 64}


def evaluate_in_process(overrides: list[str], output_dir: Path) -> tuple[dict, dict]:
    """(results by set, results.json) of eval.py with these overrides."""
    cfg = compose_config([*overrides, "progress=false"], output_dir, config_name="eval")
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        results = evaluate(cfg)
    return results, json.loads((output_dir / "results.json").read_text())


def calibrated(model: nn.Module, image_size: int) -> nn.Module:
    """BN running statistics of a batch of synthetic faces, as after training: varied, unit-scale embeddings."""
    faces = SyntheticPairs(num_identities=8, images_per_identity=2, num_pairs=20, image_size=image_size, seed=3)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: one batch sets the statistics exactly
    with torch.no_grad():
        model.train()(torch.stack([faces[i][0] for i in range(len(faces))]))
    return model.eval()


def write_checkpoint(path: Path, model_config: dict, backbone: nn.Module) -> Path:
    """What load_backbone reads from a train.py checkpoint: the model config and backbone.* weights."""
    state = {f"backbone.{key}": value for key, value in backbone.state_dict().items()}
    torch.save({"facerec_config": {"model": model_config}, "state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    backbone = calibrated(build(**{k: v for k, v in TINY.items() if k != "_target_"}), 32)
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.ckpt", TINY, backbone)


@pytest.fixture(scope="module")
def onnx_model(tiny_checkpoint) -> Path:
    pytest.importorskip("onnxruntime")
    return export_checkpoint(tiny_checkpoint, format="onnx").model_path


def test_insightface_weights_give_the_numbers_of_the_same_weights_in_a_checkpoint(tmp_path):
    torch.manual_seed(0)
    backbone = randomise_batchnorm(build("iresnet18").eval())  # every tensor of the file matters
    ours = backbone.state_dict()
    # insightface's r18 state_dict, name for name and in its order (tests/fixtures, from arcface_torch)
    r18 = json.loads(INSIGHTFACE_KEYS.read_text())["models"]["r18"]
    insightface_state = {key: ours[key] for key in r18}
    assert [list(t.shape) for t in insightface_state.values()] == list(r18.values())
    torch.save(insightface_state, tmp_path / "backbone.pth")
    model_config = compose_config(["model=iresnet18"], tmp_path, config_name="eval").model
    checkpoint = write_checkpoint(tmp_path / "r18.ckpt", OmegaConf.to_container(model_config), backbone)

    from_weights, weights_json = evaluate_in_process(["model=iresnet18", f"weights={tmp_path / 'backbone.pth'}", *SMALL_SET], tmp_path / "w")
    from_checkpoint, checkpoint_json = evaluate_in_process([f"ckpt_path={checkpoint}", *SMALL_SET], tmp_path / "c")
    assert weights_json["weights"] == str(tmp_path / "backbone.pth") and weights_json["model"]["name"] == "iresnet18"
    weights_set, checkpoint_set = weights_json["sets"]["synthetic_heldout"], checkpoint_json["sets"]["synthetic_heldout"]
    assert weights_set["num_pairs"] == 20 and weights_set["fold_policy"] == "consecutive"
    assert from_weights["synthetic_heldout"].summary() == from_checkpoint["synthetic_heldout"].summary()
    assert weights_set == checkpoint_set  # every number, the embedding norms included
    assert weights_set["embedding_norm"]["mean"] > 0


def test_load_backbone_weights_loads_every_tensor(tmp_path):
    torch.manual_seed(1)
    source = build("tiny", width=4, input_size=32)
    torch.save(source.state_dict(), tmp_path / "backbone.pth")
    loaded = load_backbone_weights({**TINY, "embedding_size": 128}, tmp_path / "backbone.pth")
    assert not loaded.training
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)


def test_onnx_model_gives_the_numbers_of_the_torch_path(tiny_checkpoint, onnx_model, tmp_path):
    from_onnx, onnx_json = evaluate_in_process([f"onnx_path={onnx_model}", *SMOKE_SET], tmp_path / "onnx")
    from_torch, torch_json = evaluate_in_process([f"ckpt_path={tiny_checkpoint}", *SMOKE_SET], tmp_path / "torch")
    assert onnx_json["onnx"] == str(onnx_model)
    assert onnx_json["model"]["input_size"] == 32 and onnx_json["model"]["embedding_size"] == 64  # read from the graph
    assert (onnx_json["model"]["input_mean"], onnx_json["model"]["input_std"]) == (127.5, 127.5)
    assert onnx_json["model"]["providers"] == ["CPUExecutionProvider"]
    onnx_result, torch_result = from_onnx["synthetic_heldout"].result, from_torch["synthetic_heldout"].result
    assert onnx_result.num_pairs == 80
    for key in ["accuracy", "accuracy_std", "auc", "eer"]:
        assert abs(getattr(onnx_result, key) - getattr(torch_result, key)) < 1e-4, key
    onnx_norm = onnx_json["sets"]["synthetic_heldout"]["embedding_norm"]
    torch_norm = torch_json["sets"]["synthetic_heldout"]["embedding_norm"]
    assert onnx_norm["mean"] == pytest.approx(torch_norm["mean"], rel=1e-5)
    assert onnx_norm["std"] == pytest.approx(torch_norm["std"], rel=1e-3, abs=1e-6)


def test_onnx_pixel_norm_file_and_fixed_batch_size_as_arcface_torch_reads_them(tiny_checkpoint, onnx_model, tmp_path):
    import onnx

    from facerec.evaluation.onnx_model import OnnxEmbedder
    from facerec.backbones.weights import load_backbone

    model = onnx.load(str(onnx_model))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1  # exported for batch size 1
    fixed = tmp_path / "fixed" / "model.onnx"
    fixed.parent.mkdir()
    onnx.save(model, str(fixed))
    backbone, _ = load_backbone(tiny_checkpoint)
    faces = SyntheticPairs(num_identities=5, images_per_identity=4, num_pairs=20, image_size=32)
    images = torch.stack([faces[i][0] for i in range(6)])
    with torch.no_grad():
        expected = backbone(images)
    torch.testing.assert_close(OnnxEmbedder(fixed)(images), expected, rtol=1e-4, atol=1e-5)  # a batch of 6
    # pixel_norm.txt beside the model: the graph takes (x - 0) / 1 on 0..255 pixels
    (fixed.parent / "pixel_norm.txt").write_text("0\n1\n")
    raw_pixels = OnnxEmbedder(fixed)
    assert (raw_pixels.input_mean, raw_pixels.input_std) == (0.0, 1.0) and "pixel_norm.txt" in raw_pixels.normalisation_rule
    with torch.no_grad():
        on_pixels = backbone(images * 127.5 + 127.5)
    torch.testing.assert_close(raw_pixels(images), on_pixels, rtol=1e-4, atol=1e-3)
    (fixed.parent / "pixel_norm.txt").write_text("127.5\n")
    with pytest.raises(ValueError, match=r"pixel_norm\.txt must hold two numbers \(input_mean, input_std\), one a line; got \['127\.5'\]"):
        OnnxEmbedder(fixed)


def test_extraction_runs_a_module_without_parameters(onnx_model):
    from facerec.evaluation.onnx_model import OnnxEmbedder

    faces = SyntheticPairs(num_identities=5, images_per_identity=4, num_pairs=20, image_size=32)
    table = extract_embeddings(OnnxEmbedder(onnx_model), faces, batch_size=4)  # no device given: the CPU
    assert table.shape == (20, 64) and torch.isfinite(table).all()


def test_model_sources_are_one_of_three(tiny_checkpoint, onnx_model, tmp_path):
    usage = (
        r"exactly one of ckpt_path=<train\.py checkpoint>, model=<conf/model name, e\.g\. iresnet50> "
        r"weights=<insightface backbone\.pth>, or onnx_path=<model\.onnx>"
    )
    with pytest.raises(ValueError, match=usage + "; got none"):
        evaluate_in_process([], tmp_path)
    with pytest.raises(ValueError, match=usage + rf"; got ckpt_path={tiny_checkpoint} and onnx_path={onnx_model}"):
        evaluate_in_process([f"ckpt_path={tiny_checkpoint}", f"onnx_path={onnx_model}"], tmp_path)
    with pytest.raises(ValueError, match=r"weights=x\.pth needs model=<conf/model name, e\.g\. iresnet50>"):
        evaluate_in_process(["weights=x.pth"], tmp_path)
    with pytest.raises(ValueError, match=rf"model= goes with weights= only; with ckpt_path={tiny_checkpoint} the checkpoint's config describes"):
        evaluate_in_process(["model=iresnet18", f"ckpt_path={tiny_checkpoint}"], tmp_path)
    with pytest.raises(ValueError, match=r"bf16=true autocasts a torch backbone; onnx_path=.* runs in onnxruntime"):
        evaluate_in_process([f"onnx_path={onnx_model}", "bf16=true"], tmp_path)


def test_bad_weights_and_onnx_files_get_a_clear_error(tiny_checkpoint, tmp_path):
    state = build("tiny", width=4, input_size=32).state_dict()
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nope\.pth"):
        evaluate_in_process(["model=tiny", f"weights={tmp_path / 'nope.pth'}"], tmp_path)
    torch.save({f"module.{key}": value for key, value in state.items()}, tmp_path / "ddp.pth")
    with pytest.raises(
        ValueError,
        match=r"do not fit model=tiny .*61 missing keys: stem\.0\.weight, .*61 unexpected keys: module\.stem\.0\.weight, .*"
        r"every key of the file starts with 'module\.'",
    ):
        evaluate_in_process(["model=tiny", "model.width=4", f"weights={tmp_path / 'ddp.pth'}"], tmp_path)
    with pytest.raises(ValueError, match=r"is a train\.py checkpoint, not a plain state_dict: evaluate it with ckpt_path="):
        evaluate_in_process(["model=tiny", f"weights={tiny_checkpoint}"], tmp_path)
    torch.save({"backbone": state, "epoch": 3}, tmp_path / "wrapped.pth")
    with pytest.raises(ValueError, match=r"holds OrderedDict, int; expected a plain state_dict \{parameter name: tensor\}"):
        evaluate_in_process(["model=tiny", f"weights={tmp_path / 'wrapped.pth'}"], tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"\x00not an onnx graph" * 10)
    pytest.importorskip("onnxruntime")
    with pytest.raises(ValueError, match=r"onnx_path=.*model\.onnx is not a readable ONNX model"):
        evaluate_in_process([f"onnx_path={tmp_path / 'model.onnx'}"], tmp_path)
    with pytest.raises(FileNotFoundError, match=r"onnx_path: no such file: .*missing\.onnx"):
        evaluate_in_process([f"onnx_path={tmp_path / 'missing.onnx'}"], tmp_path)


def test_an_onnx_model_at_another_size_than_the_set_is_named(onnx_model, tmp_path):
    size = r"'synthetic_heldout' yields images of shape \(3, 64, 64\), but the ONNX model tiny\.onnx takes \(3, 32, 32\)"
    with pytest.raises(ValueError, match=size):
        evaluate_in_process([f"onnx_path={onnx_model}", "+evalset.synthetic_heldout.pairs.image_size=64"], tmp_path)
    assert not (tmp_path / "results.json").exists()  # the size check comes before any embedding

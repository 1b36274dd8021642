"""Backbones: shapes, insightface weight compatibility, save/load, precision options, configs, training."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import TINY_RUN, column, compose_config, read_metrics, run_script
from facerec.backbones import build, list_backbones
from facerec.backbones.weights import load_backbone

FIXTURE = Path(__file__).parent / "fixtures" / "insightface_backbone_keys.json"
INSIGHTFACE_NAMES = {"r18": "iresnet18", "r50": "iresnet50", "r100": "iresnet100", "mbf": "mobilefacenet"}
FACE_BACKBONES = ["mobilefacenet", "iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200"]


def randomise_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine terms, so eval-mode outputs depend on all of them."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            module.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(0.1 * torch.randn(n, generator=generator))
    return model


def test_registry_lists_every_backbone():
    assert set(list_backbones()) == {"tiny", *FACE_BACKBONES, "vit_t", "vit_s", "vit_b", "vit_l"}  # ViTs: tests/test_vit.py


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_backbone_maps_faces_to_embeddings(name):
    # Training mode: BN normalises with batch statistics. (Freshly initialised deep IResNets
    # overflow in eval mode, where BN with running_var = 1 leaves insightface's N(0, 0.1) convs unscaled.)
    model = build(name).train()
    with torch.no_grad():
        embeddings = model(torch.randn(2, 3, 112, 112))
    assert embeddings.shape == (2, 512) and embeddings.dtype == torch.float32
    assert torch.isfinite(embeddings).all()


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18"])
def test_embedding_size_and_dropout_options(name):
    model = build(name, embedding_size=64, dropout=0.5)
    assert model.embedding_size == 64 and model.dropout.p == 0.5
    assert model.train()(torch.randn(2, 3, 112, 112)).shape == (2, 64)


@pytest.mark.parametrize("insightface_name", list(INSIGHTFACE_NAMES))
def test_state_dict_names_and_shapes_match_insightface(insightface_name):
    reference = json.loads(FIXTURE.read_text())["models"][insightface_name]
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        ours = build(INSIGHTFACE_NAMES[insightface_name]).state_dict()
    assert [(key, list(value.shape)) for key, value in ours.items()] == list(reference.items())


@pytest.mark.parametrize("insightface_name", ["r18", "mbf"])
def test_insightface_shaped_weights_load_strictly_and_are_used(insightface_name):
    """A state_dict built only from the fixture's names and shapes loads with strict=True."""
    generator = torch.Generator().manual_seed(0)
    state = {
        key: torch.zeros((), dtype=torch.long) if key.endswith("num_batches_tracked") else torch.randn(shape, generator=generator)
        for key, shape in json.loads(FIXTURE.read_text())["models"][insightface_name].items()
    }
    model = build(INSIGHTFACE_NAMES[insightface_name])
    model.load_state_dict(state, strict=True)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


def test_iresnet_keeps_insightface_training_conventions():
    model = build("iresnet18")
    assert not model.features.weight.requires_grad  # the embedding BN's scale is fixed at 1
    torch.testing.assert_close(model.features.weight, torch.ones(512))
    assert model.layer1[0].downsample is not None and model.layer1[1].downsample is None


def test_state_dict_round_trip_through_a_file(tmp_path):
    model = randomise_batchnorm(build("iresnet18", embedding_size=128)).eval()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    torch.manual_seed(1)  # a differently initialised copy
    restored = build("iresnet18", embedding_size=128).eval()
    restored.load_state_dict(torch.load(tmp_path / "backbone.pth", weights_only=True), strict=True)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(restored(images), model(images), rtol=0, atol=0)


def spy_on_trunk(model: nn.Module) -> list[torch.dtype]:
    """The dtypes of the trunk's outputs, recorded on each forward pass."""
    seen, trunk = [], model.trunk

    def recording_trunk(images):
        features = trunk(images)
        seen.append(features.dtype)
        return features

    model.trunk = recording_trunk
    return seen


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet"])
def test_autocast_runs_the_trunk_in_bf16_and_the_embedding_in_float32(name):
    reference = randomise_batchnorm(build(name)).eval()
    model = build(name, autocast="bf16").eval()
    model.load_state_dict(reference.state_dict())
    trunk_dtypes = spy_on_trunk(model)
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        embeddings = model(images)
        assert trunk_dtypes == [torch.bfloat16] and embeddings.dtype == torch.float32
        # also inside an outer autocast (Lightning's bf16-mixed): the embedding layer opts out
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(images).dtype == torch.float32
            assert reference(images).dtype == torch.bfloat16  # without the option the FC follows the outer autocast
        expected = reference(images)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast casts per op, weights stay
    cosine = torch.nn.functional.cosine_similarity(embeddings, expected)
    assert cosine.min() > 0.99  # bf16 keeps ~3 significant digits


def test_channels_last_gives_the_same_embeddings_with_interchangeable_weights():
    reference = randomise_batchnorm(build("mobilefacenet")).eval()
    model = build("mobilefacenet", channels_last=True).eval()
    assert model.layers[0].layers[0].weight.is_contiguous(memory_format=torch.channels_last)
    model.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(model(images), reference(images), rtol=1e-4, atol=1e-4)


def test_bad_options_are_refused_with_the_name_and_the_choices():
    with pytest.raises(TypeError, match="'iresnet18' has no option width; its options: embedding_size"):
        build("iresnet18", width=4)
    with pytest.raises(KeyError, match="unknown backbone 'resnet50'.*iresnet50"):
        build("resnet50")
    with pytest.raises(ValueError, match="autocast must be null or one of \\['bf16', 'fp16'\\], got 'fp8'"):
        build("mobilefacenet", autocast="fp8")
    with pytest.raises(ValueError, match=r"IResNet takes \(B, 3, 112, 112\) images, got \(2, 3, 32, 32\); set the data"):
        build("iresnet18")(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("name", FACE_BACKBONES)
def test_model_configs_build_their_backbone_and_feed_the_head(name, tmp_path):
    cfg = compose_config([f"model={name}"], tmp_path)
    assert cfg.model.embedding_size == 512  # the head's, at build time
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.input_size == 112 and model.autocast is None and not model.channels_last


def test_smoke_experiment_shrinks_the_tiny_net_but_leaves_a_chosen_backbone_alone(tmp_path):
    smoke = compose_config(TINY_RUN, tmp_path).model
    assert (smoke.name, smoke.width, smoke.input_size) == ("tiny", 4, 32)  # input size follows the data
    chosen = compose_config([*TINY_RUN, "model=iresnet18", "dataset.train.image_size=112"], tmp_path).model
    assert chosen.name == "iresnet18" and "width" not in chosen
    assert compose_config([], tmp_path).model.input_size == 112


@pytest.mark.slow  # ~20 s alone, 40 s beside other tests
def test_train_iresnet18_on_cpu_then_reload(tmp_path):
    """A few steps of train.py with IResNet-18 on 112x112 synthetic faces (smoke data, shrunk)."""
    run_script(
        [
            "train.py",
            *TINY_RUN,
            "model=iresnet18",
            "dataset.train.image_size=112",
            "dataset.num_classes=4",
            "dataset.train.images_per_class=2",
            "dataset.batch_size=4",
            "evalset.synthetic_heldout.pairs.num_identities=5",
            "evalset.synthetic_heldout.pairs.images_per_identity=4",
            "evalset.synthetic_heldout.pairs.num_pairs=20",
            "trainer.max_epochs=1",
            "logger=csv",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    backbone, config = load_backbone(tmp_path / "checkpoints" / "last.ckpt")
    assert config["model"]["name"] == "iresnet18"
    assert backbone(torch.randn(1, 3, 112, 112)).shape == (1, 512)
    losses = column(read_metrics(tmp_path), "train/loss")
    assert len(losses) == 2  # 8 images / batch 4

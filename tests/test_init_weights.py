"""Training from given weights (model.weights: insightface's backbone.pth or a train.py checkpoint)
and with frozen parameters (finetune=partial), strict and weights-only; a resumed run keeps its checkpoint's."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import TINY_RUN, compose_config, run_script
from facerec.backbones import build
from facerec.backbones.weights import backbone_state, build_backbone, load_backbone_weights
from facerec.training.fit import build_module

FIXTURE = Path(__file__).parent / "fixtures" / "insightface_backbone_keys.json"
FROZEN = ("stem", "stages.0")  # the tiny net's stem and first stage


def insightface_r18_weights() -> dict[str, torch.Tensor]:
    """A state_dict in insightface's layout: arcface_torch r18's names and shapes as published (the
    fixture, extracted outside this repository), in its order, with seeded values."""
    generator = torch.Generator().manual_seed(0)
    shapes = json.loads(FIXTURE.read_text())["models"]["r18"]
    state = {}
    for key, shape in shapes.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros((), dtype=torch.long)
        else:  # small values (variances near 1), so a training forward stays finite
            state[key] = 0.05 * torch.randn(shape, generator=generator) + (1.0 if key.endswith("running_var") else 0.0)
    return state


def randomised(backbone: nn.Module, seed: int) -> nn.Module:
    """Seeded values in every tensor, BatchNorm statistics included, so a copy can be told apart from a fresh net."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in backbone.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator) + (1.0 if name.endswith("running_var") else 0.0))
    return backbone


def test_insightface_backbone_pth_initialises_the_backbone(tmp_path):
    state = insightface_r18_weights()
    torch.save(state, tmp_path / "backbone.pth")
    cfg = compose_config(
        [*TINY_RUN, "model=iresnet18", "dataset.train.image_size=112", f"model.weights={tmp_path / 'backbone.pth'}"], tmp_path
    )
    loaded = build_module(cfg).backbone.state_dict()
    assert list(loaded) == list(state)
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)


def test_a_file_that_does_not_fit_lists_its_missing_and_unexpected_keys(tmp_path):
    state = insightface_r18_weights()
    del state["layer1.0.bn1.weight"]
    state["fc.extra"] = torch.zeros(3)
    torch.save(state, tmp_path / "backbone.pth")
    cfg = compose_config(
        [*TINY_RUN, "model=iresnet18", "dataset.train.image_size=112", f"model.weights={tmp_path / 'backbone.pth'}"], tmp_path
    )
    message = (
        f"model.weights={tmp_path / 'backbone.pth'} do not fit model=iresnet18 (187 tensors in the file, 187 in the model): "
        "1 missing keys: layer1.0.bn1.weight; 1 unexpected keys: fc.extra"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        build_module(cfg)


@pytest.mark.slow  # IResNet-18 at 112 x 112 on a CPU thread: ~16 s alone
def test_train_py_from_an_insightface_file_with_frozen_early_layers(tmp_path):
    state = insightface_r18_weights()
    torch.save(state, tmp_path / "backbone.pth")
    run_script(
        [
            "train.py",
            *TINY_RUN,
            "model=iresnet18",
            f"model.weights={tmp_path / 'backbone.pth'}",
            "finetune=partial",
            "finetune.freeze=[conv1,bn1,layer1]",
            "dataset.train.image_size=112",
            "dataset.num_classes=4",
            "dataset.train.images_per_class=1",
            "dataset.batch_size=2",
            "evalset.synthetic_heldout.pairs.num_identities=5",
            "evalset.synthetic_heldout.pairs.images_per_identity=4",
            "evalset.synthetic_heldout.pairs.num_pairs=20",
            "optim.scheduler=null",
            "trainer.max_steps=2",
            "logger=csv",
            f"hydra.run.dir={tmp_path / 'run'}",
        ]
    )
    trained = backbone_state(torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True))
    frozen = ("conv1.", "bn1.", "layer1.")
    for key in state:
        if key.startswith(frozen):
            torch.testing.assert_close(trained[key], state[key], rtol=0, atol=0, msg=key)
    assert not torch.equal(trained["layer2.0.conv1.weight"], state["layer2.0.conv1.weight"])
    assert not torch.equal(trained["fc.weight"], state["fc.weight"])


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """(run dir, the weights it started from): 2 SGD steps (momentum, weight decay) of the smoke run
    from a tiny net's state_dict, with the stem and the first stage frozen."""
    tmp = tmp_path_factory.mktemp("probe")
    cfg = compose_config(TINY_RUN, tmp)
    weights = randomised(build_backbone(cfg.model), seed=1).state_dict()
    torch.save(weights, tmp / "start.pth")
    run_script(
        [
            "train.py",
            *TINY_RUN,
            f"model.weights={tmp / 'start.pth'}",
            "finetune=partial",
            f"finetune.freeze=[{','.join(FROZEN)}]",
            "optim.scheduler=null",  # the configured lr from the first step
            "trainer.max_steps=2",
            "logger=csv",
            f"hydra.run.dir={tmp / 'run'}",
        ]
    )
    return tmp / "run", weights


def test_training_starts_from_the_weights_and_leaves_frozen_parts_alone(probe_run):
    run_dir, start = probe_run
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 2 and checkpoint["facerec_config"]["finetune"]["freeze"] == list(FROZEN)
    trained = backbone_state(checkpoint)
    frozen = [key for key in start if key.startswith(FROZEN)]
    # frozen: parameters (no gradient, so no momentum or weight decay) and BatchNorm statistics (eval mode)
    assert any(key.endswith("running_mean") for key in frozen) and any(key.endswith("num_batches_tracked") for key in frozen)
    for key in frozen:
        torch.testing.assert_close(trained[key], start[key], rtol=0, atol=0, msg=key)
    model = build("tiny", width=4, input_size=32, embedding_size=128)
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad and not name.startswith(FROZEN)]
    changed = [key for key in trainable if not torch.equal(trained[key], start[key])]
    assert changed == trainable  # every other parameter took the steps from the given start
    assert torch.equal(trained["bn2.num_batches_tracked"], start["bn2.num_batches_tracked"] + 2)
    log = (run_dir / "train.log").read_text()
    assert f"backbone initialised from model.weights={run_dir.parent / 'start.pth'}" in log
    names = [name for name, _ in model.named_parameters()]
    count = sum(name.startswith(FROZEN) for name in names)
    assert f"finetune.freeze=['stem', 'stages.0']: {count} of the backbone's {len(names)} parameter tensors frozen" in log


def test_a_resumed_run_keeps_its_checkpoint_weights(probe_run, tmp_path):
    run_dir, _ = probe_run
    last = run_dir / "checkpoints" / "last.ckpt"
    out = run_script(
        [
            "train.py",
            *TINY_RUN,
            f"model.weights={tmp_path / 'gone.pth'}",  # never read: the checkpoint's weights win
            "finetune=partial",
            f"finetune.freeze=[{','.join(FROZEN)}]",
            "optim.scheduler=null",
            "trainer.max_steps=3",
            "logger=csv",
            f"ckpt_path={last}",
        ]
    )
    assert "finished after 3 steps" in out.stdout
    log = (run_dir / "train.log").read_text()
    assert f"model.weights={tmp_path / 'gone.pth'} is not loaded: the resumed run takes its weights from {last}" in log


def test_a_train_py_checkpoint_gives_its_backbone(probe_run, tmp_path):
    run_dir, _ = probe_run
    last = run_dir / "checkpoints" / "last.ckpt"
    expected = backbone_state(torch.load(last, weights_only=True))
    backbone = build_module(compose_config([*TINY_RUN, f"model.weights={last}", "model.dropout=0.2"], tmp_path)).backbone
    for key, value in backbone.state_dict().items():  # dropout changes no tensor: it may differ
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0, msg=key)
    other = compose_config([*TINY_RUN, "model=iresnet18", "dataset.train.image_size=112", f"model.weights={last}"], tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"model.weights={last} is a train.py checkpoint of model=tiny, not of model=iresnet18")):
        build_module(other)
    wider = compose_config([*TINY_RUN, "model.width=8", f"model.weights={last}"], tmp_path)
    with pytest.raises(ValueError, match=r"do not fit model=tiny .* shape mismatches: stem\.0\.weight: file \(4, 3, 3, 3\), model \(8, 3, 3, 3\)"):
        build_module(wider)


def test_frozen_batchnorm_keeps_its_statistics_in_training_mode(tmp_path):
    module = build_module(compose_config([*TINY_RUN, "finetune=partial", "finetune.freeze=stem"], tmp_path))  # one prefix: a list or a string
    backbone = module.backbone
    statistics = backbone.stem[1].running_mean.clone()
    module.train()  # as Lightning does at each epoch and after each validation
    backbone(torch.randn(4, 3, 32, 32))
    assert not backbone.stem[1].training and torch.equal(backbone.stem[1].running_mean, statistics)
    assert backbone.stages[0].down[1].training and backbone.bn2.training
    assert [name for name, p in backbone.named_parameters() if not p.requires_grad] == [
        "stem.0.weight", "stem.1.weight", "stem.1.bias", "stem.2.weight"
    ]  # fmt: skip


def test_freeze_names_prefixes_that_match_nothing(tmp_path):
    cfg = compose_config([*TINY_RUN, "finetune=partial", "finetune.freeze=[stem,layer1]"], tmp_path)
    with pytest.raises(ValueError, match=r"finetune.freeze=\['stem', 'layer1'\]: no parameter name of the backbone TinyNet starts with 'layer1'; its parameters are named stem, stages, bn2, fc, features\."):
        build_module(cfg)


def test_weights_and_freeze_are_not_constructor_options(tmp_path):
    with pytest.raises(ValueError, match=r"model.weights='x.pth' is applied by train.py .* not by build\('tiny'\)"):
        build("tiny", weights="x.pth")
    assert build("tiny", weights=None, freeze=[]).stem is not None  # the model configs' defaults
    cfg = compose_config([*TINY_RUN, "model.weights=x.pth"], tmp_path)
    with pytest.raises(ValueError, match=r"model.weights=x.pth is where train.py starts training from; the weights to evaluate are weights=y.pth"):
        load_backbone_weights(cfg.model, "y.pth")

"""finetune=: how a run trains the backbone it starts from (full, partial, linear_probe, lora;
facerec/training/finetune.py), with checkpoints that hold the plain backbone."""
from __future__ import annotations

import re
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from torch import nn

from conftest import TINY_RUN, column, compose_config, read_metrics, run_script
from facerec.backbones import build
from facerec.backbones.weights import backbone_state, build_backbone
from facerec.checkpoint_files import file_sha256
from facerec.config import instantiate_all
from facerec.evaluation.models import from_checkpoint, from_onnx
from facerec.tools.export import export_checkpoint
from facerec.training.finetune import LoRA
from facerec.training.fit import build_module, check_resume_compatible

ORL_SMOKE = [*TINY_RUN, "dataset=orl"]  # the smoke run's size (32 x 32, tiny net) on ORL's 30 people


@pytest.fixture(scope="module")
def start(trained_run) -> Path:
    """A smoke run's checkpoint: the published model the tests fine-tune."""
    return trained_run / "checkpoints" / "last.ckpt"


def fit(run_dir: Path, overrides: list[str], steps: int = 3) -> tuple[L.LightningModule, Path]:
    """`steps` optimizer steps of a smoke run as train.py builds it, in this process; (module, its checkpoint)."""
    cfg = compose_config([*TINY_RUN, "logger=csv", "+trainer.limit_val_batches=0", "+trainer.enable_checkpointing=false",
                          "+trainer.enable_progress_bar=false", f"trainer.max_steps={steps}", *overrides], run_dir)  # fmt: skip
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.dataset)
    module = build_module(cfg)
    trainer = instantiate(cfg.trainer, callbacks=[instantiate(cfg.callbacks.lr_monitor)], logger=instantiate_all(cfg.logger))
    trainer.fit(module, datamodule=datamodule)
    trainer.save_checkpoint(run_dir / "last.ckpt")
    return module, run_dir / "last.ckpt"


def test_lora_with_class_means_starts_above_random_centres(start, tmp_path):
    first_top1 = {}
    for init in ("class_means", "random"):
        run_dir = tmp_path / init
        run_script(["train.py", *ORL_SMOKE, "finetune=lora", f"head.init={init}", f"model.weights={start}",
                    "trainer.max_steps=3", "trainer.log_every_n_steps=1", "logger=csv", f"hydra.run.dir={run_dir}"])  # fmt: skip
        first_top1[init] = column(read_metrics(run_dir), "train/top1")[0]
    (init_top1,) = column(read_metrics(tmp_path / "class_means"), "train/init_top1")
    assert first_top1["class_means"] > first_top1["random"] + 0.2 and init_top1 > 0.3  # 30 classes: chance is 0.033


def embeddings_of(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return backbone.eval()(images)


def test_a_lora_checkpoint_holds_the_merged_backbone_for_eval_and_onnx(start, tmp_path):
    module, checkpoint_path = fit(tmp_path, ["finetune=lora", f"model.weights={start}", "finetune.rank=4"])
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    adapted = embeddings_of(module.backbone, images)
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    plain = build_backbone(checkpoint["facerec_config"]["model"])
    assert list(backbone_state(checkpoint)) == list(plain.state_dict())  # plain key names, in the backbone's order
    starting = embeddings_of(from_checkpoint(start, torch.device("cpu")).embedder, images)
    assert (adapted - starting).abs().max() > 1e-3  # the adapters learnt something to merge
    evaluated = embeddings_of(from_checkpoint(checkpoint_path, torch.device("cpu")).embedder, images)
    torch.testing.assert_close(evaluated, adapted, rtol=0, atol=1e-5)
    exported = export_checkpoint(checkpoint_path, "onnx", tmp_path / "model.onnx").model_path
    onnx_embeddings = embeddings_of(from_onnx(exported, torch.device("cpu")).embedder, images)  # eval.py onnx_path=
    torch.testing.assert_close(onnx_embeddings, adapted, rtol=0, atol=1e-5)
    # the starting weights' file and hash; model.weights= from a LoRA checkpoint reads its plain backbone
    assert checkpoint["starting_weights"] == {"file": str(start), "sha256": file_sha256(start)}
    restarted = build_module(compose_config([*TINY_RUN, f"model.weights={checkpoint_path}"], tmp_path / "again")).backbone
    torch.testing.assert_close(embeddings_of(restarted, images), adapted, rtol=0, atol=1e-5)


def calibrated(name: str) -> nn.Module:
    """A backbone whose BatchNorm statistics are one batch's, as after training (untrained statistics
    blow a deep net's embeddings up to ~1e6, where float32 rounding dominates any comparison)."""
    torch.manual_seed(0)
    model = build(name, embedding_size=64, **({"width": 4} if name == "tiny" else {}))
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a cumulative average: one batch sets the statistics
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 112, 112))
    return model.eval()


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18", "vit_t"])
def test_lora_merged_equals_adapted_on_every_backbone(name):
    lora = LoRA(rank=2)
    adapted = lora.prepare(calibrated(name))
    for parameter_name, parameter in adapted.named_parameters():
        if "lora_B" in parameter_name:
            nn.init.normal_(parameter, std=0.05)  # B starts at zero: give the adapters something to merge
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)  # only adapters learn
    plain_state, kept = lora.plain_state(adapted, adapted.state_dict())
    plain = build(name, embedding_size=64, **({"width": 4} if name == "tiny" else {}))
    plain.load_state_dict(plain_state, strict=True)
    images = torch.randn(2, 3, 112, 112)
    merged, unmerged = embeddings_of(plain, images), embeddings_of(adapted, images)
    assert (merged - embeddings_of(calibrated(name), images)).abs().max() > 1e-2  # the adapters change the model
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5 * unmerged.abs().max().item())
    assert lora.training_state(plain_state, kept) is kept


def test_full_fine_tuning_gives_the_backbone_its_own_learning_rate(start, tmp_path):
    module, _ = fit(tmp_path, ["finetune=full", f"model.weights={start}"], steps=2)
    backbone_group, head_group = module.trainer.optimizers[0].param_groups
    assert (backbone_group["name"], head_group["name"]) == ("backbone", "head")
    assert (backbone_group["initial_lr"], head_group["initial_lr"]) == (pytest.approx(0.01), pytest.approx(0.1))
    assert backbone_group["lr"] == pytest.approx(0.1 * head_group["lr"])  # the schedule scales both
    assert backbone_group["params"] == list(module.backbone.parameters())
    centres = [p for group in (backbone_group, head_group) for p in group["params"]][module._centres_index()]
    assert centres is module.head.centres.weight
    rows = read_metrics(tmp_path)
    backbone_lrs, head_lrs = column(rows, "train/lr/backbone"), column(rows, "train/lr/head")
    assert len(backbone_lrs) == 2 and backbone_lrs == pytest.approx([0.1 * lr for lr in head_lrs])


@pytest.mark.parametrize("embedding_layer", [False, True])
def test_a_linear_probe_leaves_the_backbone_as_it_was(start, tmp_path, embedding_layer):
    module, checkpoint_path = fit(tmp_path, ["finetune=linear_probe", f"finetune.train_embedding_layer={embedding_layer}",
                                             f"model.weights={start}"])  # fmt: skip
    before = backbone_state(torch.load(start, weights_only=True))
    after = backbone_state(torch.load(checkpoint_path, weights_only=True))
    trained = ("bn2.", "fc.", "features.") if embedding_layer else ()
    for key in before:  # parameters and BatchNorm statistics alike
        if not key.startswith(trained):
            assert torch.equal(after[key], before[key]), key
    if embedding_layer:
        assert not torch.equal(after["fc.weight"], before["fc.weight"])
        assert not torch.equal(after["features.running_mean"], before["features.running_mean"])


def test_fine_tuning_mistakes_are_named(start, tmp_path):
    def refused(overrides: list[str], message: str) -> None:
        with pytest.raises(ValueError, match=message):
            build_module(compose_config([*TINY_RUN, *overrides], tmp_path))

    refused(["finetune=lora", "finetune.target_modules=[conv9]"],
            r"finetune.target_modules=\['conv9'\] does not fit the backbone TinyNet .* its convolutions and linear layers are named stem\.0, ")  # fmt: skip
    refused(["finetune=partial", "finetune.freeze=[stem,stages,bn2,fc,features]"],
            r"freezes every parameter of the backbone TinyNet: nothing of it is left to train; that is finetune=linear_probe")  # fmt: skip
    refused(["finetune=partial", "finetune.freeze=[]"], r"finetune=partial with finetune.freeze=\[\]: name the parameter prefixes")
    refused(["finetune=full", "finetune.backbone_lr_scale=0"], r"finetune.backbone_lr_scale=0: expected a positive factor")
    refused(["model.freeze=[stem]"], re.escape("model.freeze=['stem']: parameters are kept fixed by the fine-tuning mode now: finetune=partial finetune.freeze=[stem]"))  # fmt: skip
    refused([f"model.weights={start}", "model.embedding_size=64"],
            r"do not fit model=tiny .* shape mismatches: fc\.weight: file \(128, 128\), model \(64, 128\)")  # fmt: skip


def test_a_run_resumes_only_in_its_own_fine_tuning_mode(start, tmp_path):
    _, checkpoint_path = fit(tmp_path, ["finetune=lora", f"model.weights={start}"], steps=1)
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    cfg = compose_config([*TINY_RUN, "finetune=full"], tmp_path / "other")
    with pytest.raises(ValueError, match=r"finetune: checkpoint LoRA\(rank=8, .*\), config FineTuning\(backbone_lr_scale=0.1\)"):
        check_resume_compatible(cfg, checkpoint, checkpoint_path)
    check_resume_compatible(compose_config([*TINY_RUN, "finetune=lora"], tmp_path / "same"), checkpoint, checkpoint_path)


@pytest.mark.slow
def test_lora_from_class_means_trains_on_two_processes_class_sharded_as_it_does_dense(start, tmp_path):
    """finetune=lora with head.init=class_means, DDP on two processes (gloo), the class centres sharded
    (Partial FC) and dense, in float64: after the run the merged backbones and the classifiers agree."""
    states = {}
    for sharding, overrides in [("partial_fc", ["sharding=partial_fc"]), ("dense", [])]:
        run_dir = tmp_path / sharding
        run_script(["train.py", *TINY_RUN, "finetune=lora", "head.init=class_means", f"model.weights={start}", *overrides,
                    "trainer=ddp_cpu", "trainer.devices=2", "trainer.max_steps=6", "trainer.deterministic=true",
                    "trainer.precision=64-true", "logger=csv", f"hydra.run.dir={run_dir}"])  # fmt: skip
        states[sharding] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert states["partial_fc"]["global_step"] == 6
    for key, value in states["dense"]["state_dict"].items():
        torch.testing.assert_close(states["partial_fc"]["state_dict"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    before = backbone_state(torch.load(start, weights_only=True))
    after = backbone_state(states["dense"])
    assert not torch.equal(after["stem.0.weight"], before["stem.0.weight"].double())  # the merged adapters
    assert torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"].double())  # statistics kept

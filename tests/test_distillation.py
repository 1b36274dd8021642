"""Distillation (distill=embedding | ekd): the losses and their gradients against plain formulas, the
teacher kept out of the student's parameters and checkpoints, a run from a checkpoint, an insightface-
layout state_dict and an ONNX teacher, exact resume, and the errors a user will meet."""
from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hydra import initialize_config_dir

from conftest import CONF_DIR, TINY_RUN, column, read_metrics, run_script
from facerec.backbones.weights import load_backbone
from facerec.checkpoint_files import file_sha256
from facerec.training.distillation import Distillation, EmbeddingDistillation, EvaluationOrientedDistillation, Teacher
from facerec.tools.export import export_checkpoint


@pytest.fixture(scope="module")
def teacher_checkpoint(trained_run) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


def test_embedding_loss_and_gradients_equal_the_formula(teacher_checkpoint):
    torch.manual_seed(0)
    teacher = Teacher(teacher_checkpoint)
    distillation = Distillation(teacher, student_embedding_size=16, margin_weight=0.5, embedding_weight=3.0)
    images = torch.randn(6, 3, teacher.input_size, teacher.input_size)
    student = torch.randn(6, 16, requires_grad=True)
    margin_loss = torch.tensor(2.0)
    loss, stats = distillation(images, student, torch.arange(6), margin_loss)

    # the reference in float64; the losses compute in float32 (embeddings under autocast are cast up)
    projection = distillation.embedding.projection.weight.detach().double().requires_grad_(True)
    reference_student = student.detach().double().requires_grad_(True)
    target = teacher(images).double()
    projected = reference_student @ projection.T
    cosine = (projected / projected.norm(dim=1, keepdim=True) * target / target.norm(dim=1, keepdim=True)).sum(1)
    reference = 0.5 * 2.0 + 3.0 * (1 - cosine).mean()
    torch.testing.assert_close(loss.double(), reference, rtol=1e-6, atol=1e-6)
    loss.backward()
    reference.backward()
    torch.testing.assert_close(student.grad.double(), reference_student.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(distillation.embedding.projection.weight.grad.double(), projection.grad, rtol=1e-4, atol=1e-6)
    assert stats["loss_margin"] == 2.0 and stats["distill_embedding"] == pytest.approx((1 - cosine).mean().item(), abs=1e-6)
    assert stats["teacher_cosine"] == pytest.approx(cosine.mean().item(), abs=1e-6)


def test_l2_distance_is_the_squared_distance_of_unit_vectors():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 8), torch.randn(5, 8)
    loss, _ = EmbeddingDistillation(8, 8, "l2")(student, teacher)
    expected = (F.normalize(student.double(), dim=1) - F.normalize(teacher.double(), dim=1)).pow(2).sum(1).mean()
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)


def plain_ekd(student, teacher, labels, student_thresholds, teacher_thresholds, top_k, temperature, positive_weight, negative_weight):
    """EKD's rank loss by loops over pairs, with given thresholds."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    positives, negatives = [], []
    for i, j in itertools.combinations(range(len(labels)), 2):
        (positives if labels[i] == labels[j] else negatives).append((s[i] @ s[j], t[i] @ t[j]))

    def rank(similarity, thresholds):
        return sum(torch.sigmoid((similarity - threshold) / temperature) for threshold in thresholds)

    def mse(pairs):
        return sum((rank(a, student_thresholds) - rank(b, teacher_thresholds)) ** 2 for a, b in pairs) / len(pairs)

    hardest = sorted(negatives, key=lambda pair: -pair[0].item())[:top_k]
    return (negative_weight * mse(hardest) if hardest else 0) + (positive_weight * mse(positives) if positives else 0)


def test_ekd_equals_a_loop_over_pairs_and_tracks_its_thresholds():
    torch.manual_seed(2)
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    student = torch.randn(8, 6, requires_grad=True)
    teacher = torch.randn(8, 6)
    ekd = EvaluationOrientedDistillation(fprs=(0.1, 0.01), top_k=10, temperature=0.05, momentum=0.5)
    loss = ekd(student, teacher, labels)  # training mode: the thresholds move first, then the loss uses them
    for thresholds, embeddings in ((ekd.student_thresholds, student), (ekd.teacher_thresholds, teacher)):
        unit = F.normalize(embeddings.detach(), dim=1)
        ranked = sorted((unit[i] @ unit[j]).item() for i, j in itertools.combinations(range(8), 2) if labels[i] != labels[j])[::-1]
        # 24 negative pairs: FPR 0.1 is the 3rd highest (index 2), 0.01 the highest; lerp from zero at rate 0.5
        torch.testing.assert_close(thresholds, torch.tensor([0.5 * ranked[2], 0.5 * ranked[0]]))
    reference = plain_ekd(student, teacher, labels, ekd.student_thresholds, ekd.teacher_thresholds, 10, 0.05, 0.02, 0.01)
    torch.testing.assert_close(loss, reference)
    (gradient,) = torch.autograd.grad(loss, student)
    (expected,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(gradient, expected)

    ekd.eval()
    before = ekd.student_thresholds.clone()
    for batch_labels, top_k in ((torch.arange(8), 10), (torch.zeros(8, dtype=torch.long), 10), (labels, 1000)):
        ekd.top_k = top_k  # no positive pair; no negative pair; fewer negatives than top_k
        loss = ekd(student, teacher, batch_labels)
        expected = plain_ekd(student, teacher, batch_labels, ekd.student_thresholds, ekd.teacher_thresholds, top_k, 0.05, 0.02, 0.01)
        torch.testing.assert_close(loss, torch.as_tensor(expected, dtype=loss.dtype))
    assert torch.equal(before, ekd.student_thresholds)  # eval mode leaves the thresholds


def test_the_losses_compute_in_float32_under_autocast(teacher_checkpoint):
    torch.manual_seed(3)
    distillation = Distillation(Teacher(teacher_checkpoint), student_embedding_size=16, embedding_weight=1.0, relation_weight=1.0)
    targets = torch.randn(8, 128)
    distillation.teacher = lambda images: targets  # the same targets in both precisions: the losses alone compared
    distillation.eval()  # EKD's thresholds stay where they are between the two calls
    images, student, labels = torch.randn(8, 3, 32, 32), torch.randn(8, 16), torch.tensor([0, 0, 1, 1, 2, 3, 4, 5])
    with torch.no_grad():
        plain, _ = distillation(images, student, labels, torch.tensor(0.0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            projected = distillation.embedding.projection(student)
            autocast, stats = distillation(images, student, labels, torch.tensor(0.0))
    assert projected.dtype == torch.bfloat16  # what the projection would compute in, left alone
    assert autocast.dtype == torch.float32 and stats["distill_embedding"].dtype == torch.float32
    torch.testing.assert_close(autocast, plain, rtol=1e-6, atol=1e-6)


def test_the_teacher_is_neither_trained_nor_saved_nor_copied(teacher_checkpoint):
    teacher = Teacher(teacher_checkpoint)
    distillation = Distillation(teacher, student_embedding_size=8, embedding_weight=1.0, relation_weight=1.0)
    assert [name for name, _ in distillation.named_parameters()] == ["embedding.projection.weight"]
    assert set(distillation.state_dict()) == {"embedding.projection.weight", "relation.student_thresholds", "relation.teacher_thresholds"}
    assert copy.deepcopy(distillation).teacher is teacher  # the weight EMA deep-copies the module
    restored = pickle.loads(pickle.dumps(teacher))
    assert restored.identity == teacher.identity
    assert teacher.identity["sha256"] == file_sha256(teacher_checkpoint) and teacher.identity["kind"] == "checkpoint"
    assert not any(p.requires_grad for p in teacher.embedder.parameters()) and not teacher.embedder.training


def test_a_distilled_run_logs_every_component_and_records_its_teacher(teacher_checkpoint, tmp_path):
    run_script([
        "train.py", *TINY_RUN, "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={tmp_path}", "model.embedding_size=16",
        "distill=embedding", f"distill.teacher={teacher_checkpoint}", "distill.weights.relation=1.0",
    ])  # fmt: skip
    rows = read_metrics(tmp_path)
    for key in ("train/loss_margin", "train/distill_embedding", "train/distill_relation", "train/teacher_cosine"):
        assert column(rows, key), key
    margin, embedding, relation = (column(rows, f"train/{k}") for k in ("loss_margin", "distill_embedding", "distill_relation"))
    losses = column(rows, "train/loss")
    assert losses[0] == pytest.approx(margin[0] + 10.0 * embedding[0] + relation[0], rel=1e-5)
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["distill_teacher"]["sha256"] == file_sha256(teacher_checkpoint)
    assert "distillation.embedding.projection.weight" in checkpoint["state_dict"]
    assert not any(key.startswith("distillation.teacher") for key in checkpoint["state_dict"])
    backbone, _ = load_backbone(tmp_path / "checkpoints" / "last.ckpt")  # eval and export read the student alone
    assert backbone.embedding_size == 16


def test_an_insightface_layout_and_an_onnx_teacher_give_the_checkpoints_embeddings(teacher_checkpoint, tmp_path):
    backbone, config = load_backbone(teacher_checkpoint)
    weights = tmp_path / "backbone.pth"
    torch.save(backbone.state_dict(), weights)
    onnx_path = export_checkpoint(teacher_checkpoint, format="onnx", output_path=tmp_path / "teacher.onnx").model_path
    from facerec.training.distillation import teacher_model_config

    images = torch.randn(4, 3, backbone.input_size, backbone.input_size)
    expected = Teacher(teacher_checkpoint)(images)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        model_config = {**teacher_model_config("tiny_smoke", backbone.input_size), "embedding_size": backbone.embedding_size}
    torch.testing.assert_close(Teacher(weights, model_config)(images), expected)
    onnx_teacher = Teacher(onnx_path)
    assert onnx_teacher.identity["kind"] == "onnx"
    torch.testing.assert_close(onnx_teacher(images), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="distill.teacher_model=<conf/model name"):
        Teacher(weights)


@pytest.mark.slow
def test_a_resumed_distillation_run_equals_an_uninterrupted_one(teacher_checkpoint, tmp_path):
    from fault_injection import signal_at

    overrides = [
        *TINY_RUN, "trainer.max_epochs=2", "trainer.deterministic=true", "logger=csv", "distill=ekd",
        f"distill.teacher={teacher_checkpoint}", "distill.weights.embedding=1.0",
    ]  # fmt: skip
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(["train.py", *overrides, f"hydra.run.dir={straight}"])
    run_script(["train.py", *overrides, f"hydra.run.dir={resumed}", signal_at(13)])
    run_script(["train.py", *overrides, f"hydra.run.dir={resumed}", "ckpt_path=last"])
    final_straight = torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)
    final_resumed = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)
    assert final_resumed["global_step"] == final_straight["global_step"] == 20
    for key, value in final_straight["state_dict"].items():
        assert torch.equal(value, final_resumed["state_dict"][key]), key
    assert final_straight["state_dict"]["distillation.relation.student_thresholds"].abs().sum() > 0  # EKD's state moved, and resumed

    other = tmp_path / "other_teacher.ckpt"
    other.write_bytes(teacher_checkpoint.read_bytes() + b"\0")  # same weights, another file
    refused = run_script(["train.py", *overrides, f"hydra.run.dir={resumed}", "ckpt_path=last", f"distill.teacher={other}"], check=False)
    assert refused.returncode != 0 and "it learnt from the teacher last.ckpt" in refused.stderr
    changed = run_script(["train.py", *overrides, f"hydra.run.dir={resumed}", "ckpt_path=last", "distill.weights.embedding=2.0"], check=False)
    assert changed.returncode != 0 and "distill.weights: checkpoint {'margin': 1.0, 'embedding': 1.0" in changed.stderr
    without = [o for o in overrides if not o.startswith("distill")]
    refused = run_script(["train.py", *without, f"hydra.run.dir={resumed}", "ckpt_path=last"], check=False)
    assert refused.returncode != 0 and "trained with distillation from last.ckpt" in refused.stderr


def test_a_teacher_of_another_input_size_is_refused(teacher_checkpoint, tmp_path):
    result = run_script(
        ["train.py", *TINY_RUN, "dataset.train.image_size=48", "trainer.max_steps=1", "logger=csv", f"hydra.run.dir={tmp_path}",
         "distill=embedding", f"distill.teacher={teacher_checkpoint}"],
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "takes 32x32 images, the student's training data (dataset.train.image_size" in result.stderr and "yields 48x48" in result.stderr


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["distill.teacher_model=resnet9000"], "no conf/model/resnet9000.yaml"),
        (["distill.weights.embedding=0"], "embedding or relation positive"),
        (["distill.distance=manhattan"], "distill.distance='manhattan'"),
    ],
)
def test_distillation_settings_are_checked(teacher_checkpoint, tmp_path, overrides, message):
    result = run_script(
        ["train.py", *TINY_RUN, "trainer.max_steps=1", "logger=csv", f"hydra.run.dir={tmp_path}", "distill=embedding",
         f"distill.teacher={teacher_checkpoint}", *overrides],
        check=False,
    )  # fmt: skip
    assert result.returncode != 0 and message in result.stderr


def test_a_missing_teacher_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="distill.teacher=.*nowhere.ckpt: no such file"):
        Teacher(tmp_path / "nowhere.ckpt")


@pytest.mark.slow
def test_distillation_under_ddp_partial_fc_and_ema(teacher_checkpoint, tmp_path):
    """Two gloo ranks, each distilling its own batch, with sharded class centres and a weight EMA (which
    deep-copies the module: the teacher is shared); the projection and EKD's thresholds are saved and
    the averaged checkpoint evaluates."""
    run_script([
        "train.py", *TINY_RUN, "sharding=partial_fc", "trainer=ddp_cpu", "trainer.devices=2", "callbacks=ema", "logger=csv",
        f"hydra.run.dir={tmp_path}", "model.embedding_size=16", "distill=ekd", f"distill.teacher={teacher_checkpoint}",
        "distill.weights.embedding=1.0",
    ])  # fmt: skip
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    for state in (checkpoint["state_dict"], checkpoint["current_model_state"]):
        assert state["distillation.embedding.projection.weight"].shape == (128, 16)
        assert state["distillation.relation.teacher_thresholds"].abs().sum() > 0
    assert column(read_metrics(tmp_path), "train/distill_relation")
    run_script(["eval.py", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}", f"hydra.run.dir={tmp_path / 'eval'}"])

"""Knowledge distillation as a training mode (`distill=embedding` | `distill=ekd`, conf/distill/).

A frozen teacher, in eval mode, embeds the same augmented images in the same step; the student's
own margin loss (any head, any scale policy) is added to distillation losses on the two embeddings:

- **embedding**: the student's embedding, through a learnt linear projection where its size differs
  from the teacher's (FitNet's regressor, Romero et al., ICLR 2015), pulled towards the teacher's:
  `cosine` 1 - cos(P e_s, e_t) or `l2` |n(P e_s) - n(e_t)|^2, on unit vectors (only the direction
  of an embedding is ever compared, so its norm is left to the student).
- **ekd**: Evaluation-oriented Knowledge Distillation (Huang, Wu, Xu and Ding, CVPR 2022; TFace's
  `recognition/tasks/ekd`), the relation loss with the best published face results of those TFace
  compares (RKD, CC, DarkRank, similarity preserving): the batch's pair similarities, ranked against
  thresholds at fixed false-positive rates of each model's own negative pairs (running averages),
  as soft counts of thresholds passed; the student's counts are matched to the teacher's on the
  positive pairs and on the `top_k` hardest negative pairs of the student. It transfers where pairs
  sit relative to the operating points the evaluation reads, not the embedding itself, so a student
  of another size needs no projection.

The teacher (`Teacher`) is loaded the way eval.py loads a model (facerec.evaluation.models): a
train.py checkpoint, a plain state_dict such as insightface's backbone.pth with `distill.teacher_model`
naming its conf/model config, or an ONNX file. It is not a submodule: its weights are neither trained
nor saved in the student's checkpoints; the checkpoint records its file name and SHA-256, and a run
resumes only with the same teacher.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf, open_dict
from torch import nn

from facerec.checkpoint_files import file_sha256, load_checkpoint
from facerec.evaluation.models import EvaluationModel, from_checkpoint, from_onnx, from_weights

log = logging.getLogger(__name__)

DISTANCES = ("cosine", "l2")


class Teacher:
    """A frozen embedding model and its identity (file name, path, SHA-256, kind), shared, never copied:
    a deep copy of the training module (the weight EMA makes one) keeps the same teacher, and a
    pickled one loads its file again."""

    def __init__(self, path: str | Path, model_config: dict | None = None):
        self.path = Path(path)
        self.model_config = model_config
        if not self.path.is_file():
            raise FileNotFoundError(f"distill.teacher={self.path}: no such file")
        self.model = load_teacher_model(self.path, model_config)
        self.embedder = self.model.embedder.eval().requires_grad_(False)
        self.input_size = int(self.model.input_size)
        self.embedding_size = int(self.embedder.embedding_size)
        self.identity = {
            "file": self.path.name,
            "path": str(self.path.resolve()),
            "sha256": file_sha256(self.path),
            "kind": next(iter(self.model.source)),  # checkpoint | weights | onnx
            "model": self.model.description,
            "input_size": self.input_size,
            "embedding_size": self.embedding_size,
        }
        self._device = torch.device("cpu")

    def __deepcopy__(self, memo) -> Teacher:
        return self

    def __reduce__(self):
        return Teacher, (self.path, self.model_config)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, d_t) float32 embeddings of the student's (augmented, normalised) images."""
        if self._device != images.device:  # once: a torch teacher follows the student (an ONNX one copies to the host itself)
            self.embedder.to(images.device)
            self._device = images.device
        return self.embedder(images).float()

    def check_input_size(self, image_size: int | None, student: str) -> None:
        if image_size is not None and int(image_size) != self.input_size:
            raise ValueError(
                f"distill.teacher={self.path}: the teacher ({self.model.description}) takes {self.input_size}x{self.input_size} "
                f"images, the student's training data ({student}) yields {image_size}x{image_size}; both must see the same images"
            )


def load_teacher_model(path: Path, model_config: dict | None) -> EvaluationModel:
    """The teacher's frozen embedder by its file: .onnx -> onnxruntime; a train.py checkpoint -> its
    backbone; any other file -> a plain state_dict for `model_config` (distill.teacher_model)."""
    cpu = torch.device("cpu")
    if path.suffix == ".onnx":
        return from_onnx(path, cpu)
    content = load_checkpoint(path, mmap=True, what="teacher file")
    if isinstance(content, dict) and "facerec_config" in content:
        del content
        return from_checkpoint(path, cpu)
    if model_config is None:
        raise ValueError(
            f"distill.teacher={path} is a plain state_dict (not a train.py checkpoint or an ONNX file): name the backbone "
            "it is for with distill.teacher_model=<conf/model name, e.g. iresnet50>"
        )
    return from_weights(model_config, path, cpu)


def teacher_model_config(name: str | None, image_size: int | None) -> dict | None:
    """The conf/model config `name` (distill.teacher_model), at the training data's image size.
    Composing needs an initialised Hydra (inside train.py, or a `hydra.initialize*` context)."""
    if name is None:
        return None
    try:
        config = compose(overrides=[f"+model@teacher_model={name}"]).teacher_model
    except MissingConfigException:
        known = GlobalHydra.instance().config_loader().get_group_options("model")
        raise ValueError(f"distill.teacher_model={name}: no conf/model/{name}.yaml; expected one of {known}") from None
    with open_dict(config):
        config.input_size = image_size if image_size is not None else 112
        config.weights, config.freeze = None, []
    return OmegaConf.to_container(config, resolve=True)


class EmbeddingDistillation(nn.Module):
    """1 - cos(P e_s, e_t) ("cosine") or |n(P e_s) - n(e_t)|^2 ("l2"), averaged over the batch; P a
    learnt linear map (no bias) from the student's size to the teacher's, the identity where they agree."""

    def __init__(self, student_size: int, teacher_size: int, distance: str = "cosine"):
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distill.distance={distance!r}; expected one of {DISTANCES}")
        self.distance = distance
        self.projection = nn.Linear(student_size, teacher_size, bias=False) if student_size != teacher_size else nn.Identity()

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss, the per-sample cosine between the projected student and the teacher)."""
        cosine = (F.normalize(self.projection(student.float()), dim=1) * F.normalize(teacher.float(), dim=1)).sum(1)
        distance = 1 - cosine if self.distance == "cosine" else 2 - 2 * cosine  # |u - v|^2 = 2 - 2 cos for unit u, v
        return distance.mean(), cosine.detach()


class EvaluationOrientedDistillation(nn.Module):
    """EKD's rank-based relation loss (see the module doc), written from the paper's description.

    For each model, the negative pairs' similarities of the batch, sorted in decreasing order, give
    thresholds at the false-positive rates `fprs` (the entry at index floor(n_neg * fpr), the
    largest where n_neg * fpr < 1), smoothed over steps by a running average of rate `momentum`
    (buffers, saved in checkpoints). A pair's soft rank is sum_k sigmoid((sim - threshold_k) / temperature):
    how many operating points it passes. The loss is `positive_weight` times the mean squared
    difference of the student's and the teacher's soft ranks over the positive pairs (same label),
    plus `negative_weight` times the same over the `top_k` negative pairs the student scores highest.
    A batch without positive pairs contributes the negative term only. Defaults: TFace's.
    """

    def __init__(
        self,
        fprs: tuple[float, ...] = (1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6),
        top_k: int = 2000,
        temperature: float = 0.01,
        momentum: float = 0.01,
        positive_weight: float = 0.02,
        negative_weight: float = 0.01,
    ):
        super().__init__()
        if not fprs or any(not 0 < fpr < 1 for fpr in fprs):
            raise ValueError(f"distill.ekd.fprs={list(fprs)}: expected false-positive rates in (0, 1)")
        if top_k < 1 or temperature <= 0 or not 0 < momentum <= 1:
            raise ValueError(f"distill.ekd: top_k >= 1, temperature > 0 and momentum in (0, 1]; got {top_k}, {temperature}, {momentum}")
        self.fprs = tuple(float(f) for f in fprs)
        self.top_k, self.temperature, self.momentum = int(top_k), float(temperature), float(momentum)
        self.positive_weight, self.negative_weight = float(positive_weight), float(negative_weight)
        self.register_buffer("student_thresholds", torch.zeros(len(self.fprs)))
        self.register_buffer("teacher_thresholds", torch.zeros(len(self.fprs)))

    def soft_rank(self, similarities: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid((similarities[:, None] - thresholds[None, :]) / self.temperature).sum(1)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = labels.numel()
        upper = torch.triu_indices(batch, batch, offset=1, device=labels.device)
        same = labels[upper[0]] == labels[upper[1]]

        def pair_similarities(embeddings: torch.Tensor) -> torch.Tensor:  # the (B, B) Gram matrix's upper triangle
            unit = F.normalize(embeddings.float(), dim=1)
            return (unit @ unit.T)[upper[0], upper[1]]

        student_pairs = pair_similarities(student)
        with torch.no_grad():
            teacher_pairs = pair_similarities(teacher)
        student_negatives, teacher_negatives = student_pairs[~same], teacher_pairs[~same]
        order = torch.argsort(student_negatives.detach(), descending=True)
        if self.training and order.numel():
            with torch.no_grad():
                at = torch.tensor([int(order.numel() * fpr) for fpr in self.fprs], device=order.device)
                for thresholds, negatives in ((self.student_thresholds, student_negatives), (self.teacher_thresholds, teacher_negatives)):
                    ranked = torch.sort(negatives.detach(), descending=True).values
                    thresholds.lerp_(ranked[at], self.momentum)
        hardest = order[: self.top_k]
        loss = student.new_zeros((), dtype=torch.float32)
        if hardest.numel():
            loss = loss + self.negative_weight * F.mse_loss(
                self.soft_rank(student_negatives[hardest], self.student_thresholds),
                self.soft_rank(teacher_negatives[hardest], self.teacher_thresholds),
            )
        if same.any():
            loss = loss + self.positive_weight * F.mse_loss(
                self.soft_rank(student_pairs[same], self.student_thresholds), self.soft_rank(teacher_pairs[same], self.teacher_thresholds)
            )
        return loss


class Distillation(nn.Module):
    """The training loss of a distilled step: `margin_weight` times the student's own margin loss plus
    the weighted distillation losses (`embedding_weight`, `relation_weight`; a zero weight leaves that
    distillation loss out). The module computes the teacher's embeddings itself, so the caller hands
    it the images. The teacher runs under the student's autocast, if any (an ONNX teacher in float32,
    on the CPU provider); the distillation losses compute in float32, autocast off, since 1 - cos
    near convergence is as small as bf16's rounding of a cosine."""

    def __init__(
        self,
        teacher: Teacher,
        student_embedding_size: int,
        margin_weight: float = 1.0,
        embedding_weight: float = 1.0,
        relation_weight: float = 0.0,
        distance: str = "cosine",
        ekd: dict | None = None,
    ):
        super().__init__()
        weights = {"margin": margin_weight, "embedding": embedding_weight, "relation": relation_weight}
        if any(value < 0 for value in weights.values()) or embedding_weight + relation_weight == 0:
            raise ValueError(
                f"distill.weights={weights}: expected non-negative weights, embedding or relation positive "
                "(without either there is nothing to distil: distill=null)"
            )
        self.teacher = teacher
        self.margin_weight, self.embedding_weight, self.relation_weight = (float(w) for w in weights.values())
        self.embedding = EmbeddingDistillation(student_embedding_size, teacher.embedding_size, distance) if embedding_weight else None
        self.relation = EvaluationOrientedDistillation(**(ekd or {})) if relation_weight else None

    def forward(
        self, images: torch.Tensor, student: torch.Tensor, labels: torch.Tensor, margin_loss: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the step's loss, {"loss_margin", "distill_embedding", "teacher_cosine", "distill_relation"}:
        each loss unweighted, the mean cosine of projected student and teacher embeddings)."""
        teacher = self.teacher(images)
        loss = self.margin_weight * margin_loss
        stats = {"loss_margin": margin_loss.detach()}
        with torch.autocast(student.device.type, enabled=False):
            student, teacher = student.float(), teacher.float()
            if self.embedding is not None:
                value, cosine = self.embedding(student, teacher)
                loss = loss + self.embedding_weight * value
                stats.update(distill_embedding=value.detach(), teacher_cosine=cosine.mean())
            if self.relation is not None:
                value = self.relation(student, teacher, labels)
                loss = loss + self.relation_weight * value
                stats["distill_relation"] = value.detach()
        return loss, stats

    def extra_repr(self) -> str:
        identity = self.teacher.identity
        return (
            f"teacher={identity['file']} ({identity['model']}, {identity['embedding_size']}-d), weights: margin={self.margin_weight}, "
            f"embedding={self.embedding_weight}, relation={self.relation_weight}"
        )


def build_distillation(distill_config: dict | None, student_embedding_size: int, image_size: int | None, student: str) -> Distillation | None:
    """The distillation a run's `distill` config describes (None: none)."""
    if not distill_config:
        return None
    if distill_config.get("teacher") in (None, "???"):
        raise ValueError("distill: set distill.teacher=<a train.py checkpoint, a backbone state_dict (with distill.teacher_model) or an ONNX file>")
    teacher = Teacher(distill_config["teacher"], teacher_model_config(distill_config.get("teacher_model"), image_size))
    teacher.check_input_size(image_size, student)
    weights = distill_config.get("weights", {})
    distillation = Distillation(
        teacher,
        student_embedding_size,
        margin_weight=weights.get("margin", 1.0),
        embedding_weight=weights.get("embedding", 1.0),
        relation_weight=weights.get("relation", 0.0),
        distance=distill_config.get("distance", "cosine"),
        ekd=distill_config.get("ekd"),
    )
    log.info("distillation: %s; teacher sha256 %s", distillation.extra_repr(), teacher.identity["sha256"])
    return distillation

"""The head contract: a margin, class centres and a scale policy; `loss(embeddings, labels)` trains it.

    head = MarginHead(512, 10_575, CosFace(m=0.35), AutoScale())                         # dense
    head = MarginHead(512, 10_575, CosFace(m=0.35), AutoScale(), centres=partial(PartialFC, sample_rate=0.1))

Every head, dense or class-sharded, softmax or sigmoid, trains through `loss`, which returns the
mean loss of the batch and, when asked, the batch diagnostics (over the global batch under any DDP setup). The
LightningModule calls only the methods of this class and never asks which kind of head it holds.
The head composes three parts, each in a file of its own, as insightface composes
`PartialFC_V2(margin_loss)`:

- the margin (margin.py and one file per margin family): f(cos theta_y) and the rest of the margin
  contract;
- the class centres (centres.py, dense; partial_fc.py, sharded over the ranks): W, and how this
  process's classes and samples relate to the other ranks;
- the scale policy (scale.py): s;

and the fused loss the margin names (loss.py: the softmax cross-entropy; binary_loss.py: the
one-vs-all loss of the sigmoid heads in binary.py) that computes it from them. A head holds no arithmetic
of its own beyond normalising the embeddings.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from facerec import distributed
from facerec.heads.centres import ClassCentres
from facerec.heads.loss import Workspace
from facerec.heads.margin import Margin
from facerec.heads.scale import ScalePolicy


class MarginHead(nn.Module):
    """`margin` and `scale` over class centres built by `centres(num_classes, centres per class,
    embedding_size)`: ClassCentres (dense, the default) or Partial FC (`partial(PartialFC, sample_rate=...)`).
    The scale policy is bound to the class count and the margin here."""

    def __init__(
        self,
        embedding_size: int,
        num_classes: int,
        margin: Margin,
        scale: ScalePolicy,
        centres: Callable[[int, int, int], ClassCentres] = ClassCentres,
    ):
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(
                f"head needs embedding_size >= 1 and num_classes >= 2, got {embedding_size}, {num_classes}"
            )
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin = margin
        self.centres = centres(self.num_classes, margin.centres_per_class, self.embedding_size)
        self.scale = scale
        scale.bind(self.num_classes, margin)
        margin.bind(self.num_classes, scale)
        self.workspace = Workspace()  # the loss's (B, C) buffers, reused from step to step
        self.register_load_state_dict_pre_hook(_rename_keys_of_unsplit_heads)

    # ------------------------------------------------------------------ training
    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: bool = False) -> tuple[torch.Tensor, dict]:
        """(mean loss of the batch: the margin's, softmax or one-vs-all; diagnostics if `statistics`). Under DDP every rank calls
        it in the same step with its own batch; all ranks hold the same batch size."""
        self._check(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            # float32 logits under autocast; float64 inputs (tests) stay float64
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            labels = labels.view(-1).long()
            norms = torch.linalg.vector_norm(embeddings, dim=1)
            regulariser = self.margin.regulariser(norms)  # this rank's samples
            covered, labels = self.centres.global_batch(embeddings, labels)
            if covered is not embeddings:  # the global batch (Partial FC under DDP): its norms
                embeddings, norms = covered, torch.linalg.vector_norm(covered, dim=1)
            x_hat = embeddings / norms.clamp_min(1e-12).unsqueeze(1)
            per_sample = self.margin.margin_inputs(norms, labels, self.centres, update=True)
            columns, weight = self.centres.step_rows(labels)
            stats = {} if statistics else None
            loss = self.margin.loss(x_hat, weight, columns, per_sample, self.scale, self.centres, self.workspace, stats)
            if regulariser is not None:
                loss = loss + regulariser
            if statistics:
                stats.update(norm_statistics(self.centres.batch_rows(norms.detach())))
                if regulariser is not None:
                    stats["regulariser"] = distributed.all_reduce(regulariser.detach().clone()) / distributed.world()[1]
        return loss, stats or {}

    # ----------------------------------------------------------------- inference
    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 cosines to every class (the closest centre of each), all ranks' classes."""
        self._check(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            return self.centres.cosines(F.normalize(embeddings.to(dtype)))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) scaled logits: with labels the margin logits at the head's current state (autograd,
        for inspection: nothing advances, training calls `loss`), without labels the scaled cosines."""
        if labels is None:
            return self.cosine(embeddings).mul_(self.scale.value)
        if self.centres.sees_global_batch:
            raise TypeError(f"{type(self).__name__} is class-sharded: call head.loss(embeddings, labels)")
        self._check(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            column = labels.view(-1, 1).long()
            weight = F.normalize(self.centres.weight.to(embeddings.dtype))
            cos = self.centres.closest(F.normalize(embeddings) @ weight.T)
            per_sample = self.margin.margin_inputs(torch.linalg.vector_norm(embeddings, dim=1), column.view(-1), self.centres, update=False)
            return self.margin.logits(cos, column, per_sample, self.scale.value)

    def target_cosine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) float32 cosine to the own class (its closest centre), without the (B, C) matrix (dense centres)."""
        self._check(embeddings)
        k = self.centres.centres_per_class
        centres = self.centres.weight.float().view(self.num_classes, k, -1)[labels.view(-1)]
        cos = (F.normalize(centres, dim=2) @ F.normalize(embeddings.float()).unsqueeze(2)).squeeze(2)
        return cos.amax(dim=1)

    # ------------------------------------------------------ sharding, checkpoints
    def shard(self) -> list[str]:
        """Keep only this rank's class centres (the LightningModule calls it once the process group
        exists); returns the parameters DDP must leave out of its all-reduce."""
        return [f"centres.{name}" for name in self.centres.shard()]

    def start_centres_at(self, directions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Start the class centres at the (C, d) class `directions` (all classes, the same on every rank)
        instead of at random; returns the full (C K, d) centre matrix, of which this process keeps its
        rows (ClassCentres.start_at: their norm, the sub-centres' noise)."""
        return self.centres.start_at(directions, generator)

    def gather_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """In a checkpoint's optimizer states, make the centres' per-row state full on rank 0, which
        writes the file; `param_index`: the centres' key in the optimizer state. No-op when dense."""
        self.centres.gather_optimizer_state(optimizer_states, param_index)

    def shard_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """The inverse on load: keep this rank's rows of the full per-row state."""
        self.centres.shard_optimizer_state(optimizer_states, param_index)

    def _check(self, embeddings: torch.Tensor) -> None:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"{type(self).__name__} expects embeddings of shape (B, {self.embedding_size}), got {tuple(embeddings.shape)}"
            )

    def extra_repr(self) -> str:
        return f"embedding_size={self.embedding_size}, num_classes={self.num_classes}"


def _rename_keys_of_unsplit_heads(head: MarginHead, state_dict: dict, prefix: str, *args) -> None:
    """Checkpoints written before the head was split into margin, class centres and scale keep W as
    `<head>.weight` and the margin's buffers (AdaFace's batch_mean, CurricularFace's t, ...) at the
    head's top level: move them to `centres.weight` and `margin.<name>`, so such checkpoints resume."""
    margin_buffers = {name for name, _ in head.margin.named_buffers(recurse=False)}
    for key in [key for key in state_dict if key.startswith(prefix) and "." not in key[len(prefix) :]]:
        name = key[len(prefix) :]
        if name == "weight":
            state_dict[f"{prefix}centres.weight"] = state_dict.pop(key)
        elif name in margin_buffers:
            state_dict[f"{prefix}margin.{name}"] = state_dict.pop(key)


@torch.no_grad()
def norm_statistics(norms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of the embedding norm over the batch (quality: AdaFace and MagFace read it)."""
    return {"norm_mean": norms.mean(), "norm_std": norms.std() if len(norms) > 1 else norms.new_zeros(())}

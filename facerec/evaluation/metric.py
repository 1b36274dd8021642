"""The one scoring path of eval.py and of validation during training.

Both embed a protocol's images (eval.py in a plain loop, validation in Lightning's, each rank a
shard under DDP) and hand the embeddings to `EvaluationMetric`, a torchmetrics Metric: `update`
records (image index, embedding) rows, `compute` gathers every rank's rows, assembles the full
embedding table in image order (DistributedSampler's padding repeats are harmless) and scores it
with `protocol.score`, so every rank gets the result of a single-process evaluation of the whole set.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from facerec.evaluation.embeddings import embedding_table
from facerec.evaluation.protocols.base import EvaluationProtocol
from facerec.evaluation.result import ProtocolResult


@dataclass(frozen=True)
class EmbeddingNorms:
    """Mean and standard deviation (ddof=0) of the L2 norms of a set's features, the flip-summed,
    un-normalised embeddings scored by its protocol: a quality signal (small norms mark hard or
    broken images) and a sanity check of the model's preprocessing."""

    mean: float
    std: float

    @classmethod
    def of(cls, features) -> EmbeddingNorms:
        norms = np.linalg.norm(np.asarray(features, dtype=np.float64), axis=1)
        return cls(float(norms.mean()), float(norms.std()))


class Evaluation:
    """One set's result and the norms of the features it was computed from. A plain class, not a
    dataclass: torchmetrics passes what `compute` returns through its collection utilities, which
    would copy a dataclass's fields (an IJB-C result holds 15.7 M scores)."""

    __slots__ = ("result", "norms")

    def __init__(self, result: ProtocolResult, norms: EmbeddingNorms):
        self.result, self.norms = result, norms

    def summary(self) -> dict[str, float]:
        """The result's flat metrics and the mean embedding norm, as validation logs them."""
        return {**self.result.summary(), "embedding_norm": self.norms.mean}


def evaluate_features(protocol: EvaluationProtocol, features: torch.Tensor | np.ndarray) -> Evaluation:
    """Score a protocol's (num_images, d) feature table, in image order."""
    features = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    return Evaluation(protocol.score(features), EmbeddingNorms.of(features))


class EvaluationMetric(Metric):
    """The embeddings of one protocol's images, gathered over the ranks, scored once all are in."""

    full_state_update = False

    def __init__(self, protocol: EvaluationProtocol, **kwargs):
        super().__init__(**kwargs)
        self.protocol = protocol
        self.num_images = len(protocol.image_set())
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.indices.append(indices.detach().long().view(-1))

    def compute(self) -> Evaluation:
        table = embedding_table(dim_zero_cat(self.embeddings), dim_zero_cat(self.indices), self.num_images)
        return evaluate_features(self.protocol, table)

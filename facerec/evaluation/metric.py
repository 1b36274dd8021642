"""The one scoring path of eval.py and of validation during training.

Both embed a protocol's images (eval.py in a plain loop, validation in Lightning's, each rank a
shard under DDP) and hand the embeddings to `EvaluationMetric`, a torchmetrics Metric: `update`
records (image index, embedding) rows, `compute` gathers every rank's rows, assembles the full
embedding table in image order (DistributedSampler's padding repeats are harmless) and scores it
with `protocol.score`, so every rank gets the result of a single-process evaluation of the whole set.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from facerec.evaluation.bootstrap import Bootstrap, group_membership, group_spread, intervals
from facerec.evaluation.embeddings import embedding_table
from facerec.evaluation.protocols.base import EvaluationProtocol
from facerec.evaluation.quality import error_versus_reject
from facerec.evaluation.result import ProtocolResult


@dataclass(frozen=True)
class EmbeddingNorms:
    """Mean and standard deviation (ddof=0) of the L2 norms of a set's features, the flip-summed,
    un-normalised embeddings scored by its protocol: a quality signal (small norms mark hard or
    broken images) and a sanity check of the model's preprocessing."""

    mean: float
    std: float

    @classmethod
    def of(cls, norms: np.ndarray) -> EmbeddingNorms:
        """From the features' (N,) L2 norms."""
        return cls(float(norms.mean()), float(norms.std()))


@dataclass(frozen=True)
class ScoringOptions:
    """What is computed beside a result's metrics (facerec.evaluation.bootstrap, quality).

    bootstrap: intervals (resamples=0: none); groups: {identity: group} for per-group results, read
    from groups_source; quality: (num_images,) per-image quality scores, None: the embedding norms;
    quality_name: what they are; erc: compute the error-versus-reject curves.
    """

    bootstrap: Bootstrap = field(default_factory=lambda: Bootstrap(resamples=0))
    groups: Mapping[str, str] | None = None
    groups_source: str = "the groups"
    quality: np.ndarray | None = None
    quality_name: str = "embedding norm"
    erc: bool = True


class Evaluation:
    """One set's result, the norms of the features it was computed from, and what ScoringOptions
    asked for: `intervals` {metric: (low, high)}, `erc` (facerec.evaluation.quality) and `groups`
    ({"metrics", "intervals", "spread", "notes"}). A plain class, not a dataclass: torchmetrics passes
    what `compute` returns through its collection utilities, which would copy a dataclass's fields
    (an IJB-C result holds 15.7 M scores)."""

    __slots__ = ("result", "norms", "intervals", "erc", "groups")

    def __init__(self, result: ProtocolResult, norms: EmbeddingNorms, intervals=None, erc=None, groups=None):
        self.result, self.norms = result, norms
        self.intervals: dict[str, tuple[float, float]] = intervals or {}
        self.erc: dict | None = erc
        self.groups: dict | None = groups

    def summary(self) -> dict[str, float]:
        """The result's flat metrics and the mean embedding norm, as validation logs them."""
        return {**self.result.summary(), "embedding_norm": self.norms.mean}

    def bounds(self) -> dict[str, float]:
        """The intervals as flat metrics: "<metric>_low", "<metric>_high"."""
        return {f"{key}_{side}": value for key, interval in self.intervals.items() for side, value in zip(("low", "high"), interval)}


def evaluate_features(
    protocol: EvaluationProtocol, features: torch.Tensor | np.ndarray, options: ScoringOptions | None = None
) -> Evaluation:
    """Score a protocol's (num_images, d) feature table, in image order, with what `options` asks for beside."""
    options = options or ScoringOptions()
    features = features.numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    norms = np.linalg.norm(np.asarray(features, dtype=np.float64), axis=1)
    result = protocol.score(features)
    evaluation = Evaluation(result, EmbeddingNorms.of(norms))
    items = result.items
    if items is None:
        return evaluation
    quality = norms if options.quality is None else np.asarray(options.quality, dtype=np.float64)
    if len(items.image_group):
        items.set_quality(quality)
    evaluation.intervals = intervals(items, options.bootstrap)
    if options.erc and items.quality is not None:
        evaluation.erc = error_versus_reject(items, options.quality_name)
    if options.groups:
        membership, notes = group_membership(items, options.groups, source=options.groups_source)
        per_group = {name: items.metrics(mask.astype(np.float64)) for name, mask in membership.items()}
        evaluation.groups = {
            "metrics": per_group,
            "intervals": {name: intervals(items, options.bootstrap, mask.astype(np.float64)) for name, mask in membership.items()},
            "items": {name: int(mask.sum()) for name, mask in membership.items()},
            "spread": group_spread(per_group),
            "notes": notes,
        }
    return evaluation


class EvaluationMetric(Metric):
    """The embeddings of one protocol's images, gathered over the ranks, scored once all are in."""

    full_state_update = False

    def __init__(self, protocol: EvaluationProtocol, options: ScoringOptions | None = None, **kwargs):
        super().__init__(**kwargs)
        self.protocol = protocol
        self.options = options
        self.num_images = len(protocol.image_set())
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.indices.append(indices.detach().long().view(-1))

    def compute(self) -> Evaluation:
        table = embedding_table(dim_zero_cat(self.embeddings), dim_zero_cat(self.indices), self.num_images)
        return evaluate_features(self.protocol, table, self.options)

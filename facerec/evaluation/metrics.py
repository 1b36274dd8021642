"""Verification as a torchmetrics Metric: under DDP all ranks' embeddings are gathered first.

Each rank embeds a shard of the set's images (DistributedSampler pads the shards
with a few repeated images so they are even); `update` records (image index,
embedding) and `compute` gathers the rows of all ranks, assembles the full
embedding table and only then scores the pairs, so the result equals a
single-process evaluation of the whole set.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from facerec.evaluation.embeddings import embedding_table
from facerec.evaluation.verification import FARS, VerificationResult, verify


class VerificationMetric(Metric):
    full_state_update = False

    def __init__(self, pairs, issame, num_images: int, folds=None, n_folds: int = 10, fars=FARS, **kwargs):
        super().__init__(**kwargs)
        self.pairs = torch.as_tensor(pairs, dtype=torch.long).reshape(-1, 2)
        self.issame = torch.as_tensor(issame, dtype=torch.bool).reshape(-1)
        self.folds = folds
        self.num_images = int(num_images)
        self.n_folds = n_folds
        self.fars = tuple(fars)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("indices", default=[], dist_reduce_fx="cat")

    @classmethod
    def for_set(cls, verification_set, **kwargs) -> "VerificationMetric":
        """The metric of a facerec VerificationSet (its pairs, labels and protocol folds)."""
        s = verification_set
        return cls(s.pairs, s.issame, s.num_images, folds=s.folds, **kwargs)

    def update(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.indices.append(indices.detach().long().view(-1))

    def compute(self) -> VerificationResult:
        table = embedding_table(dim_zero_cat(self.embeddings), dim_zero_cat(self.indices), self.num_images)
        return verify(
            table[self.pairs[:, 0]], table[self.pairs[:, 1]], self.issame, self.n_folds, self.folds, self.fars
        )

"""Verification as a torchmetrics Metric: under DDP all ranks' embeddings are gathered first.

Each rank embeds a shard of the set's images (DistributedSampler may repeat a
few to even out the shards); `update` records (image index, embedding) and
`compute` assembles the full embedding table from all ranks, then scores the
pairs, so the result equals a single-process evaluation.
"""
from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

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

    def update(self, embeddings: torch.Tensor, indices: torch.Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.indices.append(indices.detach().long().view(-1))

    def compute(self) -> VerificationResult:
        embeddings = dim_zero_cat(self.embeddings).cpu()
        indices = dim_zero_cat(self.indices).cpu()
        table = torch.full((self.num_images, embeddings.shape[1]), float("nan"))
        table[indices] = embeddings  # repeated indices carry identical embeddings
        needed = torch.unique(self.pairs)
        missing = torch.isnan(table[needed]).any(dim=1)
        if missing.any():
            raise RuntimeError(
                f"verification metric: {int(missing.sum())} of {len(needed)} images used by pairs were never "
                "embedded (or their embeddings are NaN); the loader must cover every image of the set"
            )
        return verify(
            table[self.pairs[:, 0]], table[self.pairs[:, 1]], self.issame, self.n_folds, self.folds, self.fars
        )

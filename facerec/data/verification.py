"""Verification sets: images plus same/different pairs over them.

A set yields `(image, index)`; embeddings are computed once per image and the
pairs index into them. This avoids embedding an image once per pair it appears
in, and under DDP lets every rank embed a shard while the metric gathers all
indices before scoring (see facerec.evaluation.metric).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset


class VerificationSet(Dataset):
    """Base class: subclasses implement `image(index) -> (3, H, W) float tensor`.

    pairs: (N, 2) int indices into the set's images; issame: (N,) bool;
    folds: optional (N,) int fold ids fixed by the set's protocol (None: the
    evaluation chooses, see facerec.evaluation.verify).
    """

    def __init__(self, name: str, num_images: int, pairs, issame, folds=None):
        self.name = str(name)
        self.num_images = int(num_images)
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.issame = np.asarray(issame, dtype=bool).reshape(-1)
        self.folds = None if folds is None else np.asarray(folds, dtype=np.int64).reshape(-1)
        if len(self.pairs) != len(self.issame):
            raise ValueError(f"verification set {name!r}: {len(self.pairs)} pairs but {len(self.issame)} issame labels")
        if self.folds is not None and len(self.folds) != len(self.pairs):
            raise ValueError(f"verification set {name!r}: {len(self.pairs)} pairs but {len(self.folds)} fold ids")
        if len(self.pairs) and (self.pairs.min() < 0 or self.pairs.max() >= self.num_images):
            raise ValueError(
                f"verification set {name!r}: pair indices must lie in [0, {self.num_images}), "
                f"got [{self.pairs.min()}, {self.pairs.max()}]"
            )

    def __len__(self) -> int:
        return self.num_images

    def image(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_images:
            raise IndexError(f"{self.name}: image index {index} out of range [0, {self.num_images})")
        return self.image(index), index


def balanced_pairs(labels, num_pairs: int, n_folds: int = 10, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Same/different pairs over images with identity `labels`, in `n_folds` consecutive blocks.

    Each block holds num_pairs / (2 n_folds) same pairs followed by as many
    different pairs (the LFW View 2 layout). Pairs are drawn without repeats.
    """
    labels = np.asarray(labels)
    if num_pairs % (2 * n_folds):
        raise ValueError(f"num_pairs={num_pairs} must be a multiple of 2 * n_folds = {2 * n_folds}")
    rng = np.random.default_rng([seed, 7])
    by_identity = [np.flatnonzero(labels == identity) for identity in np.unique(labels)]
    multi = [idx for idx in by_identity if len(idx) >= 2]
    if not multi or len(by_identity) < 2:
        raise ValueError("balanced_pairs needs >= 2 identities and one with >= 2 images")
    half = num_pairs // 2
    seen: set[tuple[int, int]] = set()
    same: list[tuple[int, int]] = []
    different: list[tuple[int, int]] = []
    for _ in range(100 * num_pairs):
        if len(same) < half:
            a, b = rng.choice(multi[rng.integers(len(multi))], size=2, replace=False)
            if (a, b) not in seen:
                seen.add((a, b))
                same.append((a, b))
        if len(different) < half:
            i, j = rng.choice(len(by_identity), size=2, replace=False)
            a, b = rng.choice(by_identity[i]), rng.choice(by_identity[j])
            if (a, b) not in seen:
                seen.add((a, b))
                different.append((a, b))
        if len(same) == half and len(different) == half:
            break
    else:
        raise ValueError(f"could not draw {num_pairs} distinct pairs from {len(labels)} images; lower num_pairs")
    per_fold = half // n_folds
    pairs, issame = [], []
    for fold in range(n_folds):
        block = slice(fold * per_fold, (fold + 1) * per_fold)
        pairs += same[block] + different[block]
        issame += [True] * per_fold + [False] * per_fold
    return np.asarray(pairs, dtype=np.int64), np.asarray(issame, dtype=bool)

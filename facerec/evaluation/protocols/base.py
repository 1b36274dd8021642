"""The evaluation-protocol contract: one evaluation set of any kind (pairs, IJB templates, 1:N).

A protocol hands eval.py and validation a dataset of images to embed and scores the embeddings:

    protocol.image_set()     -> Dataset of (image, index): image (3, H, W) float32 RGB normalised as
                                (x - 127.5) / 127.5, index an int in [0, len)
    protocol.score(features) -> ProtocolResult; features (len(image_set()), d) float32, flip-summed
                                (e(x) + e(flip x)), in index order, NOT L2-normalised

Each conf/evalset/<name>.yaml instantiates one; `eval_sets=[...]` (eval.py) and `val_sets=[...]`
(train.py) name them. A new protocol is one class here (its reader in facerec.data where it reads a
new layout) and one conf/evalset/<name>.yaml; eval.py and validation need no change.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
from torch.utils.data import Dataset

from facerec.evaluation.result import ProtocolResult


class EvaluationProtocol(ABC):
    """One evaluation set: the images to embed and how to score their embeddings."""

    @abstractmethod
    def image_set(self) -> Dataset:
        """Items (image, index): image (3, H, W) float32 RGB normalised as (x - 127.5) / 127.5, index in [0, len)."""

    @abstractmethod
    def score(self, features: np.ndarray) -> ProtocolResult:
        """features: (len(image_set()), d) float32, flip-summed, in index order, not L2-normalised."""


def check_features(features: np.ndarray, num_images: int) -> np.ndarray:
    """`features` as float32 (num_images, d): one row per image of the protocol's image set."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != num_images:
        raise ValueError(f"expected ({num_images}, d) features, one per image of image_set(), got shape {features.shape}")
    return features

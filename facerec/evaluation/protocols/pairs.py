"""Pair verification (LFW protocol) over a facerec.data.VerificationSet: LFW, the insightface .bin sets,
image-folder and synthetic pairs."""
from __future__ import annotations

import numpy as np

from facerec.data import VerificationSet
from facerec.evaluation.protocols.base import EvaluationProtocol, check_features
from facerec.evaluation.verification import VerificationResult, verify


class PairVerification(EvaluationProtocol):
    """Same/different pairs over the images of `pairs`: 10-fold accuracy with the set's own folds where
    it fixes them, `n_folds` consecutive or stratified folds otherwise (see facerec.evaluation.verify),
    AUC, EER and TAR@FAR."""

    def __init__(self, pairs: VerificationSet, n_folds: int = 10):
        self.pairs = pairs
        self.n_folds = int(n_folds)

    def image_set(self) -> VerificationSet:
        return self.pairs

    def score(self, features: np.ndarray) -> VerificationResult:
        features = check_features(features, self.pairs.num_images)
        index = self.pairs.pairs
        return verify(features[index[:, 0]], features[index[:, 1]], self.pairs.issame, self.n_folds, self.pairs.folds)

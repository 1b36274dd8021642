"""Pair verification (LFW protocol) over a facerec.data.VerificationSet: LFW, the insightface .bin sets,
image-folder and synthetic pairs."""
from __future__ import annotations

import copy

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

    def image_names(self) -> list[str]:
        return self.pairs.image_names()

    def image_identities(self) -> list[str] | None:
        return self.pairs.image_identities()

    def keep_images(self, keep: np.ndarray) -> tuple[PairVerification, str]:
        """The pairs of which both images are kept, over those images (the set's folds kept)."""
        pairs = self.pairs
        new_index = np.full(pairs.num_images, -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        index = new_index[pairs.pairs]
        kept = (index >= 0).all(axis=1)
        protocol = copy.copy(self)
        protocol.pairs = KeptPairs(pairs, keep, index[kept], kept)
        same = int((~kept & pairs.issame).sum())
        return protocol, f"{(~kept).sum()} of {len(kept)} pairs dropped ({same} same, {(~kept).sum() - same} different)"

    def score(self, features: np.ndarray) -> VerificationResult:
        features = check_features(features, self.pairs.num_images)
        index = self.pairs.pairs
        result = verify(features[index[:, 0]], features[index[:, 1]], self.pairs.issame, self.n_folds, self.pairs.folds)
        result.items.set_sides(index, np.arange(self.pairs.num_images))
        identities = self.pairs.image_identities()
        if identities is None:
            result.notes.append("intervals resample pairs: the set names no identities, so pairs sharing a person count as independent")
        else:
            names, codes = np.unique(np.asarray(identities), return_inverse=True)
            units = codes[index]
            units[units[:, 0] == units[:, 1], 1] = -1  # a same-person pair depends on one person
            result.items.set_units(units, names, "identity")
        return result


class KeptPairs(VerificationSet):
    """The pairs `kept` (a mask over source's pairs) of a VerificationSet, over its images `images`
    only (renumbered: image i is source's image images[i]); `pairs` index the renumbered images."""

    def __init__(self, source: VerificationSet, images: np.ndarray, pairs: np.ndarray, kept: np.ndarray):
        self.source, self.images = source, np.asarray(images, dtype=np.int64)
        folds = None if source.folds is None else source.folds[kept]
        super().__init__(source.name, len(self.images), pairs, source.issame[kept], folds)

    def image(self, index: int):
        return self.source.image(int(self.images[index]))

    def image_names(self) -> list[str]:
        names = self.source.image_names()
        return [names[index] for index in self.images]

    def image_identities(self) -> list[str] | None:
        identities = self.source.image_identities()
        return None if identities is None else [identities[index] for index in self.images]

"""The evaluation-protocol contract: one evaluation set of any kind (pairs, IJB templates, 1:N).

A protocol hands eval.py and validation a dataset of images to embed and scores the embeddings:

    protocol.image_set()     -> Dataset of (image, index): image (3, H, W) float32 RGB normalised as
                                (x - 127.5) / 127.5, index an int in [0, len)
    protocol.score(features) -> ProtocolResult; features (len(image_set()), d) float32, flip-summed
                                (e(x) + e(flip x)), in index order, NOT L2-normalised
    protocol.image_names()   -> a stable key per image, in index order (what eval.py's exclude= CSV names)
    protocol.image_identities() -> the identity name of each image, or None where the set does not know them
    protocol.without(keys)   -> the same protocol without those images: the pairs, probes, gallery entries
                                and template members they are part of are dropped, and its results say how many

Each conf/evalset/<name>.yaml instantiates one; `eval_sets=[...]` (eval.py) and `val_sets=[...]`
(train.py) name them. A new protocol is one class here (its reader in facerec.data where it reads a
new layout) and one conf/evalset/<name>.yaml; eval.py and validation need no change.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection

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

    def image_names(self) -> list[str]:
        """A stable key per image of image_set(), in index order: the path relative to the set's root for
        folder-based sets (LFW: "Name/Name_0001.jpg"), the loose_crop/ file name for IJB, "<set name>#<index>"
        for sets that hold no files (.bin, synthetic)."""
        raise NotImplementedError(f"{type(self).__name__} does not name its images (image_names)")

    def image_identities(self) -> list[str] | None:
        """The identity name of each image of image_set(), in index order, where the set knows it; else None."""
        return None

    def keep_images(self, keep: np.ndarray) -> tuple[EvaluationProtocol, str]:
        """(this protocol over the images `keep` alone (sorted indices into image_set(), renumbered 0..),
        what that dropped besides the images, e.g. "12 of 6000 pairs"). Protocols implement it; callers
        use `without`."""
        raise NotImplementedError(f"{type(self).__name__} cannot leave images out (keep_images)")

    def without(self, image_keys: Collection[str], source: str = "exclude") -> EvaluationProtocol:
        """This protocol without the images whose image_names() key is in `image_keys`: pairs touching
        one are dropped, probes and gallery entries are dropped, templates lose them (and a template left
        empty leaves its pairs). Its results' notes say what was dropped (`source` names the list)."""
        keys = set(image_keys)
        names = self.image_names()
        keep = np.asarray([index for index, name in enumerate(names) if name not in keys], dtype=np.int64)
        dropped = len(names) - len(keep)
        if not dropped:
            return WithNote(self, f"{source}: no image of this set listed, nothing dropped")
        if not len(keep):
            raise ValueError(f"{source} lists all {len(names)} images of this set: nothing is left to score")
        protocol, consequences = self.keep_images(keep)
        return WithNote(protocol, f"{source}: {dropped} of {len(names)} images dropped; {consequences}")


class WithNote(EvaluationProtocol):
    """A protocol whose results carry one more note (what `without` dropped); everything else is the
    wrapped protocol's."""

    def __init__(self, protocol: EvaluationProtocol, note: str):
        self.protocol, self.note = protocol, note

    def __getattr__(self, name: str):
        if name in ("protocol", "note"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.protocol, name)

    def image_set(self) -> Dataset:
        return self.protocol.image_set()

    def score(self, features: np.ndarray) -> ProtocolResult:
        result = self.protocol.score(features)
        result.notes.append(self.note)
        return result

    def image_names(self) -> list[str]:
        return self.protocol.image_names()

    def image_identities(self) -> list[str] | None:
        return self.protocol.image_identities()

    def keep_images(self, keep: np.ndarray) -> tuple[EvaluationProtocol, str]:
        protocol, consequences = self.protocol.keep_images(keep)
        return WithNote(protocol, self.note), consequences


def check_features(features: np.ndarray, num_images: int) -> np.ndarray:
    """`features` as float32 (num_images, d): one row per image of the protocol's image set."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != num_images:
        raise ValueError(f"expected ({num_images}, d) features, one per image of image_set(), got shape {features.shape}")
    return features

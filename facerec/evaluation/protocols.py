"""Evaluation protocols: one evaluation set of any kind (pairs, IJB templates, 1:N identification).

A protocol hands eval.py a dataset of images to embed and scores the embeddings it gets back:

    protocol.image_set()     -> Dataset of (image, index): image (3, H, W) float32 RGB normalised as
                                (x - 127.5) / 127.5, index an int in [0, len)
    protocol.score(features) -> ProtocolResult; features (len(image_set()), d) float32, flip-summed
                                (e(x) + e(flip x)), in index order, NOT L2-normalised

Each conf/verification/<name>.yaml instantiates one. The pair sets of facerec.data (a
VerificationSet: LFW, the .bin sets, the synthetic held-out set) are adapted by `PairProtocol`,
so their configs instantiate the set itself and eval.py wraps it (see `as_protocol`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import fields
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from torch.utils.data import Dataset

from facerec.evaluation.verification import VerificationResult, verify

if TYPE_CHECKING:  # facerec.data is not imported at run time: protocols in facerec.data may import this module
    from facerec.data import VerificationSet

RESULT_KINDS = ("pairs", "templates", "identification")


class ProtocolResult(ABC):
    """What `EvaluationProtocol.score` returns.

    kind: "pairs" | "templates" | "identification" (results of one kind share a table and a figure);
    notes: logged and kept in results.json (skipped items, which TAR rule, ...).
    """

    kind: ClassVar[str]
    notes: list[str]

    @abstractmethod
    def summary(self) -> dict[str, float]:
        """Flat float metrics for loggers, keys like "tar@far=1e-04", "rank1", "tpir@fpir=1e-02"."""

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-ready: everything but large arrays."""

    @abstractmethod
    def table_row(self) -> dict[str, str]:
        """{column header: formatted cell}, the same headers for every result of this kind."""

    def curve(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """("roc", fpr, tpr) or ("cmc", ranks, identification rates) for the figure; None: no curve."""
        return None


class EvaluationProtocol(ABC):
    """One evaluation set: the images to embed and how to score their embeddings."""

    name: str

    @abstractmethod
    def image_set(self) -> Dataset:
        """Items (image, index): image (3, H, W) float32 RGB normalised as (x - 127.5) / 127.5, index in [0, len)."""

    @abstractmethod
    def score(self, features: np.ndarray) -> ProtocolResult:
        """features: (len(image_set()), d) float32, flip-summed, in index order, not L2-normalised."""


REPORTED_FAR = 1e-3


class PairResult(VerificationResult, ProtocolResult):
    """A VerificationResult (every field and `summary()` as before) with the ProtocolResult methods."""

    kind = "pairs"

    @classmethod
    def of(cls, result: VerificationResult) -> PairResult:
        return cls(**{f.name: getattr(result, f.name) for f in fields(result)})

    def table_row(self) -> dict[str, str]:
        tar = self.tar_at_far.get(REPORTED_FAR)
        return {
            "pairs": str(self.num_pairs),
            "accuracy (%)": f"{100 * self.accuracy:.2f} ± {100 * self.accuracy_std:.2f}",
            f"TAR@FAR={REPORTED_FAR:.0e} (%)": "n/a" if tar is None else f"{100 * tar:.2f}",
            "AUC": f"{self.auc:.4f}",
            "EER (%)": f"{100 * self.eer:.2f}",
            "folds": self.fold_policy,
        }

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        return "roc", self.fpr, self.tpr


class PairProtocol(EvaluationProtocol):
    """A facerec.data.VerificationSet (same/different pairs over its images) under the LFW protocol:
    10-fold accuracy with the set's own folds where it fixes them (see facerec.evaluation.verify)."""

    def __init__(self, verification_set: VerificationSet, n_folds: int = 10):
        self.verification_set = verification_set
        self.name = verification_set.name
        self.n_folds = n_folds

    def image_set(self) -> VerificationSet:
        return self.verification_set

    def score(self, features: np.ndarray) -> PairResult:
        pairs = self.verification_set.pairs
        result = verify(
            features[pairs[:, 0]], features[pairs[:, 1]], self.verification_set.issame, self.n_folds, self.verification_set.folds
        )
        return PairResult.of(result)


def as_protocol(evaluation_set: object, n_folds: int = 10) -> EvaluationProtocol:
    """The protocol a conf/verification config instantiated: a protocol as it is, a VerificationSet
    wrapped in a PairProtocol (n_folds: used where the set fixes no folds of its own)."""
    from facerec.data import VerificationSet

    if isinstance(evaluation_set, EvaluationProtocol):
        return evaluation_set
    if isinstance(evaluation_set, VerificationSet):
        return PairProtocol(evaluation_set, n_folds)
    raise TypeError(
        "an evaluation set config must instantiate a facerec.evaluation.protocols.EvaluationProtocol "
        f"or a facerec.data.VerificationSet, got {type(evaluation_set).__name__}"
    )

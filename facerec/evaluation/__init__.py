"""Verification metrics (functions and torchmetrics Metrics) and embedding extraction."""
from facerec.evaluation.embeddings import FLIP_MODES, embed
from facerec.evaluation.metrics import VerificationMetric
from facerec.evaluation.verification import (
    FARS,
    VerificationResult,
    best_threshold,
    cosine_scores,
    equal_error_rate,
    make_folds,
    roc_curve,
    verify,
)

__all__ = [
    "FARS",
    "FLIP_MODES",
    "VerificationMetric",
    "VerificationResult",
    "best_threshold",
    "cosine_scores",
    "embed",
    "equal_error_rate",
    "make_folds",
    "roc_curve",
    "verify",
]

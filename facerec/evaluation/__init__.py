"""Verification metrics (functions and torchmetrics Metrics), embedding extraction, reports."""
from facerec.evaluation.embeddings import FLIP_MODES, embed, embedding_table, extract_embeddings
from facerec.evaluation.metrics import VerificationMetric
from facerec.evaluation.report import format_table, log_to_wandb, plot_roc, write_results
from facerec.evaluation.verification import (
    FARS,
    VerificationResult,
    area_under_curve,
    best_threshold,
    cosine_scores,
    equal_error_rate,
    make_folds,
    roc_curve,
    tar_at_far,
    verify,
)

__all__ = [
    "FARS",
    "FLIP_MODES",
    "VerificationMetric",
    "VerificationResult",
    "area_under_curve",
    "best_threshold",
    "cosine_scores",
    "embed",
    "embedding_table",
    "equal_error_rate",
    "extract_embeddings",
    "format_table",
    "log_to_wandb",
    "make_folds",
    "plot_roc",
    "roc_curve",
    "tar_at_far",
    "verify",
    "write_results",
]

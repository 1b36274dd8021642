"""Verification metrics (functions and torchmetrics Metrics), embedding extraction, reports."""
from facerec.evaluation.embeddings import FLIP_MODES, embed, embedding_table, extract_embeddings
from facerec.evaluation.identification import IdentificationResult, identify
from facerec.evaluation.metrics import VerificationMetric
from facerec.evaluation.protocols import EvaluationProtocol, PairProtocol, PairResult, ProtocolResult, as_protocol
from facerec.evaluation.report import EmbeddingNorms, format_table, log_to_wandb, plot_curves, write_results
from facerec.evaluation.templates import TemplateResult, pool_templates, verify_templates
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
    "IdentificationResult",
    "EmbeddingNorms",
    "EvaluationProtocol",
    "PairProtocol",
    "PairResult",
    "ProtocolResult",
    "TemplateResult",
    "VerificationMetric",
    "VerificationResult",
    "area_under_curve",
    "as_protocol",
    "best_threshold",
    "cosine_scores",
    "embed",
    "embedding_table",
    "equal_error_rate",
    "extract_embeddings",
    "format_table",
    "identify",
    "log_to_wandb",
    "make_folds",
    "plot_curves",
    "pool_templates",
    "roc_curve",
    "tar_at_far",
    "verify",
    "verify_templates",
    "write_results",
]

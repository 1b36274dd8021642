"""Evaluation: every protocol (pairs, IJB templates, 1:N) and metric, and the one path by which eval.py
and validation during training score a model (metric.py)."""
from facerec.evaluation.bootstrap import Bootstrap, intervals, paired_comparison
from facerec.evaluation.embeddings import FLIP_MODES, embed, embedding_table, extract_embeddings
from facerec.evaluation.identification import IdentificationResult, MultiGalleryResult, identify
from facerec.evaluation.metric import EmbeddingNorms, Evaluation, EvaluationMetric, ScoringOptions, evaluate_features
from facerec.evaluation.options import bootstrap_from
from facerec.evaluation.protocols import (
    EvaluationProtocol,
    FolderIdentification,
    IjbIdentification,
    IjbVerification,
    PairVerification,
)
from facerec.evaluation.report import (
    SCORES_FILE,
    VAL_SCORES_FILE,
    format_table,
    log_to_wandb,
    mean_accuracy,
    plot_curves,
    read_scores,
    write_results,
    write_scores,
)
from facerec.evaluation.result import ProtocolResult
from facerec.evaluation.scored import ScoredItems
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
    "SCORES_FILE",
    "VAL_SCORES_FILE",
    "Bootstrap",
    "ScoredItems",
    "ScoringOptions",
    "bootstrap_from",
    "intervals",
    "paired_comparison",
    "read_scores",
    "write_scores",
    "FLIP_MODES",
    "EmbeddingNorms",
    "Evaluation",
    "EvaluationMetric",
    "EvaluationProtocol",
    "FolderIdentification",
    "IdentificationResult",
    "IjbIdentification",
    "IjbVerification",
    "MultiGalleryResult",
    "PairVerification",
    "ProtocolResult",
    "TemplateResult",
    "VerificationResult",
    "area_under_curve",
    "best_threshold",
    "cosine_scores",
    "embed",
    "embedding_table",
    "equal_error_rate",
    "evaluate_features",
    "extract_embeddings",
    "format_table",
    "identify",
    "log_to_wandb",
    "make_folds",
    "mean_accuracy",
    "plot_curves",
    "pool_templates",
    "roc_curve",
    "tar_at_far",
    "verify",
    "verify_templates",
    "write_results",
]

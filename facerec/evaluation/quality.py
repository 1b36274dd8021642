"""Quality: the error-versus-reject curve (ERC) of every protocol, with the embedding norm or any
per-image score as the quality.

An ERC (Grother and Tabassi, IEEE TPAMI 2007; ISO/IEC 29794-1) plots the error rate of the
comparisons that remain as the lowest-quality fraction of them is rejected, at a threshold fixed
before any rejection: FNMR at FMR 1e-3 and 1e-4 (the set's smallest reachable FMR where it has too
few impostors) for pairs and templates, FNIR at FPIR 1e-2 and 1e-1 for 1:N searches. A quality
score that predicts errors makes the curve fall fast. An item's quality is its lower side's
(facerec.evaluation.scored). The default score is the embedding norm of the flip-summed features,
the quality signal of MagFace and AdaFace.

Reported: the curve on rejection fractions 0, 0.01, ..., 0.99, and its area over [0, 0.99] and over
[0, 0.2] (lower is better; the area of a curve that stays at the starting error e is 0.99 e).
"""
from __future__ import annotations

import numpy as np

from facerec.evaluation.scored import ScoredItems

ERC_FRACTIONS = np.round(np.arange(100) / 100, 2)
PARTIAL_FRACTION = 0.2


def _area(fractions: np.ndarray, errors: np.ndarray, upto: float) -> float | None:
    shown = np.isfinite(errors) & (fractions <= upto + 1e-12)
    if shown.sum() < 2:
        return None
    x, y = fractions[shown], errors[shown]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2))


def error_versus_reject(items: ScoredItems, quality_name: str, fractions: np.ndarray = ERC_FRACTIONS) -> dict:
    """{"quality", "fractions", "curves": {label: errors}, "area": {label}, "area_0.2": {label}}, JSON-ready."""
    curves = items.error_versus_reject(fractions)
    return {
        "quality": quality_name,
        "fractions": fractions.tolist(),
        "curves": {label: [None if not np.isfinite(v) else float(v) for v in errors] for label, errors in curves.items()},
        "area": {label: _area(fractions, errors, fractions[-1]) for label, errors in curves.items()},
        f"area_{PARTIAL_FRACTION}": {label: _area(fractions, errors, PARTIAL_FRACTION) for label, errors in curves.items()},
    }

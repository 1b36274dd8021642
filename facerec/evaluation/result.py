"""What every evaluation protocol returns: a result that knows its metrics, its table row and its curve,
and holds the scored items they are computed from (facerec.evaluation.scored).

Results of one kind ("pairs", "templates", "identification") share a table and a figure panel; eval.py
prints them, writes them to results.json and plots them, and validation logs `summary()` and the same
tables and curves to every logger, without asking which kind a result is.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:
    from facerec.evaluation.scored import ScoredItems

RESULT_KINDS = ("pairs", "templates", "identification")  # the order of tables and panels


class ProtocolResult(ABC):
    """kind: "pairs" | "templates" | "identification"; notes: logged and kept in results.json
    (skipped items, which TAR rule, ...)."""

    kind: ClassVar[str]
    notes: list[str]
    items: ScoredItems | None = None  # what the metrics are functions of: intervals, comparisons, groups, quality

    @abstractmethod
    def summary(self) -> dict[str, float]:
        """Flat float metrics for loggers, keys like "accuracy", "tar@far=1e-04", "rank1", "tpir@fpir=1e-02"."""

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-ready: everything but large arrays."""

    @abstractmethod
    def table_row(self, intervals: Mapping[str, tuple[float, float]] | None = None) -> dict[str, str]:
        """{column header: formatted cell}, the same headers for every result of this kind; a metric
        with an interval (keyed as in `summary()`) prints as `88.60 [88.10, 89.00]`."""

    def curve(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """("roc", fpr, tpr) or ("cmc", ranks, identification rates) for the figure; None: no curve."""
        return None


def interval_cell(value: float | None, interval: tuple[float, float] | None, percent: bool) -> str:
    """`99.50 [99.23, 99.72]` (percent) or `0.9950 [0.9923, 0.9972]`; "n/a" for None; the point alone without an interval."""
    if value is None:
        return "n/a"
    scale, digits = (100, 2) if percent else (1, 4)
    cell = f"{scale * value:.{digits}f}"
    if interval is not None and all(bound is not None and np.isfinite(bound) for bound in interval):
        cell += f" [{scale * interval[0]:.{digits}f}, {scale * interval[1]:.{digits}f}]"
    return cell

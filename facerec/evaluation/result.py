"""What every evaluation protocol returns: a result that knows its metrics, its table row and its curve.

Results of one kind ("pairs", "templates", "identification") share a table and a figure panel; eval.py
prints them, writes them to results.json and plots them, and validation logs `summary()` and the same
tables and curves to every logger, without asking which kind a result is.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

RESULT_KINDS = ("pairs", "templates", "identification")  # the order of tables and panels


class ProtocolResult(ABC):
    """kind: "pairs" | "templates" | "identification"; notes: logged and kept in results.json
    (skipped items, which TAR rule, ...)."""

    kind: ClassVar[str]
    notes: list[str]

    @abstractmethod
    def summary(self) -> dict[str, float]:
        """Flat float metrics for loggers, keys like "accuracy", "tar@far=1e-04", "rank1", "tpir@fpir=1e-02"."""

    @abstractmethod
    def to_dict(self) -> dict:
        """JSON-ready: everything but large arrays."""

    @abstractmethod
    def table_row(self) -> dict[str, str]:
        """{column header: formatted cell}, the same headers for every result of this kind."""

    def curve(self) -> tuple[str, np.ndarray, np.ndarray] | None:
        """("roc", fpr, tpr) or ("cmc", ranks, identification rates) for the figure; None: no curve."""
        return None

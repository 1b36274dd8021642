"""Numbers and Markdown tables as the tools' reports print them."""
from __future__ import annotations

import math
from collections.abc import Sequence


def format_mean_std(mean: float, std: float, scale: float = 1.0, digits: int = 1, spec: str = "f") -> str:
    """"12.3 ± 0.4" (times `scale`), the mean alone where std is NaN, "–" where the mean is."""
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}{spec}}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}{spec}}"


def markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])

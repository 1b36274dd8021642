"""Reporting evaluation results: Markdown tables, results.json, a ROC/CMC figure and W&B plots."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from facerec.evaluation.protocols import REPORTED_FAR, RESULT_KINDS, ProtocolResult
from facerec.evaluation.verification import VerificationResult, tar_at_far

TABLE_COLUMNS = ["set", "pairs", "accuracy", "accuracy_std", f"tar@far={REPORTED_FAR:.0e}", "auc", "eer", "folds"]


@dataclass(frozen=True)
class EmbeddingNorms:
    """Mean and standard deviation (ddof=0) of the L2 norms of a set's features, the flip-summed,
    un-normalised embeddings scored by its protocol: a quality signal (small norms mark hard or
    broken images) and a sanity check of the model's preprocessing."""

    mean: float
    std: float

    @classmethod
    def of(cls, features) -> EmbeddingNorms:
        norms = np.linalg.norm(np.asarray(features, dtype=np.float64), axis=1)
        return cls(float(norms.mean()), float(norms.std()))


def table_rows(results: Mapping[str, VerificationResult]) -> list[list]:
    """One row per set, in TABLE_COLUMNS order (TAR None where the set is too small for that FAR)."""
    return [
        [name, r.num_pairs, r.accuracy, r.accuracy_std, r.tar_at_far.get(REPORTED_FAR), r.auc, r.eer, r.fold_policy]
        for name, r in results.items()
    ]


def format_table(results: Mapping[str, ProtocolResult], norms: Mapping[str, EmbeddingNorms] | None = None) -> str:
    """One Markdown table per result kind (pairs, templates, identification), in that order.

    Rows are the sets of that kind: the set name, the result's own columns (`table_row()`), and the
    mean ± std of the embedding norm where `norms` holds the set.
    """
    tables = []
    for kind in sorted({r.kind for r in results.values()}, key=_kind_order):
        rows = {name: r.table_row() for name, r in results.items() if r.kind == kind}
        columns = list(dict.fromkeys(column for row in rows.values() for column in row))
        header = ["set", *columns] + (["embedding norm (mean ± std)"] if norms else [])
        lines = [f"### {kind}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for name, row in rows.items():
            cells = [name, *(row.get(column, "–") for column in columns)]
            if norms:
                cells.append(f"{norms[name].mean:.3g} ± {norms[name].std:.2g}" if name in norms else "–")
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def _kind_order(kind: str) -> tuple[int, str]:
    return (RESULT_KINDS.index(kind) if kind in RESULT_KINDS else len(RESULT_KINDS), kind)


def write_results(
    results: Mapping[str, ProtocolResult],
    path: str | Path,
    norms: Mapping[str, EmbeddingNorms] | None = None,
    **context,
) -> Path:
    """results.json: `context` (the model source, flip, ...) and every set's result (its kind, its
    `to_dict()`, the embedding norm statistics where `norms` holds the set)."""
    path = Path(path)
    sets = {}
    for name, r in results.items():
        sets[name] = {"kind": r.kind, **r.to_dict()}
        if norms and name in norms:
            sets[name]["embedding_norm"] = asdict(norms[name])
    payload = {**context, "sets": sets}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def far_grid(result: VerificationResult, points_per_decade: int = 20) -> np.ndarray:
    """FARs from the smallest one the set resolves (1 / different pairs) to 1, evenly on a log scale."""
    smallest = 1.0 / max(result.num_pairs - result.num_same, 1)
    decades = -np.log10(smallest)
    return np.logspace(-decades, 0, max(int(np.ceil(decades * points_per_decade)), 1) + 1)


def plot_curves(results: Mapping[str, ProtocolResult], path: str | Path, title: str = "") -> Path:
    """One PNG: a ROC panel (TAR against FAR on a log scale) for the results whose curve is a ROC
    (pairs, templates), and beside it a CMC panel (identification rate against rank) for those whose
    curve is a CMC (identification), each panel only where such results exist."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {"roc": [], "cmc": []}
    for name, r in results.items():
        curve = r.curve()
        if curve is not None:
            curves[curve[0]].append((name, r, curve[1], curve[2]))
    panels = [kind for kind in ("roc", "cmc") if curves[kind]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.4 * max(len(panels), 1), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        (_plot_roc if kind == "roc" else _plot_cmc)(ax, curves[kind])
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _legend(name: str, result: ProtocolResult, key: str, label: str, percent: bool) -> str:
    value = result.summary().get(key)
    if value is None:
        return name
    return f"{name}: {label} {100 * value:.2f}%" if percent else f"{name}: {label} {value:.4f}"


def _plot_roc(ax, curves: list) -> None:
    smallest = 1.0
    for name, result, fpr, tpr in curves:
        shown = fpr > 0  # FAR = 0 has no place on a log axis
        smallest = min(smallest, fpr[shown].min())
        ax.step(fpr[shown], tpr[shown], where="post", label=_legend(name, result, "auc", "AUC", percent=False))
    ax.plot([smallest, 1.0], [smallest, 1.0], "k:", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(smallest, 1.0)
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title("ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def _plot_cmc(ax, curves: list) -> None:
    for name, result, ranks, rates in curves:
        ax.plot(ranks, rates, marker=".", label=_legend(name, result, "rank1", "rank-1", percent=True))
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("rank")
    ax.set_ylabel("identification rate (mated probes)")
    ax.set_title("CMC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def log_to_wandb(loggers: Sequence, results: Mapping[str, VerificationResult], step: int, prefix: str = "val") -> None:
    """Log the per-set table and the ROC (TAR against log10 FAR, one line per set) to every
    attached Lightning WandbLogger; nothing happens without one."""
    from lightning.pytorch.loggers import WandbLogger

    runs = [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]
    if not runs or not results:
        return
    import wandb

    roc_rows = []
    for name, r in results.items():
        fars = far_grid(r)
        roc_rows += [[name, float(np.log10(f)), float(f), float(t)] for f, t in zip(fars, tar_at_far(r.fpr, r.tpr, fars))]
    for run in runs:
        roc = wandb.Table(columns=["set", "log10(FAR)", "FAR", "TAR"], data=roc_rows)
        run.log(
            {
                f"{prefix}/roc": wandb.plot.line(roc, "log10(FAR)", "TAR", stroke="set", title="ROC (TAR vs log10 FAR)"),
                f"{prefix}/table": wandb.Table(columns=TABLE_COLUMNS, data=table_rows(results)),
                "trainer/global_step": step,
            }
        )

"""Reporting evaluations: Markdown tables, results.json, a ROC/CMC figure, and the same tables and
curves in W&B; for every kind of result (pairs, templates, identification) alike."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from facerec.evaluation.metric import Evaluation
from facerec.evaluation.result import RESULT_KINDS, ProtocolResult
from facerec.evaluation.verification import tar_at_far


def mean_accuracy(evaluations: Mapping[str, Evaluation]) -> float | None:
    """The mean 10-fold accuracy of the sets that report one (pair sets): `val/accuracy_mean`, the
    default model-selection metric, and what eval.py returns to a sweeper. None without such a set."""
    accuracies = [e.result.summary()["accuracy"] for e in evaluations.values() if "accuracy" in e.result.summary()]
    return sum(accuracies) / len(accuracies) if accuracies else None


def _by_kind(evaluations: Mapping[str, Evaluation]) -> dict[str, dict[str, Evaluation]]:
    """The evaluations grouped by result kind, kinds in RESULT_KINDS order, sets in their own order."""
    kinds = sorted({e.result.kind for e in evaluations.values()}, key=_kind_order)
    return {kind: {name: e for name, e in evaluations.items() if e.result.kind == kind} for kind in kinds}


def _kind_order(kind: str) -> tuple[int, str]:
    return (RESULT_KINDS.index(kind) if kind in RESULT_KINDS else len(RESULT_KINDS), kind)


def format_table(evaluations: Mapping[str, Evaluation]) -> str:
    """One Markdown table per result kind (pairs, templates, identification), in that order: the set
    name, the result's own columns (`table_row()`) and the mean ± std of the embedding norm."""
    tables = []
    for kind, group in _by_kind(evaluations).items():
        rows = {name: e.result.table_row() for name, e in group.items()}
        columns = list(dict.fromkeys(column for row in rows.values() for column in row))
        header = ["set", *columns, "embedding norm (mean ± std)"]
        lines = [f"### {kind}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for name, row in rows.items():
            norms = group[name].norms
            cells = [name, *(row.get(column, "–") for column in columns), f"{norms.mean:.3g} ± {norms.std:.2g}"]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def write_results(evaluations: Mapping[str, Evaluation], path: str | Path, **context) -> Path:
    """results.json: `context` (the model source, flip, ...) and every set's result (its kind, its
    `to_dict()`, the embedding norm statistics)."""
    path = Path(path)
    sets = {
        name: {"kind": e.result.kind, **e.result.to_dict(), "embedding_norm": asdict(e.norms)} for name, e in evaluations.items()
    }
    path.write_text(json.dumps({**context, "sets": sets}, indent=2) + "\n")
    return path


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


def far_grid(fpr: np.ndarray, points_per_decade: int = 20) -> np.ndarray:
    """FARs from the smallest non-zero one of a ROC to 1, evenly on a log scale."""
    smallest = float(fpr[fpr > 0].min()) if (fpr > 0).any() else 1.0
    decades = -math.log10(smallest)
    return np.logspace(-decades, 0, max(int(np.ceil(decades * points_per_decade)), 1) + 1)


def wandb_curve_rows(results: Mapping[str, ProtocolResult]) -> dict[str, list[list]]:
    """{"roc": [set, log10(FAR), FAR, TAR] rows on a log FAR grid, "cmc": [set, rank, rate] rows}."""
    rows: dict[str, list[list]] = {"roc": [], "cmc": []}
    for name, result in results.items():
        curve = result.curve()
        if curve is None:
            continue
        kind, x, y = curve
        if kind == "roc":
            fars = far_grid(x)
            rows["roc"] += [[name, float(np.log10(f)), float(f), float(t)] for f, t in zip(fars, tar_at_far(x, y, fars))]
        else:
            rows["cmc"] += [[name, int(rank), float(rate)] for rank, rate in zip(x, y)]
    return rows


def log_to_wandb(loggers: Sequence, evaluations: Mapping[str, Evaluation], step: int, prefix: str = "val") -> None:
    """Log, to every attached Lightning WandbLogger, one table per result kind (a row per set: its
    `summary()` metrics) and the ROC (TAR against log10 FAR) and CMC curves, one line per set;
    nothing happens without a WandbLogger."""
    from lightning.pytorch.loggers import WandbLogger

    runs = [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]
    if not runs or not evaluations:
        return
    import wandb

    curves = wandb_curve_rows({name: e.result for name, e in evaluations.items()})
    for run in runs:
        payload: dict = {"trainer/global_step": step}
        for kind, group in _by_kind(evaluations).items():
            summaries = {name: e.summary() for name, e in group.items()}
            columns = list(dict.fromkeys(key for summary in summaries.values() for key in summary))
            data = [[name, *(summary.get(column) for column in columns)] for name, summary in summaries.items()]
            payload[f"{prefix}/{kind}_table"] = wandb.Table(columns=["set", *columns], data=data)
        if curves["roc"]:
            roc = wandb.Table(columns=["set", "log10(FAR)", "FAR", "TAR"], data=curves["roc"])
            payload[f"{prefix}/roc"] = wandb.plot.line(roc, "log10(FAR)", "TAR", stroke="set", title="ROC (TAR vs log10 FAR)")
        if curves["cmc"]:
            cmc = wandb.Table(columns=["set", "rank", "identification rate"], data=curves["cmc"])
            payload[f"{prefix}/cmc"] = wandb.plot.line(cmc, "rank", "identification rate", stroke="set", title="CMC")
        run.log(payload)

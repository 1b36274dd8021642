"""Reporting verification results: a table, results.json, a ROC figure and W&B plots."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from facerec.evaluation.verification import VerificationResult, tar_at_far

REPORTED_FAR = 1e-3
TABLE_COLUMNS = ["set", "pairs", "accuracy", "accuracy_std", f"tar@far={REPORTED_FAR:.0e}", "auc", "eer", "folds"]


def table_rows(results: Mapping[str, VerificationResult]) -> list[list]:
    """One row per set, in TABLE_COLUMNS order (TAR None where the set is too small for that FAR)."""
    return [
        [name, r.num_pairs, r.accuracy, r.accuracy_std, r.tar_at_far.get(REPORTED_FAR), r.auc, r.eer, r.fold_policy]
        for name, r in results.items()
    ]


def format_table(results: Mapping[str, VerificationResult]) -> str:
    """A Markdown table: set, pairs, accuracy ± std, TAR@FAR=1e-3, AUC, EER, fold policy."""
    lines = [
        f"| set | pairs | accuracy (%) | TAR@FAR={REPORTED_FAR:.0e} (%) | AUC | EER (%) | folds |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, pairs, accuracy, std, tar, auc, eer, folds in table_rows(results):
        tar_text = "n/a" if tar is None else f"{100 * tar:.2f}"
        lines.append(
            f"| {name} | {pairs} | {100 * accuracy:.2f} ± {100 * std:.2f} | {tar_text} | {auc:.4f} | {100 * eer:.2f} | {folds} |"
        )
    return "\n".join(lines)


def write_results(results: Mapping[str, VerificationResult], path: str | Path, **context) -> Path:
    """results.json: `context` (checkpoint, flip, ...) and every set's result (without the ROC arrays)."""
    path = Path(path)
    payload = {**context, "sets": {name: r.to_dict() for name, r in results.items()}}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def far_grid(result: VerificationResult, points_per_decade: int = 20) -> np.ndarray:
    """FARs from the smallest one the set resolves (1 / different pairs) to 1, evenly on a log scale."""
    smallest = 1.0 / max(result.num_pairs - result.num_same, 1)
    decades = -np.log10(smallest)
    return np.logspace(-decades, 0, max(int(np.ceil(decades * points_per_decade)), 1) + 1)


def plot_roc(results: Mapping[str, VerificationResult], path: str | Path, title: str = "ROC") -> Path:
    """All sets' ROC curves on one figure, FAR on a log scale, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    smallest = 1.0
    for name, r in results.items():
        shown = r.fpr > 0  # FAR = 0 has no place on a log axis
        smallest = min(smallest, r.fpr[shown].min())
        label = f"{name}: {100 * r.accuracy:.2f} ± {100 * r.accuracy_std:.2f}%, AUC {r.auc:.4f}"
        ax.step(r.fpr[shown], r.tpr[shown], where="post", label=label)
    ax.plot([smallest, 1.0], [smallest, 1.0], "k:", linewidth=1, label="chance")
    ax.set_xscale("log")
    ax.set_xlim(smallest, 1.0)
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


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

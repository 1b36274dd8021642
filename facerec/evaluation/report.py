"""Reporting evaluations: Markdown tables, results.json, a ROC/CMC figure, and the same tables and
curves in W&B; for every kind of result (pairs, templates, identification) alike."""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from facerec.evaluation.bootstrap import NO_INTERVAL
from facerec.evaluation.metric import Evaluation
from facerec.evaluation.result import RESULT_KINDS, ProtocolResult, interval_cell
from facerec.evaluation.scored import ScoredItems
from facerec.evaluation.verification import tar_at_far

SCORES_FILE = "scores.npz"  # beside results.json: every set's scored items (facerec.tools.compare_eval reads them)
VAL_SCORES_FILE = "val_scores.npz"  # in a training run's folder: the last validation's (facerec.tools.compare reads them)


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
    name, the result's own columns (`table_row(intervals)`: `88.60 [88.10, 89.00]` where the
    evaluation has intervals) and the mean ± std of the embedding norm; then one table per set
    scored by group, and the quality (ERC) areas."""
    tables = []
    for kind, group in _by_kind(evaluations).items():
        rows = {name: e.result.table_row(e.intervals) for name, e in group.items()}
        columns = list(dict.fromkeys(column for row in rows.values() for column in row))
        header = ["set", *columns, "embedding norm (mean ± std)"]
        lines = [f"### {kind}", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for name, row in rows.items():
            norms = group[name].norms
            cells = [name, *(row.get(column, "–") for column in columns), f"{norms.mean:.3g} ± {norms.std:.2g}"]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    tables += [group_table(name, e.groups) for name, e in evaluations.items() if e.groups]
    quality = quality_table(evaluations)
    return "\n\n".join(tables + ([quality] if quality else []))


def metric_cell(key: str, value: float | None, interval) -> str:
    """A metric of `summary()` keys: rates in percent, AUC as a fraction."""
    return interval_cell(value, interval, percent=key != "auc")


def group_table(name: str, groups: dict) -> str:
    """A set's metrics per group, with intervals, and the spread over groups (std, largest / smallest error)."""
    metrics = groups["metrics"]
    keys = [key for key in next(iter(metrics.values())) if key not in NO_INTERVAL]
    header = ["group", "items", *(f"{key} (%)" if key != "auc" else key for key in keys)]
    lines = [f"### {name} by group", "", "| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for group, values in metrics.items():
        cells = [metric_cell(key, values.get(key), groups["intervals"][group].get(key)) for key in keys]
        lines.append("| " + " | ".join([group, str(groups["items"][group]), *cells]) + " |")
    spread = groups["spread"]
    lines.append("| std over groups | | " + " | ".join(metric_cell(k, spread[k]["std"], None) if k in spread else "–" for k in keys) + " |")
    ratios = [f"{spread[k]['max_min_error_ratio']:.2f}" if k in spread else "–" for k in keys]
    lines.append("| largest / smallest error | | " + " | ".join(ratios) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in groups["notes"]]).rstrip()


def quality_table(evaluations: Mapping[str, Evaluation]) -> str:
    """The area under each set's error-versus-reject curves (lower: the quality score predicts errors better)."""
    rows = []
    for name, e in evaluations.items():
        if e.erc:
            for label, area in e.erc["area"].items():
                start = e.erc["curves"][label][0]
                partial = e.erc["area_0.2"][label]
                rows.append(
                    f"| {name} | {e.erc['quality']} | {label} | {_fraction(start)} | {_fraction(area)} | {_fraction(partial)} |"
                )
    if not rows:
        return ""
    header = "| set | quality | error | at 0 rejected | ERC area [0, 0.99] | ERC area [0, 0.2] |"
    return "\n".join(["### quality (error versus reject)", "", header, "|---|---|---|---:|---:|---:|", *rows])


def _fraction(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def write_results(evaluations: Mapping[str, Evaluation], path: str | Path, **context) -> Path:
    """results.json: `context` (the model source, flip, bootstrap, ...) and every set's result (its
    kind, its `to_dict()`, the embedding norm statistics, the intervals {metric: [low, high]}, the
    quality curves and the per-group results where computed). Written whole or not at all."""
    sets = {}
    for name, e in evaluations.items():
        sets[name] = {"kind": e.result.kind, **e.result.to_dict(), "embedding_norm": asdict(e.norms)}
        sets[name]["intervals"] = {key: list(bounds) for key, bounds in e.intervals.items()}
        if e.erc:
            sets[name]["quality"] = e.erc
        if e.groups:
            sets[name]["groups"] = {**e.groups, "intervals": {g: {k: list(v) for k, v in i.items()} for g, i in e.groups["intervals"].items()}}
    text = json.dumps({**context, "sets": sets}, indent=2) + "\n"
    return _write_atomic(Path(path), lambda file: file.write(text.encode()))


def write_scores(evaluations: Mapping[str, Evaluation], path: str | Path) -> Path | None:
    """scores.npz (compressed): each set's scored items (`ScoredItems.arrays()`, keys "<set>/<array>"),
    what facerec.tools.compare_eval pairs two evaluations on. None where no set has items."""
    arrays = {
        f"{name}/{key}": value
        for name, e in evaluations.items()
        if e.result.items is not None
        for key, value in e.result.items.arrays().items()
    }
    if not arrays:
        return None
    return _write_atomic(Path(path), lambda file: np.savez_compressed(file, **arrays))


def read_scores(path: str | Path) -> dict[str, ScoredItems]:
    """{set: ScoredItems} from a `write_scores` file."""
    with np.load(path, allow_pickle=False) as data:
        by_set: dict[str, dict] = {}
        for key in data.files:
            name, _, array = key.partition("/")
            by_set.setdefault(name, {})[array] = data[key]
    return {name: ScoredItems.from_arrays(arrays) for name, arrays in by_set.items()}


def _write_atomic(path: Path, write) -> Path:
    """Write through a temporary file in the same folder and rename it: a crash leaves the old file or none."""
    temporary = path.with_name(f".{path.name}.partial")
    with open(temporary, "wb") as file:
        write(file)  # an open binary file
    os.replace(temporary, path)
    return path


def plot_curves(results: Mapping[str, ProtocolResult], path: str | Path, title: str = "", erc: Mapping[str, dict] | None = None) -> Path:
    """One PNG: a ROC panel (TAR against FAR on a log scale) for the results whose curve is a ROC
    (pairs, templates), beside it a CMC panel (identification rate against rank) for those whose
    curve is a CMC (identification), and an error-versus-reject panel for the sets in `erc`
    ({set: Evaluation.erc}), each panel only where such results exist."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    curves: dict[str, list] = {"roc": [], "cmc": []}
    for name, r in results.items():
        curve = r.curve()
        if curve is not None:
            curves[curve[0]].append((name, r, curve[1], curve[2]))
    curves["erc"] = [(name, curve) for name, curve in (erc or {}).items() if curve]
    panels = [kind for kind in ("roc", "cmc", "erc") if curves[kind]]
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(6.4 * max(len(panels), 1), 4.8), squeeze=False)
    for ax, kind in zip(axes[0], panels):
        {"roc": _plot_roc, "cmc": _plot_cmc, "erc": _plot_erc}[kind](ax, curves[kind])
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
    # TAR = FAR is a curve on a log-FAR axis: two end points joined by a straight segment would put it
    # at TAR 0.5 where FAR = 1e-2 (with the axis from 1e-4).
    chance = np.logspace(np.log10(smallest), 0.0, 200)
    ax.plot(chance, chance, "k:", linewidth=1, label="chance (TAR = FAR)")
    ax.set_xscale("log")
    ax.set_xlim(smallest, 1.0)
    ax.set_ylim(0.0, 1.005)
    ax.set_xlabel("false accept rate (FAR)")
    ax.set_ylabel("true accept rate (TAR)")
    ax.set_title("ROC")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")


def _plot_erc(ax, curves: list) -> None:
    styles = ("-", "--", ":", "-.")
    for colour, (name, erc) in enumerate(curves):
        for style, (label, errors) in zip(styles, erc["curves"].items()):
            y = np.array([np.nan if e is None else e for e in errors], dtype=np.float64)
            ax.plot(erc["fractions"], y, style, color=f"C{colour}", label=f"{name}: {label}")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.set_xlabel(f"fraction rejected, lowest {curves[0][1]['quality']} first")
    ax.set_ylabel("error rate of the rest (FNMR / FNIR)")
    ax.set_title("Error versus reject")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small")


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


def log_to_wandb(
    loggers: Sequence, evaluations: Mapping[str, Evaluation], step: int, prefix: str = "val", history: Sequence[Sequence] = ()
) -> None:
    """Log, to every attached Lightning WandbLogger, one table per result kind (a row per set: its
    `summary()` metrics and their interval bounds) and the ROC (TAR against log10 FAR) and CMC curves, one line per set;
    with `history` ([step, set, accuracy] rows of every validation so far) the accuracy of each set
    against the step, one line per set: fine-tuning's gain on the new people and loss on the
    original domain on one panel. Nothing happens without a WandbLogger."""
    from lightning.pytorch.loggers import WandbLogger

    runs = [logger.experiment for logger in loggers if isinstance(logger, WandbLogger)]
    if not runs or not evaluations:
        return
    import wandb

    curves = wandb_curve_rows({name: e.result for name, e in evaluations.items()})
    for run in runs:
        payload: dict = {"trainer/global_step": step}
        for kind, group in _by_kind(evaluations).items():
            summaries = {name: {**e.summary(), **e.bounds()} for name, e in group.items()}
            columns = list(dict.fromkeys(key for summary in summaries.values() for key in summary))
            data = [[name, *(summary.get(column) for column in columns)] for name, summary in summaries.items()]
            payload[f"{prefix}/{kind}_table"] = wandb.Table(columns=["set", *columns], data=data)
        if curves["roc"]:
            roc = wandb.Table(columns=["set", "log10(FAR)", "FAR", "TAR"], data=curves["roc"])
            payload[f"{prefix}/roc"] = wandb.plot.line(roc, "log10(FAR)", "TAR", stroke="set", title="ROC (TAR vs log10 FAR)")
        if curves["cmc"]:
            cmc = wandb.Table(columns=["set", "rank", "identification rate"], data=curves["cmc"])
            payload[f"{prefix}/cmc"] = wandb.plot.line(cmc, "rank", "identification rate", stroke="set", title="CMC")
        if history:
            by_set = wandb.Table(columns=["step", "set", "accuracy"], data=[list(row) for row in history])
            payload[f"{prefix}/accuracy_by_set"] = wandb.plot.line(by_set, "step", "accuracy", stroke="set", title="held-out accuracy per set")
        run.log(payload)

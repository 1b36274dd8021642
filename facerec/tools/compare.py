"""Compare the runs of Hydra multiruns on scale-invariant metrics: one figure and one Markdown table.

    python -m facerec.tools.compare logs/train/multiruns/<time> [more multirun dirs] [--out DIR]

Each run's local CSV log (`csv/metrics.csv`, written by `logger=csv` or `logger=wandb_csv`) is read
(facerec.tools.runs); W&B offline files are not needed (in wandb >= 0.16 they are binary protobuf).
Runs are grouped by the keys their sweep varied (the multirun.yaml of each directory; seeds are
aggregated): one group per setting, e.g. `scale=fixed` and `scale=auto`, each with mean ± std over
its seeds. Where the runs saved their last validation's scored items (`val_scores.npz`,
save_val_scores=true, the default), each setting's final metric is compared with a baseline setting
(the first, or --baseline) by a paired two-level bootstrap over seeds and identities
(facerec.evaluation.bootstrap.paired_runs): the table gives the difference, its 95 % interval and
whether it is resolved (the interval excludes 0).

Raw cross-entropy is not comparable across different s (its floor and slope depend on s), so the
comparison rests on held-out verification accuracy and TAR@FAR, the median target angle theta_med
and the target probability; the loss is shown only as logged. Works offline, on finished or
running sweeps.

The s-sweep view of experiment=s_star sweeps is facerec.tools.s_sweep.
"""
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facerec.evaluation import VAL_SCORES_FILE, Bootstrap, ScoredItems, read_scores
from facerec.evaluation.bootstrap import Difference, paired_runs
from facerec.tools.markdown import format_mean_std, markdown
from facerec.tools.runs import DEFAULT_METRIC, TRAIN_TAIL, Run, group_runs, load_runs, mean_std, median_grad_norm


@dataclass
class GroupSummary:
    """Mean and std over the seeds of one setting; NaN where a run did not log the metric."""

    label: str
    runs: int
    values: dict[str, tuple[float, float]]  # column -> (mean, std over runs)
    tar_metric: str | None  # the logged series behind the "tar" column, e.g. val/lfw/tar@far=1e-03


def tar_metric(runs: Sequence[Run], far: float | None) -> str | None:
    """The TAR@FAR series to report: at `far`, or (None) at the smallest FAR that the runs log.
    With several validation sets, the first by name that logs it."""
    logged = {key for run in runs for key in run.series}
    candidates = sorted(
        (float(key.rsplit("=", 1)[1]), key) for key in logged if re.fullmatch(r"val/[^/]+/tar@far=[0-9.e+-]+", key)
    )
    if far is not None:
        candidates = [item for item in candidates if math.isclose(item[0], far)]
    return min(candidates)[1] if candidates else None


def steps_to_fraction_of_best(run: Run, metric: str, fraction: float = 0.95) -> float:
    """The first step at which `metric` reached `fraction` of the run's best value."""
    steps, values = run.curve(metric)
    if len(values) == 0:
        return math.nan
    return float(steps[np.argmax(values >= fraction * values.max())])


def summarize(groups: dict[str, list[Run]], metric: str = DEFAULT_METRIC, far: float | None = 1e-3) -> list[GroupSummary]:
    runs = [run for group in groups.values() for run in group]
    tar = tar_metric(runs, far)
    if tar is None and far is not None:
        tar = tar_metric(runs, None)  # e.g. LFW DevTest: 499 different pairs cannot measure FAR = 1e-3
    columns = {
        "steps": lambda run: float(run.curve("train/loss")[0][-1]) + 1 if len(run.curve("train/loss")[0]) else math.nan,
        "nonfinite": lambda run: run.final("train/nonfinite_steps"),
        "final": lambda run: run.final(metric),
        "best": lambda run: float(np.max(run.curve(metric)[1])) if len(run.curve(metric)[1]) else math.nan,
        "tar": lambda run: run.final(tar) if tar else math.nan,
        "s": lambda run: run.final("train/s", TRAIN_TAIL),
        "theta_med": lambda run: run.final("train/theta_med", TRAIN_TAIL),
        "p_target": lambda run: run.final("train/p_target", TRAIN_TAIL),
        "top1": lambda run: run.final("train/top1", TRAIN_TAIL),
        "loss": lambda run: run.final("train/loss", TRAIN_TAIL),
        "grad_norm": median_grad_norm,
        "steps_to_95": lambda run: steps_to_fraction_of_best(run, metric),
        "wall_time_s": lambda run: run.wall_time_s,
    }
    return [
        GroupSummary(label, len(group), {name: mean_std([get(run) for run in group]) for name, get in columns.items()}, tar)
        for label, group in groups.items()
    ]


def scored_metric(metric: str):
    """The logged validation series `metric` as a function of the runs' scored items (and weights):
    val/<key>_mean, the mean <key> of the sets that report one (val/accuracy_mean, val/auc_mean), or
    val/<set>/<key>."""
    mean_over_sets = re.fullmatch(r"val/([^/]+)_mean", metric)
    if mean_over_sets:
        key = mean_over_sets.group(1)

        def mean_value(items: dict[str, ScoredItems], weights) -> float:
            found = [items[n].metrics(None if weights is None else weights[n]) for n in sorted(items)]
            reported = [m[key] for m in found if m.get(key) is not None]
            if not reported:
                raise ValueError(f"{metric}: no set reports {key} on this sample")
            return float(np.mean(reported))

        return mean_value
    match = re.fullmatch(r"val/([^/]+)/(.+)", metric)
    if not match:
        raise ValueError(f"no paired comparison for {metric!r}: expected val/<metric>_mean or val/<set>/<metric>")
    name, key = match.groups()

    def value(items: dict[str, ScoredItems], weights) -> float:
        result = items[name].metrics(None if weights is None else weights[name]).get(key)
        if result is None:
            raise ValueError(f"{metric} is undefined on this sample")
        return result

    return value


def _by_seed(runs: Sequence[Run]) -> list[Run]:
    return sorted(runs, key=lambda run: (run.overrides.get("seed", ""), str(run.path)))


def paired_differences(
    groups: dict[str, list[Run]], metric: str, baseline: str | None, bootstrap: Bootstrap
) -> tuple[str, dict[str, Difference | None], list[str]]:
    """(baseline label, {label: Difference against it, None where not computable}, notes)."""
    baseline = baseline or next(iter(groups))
    if baseline not in groups:
        raise ValueError(f"--baseline {baseline!r} is not a setting of these runs: {list(groups)}")
    notes: list[str] = []
    scores = {run.path: run.path / VAL_SCORES_FILE for group in groups.values() for run in group}
    missing = [str(path.parent) for path in scores.values() if not path.is_file()]
    if missing:
        notes.append(f"no paired intervals: {len(missing)} runs saved no {VAL_SCORES_FILE} (train with save_val_scores=true), e.g. {missing[0]}")
        return baseline, {}, notes
    items = {path: read_scores(file) for path, file in scores.items()}
    value = scored_metric(metric)
    reference_runs = _by_seed(groups[baseline])
    reference = [items[run.path] for run in reference_runs]
    seeds = [run.overrides.get("seed") for run in reference_runs]
    differences: dict[str, Difference | None] = {}
    for label, group in groups.items():
        if label == baseline:
            continue
        runs = _by_seed(group)
        if [run.overrides.get("seed") for run in runs] != seeds:
            differences[label] = None
            notes.append(f"`{label}`: no paired interval (seeds {[r.overrides.get('seed') for r in runs]}, the baseline's {seeds})")
            continue
        try:
            differences[label] = paired_runs(reference, [items[run.path] for run in runs], value, bootstrap)
        except (ValueError, KeyError) as error:
            differences[label] = None
            notes.append(f"`{label}`: no paired interval ({error})")
    return baseline, differences, notes


def markdown_table(
    summaries: Sequence[GroupSummary],
    metric: str = DEFAULT_METRIC,
    paired: tuple[str, dict[str, Difference | None], float] | None = None,
) -> str:
    """One row per setting: mean ± std over its runs (± only where there are several); with `paired`
    (baseline, differences, level), the difference of the final metric from the baseline setting, its
    interval and whether it is resolved."""
    tar = next((s.tar_metric for s in summaries if s.tar_metric), None)
    tar_header = f"TAR@FAR={tar.rsplit('=', 1)[1]} (%)" if tar else "TAR@FAR (%)"
    header = [
        "setting", "runs", "steps", "skipped non-finite steps", "s (end)", f"final {metric} (%)", "best (%)", tar_header, "θ_med end (°)",
        "P(target) end", "train top-1 (%)", "loss end (not comparable)", "grad norm backbone (median)",
        "steps to 95% of best", "wall time / run (min)",
    ]  # fmt: skip
    rows = []
    for summary in summaries:
        v = summary.values
        rows.append([
            f"`{summary.label}`", str(summary.runs), format_mean_std(*v["steps"], digits=0),
            format_mean_std(*v["nonfinite"], digits=0), format_mean_std(*v["s"], digits=2),
            format_mean_std(*v["final"], 100), format_mean_std(*v["best"], 100), format_mean_std(*v["tar"], 100),
            format_mean_std(*v["theta_med"]), format_mean_std(*v["p_target"], spec="e"), format_mean_std(*v["top1"], 100),
            format_mean_std(*v["loss"], digits=2), format_mean_std(*v["grad_norm"], digits=2),
            format_mean_std(*v["steps_to_95"], digits=0), format_mean_std(*v["wall_time_s"], 1 / 60),
        ])  # fmt: skip
        if paired:
            rows[-1] += _paired_cells(summary.label, metric, *paired[:2])
    if paired:
        unit = "" if metric.endswith("/auc") else " (pp)"
        header += [f"final − `{paired[0]}`{unit} [{paired[2]:.0%} interval]", "resolved"]
    return markdown(header, rows)


def _paired_cells(label: str, metric: str, baseline: str, differences: dict[str, Difference | None]) -> list[str]:
    if label == baseline:
        return ["baseline", ""]
    found = differences.get(label)
    if found is None or found.interval is None:
        return ["–", "–"]
    (scale, digits), (low, high) = ((1, 4) if metric.endswith("/auc") else (100, 2)), found.interval
    cell = f"{scale * found.difference:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"
    return [cell, "yes" if found.resolved else "no"]


PANELS = [  # metric (None: the compared one), y label, smooth the per-batch values, log y axis
    (None, "held-out verification accuracy (%)", False, False),
    ("train/theta_med", "θ_med, median target angle (°)", True, False),
    ("train/s", "scale s", False, True),  # log axes: a diverging run (s, loss ~ 1e12) stays readable
    ("train/loss", "training loss (not comparable across s)", True, True),
    ("train/p_target", "P(target), median", True, True),
    ("train/grad_norm_backbone", "gradient norm, backbone (s scales it)", True, True),
]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    if window <= 1 or len(values) < window:
        return values
    kernel = np.ones(window) / window
    return np.convolve(np.pad(values, (window // 2, window - 1 - window // 2), mode="edge"), kernel, mode="valid")


def group_curve(runs: Sequence[Run], metric: str, smooth: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Steps, mean and std over the runs of one setting (each run interpolated onto the longest run's steps)."""
    curves = [run.curve(metric) for run in runs if len(run.curve(metric)[1])]
    if not curves:
        return None
    steps = max((c[0] for c in curves), key=len)
    window = max(1, len(steps) // 50) if smooth else 1
    stacked = np.stack([np.interp(steps, s, _smooth(v, window), right=np.nan) for s, v in curves])
    with np.errstate(invalid="ignore"):
        return steps, np.nanmean(stacked, axis=0), np.nanstd(stacked, axis=0)


def plot_comparison(groups: dict[str, list[Run]], metric: str = DEFAULT_METRIC, title: str | None = None):
    """A matplotlib Figure: the compared metric and the scale diagnostics against the step, one line
    per setting (mean over its runs, shaded ± std)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter

    figure, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    for ax, (panel_metric, ylabel, smooth, log_y) in zip(axes.flat, PANELS):
        factor = 100 if panel_metric is None else 1
        for colour, (label, runs) in enumerate(groups.items()):
            curve = group_curve(runs, panel_metric or metric, smooth)
            if curve is None:
                continue
            steps, mean, std = curve
            line_style = "o-" if panel_metric is None else "-"
            ax.plot(steps, mean * factor, line_style, color=f"C{colour}", markersize=3, label=f"{label} (n={len(runs)})")
            ax.fill_between(steps, (mean - std) * factor, (mean + std) * factor, color=f"C{colour}", alpha=0.2, linewidth=0)
        ax.set(xlabel="step", ylabel=ylabel, yscale="log" if log_y else "linear")
        if log_y:  # plain numbers (30, 60) rather than 3x10^1; minor ticks labelled over short ranges
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.grid(alpha=0.3)
    axes.flat[0].set_title(metric, fontsize="medium")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    # as many columns as fit the figure's width (~170 characters of legend text across 15 inches)
    columns = max(1, min(len(labels), 5, 170 // (max(map(len, labels), default=1) + 6)))
    rows = -(-len(labels) // columns)
    figure.legend(handles, labels, loc="lower center", ncol=columns, frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.015 + 0.03 * rows, 1, 0.97 if title else 1))
    return figure


def compare(
    sweep_dirs: Sequence[Path],
    out_dir: Path,
    metric: str = DEFAULT_METRIC,
    far: float | None = 1e-3,
    name: str = "comparison",
    baseline: str | None = None,
    bootstrap: Bootstrap = Bootstrap(),
) -> tuple[Path, Path, str]:
    """Write `<out_dir>/<name>.png` and `<name>.md` for the runs of `sweep_dirs`; returns both paths and the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, keys = load_runs(sweep_dirs)
    groups = group_runs(runs, keys)
    paired, notes = None, []
    if len(groups) > 1 and bootstrap.resamples:
        baseline, differences, notes = paired_differences(groups, metric, baseline, bootstrap)
        paired = (baseline, differences, bootstrap.level) if differences else None
    table = markdown_table(summarize(groups, metric, far), metric, paired)
    if notes:
        table += "\n\n" + "\n".join(f"- {note}" for note in notes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # the sweeps' names; a single run dir stands for its sweep (the parent of the numbered dir)
    sweeps = dict.fromkeys(path.parent.name if (path / ".hydra").is_dir() else path.name for path in map(Path, sweep_dirs))
    figure = plot_comparison(groups, metric, title=", ".join(sweeps))
    figure_path, table_path = out_dir / f"{name}.png", out_dir / f"{name}.md"
    figure.savefig(figure_path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    sources = ", ".join(f"`{d}`" for d in sweep_dirs)
    table_path.write_text(
        f"Runs: {sources}. Mean ± std over seeds; train values at the end are means over the last "
        f"{TRAIN_TAIL:.0%} of steps; wall time from each run's train.log. Paired differences: seed k against "
        f"seed k, {bootstrap.resamples} two-level resamples (seeds and identities), percentile interval.\n\n{table}\n"
    )
    return figure_path, table_path, table


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facerec.tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun directories (or single run dirs)")
    parser.add_argument("--out", type=Path, help="where to write the figures and the table (default: the first dir)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"the compared validation metric (default {DEFAULT_METRIC})")
    parser.add_argument("--far", type=float, default=1e-3, help="TAR at this FAR (else the smallest FAR logged)")
    parser.add_argument("--name", default="comparison", help="file name stem of the figure and table (default: comparison)")
    parser.add_argument("--baseline", help="the setting the others are compared with (default: the first)")
    parser.add_argument("--resamples", type=int, default=1000, help="paired bootstrap replicates (0: no paired columns)")
    args = parser.parse_args(argv)
    try:
        figure_path, table_path, table = compare(
            args.sweep_dirs, args.out or args.sweep_dirs[0], args.metric, args.far, args.name, args.baseline, Bootstrap(args.resamples)
        )
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"facerec.tools.compare: {error}") from None
    print(table)
    print(f"\nwrote {figure_path} and {table_path}")


if __name__ == "__main__":
    main()

"""Compare the runs of Hydra multiruns on scale-invariant metrics: one figure and one Markdown table.

    python -m facerec.tools.compare logs/train/multiruns/<time> [more multirun dirs] [--out DIR]

Each run's local CSV log (`csv/metrics.csv`, written by `logger=csv` or `logger=wandb_csv`) is read;
W&B offline files are not needed (in wandb >= 0.16 they are binary protobuf). Runs are grouped by
the keys their sweep varied (the multirun.yaml of each directory; seeds are aggregated): one group
per setting, e.g. `scale=fixed` and `scale=auto`, each with mean ± std over its seeds.

Raw cross-entropy is not comparable across different s (its floor and slope depend on s), so the
comparison rests on held-out verification accuracy and TAR@FAR, the median target angle theta_med
and the target probability; the loss is shown only as logged. Works offline, on finished or
running sweeps.

    python -m facerec.tools.compare <experiment=s_star sweep dirs> --s-sweep --name s_star --out docs/figures

is the s-sweep view: held-out AUC and accuracy against a grid of fixed s, one curve per class count C,
the peak s*(C) with a bootstrap interval over seeds, and s*(C) against ln(C - 1) beside the formula
s = ln(C - 1) / cos(theta0) (docs/s_star.md).
"""
from __future__ import annotations

import argparse
import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from facerec.config import swept_keys

SEED_KEYS = frozenset({"seed"})
DEFAULT_METRIC = "val/accuracy_mean"
_LOG_TIME = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]")
_RUN_START = "Seed set to"  # Lightning's seed_everything: the first line of every (re)start of train()


@dataclass
class Run:
    """One training run: its overrides, its logged series and how long it ran."""

    path: Path
    overrides: dict[str, str]
    series: dict[str, tuple[np.ndarray, np.ndarray]]  # metric -> (steps, values), one value per step
    wall_time_s: float

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros(0)
        return self.series.get(metric, (empty, empty))

    def final(self, metric: str, tail: float = 0.0) -> float:
        """The last value, or the mean over the last `tail` fraction of the points (noisy per-batch metrics)."""
        _, values = self.curve(metric)
        if len(values) == 0:
            return math.nan
        return float(values[-max(1, round(tail * len(values))) :].mean())


@dataclass
class GroupSummary:
    """Mean and std over the seeds of one setting; NaN where a run did not log the metric."""

    label: str
    runs: int
    values: dict[str, tuple[float, float]]  # column -> (mean, std over runs)
    tar_metric: str | None  # the logged series behind the "tar" column, e.g. val/lfw/tar@far=1e-03


def read_metrics(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Lightning's metrics.csv as metric -> (steps, values). A resumed run appends rows for steps it
    had already logged; the last row for a step wins, as the run's state continued from there."""
    table: dict[str, dict[int, float]] = {}
    with open(path, newline="") as file:
        for line, row in enumerate(csv.DictReader(file), start=2):
            if not row.get("step"):
                raise ValueError(f"{path}, line {line}: no step value (expected Lightning's metrics.csv)")
            step = int(float(row["step"]))
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in (None, ""):
                    table.setdefault(key, {})[step] = float(value)
    return {
        key: (np.array(sorted(points), dtype=np.int64), np.array([points[s] for s in sorted(points)]))
        for key, points in table.items()
    }


def wall_time(log_file: Path) -> float:
    """Seconds the run spent running, from its train.log timestamps: the sum over its starts (a
    resumed run appends to the same log), each from its first to its last line."""
    if not log_file.is_file():
        return math.nan
    total, first, last = 0.0, None, None
    for line in log_file.read_text(errors="replace").splitlines():
        match = _LOG_TIME.match(line)
        if not match:
            continue
        stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
        if _RUN_START in line and first is not None:
            total += (last - first).total_seconds()
            first = None
        first = first or stamp
        last = stamp
    return total + ((last - first).total_seconds() if first else math.nan)


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no csv/metrics.csv. facerec.tools.compare reads CSV logs: train with logger=wandb_csv "
            "(W&B offline and CSV) or logger=csv."
        )
    overrides = OmegaConf.load(run_dir / ".hydra" / "overrides.yaml")
    pairs = [item.split("=", 1) for item in overrides if "=" in item]
    return Run(run_dir, {key.lstrip("+~"): value for key, value in pairs}, read_metrics(metrics), wall_time(run_dir / "train.log"))


def run_dirs(sweep_dir: Path) -> list[Path]:
    """The run directories of a multirun (numbered subdirectories holding .hydra/), or the dir itself."""
    sweep_dir = Path(sweep_dir)
    if (sweep_dir / ".hydra" / "overrides.yaml").is_file():
        return [sweep_dir]
    runs = [path.parent.parent for path in sweep_dir.glob("*/.hydra/overrides.yaml")]
    if not runs:
        raise FileNotFoundError(f"{sweep_dir}: no runs (expected <n>/.hydra/overrides.yaml, as Hydra's -m writes)")
    return sorted(runs, key=lambda path: (not path.name.isdigit(), int(path.name) if path.name.isdigit() else 0, path.name))


def sweep_keys(sweep_dir: Path) -> set[str]:
    """The keys a multirun varied, from its multirun.yaml (command-line sweeps and sweeper params)."""
    multirun = Path(sweep_dir) / "multirun.yaml"
    if not multirun.is_file():
        return set()
    hydra = OmegaConf.load(multirun).hydra
    return {key.lstrip("+~") for key in swept_keys(list(hydra.overrides.task), hydra.sweeper.get("params"))}  # as load_run reads them


def load_runs(sweep_dirs: Sequence[Path]) -> tuple[list[Run], list[str]]:
    """The runs of one or more multiruns and the keys to group them by: every swept key but the seed,
    plus any override whose value differs between the runs (when several sweeps are combined)."""
    runs = [load_run(path) for sweep_dir in sweep_dirs for path in run_dirs(sweep_dir)]
    keys = set().union(*(sweep_keys(sweep_dir) for sweep_dir in sweep_dirs))
    all_keys = {key for run in runs for key in run.overrides}
    keys |= {key for key in all_keys if len({run.overrides.get(key) for run in runs}) > 1}
    ordered = [key for key in dict.fromkeys(k for run in runs for k in run.overrides) if key in keys]
    return runs, [key for key in ordered if key not in SEED_KEYS]


def group_runs(runs: Sequence[Run], keys: Sequence[str]) -> dict[str, list[Run]]:
    """Runs by setting ("scale=auto" or "head.m=0.3,scale=auto"), in the order they first appear. A key
    a run did not override is left out of its label (the run used the config's value)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        label = ",".join(f"{key}={run.overrides[key]}" for key in keys if key in run.overrides) or "all runs"
        groups.setdefault(label, []).append(run)
    return groups


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


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = np.array([v for v in values if not math.isnan(v)])
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


# Train-side values are per-batch and noisy: "at the end" means the mean over the last 5% of steps.
TRAIN_TAIL = 0.05


def median_grad_norm(run: Run) -> float:
    """The backbone's gradient norm, median over the run's steps: s multiplies the gradient like a
    learning-rate factor, so every comparison across s shows it."""
    values = run.curve("train/grad_norm_backbone")[1]
    return float(np.median(values)) if len(values) else math.nan


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
        GroupSummary(label, len(group), {name: _mean_std([get(run) for run in group]) for name, get in columns.items()}, tar)
        for label, group in groups.items()
    ]


def _format(mean: float, std: float, scale: float = 1.0, digits: int = 1, spec: str = "f") -> str:
    if math.isnan(mean):
        return "–"
    text = f"{mean * scale:.{digits}{spec}}"
    return text if math.isnan(std) else f"{text} ± {std * scale:.{digits}{spec}}"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(summaries: Sequence[GroupSummary], metric: str = DEFAULT_METRIC) -> str:
    """One row per setting: mean ± std over its runs (± only where there are several)."""
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
            f"`{summary.label}`", str(summary.runs), _format(*v["steps"], digits=0), _format(*v["nonfinite"], digits=0),
            _format(*v["s"], digits=2), _format(*v["final"], 100),
            _format(*v["best"], 100), _format(*v["tar"], 100), _format(*v["theta_med"]), _format(*v["p_target"], spec="e"),
            _format(*v["top1"], 100), _format(*v["loss"], digits=2), _format(*v["grad_norm"], digits=2),
            _format(*v["steps_to_95"], digits=0), _format(*v["wall_time_s"], 1 / 60),
        ])  # fmt: skip
    return _markdown(header, rows)


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
    sweep_dirs: Sequence[Path], out_dir: Path, metric: str = DEFAULT_METRIC, far: float | None = 1e-3, name: str = "comparison"
) -> tuple[Path, Path, str]:
    """Write `<out_dir>/<name>.png` and `<name>.md` for the runs of `sweep_dirs`; returns both paths and the table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, keys = load_runs(sweep_dirs)
    groups = group_runs(runs, keys)
    table = markdown_table(summarize(groups, metric, far), metric)
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
        f"{TRAIN_TAIL:.0%} of steps; wall time from each run's train.log.\n\n{table}\n"
    )
    return figure_path, table_path, table


# ------------------------------------------------------------------ the s-sweep view (experiment=s_star)
# One curve per dataset, head and class count C: held-out AUC and accuracy against a grid of fixed s,
# the peak s*(C) fitted around the best grid point, and s*(C) against ln(C - 1) beside the formula's
# line s = ln(C - 1) / cos(theta0). Raw losses are not used: they are not comparable across s.

def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facerec.tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun directories (or single run dirs)")
    parser.add_argument("--out", type=Path, help="where to write the figures and the table (default: the first dir)")
    parser.add_argument("--metric", default=DEFAULT_METRIC, help=f"the compared validation metric (default {DEFAULT_METRIC})")
    parser.add_argument("--far", type=float, default=1e-3, help="TAR at this FAR (else the smallest FAR logged)")
    parser.add_argument("--name", help="file name stem of the figures and table (default: comparison, or s_sweep)")
    parser.add_argument(
        "--s-sweep", action="store_true",
        help="the s-sweep view (experiment=s_star): held-out AUC and accuracy against s per C, s*(C) against ln(C - 1)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or args.sweep_dirs[0]
    try:
        if args.s_sweep:
            from facerec.tools.s_sweep import s_sweep

            paths, table = s_sweep(args.sweep_dirs, out, args.name or "s_sweep")
        else:
            figure_path, table_path, table = compare(args.sweep_dirs, out, args.metric, args.far, args.name or "comparison")
            paths = [figure_path, table_path]
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"facerec.tools.compare: {error}") from None
    print(table)
    print(f"\nwrote {', '.join(map(str, paths[:-1]))} and {paths[-1]}")


if __name__ == "__main__":
    main()

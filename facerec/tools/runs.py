"""Finished (or running) training runs as facerec.tools reads them: each run's overrides (.hydra/),
its logged series (csv/metrics.csv, written by `logger=csv` or `logger=wandb_csv`) and its wall time
(train.log); the runs of one or more Hydra multiruns, grouped by the keys their sweeps varied."""
from __future__ import annotations

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
# Train-side values are per-batch and noisy: "at the end" means the mean over the last 5% of steps.
TRAIN_TAIL = 0.05
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


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) of the values that are not NaN; NaN where there are none (std: fewer than two)."""
    values = np.array([v for v in values if not math.isnan(v)])
    if len(values) == 0:
        return math.nan, math.nan
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else math.nan


def median_grad_norm(run: Run) -> float:
    """The backbone's gradient norm, median over the run's steps: s multiplies the gradient like a
    learning-rate factor, so every comparison across s shows it."""
    values = run.curve("train/grad_norm_backbone")[1]
    return float(np.median(values)) if len(values) else math.nan

"""The s-sweep view (experiment=s_star): does the held-out-optimal s move with ln(C - 1)?

    python -m facerec.tools.s_sweep <multirun dirs> --name s_star --out docs/research/figures

For each class count C and head, held-out AUC and accuracy (mean +- std over seeds) against a
fixed-s grid; s*(C) fitted as a quadratic in ln s around the best grid point, with a bootstrap
interval over seeds; which grid points are resolved from the best one, by a paired bootstrap over
seeds and the held-out pairs' identities (where the runs saved their val_scores.npz); then s*(C)
against ln(C - 1) with the formula's line (theta0 = 45 deg, slope 1/cos theta0 = 1.414) and the
inflection criterion, and the fitted slope, intercept and the theta0 they imply. Raw losses are
never compared across s. Runs are read by facerec.tools.runs (csv/metrics.csv and .hydra/ of every
run).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import re
import textwrap
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from facerec.evaluation import Bootstrap
from facerec.evaluation.bootstrap import Difference
from facerec.heads.scale import auto_scale
from facerec.tools.compare import paired_differences
from facerec.tools.markdown import format_mean_std, markdown
from facerec.tools.runs import DEFAULT_METRIC, SEED_KEYS, TRAIN_TAIL, Run, load_runs, mean_std, median_grad_norm


GRID_POLICIES = frozenset({"relative", "fixed", "fixed64"})  # scale= choices whose s never moves: the grid
S_KEYS = frozenset({"scale", "scale.factor", "scale.value"})  # what varies along a curve
CURVE_KEYS = frozenset({"dataset", "head", "dataset.num_classes"})  # in every curve's name already
NOT_SETTINGS = frozenset({"experiment", "torch.num_threads", "callbacks.progress_bar.refresh_rate", "paths.data_dir"})
# A schedule set on the command line names a curve by its epochs (images seen / training images), so
# runs whose steps grow with C (the same number of epochs at every C) form one family of curves
SCHEDULE_KEYS = frozenset({"trainer.max_steps", "trainer.val_check_interval"})
THETA0 = math.pi / 4  # the formula's line: s = ln(C - 1) / cos 45 deg
PLATEAU_WINDOW = 0.3  # plateau: over the last 30 % of the steps (the held-out curve issue 30 asks for) ...
PLATEAU_RISE = 0.01  # ... held-out AUC and accuracy (means over seeds) rose by less than 1 pp
FIT_HALF_WIDTH = 2  # s* is fitted to the best grid point and up to 2 neighbours on each side
# The grid points within 1 pp of the best mean are not told apart from it: 1 pp is about the spread
# between two seeds here, and the standard error of AUC on LFW DevTest's 999 pairs (~0.9 pp).
NEAR_BEST = 0.01
BOOTSTRAP_SAMPLES = 2000
PAIRED_METRIC = "auc"  # the grid points' paired comparison with the best one (s*'s headline metric)
SWEEP_METRICS = {"auc": "held-out AUC", "accuracy": "held-out accuracy"}
TAR_FAR = "1e-02"  # the TAR column: LFW DevTest's 499 different pairs cannot measure FAR = 1e-3


@dataclass
class SweepRun:
    """One run of an s-sweep: its curve, its s and its held-out and plateau values."""

    run: Run
    dataset: str  # the dataset= choice
    head: str  # the head= choice
    policy: str  # the scale= choice
    num_classes: int
    seed: str
    extras: str  # other settings that differ between the runs ("optim.optimizer.lr=0.05"), or ""
    s: float  # the logged s at the end (constant on the grid)
    train_images: int | None
    values: dict[str, float]  # auc, accuracy, tar, top1, theta_med, p_target at the end; grad_norm; rises

    @property
    def family(self) -> str:
        """The curves whose s*(C) one line is fitted to: dataset and head (and extras)."""
        return ", ".join(part for part in (self.dataset, self.head, self.extras) if part)

    @property
    def curve(self) -> str:
        return ", ".join(part for part in (self.dataset, f"C={self.num_classes:,}", self.head, self.extras) if part)


def _rise_over_tail(steps: np.ndarray, values: np.ndarray, window: float) -> float:
    """The last value minus the last one logged at or before (1 - window) of the run's steps."""
    if len(values) < 2:
        return math.nan
    earlier = values[steps <= (1 - window) * steps[-1] + 1]
    return float(values[-1] - earlier[-1]) if len(earlier) else math.nan


def _train_rise(values: np.ndarray, window: float, tail: float = TRAIN_TAIL) -> float:
    """Per-batch values: the mean over the last `tail` of the steps minus that over the `tail` ending at 1 - window."""
    count, cut = len(values), round((1 - window) * len(values))
    width = max(1, round(tail * count))
    if cut < width:
        return math.nan
    return float(values[-width:].mean() - values[cut - width : cut].mean())


def _final_over_sets(run: Run, metric: str, val_set: str | None = None) -> tuple[float, float]:
    """Mean over the validation sets (or of `val_set` alone) of a metric's final value (auc,
    tar@far=1e-02), and of its rise over the plateau window."""
    pattern = rf"val/{re.escape(val_set) if val_set else '[^/]+'}/{re.escape(metric)}"
    keys = sorted(key for key in run.series if re.fullmatch(pattern, key))
    if not keys:
        return math.nan, math.nan
    ends = [run.final(key) for key in keys]
    rises = [_rise_over_tail(*run.curve(key), PLATEAU_WINDOW) for key in keys]
    return float(np.mean(ends)), float(np.mean(rises))


def _epochs(run: Run, config, train_images: int | None) -> str:
    """"19.2 epochs" for a run whose trainer.max_steps was set on the command line: the training
    images it saw (steps x batch x accumulation, one process) over the training set; "" otherwise."""
    steps = run.overrides.get("trainer.max_steps")
    batch = OmegaConf.select(config, "dataset.batch_size")
    if steps is None or not train_images or not isinstance(batch, int):
        return ""
    accumulate = OmegaConf.select(config, "trainer.accumulate_grad_batches") or 1
    return f"{int(steps) * batch * accumulate / train_images:.1f} epochs"


def sweep_run(run: Run, keys: Sequence[str], val_set: str | None = None) -> SweepRun:
    """Read a run's curve from its saved config (.hydra/config.yaml: C) and Hydra's choices
    (.hydra/hydra.yaml: dataset, head, scale), and its values, the training images among them
    (`data/train_images`, logged by train.py), from its CSV log. The held-out values are means over
    the run's validation sets, or those of `val_set` alone."""
    config_file, hydra_file = run.path / ".hydra" / "config.yaml", run.path / ".hydra" / "hydra.yaml"
    for file in (config_file, hydra_file):
        if not file.is_file():
            raise FileNotFoundError(f"{run.path}: no .hydra/{file.name} (the s-sweep view reads C and the choices from it)")
    config = OmegaConf.load(config_file)
    choices = OmegaConf.load(hydra_file).hydra.runtime.choices
    num_classes = OmegaConf.select(config, "dataset.num_classes")
    if not isinstance(num_classes, int):
        raise ValueError(f"{config_file}: dataset.num_classes must be an integer, got {num_classes!r}")
    logged = run.final("data/train_images")
    per_class = OmegaConf.select(config, "dataset.train.images_per_class")  # runs from before train.py logged it
    train_images = int(logged) if not math.isnan(logged) else (int(per_class) * num_classes if per_class else None)
    accuracy = f"val/{val_set}/accuracy" if val_set else DEFAULT_METRIC
    if val_set and accuracy not in run.series:
        sets = sorted({key.split("/")[1] for key in run.series if key.count("/") == 2 and key.startswith("val/")})
        raise ValueError(f"{run.path}: no {accuracy} in csv/metrics.csv (the sets it validated on: {sets})")
    auc, auc_rise = _final_over_sets(run, "auc", val_set)
    schedule = _epochs(run, config, train_images)  # "" where the config set the steps
    ignored = S_KEYS | CURVE_KEYS | NOT_SETTINGS | SEED_KEYS | (SCHEDULE_KEYS if schedule else frozenset())
    settings = [f"{key}={run.overrides[key]}" for key in keys if key in run.overrides and key not in ignored]
    extras = ",".join(settings + ([schedule] if schedule else []))
    values = {
        "auc": auc,
        "accuracy": run.final(accuracy),
        # near the AUC's ceiling (large C on synthetic faces) the low-FAR end still separates the scales
        "tar": _final_over_sets(run, f"tar@far={TAR_FAR}", val_set)[0],
        "top1": run.final("train/top1", TRAIN_TAIL),
        "theta_med": run.final("train/theta_med", TRAIN_TAIL),
        "p_target": run.final("train/p_target", TRAIN_TAIL),
        "grad_norm": median_grad_norm(run),
        "auc_rise": auc_rise,
        "accuracy_rise": _rise_over_tail(*run.curve(accuracy), PLATEAU_WINDOW),
        "top1_rise": _train_rise(run.curve("train/top1")[1], PLATEAU_WINDOW),
    }
    return SweepRun(
        run, str(choices.dataset), str(choices.head), str(choices.scale), num_classes, run.overrides.get("seed", "config"),
        extras, run.final("train/s", TRAIN_TAIL), train_images, values,
    )  # fmt: skip


@dataclass
class SweepPoint:
    """The runs (seeds) of one s on a curve: a grid point, or a reference policy (auto_margin, dynamic)."""

    label: str  # "s/s_auto = 0.58" or the policy's name
    s: float  # mean over the runs
    runs: list[SweepRun]

    def mean_std(self, key: str) -> tuple[float, float]:
        return mean_std([run.values[key] for run in self.runs])

    @property
    def plateaued(self) -> bool | None:
        """Whether the held-out AUC and accuracy rose by less than PLATEAU_RISE over the plateau window
        (None where no run validated inside and before the window)."""
        rises = [rise for rise in (self.mean_std(key)[0] for key in ("auc_rise", "accuracy_rise")) if not math.isnan(rise)]
        return all(rise < PLATEAU_RISE for rise in rises) if rises else None


def peak_log_s(log_s: np.ndarray, values: np.ndarray, half_width: int = FIT_HALF_WIDTH) -> tuple[float, bool]:
    """ln s*: the vertex of a quadratic in ln s fitted to the best grid point and up to `half_width`
    neighbours on each side, kept within the fitted points (the best point itself where the fit
    has no maximum); and whether the best point lies inside the grid (else s* is not bracketed)."""
    finite = ~np.isnan(values)
    log_s, values = log_s[finite], values[finite]
    best = int(np.argmax(values))
    interior = 0 < best < len(values) - 1
    x, y = log_s[max(0, best - half_width) : best + half_width + 1], values[max(0, best - half_width) : best + half_width + 1]
    if len(x) < 3:
        return float(log_s[best]), interior
    curvature, slope, _ = np.polyfit(x, y, 2)
    if curvature >= 0:
        return float(log_s[best]), interior
    return float(np.clip(-slope / (2 * curvature), x[0], x[-1])), interior


@dataclass
class SweepCurve:
    """One dataset, head and C: the grid points (sorted by s), the reference points and the fitted peaks."""

    name: str
    family: str
    num_classes: int
    train_images: int | None
    grid: list[SweepPoint]
    references: list[SweepPoint]
    peaks: dict[str, tuple[float, float, float, bool]]  # metric -> (s*, low, high of the interval, bracketed)
    bootstrap: dict[str, np.ndarray]  # metric -> (BOOTSTRAP_SAMPLES,) ln s* of the seed resamples
    # grid point label -> its PAIRED_METRIC minus the best point's, paired (None: not computable); {}: not run
    to_best: dict[str, Difference | None] = dataclasses.field(default_factory=dict)

    @property
    def s_auto(self) -> float:
        return auto_scale(self.num_classes, THETA0)

    def near_best(self, metric: str, within: float = NEAR_BEST) -> list[SweepPoint]:
        """The grid points whose mean is within `within` of the best grid point's: where s* could be, read
        without a fit. Where they reach both ends of the grid, the curve is flat and s* is not resolved."""
        means = [point.mean_std(metric)[0] for point in self.grid]
        if not means or all(math.isnan(mean) for mean in means):
            return []
        best = np.nanmax(means)
        return [point for point, mean in zip(self.grid, means) if mean >= best - within]

    def point_at_auto(self) -> SweepPoint | None:
        """The grid point at the auto scale (scale.factor=1), if the grid has it."""
        return next((p for p in self.grid if math.isclose(p.s, self.s_auto, rel_tol=1e-4)), None)

    def best(self, metric: str) -> SweepPoint | None:
        """The grid point with the best mean."""
        return max(self.grid, key=lambda p: p.mean_std(metric)[0], default=None)

    def not_resolved_from_best(self) -> list[SweepPoint]:
        """The best point and those whose paired interval against it holds 0 (to_best): by the paired
        comparison, where s* could be. [] where it was not run."""
        if not self.to_best:
            return []
        best = self.best(PAIRED_METRIC)
        return [p for p in self.grid if p is best or (self.to_best.get(p.label) is not None and not self.to_best[p.label].resolved)]


def paired_to_best(curve: SweepCurve, val_set: str | None, bootstrap: Bootstrap) -> dict[str, Difference | None]:
    """Each grid point's held-out PAIRED_METRIC minus the best point's (means over the seeds), paired as
    facerec.tools.compare pairs settings (paired_differences: seed k against seed k, and the same draws
    of the held-out pairs' identities for both, from each run's last validation, val_scores.npz). A
    point whose interval holds 0 is not resolved from the best. {} where the resamples are 0 or a run
    saved no val_scores.npz; None for a point whose seeds differ from the best's."""
    best = curve.best(PAIRED_METRIC)
    if bootstrap.resamples == 0 or best is None:
        return {}
    groups = {point.label: [run.run for run in point.runs] for point in curve.grid}
    metric = f"val/{val_set}/{PAIRED_METRIC}" if val_set else f"val/{PAIRED_METRIC}_mean"
    return paired_differences(groups, metric, best.label, bootstrap)[1]


def _seed_matrix(grid: Sequence[SweepPoint], key: str) -> np.ndarray:
    """(seeds, grid points) values; NaN where a seed lacks a point. Seeds pair up across the points."""
    seeds = sorted({run.seed for point in grid for run in point.runs})
    matrix = np.full((len(seeds), len(grid)), np.nan)
    for column, point in enumerate(grid):
        for run in point.runs:
            matrix[seeds.index(run.seed), column] = run.values[key]
    return matrix


def fit_curve(name: str, runs: Sequence[SweepRun], rng: np.random.Generator) -> SweepCurve:
    """Group a curve's runs by s, fit s* on each metric and bootstrap it over the seeds (resampled with
    replacement, the same seeds at every grid point). The interval is the 2.5-97.5 % percentile range."""
    by_s: dict[tuple[str, float], list[SweepRun]] = {}
    for run in runs:
        on_grid = run.policy in GRID_POLICIES
        by_s.setdefault(("grid" if on_grid else run.policy, round(run.s, 4) if on_grid else 0.0), []).append(run)
    s_auto = auto_scale(runs[0].num_classes, THETA0)
    grid, references = [], []
    for (kind, _), members in by_s.items():
        s = float(np.mean([run.s for run in members]))
        if kind == "grid":
            grid.append(SweepPoint(f"s/s_auto = {s / s_auto:.3g}", s, members))
        else:
            references.append(SweepPoint(kind, s, members))
    grid.sort(key=lambda point: point.s)
    log_s = np.log([point.s for point in grid])
    peaks, bootstrap = {}, {}
    for metric in SWEEP_METRICS:
        matrix = _seed_matrix(grid, metric)
        if len(grid) < 3 or np.isnan(matrix).all():
            peaks[metric], bootstrap[metric] = (math.nan, math.nan, math.nan, False), np.full(BOOTSTRAP_SAMPLES, np.nan)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample may miss every seed of a point
            peak, bracketed = peak_log_s(log_s, np.nanmean(matrix, axis=0))
            rows = rng.integers(0, len(matrix), size=(BOOTSTRAP_SAMPLES, len(matrix)))
            samples = np.array([peak_log_s(log_s, means)[0] for means in np.nanmean(matrix[rows], axis=1)])
        low, high = np.exp(np.percentile(samples, [2.5, 97.5]))
        peaks[metric], bootstrap[metric] = (math.exp(peak), float(low), float(high), bracketed), samples
    images = {run.train_images for run in runs}
    train_images = images.pop() if len(images) == 1 else None
    return SweepCurve(name, runs[0].family, runs[0].num_classes, train_images, grid, references, peaks, bootstrap)


@dataclass
class LineFit:
    """s*(C) = slope ln(C - 1) + intercept over the bracketed curves of one family, with bootstrap intervals."""

    family: str
    metric: str
    curves: int
    slope: tuple[float, float, float]  # estimate, 2.5 %, 97.5 %
    intercept: tuple[float, float, float]
    held: int = 0  # of the curves, how many are earlier points (tables), held at their s* in every resample

    @property
    def theta0_deg(self) -> float:
        """The theta0 the slope implies, cos theta0 = 1 / slope (NaN for a slope below 1)."""
        return math.degrees(math.acos(1 / self.slope[0])) if self.slope[0] >= 1 else math.nan


def fit_lines(curves: Sequence[SweepCurve], earlier: Sequence[EarlierPoint] = ()) -> list[LineFit]:
    """One least-squares line per family and metric through s* against ln(C - 1), the curves whose best
    grid point is inside the grid only (at least two C); intervals from the curves' bootstrap samples.
    `earlier` points of a family with curves here, at C the curves do not cover, join its line, held at
    their s* in every resample (their runs are gone): the interval leaves out their uncertainty. A family
    of earlier points alone gets its line, without an interval."""
    fits = []
    for family in dict.fromkeys([*(curve.family for curve in curves), *(point.family for point in earlier)]):
        for metric in SWEEP_METRICS:
            members = [c for c in curves if c.family == family and c.peaks[metric][3]]
            covered = {c.num_classes for c in curves if c.family == family}
            held = [p for p in earlier if p.family == family and p.peaks[metric][3] and p.num_classes not in covered]
            if len({c.num_classes for c in members} | {p.num_classes for p in held}) < 2:
                continue
            x = np.log([c.num_classes - 1 for c in [*members, *held]])
            slope, intercept = np.polyfit(x, [c.peaks[metric][0] for c in [*members, *held]], 1)
            samples = np.exp(np.stack([
                *(c.bootstrap[metric] for c in members), *(np.full(BOOTSTRAP_SAMPLES, math.log(p.peaks[metric][0])) for p in held)
            ]))  # (curves, samples); fmt: skip
            sample_slopes, sample_intercepts = np.polyfit(x, samples, 1)
            fits.append(LineFit(
                family, metric, len(members) + len(held),
                (float(slope), *np.percentile(sample_slopes, [2.5, 97.5]).tolist()),
                (float(intercept), *np.percentile(sample_intercepts, [2.5, 97.5]).tolist()), len(held),
            ))  # fmt: skip
    return fits


def formula_lines(curves: Sequence[SweepCurve]) -> list[tuple[str, float, float]]:
    """(name, slope, intercept) of the predictions over the sweep's C: the half criterion (slope
    1 / cos 45 deg, through 0) and the inflection criterion (a line fitted to its s over the same C)."""
    counts = sorted({curve.num_classes for curve in curves})
    lines = [("formula, θ0 = 45° (half)", 1 / math.cos(THETA0), 0.0)]
    if len(counts) >= 2:
        slope, intercept = np.polyfit(np.log(np.array(counts) - 1.0), [auto_scale(c, THETA0, "inflection") for c in counts], 1)
        lines.append(("inflection criterion, θ0 = 45°", float(slope), float(intercept)))
    return lines


def load_sweep(
    sweep_dirs: Sequence[Path], seed: int = 0, val_set: str | None = None, earlier: Sequence[EarlierPoint] = (),
    paired: Bootstrap = Bootstrap(),
) -> tuple[list[SweepCurve], list[LineFit]]:
    """The curves of one or more s-sweeps (multiruns of experiment=s_star) and their s*(C) lines (with
    the `earlier` points, as fit_lines), scored on the mean over each run's validation sets, or on
    `val_set` alone; each grid point compared with its curve's best by `paired` (paired_to_best)."""
    runs, keys = load_runs(sweep_dirs)
    curves: dict[str, list[SweepRun]] = {}
    for run in runs:
        point = sweep_run(run, keys, val_set)
        curves.setdefault(point.curve, []).append(point)
    rng = np.random.default_rng(seed)
    ordered = sorted(curves.items(), key=lambda item: (item[1][0].family, item[1][0].num_classes))
    fitted = [fit_curve(name, members, rng) for name, members in ordered]
    for curve in fitted:
        curve.to_best = paired_to_best(curve, val_set, paired)
    return fitted, fit_lines(fitted, earlier)


@dataclass
class EarlierPoint:
    """An s*(C) point read from an earlier view's table (`--earlier`): its runs need not exist any more."""

    curve: str
    family: str
    num_classes: int
    peaks: dict[str, tuple[float, float, float, bool]]  # as SweepCurve.peaks
    source: str  # the file name of the table it was read from


EARLIER_COLUMNS = {"auc": "s* from AUC [95 %]", "accuracy": "s* from accuracy [95 %]"}
PEAK_CELL = re.compile(r"(?P<s>[0-9.]+) \[(?P<low>[0-9.]+), (?P<high>[0-9.]+)\](?P<edge> \(edge: not bracketed\))?")


def read_earlier(path: Path) -> list[EarlierPoint]:
    """The points of the "### s*(C)" table in `path` (a `<name>.md` this view wrote), so a new view can
    draw earlier sweeps beside its own after their run directories are gone. A curve's family is its
    name without its "C=..." part, as SweepRun.family."""
    lines = Path(path).read_text().splitlines()
    try:
        start = lines.index("### s*(C)")
        header_at = next(i for i in range(start, len(lines)) if lines[i].startswith("| curve |"))
    except (ValueError, StopIteration):
        raise ValueError(f"--earlier {path}: no '### s*(C)' table with a '| curve |' header (a table s_sweep wrote)") from None
    header = [cell.strip() for cell in lines[header_at].strip("|").split("|")]
    missing = [name for name in ("curve", "C", *EARLIER_COLUMNS.values()) if name not in header]
    if missing:
        raise ValueError(f"--earlier {path}: the s*(C) table has no column {missing}")
    points = []
    for line in lines[header_at + 2 :]:
        if not line.startswith("|"):
            break
        cells = dict(zip(header, (cell.strip() for cell in line.strip("|").split("|"))))
        peaks = {}
        for metric, column in EARLIER_COLUMNS.items():
            match = PEAK_CELL.match(cells[column])
            peaks[metric] = (
                (float(match["s"]), float(match["low"]), float(match["high"]), match["edge"] is None) if match else (math.nan,) * 3 + (False,)
            )
        family = re.sub(r", C=\d{1,3}(?:,\d{3})*", "", cells["curve"])  # "C=1,000": the count's own commas
        points.append(EarlierPoint(cells["curve"], family, int(cells["C"].replace(",", "")), peaks, Path(path).name))
    return points


def earlier_points(paths: Sequence[Path], match: str | None = None) -> list[EarlierPoint]:
    """The points of several earlier views, in order, each curve once (the first view that lists it);
    with `match`, only the families it finds (re.search)."""
    if match is not None and not paths:
        raise ValueError(f"--earlier-match {match!r}: no --earlier table to match against")
    points: list[EarlierPoint] = []
    for point in (point for path in paths for point in read_earlier(path)):
        if all(point.curve != kept.curve for kept in points):
            points.append(point)
    if match is None:
        return points
    kept = [point for point in points if re.search(match, point.family)]
    if not kept:
        families = sorted({point.family for point in points})
        raise ValueError(f"--earlier-match {match!r} finds none of the earlier families {families}")
    return kept


def earlier_table(points: Sequence[EarlierPoint]) -> str:
    """Markdown: the earlier points a view draws, with the table each came from."""
    header = ["curve", "C", "s* from AUC [95 %]", "s* from accuracy [95 %]", "from"]
    rows = [[p.curve, f"{p.num_classes:,}", _interval(p.peaks["auc"]), _interval(p.peaks["accuracy"]), p.source] for p in points]
    return "\n\n".join(["### Earlier points drawn (from their views' tables)", markdown(header, rows)])


def _interval(peak: tuple[float, float, float, bool]) -> str:
    s, low, high, bracketed = peak
    if math.isnan(s):
        return "–"
    return f"{s:.2f} [{low:.2f}, {high:.2f}]" + ("" if bracketed else " (edge: not bracketed)")


def _versus_best(curve: SweepCurve, point: SweepPoint) -> str:
    """"best", "-0.8 [-1.4, -0.2] resolved" or "-0.3 [-0.9, +0.2]" (pp): the point's paired difference from the best."""
    if not curve.to_best or point not in curve.grid:
        return "–"
    if point is curve.best(PAIRED_METRIC):
        return "best"
    difference = curve.to_best.get(point.label)
    if difference is None or difference.interval is None:
        return "–"
    low, high = (100 * bound for bound in difference.interval)
    return f"{100 * difference.difference:+.1f} [{low:+.1f}, {high:+.1f}]" + (" resolved" if difference.resolved else "")


def s_sweep_tables(curves: Sequence[SweepCurve], fits: Sequence[LineFit]) -> str:
    """Markdown: s*(C) per curve, the line fits against the formula, and every point with its plateau check."""
    header = ["curve", "C", "train images", "ln(C−1)", "s_auto (half / inflection)", "seeds", "s* from AUC [95 %]",
              "s* / s_auto (AUC)", f"s / s_auto within {NEAR_BEST * 100:.0f} pp of the best AUC",
              "s / s_auto not resolved from the best AUC (paired)", "s* from accuracy [95 %]",
              f"s / s_auto within {NEAR_BEST * 100:.0f} pp of the best accuracy", "AUC at s_auto (%)", "best grid AUC (%) (at s)",
              "accuracy at s_auto (%)", "best grid accuracy (%) (at s)", "lost at s_auto: AUC / accuracy (pp)"]  # fmt: skip
    rows = []
    for curve in curves:
        at_auto = curve.point_at_auto()
        best = {m: curve.best(m) for m in SWEEP_METRICS}
        seeds = len({run.seed for point in curve.grid for run in point.runs})

        def at(point: SweepPoint | None, metric: str, with_s: bool = False) -> str:
            if point is None:
                return "–"
            text = format_mean_std(*point.mean_std(metric), 100)
            return f"{text} ({point.s:.2f})" if with_s else text

        def factor_range(points: Sequence[SweepPoint]) -> str:  # "0.25–1.00 (6 of 11)": the range of factors, and how many points
            if not points:
                return "–"
            factors = dict.fromkeys(f"{point.s / curve.s_auto:.2f}" for point in (points[0], points[-1]))
            return f"{'–'.join(factors)} ({len(points)} of {len(curve.grid)})"

        def near_best(metric: str) -> str:
            return factor_range(curve.near_best(metric))

        def lost(metric: str) -> str:  # the best grid point's mean minus the auto scale's
            if at_auto is None or best[metric] is None:
                return "–"
            return format_mean_std(best[metric].mean_std(metric)[0] - at_auto.mean_std(metric)[0], math.nan, 100)

        rows.append([
            curve.name, f"{curve.num_classes:,}", f"{curve.train_images:,}" if curve.train_images else "–",
            f"{math.log(curve.num_classes - 1):.3f}",
            f"{curve.s_auto:.2f} / {auto_scale(curve.num_classes, THETA0, 'inflection'):.2f}", str(seeds),
            _interval(curve.peaks["auc"]), format_mean_std(curve.peaks["auc"][0] / curve.s_auto, math.nan, digits=2),
            near_best("auc"), factor_range(curve.not_resolved_from_best()), _interval(curve.peaks["accuracy"]), near_best("accuracy"),
            at(at_auto, "auc"), at(best["auc"], "auc", True), at(at_auto, "accuracy"), at(best["accuracy"], "accuracy", True),
            f"{lost('auc')} / {lost('accuracy')}",
        ])  # fmt: skip
    sections = ["### s*(C)", markdown(header, rows)]

    header = ["family", "s* from", "C values fitted", "slope [95 %]", "intercept [95 %]", "θ0 implied (cos θ0 = 1/slope)"]
    rows = [
        [fit.family, SWEEP_METRICS[fit.metric], f"{fit.curves}" + (f" ({fit.held} from an earlier table, held fixed)" if fit.held else ""),
         "{:.3f} [{:.3f}, {:.3f}]".format(*fit.slope) if fit.held < fit.curves else f"{fit.slope[0]:.3f}",
         "{:.2f} [{:.2f}, {:.2f}]".format(*fit.intercept) if fit.held < fit.curves else f"{fit.intercept[0]:.2f}", "–" if math.isnan(fit.theta0_deg) else f"{fit.theta0_deg:.1f}°"]
        for fit in fits
    ]  # fmt: skip
    rows += [
        [name, "prediction", "–", f"{slope:.3f}", f"{intercept:.2f}", f"{math.degrees(math.acos(1 / slope)):.1f}°"]
        for name, slope, intercept in formula_lines(curves)
    ]
    sections += ["### s*(C) against ln(C − 1)", markdown(header, rows)]

    window = f"last {PLATEAU_WINDOW:.0%} (pp)"
    header = ["curve", "point", "s", "runs", "AUC (%)", "AUC − best (pp) [95 %, paired]", "accuracy (%)", f"TAR@FAR={TAR_FAR} (%)",
              "train top-1 end (%)", "θ_med end (°)",
              "P(target) end", "grad norm backbone (median)", f"AUC rise, {window}", f"accuracy rise, {window}",
              f"top-1 rise, {window}", "plateau"]  # fmt: skip
    rows = []
    for curve in curves:
        for point in [*curve.grid, *curve.references]:
            rows.append([
                curve.name, point.label, f"{point.s:.2f}", str(len(point.runs)), format_mean_std(*point.mean_std("auc"), 100),
                _versus_best(curve, point), format_mean_std(*point.mean_std("accuracy"), 100), format_mean_std(*point.mean_std("tar"), 100),
                format_mean_std(*point.mean_std("top1"), 100),
                format_mean_std(*point.mean_std("theta_med")), format_mean_std(*point.mean_std("p_target"), spec="e"),
                format_mean_std(*point.mean_std("grad_norm"), digits=2),
                format_mean_std(*point.mean_std("auc_rise"), 100), format_mean_std(*point.mean_std("accuracy_rise"), 100),
                format_mean_std(*point.mean_std("top1_rise"), 100), {True: "yes", False: "**no**", None: "–"}[point.plateaued],
            ])  # fmt: skip
    checked = [p.plateaued for curve in curves for p in [*curve.grid, *curve.references] if p.plateaued is not None]
    sections += [
        "### Every point, and the plateau check",
        f"Plateau: over the last {PLATEAU_WINDOW:.0%} of the steps the held-out AUC and accuracy (means over seeds) "
        f"rose by less than {PLATEAU_RISE * 100:.0f} pp (the last validation minus the last one at or before "
        f"{1 - PLATEAU_WINDOW:.0%} of the steps); train top-1 is the mean over {TRAIN_TAIL:.0%} of the steps at each "
        f"end of that window. It holds for {sum(checked)} of the {len(checked)} points validated often enough to tell.",
        markdown(header, rows),
    ]
    return "\n\n".join(sections)


def _class_colours(curves: Sequence[SweepCurve]) -> dict[int, tuple]:
    import matplotlib.pyplot as plt

    counts = sorted({curve.num_classes for curve in curves})
    return {c: plt.cm.viridis(0.9 * i / max(1, len(counts) - 1)) for i, c in enumerate(counts)}


REFERENCE_MARKERS = {"auto": "D", "auto_margin": "s", "dynamic": "^"}


def plot_s_curves(curves: Sequence[SweepCurve], title: str | None = None):
    """Held-out AUC and accuracy (mean ± std over seeds) against s, one panel per family and metric,
    one line per C; dotted lines mark s_auto(C), stars the fitted s*, open markers the reference policies."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    families = list(dict.fromkeys(curve.family for curve in curves))
    colours = _class_colours(curves)
    figure, axes = plt.subplots(2, len(families), figsize=(5 * len(families) + 1, 8.5), squeeze=False)
    for column, family in enumerate(families):
        for row, metric in enumerate(SWEEP_METRICS):
            ax = axes[row, column]
            for curve in (c for c in curves if c.family == family):
                colour = colours[curve.num_classes]
                ax.axvline(curve.s_auto, color=colour, linestyle=":", linewidth=1)
                s = [point.s for point in curve.grid]
                mean, std = np.array([point.mean_std(metric) for point in curve.grid]).reshape(-1, 2).T * 100
                ax.errorbar(s, mean, yerr=np.nan_to_num(std), fmt="o-", color=colour, markersize=3, capsize=2)
                peak = curve.peaks[metric][0]
                if not math.isnan(peak):
                    at_peak = np.interp(math.log(peak), np.log(s), mean)
                    ax.plot(peak, at_peak, "*", color=colour, markersize=12, markeredgecolor="k")
                for point in curve.references:
                    ref_mean, ref_std = (value * 100 for value in point.mean_std(metric))
                    ax.errorbar(point.s, ref_mean, yerr=np.nan_to_num(ref_std), fmt=REFERENCE_MARKERS.get(point.label, "x"),
                                color=colour, markerfacecolor="none", markersize=8, capsize=2, zorder=3)  # fmt: skip
            ax.set(xscale="log", xlabel="scale s", ylabel=f"{SWEEP_METRICS[metric]} (%)")
            low, high = ax.get_xlim()
            if high < 2 * low:  # a curve of one or two nearby points: show a span of s around them
                centre = math.sqrt(low * high)
                ax.set_xlim(centre / 1.5, centre * 1.5)
            ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 5, 10, 20, 30, 50, 100, 200]))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_title(family, fontsize="medium")
            ax.grid(alpha=0.3, which="both")
    # one legend for all panels (a C has one colour everywhere), below them: never over a point
    handles = [plt.Line2D([], [], marker="o", color=colour, label=f"C = {c:,}") for c, colour in colours.items()]
    handles += [plt.Line2D([], [], linestyle=":", color="grey", label="s_auto(C)"),
                plt.Line2D([], [], marker="*", linestyle="", color="grey", markeredgecolor="k", markersize=12, label="fitted s*")]
    handles += [plt.Line2D([], [], marker=marker, linestyle="", color="grey", markerfacecolor="none", label=name)
                for name, marker in REFERENCE_MARKERS.items()]  # fmt: skip
    figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8), frameon=False)
    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, 0.05, 1, 0.97 if title else 1))
    return figure


def plot_s_star(curves: Sequence[SweepCurve], fits: Sequence[LineFit], title: str | None = None, earlier: Sequence[EarlierPoint] = ()):
    """s*(C) against ln(C - 1) with bootstrap intervals, per family, beside the formula's predictions (the
    half criterion's line and the inflection criterion's curve) and the s the auto_margin runs used; one
    panel per metric (s* fitted on AUC, on accuracy). Hollow markers: best grid point at the grid's edge.
    Shaded bars: the s of the grid points within NEAR_BEST of the best one, which the sweep cannot tell apart.
    Diamonds: `earlier` points (read_earlier), in their family's colour, with their intervals."""
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys([*(curve.family for curve in curves), *(point.family for point in earlier)]))
    x_max = 1.05 * max(math.log(c.num_classes - 1) for c in [*curves, *earlier])
    x_line = np.linspace(0, x_max, 50)
    # over the sweep's C only: at small C (ln(C - 1) below ~1) P(theta) has no inflection at 45 deg
    x_inflection = np.linspace(min(math.log(curve.num_classes - 1) for curve in curves), x_max, 50)
    s_inflection = [auto_scale(math.exp(x) + 1, THETA0, "inflection") for x in x_inflection]
    # one panel per row, each legend to its right: many families make labels too long to sit side by side
    figure, axes = plt.subplots(len(SWEEP_METRICS), 1, figsize=(9, 6 * len(SWEEP_METRICS)), squeeze=False)
    for ax, metric in zip(axes[:, 0], SWEEP_METRICS):
        ax.plot(x_line, x_line / math.cos(THETA0), "-", color="k", label="formula ln(C − 1) / cos 45° (half criterion)")
        ax.plot(x_inflection, s_inflection, ":", color="k", label="inflection criterion, θ0 = 45°")
        ax.plot([], [], "-", color="grey", linewidth=7, alpha=0.2, label=f"grid points within {NEAR_BEST * 100:.0f} pp of the best")
        for index, family in enumerate(families):
            colour = f"C{index}"
            members = [c for c in curves if c.family == family]
            for curve in members:
                s, low, high, bracketed = curve.peaks[metric]
                if not math.isnan(s):
                    # families side by side where they share a C (synthetic and LFW at C = 1,000)
                    x = math.log(curve.num_classes - 1) + 0.08 * (index - (len(families) - 1) / 2)
                    near = curve.near_best(metric)
                    ax.vlines(x, near[0].s, near[-1].s, color=colour, linewidth=7, alpha=0.2)
                    # the bootstrap interval need not contain the peak of the mean curve (2 seeds): a bar, then the point
                    ax.vlines(x, low, high, color=colour, linewidth=1)
                    ax.plot(x, s, "o", color=colour, markerfacecolor=colour if bracketed else "none")
            shown = [(point, point.peaks[metric]) for point in earlier if point.family == family]
            for point, (s, low, high, bracketed) in shown:
                if not math.isnan(s):
                    x = math.log(point.num_classes - 1) + 0.08 * (index - (len(families) - 1) / 2) + 0.04
                    ax.vlines(x, low, high, color=colour, linewidth=1, alpha=0.6)
                    ax.plot(x, s, "D", color=colour, markerfacecolor=colour if bracketed else "none", alpha=0.6)
            fit = next((f for f in fits if f.family == family and f.metric == metric), None)
            if shown:
                sources = ", ".join(dict.fromkeys(point.source for point, _ in shown))
                line = f", fit slope {fit.slope[0]:.3f}, intercept {fit.intercept[0]:.2f}" if fit is not None and not members else ""
                ax.plot([], [], "D--" if line else "D", color=colour, alpha=0.6, label=f"{family}: s*, earlier runs (table: {sources}){line}")
            margin = [(math.log(c.num_classes - 1), p.s) for c in members for p in c.references if p.label == "auto_margin"]
            if margin:
                ax.plot(*zip(*sorted(margin)), "s-.", color=colour, markerfacecolor="none", linewidth=1,
                        label=f"{family}: auto_margin's s")  # fmt: skip
            label = f"{family}: s*"
            if fit is not None:
                label += f", fit slope {fit.slope[0]:.3f}, intercept {fit.intercept[0]:.2f}"
                ax.plot(x_line, fit.slope[0] * x_line + fit.intercept[0], "--", color=colour)
            if members:
                ax.plot([], [], "o--", color=colour, label=label)
        ax.set(xlabel="ln(C − 1)", ylabel="s*", title=f"s* fitted on {SWEEP_METRICS[metric]}")
        ax.set_xlim(0, x_max)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the panel: never over a point
    if title:
        figure.suptitle(title)
    # the legends sit out of the layout while it is made (a long legend would squeeze its panel to a sliver), and back
    # in it after, so that saving with bbox_inches="tight" widens the canvas to hold them
    legends = [ax.get_legend() for ax in axes[:, 0]]
    for legend in legends:
        legend.set_in_layout(False)
    figure.tight_layout()
    for legend in legends:
        legend.set_in_layout(True)
    return figure


def s_sweep(
    sweep_dirs: Sequence[Path], out_dir: Path, name: str = "s_sweep", earlier: Sequence[Path] = (), earlier_match: str | None = None,
    val_set: str | None = None, paired: Bootstrap = Bootstrap(),
) -> tuple[list[Path], str]:
    """Write `<name>_curves.png`, `<name>_fit.png` and `<name>.md` for s-sweeps; returns the paths and the
    tables. `earlier`: earlier views' `<name>.md` files, whose s*(C) points (those of the families
    `earlier_match` finds, where given) the fit figure draws and the tables list as well. `val_set`:
    score on that validation set alone (default: the mean over each run's sets). `paired`: the paired
    comparison of each grid point with its curve's best (paired_to_best; resamples 0: none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = earlier_points(earlier, earlier_match)
    curves, fits = load_sweep(sweep_dirs, val_set=val_set, earlier=drawn, paired=paired)
    tables = s_sweep_tables(curves, fits) + ("\n\n" + earlier_table(drawn) if drawn else "")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # wrapped: a sweep run in parts has many dirs, and one long line would set the figure's width
    title = textwrap.fill(", ".join(dict.fromkeys(Path(d).name for d in sweep_dirs)), 120)
    paths = [out_dir / f"{name}_curves.png", out_dir / f"{name}_fit.png", out_dir / f"{name}.md"]
    for figure, path in ((plot_s_curves(curves, title), paths[0]), (plot_s_star(curves, fits, title, drawn), paths[1])):
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
    sources = ", ".join(f"`{d}`" for d in sweep_dirs)
    paths[2].write_text(
        f"Runs: {sources}. Mean ± std over seeds; AUC and accuracy at the end of each run on the held-out pairs"
        + (f" of `{val_set}`. " if val_set else " (the mean over its validation sets). ")
        + f"s* is the vertex of a quadratic in ln s through the best grid point and up to {FIT_HALF_WIDTH} neighbours "
        f"on each side; the interval is the 2.5–97.5 % range over {BOOTSTRAP_SAMPLES} resamples of the seeds. "
        + (f"A grid point is resolved from its curve's best where the {paired.level:.0%} interval of its paired AUC difference "
           f"excludes 0 ({paired.resamples} two-level resamples: seed pairs, and the held-out pairs' identities drawn alike for both; "
           "each run's last validation, val_scores.npz). " if any(curve.to_best for curve in curves) else "")
        + "Lines are fitted to the bracketed s* only; an earlier point of a family drawn here joins its line, held fixed."
        + (f" The fit figure also draws, as diamonds, the s*(C) points of the earlier views {', '.join(f'`{p}`' for p in earlier)}"
           + (f" (the families matching `{earlier_match}`)" if earlier_match else "") + "; they are listed last." if drawn else "")
        + "\n\n" + tables + "\n"
    )
    return paths, tables


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facerec.tools.s_sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="+", type=Path, help="multirun directories of experiment=s_star (or single run dirs)")
    parser.add_argument("--out", type=Path, help="where to write the figures and the tables (default: the first dir)")
    parser.add_argument("--name", default="s_sweep", help="file name stem of the figures and tables (default: s_sweep)")
    parser.add_argument("--earlier", type=Path, action="append", default=[],
                        help="an earlier view's <name>.md: its s*(C) points are drawn beside the new ones (repeatable)")
    parser.add_argument("--earlier-match", help="draw only the earlier families this regular expression finds (re.search)")
    parser.add_argument("--val-set", help="score on this validation set alone (default: the mean over each run's val_sets)")
    parser.add_argument("--paired-resamples", type=int, default=Bootstrap().resamples,
                        help="replicates of the paired comparison of each grid point with its curve's best (0: none)")
    args = parser.parse_args(argv)
    try:
        paths, tables = s_sweep(args.sweep_dirs, args.out or args.sweep_dirs[0], args.name, args.earlier, args.earlier_match,
                                args.val_set, Bootstrap(resamples=args.paired_resamples))
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"facerec.tools.s_sweep: {error}") from None
    print(tables)
    print(f"\nwrote {', '.join(map(str, paths[:-1]))} and {paths[-1]}")


if __name__ == "__main__":
    main()

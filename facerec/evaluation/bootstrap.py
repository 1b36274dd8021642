"""Intervals, paired comparisons and per-group results for every protocol, by resampling units.

Built on facerec.evaluation.scored: each result's `ScoredItems` recompute its metrics under item
weights, and a bootstrap replicate's weights come from the multiplicities of the units the items
share (identities, templates; see scored.py for which and why). So one function serves pair sets,
IJB templates and 1:N alike:

- `intervals`: percentile intervals (2.5-97.5 % at level 0.95) over `resamples` replicates drawn
  with `seed`. Accuracy's interval includes the choice of each fold's threshold, made again in
  every replicate.
- `paired_comparison`: two models scored on the same set, resampled with the same unit draws, so
  the interval of the difference B - A has the set's sampling variation common to both removed; the
  two-sided p-value is the bootstrap test that the interval inverts: 2 x the smaller share of
  replicate differences at or beyond 0, (count + 1) / (resamples + 1) so it is never 0.
- `mcnemar`: McNemar's exact test on the pairs each model decides right and the other wrong, at each
  model's held-out 10-fold thresholds. It treats pairs as independent (LFW's share people), so it is
  reported beside the paired bootstrap, not instead of it.
- `paired_runs`: two settings of a sweep, several seeds each, paired by seed and by unit draws.
- `group_membership`: the metrics of the items whose units all belong to one group (RFW-style
  demographic groups: pairs within a group), each group scored as if alone, and the spread.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from facerec.evaluation.scored import ScoredItems

NO_INTERVAL = ("accuracy_std", "threshold")  # a fold spread and a decision threshold, not estimates of a rate
# Metrics where lower is better; every other reported metric is a rate where higher is better.
LOWER_IS_BETTER = ("eer",)


@dataclass(frozen=True)
class Bootstrap:
    """resamples: replicates (0: no intervals); level: the interval's coverage; seed: of the unit draws."""

    resamples: int = 1000
    level: float = 0.95
    seed: int = 0

    def __post_init__(self):
        if self.resamples < 0 or (0 < self.resamples < 20):
            raise ValueError(f"bootstrap.resamples must be 0 (off) or >= 20, got {self.resamples}")
        if not 0.5 <= self.level < 1:
            raise ValueError(f"bootstrap.level must lie in [0.5, 1), got {self.level}")

    def multiplicities(self, active: np.ndarray, num_units: int):
        """`resamples` arrays of (num_units,) unit multiplicities, seeded: len(active) draws with
        replacement from the `active` units (the others 0)."""
        rng = np.random.default_rng(self.seed)
        for _ in range(self.resamples):
            yield draw_multiplicities(rng, active, num_units)


def draw_multiplicities(rng: np.random.Generator, active: np.ndarray, num_units: int) -> np.ndarray:
    multiplicity = np.zeros(num_units, dtype=np.int64)
    np.add.at(multiplicity, active[rng.integers(0, len(active), size=len(active))], 1)
    return multiplicity


def replicate_metrics(items: ScoredItems, bootstrap: Bootstrap, base: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """{metric: (resamples,) values} over the bootstrap replicates (NaN where a replicate leaves a
    metric undefined); `base` multiplies every replicate's weights (a group's 0/1 membership), and the
    replicates draw from the units of its items only, so a group's sample keeps its own size."""
    values: dict[str, list] = {}
    for r, multiplicity in enumerate(bootstrap.multiplicities(items.active_units(base), items.num_units)):
        weights = items.unit_weights(multiplicity)
        if base is not None:
            weights = weights * base
        for key, value in replicate(items, weights).items():
            values.setdefault(key, [np.nan] * bootstrap.resamples)[r] = np.nan if value is None else value
    return {key: np.asarray(v, dtype=np.float64) for key, v in values.items() if key not in NO_INTERVAL}


def replicate(items: ScoredItems, weights: np.ndarray) -> dict[str, float | None]:
    """A replicate's metrics; one that draws no item of a class has none (`metrics` returns {} or NaN)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return items.metrics(weights)


def two_sided_p(replicates: np.ndarray) -> float:
    """The bootstrap test of "no difference" that the percentile interval inverts: twice the smaller
    share of replicate differences at or beyond 0, (count + 1) / (replicates + 1) so it is never 0."""
    defined = replicates[np.isfinite(replicates)]
    return float(min(1.0, 2 * (min(np.sum(defined <= 0), np.sum(defined >= 0)) + 1) / (len(defined) + 1)))


def percentile_interval(samples: np.ndarray, level: float) -> tuple[float, float] | None:
    """The central `level` percentile range of the defined samples; None where fewer than half are defined."""
    defined = samples[np.isfinite(samples)]
    if len(defined) < max(len(samples) / 2, 1):
        return None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(defined, [tail, 100 - tail])
    return float(low), float(high)


def intervals(items: ScoredItems, bootstrap: Bootstrap, base: np.ndarray | None = None) -> dict[str, tuple[float, float]]:
    """{metric: (low, high)} for every metric of `items.metrics()` that has one."""
    if bootstrap.resamples == 0:
        return {}
    found = {key: percentile_interval(samples, bootstrap.level) for key, samples in replicate_metrics(items, bootstrap, base).items()}
    return {key: interval for key, interval in found.items() if interval is not None}


@dataclass(frozen=True)
class Difference:
    """B - A for one metric: the point difference, its paired interval and two-sided p-value."""

    a: float
    b: float
    difference: float
    interval: tuple[float, float] | None
    p_value: float | None

    @property
    def resolved(self) -> bool:
        """The interval excludes 0 (equivalently p < 1 - level)."""
        return self.interval is not None and (self.interval[0] > 0 or self.interval[1] < 0)


def check_comparable(a: ScoredItems, b: ScoredItems, what: str) -> None:
    if a.kind != b.kind or a.fingerprint() != b.fingerprint():
        raise ValueError(
            f"{what}: the two evaluations scored different items ({a.kind}, {a.num_items} items, units "
            f"{a.unit_kind}: {a.fingerprint()} vs {b.kind}, {b.num_items}, {b.unit_kind}: {b.fingerprint()}); "
            "a paired comparison needs the same set, with the same pairs, folds and units"
        )


def paired_comparison(a: ScoredItems, b: ScoredItems, bootstrap: Bootstrap, what: str = "set") -> dict[str, Difference]:
    """{metric: Difference} of model B against model A on the same items (see the module docstring)."""
    check_comparable(a, b, what)
    point_a, point_b = a.metrics(), b.metrics()
    samples_a, samples_b = replicate_metrics(a, bootstrap), replicate_metrics(b, bootstrap)
    found = {}
    for key in point_a:
        if key in NO_INTERVAL or point_a[key] is None or point_b.get(key) is None:
            continue
        difference = point_b[key] - point_a[key]
        interval, p_value = None, None
        if key in samples_a and key in samples_b:
            replicates = samples_b[key] - samples_a[key]
            interval = percentile_interval(replicates, bootstrap.level)
            if interval is not None:
                p_value = two_sided_p(replicates)
        found[key] = Difference(point_a[key], point_b[key], difference, interval, p_value)
    return found


def mcnemar(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, float | int]:
    """McNemar's exact test of two models' right/wrong decisions on the same items: b = A right and B
    wrong, c = A wrong and B right, two-sided binomial p-value of min(b, c) in b + c at 1/2."""
    from scipy.stats import binomtest

    a_only = int(np.sum(correct_a & ~correct_b))
    b_only = int(np.sum(~correct_a & correct_b))
    p_value = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only, 0.5).pvalue)
    return {"a_right_b_wrong": a_only, "a_wrong_b_right": b_only, "p_value": p_value}


def group_membership(items: ScoredItems, groups: Mapping[str, str], what: str = "set", source: str = "the groups") -> tuple[dict[str, np.ndarray], list[str]]:
    """({group: (N,) bool}, notes): an item belongs to a group when every unit of it is an identity of
    that group (a pair of two people of different groups belongs to none)."""
    if items.unit_kind != "identity":
        raise ValueError(
            f"{what}: per-group results ({source}) need items whose units are identities; this set's units are "
            f"{items.unit_kind}s (it names no identity per image)"
        )
    names = sorted(set(groups.values()))
    code_of = {name: code for code, name in enumerate(names)}
    unit_group = np.array([code_of.get(groups.get(str(unit)), -1) for unit in items.unit_names], dtype=np.int64)
    first = unit_group[items.units[:, 0]]
    second = np.where(items.units[:, 1] >= 0, unit_group[items.units[:, 1].clip(min=0)], first)
    membership = {name: (first == code) & (second == code) for name, code in code_of.items()}
    notes = []
    ungrouped = int(np.sum(unit_group < 0))
    if ungrouped:
        notes.append(f"{ungrouped} of {len(unit_group)} identities are in no group; their items are in no group's results")
    crossing = int(np.sum((first != second) & (first >= 0) & (second >= 0)))
    if crossing:
        notes.append(f"{crossing} items pair identities of two groups and are in no group's results")
    empty = [name for name, mask in membership.items() if not mask.any()]
    if empty:
        raise ValueError(f"{what}: groups {empty} of {source} hold no item of this set (no identity of theirs is in it)")
    return membership, notes


def group_spread(per_group: Mapping[str, Mapping[str, float | None]]) -> dict[str, dict[str, float]]:
    """For each metric every group reports: the std over groups (ddof=0, as RFW papers) and the ratio
    of the largest to the smallest error (1 - rate; the rate itself for EER), the skewed error ratio."""
    keys = [key for key in next(iter(per_group.values())) if key not in NO_INTERVAL]
    spread = {}
    for key in keys:
        values = [metrics.get(key) for metrics in per_group.values()]
        if any(value is None for value in values):
            continue
        values = np.asarray(values, dtype=np.float64)
        errors = values if key in LOWER_IS_BETTER else 1 - values
        ratio = float(errors.max() / errors.min()) if errors.min() > 0 else float("inf")
        spread[key] = {"std": float(values.std()), "max_min_error_ratio": ratio}
    return spread


def paired_runs(
    baseline: Sequence[Mapping[str, ScoredItems]],
    other: Sequence[Mapping[str, ScoredItems]],
    metric: Callable[[Mapping[str, ScoredItems], Mapping[str, np.ndarray] | None], float],
    bootstrap: Bootstrap,
) -> Difference:
    """The difference of two settings' mean `metric` over seeds (other - baseline), each setting's runs
    paired by position (seed k against seed k), with a two-level bootstrap: a replicate draws the seed
    pairs with replacement and the units of every set once (the same draws for all runs, so the
    comparison is paired), which puts both the seed-to-seed and the test-set sampling variation in
    the interval. `metric(items_by_set, weights_by_set or None)`."""
    if len(baseline) != len(other) or not baseline:
        raise ValueError(f"need the same number of runs on both sides (seed k against seed k), got {len(baseline)} and {len(other)}")
    pairs = list(zip(baseline, other))
    sets = list(pairs[0][0])
    for runs in pairs:
        for items in runs:
            for name in sets:
                check_comparable(pairs[0][0][name], items[name], f"set {name!r}")
    active = {name: pairs[0][0][name].active_units() for name in sets}
    point_a = float(np.mean([metric(a, None) for a, _ in pairs]))
    point_b = float(np.mean([metric(b, None) for _, b in pairs]))
    rng = np.random.default_rng(bootstrap.seed)
    replicates = np.full(bootstrap.resamples, np.nan)
    for r in range(bootstrap.resamples):
        chosen = rng.integers(0, len(pairs), size=len(pairs))
        weights = {}
        for name in sets:
            items = pairs[0][0][name]
            weights[name] = items.unit_weights(draw_multiplicities(rng, active[name], items.num_units))
        with np.errstate(invalid="ignore", divide="ignore"):
            try:
                replicates[r] = np.mean([metric(pairs[k][1], weights) - metric(pairs[k][0], weights) for k in chosen])
            except (ValueError, KeyError):  # a metric the replicate leaves undefined
                continue
    interval = percentile_interval(replicates, bootstrap.level)
    p_value = None if interval is None else two_sided_p(replicates)
    return Difference(point_a, point_b, point_b - point_a, interval, p_value)

"""What a result's metrics are functions of: its scored items, the units that share them, and their quality.

Every protocol's metrics are functions of per-item outcomes: a pair's cosine and label, a template
pair's, a probe's rank and top score. `ScoredItems` holds them, recomputes the metrics under item
weights (`metrics(weights)`: weight k counts the item k times, 0 leaves it out, exactly as if the
sample held it k times) and says which *units* each item depends on. Intervals, paired comparisons,
per-group results and quality curves (facerec.evaluation.bootstrap, quality) are all built on these
three things, for every kind of result alike.

Units. Items that share a person are not independent: LFW's 6,000 pairs are built from 4,281
people, many in several pairs, so resampling pairs treats correlated pairs as independent and
gives intervals that are too narrow. The bootstrap resamples units instead:
- pairs: the identities of the two images (each item lists 1 unit for a same-person pair, 2 for a
  different-person pair); where a set names no identities (the .bin sets), the pairs themselves;
- IJB template pairs: the subjects of the two templates, from the set's 1:N files where it has them
  (IJB-C's name a subject for every template), else the templates (the 1:1 meta files name none);
- identification: the probe's identity (the gallery is fixed).
A replicate draws each unit's multiplicity m_u (U draws with replacement from the U units that
occur in the items) and gives an item the product of its units' multiplicities: the vertex
bootstrap of dyadic data (Snijders and Borgatti, Connections 1999: pairs are dyads over one pool
of people, a person drawn twice brings each of its pairs twice, a pair of two such people four
times), which for one unit per item is the ordinary cluster bootstrap.

Quality. Each item has one or two *sides*, a side a group of images (an image, or a template's
images); a side's quality is the mean of its images' quality scores and an item's the lower of its
sides' (the pair-quality convention of the face-image-quality literature, ISO/IEC 29794-1).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np

ARRAY_PREFIX = "items."  # what `arrays()` keys start with beside the kind's own arrays


class ScoredItems(ABC):
    """The per-item outcomes of one result, the units they depend on and the images behind them.

    units (N, 2) int64: the unit indices of each item, -1 in the second column where it has one;
    unit_names (U,) str: what each unit is (an identity name, a template id), None: the items are their
    own units; unit_kind: "identity", "template", "pair", "probe"; sides (N, 2) int64: the image
    groups of each item (-1: none); image_group (num_images,) int64: the group of each image.
    """

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[ScoredItems]]] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            ScoredItems.registry[cls.kind] = cls

    def __init__(self, num_items: int):
        self.num_items = int(num_items)
        self.set_units(np.c_[np.arange(num_items), np.full(num_items, -1)], None, "pair")
        self.sides = np.full((num_items, 2), -1, dtype=np.int64)
        self.image_group = np.zeros(0, dtype=np.int64)
        self.quality: np.ndarray | None = None

    # ---- what each kind defines -------------------------------------------------------------
    @abstractmethod
    def metrics(self, weights: np.ndarray | None = None) -> dict[str, float | None]:
        """The result's `summary()` metrics recomputed with item weights (None: every item once)."""

    @abstractmethod
    def kind_arrays(self) -> dict[str, np.ndarray]:
        """The kind's own arrays, enough for `from_arrays` to rebuild it."""

    @classmethod
    @abstractmethod
    def from_kind_arrays(cls, arrays: dict[str, np.ndarray]) -> ScoredItems:
        """Rebuild from `kind_arrays()` (units, sides and quality are restored by `from_arrays`)."""

    @abstractmethod
    def error_versus_reject(self, fractions: np.ndarray) -> dict[str, np.ndarray]:
        """{curve label: (len(fractions),) error rate} with the lowest-quality `fraction` of the
        items the error is counted over rejected first; needs `quality`."""

    # ---- shared ---------------------------------------------------------------------------
    def set_units(self, units, unit_names, unit_kind: str) -> None:
        units = np.asarray(units, dtype=np.int64).reshape(-1, 2)
        if len(units) != self.num_items:
            raise ValueError(f"units: expected one row per item ({self.num_items}), got {len(units)}")
        num_units = self.num_items if unit_names is None else len(unit_names)
        if (units[:, 0] < 0).any() or units.max(initial=-1) >= num_units:
            raise ValueError(f"units must index the {num_units} units, first column >= 0")
        self.units, self.unit_kind, self.num_units = units, unit_kind, num_units
        self.unit_names = None if unit_names is None else np.asarray(unit_names, dtype=str)

    def active_units(self, base: np.ndarray | None = None) -> np.ndarray:
        """The units that occur in the items (those with base > 0): what a replicate draws from. A unit
        with no item (a person whose pairs were all excluded) would make the sample size random."""
        rows = self.units if base is None else self.units[np.asarray(base) > 0]
        return np.unique(rows[rows >= 0])

    def set_sides(self, sides, image_group) -> None:
        self.sides = np.asarray(sides, dtype=np.int64).reshape(-1, 2)
        self.image_group = np.asarray(image_group, dtype=np.int64)

    def set_quality(self, image_quality: np.ndarray) -> None:
        """Item quality from one score per image: each side's mean over its images, the item's lower side."""
        image_quality = np.asarray(image_quality, dtype=np.float64)
        if len(image_quality) != len(self.image_group):
            raise ValueError(f"expected one quality score per image ({len(self.image_group)}), got {len(image_quality)}")
        groups = self.image_group >= 0
        size = max(int(self.image_group.max(initial=-1)) + 1, int(self.sides.max(initial=-1)) + 1)
        total = np.bincount(self.image_group[groups], weights=image_quality[groups], minlength=size)
        count = np.bincount(self.image_group[groups], minlength=size)
        side_quality = np.divide(total, count, out=np.full(size, np.inf), where=count > 0)
        quality = np.where(self.sides >= 0, side_quality[self.sides.clip(min=0)], np.inf).min(axis=1)
        if not np.isfinite(quality).all():
            raise ValueError(f"{int((~np.isfinite(quality)).sum())} items have no image with a quality score")
        self.quality = quality

    def unit_weights(self, multiplicity: np.ndarray) -> np.ndarray:
        """Item weights from unit multiplicities: the product over each item's units."""
        first = multiplicity[self.units[:, 0]]
        second = np.where(self.units[:, 1] >= 0, multiplicity[self.units[:, 1].clip(min=0)], 1)
        return (first * second).astype(np.float64)

    def fingerprint(self) -> str:
        """A digest of what makes two evaluations of one set comparable item by item: the kind, the
        units and the item labels (`label_array()`), not the scores."""
        import hashlib

        digest = hashlib.sha256(self.kind.encode())
        names = () if self.unit_names is None else (self.unit_names.astype("U"),)
        for array in (self.units, self.label_array(), *names):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def label_array(self) -> np.ndarray:
        """What an item is, apart from its score (a pair's label, a probe's mated flag)."""
        return np.zeros(self.num_items, dtype=np.int8)

    def decisions(self) -> np.ndarray | None:
        """(N,) bool: each item's decision at the protocol's fixed threshold is right (McNemar's test);
        None where the protocol fixes no per-item decision."""
        return None

    def arrays(self) -> dict[str, np.ndarray]:
        """Everything needed to rebuild these items, for `np.savez_compressed`."""
        shared = {
            "kind": np.array(self.kind),
            "units": _compact(self.units),
            "unit_kind": np.array(self.unit_kind),
            "sides": _compact(self.sides),
            "image_group": _compact(self.image_group),
        }
        if self.unit_names is not None:
            shared["unit_names"] = self.unit_names
        if self.quality is not None:
            shared["quality"] = self.quality
        return {**{ARRAY_PREFIX + k: v for k, v in shared.items()}, **self.kind_arrays()}

    @staticmethod
    def from_arrays(arrays: dict[str, np.ndarray]) -> ScoredItems:
        kind = str(arrays[ARRAY_PREFIX + "kind"])
        if kind not in ScoredItems.registry:
            raise ValueError(f"unknown scored-items kind {kind!r}, expected one of {sorted(ScoredItems.registry)}")
        own = {k: v for k, v in arrays.items() if not k.startswith(ARRAY_PREFIX)}
        items = ScoredItems.registry[kind].from_kind_arrays(own)
        items.set_units(arrays[ARRAY_PREFIX + "units"], arrays.get(ARRAY_PREFIX + "unit_names"), str(arrays[ARRAY_PREFIX + "unit_kind"]))
        items.set_sides(arrays[ARRAY_PREFIX + "sides"], arrays[ARRAY_PREFIX + "image_group"])
        if ARRAY_PREFIX + "quality" in arrays:
            items.quality = np.asarray(arrays[ARRAY_PREFIX + "quality"], dtype=np.float64)
        return items


def _compact(indices: np.ndarray) -> np.ndarray:
    """Index arrays as int32 where they fit (scores.npz of IJB-C: 15.7 M pairs x 2 units, 2 sides)."""
    return indices.astype(np.int32) if indices.size and indices.max() < 2**31 else indices


def weights_or_ones(weights: np.ndarray | None, n: int) -> np.ndarray:
    if weights is None:
        return np.ones(n)
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (n,) or (weights < 0).any():
        raise ValueError(f"weights must be ({n},) non-negative, got shape {weights.shape}")
    return weights


def rejection_order(quality: np.ndarray | None, members: np.ndarray) -> np.ndarray:
    """The indices of `members` (a boolean mask) from the lowest quality up (stable on ties)."""
    if quality is None:
        raise ValueError("an error-versus-reject curve needs a quality score per item (set_quality)")
    indices = np.flatnonzero(members)
    return indices[np.argsort(quality[indices], kind="stable")]


def kept_after_rejection(count: int, fractions: np.ndarray) -> np.ndarray:
    """How many of `count` items each rejection fraction keeps (the lowest floor(fraction * count) go)."""
    return count - np.floor(np.asarray(fractions) * count + 1e-9).astype(np.int64)


def error_after_rejection(errors: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """The error rate of the items left as each fraction of the lowest-quality ones is rejected;
    `errors` (bool) in rejection order (`rejection_order`); NaN where no item is left."""
    kept = kept_after_rejection(len(errors), fractions)
    suffix = np.r_[np.cumsum(errors[::-1])[::-1], 0]  # errors among the items from i on
    return np.divide(suffix[len(errors) - kept], kept, out=np.full(len(kept), np.nan), where=kept > 0)

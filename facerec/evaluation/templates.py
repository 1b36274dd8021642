"""IJB-style set-to-set (template) verification, vectorised, in bounded memory.

A template is a set of images of one person, grouped into media (one photo, or the frames of one
video). Pooling as insightface's arcface_torch `eval_ijbc.py` (fusion="mean"): each image's feature
keeps its norm (unless keep_norms=False: unit length first), is multiplied by its detector score
where `faceness` is given, features are averaged within a media, the media means summed over the
template, and the sum L2-normalised. In one formula, template t's direction is that of

    sum over images i of t:  w_i f_i,   w_i = faceness_i / (number of t's images in i's media)

(w_i also divided by |f_i| when keep_norms=False; faceness_i = 1 when no scores are given),
which is how it is computed here: one weighted reduction from images to templates (a sort and
`np.add.reduceat` in chunks), no loop over templates.

fusion="norm_weighted" ignores the media: w_i = faceness_i, so each image's unit direction u_i counts
with weight faceness_i * |f_i| (its norm, a quality signal: blurred, occluded or non-face crops get
small norms), and a video's frames are not collapsed into one vote first. It needs keep_norms=True
(the norms are the weights).

Scores are cosines of the pooled template features (float64), computed block by block (a matrix
product where the pairs are dense, gathered rows where sparse, see `template_scores`) so the memory
stays bounded (IJB-C: 15,658,489 pairs over 23,124 templates). TAR@FAR follows two rules:

- `tar_at_far` (arcface_torch's table): on sklearn's `roc_curve` (drop_intermediate=True: collinear
  ROC points removed), the TPR at the point whose FPR is nearest the target FAR, ties to the larger
  TPR. Always defined, even below 1 / impostors (then it reads the curve at FPR = 0).
- `tar_at_far_strict`: the best TPR over all thresholds whose FPR <= FAR (the ROC as a step
  function over every distinct score); None where the set has fewer than 1 / FAR impostor pairs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from facerec.evaluation.result import ProtocolResult, interval_cell
from facerec.evaluation.scored import ScoredItems, weights_or_ones
from facerec.evaluation.verification import area_under_curve, binary_error_versus_reject, tar_at_far

TEMPLATE_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
FUSIONS = ("mean", "norm_weighted")
POOL_CHUNK = 1 << 15  # images per chunk of the pooling reduction
PAIR_BATCH = 1 << 14  # pairs per gathered batch: 2 x 16384 x d float64 rows (134 MB at d = 512)
SCORE_BLOCK = 1024  # first templates per block of scoring (a block's similarities: <= 1024 x T float64)
DENSE_GAIN = 64  # a matrix-product similarity costs ~1/100-1/250 of a gathered pair: used when pairs >= entries / 64


@dataclass
class TemplateResult(ProtocolResult):
    """Template verification: scores, both TAR@FAR rules (see the module docstring), AUC."""

    kind: ClassVar[str] = "templates"
    tar_at_far: dict[float, float]  # arcface_torch's nearest-FPR rule
    tar_at_far_strict: dict[float, float | None]  # best TPR with FPR <= FAR; None: too few impostors
    auc: float
    num_templates: int  # templates with images
    num_pairs: int
    num_genuine: int
    fusion: str
    keep_norms: bool
    faceness: bool  # whether detector scores weighted the images
    notes: list[str] = field(default_factory=list)
    scores: np.ndarray | None = field(default=None, repr=False)  # (P,) cosine per pair, input order
    fpr: np.ndarray | None = field(default=None, repr=False)  # sklearn roc_curve (drop_intermediate=True)
    tpr: np.ndarray | None = field(default=None, repr=False)
    items: TemplateScores | None = field(default=None, repr=False)

    def summary(self) -> dict[str, float]:
        flat = {"auc": self.auc}
        flat.update({f"tar@far={far:.0e}": tar for far, tar in self.tar_at_far.items()})
        flat.update({f"tar_strict@far={far:.0e}": tar for far, tar in self.tar_at_far_strict.items() if tar is not None})
        return flat

    def to_dict(self) -> dict:
        return {
            "tar_at_far": {f"{far:.0e}": tar for far, tar in self.tar_at_far.items()},
            "tar_at_far_strict": {f"{far:.0e}": tar for far, tar in self.tar_at_far_strict.items()},
            "auc": self.auc,
            "num_templates": self.num_templates,
            "num_pairs": self.num_pairs,
            "num_genuine": self.num_genuine,
            "fusion": self.fusion,
            "keep_norms": self.keep_norms,
            "faceness": self.faceness,
            "notes": list(self.notes),
        }

    def table_row(self, intervals=None) -> dict[str, str]:
        intervals = intervals or {}
        row = {"templates": str(self.num_templates), "pairs": str(self.num_pairs)}
        row.update(
            {
                f"TAR@FAR={far:.0e} (%)": interval_cell(tar, intervals.get(f"tar@far={far:.0e}"), percent=True)
                for far, tar in self.tar_at_far.items()
            }
        )
        row["AUC"] = interval_cell(self.auc, intervals.get("auc"), percent=False)
        return row

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        return "roc", self.fpr, self.tpr


def _vector(name: str, values, n: int, kind: str) -> np.ndarray:
    array = np.asarray(values)
    if array.shape != (n,):
        raise ValueError(f"{name} must hold one value per {kind} ({n}), got shape {array.shape}")
    return array


def _integers(name: str, values, n: int, kind: str) -> np.ndarray:
    array = _vector(name, values, n, kind)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(f"{name} must hold integer ids, got dtype {array.dtype}")
    return array.astype(np.int64)


def pool_templates(
    features,
    templates,
    medias,
    faceness=None,
    keep_norms: bool = True,
    fusion: str = "mean",
    chunk: int = POOL_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """(template ids (T,) sorted, L2-normalised template features (T, d) float64).

    features (N, d) per image (flip-summed, not normalised); templates, medias (N,) int ids;
    faceness (N,) detector scores or None; pooling as in the module docstring.
    """
    if fusion not in FUSIONS:
        raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
    if fusion == "norm_weighted" and not keep_norms:
        raise ValueError("fusion='norm_weighted' weighs images by their feature norms; keep_norms=False would discard them")
    features = np.asarray(features)
    if features.ndim != 2 or len(features) == 0:
        raise ValueError(f"features must be an (N, d) array with N >= 1, got shape {features.shape}")
    n = len(features)
    templates = _integers("templates", templates, n, "image")
    medias = _integers("medias", medias, n, "image")
    norms = np.sqrt(np.einsum("nd,nd->n", features, features, dtype=np.float64))
    bad = np.flatnonzero(~np.isfinite(norms) | (norms == 0))
    if len(bad):
        raise ValueError(
            f"features of {len(bad)} images are non-finite or all zero (first rows: {bad[:5].tolist()}); "
            "the model or the data produced invalid embeddings"
        )
    weights = np.ones(n) if keep_norms else 1.0 / norms
    if faceness is not None:
        faceness = _vector("faceness", faceness, n, "image").astype(np.float64)
        if not (np.isfinite(faceness).all() and (faceness >= 0).all()):
            raise ValueError(f"faceness must hold finite scores >= 0, got range [{faceness.min()}, {faceness.max()}]")
        weights = weights * faceness
    template_ids, template_index = np.unique(templates, return_inverse=True)
    if fusion == "mean":
        media_ids, media_index = np.unique(medias, return_inverse=True)
        # One int64 key per (template, media) group: below T x M <= N^2, no overflow at IJB sizes.
        group_key = template_index * len(media_ids) + media_index
        _, group, group_size = np.unique(group_key, return_inverse=True, return_counts=True)
        weights = weights / group_size[group]

    pooled = np.zeros((len(template_ids), features.shape[1]))
    order = np.argsort(template_index, kind="stable")
    for start in range(0, n, chunk):
        rows = order[start:start + chunk]
        owners = template_index[rows]
        firsts = np.flatnonzero(np.r_[True, owners[1:] != owners[:-1]])
        # Rows are sorted by template, so the owners at `firsts` are distinct and `+=` adds each once.
        pooled[owners[firsts]] += np.add.reduceat(features[rows] * weights[rows, None], firsts, axis=0)
    lengths = np.linalg.norm(pooled, axis=1)
    empty = np.flatnonzero(lengths == 0)
    if len(empty):
        raise ValueError(
            f"{len(empty)} templates pool to a zero vector (all faceness 0?), e.g. template {template_ids[empty[0]]}"
        )
    return template_ids, pooled / lengths[:, None]


def _gathered_scores(template_features: np.ndarray, first: np.ndarray, second: np.ndarray, batch: int) -> np.ndarray:
    """Row-wise dot products of gathered rows, `batch` pairs at a time into reused buffers."""
    scores = np.empty(len(first))
    d = template_features.shape[1]
    left, right = np.empty((min(batch, len(first)), d)), np.empty((min(batch, len(first)), d))
    for start in range(0, len(first), batch):
        size = min(batch, len(first) - start)
        np.take(template_features, first[start:start + size], axis=0, out=left[:size])
        np.take(template_features, second[start:start + size], axis=0, out=right[:size])
        scores[start:start + size] = np.einsum("nd,nd->n", left[:size], right[:size])
    return scores


def template_scores(
    template_features: np.ndarray, first: np.ndarray, second: np.ndarray, batch: int = PAIR_BATCH, block: int = SCORE_BLOCK
) -> np.ndarray:
    """(P,) cosine of rows first[k] and second[k] of unit-length `template_features` (T, d), float64.

    Pairs are grouped by blocks of `block` first templates. A block whose pairs are dense enough
    among the rows it needs gets one matrix product (its block x needed-columns similarities, at
    most block x T x 8 bytes) and reads its scores from it; a sparse block gathers both rows of each
    pair, `batch` pairs at a time. IJB-C's 15.7 M pairs over 23,124 templates are dense enough: on
    one CPU core at d=512 a BLAS product took about 36 ns per similarity, a gathered pair 3-9 us.
    """
    # The cosine is symmetric: with first <= second, block b needs only columns from b * block on,
    # so the matrix products cover half of the T x T similarities.
    first, second = np.minimum(first, second), np.maximum(first, second)
    scores = np.empty(len(first))
    order = np.argsort(first, kind="stable")
    bounds = np.searchsorted(first[order], np.arange(0, len(template_features) + block, block))
    for start, (low, high) in enumerate(zip(bounds[:-1], bounds[1:])):
        if low == high:
            continue
        pairs = order[low:high]
        rows = first[pairs] - start * block
        columns, column_of = np.unique(second[pairs], return_inverse=True)
        if (high - low) * DENSE_GAIN >= block * len(columns):
            similarities = template_features[start * block:(start + 1) * block] @ template_features[columns].T
            scores[pairs] = similarities[rows, column_of.ravel()]
        else:
            scores[pairs] = _gathered_scores(template_features, first[pairs], second[pairs], batch)
    return scores


def roc_counts(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positives, true positives) at each distinct score, descending (sklearn's
    `_binary_clf_curve`): the counts when predicting "same" for score >= that score."""
    order = np.argsort(scores, kind="mergesort")[::-1]
    ends = np.r_[np.flatnonzero(np.diff(scores[order])), len(scores) - 1]  # last pair of each distinct score
    tps = np.cumsum(labels[order], dtype=np.int64)[ends]
    return 1 + ends - tps, tps


def template_rates(fps: np.ndarray, tps: np.ndarray, fars, num_impostor: float) -> dict[str, float]:
    """A template result's metrics from its ROC counts (`summary()` keys): AUC and the nearest-FPR TAR
    on the sklearn ROC, the strict TAR on the full one where >= 1 / FAR impostors resolve it."""
    fpr, tpr = sklearn_roc(fps, tps)
    full_fpr, full_tpr = np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]
    flat = {"auc": area_under_curve(fpr, tpr)}
    flat.update({f"tar@far={far:.0e}": nearest_fpr_tar(fpr, tpr, far) for far in fars})
    strict = tar_at_far(full_fpr, full_tpr, fars)
    flat.update({f"tar_strict@far={far:.0e}": float(t) for far, t in zip(fars, strict) if num_impostor * far >= 1})
    return flat


class TemplateScores(ScoredItems):
    """The template pairs of a template result: cosine and label; units are the two templates (the
    1:1 meta files name no subjects); sides are the templates, so an image's quality counts towards
    its template's (facerec.evaluation.scored)."""

    kind = "templates"

    def __init__(self, scores, labels, fars=TEMPLATE_FARS):
        super().__init__(len(scores))
        self.scores = np.asarray(scores, dtype=np.float64)
        self.labels = np.asarray(labels, dtype=bool)
        self.fars = tuple(float(far) for far in fars)
        self.order = np.argsort(self.scores, kind="mergesort")[::-1]
        self.ends = np.r_[np.flatnonzero(np.diff(self.scores[self.order])), len(self.scores) - 1]
        self.ordered_labels = self.labels[self.order]

    def label_array(self) -> np.ndarray:
        return self.labels

    def metrics(self, weights=None) -> dict[str, float | None]:
        w = weights_or_ones(weights, self.num_items)[self.order]  # ones: the unweighted counts, exactly (integers in float64)
        tps = np.cumsum(w * self.ordered_labels)[self.ends]
        fps = np.cumsum(w)[self.ends] - tps
        if tps[-1] == 0 or fps[-1] == 0:  # a replicate without one of the classes measures nothing
            return {}
        return template_rates(fps, tps, self.fars, float(fps[-1]))

    def kind_arrays(self) -> dict[str, np.ndarray]:
        return {"scores": self.scores, "labels": self.labels, "fars": np.asarray(self.fars)}

    @classmethod
    def from_kind_arrays(cls, arrays) -> TemplateScores:
        return cls(arrays["scores"], arrays["labels"], arrays["fars"])

    def error_versus_reject(self, fractions) -> dict[str, np.ndarray]:
        return binary_error_versus_reject(self.scores, self.labels, self.quality, fractions)


def sklearn_roc(fps: np.ndarray, tps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) as sklearn.metrics.roc_curve(drop_intermediate=True): collinear points dropped, (0, 0) first."""
    if len(fps) > 2:
        corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        fps, tps = fps[corner], tps[corner]
    return np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]


def nearest_fpr_tar(fpr: np.ndarray, tpr: np.ndarray, far: float) -> float:
    """arcface_torch's rule: TPR at the ROC point with FPR nearest `far`, ties to the later (larger TPR) point."""
    distance = np.abs(fpr - far)[::-1]
    return float(tpr[len(tpr) - 1 - int(np.argmin(distance))])


def verify_templates(
    features,
    templates,
    medias,
    template_pairs,
    labels,
    faceness=None,
    keep_norms: bool = True,
    fusion: str = "mean",
    fars=TEMPLATE_FARS,
    batch: int = PAIR_BATCH,
    block: int = SCORE_BLOCK,
) -> TemplateResult:
    """Template-to-template verification (IJB-B / IJB-C 1:1).

    features (N, d) per image, flip-summed, not normalised; templates, medias (N,) int ids;
    template_pairs (P, 2) template ids; labels (P,) 1 genuine / 0 impostor; faceness (N,) detector
    scores or None. Pooling, fusion and both TAR@FAR rules as in the module docstring; batch and
    block: the scoring's memory bounds (see `template_scores`).
    """
    template_ids, template_features = pool_templates(features, templates, medias, faceness, keep_norms, fusion)
    template_pairs = np.asarray(template_pairs)
    if template_pairs.ndim != 2 or template_pairs.shape[1] != 2 or not np.issubdtype(template_pairs.dtype, np.integer):
        raise ValueError(
            f"template_pairs must be a (P, 2) integer array, got shape {template_pairs.shape} dtype {template_pairs.dtype}"
        )
    labels = _vector("labels", labels, len(template_pairs), "pair")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 (impostor) or 1 (genuine), got values {np.unique(labels)[:5].tolist()}")
    labels = labels.astype(bool)
    num_genuine = int(labels.sum())
    num_impostor = len(labels) - num_genuine
    if num_genuine == 0 or num_impostor == 0:
        raise ValueError(f"template pairs need both classes, got {num_genuine} genuine and {num_impostor} impostor pairs")
    rows = np.searchsorted(template_ids, template_pairs).clip(max=len(template_ids) - 1)
    unknown = np.flatnonzero((template_ids[rows] != template_pairs).any(axis=1))
    if len(unknown):
        k = int(unknown[0])
        raise ValueError(
            f"{len(unknown)} template pairs name a template with no images, first: pair {k} = {template_pairs[k].tolist()}"
        )
    scores = template_scores(template_features, rows[:, 0], rows[:, 1], batch, block)
    items = TemplateScores(scores, labels, fars)
    items.set_units(rows, template_ids.astype(str), "template")
    items.set_sides(rows, np.searchsorted(template_ids, np.asarray(templates)))

    fps, tps = roc_counts(scores, labels)
    fpr, tpr = sklearn_roc(fps, tps)
    full_fpr, full_tpr = np.r_[0, fps] / fps[-1], np.r_[0, tps] / tps[-1]
    strict = dict(zip(fars, tar_at_far(full_fpr, full_tpr, fars).tolist()))
    notes = [
        "tar_at_far: arcface_torch's rule (TPR at the sklearn ROC point with FPR nearest the FAR, ties to the "
        "larger TPR); tar_at_far_strict: best TPR with FPR <= FAR"
    ]
    for far in fars:
        if num_impostor * far < 1:
            strict[far] = None
            notes.append(
                f"FAR={far:.0e} needs >= {int(np.ceil(1 / far))} impostor pairs, the set has {num_impostor}: "
                "no strict TAR; the nearest-FPR TAR reads the curve near FPR=0"
            )
    return TemplateResult(
        tar_at_far={far: nearest_fpr_tar(fpr, tpr, far) for far in fars},
        tar_at_far_strict=strict,
        auc=area_under_curve(fpr, tpr),
        num_templates=len(template_ids),
        num_pairs=len(labels),
        num_genuine=num_genuine,
        fusion=fusion,
        keep_norms=keep_norms,
        faceness=faceness is not None,
        notes=notes,
        scores=scores,
        fpr=fpr,
        tpr=tpr,
        items=items,
    )

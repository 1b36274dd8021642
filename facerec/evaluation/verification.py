"""Face verification metrics under the LFW protocol, exact and vectorised.

Scores are cosine similarities of L2-normalised embeddings (float64); a pair is
predicted "same" when its score exceeds the threshold. For each fold, the
threshold that maximises accuracy on the other folds is applied to the held-out
fold; the reported accuracy is the mean over folds and accuracy_std their
standard deviation (ddof=0, as in the published tables). Candidate thresholds
are all midpoints between consecutive distinct training scores: the search is
exact (no threshold grid) and costs one sort per fold.

Folds follow the set's protocol (see `make_folds`): the official folds where the
set defines them (LFW View 2 and the insightface .bin sets store them as 10
consecutive blocks of 300 same + 300 different pairs), stratified seeded folds
where consecutive blocks would hold a single class (View 1's pairsDevTest.txt
lists its 500 same pairs first). The result says which policy was used.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from facerec.evaluation.result import ProtocolResult, interval_cell
from facerec.evaluation.scored import ScoredItems, error_after_rejection, rejection_order, weights_or_ones

FARS = (1e-1, 1e-2, 1e-3, 1e-4)
REPORTED_FAR = 1e-3  # the TAR@FAR column of the pairs table


@dataclass
class VerificationResult(ProtocolResult):
    kind: ClassVar[str] = "pairs"
    accuracy: float
    accuracy_std: float
    threshold: float  # best threshold on all pairs (cosine similarity)
    auc: float
    eer: float
    tar_at_far: dict[float, float | None]  # None where too few different pairs to resolve that FAR
    fold_accuracies: list[float]
    fold_thresholds: list[float]
    fold_policy: str  # "given", "consecutive" or "stratified(seed=...)"
    num_pairs: int
    num_same: int
    notes: list[str] = field(default_factory=list)
    fpr: np.ndarray | None = field(default=None, repr=False)  # the full ROC, one point per distinct score
    tpr: np.ndarray | None = field(default=None, repr=False)
    items: PairScores | None = field(default=None, repr=False)  # per-pair scores, labels and folds

    def summary(self) -> dict[str, float]:
        """Flat float metrics (for loggers)."""
        flat = {
            "accuracy": self.accuracy,
            "accuracy_std": self.accuracy_std,
            "threshold": self.threshold,
            "auc": self.auc,
            "eer": self.eer,
        }
        for far, tar in self.tar_at_far.items():
            if tar is not None:
                flat[f"tar@far={far:.0e}"] = tar
        return flat

    def to_dict(self) -> dict:
        """Everything but the ROC arrays, JSON-ready (FAR keys as "1e-03")."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("fpr", "tpr", "items")}
        data["fold_accuracies"], data["fold_thresholds"], data["notes"] = list(self.fold_accuracies), list(self.fold_thresholds), list(self.notes)
        data["tar_at_far"] = {f"{far:.0e}": tar for far, tar in self.tar_at_far.items()}
        return data

    def table_row(self, intervals=None) -> dict[str, str]:
        intervals = intervals or {}
        tar_key = f"tar@far={REPORTED_FAR:.0e}"
        return {
            "pairs": str(self.num_pairs),
            "accuracy (%)": interval_cell(self.accuracy, intervals.get("accuracy"), percent=True),
            "fold std (%)": f"{100 * self.accuracy_std:.2f}",
            f"TAR@FAR={REPORTED_FAR:.0e} (%)": interval_cell(self.tar_at_far.get(REPORTED_FAR), intervals.get(tar_key), percent=True),
            "AUC": interval_cell(self.auc, intervals.get("auc"), percent=False),
            "EER (%)": interval_cell(self.eer, intervals.get("eer"), percent=True),
            "folds": self.fold_policy,
        }

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        return "roc", self.fpr, self.tpr


def _float64(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _labels(issame, n: int) -> np.ndarray:
    if hasattr(issame, "detach"):
        issame = issame.detach().cpu().numpy()
    issame = np.asarray(issame)
    if issame.ndim != 1 or len(issame) != n:
        raise ValueError(f"issame must be a 1-D array with one label per pair ({n}), got shape {issame.shape}")
    if issame.dtype != bool and not np.isin(issame, (0, 1)).all():
        raise ValueError(f"issame must hold booleans (or 0/1), got values {np.unique(issame)[:5]}")
    return issame.astype(bool)


def cosine_scores(emb1, emb2) -> np.ndarray:
    """Cosine similarity of each pair, embeddings normalised here (float64)."""
    a, b = _float64(emb1), _float64(emb2)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must both be (N, d) arrays of the same shape, got {a.shape} and {b.shape}")
    norm_a, norm_b = np.sqrt(np.einsum("nd,nd->n", a, a)), np.sqrt(np.einsum("nd,nd->n", b, b))
    # NaN/inf anywhere in an embedding makes its norm non-finite: one check per row, not per value.
    for name, norm in (("emb1", norm_a), ("emb2", norm_b)):
        rows = np.flatnonzero(~np.isfinite(norm))
        if len(rows):
            raise ValueError(
                f"{name} holds non-finite values (NaN/inf) in {len(rows)} embeddings (first rows: {rows[:5].tolist()}); "
                "the model or the data produced invalid embeddings"
            )
        if np.any(norm == 0):
            raise ValueError(f"{name} holds {int((norm == 0).sum())} all-zero embeddings, which have no direction")
    return np.einsum("nd,nd->n", a, b) / (norm_a * norm_b)


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score > threshold`; lowest threshold on ties."""
    order = np.argsort(scores, kind="stable")
    return sorted_best_threshold(scores[order], issame[order], None)


def sorted_best_threshold(s: np.ndarray, y: np.ndarray, w: np.ndarray | None) -> tuple[float, float]:
    """`best_threshold` of scores `s` sorted ascending, labels `y`, item weights `w` (None: 1 each, else > 0)."""
    n = len(s)
    w = np.ones(n) if w is None else w
    # Cut k = 0..n predicts "same" for sorted items k..n-1: TN = different among the first k.
    tn = np.concatenate([[0], np.cumsum(w * ~y)])
    tp = (w * y).sum() - np.concatenate([[0], np.cumsum(w * y)])
    realisable = np.ones(n + 1, dtype=bool)
    realisable[1:n] = s[1:] > s[:-1]  # no threshold separates equal scores
    correct = np.where(realisable, tp + tn, -1)
    k = int(np.argmax(correct))
    lower = s[k - 1] if k > 0 else s[0] - 1.0
    upper = s[k] if k < n else s[-1] + 1.0
    return float((lower + upper) / 2), float(correct[k] / w.sum())


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, descending, starting at (0, 0)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    fpr, tpr = weighted_roc(y, last_of_run, None)
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def weighted_roc(y: np.ndarray, last_of_run: np.ndarray, w: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from labels `y` in descending score order, `last_of_run` marking each distinct
    score's last item, with item weights `w` (None: 1 each; 0 leaves an item out)."""
    positive, negative = (y, ~y) if w is None else (w * y, w * ~y)
    tps, fps = np.cumsum(positive)[last_of_run], np.cumsum(negative)[last_of_run]
    return np.r_[0.0, fps / max(fps[-1], 1e-300)], np.r_[0.0, tps / max(tps[-1], 1e-300)]


def tar_at_far(fpr: np.ndarray, tpr: np.ndarray, fars) -> np.ndarray:
    """The best TAR among thresholds whose FAR <= far, for each far (the ROC as a step function)."""
    return tpr[np.searchsorted(fpr, np.asarray(fars, dtype=np.float64), side="right") - 1]


def area_under_curve(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Trapezoidal area under the ROC (ties between classes count one half)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The rate where FAR = FRR, linearly interpolated between ROC points."""
    gap = (1 - tpr) - fpr  # strictly decreasing from 1 to -1 along the curve
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(fpr[0])
    g0, g1 = gap[i - 1], gap[i]
    w = g0 / (g0 - g1)
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def _one_class_folds(fold_ids: np.ndarray, issame: np.ndarray) -> list[tuple[int, int, int]]:
    """(fold, same, different) for each fold holding a single class."""
    folds = np.unique(fold_ids)
    same = np.array([issame[fold_ids == f].sum() for f in folds])
    size = np.array([(fold_ids == f).sum() for f in folds])
    bad = (same == 0) | (same == size)
    return [(int(f), int(s), int(n - s)) for f, s, n in zip(folds[bad], same[bad], size[bad])]


def make_folds(issame: np.ndarray, n_folds: int = 10, folds=None, seed: int = 0) -> tuple[np.ndarray, str, list[str]]:
    """(fold id per pair, policy, notes).

    - `folds` given (the set's protocol, e.g. the official View 2 folds): used as is ("given").
    - else the `n_folds` consecutive blocks of the pair list ("consecutive"): the official
      folds of LFW View 2 and the insightface .bin sets, which store them in order;
    - else, when some block would hold a single class, stratified folds drawn with `seed`
      ("stratified(seed=...)"): each fold gets every n_folds-th pair of each class, shuffled.
    A fold holding one class is never used: its held-out accuracy would not measure verification.
    """
    issame = np.asarray(issame, dtype=bool)
    n = len(issame)
    if folds is not None:
        folds = np.asarray(folds)
        if folds.shape != (n,):
            raise ValueError(f"folds must hold one fold id per pair ({n}), got shape {folds.shape}")
        if len(np.unique(folds)) < 2:
            raise ValueError(f"folds must name at least 2 folds, got {np.unique(folds).tolist()}")
        bad = _one_class_folds(folds, issame)
        if bad:
            fold, same, different = bad[0]
            raise ValueError(
                f"given fold {fold} holds {same} same and {different} different pairs; every fold needs both classes"
            )
        return folds.astype(np.int64), "given", []
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    n_same, n_different = int(issame.sum()), int(n - issame.sum())
    if min(n_same, n_different) < n_folds:
        raise ValueError(
            f"{n_folds} folds need >= {n_folds} same and >= {n_folds} different pairs, "
            f"got {n_same} same and {n_different} different"
        )
    consecutive = np.repeat(np.arange(n_folds), [len(b) for b in np.array_split(np.arange(n), n_folds)])
    bad = _one_class_folds(consecutive, issame)
    if not bad:
        return consecutive, "consecutive", []
    rng = np.random.default_rng(seed)
    stratified = np.empty(n, dtype=np.int64)
    for cls in (True, False):
        members = rng.permutation(np.flatnonzero(issame == cls))
        stratified[members] = np.arange(len(members)) % n_folds
    fold, same, different = bad[0]
    note = (
        f"consecutive block {fold} of the pair list holds {same} same and {different} different pairs; "
        f"used {n_folds} stratified folds (seed={seed}) instead"
    )
    return stratified, f"stratified(seed={seed})", [note]


def verify(emb1, emb2, issame, n_folds: int = 10, folds=None, fars=FARS, seed: int = 0) -> VerificationResult:
    """LFW-protocol verification of pairs (emb1[i], emb2[i]) with labels issame[i].

    emb1, emb2: (N, d) arrays or tensors (normalised here); issame: (N,) booleans;
    folds: optional fold id per pair fixed by the set (then `n_folds` is not used);
    otherwise folds as described in `make_folds`. TAR@FAR is reported only where
    the set has >= 1/FAR different pairs (else None, with a note).
    """
    scores = cosine_scores(emb1, emb2)
    issame = _labels(issame, len(scores))
    fold_ids, policy, notes = make_folds(issame, n_folds, folds, seed)
    fold_accuracies, fold_thresholds = [], []
    for fold in np.unique(fold_ids):
        test = fold_ids == fold
        threshold, _ = best_threshold(scores[~test], issame[~test])
        fold_thresholds.append(threshold)
        fold_accuracies.append(float(np.mean((scores[test] > threshold) == issame[test])))
    fpr, tpr, _ = roc_curve(scores, issame)
    items = PairScores(scores, issame, fold_ids, fold_thresholds, fars)
    n_different = int((~issame).sum())
    tars = tar_at_far(fpr, tpr, fars)
    resolved: dict[float, float | None] = {}
    for far, tar in zip(fars, tars):
        if n_different * far < 1:
            resolved[far] = None
            notes.append(f"TAR@FAR={far:.0e} needs >= {int(np.ceil(1 / far))} different pairs, the set has {n_different}")
        else:
            resolved[far] = float(tar)
    return VerificationResult(
        accuracy=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        threshold=best_threshold(scores, issame)[0],
        auc=area_under_curve(fpr, tpr),
        eer=equal_error_rate(fpr, tpr),
        tar_at_far=resolved,
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
        fold_policy=policy,
        num_pairs=len(issame),
        num_same=int(issame.sum()),
        notes=notes,
        fpr=fpr,
        tpr=tpr,
        items=items,
    )


class PairScores(ScoredItems):
    """The pairs of a pair-verification result: cosine, label, fold and the fold's held-out threshold
    (facerec.evaluation.scored). `metrics` recomputes `VerificationResult.summary()`: 10-fold accuracy
    with each fold's threshold chosen again on the other folds' weighted pairs, the ROC, AUC, EER and
    TAR@FAR, the same functions as `verify` on the same folds."""

    kind = "pairs"

    def __init__(self, scores, issame, folds, fold_thresholds, fars=FARS):
        super().__init__(len(scores))
        self.scores = np.asarray(scores, dtype=np.float64)
        self.issame = np.asarray(issame, dtype=bool)
        self.folds = np.asarray(folds, dtype=np.int64)
        self.fold_thresholds = np.asarray(fold_thresholds, dtype=np.float64)
        self.fars = tuple(float(far) for far in fars)
        self.descending = np.argsort(-self.scores, kind="stable")
        ordered = self.scores[self.descending]
        self.last_of_run = np.r_[ordered[1:] != ordered[:-1], True]
        self.ascending = np.argsort(self.scores, kind="stable")
        self.fold_ids = np.unique(self.folds)
        self.training_order = {f: self.ascending[self.folds[self.ascending] != f] for f in self.fold_ids}

    def label_array(self) -> np.ndarray:
        return np.c_[self.issame, self.folds]

    def decisions(self) -> np.ndarray:
        """Each pair's held-out decision ("same" when its cosine exceeds its fold's threshold) is right."""
        threshold = self.fold_thresholds[np.searchsorted(self.fold_ids, self.folds)]
        return (self.scores > threshold) == self.issame

    def metrics(self, weights=None) -> dict[str, float | None]:
        w = weights_or_ones(weights, self.num_items)
        different = float(np.sum(w * ~self.issame))
        if different == 0 or different == w.sum():  # a replicate without one of the classes measures nothing
            return {}
        accuracies = []
        for fold in self.fold_ids:
            held_out = (self.folds == fold) & (w > 0)
            order = self.training_order[fold]
            order = order[w[order] > 0]
            if not held_out.any() or not order.size:
                continue
            threshold, _ = sorted_best_threshold(self.scores[order], self.issame[order], w[order])
            correct = (self.scores[held_out] > threshold) == self.issame[held_out]
            accuracies.append(float(np.sum(w[held_out] * correct) / np.sum(w[held_out])))
        ascending = self.ascending[w[self.ascending] > 0]  # the stable order of the present pairs, no sort per replicate
        y, sw = self.issame[self.descending], w[self.descending]
        fpr, tpr = weighted_roc(y, self.last_of_run, sw)
        flat: dict[str, float | None] = {
            "accuracy": float(np.mean(accuracies)),
            "accuracy_std": float(np.std(accuracies)),
            "threshold": sorted_best_threshold(self.scores[ascending], self.issame[ascending], w[ascending])[0],
            "auc": area_under_curve(fpr, tpr),
            "eer": equal_error_rate(fpr, tpr),
        }
        for far, tar in zip(self.fars, tar_at_far(fpr, tpr, self.fars)):
            if different * far >= 1:
                flat[f"tar@far={far:.0e}"] = float(tar)
        return flat

    def kind_arrays(self) -> dict[str, np.ndarray]:
        return {
            "scores": self.scores, "issame": self.issame, "folds": self.folds,
            "fold_thresholds": self.fold_thresholds, "fars": np.asarray(self.fars),
        }  # fmt: skip

    @classmethod
    def from_kind_arrays(cls, arrays) -> PairScores:
        return cls(arrays["scores"], arrays["issame"], arrays["folds"], arrays["fold_thresholds"], arrays["fars"])

    def error_versus_reject(self, fractions) -> dict[str, np.ndarray]:
        return binary_error_versus_reject(self.scores, self.issame, self.quality, fractions)


ERC_FMRS = (1e-3, 1e-4)


def binary_error_versus_reject(scores, genuine, quality, fractions, fmrs=ERC_FMRS) -> dict[str, np.ndarray]:
    """FNMR against the fraction of genuine comparisons rejected for low quality, at thresholds fixed
    before rejection so that FMR <= each of `fmrs` over all impostor comparisons (Grother and Tabassi,
    IEEE TPAMI 2007); an FMR below 1 / impostors is replaced by the set's smallest reachable one,
    1 / impostors, and the curve is labelled with the FMR it used."""
    impostor = np.sort(scores[~genuine])[::-1]
    order = rejection_order(quality, genuine)
    curves = {}
    if not len(impostor) or not len(order):
        return curves
    for fmr in sorted({max(fmr, 1 / len(impostor)) for fmr in fmrs}, reverse=True):
        allowed = int(np.floor(fmr * len(impostor) + 1e-9))
        threshold = impostor[allowed] if allowed < len(impostor) else -np.inf  # at most `allowed` impostors above it
        curves[f"FNMR@FMR={fmr:.0e}"] = error_after_rejection(scores[order] <= threshold, fractions)
    return curves

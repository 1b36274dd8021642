"""Face verification metrics under the LFW protocol, exact and vectorised.

Scores are cosine similarities of L2-normalised embeddings; a pair is predicted
"same" when its score exceeds the threshold. For each fold, the threshold that
maximises accuracy on the other folds is applied to the held-out fold; the
reported accuracy is the mean over folds and accuracy_std their standard
deviation (ddof=0, as in the published tables). Candidate thresholds are all
midpoints between consecutive distinct scores (exact, no threshold grid).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

FARS = (1e-1, 1e-2, 1e-3, 1e-4)


@dataclass
class VerificationResult:
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
    fpr: np.ndarray | None = field(default=None, repr=False)
    tpr: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict[str, float]:
        """Flat float metrics (for loggers and JSON)."""
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


def _as_numpy(x, name: str) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x)
    if x.dtype != bool and not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.isfinite(x).sum())
        raise ValueError(f"{name} holds {bad} non-finite values (NaN/inf); the model or the data produced invalid embeddings")
    return x


def cosine_scores(emb1, emb2) -> np.ndarray:
    """Cosine similarity of each pair, embeddings normalised here (float64)."""
    a = _as_numpy(emb1, "emb1").astype(np.float64)
    b = _as_numpy(emb2, "emb2").astype(np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"emb1 and emb2 must both be (N, d) arrays of the same shape, got {a.shape} and {b.shape}")
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    if np.any(norms == 0):
        raise ValueError(f"{int((norms == 0).sum())} pairs contain an all-zero embedding, which has no direction")
    return np.einsum("nd,nd->n", a, b) / norms


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy of `score > threshold`; lowest threshold on ties."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    n = len(s)
    # Predicting "same" for sorted items k..n-1, k = 0..n: TN = different among the first k.
    tn = np.concatenate([[0], np.cumsum(~y)])
    tp = y.sum() - np.concatenate([[0], np.cumsum(y)])
    valid = np.ones(n + 1, dtype=bool)
    valid[1:n] = s[1:] > s[:-1]  # a cut between equal scores is not realisable
    correct = np.where(valid, tp + tn, -1)
    k = int(np.argmax(correct))
    lower = s[k - 1] if k > 0 else s[0] - 1.0
    upper = s[k] if k < n else s[-1] + 1.0
    return float((lower + upper) / 2), float(correct[k] / n)


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) at every distinct score, descending, starting at (0, 0)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last_of_run = np.r_[s[1:] != s[:-1], True]
    tps = np.cumsum(y)[last_of_run]
    fps = np.cumsum(~y)[last_of_run]
    fpr = np.r_[0.0, fps / max(fps[-1], 1)]
    tpr = np.r_[0.0, tps / max(tps[-1], 1)]
    return fpr, tpr, np.r_[np.inf, s[last_of_run]]


def equal_error_rate(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """The rate where FAR = FRR, linearly interpolated between ROC points."""
    gap = (1 - tpr) - fpr  # decreasing from 1 to -1 along the curve
    i = int(np.argmax(gap <= 0))
    if i == 0:
        return float(fpr[0])
    g0, g1 = gap[i - 1], gap[i]
    w = g0 / (g0 - g1)
    return float(fpr[i - 1] + w * (fpr[i] - fpr[i - 1]))


def make_folds(issame: np.ndarray, n_folds: int, folds=None, seed: int = 0) -> tuple[np.ndarray, str]:
    """Fold id per pair and the policy used (see `verify`)."""
    n = len(issame)
    if folds is not None:
        folds = np.asarray(folds, dtype=np.int64)
        if folds.shape != (n,):
            raise ValueError(f"folds must hold one fold id per pair ({n}), got shape {folds.shape}")
        for fold in np.unique(folds):
            if issame[folds == fold].all() or not issame[folds == fold].any():
                raise ValueError(f"fold {fold} holds only one class; each fold needs same and different pairs")
        return folds, "given"
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    if issame.sum() < n_folds or (~issame).sum() < n_folds:
        raise ValueError(
            f"{n_folds} folds need >= {n_folds} same and different pairs, got {issame.sum()} same, {(~issame).sum()} different"
        )
    consecutive = np.repeat(np.arange(n_folds), [len(b) for b in np.array_split(np.arange(n), n_folds)])
    if all(0 < issame[consecutive == f].sum() < (consecutive == f).sum() for f in range(n_folds)):
        return consecutive, "consecutive"
    rng = np.random.default_rng(seed)
    stratified = np.empty(n, dtype=np.int64)
    for cls in (True, False):
        members = rng.permutation(np.flatnonzero(issame == cls))
        stratified[members] = np.arange(len(members)) % n_folds
    return stratified, f"stratified(seed={seed})"


def verify(emb1, emb2, issame, n_folds: int = 10, folds=None, fars=FARS, seed: int = 0) -> VerificationResult:
    """LFW-protocol verification of pairs (emb1[i], emb2[i]) with labels issame[i].

    Folds: `folds` if given (one id per pair); else the pairs' `n_folds`
    consecutive blocks when each block holds both classes (LFW View 2 and the
    insightface .bin sets: the official folds); else stratified folds drawn with
    `seed` (e.g. View 1 lists all same pairs first). `fold_policy` reports which.
    """
    issame = _as_numpy(issame, "issame").astype(bool).reshape(-1)
    scores = cosine_scores(emb1, emb2)
    if len(scores) != len(issame):
        raise ValueError(f"{len(scores)} embedding pairs but {len(issame)} issame labels")
    fold_ids, policy = make_folds(issame, n_folds, folds, seed)
    fold_accuracies, fold_thresholds = [], []
    for fold in np.unique(fold_ids):
        test = fold_ids == fold
        threshold, _ = best_threshold(scores[~test], issame[~test])
        fold_thresholds.append(threshold)
        fold_accuracies.append(float(np.mean((scores[test] > threshold) == issame[test])))
    fpr, tpr, _ = roc_curve(scores, issame)
    n_different = int((~issame).sum())
    tar_at_far: dict[float, float | None] = {}
    notes = []
    for far in fars:
        if n_different * far < 1:
            tar_at_far[far] = None
            notes.append(f"TAR@FAR={far:.0e} needs >= {int(np.ceil(1 / far))} different pairs, the set has {n_different}")
        else:
            tar_at_far[far] = float(tpr[fpr <= far].max())
    return VerificationResult(
        accuracy=float(np.mean(fold_accuracies)),
        accuracy_std=float(np.std(fold_accuracies)),
        threshold=best_threshold(scores, issame)[0],
        auc=float(np.trapezoid(tpr, fpr)),
        eer=equal_error_rate(fpr, tpr),
        tar_at_far=tar_at_far,
        fold_accuracies=fold_accuracies,
        fold_thresholds=fold_thresholds,
        fold_policy=policy,
        num_pairs=len(issame),
        num_same=int(issame.sum()),
        notes=notes,
        fpr=fpr,
        tpr=tpr,
    )

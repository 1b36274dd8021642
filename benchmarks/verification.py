"""Time `facerec.evaluation.verify` on LFW-sized inputs (6,000 pairs, 512-d) against a grid search.

The baseline is the threshold search of the widely used insightface evaluation
code: for each of the 10 folds, a Python loop over a fixed grid of 400
thresholds. `verify` is exact instead (every midpoint between distinct scores,
one sort per fold) and also computes the full ROC, AUC, EER and TAR@FAR.

    python benchmarks/verification.py [--pairs 6000] [--dim 512] [--repeats 20]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from facerec.evaluation import verify


def grid_search_accuracy(emb1: np.ndarray, emb2: np.ndarray, issame: np.ndarray, n_folds: int = 10) -> float:
    """10-fold accuracy with thresholds on squared distances in 0, 0.01, ..., 3.99 (insightface style)."""
    emb1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    emb2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = np.sum((emb1 - emb2) ** 2, axis=1)
    thresholds = np.arange(0, 4, 0.01)
    folds = np.arange(len(issame)) * n_folds // len(issame)
    accuracies = []
    for fold in range(n_folds):
        train, test = folds != fold, folds == fold
        train_acc = [np.mean((dist[train] < t) == issame[train]) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accuracies.append(np.mean((dist[test] < best) == issame[test]))
    return float(np.mean(accuracies))


def median_seconds(fn, repeats: int) -> float:
    """Median CPU time of one call (single-threaded numpy: robust to other jobs sharing the machine)."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=6000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    issame = np.tile(np.r_[np.ones(args.pairs // 20, bool), np.zeros(args.pairs // 20, bool)], 10)
    emb1 = rng.standard_normal((len(issame), args.dim)).astype(np.float32)
    # Same pairs share a small common part: about 96 % accuracy, like a weak face model on LFW.
    emb2 = np.where(issame[:, None], 0.15 * emb1, 0) + rng.standard_normal(emb1.shape).astype(np.float32)

    exact = median_seconds(lambda: verify(emb1, emb2, issame), args.repeats)
    grid = median_seconds(lambda: grid_search_accuracy(emb1, emb2, issame), max(args.repeats // 4, 1))
    result = verify(emb1, emb2, issame)
    print(f"{len(issame)} pairs, {args.dim}-d, accuracy {result.accuracy:.4f} (grid search: {grid_search_accuracy(emb1, emb2, issame):.4f})")
    print(f"verify (exact thresholds, ROC, AUC, EER, TAR@FAR): {1e3 * exact:8.1f} ms CPU")
    print(f"grid search, 400 thresholds x 10 folds (accuracy only): {1e3 * grid:8.1f} ms CPU")
    print(f"speed-up: {grid / exact:.1f}x")


if __name__ == "__main__":
    main()

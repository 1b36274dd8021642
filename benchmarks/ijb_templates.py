"""verify_templates at IJB-C's size against arcface_torch's approach, re-created in the same run.

    python benchmarks/ijb_templates.py                 # IJB-C size: 469,375 images, 23,124 templates, 15,658,489 pairs
    python benchmarks/ijb_templates.py --pairs 1000000 --images 227630

Random inputs of IJB-C's shape: d=512 float32 features, templates of >= 1 image with up to 8 media
each, random template pairs of which 19,557 (IJB-C's count, scaled with --pairs) are genuine.
"arcface_torch" is eval_ijbc.py's published method re-created: a Python loop over templates
(np.where per template, np.mean per media, sum, normalise), scores by gathering both templates'
features for 100,000 pairs at a time, sklearn's roc_curve, and its TAR pick
`min(zip(abs(fpr - far), range(len(fpr))))`. "facerec" is facerec.evaluation.verify_templates
split into the same stages. One thread (torch, BLAS). Both must give the same scores and TARs.

Time: wall clock per stage (time.perf_counter). Memory: tracemalloc's peak of bytes allocated
during each method beyond its inputs (numpy reports its buffers to tracemalloc), in a second run
of each method because tracemalloc slows Python code down.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse
import time
import tracemalloc

import numpy as np
import torch
from sklearn.metrics import roc_curve

from facerec.evaluation.templates import (
    TEMPLATE_FARS,
    nearest_fpr_tar,
    pool_templates,
    roc_counts,
    sklearn_roc,
    template_scores,
)

IJBC_GENUINE, IJBC_PAIRS = 19_557, 15_658_489


def make_inputs(images: int, templates: int, pairs: int, dim: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    template_ids = rng.choice(np.arange(1, 200_000), templates, replace=False)
    owner = np.r_[np.arange(templates), rng.integers(0, templates, images - templates)]
    rng.shuffle(owner)
    genuine = max(1, round(IJBC_GENUINE * pairs / IJBC_PAIRS))
    labels = np.zeros(pairs, dtype=np.int64)
    labels[rng.choice(pairs, genuine, replace=False)] = 1
    return {
        "features": rng.standard_normal((images, dim), dtype=np.float32),
        "templates": template_ids[owner],
        "medias": rng.integers(0, 8, images),
        "faceness": rng.uniform(0.3, 1.0, images).astype(np.float32),
        "pairs": rng.choice(template_ids, (pairs, 2)),
        "labels": labels,
    }


def facerec_method(data: dict, timings: dict) -> tuple[np.ndarray, dict]:
    start = time.perf_counter()
    ids, pooled = pool_templates(data["features"], data["templates"], data["medias"], data["faceness"])
    timings["pooling"] = time.perf_counter() - start
    start = time.perf_counter()
    rows = np.searchsorted(ids, data["pairs"])
    scores = template_scores(pooled, rows[:, 0], rows[:, 1])
    timings["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    fpr, tpr = sklearn_roc(*roc_counts(scores, data["labels"].astype(bool)))
    tars = {far: nearest_fpr_tar(fpr, tpr, far) for far in TEMPLATE_FARS}
    timings["roc + TAR"] = time.perf_counter() - start
    return scores, tars


def arcface_method(data: dict, timings: dict) -> tuple[np.ndarray, dict]:
    start = time.perf_counter()
    features = data["features"] * data["faceness"][:, None]
    templates, medias = data["templates"], data["medias"]
    unique_templates = np.unique(templates)
    template_feats = np.zeros((len(unique_templates), features.shape[1]))
    for count, template in enumerate(unique_templates):
        (members,) = np.where(templates == template)
        member_feats, member_medias = features[members], medias[members]
        media_feats = [member_feats[member_medias == media].mean(0) for media in np.unique(member_medias)]
        template_feats[count] = np.sum(media_feats, axis=0)
    template_feats /= np.linalg.norm(template_feats, axis=1, keepdims=True)
    timings["pooling"] = time.perf_counter() - start
    start = time.perf_counter()
    template2id = np.zeros((unique_templates.max() + 1, 1), dtype=int)
    template2id[unique_templates] = np.arange(len(unique_templates))[:, None]
    p1, p2 = data["pairs"][:, 0], data["pairs"][:, 1]
    scores = np.zeros(len(p1))
    for begin in range(0, len(p1), 100_000):
        batch = slice(begin, begin + 100_000)
        scores[batch] = np.sum(template_feats[template2id[p1[batch]]] * template_feats[template2id[p2[batch]]], -1).ravel()
    timings["scoring"] = time.perf_counter() - start
    start = time.perf_counter()
    fpr, tpr, _ = roc_curve(data["labels"], scores)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    tars = {}
    for far in TEMPLATE_FARS:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        tars[far] = float(tpr[index])
    timings["roc + TAR"] = time.perf_counter() - start
    return scores, tars


def peak_memory(method, data: dict) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    method(data, {})
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=469_375)
    parser.add_argument("--templates", type=int, default=23_124)
    parser.add_argument("--pairs", type=int, default=IJBC_PAIRS)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--no-memory", action="store_true", help="skip the tracemalloc runs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = make_inputs(args.images, args.templates, args.pairs, args.dim)
    print(f"{args.images:,} images, {args.templates:,} templates, {args.pairs:,} pairs, d={args.dim}, 1 thread\n")
    methods = {"facerec": facerec_method, "arcface_torch": arcface_method}
    results, timings = {}, {}
    for name, method in methods.items():
        timings[name] = {}
        results[name] = method(data, timings[name])
    scores_gap = float(np.abs(results["facerec"][0] - results["arcface_torch"][0]).max())
    same_tars = results["facerec"][1] == results["arcface_torch"][1]
    memory = {} if args.no_memory else {name: peak_memory(method, data) for name, method in methods.items()}

    stages = list(timings["facerec"])
    print("| stage | facerec (s) | arcface_torch (s) | speed-up |")
    print("|---|---:|---:|---:|")
    for stage in [*stages, "total"]:
        ours = sum(timings["facerec"].values()) if stage == "total" else timings["facerec"][stage]
        theirs = sum(timings["arcface_torch"].values()) if stage == "total" else timings["arcface_torch"][stage]
        print(f"| {stage} | {ours:.2f} | {theirs:.2f} | {theirs / ours:.1f}x |")
    if memory:
        ours, theirs = memory["facerec"] / 2**20, memory["arcface_torch"] / 2**20
        print(f"| peak memory beyond inputs (MiB, tracemalloc) | {ours:.0f} | {theirs:.0f} | {theirs / ours:.1f}x less |")
    print(f"\nmax |score difference| {scores_gap:.1e}; TAR@FAR identical: {same_tars}")
    print("TAR@FAR (facerec): " + ", ".join(f"{far:.0e}: {tar:.4f}" for far, tar in results["facerec"][1].items()))


if __name__ == "__main__":
    main()

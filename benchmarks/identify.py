"""Time `facerec.evaluation.identify` with a MegaFace-sized gallery: exact (torch) vs faiss search.

The gallery holds `--mated` enrolled identities plus `--distractors` random distractors (d=512);
`--mated` probes are noisy copies of their gallery entry (cosine ~0.2 to it: rank-1 falls from 76 % at
10^4 distractors to 41 % at 10^6), `--non-mated` probes are random. Each search mode runs in its own
process (same seed, same data), so its peak memory is its own: peak RSS (getrusage ru_maxrss) minus
the RSS just before `identify` is called, i.e. what the search adds on top of the caller's features.
Time: wall clock and CPU time of the `identify` call (on a shared machine, CPU time is the fair one).

    python benchmarks/identify.py [--distractors 1000000] [--threads 1] [--search both|exact|faiss]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_bytes() -> int:
    """Resident set size now (Linux /proc)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def search_set(distractors: int, mated: int, non_mated: int, dim: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    gallery = rng.standard_normal((mated + distractors, dim), dtype=np.float32)
    gallery_ids = np.arange(len(gallery))
    probes = rng.standard_normal((mated + non_mated, dim), dtype=np.float32)
    # A mated probe = its entry + noise at cosine ~0.2 to it: the rank-1 rate falls as distractors grow.
    probes[:mated] = 0.2 * gallery[:mated] + np.sqrt(1 - 0.2**2) * probes[:mated]
    probe_ids = np.r_[np.arange(mated), len(gallery) + np.arange(non_mated)]
    return gallery, gallery_ids, probes, probe_ids


def run_one(args: argparse.Namespace) -> None:
    """One search mode in this process; prints a JSON line and saves the per-probe ranks."""
    import faiss
    import numpy as np
    import torch

    from facerec.evaluation import identify

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    data = search_set(args.distractors, args.mated, args.non_mated, args.dim)
    before = rss_bytes()
    start, cpu = time.perf_counter(), time.process_time()
    result = identify(*data, search=args.search)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    np.save(args.ranks_out, result.ranks)
    print(json.dumps(dict(search=args.search, seconds=seconds, cpu_seconds=cpu, added_peak_bytes=peak - before,
                          features_bytes=int(data[0].nbytes + data[2].nbytes), **result.summary())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distractors", type=int, default=1_000_000)
    parser.add_argument("--mated", type=int, default=1000)
    parser.add_argument("--non-mated", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--search", choices=["both", "exact", "faiss"], default="both")
    parser.add_argument("--ranks-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.search != "both":
        run_one(args)
        return

    import numpy as np

    print(f"gallery {args.mated:,} + {args.distractors:,} distractors, {args.mated:,} mated + {args.non_mated:,} "
          f"non-mated probes, d={args.dim}, {args.threads} thread(s)")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    runs, ranks = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for search in ("exact", "faiss"):
            out = Path(tmp) / f"{search}.npy"
            sizes = [f"--{key}={getattr(args, key.replace('-', '_'))}" for key in ("distractors", "mated", "non-mated", "dim")]
            command = [sys.executable, __file__, "--search", search, "--ranks-out", str(out), f"--threads={args.threads}", *sizes]
            output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
            runs[search], ranks[search] = json.loads(output.strip().splitlines()[-1]), np.load(out)
    for search, run in runs.items():
        print(f"{search:5s}: {run['seconds']:7.1f} s wall ({run['cpu_seconds']:.1f} s CPU), "
              f"+{run['added_peak_bytes'] / 2**30:.2f} GiB peak RSS over {run['features_bytes'] / 2**30:.2f} GiB of features; "
              f"rank-1 {100 * run['rank1']:.2f} %, rank-10 {100 * run['rank10']:.2f} %, "
              f"TPIR@FPIR=1e-2 {100 * run['tpir@fpir=1e-02']:.2f} %")
    exact, fast = ranks["exact"], ranks["faiss"]
    print(f"rank-1 decisions agree on {np.mean((exact == 1) == (fast == 1)) * 100:.2f} % of probes; "
          f"ranks (<= 20) agree on {np.mean(exact == fast) * 100:.2f} %; "
          f"speed-up of faiss: {runs['exact']['seconds'] / runs['faiss']['seconds']:.2f}x")


if __name__ == "__main__":
    main()

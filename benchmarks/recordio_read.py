"""RecordIO random-read throughput: raw records, and full training samples (read + decode + flip + normalise).

    python benchmarks/recordio_read.py [--out DIR] [--reads 20000]

Converts all of LFW (13,232 real 112x112 JPEGs, ../shared/data or $FACEREC_DATA)
to train.rec/train.idx/property in DIR (a temporary folder by default), then reads
records in a random order on one thread. The file is in the page cache after the
conversion, so this measures the reader, not the disk.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from facerec.paths import DATA_DIR  # noqa: E402
from facerec.data import RecordDataset  # noqa: E402
from facerec.data.convert import folder_to_rec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="where to write the .rec (default: a temporary folder)")
    parser.add_argument("--reads", type=int, default=20000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        start = time.perf_counter()
        stats = folder_to_rec(DATA_DIR / "lfw" / "aligned_112", out)
        print(f"converted {stats['images']} images of {stats['classes']} identities in {time.perf_counter() - start:.1f} s")
        start = time.perf_counter()
        dataset = RecordDataset(out, num_classes=stats["classes"])
        print(f"opened (index of {len(dataset.reader)} records) in {1000 * (time.perf_counter() - start):.1f} ms")
        order = np.random.default_rng(0).integers(0, len(dataset), args.reads)
        keys = dataset.image_keys[order]

        start = time.perf_counter()
        size = sum(len(dataset.reader.read(int(key))) for key in keys)
        elapsed = time.perf_counter() - start
        print(f"raw random reads:            {len(keys) / elapsed:9.0f} records/s, {size / elapsed / 2**20:.0f} MiB/s")
        start = time.perf_counter()
        for index in order:
            dataset.record(int(index))
        print(f"reads + header + label check: {len(order) / (time.perf_counter() - start):8.0f} records/s")
        start = time.perf_counter()
        for index in order:
            dataset[int(index)]
        print(f"full samples (decode, flip, normalise): {len(order) / (time.perf_counter() - start):6.0f} images/s")


if __name__ == "__main__":
    main()

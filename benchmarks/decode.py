"""Decode + flip + normalise throughput per core: simplejpeg (the loader's decoder) vs Pillow, same files, one run.

    python benchmarks/decode.py [--images 4000] [--rounds 5]

Reads real 112x112 LFW JPEGs (../shared/data or $FACEREC_DATA) into memory, then
times each pipeline on one thread of one process (= one DataLoader worker),
interleaving the decoders round by round so machine load hits both alike; the
best round of each counts. Then a DataLoader over the same files as a training
set (file read + decode + random flip + normalise + collate) with 1 and 2 workers.
Targets: >= 2,000 images/s per core, simplejpeg >= 1.5x Pillow.
"""
from __future__ import annotations

import argparse
import io
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from facerec.paths import DATA_DIR  # noqa: E402
from facerec.data import ImageFolderDataset  # noqa: E402
from facerec.data.decode import decode_image, normalise  # noqa: E402


def pillow_decode(data: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def rate(pipeline, blobs: list[bytes]) -> float:
    start = time.perf_counter()
    for i, data in enumerate(blobs):
        pipeline(data, i)
    return len(blobs) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    files = sorted((DATA_DIR / "lfw" / "aligned_112").glob("*/*.jpg"))[: args.images]
    blobs = [f.read_bytes() for f in files]
    print(f"{len(blobs)} LFW JPEGs, 112x112, mean {np.mean([len(b) for b in blobs]) / 1024:.1f} KiB; one thread")

    pipelines = {
        "simplejpeg decode": lambda data, i: decode_image(data),
        "Pillow decode": lambda data, i: pillow_decode(data),
        "simplejpeg decode+flip+normalise": lambda data, i: normalise(decode_image(data), flip=i % 2 == 0),
        "Pillow decode+flip+normalise": lambda data, i: normalise(pillow_decode(data), flip=i % 2 == 0),
    }
    best = dict.fromkeys(pipelines, 0.0)
    for _ in range(args.rounds):
        for name, pipeline in pipelines.items():
            best[name] = max(best[name], rate(pipeline, blobs))
    for name, images_per_s in best.items():
        print(f"{name:36s} {images_per_s:8.0f} images/s")
    for stage in ("decode", "decode+flip+normalise"):
        print(f"simplejpeg / Pillow, {stage}: {best['simplejpeg ' + stage] / best['Pillow ' + stage]:.2f}x")

    people = sorted({f.parent.name for f in files})
    dataset = ImageFolderDataset(DATA_DIR / "lfw" / "aligned_112", identities=people)
    for workers in (1, 2):
        loader = DataLoader(dataset, batch_size=128, shuffle=True, num_workers=workers, persistent_workers=True)
        next(iter(loader))  # start the workers
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            count += len(images)
        elapsed = time.perf_counter() - start
        print(f"DataLoader, ImageFolderDataset, {workers} worker(s): {count / elapsed:7.0f} images/s "
              f"({count / elapsed / workers:.0f} per worker)")


if __name__ == "__main__":
    main()

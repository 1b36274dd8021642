"""Embedding extraction throughput (images/s) of a backbone on this machine, per flip mode and precision.

Images come from memory (a decoded verification set), so this measures the
model and the batching of `facerec.evaluation.extract_embeddings`, not decoding.
The flip test embeds every image twice: its cost relative to flip=none is the ratio.

    python benchmarks/embedding_extraction.py [--width 16] [--images 1024] [--batch-size 128] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import TensorDataset

from facerec.backbones import build
from facerec.evaluation import extract_embeddings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tiny")
    parser.add_argument("--width", type=int, default=16, help="tiny backbone width (conf/model/tiny.yaml: 16)")
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)

    backbone = build(args.backbone, width=args.width).to(args.device).eval()
    images = torch.rand(args.images, 3, 112, 112) * 2 - 1
    dataset = TensorDataset(images, torch.arange(args.images))  # (image, index), as a VerificationSet yields
    print(f"{args.backbone} (width {args.width}), {args.images} images 112x112, batch {args.batch_size}, "
          f"{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    baseline = None
    for flip, bf16 in [("none", False), ("sum", False), ("none", True), ("sum", True)]:
        extract_embeddings(backbone, torch.utils.data.Subset(dataset, range(args.batch_size)), flip, bf16=bf16)  # warm-up
        wall, cpu = time.perf_counter(), time.process_time()
        extract_embeddings(backbone, dataset, flip, device=args.device, bf16=bf16, batch_size=args.batch_size)
        rate = args.images / (time.perf_counter() - wall)
        cpu_rate = args.images / (time.process_time() - cpu)  # per CPU-second: robust to other jobs on the machine
        baseline = baseline or cpu_rate
        print(
            f"flip={flip:4s} {'bf16' if bf16 else 'fp32'}: {rate:7.0f} images/s wall, {cpu_rate:7.0f} per CPU-second "
            f"({cpu_rate / baseline:.2f}x flip=none fp32)"
        )


if __name__ == "__main__":
    main()

"""Partial FC: memory and step time of the classifier per rank, measured and computed.

    python benchmarks/partial_fc.py               # measure C = 100k on 1 and 2 gloo processes, then the tables
    python benchmarks/partial_fc.py --classes 20000 --steps 3

Measured (CPU, one thread per process): one training step of the head alone (embeddings in,
loss, backward, SGD with momentum) for the unsharded head (data parallel: every rank holds all C
centres and its own batch) and for Partial FC on R = 1 and 2 ranks at sample rates 1.0 and 0.1,
B = 128 samples per rank, d = 512. Memory: the growth of the process's peak resident set over the
training steps (the class centres are built on the meta device and only this rank's rows are
materialised, after the baseline), with glibc returning freed blocks at once. Time: this process's CPU time per step, the
fastest of `--steps` (each rank's own compute; gloo's waiting on the other rank is not CPU time).

Computed: the float32 bytes per rank that the implementation keeps at its peak (`head_bytes`),
the matmul FLOPs (`step_flops`) and the bytes sent (`step_traffic`), for every C, R and rate,
compared with the measurements and with insightface's published per-GPU memory (arcface_torch
README, V100 x 8, ResNet-50, 128 images per GPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from facerec.heads import ClassCentres, CosFace, FixedScale, MarginHead, PartialFC, shard_range

D, B = 512, 128
MIB = 2**20


def head_bytes(classes: int, world_size: int, rate: float | None, batch: int = B, dim: int = D) -> int:
    """Peak float32 bytes of the classifier on one rank during a training step with SGD momentum.

    rate None: the unsharded head (data parallel). Its centres, their gradient and momentum (3 C d),
    and the one (B, C) buffer of the loss (cosines, logits, probabilities, then the gradient).
    Partial FC: this rank's centres, gradient and momentum (3 C/R d; the gradient is dense, as in
    insightface's), the sampled centres and their gradient when rate < 1 (2 m d), and the one (N, m)
    buffer of the global batch N = R B against the m columns used.
    """
    if rate is None:
        return 4 * (3 * classes * dim + batch * classes)
    rows = shard_range(classes, world_size, 0)[1]
    columns = rows if rate == 1 else min(rows, max(int(rate * rows), world_size * batch))
    sampled = 2 * columns * dim if rate < 1 else 0
    return 4 * (3 * rows * dim + sampled + world_size * batch * columns)


def step_flops(classes: int, world_size: int, rate: float | None, batch: int = B, dim: int = D) -> float:
    """Multiply-adds x 2 of the three matmuls of a step (cosines, dL/dx, dL/dW) on one rank."""
    rows = classes if rate is None else shard_range(classes, world_size, 0)[1]
    columns = rows if rate in (None, 1) else min(rows, max(int(rate * rows), world_size * batch))
    samples = batch if rate is None else world_size * batch
    return 3 * 2 * samples * columns * dim


def step_traffic(classes: int, world_size: int, rate: float | None, batch: int = B, dim: int = D) -> float:
    """Bytes one rank sends per step for the head (ring collectives: an all-reduce of n bytes sends
    2 (R - 1) / R n, an all-gather (R - 1) / R of the gathered n). Unsharded: DDP all-reduces the
    centres' gradient. Partial FC: the embeddings' all-gather and their gradient's all-reduce (the
    labels, batch sizes, target cosines, maxima and sums are (N,) vectors: also counted)."""
    share = (world_size - 1) / world_size
    if rate is None:
        return 2 * share * 4 * classes * dim
    samples = world_size * batch
    return 4 * (share * samples * (dim + 2) + 2 * share * samples * (dim + 3))


def _current_rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _worker(rank: int, world_size: int, classes: int, rate: float | None, steps: int, out: str) -> None:
    torch.set_num_threads(1)
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{out}.rendezvous", rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    x = torch.randn(B, D, requires_grad=True)
    labels = torch.randint(0, classes, (B,))
    centres = ClassCentres if rate is None else partial(PartialFC, sample_rate=rate)
    with torch.device("meta"):  # no full (C, d) matrix on any rank: only this rank's rows are materialised
        head = MarginHead(D, classes, CosFace(), FixedScale(64.0), centres=centres)
    head.shard()
    baseline = _current_rss()
    head.to_empty(device="cpu")
    torch.nn.init.normal_(head.centres.weight, std=0.01)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
    times = []
    for _ in range(steps):
        start = time.process_time()
        optimizer.zero_grad()  # set_to_none, as Lightning does: no gradient is accumulated into another
        loss = head.loss(x, labels)[0]  # the one training path, dense or sharded
        loss.backward()
        optimizer.step()
        times.append(time.process_time() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline
    result = {"peak_bytes": peak, "step_s": min(times)}
    Path(f"{out}.rank{rank}.json").write_text(json.dumps(result))
    if world_size > 1:
        dist.destroy_process_group()


def measure(classes: int, world_size: int, rate: float | None, steps: int) -> dict:
    """Rank 0's result, in fresh processes (so the peak resident set is this configuration's)."""
    # glibc then returns every freed block over 128 KiB to the system at once (by default it raises
    # that threshold up to 32 MiB as blocks are freed and keeps them), so the resident set follows the tensors.
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    with tempfile.TemporaryDirectory() as directory:
        out = str(Path(directory) / "run")
        mp.start_processes(_worker, args=(world_size, classes, rate, steps, out), nprocs=world_size, start_method="spawn")
        return json.loads(Path(f"{out}.rank0.json").read_text())


def label(rate: float | None) -> str:
    return "unsharded (data parallel)" if rate is None else f"Partial FC, rate {rate}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", type=int, default=100_000, help="C of the measured settings")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"B = {B} per rank, d = {D}, float32, SGD with momentum\n")

    print(f"## Measured, C = {args.classes:,} (rank 0; CPU time of one step, fastest of {args.steps})\n")
    print("| head | ranks | measured peak MiB | computed MiB | CPU s / step | GFLOP / step |")
    print("|---|---:|---:|---:|---:|---:|")
    for rate, worlds in [(None, [1]), (1.0, [1, 2]), (0.1, [1, 2])]:
        for world_size in worlds:
            result = measure(args.classes, world_size, rate, args.steps)
            print(f"| {label(rate)} | {world_size} | {result['peak_bytes'] / MIB:,.0f} | "
                  f"{head_bytes(args.classes, world_size, rate) / MIB:,.0f} | {result['step_s']:.2f} | "
                  f"{step_flops(args.classes, world_size, rate) / 1e9:.1f} |", flush=True)

    print("\n## Computed, per rank: MiB at the peak of a step / GFLOP per step / MiB sent per step\n")
    sizes = (100_000, 1_000_000, 2_000_000)
    print("| head | ranks | " + " | ".join(f"C = {c:,}" for c in sizes) + " |")
    print("|---|---:|" + "---:|" * len(sizes))
    for rate in (None, 1.0, 0.1):
        for world_size in (1, 2, 4, 8):
            cells = [
                f"{head_bytes(c, world_size, rate) / MIB:,.0f} / {step_flops(c, world_size, rate) / 1e9:,.0f} / "
                f"{step_traffic(c, world_size, rate) / MIB:,.1f}"
                for c in sizes
            ]
            print(f"| {label(rate)} | {world_size} | " + " | ".join(cells) + " |")

    print("\n## insightface's table (V100 x 8, R50, 128 per GPU, MB per GPU) against the head model\n")
    published = {None: (7358, 32252), 1.0: (5306, 11178), 0.1: (4868, 6056)}  # C = 125k, 1.4M
    print("| method | published 125k | published 1.4M | difference | computed head 1.4M - 125k |")
    print("|---|---:|---:|---:|---:|")
    for rate, (small, large) in published.items():
        computed = (head_bytes(1_400_000, 8, rate) - head_bytes(125_000, 8, rate)) / 1e6
        name = "model parallel (Partial FC 1.0)" if rate == 1.0 else label(rate)
        print(f"| {name} | {small:,} | {large:,} | {large - small:,} | {computed:,.0f} |")


if __name__ == "__main__":
    sys.exit(main())

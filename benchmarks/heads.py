"""Forward + backward time of each margin head against a plain nn.Linear + cross-entropy.

    python benchmarks/heads.py                  # B=256, d=512, C = 10,575 and 100,000, on CPU
    python benchmarks/heads.py --classes 85742 --repeats 9

Every configuration is timed in the same run, interleaved round by round so that load
from other processes hits all of them alike; the table reports the fastest step of each
(the least disturbed one, as `timeit` advises) and the ratio to the plain linear layer
(target: <= 1.3x for every head). The default clock is this process's CPU time on one
thread: on a shared machine, wall-clock ratios swing with the other processes' load
(`--clock wall --threads 2` measures wall time; CPU time counts busy-waiting threads).
"""
from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F
from torch import nn

from facerec.heads import (
    AdaCos,
    ArcFace,
    AutoMarginScale,
    CombinedMargin,
    CosFace,
    DynamicScale,
    FixedScale,
    NormFace,
    SphereFace,
)

# name -> builder(d, C); every head with the fixed scale, plus the policies that cost something.
HEADS = {
    "normface": lambda d, c: NormFace(d, c, scale=FixedScale(30.0)),
    "cosface": lambda d, c: CosFace(d, c, scale=FixedScale(30.0)),
    "arcface": lambda d, c: ArcFace(d, c, scale=FixedScale(30.0)),
    "sphereface": lambda d, c: SphereFace(d, c, scale=FixedScale(30.0)),
    "combined": lambda d, c: CombinedMargin(d, c, scale=FixedScale(30.0)),
    "cosface + auto_margin": lambda d, c: CosFace(d, c, scale=AutoMarginScale()),
    "cosface + dynamic": lambda d, c: CosFace(d, c, scale=DynamicScale()),
    "adacos + dynamic": lambda d, c: AdaCos(d, c, scale=DynamicScale()),
}


class PlainLinear(nn.Module):
    """The baseline: an unnormalised linear classifier, logits = x W^T."""

    def __init__(self, embedding_size: int, num_classes: int):
        super().__init__()
        self.linear = nn.Linear(embedding_size, num_classes, bias=False)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.linear(embeddings)


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def step(module: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, clock) -> float:
    """Seconds for one forward + backward (loss = cross-entropy of the module's logits)."""
    module.zero_grad(set_to_none=True)
    embeddings.grad = None
    start = clock()
    F.cross_entropy(module(embeddings, labels), labels).backward()
    return clock() - start


def benchmark(batch: int, dim: int, num_classes: int, repeats: int, clock) -> dict[str, float]:
    """Fastest seconds per step for the baseline and every head at one class count."""
    torch.manual_seed(0)
    modules = {"nn.Linear + cross-entropy": PlainLinear(dim, num_classes)}
    modules.update({name: build(dim, num_classes) for name, build in HEADS.items()})
    embeddings = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch,))
    times: dict[str, list[float]] = {name: [] for name in modules}
    for round_ in range(repeats + 1):  # round 0 warms up (allocator, thread pool)
        for name, module in modules.items():
            seconds = step(module, embeddings, labels, clock)
            if round_:
                times[name].append(seconds)
    return {name: min(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_575, 100_000])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"B={args.batch}, d={args.dim}, fastest of {args.repeats} steps (forward + backward), {args.clock} time\n"
    )
    results = {c: benchmark(args.batch, args.dim, c, args.repeats, CLOCKS[args.clock]) for c in args.classes}
    header = "| head | " + " | ".join(f"C={c:,}: ms | ratio" for c in args.classes) + " |"
    print(header)
    print("|---|" + "---:|---:|" * len(args.classes))
    baseline = "nn.Linear + cross-entropy"
    for name in results[args.classes[0]]:
        cells = [f"{1e3 * results[c][name]:.1f} | {results[c][name] / results[c][baseline]:.2f}x" for c in args.classes]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

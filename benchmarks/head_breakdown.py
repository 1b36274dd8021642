"""Where a head's training step goes: the time of one `head.loss` forward + backward split by stage,
beside `nn.Linear` + cross-entropy split the same way, at one or more class counts.

    python benchmarks/head_breakdown.py                       # B=256, d=512, C = 10,575 and 100,000
    python benchmarks/head_breakdown.py --classes 10575 --heads cosface curricularface --steps 5

torch.profiler records the step with Python stacks. Each aten op that no other aten op encloses is
charged to a stage: for the heads, the innermost function of facerec/heads it runs in (the loss's
matrix products and its elementwise passes are told apart by op name: `STAGES`); for the baseline,
the op itself (its forward product, log-softmax, NLL and their backwards). What no aten op covers
is "Python and dispatch" (the step's CPU time, measured without the profiler, minus the ops' time
under it). The profiler adds a little to every op, so the stages sum to slightly more than the
plain step; the ratio column is each head's plain step over the baseline's, as in
benchmarks/heads.py. One thread, this process's CPU time, the median of --steps profiled steps after
a warm-up step; run it on an idle machine (it prints the load average, as heads.py does).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from facerec.heads import CosFace, CurricularFace, DynamicScale, FixedScale, MarginHead, SphereFace2, SubCenterArcFace, UniFace

S = 64.0
SPHEREFACE2_R = 40.0  # SphereFace2's published scale r
HEADS = {
    "cosface": lambda d, c: MarginHead(d, c, CosFace(), FixedScale(S)),
    "cosface + dynamic": lambda d, c: MarginHead(d, c, CosFace(), DynamicScale()),
    "curricularface": lambda d, c: MarginHead(d, c, CurricularFace(), FixedScale(S)),
    "subcenter arcface (K=3)": lambda d, c: MarginHead(d, c, SubCenterArcFace(), FixedScale(S)),
    "sphereface2 (C)": lambda d, c: MarginHead(d, c, SphereFace2(), FixedScale(SPHEREFACE2_R)),
    "uniface (UCE-m)": lambda d, c: MarginHead(d, c, UniFace(), FixedScale(S)),
}
# (function of facerec/heads, aten op or None for any) -> stage; the first match wins
STAGES = [
    (("centre_cosines", "aten::mm"), "cosine matmul x W^T"),
    (("centre_cosines", "aten::linalg_vector_norm"), "row norms of W"),
    (("centre_cosines", None), "division by the row norms"),
    (("norms_by_centre", None), "division by the row norms"),
    (("cosine_grads", "aten::mm"), "backward matmuls (grad x, grad W)"),
    (("cosine_grads", "aten::addmm_"), "backward matmuls (grad x, grad W)"),
    (("cosine_grads", "aten::empty_like"), "backward matmuls (grad x, grad W)"),
    (("cosine_grads", None), "radial projection of grad W"),
    (("nontarget_logits", None), "margin: non-target re-weighting"),
    (("margin_logits", None), "margin + scale + exp pass"),
    (("exp_margin_logits_", None), "margin + scale + exp pass"),
    (("negative_terms_", None), "sigmoid heads: logits, softplus, sigmoid pass"),
    (("closest_centres_", None), "closest of K centres"),
    (("backward", None), "logit gradient pass"),
    (("step", None), "scale policy (s)"),
    (("nontarget_log_sums", None), "scale policy (s)"),
    (("update", None), "scale policy (s)"),
]
BASELINE = "nn.Linear + cross-entropy"
BASELINE_STAGES = {
    "aten::linear": "cosine matmul x W^T",
    "aten::mm": "backward matmuls (grad x, grad W)",
    "aten::cross_entropy_loss": "log-softmax + NLL forward",
    "aten::_log_softmax_backward_data": "log-softmax + NLL backward",
    "aten::nll_loss_backward": "log-softmax + NLL backward",
}
OTHER = "(N,)-sized work and the rest"
PYTHON = "Python and dispatch"


def stage_of(functions: list[str], op: str) -> str:
    for function in reversed(functions):  # innermost first
        for (name, op_name), stage in STAGES:
            if function == name and op_name in (None, op):
                return stage
    return OTHER


def charge(node, functions: list[str], totals: dict[str, float], baseline: bool) -> None:
    """Add the durations (ms) of the aten ops at or under `node` that no aten op encloses."""
    name = node.name
    if node.tag.name == "TorchOp" and name.startswith("aten::"):
        stage = BASELINE_STAGES.get(name, OTHER) if baseline else stage_of(functions, name)
        totals[stage] += node.duration_time_ns / 1e6
        return
    if node.tag.name == "PyCall" and "facerec/heads/" in name:
        functions = functions + [name.rsplit(": ", 1)[-1]]
    for child in node.children:
        charge(child, functions, totals, baseline)


def plain_step(module_step, clock=time.process_time) -> float:
    start = clock()
    module_step()
    return clock() - start


def breakdown(name: str, build, batch: int, dim: int, num_classes: int, steps: int) -> tuple[dict, float]:
    """(stage -> median ms per step, plain step seconds (median))."""
    torch.manual_seed(0)
    module = build(dim, num_classes)
    embeddings = (torch.randn(batch, dim) * 1.3).requires_grad_()
    labels = torch.randint(0, num_classes, (batch,))
    loss = (lambda: F.cross_entropy(module(embeddings), labels)) if name == BASELINE else (lambda: module.loss(embeddings, labels)[0])

    def step():
        module.zero_grad(set_to_none=True)
        embeddings.grad = None
        loss().backward()

    step()  # warm-up: allocator, thread pool, the head's reused buffers
    plain = statistics.median(plain_step(step) for _ in range(steps))
    per_step: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], with_stack=True) as prof:
            step()
        totals: dict[str, float] = defaultdict(float)
        for root in prof.profiler.kineto_results.experimental_event_tree():
            charge(root, [], totals, baseline=name == BASELINE)
        for stage, ms in totals.items():
            per_step[stage].append(ms)
    medians = {stage: statistics.median(values + [0.0] * (steps - len(values))) for stage, values in per_step.items()}
    medians[PYTHON] = max(0.0, 1e3 * plain - sum(medians.values()))  # after the sum: it is not an op's
    return medians, plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, nargs="+", default=[10_575, 100_000])
    parser.add_argument("--heads", nargs="+", choices=sorted(HEADS), default=list(HEADS))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    print(f"torch {torch.__version__}, 1 thread, B={args.batch}, d={args.dim}; load average (1 min) before: {os.getloadavg()[0]:.2f}")
    builders = {BASELINE: lambda d, c: nn.Linear(d, c, bias=False), **{h: HEADS[h] for h in args.heads}}
    for num_classes in args.classes:
        results = {name: breakdown(name, build, args.batch, args.dim, num_classes, args.steps) for name, build in builders.items()}
        stages = sorted({stage for medians, _ in results.values() for stage in medians}, key=lambda s: (s == PYTHON, s == OTHER, s))
        print(f"\nC = {num_classes:,}: ms per step (median of {args.steps} profiled steps)\n")
        print("| stage | " + " | ".join(results) + " |")
        print("|---|" + "---:|" * len(results))
        for stage in stages:  # "-": no op of that module ran in that stage
            cells = [f"{medians[stage]:.1f}" if stage in medians else "-" for medians, _ in results.values()]
            print(f"| {stage} | " + " | ".join(cells) + " |")
        baseline = results[BASELINE][1]
        print("| **step, without the profiler** | " + " | ".join(f"**{1e3 * plain:.1f}** ({plain / baseline:.2f}x)" for _, plain in results.values()) + " |")
    print(f"\nload average (1 min) after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()

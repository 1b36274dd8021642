"""What compile.head=true does to a head's training step: `head.loss` forward + backward, eager against
compiled exactly as `compile_model` compiles it, and what dynamo makes of `head.loss`.

    python benchmarks/head_compile.py                 # B=128, d=512, C=10,575, inductor, one thread
    python benchmarks/head_compile.py --backends inductor aot_eager --heads cosface adaface --steps 40
    python benchmarks/head_compile.py --trace-autograd-ops   # dynamo traces autograd.grad: one graph

Per head: copies with the same weights, one eager and one compiled per backend, stepping in turn
(so load from other processes hits them alike) after --warmup steps (the compilation); the median
of --steps steps in this process's CPU time (`--clock wall` for wall time), and each backend's
ratio to the eager step of the same run; the largest difference from eager of the loss and the
gradients of the embeddings and the centres. Then `torch._dynamo.explain` of `head.loss`: how many
graphs dynamo compiles, how many graph breaks, and why, with the line each break is at.
--trace-autograd-ops sets torch._dynamo.config.trace_autograd_ops (off by default), under which
dynamo traces the inner torch.autograd.grad and the whole loss, backward included, becomes one graph.
"""
from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from facerec.training.fit import compile_model
from facerec.training.module import FaceRecognitionModule
from heads import CLOCKS, HEADS  # benchmarks/heads.py: the same heads at the same s

REPO_ROOT = Path(__file__).resolve().parents[1]


def compiled(head: nn.Module, backend: str) -> nn.Module:
    """A copy of `head` compiled as compile.head=true compiles it (compile.backend=`backend`)."""
    head = copy.deepcopy(head)
    module = FaceRecognitionModule(nn.Identity(), head, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    compile_model(module, {"head": True, "backend": backend})
    return head


def step(head: nn.Module, embeddings: torch.Tensor, labels: torch.Tensor, clock) -> tuple[float, list[torch.Tensor]]:
    """(seconds, [loss, embedding gradient, centre gradient]) of one head.loss forward + backward."""
    head.zero_grad(set_to_none=True)
    embeddings.grad = None
    start = clock()
    loss = head.loss(embeddings, labels)[0]
    loss.backward()
    seconds = clock() - start
    return seconds, [loss.detach(), embeddings.grad, head.centres.weight.grad]


def benchmark(build, backends: list[str], args) -> dict[str, dict]:
    """Median step time and the largest difference from eager of every variant of one head."""
    torch.manual_seed(0)
    eager = build(args.dim, args.classes)
    heads = {"eager": eager, **{backend: compiled(eager, backend) for backend in backends}}
    # embedding norms ~ 20-40, as a trained backbone gives them (AdaFace reads the norm)
    embeddings = (torch.randn(args.batch, args.dim) * 1.3).requires_grad_()
    labels = torch.randint(0, args.classes, (args.batch,))
    clock = CLOCKS[args.clock]
    first = {}
    for name, head in heads.items():
        first[name] = step(head, embeddings, labels, clock)[1]  # every variant's first step from the same state
        for _ in range(args.warmup - 1):
            step(head, embeddings, labels, clock)
    seconds = {name: [] for name in heads}
    for _ in range(args.steps):
        for name, head in heads.items():
            seconds[name].append(step(head, embeddings, labels, clock)[0])
    return {
        name: {
            "ms": 1e3 * statistics.median(seconds[name]),
            "max_diff": max(float((ours - theirs).abs().max()) for ours, theirs in zip(first[name], first["eager"])),
        }
        for name in heads
    }


def explain(build, args) -> str:
    """Graphs and graph breaks of one head.loss call (statistics off, as on most training steps)."""
    torch.manual_seed(0)
    head = build(args.dim, args.classes)
    embeddings = (torch.randn(args.batch, args.dim) * 1.3).requires_grad_()
    labels = torch.randint(0, args.classes, (args.batch,))
    result = torch._dynamo.explain(head.loss)(embeddings, labels, statistics=False)
    torch._dynamo.reset()
    reasons = Counter()
    for graph_break in result.break_reasons:
        where = ""
        if graph_break.user_stack and graph_break.user_stack[-1].filename.startswith(str(REPO_ROOT)):
            frame = graph_break.user_stack[-1]
            where = f" ({Path(frame.filename).relative_to(REPO_ROOT)}:{frame.lineno} {frame.name})"
        reasons[graph_break.reason.splitlines()[0] + where] += 1
    ops = [len([node for node in graph.graph.nodes if node.op.startswith("call")]) for graph in result.graphs]
    lines = [f"{result.graph_count} graph(s) ({', '.join(map(str, ops))} ops), {result.graph_break_count} graph break(s):"]
    return "\n".join(lines + [f"  {count} x {reason}" for reason, count in reasons.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", choices=list(HEADS), default=["cosface", "arcface", "adaface", "cosface + dynamic"])
    parser.add_argument("--backends", nargs="+", default=["inductor"], help="torch.compile backends (compile.backend)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=10_575)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--trace-autograd-ops", action="store_true", help="torch._dynamo.config.trace_autograd_ops = True")
    args = parser.parse_args()
    torch._dynamo.config.trace_autograd_ops = args.trace_autograd_ops
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; "
        f"B={args.batch}, d={args.dim}, C={args.classes:,}; median of {args.steps} steps after {args.warmup} warm-up "
        f"steps (forward + backward of head.loss), {args.clock} time, trace_autograd_ops={args.trace_autograd_ops}\n"
    )
    results, explanations = {}, {}
    for name in args.heads:
        results[name] = benchmark(HEADS[name], args.backends, args)
        # dynamo caches compiled code per code object, and every head runs the same MarginHead.loss
        torch._dynamo.reset()
        explanations[name] = explain(HEADS[name], args)
    print("| head | eager ms | " + " | ".join(f"{backend} ms | vs eager | max diff" for backend in args.backends) + " |")
    print("|---|---:|" + "---:|---:|---:|" * len(args.backends))
    for name, result in results.items():
        cells = [
            f"{result[b]['ms']:.1f} | {result[b]['ms'] / result['eager']['ms']:.3f}x | {result[b]['max_diff']:.1e}"
            for b in args.backends
        ]
        print(f"| {name} | {result['eager']['ms']:.1f} | " + " | ".join(cells) + " |")
    for name, text in explanations.items():
        print(f"\n{name}: torch._dynamo.explain(head.loss): {text}")


if __name__ == "__main__":
    main()

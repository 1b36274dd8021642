"""Ops per head training step: how many aten ops one `head.loss` forward + backward dispatches, whether
that count grows with the number of classes C, and the step's peak memory with and without the
training diagnostics.

    python benchmarks/head_ops.py                  # C = 10,575 / 93,431 / 1M, B = 256, d = 512, one thread
    python benchmarks/head_ops.py --classes 1000 20000 --dim 64 --heads cosface --scales dynamic

On a GPU every op is at least one kernel launch, a few microseconds of host time whatever its size, so
a Python loop over blocks whose number grows with C becomes thousands of launches at C = 10^6. The
loops over row blocks (`row_block` and `pass_block` in facerec/heads/blocks.py) choose their blocking
by device: ~2^17 elements per block on the CPU, a fixed number of blocks (or one) on any other
device; `row_dots` there picks its op by device too. This script counts the ops of one step with
torch.profiler on the CPU twice: with the CPU blocking (what runs here) and with what the CUDA path
takes. For the latter the three (as the loss and the scale policies import them by name) act as for
a "cuda" device: they read nothing but the device's type, and nothing else on the head's path
branches on the device, so the CPU dispatches the ops that a CUDA run of the same step would launch.

What is counted, per step (forward of `head.loss(embeddings, labels, statistics=...)`, backward):
- kernel ops: aten ops that compute on tensor data, i.e. the profiler's aten:: events with no such
  op beneath them, leaving out views, metadata and allocations (`NO_KERNEL`). A composite op counts
  its parts (`aten::clone` is its `aten::copy_`, `aten::logsumexp` its amax, sub, exp, sum, log,
  add), and a CPU reduction counts as the `aten::fill_` that starts its output (one op either way).
  This estimates the CUDA launches from the CPU's dispatch; the CUDA kernels of an op can differ in
  number (a cuBLAS matmul may launch two), but not with C.
- top-level aten ops: aten:: events not nested in another aten:: event: the dispatcher calls that
  Python and autograd make (views included).
Peak memory: the profiler's CPU allocation events replayed in time order, the peak above what was
allocated at the step's start; at the end of the forward (the diagnostics' temporaries are freed by
then, so this is the forward's peak) and over the whole step (the backward holds W's gradient).

The CUDA-blocking counts must be the same at every C: the script fails where they are not.
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from unittest import mock

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from facerec.paths import REPO_ROOT
from facerec.training.fit import build_head as head_of_config
from facerec.heads import MarginHead
from facerec.heads.blocks import bmm_row_dots
from facerec.heads import loss as fused_loss
from facerec.heads import scale as scale_policies

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the helper that composes the real configs, shared with the tests
from config_helpers import compose_config  # noqa: E402

MIB = 2**20
FORWARD = "head.loss forward"
# aten ops that launch no kernel: views and metadata, allocations (their fill or copy is counted), no-op casts.
NO_KERNEL = frozenset(
    "aten::" + name
    for name in (
        "alias as_strided chunk conj contiguous detach detach_ empty empty_like empty_strided expand expand_as "
        "lift_fresh narrow new_empty new_empty_strided permute promote_types real reshape _reshape_alias "
        "resize_ resolve_conj resolve_neg result_type select slice split split_with_sizes squeeze t T mT numpy_T to "
        "transpose unbind unsqueeze _unsafe_view view view_as"
    ).split()
)
BLOCKINGS = ("cpu", "cuda")


def build_head(head: str, scale: str, num_classes: int, dim: int) -> MarginHead:
    """The head of `python train.py head=<head> scale=<scale>` with C classes and d-dimensional embeddings."""
    overrides = [f"head={head}", f"scale={scale}", f"dataset.num_classes={num_classes}", f"model.embedding_size={dim}"]
    with tempfile.TemporaryDirectory() as out:
        return head_of_config(compose_config(overrides, out))


@contextmanager
def cuda_blocking():
    """`row_block`, `pass_block` and `row_dots` act as for a CUDA tensor of the same shape, wherever the tensor lives."""
    row_block, pass_block = fused_loss.row_block, fused_loss.pass_block

    def rows_on_cuda(num_rows: int, num_columns: int, device: torch.device) -> int:
        return row_block(num_rows, num_columns, torch.device("cuda"))

    def pass_on_cuda(num_rows: int, num_columns: int, device: torch.device) -> int:
        return pass_block(num_rows, num_columns, torch.device("cuda"))

    with (
        mock.patch.object(fused_loss, "row_block", rows_on_cuda),
        mock.patch.object(fused_loss, "pass_block", pass_on_cuda),
        mock.patch.object(fused_loss, "row_dots", bmm_row_dots),
        mock.patch.object(scale_policies, "row_block", rows_on_cuda),
    ):
        yield


def kernel_ops(event) -> int:
    """Kernel ops at or beneath a profiler event (see the module docstring)."""
    beneath = sum(kernel_ops(child) for child in event.cpu_children)
    if beneath or not event.name.startswith("aten::") or event.name in NO_KERNEL:
        return beneath
    return 1


def top_level_ops(event) -> int:
    """aten:: events at or beneath a profiler event that no other aten:: event encloses."""
    return 1 if event.name.startswith("aten::") else sum(top_level_ops(child) for child in event.cpu_children)


def peaks(prof) -> tuple[int, int]:
    """(peak bytes allocated above the start up to the end of the forward, over the whole step)."""
    events = prof.profiler.kineto_results.events()
    forward = next(e for e in events if e.name() == FORWARD)
    forward_end = forward.start_ns() + forward.duration_ns()
    live = forward_peak = step_peak = 0
    for event in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        live += event.nbytes()
        step_peak = max(step_peak, live)
        if event.start_ns() <= forward_end:
            forward_peak = step_peak
    return forward_peak, step_peak


def count_step(head: MarginHead, embeddings: torch.Tensor, labels: torch.Tensor, statistics: bool, blocking: str) -> dict:
    """Kernel ops, top-level aten ops and peak bytes (forward, step) of one `head.loss` forward +
    backward with the given row blocking ("cpu" or "cuda"). Gradients are reset first, as
    `zero_grad(set_to_none=True)` leaves them, so every step dispatches the same ops."""
    if blocking not in BLOCKINGS:
        raise ValueError(f"blocking must be one of {BLOCKINGS}, got {blocking!r}")
    embeddings.grad = head.centres.weight.grad = None
    head.workspace.free.clear()  # the (B, C) buffers the loss reuses between steps count in the peak, as in a first step
    with cuda_blocking() if blocking == "cuda" else nullcontext():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function(FORWARD):
                loss, _ = head.loss(embeddings, labels, statistics=statistics)
            loss.backward()
    roots = [event for event in prof.events() if event.cpu_parent is None]
    forward_peak, step_peak = peaks(prof)
    return {
        "kernel_ops": sum(map(kernel_ops, roots)),
        "top_level_ops": sum(map(top_level_ops, roots)),
        "forward_peak_bytes": forward_peak,
        "step_peak_bytes": step_peak,
    }


def measure(head_name: str, scale: str, num_classes: int, batch: int, dim: int, seed: int = 0) -> list[dict]:
    """One row per statistics off/on: the head's figures under both blockings. One head at a time."""
    torch.manual_seed(seed)
    head = build_head(head_name, scale, num_classes, dim)
    embeddings = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(num_classes, (batch,))
    rows = []
    for statistics in (False, True):
        row = {"classes": num_classes, "head": head_name, "scale": scale, "statistics": statistics}
        for blocking in BLOCKINGS:
            row[blocking] = count_step(head, embeddings, labels, statistics, blocking)
        rows.append(row)
    return rows


def check_constant(rows: list[dict]) -> list[str]:
    """The (head, scale, statistics) settings whose CUDA-blocking counts differ between class counts."""
    counts: dict[tuple, set] = {}
    for row in rows:
        key = (row["head"], row["scale"], row["statistics"])
        counts.setdefault(key, set()).add((row["cuda"]["kernel_ops"], row["cuda"]["top_level_ops"]))
    return [f"{head} + {scale}, statistics {'on' if stats else 'off'}: {sorted(found)}"
            for (head, scale, stats), found in counts.items() if len(found) > 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", type=int, default=[10_575, 93_431, 1_000_000])
    parser.add_argument("--heads", nargs="+", default=["cosface", "arcface"], help="conf/head options")
    parser.add_argument("--scales", nargs="+", default=["auto", "dynamic"], help="conf/scale options")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s); "
          f"B = {args.batch}, d = {args.dim}, float32; one head.loss forward + backward\n", flush=True)

    print("| C | head | scale | statistics | kernel ops, CPU blocking | kernel ops, CUDA blocking | "
          "top-level aten ops, CPU | top-level aten ops, CUDA |")
    print("|---:|---|---|---|---:|---:|---:|---:|", flush=True)
    rows = []
    for num_classes in args.classes:
        for head in args.heads:
            for scale in args.scales:
                for row in measure(head, scale, num_classes, args.batch, args.dim):
                    rows.append(row)
                    cpu, cuda = row["cpu"], row["cuda"]
                    print(f"| {num_classes:,} | {head} | {scale} | {'on' if row['statistics'] else 'off'} | "
                          f"{cpu['kernel_ops']:,} | {cuda['kernel_ops']:,} | {cpu['top_level_ops']:,} | "
                          f"{cuda['top_level_ops']:,} |", flush=True)

    print("\nPeak MiB above the step's start, statistics off -> on (forward; whole step); "
          "the forward's increase in units of the (B, C) float32 matrix\n")
    print("| C | head | scale | blocking | forward peak | step peak | forward increase / (B, C) |")
    print("|---:|---|---|---|---:|---:|---:|")
    for off, on in zip(rows[::2], rows[1::2]):
        matrix = 4 * args.batch * off["classes"]
        for blocking in BLOCKINGS:
            a, b = off[blocking], on[blocking]
            increase = b["forward_peak_bytes"] - a["forward_peak_bytes"]
            print(f"| {off['classes']:,} | {off['head']} | {off['scale']} | {blocking} | "
                  f"{a['forward_peak_bytes'] / MIB:,.1f} -> {b['forward_peak_bytes'] / MIB:,.1f} | "
                  f"{a['step_peak_bytes'] / MIB:,.1f} -> {b['step_peak_bytes'] / MIB:,.1f} | {increase / matrix:.3f} |")

    growing = check_constant(rows)
    if growing:
        sys.exit("the CUDA path's op count changes with C:\n  " + "\n  ".join(growing))
    if len(args.classes) > 1:
        print(f"\nCUDA blocking: the same op counts at every C ({', '.join(f'{c:,}' for c in args.classes)}).")


if __name__ == "__main__":
    main()

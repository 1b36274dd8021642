"""The collectives facerec uses, in one place: gathering rows, reductions and decisions over ranks.

Every function is the identity (or the plain local answer) in a single process, so callers never
ask whether a process group exists. Nothing a training step calls synchronises the host with the
device: batches are equal on every rank (the data path replaces a sample that fails to decode rather
than dropping it), so no rank needs to learn another's batch size, and decisions are reduced as
tensors that the caller reads once (one host sync for the whole step, as a GradScaler does).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`tensor` reduced over the ranks in place ("sum", "max" or "min"), and returned."""
    if world()[1] > 1:
        dist.all_reduce(tensor, {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    return tensor


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated in rank order; all ranks hold the same number of rows. No
    gradient (GatherRows is the differentiable version)."""
    world_size = world()[1]
    if world_size == 1:
        return tensor
    tensor = tensor.detach().contiguous()
    out = tensor.new_empty((world_size * tensor.shape[0], *tensor.shape[1:]))
    dist.all_gather_into_tensor(out, tensor)
    return out


def all_gather_uneven(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows concatenated in rank order, where rank r holds sizes[r] rows and every rank
    knows `sizes` already (e.g. the class shards' widths): padded to the largest for the collective."""
    if world()[1] == 1:
        return tensor
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    gathered = all_gather_rows(padded).view(len(sizes), max(sizes), *tensor.shape[1:])
    return torch.cat([part[:size] for part, size in zip(gathered, sizes)])


def gather_rows_to_rank0(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows concatenated in rank order in rank 0's host memory, where rank r holds
    sizes[r] rows; every other rank sends its rows to rank 0 and gets `tensor` itself back, so no
    other rank's host holds the whole. For checkpoints, which rank 0 alone writes.

    Point-to-point after the group's first collective, one shard in flight at a time: rank 0
    receives a CPU tensor straight into its place in the result (gloo) and a device tensor into one
    staging buffer on that device (NCCL has no CPU tensors) before copying it to the host, so a
    device holds its own rows and at most one other shard. No gradient."""
    rank, world_size = world()
    if len(sizes) != world_size or len(tensor) != sizes[rank]:
        raise ValueError(f"rank {rank} of {world_size} holds {len(tensor)} rows; sizes per rank: {sizes}")
    if world_size == 1:
        return tensor
    rows = tensor.detach().contiguous()
    if rank != 0:
        if len(rows):
            _point_to_point(dist.isend, rows, 0)
        return tensor
    full = rows.new_empty((sum(sizes), *rows.shape[1:]), device="cpu")
    full[: sizes[0]] = rows
    staging = None if rows.device.type == "cpu" else rows.new_empty((max(sizes[1:]), *rows.shape[1:]))
    start = sizes[0]
    for source, size in enumerate(sizes[1:], start=1):
        if size and staging is None:
            _point_to_point(dist.irecv, full[start : start + size], source)
        elif size:
            _point_to_point(dist.irecv, staging[:size], source)
            full[start : start + size] = staging[:size]
        start += size
    return full


def _point_to_point(op, tensor: torch.Tensor, peer: int) -> None:
    """One send or receive (`op`: dist.isend or dist.irecv), waited for. Batched, although alone:
    NCCL then uses the group's communicator, where a plain send or recv creates one per pair of ranks."""
    for work in dist.batch_isend_irecv([dist.P2POp(op, tensor, peer)]):
        work.wait()


class GatherRows(torch.autograd.Function):
    """`all_gather_rows` with a gradient. Every rank's loss depends on every rank's rows, so backward
    sums the ranks' gradients and returns this rank's rows times R: DDP's averaging of the backbone's
    gradients then divides the R back out."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        ctx.rows = tensor.shape[0]
        return all_gather_rows(tensor)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rank, world_size = world()
        grad = all_reduce(grad.contiguous())
        return grad[rank * ctx.rows : (rank + 1) * ctx.rows] * world_size


def gather_rows_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    return GatherRows.apply(tensor) if world()[1] > 1 else tensor


def all_gather_object(obj) -> list:
    """Every rank's (picklable) object, in rank order: for rare, small exchanges such as the RNG
    states in a checkpoint, never per step."""
    world_size = world()[1]
    if world_size == 1:
        return [obj]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_ranks(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor that is true where `flag` is true on every rank (no barrier, no host sync)."""
    return all_reduce(flag.to(torch.int32), "min").bool()


def any_rank(flag: torch.Tensor) -> torch.Tensor:
    """A boolean tensor that is true where `flag` is true on at least one rank."""
    return all_reduce(flag.to(torch.int32), "max").bool()

"""Partial FC: a margin head whose class centres are sharded over the DDP ranks (An et al., CVPR 2022).

With C in the millions the classifier W (C, d), its gradient and its optimizer state no longer
fit one GPU. Here each of the R ranks holds C/R rows of W (split as evenly as possible: the first
C mod R ranks hold one more). Every step the ranks all-gather the embeddings and labels of the
global batch (N samples; ranks may hold different batch sizes), each computes the cosines of all
N samples to its own classes, and the softmax cross-entropy is reduced over ranks: the row maxima
by an all-reduce MAX, the sums of exponentials by an all-reduce SUM. No rank ever holds a (N, C)
matrix or another rank's rows.

`sample_rate` < 1 keeps per step only that fraction of each shard's classes: every class with a
sample in the global batch (the positives) plus randomly drawn negatives. Softmax, margin and
scale then see the sampled classes only (AdaCos's B_avg too).

The margin (any `MarginHead`'s target function f) and the scale policy are the ones of the head
this wraps; an adaptive policy gets its statistics over the global batch and all shards
(`DynamicScale.nontarget_log_sums` per shard, combined across ranks, then `update`).

Gradients: the class centres' gradient is exact and local, so the shard must be kept out of
DDP's gradient all-reduce (the LightningModule does that) and its optimizer state stays on its
rank. The embeddings get R x dL/de: DDP averages the backbone's gradients over the R ranks,
whereas the gradient of the global-batch loss L is their sum.

Checkpoints hold the full (C, d) matrix, as a `MarginHead`'s do (`state_dict` gathers the rows,
loading keeps this rank's): a checkpoint resumes on any number of ranks, with or without sharding.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from facerec.heads.angles import COS_EPS, angle
from facerec.heads.margins import MarginHead, check_embeddings, cosine_grads, cosines, target_logit_and_slope
from facerec.heads.scale import ScalePolicy


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first class, number of classes) held by `rank`: C split as evenly as possible."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if _world()[1] > 1:
        dist.all_reduce(tensor, op)
    return tensor


def _all_gather_rows(tensor: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Every rank's rows concatenated in rank order; rank r contributes sizes[r] rows (padded to
    the largest for the collective, which needs equal shapes)."""
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)])


def _batch_sizes(batch: int, device: torch.device) -> list[int]:
    """Every rank's number of samples this step."""
    return _all_gather_rows(torch.tensor([batch], device=device), [1] * _world()[1]).tolist()


class _GatherBatch(torch.autograd.Function):
    """All ranks' rows; backward sums every rank's gradient (each rank's loss depends on every
    sample) and returns this rank's rows times R, the factor DDP's averaging divides out."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather_rows(tensor, sizes)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grad = _all_reduce(grad.contiguous())
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None


def _softmax_over_ranks_(logits: torch.Tensor) -> torch.Tensor:
    """Turn (N, m) logits, this rank's columns of an (N, sum of m) softmax, into their probabilities
    in place; returns the (N,) log normaliser ln sum_j exp(logit_ij) over all ranks' columns."""
    row_max = logits.amax(dim=1) if logits.shape[1] else logits.new_full((len(logits),), -math.inf)
    row_max = _all_reduce(row_max, dist.ReduceOp.MAX)
    row_max = torch.where(torch.isfinite(row_max), row_max, 0)  # a row with no finite logit anywhere
    logits.sub_(row_max.unsqueeze(1)).exp_()
    total = _all_reduce(logits.sum(dim=1))
    logits.div_(total.unsqueeze(1))
    return total.log() + row_max


class ShardedMarginLoss(torch.autograd.Function):
    """Mean softmax cross-entropy of the margin logits of the global batch, from this rank's columns.

    x_hat (N, d): the global batch's unit embeddings; weight (m, d): this rank's (sampled) class
    centres; labels (N,): the column of each sample's class in `weight`, -1 where another rank
    holds it. Forward keeps one (N, m) buffer (cosines -> logits -> probabilities); backward
    turns it into the logits' gradient and goes on as `MarginLogits.backward`.
    """

    @staticmethod
    def forward(ctx, x_hat, weight, labels, head: PartialFC, statistics: dict | None):
        norms, cos = cosines(x_hat, weight)
        rows = (labels >= 0).nonzero().squeeze(1)
        columns = labels[rows]
        target = _all_reduce(x_hat.new_zeros(len(x_hat)).index_put_((rows,), cos[rows, columns]))
        target_logit, target_slope = target_logit_and_slope(head.target_logit, target)
        s = head.step_scale(cos, labels, target)  # the policy sees the cosines before the margin
        if statistics is not None:
            nearest_other, angle_sum = _nontarget_angles(cos, rows, columns)
        cos[rows, columns] = target_logit[rows]
        log_normaliser = _softmax_over_ranks_(cos.mul_(s))
        log_p_target = s * target_logit - log_normaliser
        if statistics is not None:
            statistics.update(_statistics(target, log_p_target, nearest_other, angle_sum, weight.shape[0]))
        ctx.save_for_backward(x_hat, weight, norms, cos, rows, columns, target_slope[rows])
        ctx.s = s
        return -log_p_target.mean()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: torch.Tensor):
        x_hat, weight, norms, probabilities, rows, columns, target_slope = ctx.saved_tensors
        # dL/dlogit_ij = (p_ij - [j = y_i]) / N; then, as in MarginLogits, times s / |w_j| and
        # f'(cos theta_y) on the target column, in place in the probabilities' buffer.
        grad_raw = probabilities
        grad_raw[rows, columns] -= 1
        grad_raw.mul_(grad_loss * ctx.s / len(x_hat)).div_(norms)
        grad_raw[rows, columns] *= target_slope
        return (*cosine_grads(grad_raw, x_hat, weight, norms), None, None, None)


def _nontarget_angles(cos: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor):
    """Per sample: the largest cosine to another class among these columns, and the sum of the
    angles (radians) to the other classes among them."""
    other = cos.clone()
    other[rows, columns] = -math.inf
    nearest = other.amax(dim=1) if other.shape[1] else other.new_full((len(other),), -math.inf)
    other[rows, columns] = 0.0  # acos(0) = pi / 2, subtracted below
    angle_sum = other.clamp_(-1 + COS_EPS, 1 - COS_EPS).acos_().sum(dim=1)
    angle_sum[rows] -= math.pi / 2
    return nearest, angle_sum


@torch.no_grad()
def _statistics(target, log_p_target, nearest_other, angle_sum, columns: int) -> dict[str, torch.Tensor]:
    """The diagnostics of `angular_statistics`, over the global batch and all ranks' columns."""
    nearest_other = _all_reduce(nearest_other, dist.ReduceOp.MAX)
    totals = _all_reduce(torch.stack([angle_sum.sum(), angle_sum.new_tensor(float(columns))]))
    return {
        "theta_med": torch.rad2deg(angle(target)).median(),
        "theta_nontarget": torch.rad2deg(totals[0] / (len(target) * (totals[1] - 1))),
        "p_target": log_p_target.exp().median(),
        "top1": (target > nearest_other).float().mean(),
    }


class PartialFC(nn.Module):
    """A margin head whose class centres are sharded over the ranks; `loss(embeddings, labels)`.

    Built from a `MarginHead`, whose margin (target function) and scale policy it uses and whose
    class centres it takes over (the head is left without them). Until `shard()` runs (the
    LightningModule calls it once the process group exists) it holds all C rows and computes
    exactly what its head computes; a single process needs no process group.
    """

    def __init__(self, head: MarginHead, sample_rate: float = 1.0):
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sharding.sample_rate must lie in (0, 1], got {sample_rate}")
        scale = head.scale
        if type(scale).forward is not ScalePolicy.forward and not hasattr(scale, "nontarget_log_sums"):
            raise TypeError(
                f"{type(scale).__name__} adapts s to each batch but has no per-shard statistics "
                "(nontarget_log_sums / update, see DynamicScale), so it cannot run class-sharded"
            )
        self.embedding_size = head.embedding_size
        self.num_classes = head.num_classes
        self.sample_rate = float(sample_rate)
        self.margin = f"{type(head).__name__}({head.extra_repr()})"
        self.target_logit = head.target_logit  # the margin's f; the head keeps only that
        self.scale = scale
        self.weight = head.weight
        del head.weight
        self.rank, self.world_size, self.class_start = 0, 1, 0
        self.sampled: torch.Tensor | None = None  # class ids used by the last sampled step

    def shard(self) -> None:
        """Keep only this rank's rows of the class centres (a no-op in a single process)."""
        rank, world_size = _world()
        if (rank, world_size) == (self.rank, self.world_size):
            return
        if self.world_size != 1:
            raise RuntimeError(f"{type(self).__name__} is already sharded over {self.world_size} ranks")
        start, count = shard_range(self.num_classes, world_size, rank)
        self.weight = nn.Parameter(self.weight.detach()[start : start + count].clone())
        self.rank, self.world_size, self.class_start = rank, world_size, start

    # ------------------------------------------------------------------ training
    def loss(
        self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(mean cross-entropy over the global batch, diagnostics if `statistics`). Every rank
        calls it in the same step, with its own batch (sizes may differ)."""
        check_embeddings(self, embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            # float32 logits under autocast; float64 inputs (tests) stay float64
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            x_hat = F.normalize(embeddings.to(dtype))
            labels = labels.view(-1).long()
            if self.world_size > 1:
                sizes = _batch_sizes(len(labels), labels.device)
                x_hat = _GatherBatch.apply(x_hat, sizes, self.rank)
                labels = _all_gather_rows(labels, sizes)
            local = labels - self.class_start
            local[(local < 0) | (local >= len(self.weight))] = -1
            weight = self.weight.to(dtype)
            if self.sample_rate < 1:
                index = self._sample(local)
                weight = weight[index]
                held = local >= 0
                local[held] = torch.searchsorted(index, local[held])
            stats = {} if statistics else None
            loss = ShardedMarginLoss.apply(x_hat, weight, local, self, stats)
        return loss, stats or {}

    def _sample(self, local_labels: torch.Tensor) -> torch.Tensor:
        """Sorted rows of this shard to use: all positives, then random negatives up to the rate."""
        num_local = len(self.weight)
        positives = local_labels[local_labels >= 0].unique()
        keep = max(int(self.sample_rate * num_local), len(positives))
        score = torch.rand(num_local, device=self.weight.device)
        score[positives] = 2.0  # above every random score: positives are always kept
        index = score.topk(keep).indices.sort().values
        self.sampled = index + self.class_start
        return index

    def step_scale(self, cosine: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor):
        """The s of this step. cosine: this rank's (N, m) columns; labels: their target column or -1;
        target_cosine: (N,) over all ranks."""
        policy = self.scale
        if not hasattr(policy, "nontarget_log_sums"):
            return policy.value  # fixed, auto, auto_margin: constant during the step
        log_sums = policy.nontarget_log_sums(cosine, labels).unsqueeze(1)
        return policy.update(_softmax_over_ranks_(log_sums), target_cosine)

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) scaled cosine logits of this rank's embeddings to all classes, without margin
        (gathers all columns: for inspection at small C). Training calls `loss`."""
        if labels is not None:
            raise TypeError(f"{type(self).__name__} computes its cross-entropy across ranks: call head.loss(embeddings, labels)")
        check_embeddings(self, embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            x_hat = F.normalize(embeddings.to(dtype))
            if self.world_size == 1:
                return cosines(x_hat, self.weight.to(dtype))[1].mul_(self.scale.value)
            sizes = _batch_sizes(len(x_hat), x_hat.device)
            columns = [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]
            cos = cosines(_all_gather_rows(x_hat, sizes), self.weight.to(dtype))[1]
            start = sum(sizes[: self.rank])
            return _all_gather_rows(cos.T.contiguous(), columns).T[start : start + len(x_hat)].mul_(self.scale.value)

    # --------------------------------------------------------------- checkpoints
    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The full (C, ...) tensor, on the CPU of every rank, from each rank's (count, ...) rows
        (one shard in flight at a time, so a device never holds more than its own twice)."""
        if self.world_size == 1:
            return rows
        full = rows.new_empty((self.num_classes, *rows.shape[1:]), device="cpu")
        for rank in range(self.world_size):
            start, count = shard_range(self.num_classes, self.world_size, rank)
            part = rows.detach().contiguous() if rank == self.rank else rows.new_empty((count, *rows.shape[1:]))
            dist.broadcast(part, src=rank)
            full[start : start + count] = part.cpu()
        return full

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (C, ...) tensor (a copy)."""
        if len(full) != self.num_classes:
            raise ValueError(f"expected {self.num_classes} rows (one per class), got a tensor of shape {tuple(full.shape)}")
        return full[self.class_start : self.class_start + len(self.weight)].clone()

    def gather_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """In a checkpoint's optimizer states, make the class centres' per-row state (momentum,
        Adam's moments) full (C, d); `param_index`: the centres' key in the optimizer state."""
        _map_rows(optimizer_states, param_index, self.weight.shape, self.gather_rows)

    def shard_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """The inverse on load: keep this rank's rows of the full per-row state."""
        _map_rows(optimizer_states, param_index, (self.num_classes, *self.weight.shape[1:]), self.local_rows)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.gather_rows(destination[prefix + "weight"])

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "weight"
        if key in state_dict and len(state_dict[key]) == self.num_classes:
            state_dict[key] = self.local_rows(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        shard = f"classes [{self.class_start}, {self.class_start + len(self.weight)}) on rank {self.rank} of {self.world_size}"
        return f"{self.margin}, sample_rate={self.sample_rate}, {shard}"


def _map_rows(optimizer_states: list[dict], param_index: int, shape: torch.Size | tuple, rows) -> None:
    """Apply `rows` to the state tensors of that shape (one row per class) of the parameter at
    `param_index`; scalars such as Adam's step stay as they are."""
    for optimizer_state in optimizer_states:
        entry = optimizer_state["state"].get(param_index)
        if entry:  # replaced, not changed: a state dict shares its entries with the live optimizer
            optimizer_state["state"][param_index] = {
                key: rows(value) if torch.is_tensor(value) and value.shape == shape else value
                for key, value in entry.items()
            }

"""Partial FC (An et al., CVPR 2022): a head's class centres sharded over the DDP ranks.

Each of the R ranks holds C/R classes (`shard_range`); the loss gathers the global batch and reduces
the softmax over the ranks, so no rank holds an (N, C) matrix or another rank's rows, and the shard
stays out of DDP's all-reduce (its gradient is complete on its rank). `sample_rate` < 1 keeps per
step only that fraction of each shard's classes: every class of the global batch plus random others
(softmax, margin and the dynamic scale then see those only; a loss summed over the classes, the
sigmoid heads', weights each random one by the inverse of its chance of being drawn:
`column_weights`). Any margin and any scale policy;
sample_rate = 1 is exact model parallelism. Until `shard` runs (once the process group exists), and
in a single process, the centres behave as the dense ones, with sampling.

Checkpoints hold the full (C K, d) matrix whatever the sharding: `state_dict` gathers the rows on
rank 0, which writes the file, and gives each other rank its own rows; loading the full matrix keeps
this rank's, so a checkpoint resumes on any number of ranks, sharded or not. The per-row optimizer
state (momentum, Adam's moments) follows the same way (`gather_optimizer_state`,
`shard_optimizer_state`).
"""
from __future__ import annotations

import torch
from torch import nn

from facerec import distributed
from facerec.heads.centres import ClassCentres, cosines


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first class, number of classes) held by `rank`: C split as evenly as possible."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


class PartialFC(ClassCentres):
    """Class centres sharded over the ranks (see the module docstring)."""

    def __init__(self, num_classes: int, centres_per_class: int, embedding_size: int, sample_rate: float = 1.0):
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sharding.sample_rate must lie in (0, 1], got {sample_rate}")
        super().__init__(num_classes, centres_per_class, embedding_size)
        self.sample_rate = float(sample_rate)
        self.rank, self.world_size, self.class_start = 0, 1, 0
        self.sampled: torch.Tensor | None = None  # class ids used by the last sampled step
        self._draw: tuple[torch.Tensor, torch.Tensor, int] | None = None  # the last draw: (scores, kept classes, shard size)

    @property
    def sees_global_batch(self) -> bool:
        return self.world_size > 1

    # ------------------------------------------------------------ the training step
    def global_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return embeddings, labels
        return distributed.gather_rows_with_grad(embeddings), distributed.all_gather_rows(labels)

    def batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if self.world_size > 1 else super().batch_rows(rows)

    def reduce_over_shards(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return distributed.all_reduce(tensor, op) if self.world_size > 1 else tensor

    def log_sum_exp_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return values
        row_max = self.reduce_over_shards(values.clone(), "max")
        return self.reduce_over_shards((values - row_max).exp()).log() + row_max

    def step_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """With sample_rate < 1, the positives and random negatives of this shard."""
        local = labels - self.class_start
        num_local = len(self.weight) // self.centres_per_class
        local = torch.where((local >= 0) & (local < num_local), local, -1)
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.sample_rate >= 1:
            return local, weight
        index = self._sample(local, num_local)
        k = self.centres_per_class
        rows = (index.unsqueeze(1) * k + torch.arange(k, device=index.device)).view(-1)
        remapped = torch.searchsorted(index, local.clamp(min=0))
        return torch.where(local >= 0, remapped, -1), weight[rows]

    def column_weights(self) -> torch.Tensor | None:
        return self.sampled_weights if self.sample_rate < 1 else None

    def _sample(self, local_labels: torch.Tensor, num_local: int) -> torch.Tensor:
        """Sorted classes of this shard to use: every positive, then random negatives. The count is
        fixed, max(sample_rate x shard, batch size), so no step waits to learn how many positives
        there are (a host sync); it is at least the number of positives.

        Each of the shard's n - P classes that no sample of the batch holds is drawn with the same
        chance (keep - P) / (n - P) (a uniform draw of keep - P of them); the positives always are.
        `sampled_weights` is 1 for a positive and the inverse of that chance for a drawn class, so a
        sum over the drawn classes weighted by it has the full sum as its expectation."""
        keep = min(num_local, max(int(self.sample_rate * num_local), len(local_labels)))
        score = torch.rand(num_local, device=self.weight.device)
        positive = torch.where(local_labels >= 0, 2.0, -1.0)  # above every random score: always kept
        score.scatter_reduce_(0, local_labels.clamp(min=0), positive, "amax")
        index = score.topk(keep).indices.sort().values
        self._draw = (score, index, num_local)  # for sampled_weights, which only a loss summed over classes asks for
        self.sampled = index + self.class_start
        return index

    @property
    def sampled_weights(self) -> torch.Tensor | None:
        """The last draw's column weights (see `_sample`): computed when asked, so the softmax heads,
        which never ask, pay nothing for them."""
        if self._draw is None:
            return None
        score, index, num_local = self._draw
        is_positive = score[index] > 1.5
        positives = is_positive.sum()  # a tensor: no host sync
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        return torch.where(is_positive, 1.0, (num_local - positives).to(dtype) / (len(index) - positives).clamp(min=1))

    def cosines(self, x_hat: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return super().cosines(x_hat)
        rows = len(x_hat)  # every rank's rows against this shard, then all shards' columns
        cos = self.closest(cosines(distributed.all_gather_rows(x_hat), self.weight.to(x_hat.dtype))[1])
        columns = [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]
        return distributed.all_gather_uneven(cos.T.contiguous(), columns).T[self.rank * rows : (self.rank + 1) * rows]

    # ------------------------------------------------------------ sharding, checkpoints
    def shard(self) -> list[str]:
        rank, world_size = distributed.world()
        if (rank, world_size) == (self.rank, self.world_size):
            return ["weight"] if self.world_size > 1 else []
        if self.world_size != 1:
            raise RuntimeError(f"{type(self).__name__} is already sharded over {self.world_size} ranks")
        start, count = shard_range(self.num_classes, world_size, rank)
        k = self.centres_per_class
        self.weight = nn.Parameter(self.weight.detach()[start * k : (start + count) * k].clone())
        self.rank, self.world_size, self.class_start = rank, world_size, start
        return ["weight"] if world_size > 1 else []

    def gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """The full (C K, ...) tensor in rank 0's host memory from each rank's rows (C K, ...)/R;
        every other rank sends its rows there and gets `rows` back (only rank 0 writes checkpoints,
        so only its host holds the full tensor). One shard in flight at a time: a device never
        holds more than its own rows twice. Unsharded: `rows` as they are."""
        if self.world_size == 1:
            return rows
        k = self.centres_per_class
        sizes = [shard_range(self.num_classes, self.world_size, rank)[1] * k for rank in range(self.world_size)]
        return distributed.gather_rows_to_rank0(rows, sizes)

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a full (C K, ...) tensor (a copy)."""
        self._check_full(full)
        k = self.centres_per_class
        return full[self.class_start * k : self.class_start * k + len(self.weight)].clone()

    def gather_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """Full on rank 0, which writes the file (the other ranks keep their own rows, as in `state_dict`)."""
        if self.world_size > 1:
            _map_rows(optimizer_states, param_index, self.weight.shape, self.gather_rows)

    def shard_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """A state of this rank's rows only stays as it is."""
        if self.world_size > 1:
            full = (self.num_classes * self.centres_per_class, *self.weight.shape[1:])
            _map_rows(optimizer_states, param_index, full, self.local_rows)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.gather_rows(destination[prefix + "weight"])

    def _load_from_state_dict(self, state_dict, prefix, *args) -> None:
        key = prefix + "weight"
        if self.world_size > 1 and key in state_dict and len(state_dict[key]) == self.num_classes * self.centres_per_class:
            state_dict[key] = self.local_rows(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        end = self.class_start + len(self.weight) // self.centres_per_class
        return (
            f"{super().extra_repr()}, sample_rate={self.sample_rate}, "
            f"classes [{self.class_start}, {end}) on rank {self.rank} of {self.world_size}"
        )


def _map_rows(optimizer_states: list[dict], param_index: int, shape: torch.Size | tuple, rows) -> None:
    """Apply `rows` to the state tensors of that shape (one row per centre) of the parameter at
    `param_index`; scalars such as Adam's step stay as they are."""
    for optimizer_state in optimizer_states:
        entry = optimizer_state["state"].get(param_index)
        if entry:  # replaced, not changed: a state dict shares its entries with the live optimizer
            optimizer_state["state"][param_index] = {
                key: rows(value) if torch.is_tensor(value) and value.shape == tuple(shape) else value
                for key, value in entry.items()
            }

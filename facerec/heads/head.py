"""The head contract: class centres, a margin and a scale policy; `loss(embeddings, labels)` trains it.

Every head, dense or class-sharded, trains through `loss`, which returns the mean cross-entropy of
the batch and, when asked, the batch diagnostics (over the global batch under any DDP setup). The
LightningModule calls only the methods of this class and never asks which kind of head it holds.

A dense head holds all C classes; under DDP each rank computes the loss of its own batch and DDP
averages the gradients. A class-sharded head (Partial FC, `partial_fc(head)`) holds C/R classes per
rank: it gathers the global batch, computes the softmax over all ranks' columns and keeps its shard
out of DDP's all-reduce (its gradient is complete on its rank). Both run the same
`MarginCrossEntropy`; the dense head is its one-shard case.

A margin subclass defines `target_logit(cos_target, per_sample)`, and where it needs them the
per-sample inputs of the margin (`margin_inputs`: AdaFace's standardised norm, MagFace's norm,
ElasticFace's drawn margins), a change to the non-target logits (`nontarget_logits`,
CurricularFace), K centres per class (`centres_per_class`, Sub-center ArcFace) or a regulariser of
the embedding norms (`regulariser`, MagFace). `per_sample=None` is the nominal margin, the one scale
policies evaluate when they are bound.

Checkpoints hold the full (C K, d) matrix whatever the sharding (`state_dict` gathers the rows on
rank 0, which writes the file, and gives each other rank its own rows; loading the full matrix keeps
this rank's), so a checkpoint resumes on any number of ranks, sharded or not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from facerec import distributed
from facerec.heads.margin_loss import MarginCrossEntropy, cosines
from facerec.heads.scale import ScalePolicy


def shard_range(num_classes: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first class, number of classes) held by `rank`: C split as evenly as possible."""
    base, extra = divmod(num_classes, world_size)
    return base * rank + min(rank, extra), base + (rank < extra)


class MarginHead(nn.Module):
    """Class centres W (C K, d), a margin and a scale policy.

    Subclasses validate their margin parameters and pass them here as keywords; they become
    attributes before the scale policy is bound, because margin-aware policies evaluate
    `target_logit` when they are bound.
    """

    centres_per_class = 1
    changes_nontargets = False  # True: nontarget_logits changes the non-target logits

    def __init__(self, embedding_size: int, num_classes: int, scale: ScalePolicy, **margin):
        super().__init__()
        if embedding_size < 1 or num_classes < 2:
            raise ValueError(
                f"head needs embedding_size >= 1 and num_classes >= 2, got {embedding_size}, {num_classes}"
            )
        self.embedding_size = int(embedding_size)
        self.num_classes = int(num_classes)
        self.margin_names = tuple(margin)
        for name, value in margin.items():
            setattr(self, name, value)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.centres_per_class, self.embedding_size))
        nn.init.normal_(self.weight, std=0.01)
        self.scale = scale
        scale.bind(self)
        # class sharding (partial_fc): off until enabled; shard() splits the rows over the ranks
        self.sharded, self.sample_rate = False, 1.0
        self.rank, self.world_size, self.class_start = 0, 1, 0
        self.sampled: torch.Tensor | None = None  # class ids used by the last sampled step

    # ------------------------------------------------------------------ the margin
    def target_logit(self, cos_target: torch.Tensor, per_sample: torch.Tensor | None = None) -> torch.Tensor:
        """f(cos theta_y) for the target class; per_sample: the margin's inputs, None for the nominal margin."""
        raise NotImplementedError

    def margin_inputs(self, norms: torch.Tensor, labels: torch.Tensor, update: bool) -> torch.Tensor | None:
        """The margin's per-sample inputs from the embedding norms (N,) of the batch this head sees;
        `update`: a training step (EMA buffers and random draws advance)."""
        return None

    def nontarget_logits(self, cos: torch.Tensor, target: torch.Tensor, update: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(changed (N, m) logits, their slope in cos) for heads with `changes_nontargets`; target: the
        (N,) target cosines; `update`: a training step (EMA buffers advance)."""
        raise NotImplementedError

    def regulariser(self, norms: torch.Tensor) -> torch.Tensor | None:
        """A loss term on this rank's embedding norms (N,), added to the cross-entropy; None: none."""
        return None

    # --------------------------------------------------------------- collectives
    def reduce_over_shards(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce a per-shard quantity over the ranks holding the other classes (none for a dense head)."""
        return distributed.all_reduce(tensor, op) if self.world_size > 1 else tensor

    def batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample rows of the global batch: a sharded head already sees it, a dense head under DDP
        gathers every rank's rows (equal batches)."""
        return rows if self.world_size > 1 else distributed.all_gather_rows(rows)

    def step_scale(self, cosine: torch.Tensor, labels: torch.Tensor, target_cosine: torch.Tensor):
        """The s of this step. cosine: this process's (N, m) columns before the margin; labels: their
        target column or -1; target_cosine: (N,) over all shards."""
        policy = self.scale
        if not policy.adaptive:
            return policy.value
        log_sums = policy.nontarget_log_sums(cosine, labels)
        if self.world_size > 1:  # log-sum-exp over the shards' columns
            row_max = self.reduce_over_shards(log_sums.clone(), "max")
            log_sums = self.reduce_over_shards((log_sums - row_max).exp()).log() + row_max
        rows = self.batch_rows(torch.stack([log_sums, target_cosine.detach().to(log_sums.dtype)], dim=1))  # the whole batch
        return policy.update(rows[:, 0], rows[:, 1])

    # ------------------------------------------------------------------ training
    def loss(self, embeddings: torch.Tensor, labels: torch.Tensor, statistics: bool = False) -> tuple[torch.Tensor, dict]:
        """(mean cross-entropy of the batch, diagnostics if `statistics`). Under DDP every rank calls
        it in the same step with its own batch; all ranks hold the same batch size."""
        check_embeddings(self, embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            # float32 logits under autocast; float64 inputs (tests) stay float64
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            labels = labels.view(-1).long()
            norms = torch.linalg.vector_norm(embeddings, dim=1)
            regulariser = self.regulariser(norms)  # this rank's samples
            if self.world_size > 1:  # the global batch's embeddings, and their norms
                embeddings = distributed.gather_rows_with_grad(embeddings)
                labels = distributed.all_gather_rows(labels)
                norms = torch.linalg.vector_norm(embeddings, dim=1)
            x_hat = embeddings / norms.clamp_min(1e-12).unsqueeze(1)
            per_sample = self.margin_inputs(norms, labels, update=True)
            local, weight = self._local_problem(labels)
            stats = {} if statistics else None
            loss = MarginCrossEntropy.apply(x_hat, weight, local, per_sample, self, stats)
            if regulariser is not None:
                loss = loss + regulariser
            if statistics:
                stats.update(norm_statistics(self.batch_rows(norms.detach())))
                if regulariser is not None:
                    stats["regulariser"] = distributed.all_reduce(regulariser.detach().clone()) / distributed.world()[1]
        return loss, stats or {}

    def _local_problem(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each sample's column among the classes used here, -1 where another rank holds it; those
        classes' centres). With sample_rate < 1, the positives and random negatives of this shard."""
        local = labels - self.class_start
        num_local = len(self.weight) // self.centres_per_class
        local = torch.where((local >= 0) & (local < num_local), local, -1)
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.sample_rate >= 1:
            return local, weight
        index = self._sample(local, num_local)
        rows = (index.unsqueeze(1) * self.centres_per_class + torch.arange(self.centres_per_class, device=index.device)).view(-1)
        remapped = torch.searchsorted(index, local.clamp(min=0))
        return torch.where(local >= 0, remapped, -1), weight[rows]

    def _sample(self, local_labels: torch.Tensor, num_local: int) -> torch.Tensor:
        """Sorted classes of this shard to use: every positive, then random negatives. The count is
        fixed, max(sample_rate x shard, batch size), so no step waits to learn how many positives
        there are (a host sync); it is at least the number of positives."""
        keep = min(num_local, max(int(self.sample_rate * num_local), len(local_labels)))
        score = torch.rand(num_local, device=self.weight.device)
        positive = torch.where(local_labels >= 0, 2.0, -1.0)  # above every random score: always kept
        score.scatter_reduce_(0, local_labels.clamp(min=0), positive, "amax")
        index = score.topk(keep).indices.sort().values
        self.sampled = index + self.class_start
        return index

    # ----------------------------------------------------------------- inference
    def cosine(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(B, C) float32 cosines to every class (the closest centre of each), all ranks' classes."""
        check_embeddings(self, embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            dtype = torch.promote_types(embeddings.dtype, torch.float32)
            x_hat = F.normalize(embeddings.to(dtype))
            if self.world_size > 1:  # every rank's rows against this shard, then all shards' columns
                x_hat = distributed.all_gather_rows(x_hat)
            cos = self.closest_centres(cosines(x_hat, self.weight.to(dtype))[1])
            if self.world_size == 1:
                return cos
            columns = [shard_range(self.num_classes, self.world_size, r)[1] for r in range(self.world_size)]
            rows = len(embeddings)
            return distributed.all_gather_uneven(cos.T.contiguous(), columns).T[self.rank * rows : (self.rank + 1) * rows]

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """(B, C) scaled logits: with labels the margin logits at the head's current state (autograd,
        for inspection: nothing advances, training calls `loss`), without labels the scaled cosines."""
        if labels is None:
            return self.cosine(embeddings).mul_(self.scale.value)
        if self.world_size > 1:
            raise TypeError(f"{type(self).__name__} is class-sharded: call head.loss(embeddings, labels)")
        check_embeddings(self, embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
            labels = labels.view(-1, 1).long()
            cos = self.closest_centres(F.normalize(embeddings) @ F.normalize(self.weight.to(embeddings.dtype)).T)
            per_sample = self.margin_inputs(torch.linalg.vector_norm(embeddings, dim=1), labels.view(-1), update=False)
            target = cos.gather(1, labels).squeeze(1)
            if self.changes_nontargets:
                cos = self.nontarget_logits(cos, target)[0]
            return cos.scatter(1, labels, self.target_logit(target, per_sample).unsqueeze(1)) * self.scale.value

    def closest_centres(self, cos: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines to each class's closest centre, from the (B, C K) cosines to every centre."""
        if self.centres_per_class == 1:
            return cos
        return cos.view(len(cos), -1, self.centres_per_class).amax(dim=2)

    def target_cosine(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """(B,) float32 cosine to the own class (its closest centre), without the (B, C) matrix."""
        check_embeddings(self, embeddings)
        centres = self.weight.float().view(self.num_classes, self.centres_per_class, -1)[labels.view(-1)]
        cos = (F.normalize(centres, dim=2) @ F.normalize(embeddings.float()).unsqueeze(2)).squeeze(2)
        return cos.amax(dim=1)

    # ----------------------------------------------------------- class sharding
    def enable_sharding(self, sample_rate: float = 1.0) -> None:
        """Shard the class centres over the DDP ranks once the process group exists (`shard`)."""
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sharding.sample_rate must lie in (0, 1], got {sample_rate}")
        self.sharded, self.sample_rate = True, float(sample_rate)

    def shard(self) -> list[str]:
        """Keep only this rank's rows (the LightningModule calls it once the process group exists);
        returns the parameters DDP must leave out of its all-reduce. A no-op for a dense head."""
        rank, world_size = distributed.world()
        if not self.sharded or (rank, world_size) == (self.rank, self.world_size):
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
        expected = self.num_classes * self.centres_per_class
        if len(full) != expected:
            raise ValueError(f"expected {expected} rows (one per class centre), got a tensor of shape {tuple(full.shape)}")
        k = self.centres_per_class
        return full[self.class_start * k : self.class_start * k + len(self.weight)].clone()

    def gather_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """In a checkpoint's optimizer states, make the centres' per-row state (momentum, Adam's
        moments) full on rank 0, which writes the file (the other ranks keep their own rows, as in
        `state_dict`); `param_index`: the centres' key in the optimizer state. No-op when dense."""
        if self.world_size > 1:
            _map_rows(optimizer_states, param_index, self.weight.shape, self.gather_rows)

    def shard_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """The inverse on load: keep this rank's rows of the full per-row state (a state of this
        rank's rows only stays as it is)."""
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
        margin = "".join(f", {name}={getattr(self, name)}" for name in self.margin_names)
        text = f"embedding_size={self.embedding_size}, num_classes={self.num_classes}{margin}"
        if self.sharded:
            text += f", partial_fc(sample_rate={self.sample_rate}, classes [{self.class_start}, "
            text += f"{self.class_start + len(self.weight) // self.centres_per_class}) on rank {self.rank} of {self.world_size})"
        return text


def partial_fc(head: MarginHead, sample_rate: float = 1.0) -> MarginHead:
    """Partial FC (An et al., CVPR 2022): `head` with its class centres sharded over the DDP ranks.

    Each of the R ranks holds C/R classes; the global batch is gathered and the softmax reduced
    over ranks, so no rank holds an (N, C) matrix or another rank's rows. `sample_rate` < 1 keeps
    per step only that fraction of each shard's classes: every class of the global batch plus random
    others (softmax, margin and the dynamic scale then see those only). Any margin and any scale
    policy; sample_rate = 1 is exact model parallelism.
    """
    head.enable_sharding(sample_rate)
    return head


@torch.no_grad()
def norm_statistics(norms: torch.Tensor) -> dict[str, torch.Tensor]:
    """Mean and std of the embedding norm over the batch (quality: AdaFace and MagFace read it)."""
    return {"norm_mean": norms.mean(), "norm_std": norms.std() if len(norms) > 1 else norms.new_zeros(())}


def check_embeddings(head: nn.Module, embeddings: torch.Tensor) -> None:
    if embeddings.dim() != 2 or embeddings.shape[1] != head.embedding_size:
        raise ValueError(
            f"{type(head).__name__} expects embeddings of shape (B, {head.embedding_size}), got {tuple(embeddings.shape)}"
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


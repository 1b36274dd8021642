"""The class centres of a head: W (C K, d), K centres per class, and how this process's share of them
and of the batch relates to the other ranks under DDP.

`ClassCentres` is the dense case: every rank holds all C classes and computes the loss of its own
batch (DDP averages the gradients of W like any parameter). Partial FC (partial_fc.py) holds C/R
classes per rank instead; it overrides the methods below, and the head and the loss call the same
methods either way, so they never ask which one they hold:

- `global_batch`: the samples this process's loss covers (its own; under Partial FC the global batch);
- `batch_rows`: per-sample rows of the global batch, for batch statistics (a gather for the dense
  centres under DDP; what the loss already covers under Partial FC);
- `reduce_over_shards`, `log_sum_exp_over_shards`: reductions over the ranks holding the other classes
  (none for the dense centres);
- `step_rows`: each sample's column among the classes this step uses, and their centres;
  `column_weights`: what a loss that sums over the classes (the sigmoid heads') weights those
  columns by, so that a step over sampled classes has the expected loss of a step over all;
- `cosines`: cosines of unit rows to every class, whichever rank holds it (inference);
- `shard`, `gather_optimizer_state`, `shard_optimizer_state`: keeping a rank's rows, and checkpoints
  that hold the full matrix whatever the sharding; `local_rows`: this process's rows of a full tensor;
- `start_at`: centres started at given class directions instead of at random (head.init=class_means).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from facerec import distributed


def cosines(x_hat: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(|w_j| (m,), cos theta_ij (N, m)) for unit rows x_hat and unnormalised class centres W: the
    product x_hat W^T divided by the row norms in place, so W / |w| is never materialised."""
    norms = torch.linalg.vector_norm(weight, dim=1).clamp_min_(1e-12)  # F.normalize's epsilon
    return norms, torch.mm(x_hat, weight.T).div_(norms)


class ClassCentres(nn.Module):
    """W (C K, d), initialised N(0, INIT_STD^2), all of it on every rank."""

    sees_global_batch = False  # whether this process's loss covers every rank's samples
    INIT_STD = 0.01  # the random start's standard deviation per entry
    SUBCENTRE_NOISE = 0.1  # start_at: a sub-centre's noise per entry, as a fraction of INIT_STD

    def __init__(self, num_classes: int, centres_per_class: int, embedding_size: int):
        super().__init__()
        self.num_classes, self.centres_per_class = int(num_classes), int(centres_per_class)
        self.weight = nn.Parameter(torch.empty(self.num_classes * self.centres_per_class, int(embedding_size)))
        nn.init.normal_(self.weight, std=self.INIT_STD)

    @torch.no_grad()
    def start_at(self, directions: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Start each class's centres at its row of `directions` (C, d), every class's (each rank passes
        the same; any norm, normalised here), and return the full (C K, d) centre matrix; this process
        keeps its rows of it.

        The rows get the norm the random start's rows have on average, INIT_STD sqrt(d): the loss sees
        the centres' directions only, but the gradient of a normalised row shrinks as 1 / |w|, so that
        norm keeps the centres' step size the one the learning rate was chosen with. With K > 1 centres
        per class (Sub-center ArcFace), each is the class's direction plus Gaussian noise of
        SUBCENTRE_NOISE x INIT_STD per entry, a tenth of the row's norm (about 6 degrees): identical
        copies would tie in the closest-centre maximum, which hands every image and gradient to one of
        them, so the noise sets them apart to specialise, while every one stays far closer to its
        class than the classes are to each other. Mean plus noise, not K-means within the class: a
        class of a handful of images has no sub-clusters to find, and this needs no second pass. The
        noise is drawn from `generator` (on the CPU) for the full matrix, so every rank draws the same."""
        expected = (self.num_classes, self.weight.shape[1])
        if tuple(directions.shape) != expected:
            raise ValueError(f"expected class directions of shape {expected}, got {tuple(directions.shape)}")
        full = F.normalize(directions.float(), dim=1).mul_(self.INIT_STD * math.sqrt(expected[1]))
        full = full.repeat_interleave(self.centres_per_class, dim=0)
        if self.centres_per_class > 1:
            noise = torch.randn(full.shape, generator=generator).mul_(self.SUBCENTRE_NOISE * self.INIT_STD)
            full += noise.to(full.device)
        self.weight.copy_(self.local_rows(full))
        return full

    # ------------------------------------------------------------ the training step
    def global_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (embeddings, labels) this process's loss covers: its own batch."""
        return embeddings, labels

    def batch_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Per-sample rows of the global batch (every rank's, equal batches; no gradient)."""
        return distributed.all_gather_rows(rows)

    def reduce_over_shards(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A per-shard quantity reduced over the ranks holding the other classes: none here."""
        return tensor

    def log_sum_exp_over_shards(self, values: torch.Tensor) -> torch.Tensor:
        """ln sum exp over the shards of per-shard log-sum-exps (N,): none here."""
        return values

    def step_rows(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(each sample's column among the classes this step uses, -1 where another rank holds it;
        those classes' centres, at least float32)."""
        return labels, self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))

    def column_weights(self) -> torch.Tensor | None:
        """(m,) weights of the columns of the last `step_rows` in a loss summed over classes; None:
        every class was used, each counts once."""
        return None

    def closest(self, cos: torch.Tensor) -> torch.Tensor:
        """(B, m) cosines to each class's closest centre, from the (B, m K) cosines to every centre."""
        if self.centres_per_class == 1:
            return cos
        return cos.view(len(cos), -1, self.centres_per_class).amax(dim=2)

    def cosines(self, x_hat: torch.Tensor) -> torch.Tensor:
        """(B, C) cosines of unit rows x_hat (this rank's) to every class (its closest centre)."""
        return self.closest(cosines(x_hat, self.weight.to(x_hat.dtype))[1])

    # ------------------------------------------------------------ sharding, checkpoints
    def shard(self) -> list[str]:
        """Keep only this rank's rows; returns the parameters DDP must leave out of its all-reduce."""
        return []

    def local_rows(self, full: torch.Tensor) -> torch.Tensor:
        """This process's rows of a full (C K, ...) tensor (a copy): all of them here."""
        self._check_full(full)
        return full.clone()

    def _check_full(self, full: torch.Tensor) -> None:
        expected = self.num_classes * self.centres_per_class
        if len(full) != expected:
            raise ValueError(f"expected {expected} rows (one per class centre), got a tensor of shape {tuple(full.shape)}")

    def gather_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """Make the per-row optimizer state of W full in a checkpoint's optimizer states (in place)."""

    def shard_optimizer_state(self, optimizer_states: list[dict], param_index: int) -> None:
        """The inverse on load: keep this rank's rows of the full per-row state (in place)."""

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, centres_per_class={self.centres_per_class}, embedding_size={self.weight.shape[1]}"

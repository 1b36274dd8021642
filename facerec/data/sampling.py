"""Exact mid-epoch resume: a seeded per-epoch order that can start part-way through an epoch.

Lightning restores a mid-epoch checkpoint at the right batch index, but it
re-creates the data iterator from the start of the epoch, with a freshly drawn
order. `ResumableSampler` draws the order from (seed, epoch) alone
(DistributedSampler semantics, so under DDP each rank gets its shard and
Lightning keeps the sampler as is) and can skip the samples already consumed;
`ResumableLoader` implements Lightning's `state_dict`/`load_state_dict`
protocol for train loaders, so the position is saved in every checkpoint and
restored before the first batch is drawn.
"""
from __future__ import annotations

import logging
import random
from collections.abc import Callable

import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

log = logging.getLogger(__name__)


class SampleKey(int):
    """A dataset index (it is an int) that also carries the seed of that sample's random augmentation.

    The seed is a function of (run seed, epoch, index) alone, so a flip drawn from it is the same
    in any worker, on any rank and after a resume; datasets that augment read `augment_seed`,
    others just use the index.
    """

    augment_seed: int

    def __new__(cls, index: int, augment_seed: int) -> SampleKey:
        key = super().__new__(cls, index)
        key.augment_seed = augment_seed
        return key

    def __reduce__(self):  # to DataLoader workers
        return SampleKey, (int(self), self.augment_seed)


def augment_random(key: int) -> float:
    """A uniform draw in [0, 1) for one sample's augmentation: from its SampleKey's seed, else from
    the process's `random` (seeded per DataLoader worker by Lightning's seed_everything(workers=True))."""
    seed = getattr(key, "augment_seed", None)
    return random.Random(seed).random() if seed is not None else random.random()


class ResumableSampler(DistributedSampler):
    """DistributedSampler (seed + epoch permutation, rank shards) that can skip `skip` samples once
    and yields SampleKeys."""

    def __init__(self, dataset: Dataset, shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        distributed = dist.is_available() and dist.is_initialized()
        super().__init__(
            dataset,
            num_replicas=dist.get_world_size() if distributed else 1,
            rank=dist.get_rank() if distributed else 0,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        self.skip = 0

    def __iter__(self):
        indices = list(super().__iter__())[self.skip :]
        self.skip = 0  # only the resumed epoch starts part-way
        base = (self.seed * 1_000_003 + self.epoch) << 40
        return (SampleKey(index, base + index) for index in indices)  # lazily: a key per sample costs ~2 us and ~230 B


class ResumableLoader(DataLoader):
    """Train DataLoader whose position (epoch, batches consumed) is saved in checkpoints.

    `progress()` returns (epoch, batches processed in that epoch) as the trainer
    counts them: the loader itself cannot, since Lightning prefetches batches.
    """

    def __init__(self, dataset: Dataset, *, sampler: ResumableSampler, progress: Callable[[], tuple[int, int]], **kwargs):
        super().__init__(dataset, sampler=sampler, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.progress()
        if batches >= len(self):  # saved at the end of an epoch: resume at the start of the next
            epoch, batches = epoch + 1, 0
        return {"epoch": epoch, "batches": batches, "batch_size": self.batch_size, "world_size": self.sampler.num_replicas}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Called by Lightning before the resumed epoch's iterator is created (and before it
        # sets the sampler epoch), so the epoch is set here too.
        self.sampler.set_epoch(state["epoch"])
        same_layout = (state["batch_size"], state["world_size"]) == (self.batch_size, self.sampler.num_replicas)
        if same_layout:
            self.sampler.skip = state["batches"] * self.batch_size
        elif state["batches"]:
            log.warning(
                "resuming mid-epoch with batch size %d x %d processes (checkpoint: %d x %d): the position in the "
                "epoch cannot be mapped exactly, so epoch %d restarts from its first sample",
                self.batch_size, self.sampler.num_replicas, state["batch_size"], state["world_size"], state["epoch"],
            )

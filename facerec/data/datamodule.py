"""One LightningDataModule for every training set and the image sets validated on."""
from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from facerec import distributed, lightning_compat
from facerec.data.augment import NO_AUGMENT
from facerec.data.sampling import ResumableLoader, ResumableSampler


class FaceDataModule(L.LightningDataModule):
    """Training identities (`train` yields (image, label)) and the image sets of the evaluation sets
    validated on (`val_sets`: name -> a dataset of (image, index), one loader each, in order).

    `num_classes` is where the class count is stated; heads and scale policies read it from here
    (train.py builds the head with it). A dataset config lists in `val_sets` the names of the
    evaluation sets (conf/evalset/) it validates on by default; train.py builds their protocols and
    hands their image sets here (facerec.training.fit). Built from a config alone, with the names,
    the module has no validation sets.
    """

    def __init__(
        self,
        num_classes: int,
        train: Dataset,
        val_sets: Mapping[str, Dataset] | Sequence[str] | None = None,
        batch_size: int = 128,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
        prefetch_factor: int | None = None,
        drop_last: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.num_classes = int(num_classes)
        self.train_set = train
        data_classes = getattr(train, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"dataset.num_classes={self.num_classes} but the training data has {data_classes} identities; "
                "set dataset.num_classes to the data's class count"
            )
        self.val_sets: dict[str, Dataset] = dict(val_sets) if isinstance(val_sets, Mapping) else {}
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        workers = int(num_workers)
        self.loader_options = dict(
            num_workers=workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers and workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
        )
        self.drop_last = drop_last
        self.seed = int(seed)

    def _generator(self) -> torch.Generator:
        # Loaders draw their worker base seed from this, not from the global RNG, so iterating
        # data never shifts the RNG stream of the model (dropout): resumed runs stay exact.
        return torch.Generator().manual_seed(self.seed)

    def _progress(self) -> tuple[int, int]:
        return self.trainer.current_epoch, lightning_compat.batches_processed_in_epoch(self.trainer)

    def train_dataloader(self) -> DataLoader:
        # ResumableSampler is a DistributedSampler: under DDP each rank reads its shard (each image
        # once per epoch across ranks) and Lightning keeps it as is.
        sampler = ResumableSampler(self.train_set, shuffle=True, seed=self.seed, drop_last=self.drop_last)
        return ResumableLoader(
            self.train_set,
            sampler=sampler,
            progress=self._progress,
            batch_size=self.batch_size,
            drop_last=self.drop_last,
            generator=self._generator(),
            **self.loader_options,
        )

    def unaugmented_train_dataloader(self) -> DataLoader:
        """(image, label) batches of the training images as they are, for a pass that must see each
        image once and unchanged (head.init=class_means): a copy of the training set with the augment
        policy none (a training set augments through its `augment` attribute, facerec.data.augment),
        so the images are decoded and normalised as the validation sets' are; in index order, no
        shuffling, batches of val_batch_size (no gradient is kept). Under DDP this rank's share,
        image i on rank i mod R: every image on exactly one rank (a DistributedSampler would repeat
        some to even out the shares)."""
        if not hasattr(self.train_set, "augment"):
            raise TypeError(
                f"the training set {type(self.train_set).__name__} has no `augment` policy (facerec.data.augment), "
                "so its images cannot be read without augmentation"
            )
        images = copy.copy(self.train_set)  # the training loader keeps its policy
        images.augment = NO_AUGMENT
        rank, world_size = distributed.world()
        return DataLoader(
            images,
            batch_size=self.val_batch_size,
            sampler=range(rank, len(images), world_size),
            generator=self._generator(),
            **{**self.loader_options, "persistent_workers": False},  # one pass: its workers end with it
        )

    def val_dataloader(self) -> list[DataLoader]:
        return [
            DataLoader(
                val_set, batch_size=self.val_batch_size, shuffle=False, generator=self._generator(), **self.loader_options
            )
            for val_set in self.val_sets.values()
        ]

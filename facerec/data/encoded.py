"""Training sets of encoded face images: decode, augment (flip, ...) and normalise; replace or refuse corrupt images."""
from __future__ import annotations

import logging
import random

import torch
from torch.utils.data import Dataset

from facerec.data.augment import FLIP, Augment, check_augment
from facerec.data.decode import DecodeError, decode_image
from facerec.data.sampling import SampleKey

log = logging.getLogger(__name__)


class EncodedImages(Dataset):
    """Base class: subclasses implement `__len__` and `encoded(index) -> (bytes, label, source)`,
    where `source` names the image in messages (a file, a record).

    `dataset[i]` is `(image (3, size, size) float32 in [-1, 1], label)`, the decoded image under the
    `augment` policy (facerec.data.augment; default: the random flip), whose draws come from the
    index's augmentation seed when it is a SampleKey, so they are reproducible across workers, ranks
    and resumes. An image that does not decode is replaced by another sample of the set, chosen from
    the index (and its augmentation seed) alone, so every batch keeps its size (the ranks of a DDP
    run never need to exchange batch sizes) and a resumed run draws the same replacement. The
    replacement is logged with the source and counted in `replaced` (per process: each DataLoader
    worker counts its own). With `strict=True` it raises DecodeError naming the source instead.
    """

    MAX_REPLACEMENTS = 16  # tries before a run whose data is mostly unreadable gives up

    def __init__(self, num_classes: int, image_size: int = 112, augment: Augment = FLIP, strict: bool = False):
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.augment = check_augment(augment, type(self).__name__)
        self.strict = bool(strict)
        self.replaced = 0

    def encoded(self, index: int) -> tuple[bytes, int, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        draw = random.Random(getattr(index, "augment_seed", int(index)))
        for _ in range(self.MAX_REPLACEMENTS):
            data, label, source = self.encoded(index)
            try:
                image = decode_image(data, self.image_size)
            except DecodeError as error:
                if self.strict:
                    raise DecodeError(f"{source}: {error}") from None
                self.replaced += 1
                replacement = draw.randrange(len(self))
                log.warning(
                    "%s: %s; replaced by sample %d (%d replaced in this process; strict=true raises instead)",
                    source, error, replacement, self.replaced,
                )
                index = SampleKey(replacement, draw.getrandbits(63))
                continue
            return self.augment(image, index), label
        raise RuntimeError(
            f"{self.MAX_REPLACEMENTS} samples in a row did not decode (last: {source}); check the data or use strict=true"
        )

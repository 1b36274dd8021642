"""Training sets of encoded face images: decode, flip at random, normalise; skip or refuse corrupt images."""
from __future__ import annotations

import logging

import torch
from torch.utils.data import Dataset

from facerec.data.decode import DecodeError, decode_image, normalise
from facerec.data.sampling import augment_random

log = logging.getLogger(__name__)


class EncodedImages(Dataset):
    """Base class: subclasses implement `__len__` and `encoded(index) -> (bytes, label, source)`,
    where `source` names the image in messages (a file, a record).

    `dataset[i]` is `(image (3, size, size) float32 in [-1, 1], label)`, mirrored
    left-right with probability 1/2 when `flip` (drawn from the index's augmentation seed when
    it is a SampleKey, so flips are reproducible across workers, ranks and resumes). An image that does not decode is
    skipped: `dataset[i]` is None, the skip is logged with its source and counted
    in `skipped` (per process: each DataLoader worker counts its own), and
    FaceDataModule's collate drops it from the batch. With `strict=True` it raises
    DecodeError naming the source instead.
    """

    def __init__(self, num_classes: int, image_size: int = 112, flip: bool = True, strict: bool = False):
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.flip = bool(flip)
        self.strict = bool(strict)
        self.skipped = 0

    def encoded(self, index: int) -> tuple[bytes, int, str]:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        data, label, source = self.encoded(index)
        try:
            image = decode_image(data, self.image_size)
        except DecodeError as error:
            if self.strict:
                raise DecodeError(f"{source}: {error}") from None
            self.skipped += 1
            log.warning("skipped %s: %s (%d skipped in this process; strict=true raises instead)", source, error, self.skipped)
            return None
        return normalise(image, flip=self.flip and augment_random(index) < 0.5), label

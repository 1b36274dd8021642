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
    run never need to exchange batch sizes) and a resumed run draws the same replacement. Not
    decoding covers a corrupt or empty file, a record `encoded` cannot read (it raises DecodeError),
    and an image whose shorter side is below `min_image_size` pixels (None: a quarter of
    `image_size`; 0 takes any size). The replacement is logged with the source and counted in
    `replaced` (per process: each DataLoader worker counts its own). With `strict=True` it raises
    DecodeError naming the source instead.
    """

    MAX_REPLACEMENTS = 16  # tries before a run whose data is mostly unreadable gives up

    def __init__(
        self,
        num_classes: int,
        image_size: int = 112,
        augment: Augment = FLIP,
        strict: bool = False,
        min_image_size: int | None = None,
    ):
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.min_image_size = self.image_size // 4 if min_image_size is None else int(min_image_size)
        self.augment = check_augment(augment, type(self).__name__)
        self.strict = bool(strict)
        self.replaced = 0

    def encoded(self, index: int) -> tuple[bytes, int, str]:
        """(encoded image, label, source) of sample `index`; DecodeError naming the source where the
        sample cannot be read at all."""
        raise NotImplementedError

    def _decoded(self, index: int) -> tuple[object, int]:
        """(decoded image, label); DecodeError naming the source."""
        data, label, source = self.encoded(index)
        try:
            return decode_image(data, self.image_size, self.min_image_size), label
        except DecodeError as error:
            raise DecodeError(f"{source}: {error}") from None

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range [0, {len(self)})")
        draw = random.Random(getattr(index, "augment_seed", int(index)))
        for _ in range(self.MAX_REPLACEMENTS):
            try:
                image, label = self._decoded(index)
            except DecodeError as error:
                if self.strict:
                    raise
                self.replaced += 1
                replacement = draw.randrange(len(self))
                log.warning(
                    "%s; replaced by sample %d (%d replaced in this process; strict=true raises instead)",
                    error, replacement, self.replaced,
                )
                last = error
                index = SampleKey(replacement, draw.getrandbits(63))
                continue
            return self.augment(image, index), label
        raise RuntimeError(
            f"{self.MAX_REPLACEMENTS} samples in a row did not decode (last: {last}); check the data or use strict=true"
        )

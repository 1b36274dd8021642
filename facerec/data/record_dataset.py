"""insightface training sets (CASIA-WebFace, MS1MV2/V3, Glint360K, ...): `train.rec`, `train.idx`, `property`.

Layout (recognition/arcface_torch and the released `faces_*` folders):
- `property`: one line `num_classes,height,width`, e.g. `10572,112,112`.
- record 0: an image header with flag 2 and label `[first identity record, end of
  identity records)`; the images are records 1 .. first identity record - 1.
- image records: header label = identity (a float, or label[0] when flag > 0), JPEG payload.
- identity records (first .. end - 1): label `[first image record, end image record)` of
  one identity, in label order.
A record 0 with flag 0 (e.g. files written by mxnet's im2rec) means there is no
such header: every record of the index is an image.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from facerec.data.augment import FLIP, Augment
from facerec.data.encoded import EncodedImages
from facerec.data.recordio import RecordIOReader, unpack_record

log = logging.getLogger(__name__)


def read_property(path: Path) -> tuple[int, int, int]:
    """(num_classes, height, width) from an insightface `property` file."""
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: an insightface training set holds a 'property' file with one line "
            "'num_classes,height,width' (e.g. '10572,112,112') beside train.rec"
        )
    text = path.read_text().strip()
    try:
        num_classes, height, width = (int(field) for field in text.split(","))
    except ValueError:
        raise ValueError(f"{path}: expected 'num_classes,height,width' (e.g. '10572,112,112'), got {text!r}") from None
    return num_classes, height, width


def record_label(label) -> int:
    """The identity of an image record: the label, or its first value when the header holds several."""
    return int(label if np.ndim(label) == 0 else label[0])


class RecordDataset(EncodedImages):
    """An insightface training folder `root` (train.rec, train.idx, property).

    num_classes: the configured class count; it must equal the `property` file's (None takes the
    property's), and a record whose label is outside [0, num_classes) raises naming both.
    """

    def __init__(
        self,
        root: str | Path,
        num_classes: int | None = None,
        image_size: int = 112,
        augment: Augment = FLIP,
        strict: bool = False,
        rec_file: str = "train.rec",
        idx_file: str = "train.idx",
    ):
        self.root = Path(root)
        stated, height, width = read_property(self.root / "property")
        if num_classes is not None and num_classes != stated:
            raise ValueError(
                f"{self.root / 'property'} states {stated} classes but dataset.num_classes={num_classes}; "
                f"set dataset.num_classes={stated}, or leave it out (null) to read it from the property file"
            )
        super().__init__(stated, image_size, augment, strict)
        if (height, width) != (self.image_size, self.image_size):
            log.info("%s holds %dx%d images; they are fitted to %d x %d", self.root, height, width, image_size, image_size)
        self.reader = RecordIOReader(self.root / rec_file, self.root / idx_file)
        header, _ = unpack_record(self.reader.read(0))
        if header.flag > 0:
            first_identity, end_identity = int(header.label[0]), int(header.label[1])
            self.image_keys = np.arange(1, first_identity, dtype=np.int64)
            self.identity_keys = np.arange(first_identity, end_identity, dtype=np.int64)
            absent = ~np.isin(np.concatenate([self.image_keys, self.identity_keys]), self.reader.keys)
            if absent.any():
                raise ValueError(
                    f"{self.reader.rec_path}: header record 0 announces images 1..{first_identity - 1} and identity "
                    f"records {first_identity}..{end_identity - 1}, but {int(absent.sum())} of them are missing from "
                    f"{self.reader.idx_path} (truncated or mismatched index)"
                )
            if len(self.identity_keys) not in (0, self.num_classes):
                log.warning(
                    "%s: header record 0 lists %d identity records but property states %d classes",
                    self.reader.rec_path, len(self.identity_keys), self.num_classes,
                )
        else:
            self.image_keys = self.reader.keys.copy()
            self.identity_keys = np.empty(0, dtype=np.int64)
        log.info("%s: %d images of %d identities", self.root, len(self.image_keys), self.num_classes)

    @classmethod
    def count_classes(cls, root: str | Path) -> int:
        """The class count the `property` file of `root` states; what train.py reads when
        dataset.num_classes is left out."""
        return read_property(Path(root) / "property")[0]

    def __len__(self) -> int:
        return len(self.image_keys)

    def record(self, index: int) -> tuple[int, bytes]:
        """(label, encoded image) of image `index`, the label checked against num_classes."""
        key = int(self.image_keys[index])
        header, payload = unpack_record(self.reader.read(key))
        label = record_label(header.label)
        if not 0 <= label < self.num_classes:
            raise ValueError(
                f"{self.reader.rec_path} record {key} has label {label}, outside [0, {self.num_classes}) "
                f"for the configured num_classes={self.num_classes}"
            )
        return label, payload

    def encoded(self, index: int) -> tuple[bytes, int, str]:
        label, payload = self.record(index)
        return payload, label, f"{self.reader.rec_path} record {int(self.image_keys[index])}"

    def identity_ranges(self) -> np.ndarray:
        """(num identities, 2) int64 `[first, end)` image record keys of each identity, from the identity records."""
        ranges = [unpack_record(self.reader.read(int(key)))[0].label for key in self.identity_keys]
        return np.asarray(ranges, dtype=np.int64).reshape(-1, 2)

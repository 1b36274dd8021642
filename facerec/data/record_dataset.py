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

The class count is stated twice in such a folder, by `property` and by the identity records of
header record 0. Where both exist they must agree, or the run is refused before it starts: a count
too high trains class centres that never see a sample (and sets s_auto for the wrong C), one too low
fails on the first label beyond it. A user who states dataset.num_classes equal to the identity
records' count trains with it (the property file is then the one that is wrong, and the log says so).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from facerec.data.augment import FLIP, Augment
from facerec.data.decode import DecodeError
from facerec.data.encoded import EncodedImages
from facerec.data.recordio import RecordIOError, RecordIOReader, unpack_record

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


def header_identities(reader: RecordIOReader) -> tuple[np.ndarray, np.ndarray] | None:
    """(image record keys, identity record keys) that header record 0 announces, None without such a
    header (flag 0); a record it announces that the index lacks is an error naming both files."""
    header, _ = unpack_record(reader.read(0))
    if header.flag <= 0:
        return None
    first_identity, end_identity = int(header.label[0]), int(header.label[1])
    image_keys = np.arange(1, first_identity, dtype=np.int64)
    identity_keys = np.arange(first_identity, end_identity, dtype=np.int64)
    absent = ~np.isin(np.concatenate([image_keys, identity_keys]), reader.keys)
    if absent.any():
        raise RecordIOError(
            f"{reader.rec_path}: header record 0 announces images 1..{first_identity - 1} and identity "
            f"records {first_identity}..{end_identity - 1}, but {int(absent.sum())} of them are missing from "
            f"{reader.idx_path} (truncated or mismatched index)"
        )
    return image_keys, identity_keys


def check_class_counts(property_path: Path, stated: int, reader: RecordIOReader, identity_records: int, configured: int | None) -> int:
    """The class count to train with, where `property` states `stated` and header record 0 lists
    `identity_records` identities (0: none listed, nothing to check against; see the module
    docstring); raises naming both files where they disagree, unless `configured`
    (dataset.num_classes) is the identity records' count."""
    if identity_records in (0, stated):
        if configured is not None and configured != stated:
            raise ValueError(
                f"{property_path} states {stated} classes but dataset.num_classes={configured}; "
                f"set dataset.num_classes={stated}, or leave it out (null) to read it from the property file"
            )
        return stated
    if configured == identity_records:
        log.warning(
            "%s states %d classes, but header record 0 of %s lists %d identity records: training with "
            "dataset.num_classes=%d, as stated", property_path, stated, reader.rec_path, identity_records, configured,
        )
        return configured
    raise ValueError(
        f"{property_path} states {stated} classes, but header record 0 of {reader.rec_path} lists {identity_records} "
        f"identity records: the folder disagrees with itself. Fix the property file, or state "
        f"dataset.num_classes={identity_records} (the identities the records hold) to train with them"
    )


class RecordDataset(EncodedImages):
    """An insightface training folder `root` (train.rec, train.idx, property).

    num_classes: the configured class count, checked against the `property` file and header record
    0 (module docstring); None takes theirs. A record whose label is outside [0, num_classes) raises
    naming both. A record that cannot be read (a corrupt frame) is unreadable like a corrupt JPEG:
    replaced and counted, or refused with `strict` (EncodedImages).
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
        min_image_size: int | None = None,
    ):
        self.root = Path(root)
        stated, height, width = read_property(self.root / "property")
        self.reader = RecordIOReader(self.root / rec_file, self.root / idx_file)
        announced = header_identities(self.reader)
        self.image_keys, self.identity_keys = announced or (self.reader.keys.copy(), np.empty(0, dtype=np.int64))
        count = check_class_counts(self.root / "property", stated, self.reader, len(self.identity_keys), num_classes)
        super().__init__(count, image_size, augment, strict, min_image_size)
        if (height, width) != (self.image_size, self.image_size):
            log.info("%s holds %dx%d images; they are fitted to %d x %d", self.root, height, width, image_size, image_size)
        log.info("%s: %d images of %d identities", self.root, len(self.image_keys), self.num_classes)

    @classmethod
    def count_classes(cls, root: str | Path, rec_file: str = "train.rec", idx_file: str = "train.idx") -> int:
        """The class count of `root`, what train.py reads when dataset.num_classes is left out: the
        `property` file's, refused where header record 0 lists another (module docstring)."""
        root = Path(root)
        stated = read_property(root / "property")[0]
        reader = RecordIOReader(root / rec_file, root / idx_file)
        announced = header_identities(reader)
        return check_class_counts(root / "property", stated, reader, len(announced[1]) if announced else 0, None)

    def __len__(self) -> int:
        return len(self.image_keys)

    def record(self, index: int) -> tuple[int, bytes]:
        """(label, encoded image) of image `index`, the label checked against num_classes."""
        key = int(self.image_keys[index])
        try:
            header, payload = unpack_record(self.reader.read(key))
        except RecordIOError as error:  # a corrupt frame or image header: this sample only
            raise DecodeError(str(error)) from None
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

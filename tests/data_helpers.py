"""Small real image files for the data tests (smooth random faces-sized images, JPEG and other formats)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import simplejpeg
from PIL import Image


def smooth_image(rng: np.random.Generator, height: int = 112, width: int = 112, channels: int = 3) -> np.ndarray:
    """uint8 (H, W, C): upsampled noise, so JPEG compresses it like a photo rather than like static."""
    coarse = rng.integers(0, 256, size=(height // 8 + 1, width // 8 + 1, channels)).astype(np.float32)
    image = coarse.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]
    return np.ascontiguousarray(image.astype(np.uint8))


def write_jpeg_folder(root: Path, identities: int = 3, per_identity: int = 4, seed: int = 0) -> Path:
    """root/id00/0.jpg ...: 112x112 RGB JPEGs."""
    rng = np.random.default_rng(seed)
    for identity in range(identities):
        folder = root / f"id{identity:02d}"
        folder.mkdir(parents=True)
        for k in range(per_identity):
            (folder / f"{k}.jpg").write_bytes(simplejpeg.encode_jpeg(smooth_image(rng), quality=90))
    return root


def write_image(path: Path, image: np.ndarray) -> Path:
    """Any format Pillow writes, chosen by the suffix (greyscale when image has one channel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(path)
    return path


def write_rec_folder(tmp: Path, identities: int = 3) -> Path:
    """tmp/rec: a converter-written RecordIO training set of tmp/faces (4 JPEGs per identity)."""
    from facerec.data.convert import folder_to_rec

    folder_to_rec(write_jpeg_folder(tmp / "faces", identities=identities, per_identity=4), tmp / "rec")
    return tmp / "rec"


def corrupt_record(rec: Path, record: int = 6) -> Path:
    """Zero part of one image record's JPEG data in place (its framing and image header intact)."""
    from facerec.data.recordio import read_index

    keys, offsets = read_index(rec / "train.idx")
    (offset,) = offsets[keys == record]
    raw = bytearray((rec / "train.rec").read_bytes())
    raw[offset + 8 + 24 + 700 : offset + 8 + 24 + 1500] = bytes(800)  # past framing and image header
    (rec / "train.rec").write_bytes(bytes(raw))
    return rec


def corrupt_frame(rec: Path, record: int = 6) -> Path:
    """Zero the RecordIO magic of one record's frame in place (the rest of train.rec intact)."""
    from facerec.data.recordio import read_index

    keys, offsets = read_index(rec / "train.idx")
    (offset,) = offsets[keys == record]
    raw = bytearray((rec / "train.rec").read_bytes())
    raw[offset : offset + 4] = bytes(4)
    (rec / "train.rec").write_bytes(bytes(raw))
    return rec


def write_headerless_rec(tmp: Path, labels: list[int], num_classes: int) -> Path:
    """tmp/rec in mxnet im2rec's layout: every record, 0 included, an image with its label; no header
    record lists the identities, only `property` states the class count."""
    from facerec.data import RecordIOWriter, pack_record

    rng = np.random.default_rng(0)
    (tmp / "rec").mkdir(parents=True)
    with RecordIOWriter(tmp / "rec" / "train.rec", tmp / "rec" / "train.idx") as writer:
        for key, label in enumerate(labels):
            writer.write(key, pack_record(label, simplejpeg.encode_jpeg(smooth_image(rng), quality=90), id=key))
    (tmp / "rec" / "property").write_text(f"{num_classes},112,112")
    return tmp / "rec"

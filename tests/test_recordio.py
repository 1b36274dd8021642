"""MXNet RecordIO without mxnet: framing, index, image headers, the insightface layout, bad files."""
from __future__ import annotations

import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data_helpers import corrupt_frame, write_headerless_rec, write_jpeg_folder
from facerec.data import Flip, NoAugment, RecordDataset, RecordIOError, RecordIOReader, RecordIOWriter, pack_record, unpack_record
from facerec.data.convert import folder_to_rec
from facerec.data.recordio import MAGIC

MAGIC_BYTES = struct.pack("<I", MAGIC)


def write_records(tmp_path, payloads: dict[int, bytes]):
    with RecordIOWriter(tmp_path / "x.rec", tmp_path / "x.idx") as writer:
        for key, payload in payloads.items():
            writer.write(key, payload)
    return tmp_path / "x.rec", tmp_path / "x.idx"


def test_framing_round_trip_including_magic_inside_records(tmp_path):
    rng = np.random.default_rng(0)
    payloads = {
        7: b"",
        3: b"abc",  # padded to 4 bytes
        0: rng.bytes(1001),
        # the magic number at aligned offsets is split out (continuation flags), unaligned it stays
        12: b"head" + MAGIC_BYTES + b"mid!" + MAGIC_BYTES + MAGIC_BYTES + b"tail",
        5: b"x" + MAGIC_BYTES + b"yyy",
        9: MAGIC_BYTES,
    }
    rec, idx = write_records(tmp_path, payloads)
    reader = RecordIOReader(rec, idx)
    assert list(reader.keys) == sorted(payloads)  # the .idx is written sorted by key
    for key in rng.permutation(list(payloads)):
        assert reader.read(int(key)) == payloads[int(key)]
    raw = rec.read_bytes()
    assert raw.count(MAGIC_BYTES) == len(payloads) + 3 + 1 + 1  # one frame per part; 5's magic is unaligned
    flags = [struct.unpack_from("<I", raw, i + 4)[0] >> 29 for i in range(0, len(raw), 4) if raw[i : i + 4] == MAGIC_BYTES]
    assert sorted(set(flags)) == [0, 1, 2, 3]
    with pytest.raises(KeyError, match="record 4 is not in"):
        reader.read(4)


def test_reader_pickles_and_reopens_per_process(tmp_path):
    rec, idx = write_records(tmp_path, {i: bytes([i]) * (i + 1) for i in range(20)})
    reader = RecordIOReader(rec, idx)
    reader.read(3)
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._fd is None and clone.read(19) == bytes([19]) * 20


def test_image_header_scalar_and_vector_labels():
    header, payload = unpack_record(pack_record(17, b"jpeg", id=5, id2=6))
    assert (header.flag, header.label, header.id, header.id2, payload) == (0, 17.0, 5, 6, b"jpeg")
    header, payload = unpack_record(pack_record([3, 9], b"", id=1))
    assert header.flag == 2 and header.label.tolist() == [3.0, 9.0] and payload == b""
    with pytest.raises(RecordIOError, match="shorter than"):
        unpack_record(b"abc")


@pytest.fixture(scope="module")
def record_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    write_jpeg_folder(root / "images", identities=4, per_identity=6)
    folder_to_rec(root / "images", root / "rec")
    return root / "rec"


def test_insightface_layout(record_folder):
    dataset = RecordDataset(record_folder, num_classes=4, augment=NoAugment())
    assert len(dataset) == 24 and dataset.num_classes == 4
    assert (record_folder / "property").read_text().strip() == "4,112,112"
    header, _ = unpack_record(dataset.reader.read(0))
    assert header.flag == 2 and header.label.tolist() == [25, 29]  # identity records 25..28
    assert dataset.identity_ranges().tolist() == [[1, 7], [7, 13], [13, 19], [19, 25]]
    image, label = dataset[13]
    assert image.shape == (3, 112, 112) and image.dtype == torch.float32 and label == 2
    assert -1 <= image.min() and image.max() <= 1


def test_workers_read_every_record_once(record_folder):
    dataset = RecordDataset(record_folder, num_classes=4, augment=NoAugment())
    expected = torch.stack([dataset[i][0] for i in range(len(dataset))])
    loader = DataLoader(dataset, batch_size=5, num_workers=2, shuffle=False)
    images = torch.cat([batch[0] for batch in loader])
    assert torch.equal(images, expected)


def test_flip_mirrors_the_image(record_folder):
    plain = RecordDataset(record_folder, num_classes=4, augment=NoAugment())
    flipping = RecordDataset(record_folder, num_classes=4, augment=Flip())
    original = plain[0][0]
    random.seed(0)  # the flip draws from `random` (seeded per worker by Lightning)
    samples = [flipping[0][0] for _ in range(30)]
    mirrored = [torch.equal(x, original.flip(-1)) for x in samples]
    unchanged = [torch.equal(x, original) for x in samples]
    assert all(m != u for m, u in zip(mirrored, unchanged))  # each sample is one or the other
    assert 5 < sum(mirrored) < 25  # about half are mirrored


def test_truncated_rec_is_refused(record_folder, tmp_path):
    for name in ("train.idx", "property"):
        (tmp_path / name).write_bytes((record_folder / name).read_bytes())
    full = (record_folder / "train.rec").read_bytes()
    for cut in (len(full) - 100, len(full) - 3):  # inside the last record; inside its padding / header
        (tmp_path / "train.rec").write_bytes(full[:cut])
        with pytest.raises(RecordIOError, match="truncated"):
            RecordDataset(tmp_path, num_classes=4)


def shifted_index(idx: str) -> str:
    """An index whose offsets point 4 bytes past each record: as if it belonged to another file."""
    rows = [line.split("\t") for line in idx.splitlines()]
    return "".join(f"{key}\t{int(offset) + 4}\n" for key, offset in rows)


BAD_FILES = [  # (file, its new content from the original text (None: deleted), error, message, num_classes)
    ("train.idx", shifted_index, RecordIOError, "does not match", 4),
    ("train.idx", lambda _: "0\t0\n1\tnot-a-number\n", RecordIOError, "not a RecordIO index", 4),
    ("train.idx", lambda _: "0\t0\n1\t999999999\n", RecordIOError, "beyond the end", 4),
    ("property", None, FileNotFoundError, "property.*num_classes,height,width", 4),
    ("property", lambda _: "four,112,112", ValueError, "expected 'num_classes,height,width'", 4),
    ("property", lambda _: "4,112,112", ValueError, "states 4 classes but dataset.num_classes=5", 5),
]


@pytest.mark.parametrize("name,change,error,match,num_classes", BAD_FILES)
def test_bad_files_fail_clearly(record_folder, tmp_path, name, change, error, match, num_classes):
    for file in ("train.rec", "train.idx", "property"):
        if file != name:
            (tmp_path / file).write_bytes((record_folder / file).read_bytes())
        elif change is not None:
            (tmp_path / file).write_text(change((record_folder / file).read_text()))
    with pytest.raises(error, match=match):
        RecordDataset(tmp_path, num_classes=num_classes)


def test_label_outside_num_classes_names_label_and_c(tmp_path):
    folder = write_jpeg_folder(tmp_path / "images", identities=2, per_identity=2)
    image = (folder / "id00" / "0.jpg").read_bytes()
    root = tmp_path / "rec"
    root.mkdir()
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:
        writer.write(0, pack_record([3, 3], b""))
        writer.write(1, pack_record(1, image))
        writer.write(2, pack_record([7, 0], image))  # a vector label: the class is its first value
    (root / "property").write_text("2,112,112")
    dataset = RecordDataset(root, num_classes=2)
    assert dataset[0][1] == 1
    with pytest.raises(ValueError, match="record 2 has label 7, outside \\[0, 2\\).*num_classes=2"):
        dataset[1]


def test_rec_without_header_record_is_all_images(tmp_path):
    folder = write_jpeg_folder(tmp_path / "images", identities=1, per_identity=3)
    root = tmp_path / "rec"
    root.mkdir()
    with RecordIOWriter(root / "train.rec", root / "train.idx") as writer:  # im2rec style: no record-0 header
        for key, path in enumerate(sorted((folder / "id00").iterdir())):
            writer.write(key, pack_record(0, path.read_bytes(), id=key))
    (root / "property").write_text("1,112,112")
    assert len(RecordDataset(root, num_classes=1)) == 3


@pytest.mark.slow
def test_ddp_ranks_see_every_image_once_per_epoch(record_folder, tmp_path):
    from ddp_record_epoch import image_digest

    from conftest import run_script

    run_script([str(Path(__file__).parent / "ddp_record_epoch.py"), str(record_folder), "4", str(tmp_path)])
    dataset = RecordDataset(record_folder, num_classes=4, augment=NoAugment())
    expected = sorted(image_digest(dataset[i][0]) for i in range(len(dataset)))
    seen = [(tmp_path / f"rank{rank}.txt").read_text().split() for rank in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == len(dataset) // 2
    assert sorted(seen[0] + seen[1]) == expected


def test_a_truncated_index_is_blamed_on_the_index(record_folder, tmp_path):
    idx = (record_folder / "train.idx").read_text()
    for file in ("train.rec", "property"):
        (tmp_path / file).write_bytes((record_folder / file).read_bytes())
    (tmp_path / "train.idx").write_text(idx[:-3])  # cut inside its last line: the last offset is a prefix
    with pytest.raises(RecordIOError, match=r"train\.idx: its last line \('\d+\\t\d*'\) has no line break: the \.idx is truncated"):
        RecordDataset(tmp_path, num_classes=4)
    (tmp_path / "train.idx").write_text(idx[: idx.rindex("\n", 0, len(idx) - 1) + 1])  # cut at a line break
    with pytest.raises(RecordIOError, match=r"header record 0 announces .* 1 of them are missing from .*train\.idx \(truncated"):
        RecordDataset(tmp_path, num_classes=4)
    rows = idx.splitlines()
    (tmp_path / "train.idx").write_text("\n".join([*rows[:-1], rows[-1].split("\t")[0] + "\t" + rows[-2].split("\t")[1]]) + "\n")
    with pytest.raises(RecordIOError, match=r"train\.idx: two records start at the same byte: the \.idx is corrupt"):
        RecordDataset(tmp_path, num_classes=4)
    headerless = write_headerless_rec(tmp_path / "im2rec", [0] * 6, num_classes=1)  # no header to count against: the .rec runs on past the index
    idx = (headerless / "train.idx").read_text()
    (headerless / "train.idx").write_text(idx[: idx.rindex("\n", 0, len(idx) - 1) + 1])
    with pytest.raises(RecordIOError, match=r"train\.rec holds records after the last one .*train\.idx lists \(byte \d+ of \d+\): the \.idx is truncated"):
        RecordDataset(headerless, num_classes=1)


def test_a_corrupt_frame_mid_file_is_replaced_and_counted_or_refused(record_folder, tmp_path, caplog):
    for file in ("train.rec", "train.idx", "property"):
        (tmp_path / file).write_bytes((record_folder / file).read_bytes())
    corrupt_frame(tmp_path, 6)
    dataset = RecordDataset(tmp_path, num_classes=4, augment=NoAugment())
    samples = [dataset[i] for i in range(len(dataset))]
    assert dataset.replaced == 1 and len(samples) == len(dataset)
    assert f"{tmp_path / 'train.rec'}: no RecordIO magic at byte" in caplog.text and "for record 6" in caplog.text
    assert "replaced by sample" in caplog.text
    loader = DataLoader(dataset, batch_size=4, num_workers=1)
    assert all(len(labels) == 4 for _, labels in loader)  # the run goes on inside a worker, batches full
    with pytest.raises(Exception, match=r"train\.rec: no RecordIO magic at byte \d+ for record 6"):
        RecordDataset(tmp_path, num_classes=4, strict=True)[5]

"""Converters and round trips: folder -> .rec -> dataset, pairs file -> .bin -> reader, a corrupt record."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from data_helpers import corrupt_record, smooth_image, write_image, write_jpeg_folder, write_rec_folder
from facerec.data import (
    BinVerificationSet,
    DecodeError,
    ImageFolderDataset,
    LfwPairs,
    NoAugment,
    RecordDataset,
    unpack_record,
)
from facerec.data.convert import folder_to_rec, pairs_to_bin

SCRIPTS = Path(sys.executable).parent


def cli(name: str, *args) -> str:
    result = subprocess.run([str(SCRIPTS / name), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def lfw_subset(shared_data, tmp_path_factory):
    """Twelve real LFW identities (copied to a temporary folder) and a View 2-style pairs file over them."""
    source = shared_data / "lfw" / "aligned_112"
    names = sorted(p.name for p in source.iterdir() if len(list(p.iterdir())) >= 3)[:12]
    root = tmp_path_factory.mktemp("lfw") / "aligned_112"
    for name in names:
        shutil.copytree(source / name, root / name)
    same = [f"{n}\t1\t{k}" for n in names for k in (2, 3)][:10]
    different = [f"{a}\t1\t{b}\t2" for a, b in zip(names, names[1:] + names[:1])][:10]
    pairs = root.parent / "pairs.txt"
    pairs.write_text("\n".join(["2\t5", *same[:5], *different[:5], *same[5:], *different[5:]]) + "\n")
    return root, pairs


def test_folder_to_rec_round_trip_gives_identical_pixels_and_labels(lfw_subset, tmp_path):
    root, _ = lfw_subset
    out = cli("facerec-folder-to-rec", root, tmp_path / "rec")
    folder = ImageFolderDataset(root, augment=NoAugment())
    assert f"{len(folder)} images, 12 classes" in out
    record = RecordDataset(tmp_path / "rec", num_classes=12, augment=NoAugment())
    assert len(record) == len(folder)
    for index in range(len(folder)):
        (image_a, label_a), (image_b, label_b) = record[index], folder[index]
        assert label_a == label_b and torch.equal(image_a, image_b), index
    # The .rec holds the source JPEG bytes themselves (already 112x112 JPEG).
    key = int(record.image_keys[5])
    assert unpack_record(record.reader.read(key))[1] == folder.scan.path(5).read_bytes()


def test_other_formats_are_fitted_and_reencoded(tmp_path):
    rng = np.random.default_rng(0)
    write_image(tmp_path / "faces" / "a" / "1.pgm", smooth_image(rng, 112, 92, 1))
    write_image(tmp_path / "faces" / "b" / "1.png", smooth_image(rng, 150, 150))
    stats = folder_to_rec(tmp_path / "faces", tmp_path / "rec", quality=100)
    assert stats["images"] == 2 and stats["classes"] == 2
    record = RecordDataset(tmp_path / "rec", num_classes=2, augment=NoAugment())
    folder = ImageFolderDataset(tmp_path / "faces", augment=NoAugment())
    for index in range(2):  # JPEG at quality 100: within a few grey levels of the source pixels
        difference = (record[index][0] - folder[index][0]).abs().mul(127.5)
        assert difference.mean() < 1.5 and record[index][1] == folder[index][1]


def test_corrupt_record_in_the_middle_is_replaced_and_counted(tmp_path, caplog):
    rec = write_rec_folder(tmp_path)
    dataset = RecordDataset(rec, num_classes=3, augment=NoAugment())
    clean = [dataset[i] for i in range(len(dataset))]
    corrupt_record(rec, record=6)  # the entropy-coded data of image record 6, overwritten in place

    dataset = RecordDataset(tmp_path / "rec", num_classes=3, augment=NoAugment())
    samples = [dataset[i] for i in range(len(dataset))]
    assert dataset.replaced == 1  # image index 5 is record 6
    assert "train.rec record 6: corrupt JPEG" in caplog.text and "replaced by sample" in caplog.text
    # the replacement is another clean sample, the same one every time (resume and ranks agree)
    assert any(torch.equal(samples[5][0], sample[0]) and samples[5][1] == sample[1] for i, sample in enumerate(clean) if i != 5)
    assert torch.equal(RecordDataset(tmp_path / "rec", num_classes=3, augment=NoAugment())[5][0], samples[5][0])
    for index, sample in enumerate(samples):
        if index != 5:
            assert sample[1] == clean[index][1] and torch.equal(sample[0], clean[index][0])
    from facerec.data import FaceDataModule

    loader = FaceDataModule(3, dataset, batch_size=4, drop_last=False).train_dataloader()
    assert [len(labels) for _, labels in loader] == [4, 4, 4]  # every batch keeps its size
    with pytest.raises(DecodeError, match="train.rec record 6: corrupt JPEG"):
        RecordDataset(tmp_path / "rec", num_classes=3, strict=True)[5]


def test_unreadable_source_images_are_skipped_by_the_converter(tmp_path):
    root = write_jpeg_folder(tmp_path / "faces", identities=2, per_identity=2)
    (root / "id01" / "1.jpg").write_bytes(b"\xff\xd8 not really")
    stats = folder_to_rec(root, tmp_path / "rec")
    assert stats["images"] == 3 and stats["corrupt_images"] == 1
    with pytest.raises(DecodeError, match="id01/1.jpg"):
        folder_to_rec(root, tmp_path / "rec2", strict=True)


def test_pairs_to_bin_round_trip_gives_the_same_pairs(lfw_subset, tmp_path):
    root, pairs = lfw_subset
    out = cli("facerec-pairs-to-bin", pairs, root, tmp_path / "subset.bin")
    assert "20 pairs, 10 same, 0 skipped" in out
    from_folder = LfwPairs(root, pairs)
    from_bin = BinVerificationSet(tmp_path / "subset.bin")
    assert np.array_equal(from_bin.issame, from_folder.issame)
    for pair_bin, pair_folder in zip(from_bin.pairs, from_folder.pairs):
        for i, j in zip(pair_bin, pair_folder):
            assert torch.equal(from_bin[int(i)][0], from_folder[int(j)][0])


def test_pairs_to_bin_reports_missing_images(shared_data, tmp_path):
    lfw = shared_data / "lfw"
    small = tmp_path / "pairs.txt"  # the DevTest line that uses the missing Betsy_Coffin_0001, plus 3
    lines = (lfw / "pairsDevTest.txt").read_text().splitlines()
    small.write_text("\n".join(["2", *lines[1:3], lines[584], lines[585]]) + "\n")
    stats = pairs_to_bin(small, lfw / "aligned_112", tmp_path / "x.bin")
    assert stats == {"pairs": 3, "same": 2, "skipped": 1}
    assert BinVerificationSet(tmp_path / "x.bin").issame.tolist() == [True, True, False]
    with pytest.raises(FileNotFoundError, match="pairs.txt:4: image not found.*Betsy_Coffin_0001.jpg"):
        pairs_to_bin(small, lfw / "aligned_112", tmp_path / "y.bin", missing="error")
    assert not (tmp_path / "y.bin").exists()


def test_tiny_images_are_skipped_by_the_converter(tmp_path):
    root = write_jpeg_folder(tmp_path / "faces", identities=2, per_identity=2)
    write_image(root / "id01" / "9.png", np.zeros((1, 1, 3), np.uint8))
    (root / "id00" / "9.jpg").write_bytes(b"")
    stats = folder_to_rec(root, tmp_path / "rec")
    assert stats["images"] == 4 and stats["small_images"] == 1 and stats["corrupt_images"] == 1
    with pytest.raises(DecodeError, match=r"id01/9\.png: 1x1 pixels, below the minimum side of 28"):
        folder_to_rec(root, tmp_path / "x", strict=True, identities=["id01"])
    with pytest.raises(DecodeError, match=r"id00/0\.jpg: 112x112 pixels, below the minimum side of 200"):
        folder_to_rec(root, tmp_path / "y", min_image_size=200, strict=True)
    out = cli("facerec-folder-to-rec", root, tmp_path / "kept", "--min-image-size", "0")
    assert "5 images" in out and "0 small_images" in out and "1 corrupt_images" in out

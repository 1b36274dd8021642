"""Image folders, identity lists, decoding of other formats and sizes, LFW pairs files (real LFW and ORL)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from data_helpers import smooth_image, write_image, write_jpeg_folder
from facerec.data import DecodeError, ImageFolderDataset, ImageFolderPairs, LfwPairs, NoAugment, decode_image, read_pairs
from facerec.data.image_folder import read_identity_list


def test_decoder_matches_pillow_on_real_lfw(shared_data):
    files = sorted((shared_data / "lfw" / "aligned_112").glob("A*/*.jpg"))[:200]
    for file in files:
        data = file.read_bytes()
        assert np.array_equal(decode_image(data), np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))), file


def test_other_formats_sizes_and_greyscale(tmp_path):
    rng = np.random.default_rng(0)
    grey = write_image(tmp_path / "g.png", smooth_image(rng, 112, 92, 1))
    image = decode_image(grey.read_bytes())
    assert image.shape == (112, 112, 3) and image.dtype == np.uint8
    assert np.array_equal(image[..., 0], image[..., 2])  # grey replicated
    big = write_image(tmp_path / "b.bmp", smooth_image(rng, 250, 250))
    assert decode_image(big.read_bytes(), size=64).shape == (64, 64, 3)
    # The size policy keeps the aspect ratio: a 92-wide, 112-high image is scaled to 112 x 136 and
    # cropped, so its centre column stays in the centre.
    stripe = np.zeros((112, 92, 3), np.uint8)
    stripe[:, 44:48] = 255
    fitted = decode_image(write_image(tmp_path / "s.png", stripe).read_bytes())
    assert fitted[:, 54:58].mean() > 200 and fitted[:, :40].max() < 30
    with pytest.raises(DecodeError, match="not a readable image"):
        decode_image(b"GIF89a-broken")
    jpeg = (tmp_path / "j.jpg")
    Image.fromarray(smooth_image(rng)).save(jpeg, quality=90)
    with pytest.raises(DecodeError, match="corrupt JPEG"):
        decode_image(jpeg.read_bytes()[:800])


def test_identity_lists(tmp_path):
    (tmp_path / "plain.txt").write_text("b\na\n\n")
    assert read_identity_list(tmp_path / "plain.txt") == ["b", "a"]
    (tmp_path / "people.txt").write_text("2\nAl\t3\nBo\t1\n1\nCy\t2\n")  # LFW people.txt: counts between folds
    assert read_identity_list(tmp_path / "people.txt") == ["Al", "Bo", "Cy"]
    (tmp_path / "bad.txt").write_text("2\nAl\t3\nBo\n")
    with pytest.raises(ValueError, match="bad.txt:3: expected 'name<TAB>count'"):
        read_identity_list(tmp_path / "bad.txt")


def test_folder_skips_non_images_and_empty_identities(tmp_path, caplog):
    root = write_jpeg_folder(tmp_path / "faces", identities=3, per_identity=2)
    (root / "id01" / "notes.txt").write_text("not an image")
    (root / "id01" / ".DS_Store").write_bytes(b"\0")
    (root / "empty").mkdir()
    write_image(root / "id99" / "a.pgm", smooth_image(np.random.default_rng(0), 112, 92, 1))
    dataset = ImageFolderDataset(root, augment=NoAugment())
    assert dataset.scan.names == ["id00", "id01", "id02", "id99"] and dataset.num_classes == 4
    assert len(dataset) == 7 and dataset.scan.skipped_files == 2 and dataset.scan.empty_identities == ["empty"]
    assert "skipped 2 files without an image suffix" in caplog.text
    assert "skipped 1 identity folders without images" in caplog.text
    image, label = dataset[6]
    assert image.shape == (3, 112, 112) and label == 3
    subset = ImageFolderDataset(root, identities=["id02", "id00"])
    assert subset.scan.names == ["id02", "id00"] and [subset[i][1] for i in range(4)] == [0, 0, 1, 1]
    with pytest.raises(FileNotFoundError, match="1 listed identities have no folder.*'ghost'"):
        ImageFolderDataset(root, identities=["id00", "ghost"])
    with pytest.raises(ValueError, match="repeats 1 names, e.g. \\['id00'\\]"):
        ImageFolderDataset(root, identities=["id00", "id01", "id00"])
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        ImageFolderDataset(tmp_path / "nowhere")


def test_corrupt_image_is_replaced_or_raises(tmp_path, caplog):
    root = write_jpeg_folder(tmp_path / "faces", identities=2, per_identity=2)
    bad = root / "id01" / "0.jpg"
    bad.write_bytes(bad.read_bytes()[:600])
    dataset = ImageFolderDataset(root)
    image, label = dataset[2]
    assert image.shape == (3, 112, 112) and dataset.replaced == 1
    assert f"{bad}: corrupt JPEG" in caplog.text and "replaced by sample" in caplog.text
    with pytest.raises(DecodeError, match=f"{bad}: corrupt JPEG"):
        ImageFolderDataset(root, strict=True)[2]
    for path in root.rglob("*.jpg"):
        path.write_bytes(b"\xff\xd8 not an image")
    with pytest.raises(RuntimeError, match="16 samples in a row did not decode"):
        ImageFolderDataset(root)[0]


def test_orl_greyscale_becomes_rgb_112(shared_data):
    dataset = ImageFolderDataset(shared_data / "orl", identities=["s1", "s2"], augment=NoAugment())
    assert len(dataset) == 20 and dataset.num_classes == 2
    image, label = dataset[12]
    assert image.shape == (3, 112, 112) and label == 1
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    pairs = ImageFolderPairs(shared_data / "orl", identities=[f"s{i}" for i in range(31, 41)], num_pairs=400)
    assert len(pairs) == 100 and pairs.issame.sum() == 200
    labels = pairs.scan.labels
    assert np.array_equal(labels[pairs.pairs[:, 0]] == labels[pairs.pairs[:, 1]], pairs.issame)


def test_lfw_view2_pairs(shared_data):
    lfw = shared_data / "lfw"
    parsed = read_pairs(lfw / "pairs.txt")
    assert len(parsed.images) == 6000 and parsed.issame.sum() == 3000
    assert np.array_equal(parsed.folds, np.repeat(np.arange(10), 600))
    assert parsed.issame[:300].all() and not parsed.issame[300:600].any()
    view2 = LfwPairs(lfw / "aligned_112", lfw / "pairs.txt")
    assert len(view2.issame) == 6000 and not view2.skipped_lines
    assert len(view2) == len({str(p) for p in view2.paths}) == 7701  # distinct images used by View 2
    first = view2.pairs[0]
    assert [view2.paths[i].name for i in first] == ["Abel_Pacheco_0001.jpg", "Abel_Pacheco_0004.jpg"]
    image, _ = view2[int(first[1])]
    assert image.shape == (3, 112, 112)


def test_lfw_devtest_reports_the_missing_image(shared_data, caplog):
    lfw = shared_data / "lfw"
    devtest = LfwPairs(lfw / "aligned_112", lfw / "pairsDevTest.txt", name="lfw_devtest")
    assert devtest.skipped_lines == [585] and len(devtest.issame) == 999
    assert devtest.issame.sum() == 500 and devtest.folds is None  # the missing pair is a different-person pair
    assert "pairsDevTest.txt:585: skipped pair, image not found" in caplog.text and "Betsy_Coffin_0001.jpg" in caplog.text
    assert "1 of 1000 pairs skipped" in caplog.text
    line = (lfw / "pairsDevTest.txt").read_text().splitlines()[585]  # line 586: after the skipped one, still aligned
    name_a, n_a, name_b, n_b = line.split("\t")
    assert [p.name for p in (devtest.paths[i] for i in devtest.pairs[583])] == [
        f"{name_a}_{int(n_a):04d}.jpg",
        f"{name_b}_{int(n_b):04d}.jpg",
    ]
    with pytest.raises(FileNotFoundError, match="pairsDevTest.txt:585: image not found.*Betsy_Coffin_0001"):
        LfwPairs(lfw / "aligned_112", lfw / "pairsDevTest.txt", missing="error")


def test_malformed_pairs_files(tmp_path):
    (tmp_path / "p.txt").write_text("1\nA\t1\t2\nB\t1\t3\n")
    with pytest.raises(ValueError, match="p.txt:3: expected a different-person"):
        read_pairs(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("2\t1\nA\t1\t2\nB\t1\tC\t1\n")
    with pytest.raises(ValueError, match="promises 2 x 2 x 1 pairs, the file has 2 lines"):
        read_pairs(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("pairs\n")
    with pytest.raises(ValueError, match="p.txt:1: expected a header"):
        read_pairs(tmp_path / "p.txt")


def test_tiny_and_empty_images_are_replaced_and_counted_or_refused(tmp_path, caplog):
    root = write_jpeg_folder(tmp_path / "faces", identities=2, per_identity=3)
    tiny = write_image(root / "id00" / "9.png", np.full((1, 1, 3), 128, np.uint8))
    small = write_image(root / "id01" / "8.png", smooth_image(np.random.default_rng(0), 20, 40))
    empty = root / "id01" / "9.jpg"
    empty.write_bytes(b"")
    dataset = ImageFolderDataset(root, augment=NoAugment())
    assert len(dataset) == 9
    samples = [dataset[i] for i in range(len(dataset))]
    # each bad file once, and again wherever a replacement drew it: counted every time
    assert dataset.replaced >= 3 and all(image.shape == (3, 112, 112) for image, _ in samples)
    assert f"{tiny}: 1x1 pixels, below the minimum side of 28 (min_image_size)" in caplog.text
    assert f"{small}: 40x20 pixels, below the minimum side of 28" in caplog.text
    assert f"{empty}: the file is empty (0 bytes)" in caplog.text and "BytesIO" not in caplog.text
    for index, path in ((3, tiny), (7, small), (8, empty)):
        assert dataset.scan.path(index) == path
        with pytest.raises(DecodeError, match=str(path)):
            ImageFolderDataset(root, strict=True)[index]
    kept = ImageFolderDataset(root, augment=NoAugment(), min_image_size=0)  # 0 takes any size
    assert kept[3][0].shape == (3, 112, 112) and kept.replaced == 0
    assert ImageFolderDataset(root, augment=NoAugment(), min_image_size=20)[7] and ImageFolderDataset(root, min_image_size=20).min_image_size == 20
    with pytest.raises(DecodeError, match=r"the file is empty \(0 bytes\)"):
        decode_image(b"")

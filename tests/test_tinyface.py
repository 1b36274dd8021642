"""TinyFace 1:N (facerec.data.tinyface, TinyFaceIdentification) on a look-alike built from the real LFW crops."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_config
from PIL import Image

from facerec.data.tinyface import scan_tinyface
from facerec.evaluation.evalsets import build_protocols
from facerec.evaluation.protocols import TinyFaceIdentification


def make_tinyface_fixture(
    out: Path, lfw: Path, people: int = 20, distractors: int = 30, max_probes: int = 4
) -> tuple[Path, dict[str, list[str]]]:
    """A set in TinyFace's test layout under out/tinyface: of the first `people` LFW people (sorted
    names) with >= 3 images, image 1 goes to Gallery_Match as `<k>_1.jpg` (k = 1..people) and up to
    `max_probes` others to Probe as `<k>_<n>.jpg`; the first `distractors` single-image people go to
    Gallery_Distractor. Every image is shrunk to a small, non-square, TinyFace-like size (16-24 x 20-28
    pixels). Returns the root and {folder: the LFW people in it, in file order}."""
    names = sorted(p.name for p in lfw.iterdir() if p.is_dir())
    files = {name: sorted((lfw / name).iterdir()) for name in names}
    several = [name for name in names if len(files[name]) >= 3][:people]
    singles = [name for name in names if len(files[name]) == 1][:distractors]
    root = out / "tinyface"
    testing = root / "Testing_Set"
    for folder in ("Probe", "Gallery_Match", "Gallery_Distractor"):
        (testing / folder).mkdir(parents=True)
    count = 0

    def shrink(source: Path, target: Path) -> None:
        nonlocal count
        size = (16 + 4 * (count % 3), 20 + 4 * (count % 2))  # (width, height)
        Image.open(source).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        count += 1

    for k, name in enumerate(several, 1):
        first, *others = files[name]
        shrink(first, testing / "Gallery_Match" / f"{k}_1.jpg")
        for n, image in enumerate(others[:max_probes], 2):
            shrink(image, testing / "Probe" / f"{k}_{n}.jpg")
    for k, name in enumerate(singles):
        shrink(files[name][0], testing / "Gallery_Distractor" / f"{k:03d}_distractor.jpg")
    return root, {"Gallery_Match": several, "Gallery_Distractor": singles}


def identity_features(paths: list[Path], rng, dim: int = 32, noise: float = 1.1) -> np.ndarray:
    """Features with identity structure: a random centre per Probe/Gallery_Match identity (file-name
    prefix) plus noise; distractors (and their own centres) drawn at random, un-normalised."""
    centres = {}
    rows = []
    for path in paths:
        key = path.name if path.parent.name == "Gallery_Distractor" else path.name.split("_")[0]
        centre = centres.setdefault(key, rng.standard_normal(dim))
        rows.append((centre + noise * rng.standard_normal(dim)) * rng.uniform(0.5, 3.0))
    return np.asarray(rows, dtype=np.float32)


def nearest_neighbour_cmc(features: np.ndarray, paths: list[Path], gallery, probes, ranks) -> dict[int, float]:
    """The plain reference: each probe against every gallery image by cosine, one probe at a time; a hit
    at rank r when an image of its identity (file-name prefix) is among the r best gallery images."""
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    gallery_identity = [paths[g].name.split("_")[0] if paths[g].parent.name == "Gallery_Match" else None for g in gallery]
    hits = {rank: 0 for rank in ranks}
    for p in probes:
        scores = [float(np.dot(unit[p], unit[g])) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: -scores[j])
        identity = paths[p].name.split("_")[0]
        for rank in ranks:
            hits[rank] += any(gallery_identity[j] == identity for j in order[:rank])
    return {rank: hits[rank] / len(probes) for rank in ranks}


def test_the_split_follows_the_folders(shared_data, tmp_path):
    root, people = make_tinyface_fixture(tmp_path, shared_data / "lfw" / "aligned_112")
    testing = root / "Testing_Set"
    probe_files = sorted((testing / "Probe").iterdir())
    protocol = TinyFaceIdentification(root, image_size=32)
    split = protocol.split
    assert (split.num_enrolled, split.num_distractors) == (20, 30)
    assert len(split.gallery) == 50 and len(split.probes) == len(probe_files) and len(split.paths) == 50 + len(probe_files)
    assert sorted(split.paths[i] for i in split.probes) == probe_files
    assert all(split.paths[i].parent.name == "Gallery_Match" for i in split.gallery[:20])
    assert split.gallery_ids[20:].tolist() == list(range(-1, -31, -1))  # distractor k: -1 - k
    # An id is one identity (file-name prefix) on both sides; the 20 match ids are 0..19.
    match_prefix = {int(i): split.paths[g].name.split("_")[0] for g, i in zip(split.gallery[:20], split.gallery_ids[:20])}
    assert sorted(match_prefix) == list(range(20)) and len(set(match_prefix.values())) == 20
    assert all(match_prefix[int(i)] == split.paths[p].name.split("_")[0] for p, i in zip(split.probes, split.probe_ids))
    assert len(people["Gallery_Match"]) == 20 and len(people["Gallery_Distractor"]) == 30

    # Small non-square crops come out at image_size (shorter side scaled up, centre crop).
    with Image.open(split.paths[0]) as image:
        assert image.size != (32, 32) and min(image.size) < 32
    image, index = protocol.image_set()[0]
    assert image.shape == (3, 32, 32) and index == 0 and -1 <= image.min() and image.max() <= 1

    # A copy without the Testing_Set level (AdaFace's aligned release) reads the same with testing_set="".
    flat = TinyFaceIdentification(testing, testing_set="")
    assert [p.relative_to(testing) for p in flat.split.paths] == [p.relative_to(testing) for p in split.paths]
    assert flat.image_set()[0][0].shape == (3, 112, 112)


def test_rank_one_matches_a_nearest_neighbour_loop(shared_data, tmp_path):
    root, _ = make_tinyface_fixture(tmp_path, shared_data / "lfw" / "aligned_112")
    protocol = TinyFaceIdentification(root)
    split = protocol.split
    features = identity_features(split.paths, np.random.default_rng(0))
    result = protocol.score(features)

    expected = nearest_neighbour_cmc(features, split.paths, split.gallery, split.probes, (1, 5, 20))
    assert 0.2 < expected[1] < 0.9 and expected[5] > expected[1]  # every rank matters on these features
    assert result.cmc == pytest.approx(expected, abs=0)  # one Gallery_Match image per person: image rank = identity rank
    assert (result.num_mated, result.num_non_mated, result.gallery_size) == (len(split.probes), 0, 50)
    assert result.tpir_at_fpir == {} and result.gallery == "20 ids + 30 distractors"
    assert split.description in result.notes and "closed set" in split.description
    assert result.table_row()["TPIR@FPIR=1e-02 (%)"] == "n/a" and result.summary().keys() == {"rank1", "rank5", "rank20"}


def test_layout_errors_name_the_path(shared_data, tmp_path):
    root, _ = make_tinyface_fixture(tmp_path, shared_data / "lfw" / "aligned_112", people=6, distractors=3)
    testing = root / "Testing_Set"
    with pytest.raises(FileNotFoundError, match=f"TinyFace not found: {tmp_path / 'absent'} is not a folder"):
        scan_tinyface(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=rf"missing folder\(s\) {root / 'Probe'}, .*expected <root>/Testing_Set/"):
        scan_tinyface(root, testing_set="")  # root itself holds no Probe/ ...

    shutil.move(testing / "Gallery_Distractor", tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match=f"missing folder\\(s\\) {testing / 'Gallery_Distractor'} "):
        TinyFaceIdentification(root)
    shutil.move(tmp_path / "moved", testing / "Gallery_Distractor")

    unnamed = testing / "Probe" / "face.jpg"
    shutil.copy(next((testing / "Probe").iterdir()), unnamed)
    with pytest.raises(ValueError, match=f"{unnamed}: a TinyFace Probe image is named '<identity>_<n>.<ext>'"):
        scan_tinyface(root)
    unnamed.rename(testing / "Probe" / "_2.jpg")  # an empty prefix is no identity either
    with pytest.raises(ValueError, match="_2.jpg: a TinyFace Probe image is named"):
        scan_tinyface(root)

    (testing / "Probe" / "_2.jpg").rename(testing / "Probe" / "99_2.jpg")  # closed set: identity 99 has no gallery image
    unmatched = testing / "Probe" / "99_2.jpg"
    with pytest.raises(ValueError, match=f"1 probe images have no Gallery_Match image .* e.g. {unmatched}"):
        scan_tinyface(root)
    (testing / "Probe" / "99_2.jpg").unlink()
    (testing / "Probe" / "notes.txt").write_text("not an image")  # skipped and counted
    assert scan_tinyface(root).skipped_files == 1

    with pytest.raises(TypeError, match=r"\['min_images'\] choose a split, but TinyFace's folders fix it"):
        TinyFaceIdentification(root, min_images=3)


def test_the_config_composes_and_reads_the_fixture(shared_data, tmp_path):
    root, _ = make_tinyface_fixture(tmp_path / "data", shared_data / "lfw" / "aligned_112", people=8, distractors=5)
    overrides = ["ckpt_path=unused", "eval_sets=[tinyface]", f"paths.data_dir={tmp_path / 'data'}"]
    cfg = compose_config(overrides, tmp_path / "run", config_name="eval")
    assert cfg.evalset.tinyface.root == str(root)
    protocol = build_protocols(cfg, ["tinyface"])["tinyface"]
    assert isinstance(protocol, TinyFaceIdentification)
    assert (protocol.split.num_enrolled, protocol.split.num_distractors) == (8, 5)
    assert protocol.search["ranks"] == (1, 5, 20) and protocol.search["fpirs"] == ()
    assert protocol.image_set()[0][0].shape == (3, 112, 112)

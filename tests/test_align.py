"""5-point alignment: the least-squares similarity, recovery of the IJB fixture's crops, the CLI."""
from __future__ import annotations

import json
import sys

import cv2
import numpy as np
import pytest

from facerec.data.align import ARCFACE_TEMPLATE, align_face, main, require_cv2, similarity_transform
from facerec.tools.make_fixture import make_ijb_fixture


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return make_ijb_fixture(tmp_path_factory.mktemp("ijb"), "IJBC")


def fixture_images(root):
    """(name, landmarks (5, 2), truth entry) per loose crop of the fixture."""
    truth = json.loads((root / "fixture_truth.json").read_text())
    for row in (root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines():
        fields = row.split()
        yield fields[0], np.array(fields[1:11], dtype=np.float64).reshape(5, 2), truth, truth["images"][fields[0]]


def rgb(path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / mse))


def test_transform_is_the_least_squares_similarity_of_noisy_points():
    """Independent check: a similarity [[a, -b, tx], [b, a, ty]] is linear in (a, b, tx, ty), so the
    least-squares one is np.linalg.lstsq's solution (the estimate skimage's SimilarityTransform gives)."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        angle, scale = rng.uniform(-np.pi / 3, np.pi / 3), rng.uniform(0.3, 3)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        landmarks = ARCFACE_TEMPLATE @ rotation.T + rng.uniform(-50, 200, 2) + rng.normal(0, 3, (5, 2))
        x, y = landmarks[:, 0], landmarks[:, 1]
        one, zero = np.ones(5), np.zeros(5)
        design = np.concatenate([np.stack([x, -y, one, zero], 1), np.stack([y, x, zero, one], 1)])
        target = np.concatenate([ARCFACE_TEMPLATE[:, 0], ARCFACE_TEMPLATE[:, 1]])
        (a, b, tx, ty), *_ = np.linalg.lstsq(design, target, rcond=None)
        np.testing.assert_allclose(similarity_transform(landmarks), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_template_landmarks_give_the_identity():
    np.testing.assert_allclose(similarity_transform(ARCFACE_TEMPLATE), np.eye(2, 3), atol=1e-12)


def test_alignment_recovers_the_fixture_crops_above_35_db(fixture_root):
    """Each loose crop (the LFW crop warped by a known similarity, upscaled 1.3-2x, JPEG 95) aligned
    back from its landmarks matches the LFW crop: measured min 40.0 dB, mean 46.5 dB PSNR over the
    default fixture's 153 images (seed 0); the estimate inverts the known transform."""
    values = []
    for name, landmarks, truth, entry in fixture_images(fixture_root):
        aligned_to_loose = np.vstack([entry["aligned_to_loose"], [0, 0, 1]])
        estimate = np.vstack([similarity_transform(landmarks), [0, 0, 1]])
        # Landmarks are written with 3 decimals, so the estimate is exact to about 1e-3.
        np.testing.assert_allclose(estimate @ aligned_to_loose, np.eye(3), atol=2e-3)
        aligned = align_face(rgb(fixture_root / "loose_crop" / name), landmarks)
        assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
        values.append(psnr(aligned, rgb(f"{truth['lfw_root']}/{entry['source']}")))
    assert min(values) > 35 and np.mean(values) > 42, (min(values), np.mean(values))


def test_align_face_rejects_bad_input():
    image = np.zeros((200, 200, 3), np.uint8)
    with pytest.raises(ValueError, match=r"5 \(x, y\) points.*shape \(4, 2\)"):
        align_face(image, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="finite"):
        align_face(image, np.full((5, 2), np.nan))
    with pytest.raises(ValueError, match="must not all coincide"):
        align_face(image, np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8.*float64"):
        align_face(image.astype(np.float64), ARCFACE_TEMPLATE)


def test_missing_opencv_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match=r"facerec\[eval\]"):
        require_cv2()


def test_cli_aligns_a_landmark_file(fixture_root, tmp_path, capsys):
    landmark_file = tmp_path / "landmarks.txt"
    lines = (fixture_root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()[:5]
    # Nested relative paths, one line without a score.
    nested = tmp_path / "images" / "set"
    nested.mkdir(parents=True)
    rows = []
    for number, row in enumerate(lines):
        name, *values = row.split()
        (nested / name).write_bytes((fixture_root / "loose_crop" / name).read_bytes())
        rows.append(" ".join([f"set/{name}", *(values[:10] if number == 0 else values)]))
    landmark_file.write_text("\n".join(rows) + "\n")
    assert main(["--landmarks", str(landmark_file), "--images", str(tmp_path / "images"), "--out", str(tmp_path / "out")]) == 0
    assert "aligned 5 images" in capsys.readouterr().out
    truth = json.loads((fixture_root / "fixture_truth.json").read_text())
    for row in lines:
        name = row.split()[0]
        written = rgb(tmp_path / "out" / "set" / name)
        reference = rgb(f"{truth['lfw_root']}/{truth['images'][name]['source']}")
        assert written.shape == (112, 112, 3) and psnr(written, reference) > 33  # one more JPEG pass


def test_cli_errors_name_the_file_and_line(fixture_root, tmp_path):
    name = "1.jpg"
    values = (fixture_root / "meta" / "ijbc_name_5pts_score.txt").read_text().splitlines()[0].split()[1:]
    landmark_file = tmp_path / "landmarks.txt"
    landmark_file.write_text(f"{name} {' '.join(values)}\n\n{name} 1 2 3\n")
    args = ["--landmarks", str(landmark_file), "--images", str(fixture_root / "loose_crop"), "--out", str(tmp_path / "out")]
    with pytest.raises(ValueError, match=rf"{landmark_file}:3: expected .*11 or 12 values\), got 4"):
        main(args)
    landmark_file.write_text(f"{name} {' '.join(values)}\nabsent.jpg {' '.join(values)}\n")
    with pytest.raises(FileNotFoundError, match=rf"{landmark_file}:2: image not found: .*absent.jpg"):
        main(args)
    assert not (tmp_path / "out").exists()  # nothing written before every line is checked
    landmark_file.write_text(f"{name} {' '.join(values[:9])} x {values[10]}\n")
    with pytest.raises(ValueError, match=rf"{landmark_file}:1: landmarks and score must be numbers"):
        main(args)

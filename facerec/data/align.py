"""5-point face alignment to the ArcFace 112x112 template, and the `facerec-align` console script.

The transform is the least-squares similarity (rotation, uniform scale, translation) taking the
five detected landmarks (left eye, right eye, nose tip, left and right mouth corners, in image
pixels) onto the template: Umeyama's closed form, the estimate `skimage.transform.SimilarityTransform`
and insightface's `norm_crop` use. OpenCV's `estimateAffinePartial2D` is not used: its robust
methods (RANSAC, LMEDS) fit a subset of the points, not all five by least squares. The warp is
`cv2.warpAffine`, bilinear, black outside the image, as in `norm_crop`.

    facerec-align --landmarks FILE --images DIR --out DIR

FILE holds lines `relative/path x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 [score]` (IJB's `*_name_5pts_score.txt`
layout); each image DIR/relative/path is aligned and written as a JPEG (quality 95) to OUT/relative/path,
its suffix made .jpg. Every line and image is checked before anything is written.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ALIGNED_SIZE = 112
# Left eye, right eye, nose tip, left mouth corner, right mouth corner in the 112x112 crop.
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ],
    dtype=np.float64,
)
JPEG_QUALITY = 95


def require_cv2():
    """OpenCV, or an ImportError that names the extra that installs it."""
    try:
        import cv2
    except ImportError as error:
        raise ImportError(
            "face alignment needs OpenCV: pip install 'facerec[eval]' (opencv-python-headless)"
        ) from error
    return cv2


def umeyama_similarity(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity taking `source` (N, 2) points onto `target` (N, 2) points.

    Umeyama (1991), eq. 40-42: rotation from the SVD of the cross-covariance (a reflection is
    never chosen), scale = trace(D S) / variance of the source, translation from the means.
    """
    source, target = np.asarray(source, np.float64), np.asarray(target, np.float64)
    source_mean, target_mean = source.mean(0), target.mean(0)
    centred_source, centred_target = source - source_mean, target - target_mean
    source_variance = (centred_source**2).sum(1).mean()
    if source_variance == 0:
        raise ValueError(f"landmarks must not all coincide, got {source.tolist()}")
    covariance = centred_target.T @ centred_source / len(source)
    u, singular, vt = np.linalg.svd(covariance)
    signs = np.array([1.0, -1.0 if np.linalg.det(covariance) < 0 else 1.0])
    rotation = u @ np.diag(signs) @ vt
    scale = (singular * signs).sum() / source_variance
    translation = target_mean - scale * rotation @ source_mean
    return np.hstack([scale * rotation, translation[:, None]])


def _landmarks(landmarks) -> np.ndarray:
    points = np.asarray(landmarks, dtype=np.float64)
    if points.shape == (10,):
        points = points.reshape(5, 2)
    if points.shape != (5, 2):
        raise ValueError(f"landmarks must be 5 (x, y) points, shape (5, 2) or (10,), got shape {points.shape}")
    if not np.isfinite(points).all():
        raise ValueError(f"landmarks must be finite, got {points.tolist()}")
    return points


def similarity_transform(landmarks) -> np.ndarray:
    """(2, 3) matrix taking image pixels to the 112x112 crop: `landmarks` (5, 2) onto ARCFACE_TEMPLATE."""
    return umeyama_similarity(_landmarks(landmarks), ARCFACE_TEMPLATE)


def align_face(image: np.ndarray, landmarks) -> np.ndarray:
    """(112, 112, 3) uint8 crop of `image` (H, W, 3) uint8 RGB given its 5 landmarks (5, 2) in pixels."""
    cv2 = require_cv2()
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}")
    matrix = similarity_transform(landmarks)
    return cv2.warpAffine(image, matrix, (ALIGNED_SIZE, ALIGNED_SIZE), flags=cv2.INTER_LINEAR, borderValue=0)


@dataclass
class LandmarkLine:
    path: str
    landmarks: np.ndarray  # (5, 2)
    score: float | None
    line: int  # 1-based


def read_landmark_file(path: str | Path) -> list[LandmarkLine]:
    """Lines `relative/path x1 y1 ... x5 y5 [score]`; a malformed line raises naming the file and line."""
    path = Path(path)
    entries = []
    for number, row in enumerate(path.read_text().splitlines(), 1):
        fields = row.split()
        if not fields:
            continue
        if len(fields) not in (11, 12):
            raise ValueError(
                f"{path}:{number}: expected 'image x1 y1 ... x5 y5 [score]' (11 or 12 values), "
                f"got {len(fields)}: {row.strip()!r}"
            )
        try:
            values = np.array(fields[1:], dtype=np.float64)
        except ValueError:
            raise ValueError(f"{path}:{number}: landmarks and score must be numbers, got {row.strip()!r}") from None
        score = float(values[10]) if len(values) == 11 else None
        entries.append(LandmarkLine(fields[0], values[:10].reshape(5, 2), score, number))
    return entries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="facerec-align", description="Align face images to the ArcFace 112x112 template from 5-point landmarks."
    )
    parser.add_argument("--landmarks", required=True, type=Path, help="lines 'relative/path x1 y1 ... x5 y5 [score]'")
    parser.add_argument("--images", required=True, type=Path, help="folder the relative paths start from")
    parser.add_argument("--out", required=True, type=Path, help="where the aligned JPEGs go, same relative paths")
    args = parser.parse_args(argv)
    cv2 = require_cv2()
    entries = read_landmark_file(args.landmarks)
    for entry in entries:  # every image is checked before any is written
        if not (args.images / entry.path).is_file():
            raise FileNotFoundError(f"{args.landmarks}:{entry.line}: image not found: {args.images / entry.path}")
    for entry in entries:
        source = args.images / entry.path
        # OpenCV reads BGR; the warp treats channels alike, so the pixels go through unconverted.
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError(f"{args.landmarks}:{entry.line}: not a readable image: {source}")
        target = (args.out / entry.path).with_suffix(".jpg")
        target.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(target), align_face(image, entry.landmarks), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    print(f"aligned {len(entries)} images from {args.landmarks} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

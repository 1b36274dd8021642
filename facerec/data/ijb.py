"""IJB-B / IJB-C in the layout insightface distributes (`IJB_release/IJBC`), and the 1:1 template protocol.

    <root>/loose_crop/<image_name>                  the detector's loose crops (e.g. 1.jpg ... 469375.jpg)
    <root>/meta/<ds>_face_tid_mid.txt               image_name template_id media_id
    <root>/meta/<ds>_name_5pts_score.txt            image_name x1 y1 ... x5 y5 faceness, same images, same order
    <root>/meta/<ds>_template_pair_label.txt        template_id template_id label (1 genuine, 0 impostor)

(ds = ijbc or ijbb.) Each loose crop is aligned to the ArcFace 112x112 template from its five
landmarks (facerec.data.align) when it is read. `IJBVerification` is the 1:1 evaluation protocol:
template pooling and TAR@FAR as in facerec.evaluation.templates (arcface_torch's eval_ijbc.py).
Bad input raises naming the file and line: a malformed line, a pair naming a template that has
no images, an image missing from loose_crop/.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facerec.data.align import align_face, require_cv2
from facerec.data.decode import DecodeError, normalise
from facerec.data.ijb_fixture import make_ijb_fixture, meta_prefix
from facerec.evaluation.protocols import EvaluationProtocol
from facerec.evaluation.templates import TEMPLATE_FARS, TemplateResult, verify_templates


@dataclass
class IJBMeta:
    """The meta files of one IJB set, one row per loose crop (face_tid_mid order)."""

    root: Path
    dataset: str
    image_names: list[str]  # (N,) relative to loose_crop/
    templates: np.ndarray  # (N,) int64 template id of each image
    medias: np.ndarray  # (N,) int64 media id of each image
    landmarks: np.ndarray  # (N, 5, 2) float64 pixels in the loose crop
    faceness: np.ndarray  # (N,) float64 detector score
    template_pairs: np.ndarray  # (P, 2) int64 template ids
    labels: np.ndarray  # (P,) int64 1 genuine / 0 impostor


def meta_file(root: Path, dataset: str, kind: str) -> Path:
    """root/meta/<ds>_<kind>.txt, e.g. kind 'face_tid_mid'."""
    return Path(root) / "meta" / f"{meta_prefix(dataset)}_{kind}.txt"


def _lines(path: Path) -> list[tuple[int, list[str]]]:
    """(1-based line number, fields) of each non-blank line."""
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    return [(number, row.split()) for number, row in enumerate(path.read_text().splitlines(), 1) if row.strip()]


def _int_fields(path: Path, number: int, fields: list[str], layout: str) -> list[int]:
    try:
        return [int(value) for value in fields]
    except ValueError:
        raise ValueError(f"{path}:{number}: expected '{layout}' with integer ids, got {' '.join(fields)!r}") from None


def read_template_media(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(image names, template ids, media ids) from a `<ds>_face_tid_mid.txt` file."""
    names, ids = [], []
    for number, fields in _lines(path):
        if len(fields) != 3:
            raise ValueError(f"{path}:{number}: expected 'image_name template_id media_id' (3 values), got {len(fields)}")
        names.append(fields[0])
        ids.append(_int_fields(path, number, fields[1:], "image_name template_id media_id"))
    table = np.asarray(ids, dtype=np.int64).reshape(-1, 2)
    return names, table[:, 0], table[:, 1]


def read_landmarks(path: Path) -> tuple[list[str], np.ndarray, np.ndarray, list[int]]:
    """(image names, landmarks (N, 5, 2), faceness (N,), line numbers) from a `<ds>_name_5pts_score.txt` file."""
    names, values, numbers = [], [], []
    for number, fields in _lines(path):
        if len(fields) != 12:
            raise ValueError(
                f"{path}:{number}: expected 'image_name x1 y1 ... x5 y5 faceness' (12 values), got {len(fields)}"
            )
        try:
            values.append([float(value) for value in fields[1:]])
        except ValueError:
            raise ValueError(f"{path}:{number}: landmarks and faceness must be numbers, got {' '.join(fields)!r}") from None
        names.append(fields[0])
        numbers.append(number)
    table = np.asarray(values, dtype=np.float64).reshape(-1, 11)
    return names, table[:, :10].reshape(-1, 5, 2), table[:, 10], numbers


def read_template_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """((P, 2) template ids, (P,) labels) from a `<ds>_template_pair_label.txt` file (IJB-C: 15.7 M lines).

    numpy's C parser reads the file; where it fails, a line-by-line scan names the bad line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"IJB meta file not found: {path}")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError:
        table = None
    if table is None or table.shape[1] != 3:
        for number, fields in _lines(path):
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected 'template_id template_id label' (3 values), got {len(fields)}")
            _int_fields(path, number, fields, "template_id template_id label")
        raise ValueError(f"{path}: could not read lines 'template_id template_id label' (is the file empty?)")
    bad = np.flatnonzero(~np.isin(table[:, 2], (0, 1)))
    if len(bad):
        raise ValueError(f"{path}:{_line_of_row(path, int(bad[0]))}: label must be 0 or 1, got {table[bad[0], 2]}")
    return table[:, :2], table[:, 2]


def _line_of_row(path: Path, row: int) -> int:
    """The 1-based line number of the row-th (0-based) non-blank line of `path`."""
    return _lines(path)[row][0]


def read_ijb_meta(root: str | Path, dataset: str = "IJBC", check_images: bool = True, pairs: bool = True) -> IJBMeta:
    """Read and cross-check the meta files of root (an IJB_release/IJBC-style folder). pairs=False
    skips the 1:1 template pair file (15.7 M lines for IJB-C), which the 1:N protocol does not use."""
    root = Path(root)
    tid_mid, five_points = meta_file(root, dataset, "face_tid_mid"), meta_file(root, dataset, "name_5pts_score")
    names, templates, medias = read_template_media(tid_mid)
    landmark_names, landmarks, faceness, landmark_lines = read_landmarks(five_points)
    if len(landmark_names) != len(names):
        raise ValueError(
            f"{five_points} lists {len(landmark_names)} images, {tid_mid} lists {len(names)}; "
            "they must match line for line"
        )
    mismatch = next((i for i, (a, b) in enumerate(zip(names, landmark_names)) if a != b), None)
    if mismatch is not None:
        raise ValueError(
            f"{five_points}:{landmark_lines[mismatch]}: image {landmark_names[mismatch]!r}, but image {mismatch + 1} of "
            f"{tid_mid} is {names[mismatch]!r}; the files must list the same images in the same order"
        )
    if check_images:
        for name, number in zip(names, landmark_lines):
            if not (root / "loose_crop" / name).is_file():
                raise FileNotFoundError(f"{five_points}:{number}: image not found: {root / 'loose_crop' / name}")
    if not pairs:
        no_pairs = np.empty((0, 2), dtype=np.int64)
        return IJBMeta(root, dataset, names, templates, medias, landmarks, faceness, no_pairs, no_pairs[:, 0])
    pair_file = meta_file(root, dataset, "template_pair_label")
    template_pairs, labels = read_template_pairs(pair_file)
    known = np.unique(templates)
    unknown = np.flatnonzero(~np.isin(template_pairs, known).all(axis=1))
    if len(unknown):
        row = int(unknown[0])
        missing = [int(t) for t in template_pairs[row] if not np.isin(t, known)]
        raise ValueError(
            f"{pair_file}:{_line_of_row(pair_file, row)}: template {missing[0]} has no images in {tid_mid} "
            f"({len(unknown)} pairs name unknown templates)"
        )
    return IJBMeta(root, dataset, names, templates, medias, landmarks, faceness, template_pairs, labels)


def ensure_fixture(root: Path, dataset: str, num_templates: int) -> None:
    """Write the LFW-based IJB fixture (facerec.data.ijb_fixture) at root when it has no meta/ yet."""
    if (root / "meta").is_dir():
        return
    if root.name != dataset:
        raise ValueError(f"build_fixture writes <folder>/{dataset}; root must end in {dataset!r}, got {root}")
    make_ijb_fixture(root.parent, dataset, num_templates=num_templates)


class IJBImages(Dataset):
    """(image, index): the loose crop `index` aligned to 112x112, (3, 112, 112) float32, (x - 127.5) / 127.5."""

    def __init__(self, meta: IJBMeta):
        self.meta = meta
        self.folder = meta.root / "loose_crop"

    def __len__(self) -> int:
        return len(self.meta.image_names)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"{self.meta.dataset}: image index {index} out of range [0, {len(self)})")
        cv2 = require_cv2()
        path = self.folder / self.meta.image_names[index]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            raise DecodeError(f"{path}: not a readable image")
        rgb = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        return normalise(align_face(rgb, self.meta.landmarks[index])), index


class IJBVerification(EvaluationProtocol):
    """IJB-B / IJB-C 1:1 template verification (the `<ds>_template_pair_label.txt` pairs).

    root: the set's folder (IJB_release/IJBC); use_faceness: weight images by the detector score
    (arcface_torch's default, "D1"); keep_norms: pool un-normalised features ("N1"); fusion: "mean"
    (arcface_torch) or "norm_weighted" (see facerec.evaluation.templates). build_fixture: when root
    has no meta/ folder, write the LFW-based fixture there first (facerec.data.ijb_fixture; root must
    then end in the dataset name, e.g. logs/fixtures/IJBC).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "IJBC",
        name: str | None = None,
        use_faceness: bool = True,
        keep_norms: bool = True,
        fusion: str = "mean",
        fars=TEMPLATE_FARS,
        build_fixture: bool = False,
        fixture_templates: int = 60,
    ):
        root = Path(root)
        if build_fixture:
            ensure_fixture(root, dataset, fixture_templates)
        self.meta = read_ijb_meta(root, dataset)
        self.name = name or dataset.lower()
        self.use_faceness, self.keep_norms, self.fusion = bool(use_faceness), bool(keep_norms), fusion
        self.fars = tuple(fars)

    def image_set(self) -> IJBImages:
        return IJBImages(self.meta)

    def score(self, features: np.ndarray) -> TemplateResult:
        features = np.asarray(features)
        if features.ndim != 2 or len(features) != len(self.meta.image_names):
            raise ValueError(
                f"{self.name}: features must be ({len(self.meta.image_names)}, d), one row per image, "
                f"got shape {features.shape}"
            )
        result = verify_templates(
            features,
            self.meta.templates,
            self.meta.medias,
            self.meta.template_pairs,
            self.meta.labels,
            faceness=self.meta.faceness if self.use_faceness else None,
            keep_norms=self.keep_norms,
            fusion=self.fusion,
            fars=self.fars,
        )
        result.notes.append(
            f"{self.meta.dataset} 1:1 at {self.meta.root}: {len(features)} images, fusion={self.fusion}, "
            f"keep_norms={self.keep_norms}, faceness weights={'on' if self.use_faceness else 'off'}"
        )
        return result

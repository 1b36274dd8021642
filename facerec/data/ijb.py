"""IJB-B / IJB-C in the layout insightface distributes (`IJB_release/IJBC`): the meta files and the images.

    <root>/loose_crop/<image_name>                  the detector's loose crops (e.g. 1.jpg ... 469375.jpg)
    <root>/meta/<ds>_face_tid_mid.txt               image_name template_id media_id
    <root>/meta/<ds>_name_5pts_score.txt            image_name x1 y1 ... x5 y5 faceness, same images, same order
    <root>/meta/<ds>_template_pair_label.txt        template_id template_id label (1 genuine, 0 impostor)
    <root>/meta/<ds>_1N_probe_mixed.csv             the 1:N probe templates (TEMPLATE_ID,SUBJECT_ID,...)
    <root>/meta/<ds>_1N_gallery_G1.csv, _G2.csv     the 1:N galleries (IJB-B: _S1, _S2)

(ds = ijbc or ijbb.) Each loose crop is aligned to the ArcFace 112x112 template from its five
landmarks (facerec.data.align) when it is read. The protocols that score these sets (1:1 template
verification, 1:N identification) are in facerec.evaluation.protocols. Bad input raises naming the
file and line: a malformed line, a pair naming a template that has no images, an image missing from
loose_crop/.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facerec.data.align import align_face, require_cv2
from facerec.data.decode import DecodeError, normalise

DATASETS = ("IJBB", "IJBC")
GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}  # the 1:N gallery files of each set


def meta_prefix(dataset: str) -> str:
    """The lower-case file prefix of a dataset's meta files ('ijbc' for IJBC)."""
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    return dataset.lower()


@dataclass
class IjbMeta:
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


def meta_file(root: Path, dataset: str, kind: str, suffix: str = ".txt") -> Path:
    """root/meta/<ds>_<kind><suffix>, e.g. kind 'face_tid_mid'."""
    return Path(root) / "meta" / f"{meta_prefix(dataset)}_{kind}{suffix}"


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


def read_ijb_meta(root: str | Path, dataset: str = "IJBC", check_images: bool = True, pairs: bool = True) -> IjbMeta:
    """Read and cross-check the meta files of root (an IJB_release/IJBC-style folder). pairs=False
    skips the 1:1 template pair file (15.7 M lines for IJB-C), which the 1:N protocol does not use."""
    root = Path(root)
    if not (root / "meta").is_dir():
        raise FileNotFoundError(
            f"no IJB set at {root}: expected {root / 'meta'} (insightface's IJB_release/{dataset} layout). "
            f"For a small look-alike built from LFW, to test the pipeline: facerec-make-fixture --out {root.parent} "
            f"--dataset {dataset}"
        )
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
        return IjbMeta(root, dataset, names, templates, medias, landmarks, faceness, no_pairs, no_pairs[:, 0])
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
    return IjbMeta(root, dataset, names, templates, medias, landmarks, faceness, template_pairs, labels)


class IjbImages(Dataset):
    """(image, index): the loose crop `index` aligned to 112x112, (3, 112, 112) float32, (x - 127.5) / 127.5."""

    def __init__(self, meta: IjbMeta):
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


def read_1n_templates(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(template ids, subject ids) of an IJB 1:N csv (`TEMPLATE_ID,SUBJECT_ID,...`, one row per
    image), one entry per template in order of first appearance."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IJB 1:N protocol file not found: {path}")
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [column.strip().upper() for column in rows[0][:2]] != ["TEMPLATE_ID", "SUBJECT_ID"]:
        found = ",".join(rows[0]) if rows else "an empty file"
        raise ValueError(f"{path}:1: expected a header starting 'TEMPLATE_ID,SUBJECT_ID', got {found!r}")
    subject_of: dict[int, tuple[int, int]] = {}  # template -> (subject, line)
    for number, row in enumerate(rows[1:], 2):
        if not any(value.strip() for value in row):
            continue
        try:
            template, subject = int(row[0]), int(row[1])
        except (ValueError, IndexError):
            found = ",".join(row)
            raise ValueError(f"{path}:{number}: expected integer TEMPLATE_ID,SUBJECT_ID first, got {found!r}") from None
        first = subject_of.setdefault(template, (subject, number))
        if first[0] != subject:
            raise ValueError(
                f"{path}:{number}: template {template} has subject {subject} here but {first[0]} on line {first[1]}"
            )
    if not subject_of:
        raise ValueError(f"{path}: no templates listed")
    return np.fromiter(subject_of, dtype=np.int64), np.array([s for s, _ in subject_of.values()], dtype=np.int64)


def read_template_subjects(root: str | Path, dataset: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(template ids, subject ids) of every template the set's 1:N files name (probe_mixed and the
    galleries), sorted by template id; None where the set has no 1:N files (the 1:1 meta files name
    no subjects). A template with two subjects is an error naming both files."""
    parts = ["probe_mixed", *(f"gallery_{g}" for g in GALLERIES[dataset])]
    paths = [meta_file(Path(root), dataset, f"1N_{part}", ".csv") for part in parts]
    if not all(path.is_file() for path in paths):
        return None
    subject_of: dict[int, tuple[int, Path]] = {}
    for path in paths:
        for template, subject in zip(*read_1n_templates(path)):
            first = subject_of.setdefault(int(template), (int(subject), path))
            if first[0] != subject:
                raise ValueError(f"template {template} has subject {first[0]} in {first[1]} but {subject} in {path}")
    templates = np.fromiter(sorted(subject_of), dtype=np.int64, count=len(subject_of))
    return templates, np.array([subject_of[t][0] for t in templates], dtype=np.int64)

"""1:N identification protocols (facerec.evaluation.identify behind the EvaluationProtocol contract).

- `FolderIdentification`, MegaFace-style: from an image folder `root/<identity>/<image>`, each
  identity with >= `min_images` images enrols `gallery_images` of them in the gallery and searches
  with the others; `non_mated_identities` of those identities are left out of the gallery, so all
  their images are non-mated probes; `num_distractors` distractor identities join the gallery, from
  another folder or, without one, from the identities of `root` with fewer than `min_images` images
  (on LFW: the 4,068 people with a single image). Choices are drawn from `seed`.
- `IjbIdentification`: the IJB-C (IJB-B) 1:N mixed-media protocol: probe templates of
  `meta/<ds>_1N_probe_mixed.csv` searched in each gallery of `<ds>_1N_gallery_G1.csv` / `_G2.csv`
  (IJB-B: `_S1` / `_S2`), templates pooled as facerec.evaluation.pool_templates (arcface_torch).
"""
from __future__ import annotations

import csv
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facerec.data.decode import image_tensor
from facerec.data.image_folder import scan_folder
from facerec.data.ijb import IJBImages, ensure_fixture, meta_file, read_ijb_meta
from facerec.data.ijb_fixture import meta_prefix
from facerec.evaluation.identification import (
    EXACT_MAX_GALLERY,
    FPIRS,
    RANKS,
    IdentificationResult,
    identification_row,
    identify,
)
from facerec.evaluation.protocols import EvaluationProtocol, ProtocolResult
from facerec.evaluation.templates import pool_templates

log = logging.getLogger(__name__)


class ImageFiles(Dataset):
    """(image, index) for a list of image files, as the EvaluationProtocol contract asks."""

    def __init__(self, paths: Sequence[Path], image_size: int = 112):
        self.paths = list(paths)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        return image_tensor(path.read_bytes(), self.image_size, str(path)), index


def _check_features(name: str, features: np.ndarray, num_images: int) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 2 or len(features) != num_images:
        raise ValueError(f"{name}: expected ({num_images}, d) features, one per image of image_set(), got {features.shape}")
    return features


class FolderIdentification(EvaluationProtocol):
    """MegaFace-style open-set identification over an image folder (see the module docstring).

    Identity ids: the label of `root`'s identity for enrolled and non-mated identities, -1 - k for
    distractor k (distractors from another folder are other people, whatever their folder names).
    """

    def __init__(
        self,
        root: str | Path,
        identities: str | Path | Sequence[str] | None = None,
        min_images: int = 2,
        gallery_images: int = 1,
        non_mated_identities: int = 0,
        num_distractors: int | None = None,
        distractor_root: str | Path | None = None,
        distractor_identities: str | Path | Sequence[str] | None = None,
        seed: int = 0,
        image_size: int = 112,
        name: str = "folder_1n",
        ranks: Sequence[int] = RANKS,
        fpirs: Sequence[float] = FPIRS,
        search: str = "auto",
        exact_max_gallery: int = EXACT_MAX_GALLERY,
    ):
        if not 1 <= gallery_images < min_images:
            raise ValueError(
                f"{name}: need 1 <= gallery_images < min_images, got gallery_images={gallery_images}, min_images={min_images}"
            )
        self.name = str(name)
        self.image_size = int(image_size)
        self.search = dict(ranks=tuple(ranks), fpirs=tuple(fpirs), search=search, exact_max_gallery=exact_max_gallery)
        rng = np.random.default_rng(seed)
        scan = scan_folder(root, identities)
        counts = np.bincount(scan.labels, minlength=len(scan.names))
        searchable = np.flatnonzero(counts >= min_images)
        if non_mated_identities >= len(searchable):
            raise ValueError(
                f"{name}: non_mated_identities={non_mated_identities} leaves no enrolled identity: "
                f"{scan.root} has {len(searchable)} identities with >= {min_images} images"
            )
        non_mated = set(rng.choice(searchable, size=non_mated_identities, replace=False).tolist())
        paths, gallery, gallery_ids, probes, probe_ids = [], [], [], [], []
        by_identity = np.split(np.argsort(scan.labels, kind="stable"), np.cumsum(counts)[:-1])
        for label in searchable:
            images = by_identity[label][rng.permutation(counts[label])]
            enrolled = 0 if label in non_mated else gallery_images
            for position, image in enumerate(images):
                (gallery if position < enrolled else probes).append(len(paths))
                (gallery_ids if position < enrolled else probe_ids).append(int(label))
                paths.append(scan.path(image))

        if distractor_root is None:
            source, pool = scan, np.flatnonzero(counts < min_images)
            origin = f"the identities of {scan.root} with < {min_images} images"
        else:
            source = scan_folder(distractor_root, distractor_identities)
            pool, origin = np.arange(len(source.names)), str(source.root)
        wanted = len(pool) if num_distractors is None else int(num_distractors)
        if not 0 <= wanted <= len(pool):
            raise ValueError(f"{name}: num_distractors={num_distractors}, but {origin} holds {len(pool)} identities")
        chosen = np.sort(rng.choice(pool, size=wanted, replace=False))
        source_counts = np.bincount(source.labels, minlength=len(source.names))
        source_images = np.split(np.argsort(source.labels, kind="stable"), np.cumsum(source_counts)[:-1])
        for k, label in enumerate(chosen):
            for image in source_images[label][:gallery_images]:
                gallery.append(len(paths))
                gallery_ids.append(-1 - k)
                paths.append(source.path(image))

        self.paths = paths
        self.gallery, self.gallery_ids = np.asarray(gallery), np.asarray(gallery_ids)
        self.probes, self.probe_ids = np.asarray(probes), np.asarray(probe_ids)
        self.num_enrolled = len(searchable) - len(non_mated)
        self.num_distractors = wanted
        self.description = (
            f"{self.num_enrolled} identities of {scan.root} enrol {gallery_images} image(s) each and search with the "
            f"others; {len(non_mated)} more identities search unenrolled (non-mated); {wanted} distractor identities "
            f"from {origin} (seed {seed})"
        )
        log.info("%s: %s", self.name, self.description)

    def image_set(self) -> ImageFiles:
        return ImageFiles(self.paths, self.image_size)

    def score(self, features: np.ndarray) -> IdentificationResult:
        features = _check_features(self.name, features, len(self.paths))
        result = identify(features[self.gallery], self.gallery_ids, features[self.probes], self.probe_ids, **self.search)
        result.gallery = f"{self.num_enrolled} ids + {self.num_distractors} distractors"
        result.notes.insert(0, self.description)
        return result


GALLERIES = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


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


@dataclass
class IjbIdentificationResult(ProtocolResult):
    """Per-gallery identification results and their mean (as the IJB-B / IJB-C tables report)."""

    kind = "identification"

    galleries: dict[str, IdentificationResult]
    notes: list[str] = field(default_factory=list)

    def _mean(self, metric: str) -> dict:
        values = [getattr(result, metric) for result in self.galleries.values()]
        keys = values[0].keys()
        return {
            key: None if any(v[key] is None for v in values) else float(np.mean([v[key] for v in values])) for key in keys
        }

    @property
    def cmc(self) -> dict[int, float]:
        return self._mean("cmc")

    @property
    def tpir_at_fpir(self) -> dict[float, float | None]:
        return self._mean("tpir_at_fpir")

    def summary(self) -> dict[str, float]:
        flat = {f"rank{rank}": rate for rank, rate in self.cmc.items()}
        flat.update({f"tpir@fpir={fpir:.0e}": tpir for fpir, tpir in self.tpir_at_fpir.items() if tpir is not None})
        for name, result in self.galleries.items():
            flat.update({f"{name}/{key}": value for key, value in result.summary().items()})
        return flat

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "mean": {
                "cmc": {str(rank): rate for rank, rate in self.cmc.items()},
                "tpir_at_fpir": {f"{fpir:.0e}": tpir for fpir, tpir in self.tpir_at_fpir.items()},
            },
            "galleries": {name: result.to_dict() for name, result in self.galleries.items()},
            "notes": self.notes,
        }

    def table_row(self) -> dict[str, str]:
        names = ", ".join(self.galleries)
        probes = ", ".join(f"{name} {r.num_mated}/{r.num_non_mated}" for name, r in self.galleries.items())
        return identification_row(f"mean of {names}", probes, self.cmc, self.tpir_at_fpir)

    def curve(self) -> tuple[str, np.ndarray, np.ndarray]:
        curves = [result.curve() for result in self.galleries.values()]
        return "cmc", curves[0][1], np.mean([rates for _, _, rates in curves], axis=0)


class IjbIdentification(EvaluationProtocol):
    """IJB-C (IJB-B) 1:N mixed-media identification, in insightface's IJB_release layout.

    Images and their alignment as facerec.data.IJBVerification (IJBImages); templates pooled by
    facerec.evaluation.pool_templates (use_faceness, keep_norms, fusion as there); the probe templates
    of `<ds>_1N_probe_mixed.csv` are searched in each gallery separately (the other gallery's subjects
    are non-mated there) and the table reports the mean over galleries. The template pair file of the
    1:1 protocol is not read. build_fixture: write the LFW-based fixture when root has no meta/.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "IJBC",
        name: str | None = None,
        use_faceness: bool = True,
        keep_norms: bool = True,
        fusion: str = "mean",
        ranks: Sequence[int] = RANKS,
        fpirs: Sequence[float] = FPIRS,
        search: str = "auto",
        exact_max_gallery: int = EXACT_MAX_GALLERY,
        build_fixture: bool = False,
        fixture_templates: int = 60,
    ):
        root = Path(root)
        if dataset not in GALLERIES:
            raise ValueError(f"dataset must be one of {sorted(GALLERIES)}, got {dataset!r}")
        if build_fixture:
            ensure_fixture(root, dataset, fixture_templates)
        self.meta = read_ijb_meta(root, dataset, pairs=False)
        tid_mid, templates = meta_file(root, dataset, "face_tid_mid"), self.meta.templates
        self.name = name or f"{dataset.lower()}_1n"
        self.pooling = dict(keep_norms=bool(keep_norms), fusion=fusion)
        self.use_faceness = bool(use_faceness)
        self.search = dict(ranks=tuple(ranks), fpirs=tuple(fpirs), search=search, exact_max_gallery=exact_max_gallery)
        known = np.unique(templates)
        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for part in ("probe_mixed", *(f"gallery_{g}" for g in GALLERIES[dataset])):
            path = root / "meta" / f"{meta_prefix(dataset)}_1N_{part}.csv"
            ids, subjects = read_1n_templates(path)
            unknown = np.flatnonzero(~np.isin(ids, known))
            if len(unknown):
                raise ValueError(
                    f"{path}: {len(unknown)} templates have no images in {tid_mid}, e.g. template {ids[unknown[0]]}"
                )
            self.sets[part] = ids, subjects

    def image_set(self) -> IJBImages:
        return IJBImages(self.meta)

    def score(self, features: np.ndarray) -> IjbIdentificationResult:
        features = _check_features(self.name, features, len(self.meta.image_names))
        faceness = self.meta.faceness if self.use_faceness else None
        template_ids, pooled = pool_templates(features, self.meta.templates, self.meta.medias, faceness, **self.pooling)
        probe_templates, probe_subjects = self.sets["probe_mixed"]
        probes = pooled[np.searchsorted(template_ids, probe_templates)]
        galleries = {}
        for gallery in GALLERIES[self.meta.dataset]:
            gallery_templates, gallery_subjects = self.sets[f"gallery_{gallery}"]
            entries = pooled[np.searchsorted(template_ids, gallery_templates)]
            galleries[gallery] = identify(entries, gallery_subjects, probes, probe_subjects, **self.search)
            galleries[gallery].gallery = f"{gallery}: {len(gallery_templates)} templates"
        notes = [
            f"{self.meta.dataset} 1:N mixed at {self.meta.root}: {len(probe_templates)} probe templates; templates pooled "
            f"with fusion={self.pooling['fusion']}, keep_norms={self.pooling['keep_norms']}, "
            f"faceness weights={'on' if self.use_faceness else 'off'}; metrics are the mean over galleries"
        ]
        notes += [f"{name}: {note}" for name, result in galleries.items() for note in result.notes]
        return IjbIdentificationResult(galleries, notes)

"""1:N identification protocols (facerec.evaluation.identify behind the EvaluationProtocol contract).

- `FolderIdentification`, MegaFace-style: from an image folder `root/<identity>/<image>`, each
  identity with >= `min_images` images enrols `gallery_images` of them in the gallery and searches
  with the others; `non_mated_identities` of those identities are left out of the gallery, so all
  their images are non-mated probes; `num_distractors` distractor identities join the gallery, from
  another folder or, without one, from the identities of `root` with fewer than `min_images` images
  (on LFW: the 4,068 people with a single image). Choices are drawn from `seed` (`megaface_split`).
- `IjbIdentification`: the IJB-C (IJB-B) 1:N mixed-media protocol: probe templates of
  `meta/<ds>_1N_probe_mixed.csv` searched in each gallery of `<ds>_1N_gallery_G1.csv` / `_G2.csv`
  (IJB-B: `_S1` / `_S2`), templates pooled as facerec.evaluation.pool_templates (arcface_torch).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from facerec.data.ijb import GALLERIES, meta_file, read_1n_templates
from facerec.data.image_folder import FolderScan, ImageFiles, scan_folder
from facerec.evaluation.identification import EXACT_MAX_GALLERY, FPIRS, RANKS, IdentificationResult, MultiGalleryResult, identify
from facerec.evaluation.protocols.base import EvaluationProtocol, check_features
from facerec.evaluation.protocols.templates import IjbTemplates
from facerec.evaluation.templates import pool_templates

log = logging.getLogger(__name__)


@dataclass
class GallerySplit:
    """Which images of a folder (and of its distractors) enrol and which search. `paths[i]` is image
    i; gallery / probes: image indices; *_ids: their identity ids (distractor k: -1 - k)."""

    paths: list[Path]
    gallery: np.ndarray
    gallery_ids: np.ndarray
    probes: np.ndarray
    probe_ids: np.ndarray
    num_enrolled: int
    num_distractors: int
    description: str


def megaface_split(
    scan: FolderScan,
    min_images: int = 2,
    gallery_images: int = 1,
    non_mated_identities: int = 0,
    num_distractors: int | None = None,
    distractors: FolderScan | None = None,
    seed: int = 0,
) -> GallerySplit:
    """The MegaFace-style split of an image folder (see the module docstring). Identity ids: the label
    of `scan`'s identity for enrolled and non-mated identities, -1 - k for distractor k (distractors
    from another folder are other people, whatever their folder names)."""
    if not 1 <= gallery_images < min_images:
        raise ValueError(
            f"need 1 <= gallery_images < min_images, got gallery_images={gallery_images}, min_images={min_images}"
        )
    rng = np.random.default_rng(seed)
    counts = np.bincount(scan.labels, minlength=len(scan.names))
    searchable = np.flatnonzero(counts >= min_images)
    if non_mated_identities >= len(searchable):
        raise ValueError(
            f"non_mated_identities={non_mated_identities} leaves no enrolled identity: "
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

    if distractors is None:
        source, pool = scan, np.flatnonzero(counts < min_images)
        origin = f"the identities of {scan.root} with < {min_images} images"
    else:
        source, pool, origin = distractors, np.arange(len(distractors.names)), str(distractors.root)
    wanted = len(pool) if num_distractors is None else int(num_distractors)
    if not 0 <= wanted <= len(pool):
        raise ValueError(f"num_distractors={num_distractors}, but {origin} holds {len(pool)} identities")
    chosen = np.sort(rng.choice(pool, size=wanted, replace=False))
    source_counts = np.bincount(source.labels, minlength=len(source.names))
    source_images = np.split(np.argsort(source.labels, kind="stable"), np.cumsum(source_counts)[:-1])
    for k, label in enumerate(chosen):
        for image in source_images[label][:gallery_images]:
            gallery.append(len(paths))
            gallery_ids.append(-1 - k)
            paths.append(source.path(image))
    num_enrolled = len(searchable) - len(non_mated)
    description = (
        f"{num_enrolled} identities of {scan.root} enrol {gallery_images} image(s) each and search with the "
        f"others; {len(non_mated)} more identities search unenrolled (non-mated); {wanted} distractor identities "
        f"from {origin} (seed {seed})"
    )
    return GallerySplit(
        paths, np.asarray(gallery), np.asarray(gallery_ids), np.asarray(probes), np.asarray(probe_ids),
        num_enrolled, wanted, description,
    )  # fmt: skip


class FolderIdentification(EvaluationProtocol):
    """MegaFace-style open-set identification over an image folder (see the module docstring)."""

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
        ranks: Sequence[int] = RANKS,
        fpirs: Sequence[float] = FPIRS,
        search: str = "auto",
        exact_max_gallery: int = EXACT_MAX_GALLERY,
    ):
        distractors = None if distractor_root is None else scan_folder(distractor_root, distractor_identities)
        self.split = megaface_split(
            scan_folder(root, identities), min_images, gallery_images, non_mated_identities, num_distractors, distractors, seed
        )
        self.image_size = int(image_size)
        self.search = dict(ranks=tuple(ranks), fpirs=tuple(fpirs), search=search, exact_max_gallery=exact_max_gallery)
        log.info("%s", self.split.description)

    def image_set(self) -> ImageFiles:
        return ImageFiles(self.split.paths, self.image_size)

    def score(self, features: np.ndarray) -> IdentificationResult:
        split = self.split
        features = check_features(features, len(split.paths))
        result = identify(features[split.gallery], split.gallery_ids, features[split.probes], split.probe_ids, **self.search)
        result.gallery = f"{split.num_enrolled} ids + {split.num_distractors} distractors"
        result.notes.insert(0, split.description)
        return result


class IjbIdentification(IjbTemplates):
    """IJB-C (IJB-B) 1:N mixed-media identification, in insightface's IJB_release layout.

    Images, alignment and template pooling as IjbVerification (template options: IjbTemplates); the
    probe templates of `<ds>_1N_probe_mixed.csv` are searched in each gallery separately (the other
    gallery's subjects are non-mated there) and the table reports the mean over galleries. The
    template pair file of the 1:1 protocol is not read.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "IJBC",
        ranks: Sequence[int] = RANKS,
        fpirs: Sequence[float] = FPIRS,
        search: str = "auto",
        exact_max_gallery: int = EXACT_MAX_GALLERY,
        **templates,
    ):
        if dataset not in GALLERIES:
            raise ValueError(f"dataset must be one of {sorted(GALLERIES)}, got {dataset!r}")
        super().__init__(root, dataset, pairs=False, **templates)
        tid_mid = meta_file(self.meta.root, dataset, "face_tid_mid")
        self.search = dict(ranks=tuple(ranks), fpirs=tuple(fpirs), search=search, exact_max_gallery=exact_max_gallery)
        known = np.unique(self.meta.templates)
        self.sets: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for part in ("probe_mixed", *(f"gallery_{g}" for g in GALLERIES[dataset])):
            path = meta_file(self.meta.root, dataset, f"1N_{part}", ".csv")
            ids, subjects = read_1n_templates(path)
            unknown = np.flatnonzero(~np.isin(ids, known))
            if len(unknown):
                raise ValueError(
                    f"{path}: {len(unknown)} templates have no images in {tid_mid}, e.g. template {ids[unknown[0]]}"
                )
            self.sets[part] = ids, subjects

    def score(self, features: np.ndarray) -> MultiGalleryResult:
        features = check_features(features, len(self.meta.image_names))
        template_ids, pooled = pool_templates(features, self.meta.templates, self.meta.medias, **self.pooling())
        probe_templates, probe_subjects = self.sets["probe_mixed"]
        probes = pooled[np.searchsorted(template_ids, probe_templates)]
        galleries = {}
        for gallery in GALLERIES[self.meta.dataset]:
            gallery_templates, gallery_subjects = self.sets[f"gallery_{gallery}"]
            entries = pooled[np.searchsorted(template_ids, gallery_templates)]
            galleries[gallery] = identify(entries, gallery_subjects, probes, probe_subjects, **self.search)
            galleries[gallery].gallery = f"{gallery}: {len(gallery_templates)} templates"
        notes = [f"{self.describe('1:N mixed')}; {len(probe_templates)} probe templates; metrics are the mean over galleries"]
        notes += [f"{name}: {note}" for name, result in galleries.items() for note in result.notes]
        return MultiGalleryResult(galleries, notes)

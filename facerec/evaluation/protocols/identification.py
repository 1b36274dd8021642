"""1:N identification protocols (facerec.evaluation.identify behind the EvaluationProtocol contract).

- `FolderIdentification`, MegaFace-style: from an image folder `root/<identity>/<image>`, each
  identity with >= `min_images` images enrols `gallery_images` of them in the gallery and searches
  with the others; `non_mated_identities` of those identities are left out of the gallery, so all
  their images are non-mated probes; `num_distractors` distractor identities join the gallery, from
  another folder or, without one, from the identities of `root` with fewer than `min_images` images
  (on LFW: the 4,068 people with a single image). Choices are drawn from `seed` (`megaface_split`).
- `IjbIdentification`: the IJB-C (IJB-B) 1:N mixed-media protocol: probe templates of
  `meta/<ds>_1N_probe_mixed.csv` searched in each gallery of `<ds>_1N_gallery_G1.csv` / `_G2.csv`
  (IJB-B: `_S1` / `_S2`), templates pooled as facerec.evaluation.pool_templates (arcface_torch);
  `convention="insightface"` merges the galleries and scores as insightface's ijb_1n.py instead.
"""
from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from facerec.data.ijb import GALLERIES, meta_file, read_1n_templates
from facerec.data.image_folder import FolderScan, ImageFiles, scan_folder
from facerec.evaluation.identification import EXACT_MAX_GALLERY, FPIRS, RANKS, IdentificationResult, MultiGalleryResult, identify
from facerec.evaluation.insightface_1n import CONVENTIONS, insightface_identify, mate_entries
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
    identity_names: Sequence[str] | None = None  # the name of identity id i (i >= 0), where known


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
        num_enrolled, wanted, description, list(scan.names),
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
        self.split = self.make_split(
            root, identities, min_images, gallery_images, non_mated_identities, num_distractors, distractor_root,
            distractor_identities, seed,
        )  # fmt: skip
        self.image_size = int(image_size)
        self.search = dict(ranks=tuple(ranks), fpirs=tuple(fpirs), search=search, exact_max_gallery=exact_max_gallery)
        log.info("%s", self.split.description)

    def make_split(
        self, root, identities, min_images, gallery_images, non_mated_identities, num_distractors, distractor_root,
        distractor_identities, seed,
    ) -> GallerySplit:  # fmt: skip
        """The split that `score` searches: megaface_split of `root`. A protocol whose split comes from
        elsewhere (TinyFaceIdentification: a fixed probe/gallery layout) overrides it and inherits the rest."""
        distractors = None if distractor_root is None else scan_folder(distractor_root, distractor_identities)
        return megaface_split(
            scan_folder(root, identities), min_images, gallery_images, non_mated_identities, num_distractors, distractors, seed
        )

    def image_set(self) -> ImageFiles:
        return ImageFiles(self.split.paths, self.image_size)

    def score(self, features: np.ndarray) -> IdentificationResult:
        split = self.split
        features = check_features(features, len(split.paths))
        result = identify(features[split.gallery], split.gallery_ids, features[split.probes], split.probe_ids, **self.search)
        result.items.set_sides(np.c_[split.probes, np.full(len(split.probes), -1)], np.arange(len(split.paths)))
        if split.identity_names is not None:  # units named by person, as a groups= CSV names them
            names, units = np.unique(np.asarray(split.identity_names)[split.probe_ids], return_inverse=True)
            result.items.set_units(np.c_[units, np.full(len(units), -1)], names, "identity")
        result.gallery = f"{split.num_enrolled} ids + {split.num_distractors} distractors"
        result.notes.insert(0, split.description)
        return result

    def image_names(self) -> list[str]:
        """Each image's path relative to the folder that holds all of them (`root`: "<identity>/<file>")."""
        return relative_names(self.split.paths)

    def image_identities(self) -> list[str] | None:
        """Each image's folder name, where folder names and the split's identity ids agree one to one (else None)."""
        split = self.split
        names = [path.parent.name for path in split.paths]
        ids = np.empty(len(names), dtype=np.int64)
        ids[split.gallery], ids[split.probes] = split.gallery_ids, split.probe_ids
        pairs = set(zip(ids.tolist(), names))
        one_to_one = len(pairs) == len({i for i, _ in pairs}) == len({n for _, n in pairs})
        return names if one_to_one else None

    def keep_images(self, keep: np.ndarray) -> tuple[FolderIdentification, str]:
        split = self.split
        new_index = np.full(len(split.paths), -1, dtype=np.int64)
        new_index[keep] = np.arange(len(keep))
        gallery, probes = new_index[split.gallery], new_index[split.probes]
        in_gallery, in_probes = gallery >= 0, probes >= 0
        gallery_ids = split.gallery_ids[in_gallery]
        protocol = copy.copy(self)
        protocol.split = replace(
            split,
            paths=[split.paths[index] for index in keep],
            gallery=gallery[in_gallery],
            gallery_ids=gallery_ids,
            probes=probes[in_probes],
            probe_ids=split.probe_ids[in_probes],
            num_enrolled=len(np.unique(gallery_ids[gallery_ids >= 0])),
            num_distractors=len(np.unique(gallery_ids[gallery_ids < 0])),
        )
        return protocol, (
            f"{(~in_gallery).sum()} of {len(gallery)} gallery entries and {(~in_probes).sum()} of {len(probes)} probes "
            "dropped (the probes of an identity left without a gallery entry are non-mated)"
        )


def relative_names(paths: Sequence[Path]) -> list[str]:
    """Each path relative to the deepest folder that holds all their identity folders (paths root/<identity>/<file>:
    "<identity>/<file>"), with "/" separators."""
    paths = [Path(path) for path in paths]
    common = Path(os.path.commonpath([path.parent.parent for path in paths])) if paths else Path()
    return [path.relative_to(common).as_posix() for path in paths]


class IjbIdentification(IjbTemplates):
    """IJB-C (IJB-B) 1:N mixed-media identification, in insightface's IJB_release layout.

    Images, alignment and template pooling as IjbVerification (template options: IjbTemplates); the
    probe templates of `<ds>_1N_probe_mixed.csv` are searched in each gallery separately (the other
    gallery's subjects are non-mated there) and the table reports the mean over galleries. The
    template pair file of the 1:1 protocol is not read.

    convention: "nist" (the above: NIST FRVT per-search TPIR@FPIR, facerec.evaluation.identify) or
    "insightface" (insightface's ijb_1n.py: the galleries merged and searched once, its closed-set
    TPIR@FPIR rule, facerec.evaluation.insightface_1n). The two give different numbers; the result's
    gallery cell names the convention.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "IJBC",
        ranks: Sequence[int] = RANKS,
        fpirs: Sequence[float] = FPIRS,
        search: str = "auto",
        exact_max_gallery: int = EXACT_MAX_GALLERY,
        convention: str = "nist",
        **templates,
    ):
        if dataset not in GALLERIES:
            raise ValueError(f"dataset must be one of {sorted(GALLERIES)}, got {dataset!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        self.convention = convention
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
        if convention == "insightface":  # closed set, one template per subject: checked before any embedding
            try:
                mate_entries(self.merged_gallery()[1], self.sets["probe_mixed"][1])
            except ValueError as error:
                files = ", ".join(f"{dataset.lower()}_1N_{part}.csv" for part in self.sets)
                raise ValueError(f"{self.meta.root / 'meta'} ({files}): {error}") from None

    def image_identities(self) -> list[str] | None:
        """Each image's subject id (as text) from the 1:N csv files, where they name every image's template's subject."""
        subject_of = {int(t): str(s) for ids, subjects in self.sets.values() for t, s in zip(ids, subjects)}
        subjects = [subject_of.get(int(template)) for template in self.meta.templates]
        return None if None in subjects else subjects

    def keep_images(self, keep: np.ndarray) -> tuple[IjbIdentification, str]:
        protocol, consequences = super().keep_images(keep)
        left = np.unique(protocol.meta.templates)
        protocol.sets, dropped = {}, []
        for part, (ids, subjects) in self.sets.items():
            kept = np.isin(ids, left)
            protocol.sets[part] = ids[kept], subjects[kept]
            dropped.append(f"{part} {(~kept).sum()} of {len(ids)}")
        return protocol, f"{consequences}; 1:N templates dropped: {', '.join(dropped)}"

    def score(self, features: np.ndarray) -> MultiGalleryResult:
        features = check_features(features, len(self.meta.image_names))
        template_ids, pooled = pool_templates(features, self.meta.templates, self.meta.medias, **self.pooling())
        probe_templates, probe_subjects = self.sets["probe_mixed"]
        probes = pooled[np.searchsorted(template_ids, probe_templates)]
        if self.convention == "insightface":
            return self.score_merged(template_ids, pooled, probes, probe_subjects)
        galleries = {}
        for gallery in GALLERIES[self.meta.dataset]:
            gallery_templates, gallery_subjects = self.sets[f"gallery_{gallery}"]
            entries = pooled[np.searchsorted(template_ids, gallery_templates)]
            galleries[gallery] = identify(entries, gallery_subjects, probes, probe_subjects, **self.search)
            galleries[gallery].gallery = f"{gallery}: {len(gallery_templates)} templates"
        notes = [f"{self.describe('1:N mixed')}; {len(probe_templates)} probe templates; metrics are the mean over galleries"]
        notes += [f"{name}: {note}" for name, result in galleries.items() for note in result.notes]
        result = MultiGalleryResult(galleries, notes)
        self.set_probe_sides(result.items, template_ids)
        return result

    def score_merged(self, template_ids, pooled, probes, probe_subjects) -> IdentificationResult:
        """convention="insightface": the galleries merged into one, searched once by ijb_1n.py's rules
        (facerec.evaluation.insightface_1n); gallery templates in template-id order, as ijb_1n.py's np.unique."""
        merged, subjects = self.merged_gallery()
        entries = pooled[np.searchsorted(template_ids, merged)]
        result = insightface_identify(
            entries, subjects, probes, probe_subjects, self.search["ranks"], self.search["fpirs"],
            gallery_name=f"{'+'.join(GALLERIES[self.meta.dataset])} merged (insightface)",
        )  # fmt: skip
        result.notes.insert(0, f"{self.describe('1:N mixed')}; {len(probes)} probe templates; {len(merged)} gallery templates")
        self.set_probe_sides(result.items, template_ids)
        return result

    def set_probe_sides(self, items, template_ids: np.ndarray) -> None:
        """Each probe's side is its template: a template's images' quality is its quality."""
        rows = np.searchsorted(template_ids, self.sets["probe_mixed"][0])
        items.set_sides(np.c_[rows, np.full(len(rows), -1)], np.searchsorted(template_ids, self.meta.templates))

    def merged_gallery(self) -> tuple[np.ndarray, np.ndarray]:
        """(template ids, subject ids) of the galleries merged, in template-id order (ijb_1n.py's np.unique)."""
        parts = [self.sets[f"gallery_{name}"] for name in GALLERIES[self.meta.dataset]]
        merged, first = np.unique(np.concatenate([ids for ids, _ in parts]), return_index=True)
        return merged, np.concatenate([subjects for _, subjects in parts])[first]

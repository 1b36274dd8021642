"""IJB-B / IJB-C protocols over insightface's IJB_release layout (facerec.data.ijb): what both share
(`IjbTemplates`: the set's meta files and aligned images, and how images pool into templates) and the
1:1 template verification (`IjbVerification`); the 1:N protocol is in identification.py."""
from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np

from facerec.data.ijb import IjbImages, read_ijb_meta, read_template_subjects
from facerec.evaluation.protocols.base import EvaluationProtocol, check_features
from facerec.evaluation.templates import TEMPLATE_FARS, TemplateResult, verify_templates


class IjbTemplates(EvaluationProtocol):
    """An IJB set's images and template pooling, as arcface_torch's eval_ijbc.py pools them
    (facerec.evaluation.templates).

    root: the set's folder (IJB_release/IJBC); dataset: IJBC or IJBB; use_faceness: weight images by
    the detector score (arcface_torch's default, "D1"); keep_norms: pool un-normalised features
    ("N1"); fusion: "mean" (arcface_torch) or "norm_weighted"; pairs: read the 1:1 template pair file
    (15.7 M lines for IJB-C; the 1:N protocol does not use it).
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "IJBC",
        use_faceness: bool = True,
        keep_norms: bool = True,
        fusion: str = "mean",
        pairs: bool = True,
    ):
        self.meta = read_ijb_meta(root, dataset, pairs=pairs)
        self.use_faceness, self.keep_norms, self.fusion = bool(use_faceness), bool(keep_norms), fusion

    def image_set(self) -> IjbImages:
        return IjbImages(self.meta)

    def image_names(self) -> list[str]:
        """Each image's file name in loose_crop/ (e.g. "1.jpg")."""
        return list(self.meta.image_names)

    def keep_images(self, keep: np.ndarray) -> tuple[IjbTemplates, str]:
        """The images `keep` alone: templates lose the others, and the pairs of a template left empty are dropped."""
        meta = self.meta
        templates = meta.templates[keep]
        left = np.isin(meta.template_pairs, templates).all(axis=1)
        protocol = copy.copy(self)
        protocol.meta = replace(
            meta,
            image_names=[meta.image_names[index] for index in keep],
            templates=templates,
            medias=meta.medias[keep],
            landmarks=meta.landmarks[keep],
            faceness=meta.faceness[keep],
            template_pairs=meta.template_pairs[left],
            labels=meta.labels[left],
        )
        before, after = len(np.unique(meta.templates)), len(np.unique(templates))
        dropped = f"{before - after} of {before} templates left empty; {(~left).sum()} of {len(left)} template pairs dropped"
        return protocol, dropped

    def pooling(self) -> dict:
        """The keywords of facerec.evaluation.pool_templates / verify_templates for this set."""
        faceness = self.meta.faceness if self.use_faceness else None
        return {"faceness": faceness, "keep_norms": self.keep_norms, "fusion": self.fusion}

    def describe(self, what: str) -> str:
        return (
            f"{self.meta.dataset} {what} at {self.meta.root}: fusion={self.fusion}, keep_norms={self.keep_norms}, "
            f"faceness weights={'on' if self.use_faceness else 'off'}"
        )


class IjbVerification(IjbTemplates):
    """IJB-B / IJB-C 1:1: the `<ds>_template_pair_label.txt` pairs of templates, TAR@FAR at `fars` by
    arcface_torch's nearest-FPR rule and the strict rule; template options as IjbTemplates."""

    def __init__(self, root: str | Path, dataset: str = "IJBC", fars=TEMPLATE_FARS, **templates):
        super().__init__(root, dataset, **templates)
        self.fars = tuple(fars)
        self.subjects = read_template_subjects(self.meta.root, dataset)

    def score(self, features: np.ndarray) -> TemplateResult:
        features = check_features(features, len(self.meta.image_names))
        meta = self.meta
        result = verify_templates(
            features, meta.templates, meta.medias, meta.template_pairs, meta.labels, fars=self.fars, **self.pooling()
        )
        result.notes.append(f"{self.describe('1:1')}; {len(features)} images")
        self.subject_units(result)
        return result

    def subject_units(self, result: TemplateResult) -> None:
        """Resample subjects, not templates, where the set's 1:N files name them: one person's
        templates are correlated as LFW's pairs of one person are (facerec.evaluation.scored)."""
        if self.subjects is None:
            result.notes.append("intervals resample templates: the set has no 1:N files naming their subjects")
            return
        templates, subjects = self.subjects
        pairs = self.meta.template_pairs
        rows = np.searchsorted(templates, pairs).clip(max=len(templates) - 1)
        if not (templates[rows] == pairs).all():
            result.notes.append("intervals resample templates: some paired templates have no subject in the 1:N files")
            return
        names, codes = np.unique(subjects[rows], return_inverse=True)
        units = codes.reshape(-1, 2)
        units[units[:, 0] == units[:, 1], 1] = -1  # a genuine pair depends on one person
        result.items.set_units(units, names.astype(str), "identity")

"""TinyFace 1:N identification (Cheng et al., ACCV 2018), scored as FolderIdentification scores.

The split is fixed by the folders (facerec.data.tinyface): every Gallery_Match image is a gallery
entry of its identity, every Gallery_Distractor image a gallery entry of its own (id -1 - k, as
megaface_split numbers distractors), every Probe image a mated probe. The CMC at ranks 1, 5 and 20 is
the published metric (AdaFace, CVLface); TPIR@FPIR is not computed by default, as the set has no
non-mated probes. Scoring (`score`, `image_set`) is FolderIdentification's, inherited.

Rank-k counts identities (facerec.evaluation.identify: 1 + the other identities scoring >= the
mate's best image, NIST's CMC). AdaFace's and CVLface's `DIR_FAR` counts gallery images instead (the
mate among the k best images). Ties aside, rank-1 is the same; rank-5 and rank-20 can only be higher
here, and only where an identity has several Gallery_Match images ranked above the mate.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facerec.data.tinyface import TinyFaceScan, scan_tinyface
from facerec.evaluation.protocols.identification import FolderIdentification, GallerySplit

log = logging.getLogger(__name__)

TINYFACE_RANKS = (1, 5, 20)
# FolderIdentification's options that choose a split: TinyFace's folders fix it.
SPLIT_OPTIONS = frozenset(
    {"identities", "min_images", "gallery_images", "non_mated_identities", "num_distractors", "distractor_root",
     "distractor_identities", "seed"}
)  # fmt: skip


def tinyface_split(scan: TinyFaceScan) -> GallerySplit:
    """The GallerySplit of a TinyFace scan: paths are the Gallery_Match, Gallery_Distractor and Probe
    images, in that order; identity ids are 0..C-1 over the sorted Gallery_Match identities, -1 - k
    for distractor k."""
    names = sorted(set(scan.match_identities))
    label = {name: index for index, name in enumerate(names)}
    matches, distractors, probes = len(scan.matches), len(scan.distractors), len(scan.probes)
    gallery_ids = np.r_[
        np.array([label[name] for name in scan.match_identities], dtype=np.int64),
        -1 - np.arange(distractors, dtype=np.int64),
    ]
    probe_ids = np.array([label[name] for name in scan.probe_identities], dtype=np.int64)
    description = (
        f"TinyFace {scan.root}: {probes} probes of {len(set(scan.probe_identities))} identities searched in "
        f"{matches} Gallery_Match images of {len(names)} identities + {distractors} distractor images (closed set)"
    )
    return GallerySplit(
        paths=[*scan.matches, *scan.distractors, *scan.probes],
        gallery=np.arange(matches + distractors),
        gallery_ids=gallery_ids,
        probes=np.arange(matches + distractors, matches + distractors + probes),
        probe_ids=probe_ids,
        num_enrolled=len(names),
        num_distractors=distractors,
        description=description,
        identity_names=names,
    )


class TinyFaceIdentification(FolderIdentification):
    """TinyFace's closed-set 1:N protocol over `root` (see the module docstring).

    testing_set: the folder under `root` that holds Probe/, Gallery_Match/, Gallery_Distractor/
    ("" where `root` holds them); image_size: every image is resized to it by facerec.data.decode's
    policy (shorter side to image_size, centre crop, bicubic): TinyFace's native crops are small and
    of varying size. Other keyword arguments are FolderIdentification's scoring options (search,
    exact_max_gallery, ...); its split options are refused.
    """

    def __init__(
        self,
        root: str | Path,
        testing_set: str = "Testing_Set",
        image_size: int = 112,
        ranks: Sequence[int] = TINYFACE_RANKS,
        fpirs: Sequence[float] = (),
        **scoring,
    ):
        refused = sorted(SPLIT_OPTIONS & set(scoring))
        if refused:
            raise TypeError(f"TinyFaceIdentification: {refused} choose a split, but TinyFace's folders fix it")
        self.testing_set = testing_set
        super().__init__(root, image_size=image_size, ranks=ranks, fpirs=fpirs, **scoring)

    def make_split(self, root, *split_options) -> GallerySplit:
        return tinyface_split(scan_tinyface(root, self.testing_set))

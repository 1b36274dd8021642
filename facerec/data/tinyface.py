"""TinyFace's 1:N test set (Cheng, Zhu and Gong, "Low-Resolution Face Recognition", ACCV 2018).

Layout (the download of https://qmul-tinyface.github.io/, not shipped with this project):

    <root>/Testing_Set/Probe/<id>_<n>.jpg            probe images
    <root>/Testing_Set/Gallery_Match/<id>_<n>.jpg    gallery images of the probes' identities
    <root>/Testing_Set/Gallery_Distractor/<name>     distractor images, no identity

An image's identity is its file name up to the first underscore (`1_3.jpg` -> `1`), as AdaFace's
`validation_lq/tinyface_helper.py` and CVLface's `evaluations/tinyface/evaluate.py` read it. Each
distractor image is a gallery entry of its own that matches no probe. The protocol is closed-set:
every probe identity has a Gallery_Match image, and a probe without one is an error here (those
readers would drop it from the CMC silently). Folders are read recursively, files in sorted order;
files without an image suffix are skipped and counted.

`testing_set` names the folder that holds the three sub-folders: "Testing_Set" for the download,
"" for a release without it (AdaFace's aligned 112x112 copy holds `Probe/`, `Gallery_Match/`,
`Gallery_Distractor/` directly).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from facerec.data.image_folder import has_image_suffix

log = logging.getLogger(__name__)

PROBE, MATCH, DISTRACTOR = "Probe", "Gallery_Match", "Gallery_Distractor"
SUBSETS = (PROBE, MATCH, DISTRACTOR)
LAYOUT = "<root>/Testing_Set/{Probe,Gallery_Match,Gallery_Distractor}/ (TinyFace's download)"


@dataclass
class TinyFaceScan:
    """The images of TinyFace's test set: probes and gallery matches with their identities (file name
    prefixes), and the distractors. Paths are absolute, in sorted order within each folder."""

    root: Path  # the folder holding Probe/, Gallery_Match/, Gallery_Distractor/
    probes: list[Path]
    probe_identities: list[str]
    matches: list[Path]
    match_identities: list[str]
    distractors: list[Path]
    skipped_files: int


def identity_of(path: Path) -> str:
    """The identity of a Probe or Gallery_Match image: its file name up to the first underscore."""
    prefix, underscore, _ = path.name.partition("_")
    if not underscore or not prefix:
        raise ValueError(
            f"{path}: a TinyFace {path.parent.name} image is named '<identity>_<n>.<ext>' (e.g. 1_3.jpg); "
            "this name has no identity prefix before an underscore"
        )
    return prefix


def image_files(folder: Path) -> tuple[list[Path], int]:
    """(the image files under `folder`, recursively, in sorted order; how many other files were skipped)."""
    images, skipped = [], 0
    for directory, subdirectories, files in os.walk(folder):
        subdirectories.sort()
        for name in sorted(files):
            if has_image_suffix(name):
                images.append(Path(directory) / name)
            else:
                skipped += 1
    return images, skipped


def scan_tinyface(root: str | Path, testing_set: str = "Testing_Set") -> TinyFaceScan:
    """TinyFace's test set under `root` (see the module docstring); errors name the path at fault."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"TinyFace not found: {root} is not a folder (expected {LAYOUT})")
    base = root / testing_set if testing_set else root
    folders = {subset: base / subset for subset in SUBSETS}
    missing = [str(folder) for folder in folders.values() if not folder.is_dir()]
    if missing:
        raise FileNotFoundError(f"TinyFace: missing folder(s) {', '.join(missing)} (expected {LAYOUT})")
    found, skipped = {}, 0
    for subset, folder in folders.items():
        found[subset], count = image_files(folder)
        skipped += count
        if not found[subset] and subset != DISTRACTOR:
            raise ValueError(f"TinyFace: no images in {folder}")
    if skipped:
        log.warning("%s: skipped %d files without an image suffix", base, skipped)
    if not found[DISTRACTOR]:
        log.warning("%s: no distractor images: the gallery holds the Gallery_Match images only", folders[DISTRACTOR])
    probe_identities = [identity_of(path) for path in found[PROBE]]
    match_identities = [identity_of(path) for path in found[MATCH]]
    enrolled = set(match_identities)
    unmatched = [path for path, identity in zip(found[PROBE], probe_identities) if identity not in enrolled]
    if unmatched:
        raise ValueError(
            f"TinyFace is closed-set, but {len(unmatched)} probe images have no Gallery_Match image of their identity "
            f"in {folders[MATCH]}, e.g. {unmatched[0]} (identity {identity_of(unmatched[0])!r})"
        )
    return TinyFaceScan(base, found[PROBE], probe_identities, found[MATCH], match_identities, found[DISTRACTOR], skipped)

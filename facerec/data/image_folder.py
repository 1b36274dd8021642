"""Image folders `root/<identity>/<image>`: a training set, same/different pairs over held-out identities,
and any list of image files as an evaluation image set.

Identities are the sub-folders of `root` in sorted order, or the names of an
identity list (a Python list, or a file: one name per line, or LFW's
`people*.txt`, whose `name<TAB>count` lines are read and whose count-only lines
are headers). Labels are 0..C-1 in that order, over identities that hold at least
one image. Images are files with a common image suffix (see
facerec.data.decode.IMAGE_SUFFIXES), sorted by name; other files are skipped and
counted, an identity folder without images is skipped and counted, and a listed
identity without a folder is an error. Any size or colour mode is converted to
RGB `image_size` x `image_size` by facerec.data.decode's policy.
"""
from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from facerec.data.augment import FLIP, Augment
from facerec.data.decode import IMAGE_SUFFIXES, image_tensor
from facerec.data.encoded import EncodedImages
from facerec.data.verification import VerificationSet, balanced_pairs

log = logging.getLogger(__name__)


def read_identity_list(path: str | Path) -> list[str]:
    """Names from an identity list file (see the module docstring for the accepted layouts)."""
    lines = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not any("\t" in line for line in lines):
        return lines
    names = []
    for number, line in enumerate(lines, 1):
        fields = line.split("\t")
        if len(fields) == 1 and not fields[0].isdigit():
            raise ValueError(f"{path}:{number}: expected 'name<TAB>count' or a count, got {line!r}")
        if len(fields) > 1:
            names.append(fields[0])
    return names


@dataclass
class FolderScan:
    """Images of an image folder: `paths[i]` (bytes, relative to root) has label `labels[i]`,
    the identity `names[labels[i]]`. Paths are a numpy bytes array, not a list of str:
    DataLoader workers share it copy-on-write without touching reference counts."""

    root: Path
    names: list[str]
    paths: np.ndarray
    labels: np.ndarray
    skipped_files: int
    empty_identities: list[str]

    def path(self, index: int) -> Path:
        return self.root / os.fsdecode(self.paths[index])


def identity_folders(root: Path, identities: str | Path | Sequence[str] | None = None) -> list[str]:
    """The identity folders of `root` to look in: its sub-folders in sorted order, or the identity
    list's names (each must have a folder, none may repeat)."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    if identities is None:
        wanted = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
        if not wanted:
            raise ValueError(f"{root} holds no identity folders (expected root/<identity>/<image>)")
        return wanted
    wanted = read_identity_list(identities) if isinstance(identities, (str, Path)) else [str(n) for n in identities]
    missing = [name for name in wanted if not (root / name).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} listed identities have no folder under {root}, e.g. {missing[:3]}"
            + (f" (list: {identities})" if isinstance(identities, (str, Path)) else "")
        )
    repeated = [name for name, count in Counter(wanted).items() if count > 1]
    if repeated:
        raise ValueError(f"the identity list repeats {len(repeated)} names, e.g. {repeated[:3]}")
    return wanted


def has_image_suffix(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_SUFFIXES


def count_identities(root: str | Path, identities: str | Path | Sequence[str] | None = None) -> int:
    """How many identities scan_folder labels (those whose folder holds an image), from the folder
    listings alone: no image is read, and each listing stops at its first image."""
    root = Path(root)
    wanted = identity_folders(root, identities)
    count = 0
    for name in wanted:
        with os.scandir(root / name) as entries:
            count += any(entry.is_file() and has_image_suffix(entry.name) for entry in entries)
    if not count:
        raise ValueError(f"{root}: no images found in {len(wanted)} identity folders")
    return count


def scan_folder(root: str | Path, identities: str | Path | Sequence[str] | None = None) -> FolderScan:
    """The identities and images of `root` under the rules of the module docstring."""
    root = Path(root)
    wanted = identity_folders(root, identities)
    names, paths, labels, empty, skipped = [], [], [], [], 0
    for name in wanted:
        files = sorted(entry.name for entry in os.scandir(root / name) if entry.is_file())
        images = [file for file in files if has_image_suffix(file)]
        skipped += len(files) - len(images)
        if not images:
            empty.append(name)
            continue
        paths += [os.fsencode(f"{name}/{file}") for file in images]
        labels += [len(names)] * len(images)
        names.append(name)
    if skipped:
        log.warning("%s: skipped %d files without an image suffix %s", root, skipped, sorted(IMAGE_SUFFIXES))
    if empty:
        log.warning("%s: skipped %d identity folders without images, e.g. %s", root, len(empty), empty[:3])
    if not names:
        raise ValueError(f"{root}: no images found in {len(wanted)} identity folders")
    return FolderScan(root, names, np.array(paths), np.asarray(labels, dtype=np.int64), skipped, empty)


class ImageFiles(Dataset):
    """(image, index) for a list of image files, as evaluation protocols hand out their images."""

    def __init__(self, paths: Sequence[Path], image_size: int = 112):
        self.paths = list(paths)
        self.image_size = int(image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        return image_tensor(path.read_bytes(), self.image_size, str(path)), index


class ImageFolderDataset(EncodedImages):
    """Training set over `root/<identity>/<image>`; its classes are the identities with images.

    num_classes: the configured class count, checked against the folder; None takes the folder's.
    strict, min_image_size: what counts as unreadable, and whether it raises (EncodedImages).
    """

    def __init__(
        self,
        root: str | Path,
        identities: str | Path | Sequence[str] | None = None,
        image_size: int = 112,
        augment: Augment = FLIP,
        strict: bool = False,
        num_classes: int | None = None,
        min_image_size: int | None = None,
    ):
        self.scan = scan_folder(root, identities)
        found = len(self.scan.names)
        if num_classes is not None and num_classes != found:
            among = " among the listed identities" if identities is not None else ""
            raise ValueError(
                f"dataset.num_classes={num_classes} but {self.scan.root} holds {found} identity folders with "
                f"images{among}; set dataset.num_classes={found}, or leave it out (null) to read it from the folder"
            )
        super().__init__(found, image_size, augment, strict, min_image_size)
        log.info("%s: %d images of %d identities", self.scan.root, len(self), self.num_classes)

    @classmethod
    def count_classes(cls, root: str | Path, identities: str | Path | Sequence[str] | None = None) -> int:
        """The class count of the set over `root` (and `identities`), from the folder listings alone;
        what train.py reads when dataset.num_classes is left out."""
        return count_identities(root, identities)

    def __len__(self) -> int:
        return len(self.scan.labels)

    def encoded(self, index: int) -> tuple[bytes, int, str]:
        path = self.scan.path(index)
        return path.read_bytes(), int(self.scan.labels[index]), str(path)


class ImageFolderPairs(VerificationSet):
    """Same/different pairs over the images of an image folder's identities (use identities disjoint
    from training for an open-set check), laid out in `n_folds` balanced consecutive blocks."""

    def __init__(
        self,
        root: str | Path,
        identities: str | Path | Sequence[str] | None = None,
        num_pairs: int = 600,
        n_folds: int = 10,
        seed: int = 0,
        image_size: int = 112,
        name: str = "folder_pairs",
    ):
        self.scan = scan_folder(root, identities)
        self.image_size = int(image_size)
        pairs, issame = balanced_pairs(self.scan.labels, num_pairs, n_folds, seed=seed)
        super().__init__(name=name, num_images=len(self.scan.labels), pairs=pairs, issame=issame)

    def image(self, index: int) -> torch.Tensor:
        path = self.scan.path(index)
        return image_tensor(path.read_bytes(), self.image_size, str(path))

    def image_names(self) -> list[str]:
        """Each image's path relative to root, "<identity>/<file>"."""
        return [os.fsdecode(path) for path in self.scan.paths]

    def image_identities(self) -> list[str]:
        """Each image's identity: its folder name."""
        return [self.scan.names[label] for label in self.scan.labels]

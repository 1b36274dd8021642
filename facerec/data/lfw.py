"""LFW pairs files (`pairs.txt`, `pairsDevTrain.txt`, `pairsDevTest.txt`) over an image folder.

Layout: a header line, then same-person lines `name<TAB>n1<TAB>n2` and
different-person lines `name1<TAB>n1<TAB>name2<TAB>n2` (image numbers 1-based;
the files are `root/name/name_NNNN.jpg`). Header `folds<TAB>n` (View 2: 10 x 300):
each fold is n same then n different lines, and the folds are the protocol's.
Header `n` (View 1): n same then n different lines; no official folds (the
evaluation draws stratified ones).

A pair whose image file is missing (LFW's `Betsy_Coffin_0001` in pairsDevTest.txt)
is skipped, logged with its line and counted in `skipped_lines` (missing="error":
FileNotFoundError instead); the remaining pairs keep their labels and folds.

`LfwIdentities` trains on the people of a `people*.txt` list (View 1: peopleDevTrain.txt) or a
seeded subset of them, with only their images: the class-count knob of `experiment=s_star`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from facerec.data.augment import FLIP, Augment
from facerec.data.decode import image_tensor
from facerec.data.image_folder import ImageFolderDataset, ImageFolderPairs, read_identity_list
from facerec.data.verification import VerificationSet

log = logging.getLogger(__name__)


@dataclass
class PairsFile:
    """One entry per line: `images[i]` = ((name, number), (name, number)), `issame[i]`,
    `folds[i]` (None for View 1) and `lines[i]`, the 1-based line number."""

    images: list[tuple[tuple[str, int], tuple[str, int]]]
    issame: np.ndarray
    folds: np.ndarray | None
    lines: list[int]


def read_pairs(path: str | Path) -> PairsFile:
    path = Path(path)
    rows = path.read_text().splitlines()
    header = rows[0].split() if rows else []
    if len(header) not in (1, 2) or not all(field.isdigit() for field in header):
        raise ValueError(f"{path}:1: expected a header 'folds<TAB>pairs per class' or 'pairs per class', got {rows[:1]}")
    n_folds, per_class = (int(header[0]), int(header[1])) if len(header) == 2 else (1, int(header[0]))
    body = [(number, row.split()) for number, row in enumerate(rows[1:], 2) if row.strip()]
    if len(body) != 2 * n_folds * per_class:
        raise ValueError(f"{path}: the header promises {n_folds} x 2 x {per_class} pairs, the file has {len(body)} lines")
    images, issame, lines = [], [], []
    for position, (number, fields) in enumerate(body):
        same = position % (2 * per_class) < per_class
        if same and len(fields) == 3 and fields[1].isdigit() and fields[2].isdigit():
            images.append(((fields[0], int(fields[1])), (fields[0], int(fields[2]))))
        elif not same and len(fields) == 4 and fields[1].isdigit() and fields[3].isdigit():
            images.append(((fields[0], int(fields[1])), (fields[2], int(fields[3]))))
        else:
            kind = "same-person 'name n1 n2'" if same else "different-person 'name1 n1 name2 n2'"
            raise ValueError(f"{path}:{number}: expected a {kind} line here, got {' '.join(fields)!r}")
        issame.append(same)
        lines.append(number)
    folds = np.repeat(np.arange(n_folds), 2 * per_class) if n_folds > 1 else None
    return PairsFile(images, np.asarray(issame), folds, lines)


class LfwPairs(VerificationSet):
    """Verification pairs of an LFW pairs file over `root/<name>/<name>_NNNN<suffix>`."""

    def __init__(
        self,
        root: str | Path,
        pairs: str | Path,
        name: str = "lfw",
        image_size: int = 112,
        missing: str = "skip",
        suffix: str = ".jpg",
    ):
        if missing not in ("skip", "error"):
            raise ValueError(f"missing must be 'skip' or 'error', got {missing!r}")
        self.root, self.pairs_file = Path(root), Path(pairs)
        self.image_size = int(image_size)
        parsed = read_pairs(self.pairs_file)
        self.paths: list[Path] = []  # each image once, however many pairs use it
        index_of: dict[Path, int] = {}
        pair_indices, kept, self.skipped_lines = [], [], []
        for row, (line, images) in enumerate(zip(parsed.lines, parsed.images)):
            files = [self.root / name / f"{name}_{number:04d}{suffix}" for name, number in images]
            absent = [str(file) for file in files if not file.is_file()]
            if absent:
                if missing == "error":
                    raise FileNotFoundError(f"{self.pairs_file}:{line}: image not found: {absent[0]}")
                self.skipped_lines.append(line)
                log.warning("%s:%d: skipped pair, image not found: %s", self.pairs_file, line, absent[0])
                continue
            for file in files:
                if file not in index_of:
                    index_of[file] = len(self.paths)
                    self.paths.append(file)
            pair_indices.append([index_of[file] for file in files])
            kept.append(row)
        if self.skipped_lines:
            log.warning(
                "%s: %d of %d pairs skipped for missing images (lines %s)",
                self.pairs_file, len(self.skipped_lines), len(parsed.images), self.skipped_lines,
            )
        super().__init__(
            name=name,
            num_images=len(self.paths),
            pairs=np.asarray(pair_indices, dtype=np.int64).reshape(-1, 2),
            issame=parsed.issame[kept],
            folds=None if parsed.folds is None else parsed.folds[kept],
        )

    def image(self, index: int) -> torch.Tensor:
        return image_tensor(self.paths[index].read_bytes(), self.image_size, str(self.paths[index]))

    def image_names(self) -> list[str]:
        """Each image's path relative to root, "Name/Name_0001.jpg"."""
        return [f"{path.parent.name}/{path.name}" for path in self.paths]

    def image_identities(self) -> list[str]:
        """Each image's person: its folder name."""
        return [path.parent.name for path in self.paths]


def identity_subset(names: Sequence[str], num_identities: int, seed: int = 0, source: str = "the identity list") -> list[str]:
    """`num_identities` of `names`, drawn by a seeded permutation and kept in their listed order.

    The subset is the first `num_identities` of one permutation of the list, so for one seed the
    subsets are nested (the 300 people are among the 1,000) and the whole list is the list itself.
    """
    is_integer = isinstance(num_identities, (int, np.integer)) and not isinstance(num_identities, bool)
    if not is_integer or not 2 <= num_identities <= len(names):
        raise ValueError(
            f"num_identities (dataset.num_classes) must be an integer in [2, {len(names)}], the number of "
            f"people in {source}; got {num_identities!r}"
        )
    chosen = np.random.default_rng(seed).permutation(len(names))[:num_identities]
    return [names[index] for index in np.sort(chosen)]


def people_present(root: str | Path, identities: str | Path) -> list[str]:
    """The people of an LFW people file that have a folder under `root`, in the file's order; the
    absent ones are logged (the aligned LFW lacks Betsy_Coffin, DevTest's one person whose only image
    is missing), so subsets are drawn from the people there are."""
    names = read_identity_list(identities)
    present = [name for name in names if (Path(root) / name).is_dir()]
    if len(present) < len(names):
        kept = set(present)
        absent = [name for name in names if name not in kept]
        log.warning("%s: %d listed people have no folder under %s and are left out: %s", identities, len(absent), root, absent[:10])
    return present


class LfwIdentities(ImageFolderDataset):
    """Training set of the people of an LFW people file under `root/<name>/<image>`: all of them, or
    `num_identities` drawn with `subset_seed` (`identity_subset`), each with all of its images and
    labelled 0..N-1 in the file's order. `subset_seed` is separate from the run's seed, so the
    training seeds of a sweep vary the run, not the people."""

    def __init__(
        self,
        root: str | Path,
        identities: str | Path,
        num_identities: int,
        subset_seed: int = 0,
        image_size: int = 112,
        augment: Augment = FLIP,
        strict: bool = False,
        min_image_size: int | None = None,
    ):
        names = people_present(root, identities)
        self.people = identity_subset(names, num_identities, subset_seed, str(identities))
        super().__init__(root, self.people, image_size, augment, strict, min_image_size=min_image_size)


class LfwUntrainedPairs(ImageFolderPairs):
    """Same/different pairs over the people of an LFW people file that an `LfwIdentities` subset of
    the same file did not train on: `trained_identities` people drawn with `subset_seed`, as
    LfwIdentities draws them. Fine-tuning on some unseen people (e.g. DevTest's) is then scored on
    the others, and no person trained on appears in any pair."""

    def __init__(
        self,
        root: str | Path,
        identities: str | Path,
        trained_identities: int,
        subset_seed: int = 0,
        num_pairs: int = 600,
        n_folds: int = 10,
        seed: int = 0,
        image_size: int = 112,
        name: str = "lfw_untrained",
    ):
        names = people_present(root, identities)
        trained = set(identity_subset(names, trained_identities, subset_seed, str(identities)))
        self.people = [person for person in names if person not in trained]
        super().__init__(root, self.people, num_pairs, n_folds, seed, image_size, name)

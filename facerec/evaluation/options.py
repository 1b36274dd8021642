"""What eval.py and validation compute beside a set's metrics, read from their configs: the
bootstrap, per-image quality scores and identity groups (facerec.evaluation.metric.ScoringOptions)."""
from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from facerec.evaluation.bootstrap import Bootstrap
from facerec.evaluation.metric import ScoringOptions
from facerec.evaluation.protocols.base import EvaluationProtocol

NORM_QUALITY = "norm"


def bootstrap_from(config: Mapping | None) -> Bootstrap:
    """A `bootstrap: {resamples, level, seed}` config section; None: no intervals."""
    if config is None:
        return Bootstrap(resamples=0)
    unknown = set(config) - {"resamples", "level", "seed"}
    if unknown:
        raise ValueError(f"bootstrap: unknown keys {sorted(unknown)}, expected resamples, level, seed")
    return Bootstrap(int(config.get("resamples", 1000)), float(config.get("level", 0.95)), int(config.get("seed", 0)))


def _rows(path: Path, columns: Sequence[str]) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found")
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in columns if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: expected a header with columns {list(columns)}, got {reader.fieldnames}")
        return list(reader)


def read_groups(path: str | Path) -> dict[str, str]:
    """{identity: group} from a CSV with columns identity, group (one row per identity). The RFW layout
    (txts/<Race>/<Race>_people.txt) is one such CSV: a row "<identity>,<Race>" per line of each file."""
    path = Path(path)
    groups: dict[str, str] = {}
    for number, row in enumerate(_rows(path, ("identity", "group")), start=2):
        identity, group = row["identity"].strip(), row["group"].strip()
        if not identity or not group:
            raise ValueError(f"{path}:{number}: empty identity or group")
        if groups.setdefault(identity, group) != group:
            raise ValueError(f"{path}:{number}: identity {identity!r} is in group {groups[identity]!r} and {group!r}")
    return groups


def read_quality(path: str | Path, image_names: Sequence[str], set_name: str) -> np.ndarray:
    """(num_images,) quality scores of a set's images from a CSV with columns image, quality (image
    keys as the set's image_names()); every image of the set must have one."""
    path = Path(path)
    scores: dict[str, float] = {}
    for number, row in enumerate(_rows(path, ("image", "quality")), start=2):
        try:
            scores[row["image"].strip()] = float(row["quality"])
        except ValueError as error:
            raise ValueError(f"{path}:{number}: quality {row['quality']!r} is not a number") from error
    missing = [name for name in image_names if name not in scores]
    if missing:
        raise ValueError(f"{path}: no quality score for {len(missing)} images of {set_name}, e.g. {missing[0]!r}")
    return np.array([scores[name] for name in image_names], dtype=np.float64)


def scoring_options(cfg: Mapping, protocol: EvaluationProtocol, set_name: str) -> ScoringOptions:
    """eval.py's keys bootstrap, quality (norm | CSV | null) and groups (CSV | null) for one set."""
    quality, quality_name = cfg.get("quality", NORM_QUALITY), "embedding norm"
    scores = None
    if quality not in (None, NORM_QUALITY):
        scores, quality_name = read_quality(quality, protocol.image_names(), set_name), f"quality of {Path(quality).name}"
    groups = read_groups(cfg["groups"]) if cfg.get("groups") else None
    return ScoringOptions(
        bootstrap_from(cfg.get("bootstrap")), groups, str(cfg.get("groups")), scores, quality_name, erc=quality is not None
    )

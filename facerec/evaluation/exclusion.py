"""`eval.py exclude=<csv>`: rescore the evaluation sets without some of their images.

The CSV has a header with a column `image` (the keys of EvaluationProtocol.image_names(): LFW
"Name/Name_0001.jpg", IJB "1.jpg", "<set>#<index>" for .bin and synthetic sets) and optionally a
column `set` (a conf/evalset name: the row applies to that set only; empty: to every set); other
columns are ignored. facerec.tools.overlap writes such a file (exclude.csv). Each set is rescored by
`protocol.without(keys)`; its notes say what was dropped. A key that names no image of the sets it
applies to, or a set that is not evaluated, is an error naming the file and line.
"""
from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path

from facerec.evaluation.protocols.base import EvaluationProtocol


def read_exclusions(path: str | Path) -> list[tuple[int, str, str | None]]:
    """(line number, image key, set name or None) for each row of an exclude CSV."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exclude={path}: file not found")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if "image" not in (reader.fieldnames or []):
            raise ValueError(f"exclude={path}:1: expected a header with a column 'image', got {reader.fieldnames}")
        rows = []
        for row in reader:
            key = (row.get("image") or "").strip()
            if not key:
                raise ValueError(f"exclude={path}:{reader.line_num}: empty 'image'")
            rows.append((reader.line_num, key, (row.get("set") or "").strip() or None))
    return rows


def exclude_images(protocols: Mapping[str, EvaluationProtocol], path: str | Path) -> dict[str, EvaluationProtocol]:
    """{name: protocol.without(the keys of the CSV at `path` that apply to it)}; see the module docstring."""
    rows = read_exclusions(path)
    names = {name: set(protocol.image_names()) for name, protocol in protocols.items()}
    keys: dict[str, set[str]] = {name: set() for name in protocols}
    for line, key, only in rows:
        if only is not None and only not in protocols:
            raise ValueError(f"exclude={path}:{line}: set {only!r} is not evaluated (eval_sets={list(protocols)})")
        targets = [only] if only is not None else [name for name in protocols if key in names[name]]
        if not targets or key not in names[targets[0]]:
            where = f"set {only!r}" if only is not None else f"any evaluated set ({', '.join(protocols)})"
            raise ValueError(f"exclude={path}:{line}: image {key!r} is no image of {where}")
        for name in targets:
            keys[name].add(key)
    return {name: protocol.without(keys[name], f"exclude={path}") for name, protocol in protocols.items()}

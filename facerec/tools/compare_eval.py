"""Compare two models on the same evaluation sets, with paired intervals and p-values.

    python -m facerec.tools.compare_eval A/results.json B/results.json            # two eval.py runs
    python -m facerec.tools.compare_eval A_dir B_dir --sets lfw,lfw_devtest        # their output folders
    python -m facerec.tools.compare_eval a.ckpt b.ckpt --sets lfw_devtest --out cmp  # runs eval.py on each first
    python -m facerec.tools.compare_eval A_s0,A_s1,A_s2 B_s0,B_s1,B_s2                # seeds, paired by position

Each eval.py run writes its sets' scored items to scores.npz beside results.json. For every set both
runs scored, the items must be the same (pairs, labels, folds, units: else an error says so), and
each metric's difference B - A gets a paired bootstrap interval and p-value: both models resampled
with the same unit draws (facerec.evaluation.bootstrap.paired_comparison), the resamples, level and
seed of A's results.json unless given. For pair sets, McNemar's exact test on the held-out decisions
is reported too. A difference is *resolved* when its interval excludes 0.

With several runs on each side (comma-separated, e.g. one per seed), run k of A is paired with run k
of B and the difference of the means over runs gets a two-level bootstrap that resamples the runs and
the units together (facerec.evaluation.bootstrap.paired_runs): the seeds' spread is in the interval.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from facerec.evaluation.bootstrap import NO_INTERVAL, Bootstrap, Difference, check_comparable, mcnemar, paired_comparison, paired_runs
from facerec.evaluation.report import SCORES_FILE, metric_cell, read_scores
from facerec.evaluation.scored import ScoredItems
from facerec.tools.markdown import markdown

CHECKPOINT_SUFFIXES = (".ckpt", ".onnx")


def results_file(source: Path) -> Path:
    """The results.json of an eval.py run: the file itself or the folder that holds it."""
    path = source / "results.json" if source.is_dir() else source
    if not path.is_file():
        raise FileNotFoundError(f"{source}: no results.json (give an eval.py output folder or its results.json)")
    return path


def load_evaluation(source: Path) -> tuple[dict, dict[str, ScoredItems]]:
    """(results.json, {set: ScoredItems}) of an eval.py run."""
    path = results_file(source)
    results = json.loads(path.read_text())
    scores = path.parent / (results.get("scores") or SCORES_FILE)
    if not scores.is_file():
        raise FileNotFoundError(f"{path}: no {scores.name} beside it; run eval.py with save_scores=true (the default)")
    return results, read_scores(scores)


def run_eval(checkpoint: Path, sets: Sequence[str], out_dir: Path, overrides: Sequence[str]) -> Path:
    """Evaluate a checkpoint (or ONNX file) with the repository's eval.py into out_dir."""
    eval_py = Path(__file__).resolve().parents[2] / "eval.py"
    source = "onnx_path" if checkpoint.suffix == ".onnx" else "ckpt_path"
    command = [sys.executable, str(eval_py), f"{source}={checkpoint}", f"eval_sets=[{','.join(sets)}]", f"hydra.run.dir={out_dir}"]
    subprocess.run([*command, *overrides], check=True)
    return out_dir


def compare_evaluations(
    a: dict[str, ScoredItems], b: dict[str, ScoredItems], bootstrap: Bootstrap, sets: Sequence[str] | None = None
) -> dict[str, dict]:
    """{set: {"differences": {metric: Difference}, "mcnemar": {...} or None}} over the sets both scored."""
    common = [name for name in a if name in b]
    if sets:
        missing = [name for name in sets if name not in common]
        if missing:
            raise ValueError(f"sets {missing} are not in both evaluations (both have {common})")
        common = list(sets)
    if not common:
        raise ValueError(f"the two evaluations share no set (A: {sorted(a)}, B: {sorted(b)})")
    compared = {}
    for name in common:
        differences = paired_comparison(a[name], b[name], bootstrap, what=f"set {name!r}")
        decisions_a, decisions_b = a[name].decisions(), b[name].decisions()
        compared[name] = {
            "differences": differences,
            "mcnemar": None if decisions_a is None else mcnemar(decisions_a, decisions_b),
        }
    return compared


def compare_seeds(
    a: Sequence[dict[str, ScoredItems]], b: Sequence[dict[str, ScoredItems]], bootstrap: Bootstrap, sets: Sequence[str] | None = None
) -> dict[str, dict]:
    """compare_evaluations for several runs a side, run k of A against run k of B (paired_runs)."""
    common = [name for name in a[0] if all(name in runs for runs in (*a, *b))]
    common = list(sets) if sets else common
    missing = [name for name in common if not all(name in runs for runs in (*a, *b))]
    if missing or not common:
        raise ValueError(f"sets {missing or sets} are not in every evaluation" if common else "the evaluations share no set")
    compared = {}
    for name in common:
        for k, runs in enumerate((*a, *b)):
            check_comparable(a[0][name], runs[name], f"set {name!r}, run {k % len(a)} of {'AB'[k // len(a)]}")
        keys = [key for key, value in a[0][name].metrics().items() if key not in NO_INTERVAL and value is not None]
        differences = {}
        for key in keys:

            def value(items, weights, name=name, key=key) -> float:
                found = items[name].metrics(None if weights is None else weights[name]).get(key)
                if found is None or not np.isfinite(found):
                    raise ValueError(f"{key} undefined")
                return found

            try:
                differences[key] = paired_runs([{name: r[name]} for r in a], [{name: r[name]} for r in b], value, bootstrap)
            except ValueError:
                continue  # the metric is undefined in some run (a FAR the set cannot reach)
        compared[name] = {"differences": differences, "mcnemar": None}
    return compared


def comparison_table(compared: dict[str, dict], level: float) -> str:
    sections = []
    for name, found in compared.items():
        rows = [
            [key, metric_cell(key, d.a, None), metric_cell(key, d.b, None), difference_cell(key, d), _p(d.p_value), "yes" if d.resolved else "no"]
            for key, d in found["differences"].items()
        ]
        header = ["metric", "A", "B", f"B − A [{level:.0%} interval]", "p", "resolved"]
        text = f"### {name}\n\n{markdown(header, rows)}"
        if found["mcnemar"]:
            m = found["mcnemar"]
            text += (
                f"\n\nMcNemar (held-out 10-fold decisions, pairs treated as independent): A right and B wrong "
                f"{m['a_right_b_wrong']}, A wrong and B right {m['a_wrong_b_right']}, p = {_p(m['p_value'])}"
            )
        sections.append(text)
    return "\n\n".join(sections)


def difference_cell(key: str, d: Difference) -> str:
    scale, digits, unit = (1, 4, "") if key == "auc" else (100, 2, " pp")
    cell = f"{scale * d.difference:+.{digits}f}{unit}"
    if d.interval:
        cell += f" [{scale * d.interval[0]:+.{digits}f}, {scale * d.interval[1]:+.{digits}f}]"
    return cell


def _p(p: float | None) -> str:
    return "n/a" if p is None else (f"{p:.3f}" if p >= 1e-3 else f"{p:.1e}")


def to_json(compared: dict[str, dict]) -> dict:
    return {
        name: {
            "differences": {
                key: {"a": d.a, "b": d.b, "difference": d.difference, "interval": d.interval, "p_value": d.p_value, "resolved": d.resolved}
                for key, d in found["differences"].items()
            },
            "mcnemar": found["mcnemar"],
        }
        for name, found in compared.items()
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m facerec.tools.compare_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="model A: an eval.py output folder, its results.json, or a checkpoint (.ckpt/.onnx); several runs: comma-separated")
    parser.add_argument("b", help="model B, the same kinds (as many runs as A, paired by position)")
    parser.add_argument("--sets", help="comma-separated set names (needed with checkpoints; default: every set both scored)")
    parser.add_argument("--resamples", type=int, help="bootstrap replicates (default: A's results.json, else 1000)")
    parser.add_argument("--level", type=float, help="interval coverage (default: A's, else 0.95)")
    parser.add_argument("--seed", type=int, help="seed of the unit draws (default: A's, else 0)")
    parser.add_argument("--out", type=Path, help="write comparison.md and comparison.json here (and the evaluations of checkpoints)")
    parser.add_argument("--override", action="append", default=[], help="an eval.py override for checkpoints, e.g. flip=none")
    args = parser.parse_args(argv)
    sets = [name.strip() for name in args.sets.split(",")] if args.sets else None
    try:
        sides = {"a": [Path(p) for p in args.a.split(",")], "b": [Path(p) for p in args.b.split(",")]}
        if len(sides["a"]) != len(sides["b"]):
            raise ValueError(f"A has {len(sides['a'])} runs and B {len(sides['b'])}: they are paired by position")
        sources = {label: [] for label in sides}
        for label, paths in sides.items():
            for k, source in enumerate(paths):
                if source.suffix in CHECKPOINT_SUFFIXES:
                    if not sets:
                        raise ValueError(f"{source}: comparing checkpoints needs --sets (the evaluation sets to run)")
                    if args.out is None:
                        raise ValueError(f"{source}: comparing checkpoints needs --out (where their evaluations go)")
                    source = run_eval(source, sets, args.out / f"{label}{k if len(paths) > 1 else ''}", args.override)
                sources[label].append(source)
        loaded = {label: [load_evaluation(source) for source in found] for label, found in sources.items()}
        results_a = loaded["a"][0][0]
        saved = results_a.get("bootstrap") or {}
        bootstrap = Bootstrap(
            args.resamples if args.resamples is not None else int(saved.get("resamples", 1000)) or 1000,
            args.level if args.level is not None else float(saved.get("level", 0.95)),
            args.seed if args.seed is not None else int(saved.get("seed", 0)),
        )
        items_a, items_b = ([items for _, items in loaded[label]] for label in ("a", "b"))
        if len(items_a) == 1:
            compared = compare_evaluations(items_a[0], items_b[0], bootstrap, sets)
        else:
            compared = compare_seeds(items_a, items_b, bootstrap, sets)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"facerec.tools.compare_eval: {error}") from None
    table = comparison_table(compared, bootstrap.level)
    runs = "paired resamples" if len(items_a) == 1 else f"two-level resamples (runs and units; {len(items_a)} runs a side, means)"
    a_names, b_names = (", ".join(map(str, sources[label])) for label in ("a", "b"))
    print(f"A: {a_names}\nB: {b_names}\n{bootstrap.resamples} {runs} (seed {bootstrap.seed})\n\n{table}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "comparison.md").write_text(f"A: `{a_names}`, B: `{b_names}`\n\n{table}\n")
        (args.out / "comparison.json").write_text(json.dumps(to_json(compared), indent=2) + "\n")


if __name__ == "__main__":
    main()

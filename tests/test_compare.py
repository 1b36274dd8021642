"""facerec.tools.compare on fabricated multirun logs, and once on a real tiny multirun."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import TINY_RUN, run_script
from facerec.evaluation import VAL_SCORES_FILE, EmbeddingNorms, Evaluation, verify, write_scores
from facerec.tools import compare
from facerec.tools import runs as run_logs

VAL = "val/synthetic_heldout"
COLUMNS = ["epoch", "step", "train/loss", "train/s", "train/theta_med", "train/p_target", "train/top1",
           "train/grad_norm_backbone", "val/accuracy_mean", f"{VAL}/accuracy", f"{VAL}/tar@far=1e-02",
           f"{VAL}/tar@far=1e-03"]  # fmt: skip


def write_run(run_dir: Path, overrides: list[str], accuracy: list[float], s: float, theta_end: float,
              log_lines: list[str], val_every: int = 10, extra_rows: list[dict] = ()) -> None:  # fmt: skip
    """A run directory as train.py writes it: .hydra/overrides.yaml, csv/metrics.csv, train.log.
    One validation every `val_every` steps with the given accuracies; theta_med falls linearly to
    theta_end; the TAR at 1e-3 is the accuracy minus 0.2."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "csv").mkdir()
    steps = val_every * len(accuracy)
    rows = []
    for step in range(steps):
        theta = 90 + (theta_end - 90) * step / (steps - 1)
        rows.append({"epoch": 0, "step": step, "train/loss": 20 - step / 10, "train/s": s, "train/theta_med": theta,
                     "train/p_target": 0.5, "train/top1": 0.9, "train/grad_norm_backbone": s / 10})  # fmt: skip
        if (step + 1) % val_every == 0:
            acc = accuracy[(step + 1) // val_every - 1]
            rows.append({"epoch": 0, "step": step, "val/accuracy_mean": acc, f"{VAL}/accuracy": acc,
                         f"{VAL}/tar@far=1e-02": acc - 0.1, f"{VAL}/tar@far=1e-03": acc - 0.2})  # fmt: skip
    with open(run_dir / "csv" / "metrics.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([*rows, *extra_rows])
    (run_dir / "train.log").write_text("\n".join(log_lines) + "\n")


def log(hms: str, message: str = "something") -> str:
    return f"[2026-01-01 {hms},000][facerec.training.fit][INFO] - {message}"


START = "Seed set to 0"


def write_sweep(sweep_dir: Path) -> None:
    """scale=fixed,auto x seed=0,1 from a command-line sweep: 4 runs."""
    sweep_dir.mkdir(parents=True)
    multirun = {"hydra": {"overrides": {"task": ["scale=fixed,auto", "seed=0,1", "experiment=smoke"]},
                          "sweeper": {"params": None}}}  # fmt: skip
    (sweep_dir / "multirun.yaml").write_text(yaml.safe_dump(multirun))
    runs = [  # scale, seed, accuracies, s, theta at the end, wall time in minutes
        ("fixed", 0, [0.6, 0.7, 0.8], 30.0, 50.0, 10),
        ("fixed", 1, [0.6, 0.8, 0.7], 30.0, 60.0, 12),
        ("auto", 0, [0.7, 0.9, 0.9], 13.0, 40.0, 11),
        ("auto", 1, [0.8, 0.93, 0.95], 13.0, 40.0, 11),
    ]
    for number, (scale, seed, accuracy, s, theta, minutes) in enumerate(runs):
        lines = [log("10:00:00", START), log(f"10:{minutes:02d}:00")]
        write_run(sweep_dir / str(number), [f"scale={scale}", f"seed={seed}", "experiment=smoke"], accuracy, s, theta, lines)


def test_read_metrics_keeps_the_last_row_of_a_step(tmp_path):
    """A resumed run appends rows for steps it had already logged: the later row wins."""
    resumed = [{"epoch": 0, "step": 5, "train/loss": -1.0}, {"epoch": 0, "step": 29, "val/accuracy_mean": 0.99}]
    write_run(tmp_path, ["scale=auto"], [0.5, 0.6, 0.7], 13.0, 45.0, [log("00:00:00", START)], extra_rows=resumed)
    series = run_logs.read_metrics(tmp_path / "csv" / "metrics.csv")
    steps, loss = series["train/loss"]
    assert steps.tolist() == list(range(30)) and loss[5] == -1.0 and loss[4] == 20 - 0.4
    assert series["val/accuracy_mean"][0].tolist() == [9, 19, 29]
    assert series["val/accuracy_mean"][1].tolist() == [0.5, 0.6, 0.99]


def test_wall_time_sums_the_starts_of_a_resumed_run(tmp_path):
    lines = [log("10:00:00", START), "  a continuation line", log("10:05:30"),  # ran 5.5 min, was stopped
             log("12:00:00", START), log("12:02:00")]  # resumed two hours later, ran 2 min  # fmt: skip
    (tmp_path / "train.log").write_text("\n".join(lines))
    assert run_logs.wall_time(tmp_path / "train.log") == 7.5 * 60
    assert math.isnan(run_logs.wall_time(tmp_path / "missing.log"))


def test_groups_by_swept_keys_and_aggregates_seeds(tmp_path):
    write_sweep(tmp_path / "sweep")
    runs, keys = run_logs.load_runs([tmp_path / "sweep"])
    assert keys == ["scale"]  # the seed is aggregated, experiment=smoke was not swept
    groups = run_logs.group_runs(runs, keys)
    assert list(groups) == ["scale=fixed", "scale=auto"] and [len(g) for g in groups.values()] == [2, 2]

    fixed, auto = compare.summarize(groups)
    assert fixed.tar_metric == f"{VAL}/tar@far=1e-03"
    assert fixed.values["final"] == pytest.approx((0.75, np.std([0.8, 0.7], ddof=1)))
    assert fixed.values["best"][0] == pytest.approx(0.8)
    assert auto.values["final"][0] == pytest.approx(0.925) and auto.values["tar"][0] == pytest.approx(0.725)
    assert fixed.values["s"] == (30.0, 0.0) and auto.values["s"][0] == 13.0
    assert fixed.values["steps"] == (30, 0) and math.isnan(fixed.values["nonfinite"][0])  # not logged here
    # the first validation at >= 95% of the run's best: steps 29 and 19 (fixed), 19 and 19 (auto)
    assert fixed.values["steps_to_95"][0] == 24 and auto.values["steps_to_95"] == (19, 0)
    assert fixed.values["wall_time_s"][0] == 11 * 60
    # theta_med "at the end": the mean over the last 5% of steps (2 of 30), linear towards 50 and 60
    end = lambda theta: np.mean([90 + (theta - 90) * step / 29 for step in (28, 29)])  # noqa: E731
    assert fixed.values["theta_med"][0] == pytest.approx((end(50) + end(60)) / 2)

    table = compare.markdown_table([fixed, auto])
    assert "TAR@FAR=1e-03 (%)" in table.splitlines()[0]
    assert "| `scale=auto` | 2 | 30 ± 0 | – | 13.00 ± 0.00 | 92.5 ± 3.5 | 92.5 ± 3.5 | 72.5 ± 3.5 |" in table


def test_tar_falls_back_to_the_smallest_far_logged(tmp_path):
    """LFW DevTest has 499 different pairs: TAR@FAR=1e-3 is not measurable, 1e-2 is reported."""
    write_sweep(tmp_path / "sweep")
    runs, keys = run_logs.load_runs([tmp_path / "sweep"])
    for run in runs:
        del run.series[f"{VAL}/tar@far=1e-03"]
    summaries = compare.summarize(run_logs.group_runs(runs, keys), far=1e-3)
    assert summaries[0].tar_metric == f"{VAL}/tar@far=1e-02"
    assert summaries[1].values["tar"][0] == pytest.approx(0.825)


def test_several_sweeps_combine_and_differing_overrides_group(tmp_path):
    """Two multiruns (all scales at seed 0, then more seeds of two scales) compare as one."""
    write_sweep(tmp_path / "a")
    (tmp_path / "b").mkdir()
    lines = [log("10:00:00", START), log("10:01:00")]
    write_run(tmp_path / "b" / "0", ["scale=fixed64", "seed=0", "experiment=smoke"], [0.5, 0.6], 64.0, 70.0, lines)
    runs, keys = run_logs.load_runs([tmp_path / "a", tmp_path / "b"])  # b has no multirun.yaml
    assert keys == ["scale"]
    assert list(run_logs.group_runs(runs, keys)) == ["scale=fixed", "scale=auto", "scale=fixed64"]


def test_cli_writes_one_figure_and_one_table(tmp_path, capsys):
    write_sweep(tmp_path / "sweep")
    compare.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "`scale=fixed`" in printed and "`scale=auto`" in printed
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["comparison.md", "comparison.png"]
    assert (tmp_path / "out" / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| `scale=auto` | 2 |" in (tmp_path / "out" / "comparison.md").read_text()


def test_a_run_without_csv_is_named(tmp_path):
    write_sweep(tmp_path / "sweep")
    (tmp_path / "sweep" / "1" / "csv" / "metrics.csv").unlink()
    with pytest.raises(SystemExit, match=r"sweep/1: no csv/metrics.csv.*logger=wandb_csv"):
        compare.main([str(tmp_path / "sweep")])
    with pytest.raises(SystemExit, match=r"no runs \(expected <n>/.hydra/overrides.yaml"):
        compare.main([str(tmp_path)])


def test_paired_columns_mark_resolved_differences_from_the_baseline(tmp_path, capsys):
    """Each run's val_scores.npz (its last validation's pairs): scale=auto's runs separate the pairs
    much better than scale=fixed's on the same 600 pairs, so the paired difference is resolved."""
    write_sweep(tmp_path / "sweep")
    rng = np.random.default_rng(0)
    issame = np.arange(600) % 2 == 0
    base = rng.normal(size=(600, 8))
    for number, signal in enumerate([0.4, 0.4, 1.5, 1.5]):  # runs 0, 1: fixed; 2, 3: auto
        other = np.where(issame[:, None], signal * base + rng.normal(size=(600, 8)), rng.normal(size=(600, 8)))
        result = verify(base, other, issame)
        write_scores({"synthetic_heldout": Evaluation(result, EmbeddingNorms(1.0, 0.0))}, tmp_path / "sweep" / str(number) / VAL_SCORES_FILE)
    compare.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--resamples", "200"])
    table = capsys.readouterr().out
    assert "final − `scale=fixed` (pp) [95% interval] | resolved |" in table
    auto_row = next(line for line in table.splitlines() if line.startswith("| `scale=auto`"))
    assert auto_row.endswith("| yes |") and "| +" in auto_row
    assert next(line for line in table.splitlines() if line.startswith("| `scale=fixed`")).endswith("| baseline |  |")
    with pytest.raises(SystemExit, match="--baseline 'scale=nope' is not a setting"):
        compare.main([str(tmp_path / "sweep"), "--baseline", "scale=nope"])
    (tmp_path / "sweep" / "3" / VAL_SCORES_FILE).unlink()
    compare.main([str(tmp_path / "sweep"), "--resamples", "200"])
    assert "no paired intervals: 1 runs saved no val_scores.npz" in capsys.readouterr().out


@pytest.mark.slow
def test_compare_a_real_multirun(tmp_path):
    sweep = tmp_path / "sweep"
    run_script(["train.py", "-m", *TINY_RUN, "logger=csv", "scale=fixed,auto", f"hydra.sweep.dir={sweep}"])
    out = run_script(["-m", "facerec.tools.compare", str(sweep)]).stdout
    runs, keys = run_logs.load_runs([sweep])
    assert keys == ["scale"] and len(runs) == 2
    fixed, auto = compare.summarize(run_logs.group_runs(runs, keys))
    assert fixed.values["s"][0] == pytest.approx(30.0)
    assert auto.values["s"][0] == pytest.approx(math.sqrt(2) * math.log(20 - 1))  # the smoke data has C = 20
    for summary in (fixed, auto):
        assert 0.0 <= summary.values["final"][0] <= 1.0 and 0 < summary.values["wall_time_s"][0] < 600
        assert 0 < summary.values["theta_med"][0] < 180
    assert "`scale=fixed`" in out and (sweep / "comparison.png").is_file()
    assert "final − `scale=fixed` (pp) [95% interval] | resolved |" in out  # train.py saved each run's val_scores.npz

"""benchmarks/head_ops.py: the CUDA path's op count per head step does not grow with C, the CPU
blocking's does (so the count tells them apart), and the diagnostics copy blocks, not the (B, C) matrix."""
from __future__ import annotations

import importlib.util

import pytest

from conftest import REPO_ROOT, run_script

spec = importlib.util.spec_from_file_location("head_ops", REPO_ROOT / "benchmarks" / "head_ops.py")
head_ops = importlib.util.module_from_spec(spec)
spec.loader.exec_module(head_ops)

SMALL, LARGE = 1_000, 20_000
BATCH, DIM = 256, 64


@pytest.fixture(scope="module")
def rows() -> dict:
    """(C, scale, statistics) -> the figures of both blockings, for CosFace with a fixed and the dynamic s."""
    figures = {}
    for classes in (SMALL, LARGE):
        for scale in ("fixed", "dynamic"):
            for row in head_ops.measure("cosface", scale, classes, BATCH, DIM):
                figures[classes, scale, row["statistics"]] = row
    return figures


@pytest.mark.parametrize("statistics", [False, True])
@pytest.mark.parametrize("scale", ["fixed", "dynamic"])
def test_cuda_blocking_op_count_does_not_grow_with_classes(rows, scale, statistics):
    small, large = rows[SMALL, scale, statistics], rows[LARGE, scale, statistics]
    for count in ("kernel_ops", "top_level_ops"):
        assert small["cuda"][count] == large["cuda"][count] > 0
        # the CPU blocking's blocks hold ~2^17 elements: 20x the columns, more blocks, more ops
        assert large["cpu"][count] > small["cpu"][count]
    assert head_ops.check_constant([small, large]) == []


def test_statistics_copy_a_block_not_the_batch_by_classes_matrix(rows):
    off, on = rows[LARGE, "fixed", False]["cuda"], rows[LARGE, "fixed", True]["cuda"]
    matrix = 4 * BATCH * LARGE
    assert off["forward_peak_bytes"] >= matrix  # the loss holds its one (B, C) buffer
    # the statistics' copy is one of DEVICE_ROW_BLOCKS blocks at a time; a whole-matrix clone would add 1.0
    assert 0 < on["forward_peak_bytes"] - off["forward_peak_bytes"] < 0.5 * matrix


def test_check_constant_names_a_count_that_changes():
    row = {"head": "cosface", "scale": "auto", "statistics": True}
    grown = [{**row, "cuda": {"kernel_ops": ops, "top_level_ops": 10}} for ops in (100, 101)]
    assert head_ops.check_constant(grown) == ["cosface + auto, statistics on: [(100, 10), (101, 10)]"]


def test_script_prints_both_tables():
    result = run_script(["benchmarks/head_ops.py", "--classes", "100", "300", "--dim", "8", "--batch", "16",
                         "--heads", "arcface", "--scales", "auto"])
    for line in ["| 300 | arcface | auto | on |", "forward increase / (B, C)", "the same op counts at every C"]:
        assert line in result.stdout, result.stdout


TINY = ["--batch", "8", "--dim", "16", "--classes", "50"]


def test_heads_benchmark_marks_ratios_measured_under_load():
    """heads.py prints the CPU model and the load average before and after, the fair floor of
    Sub-center ArcFace (a linear layer of width 3C), and marks its tables when the load average
    exceeded --max-load (here any load, -1) and not below it."""
    loaded = run_script(["benchmarks/heads.py", *TINY, "--repeats", "1", "--max-load", "-1"]).stdout
    assert "load average (1 min) before: " in loaded and "load average (1 min) after: " in loaded
    assert "UNDER LOAD" in loaded and "Do not publish them" in loaded
    assert "| nn.Linear(d, 3C) + cross-entropy | " in loaded
    assert "| subcenter arcface (K=3) / nn.Linear(d, 3C) + cross-entropy | " in loaded
    idle = run_script(["benchmarks/heads.py", *TINY, "--repeats", "1", "--max-load", "1000"]).stdout
    assert "UNDER LOAD" not in idle and "| cosface | " in idle


def test_breakdown_charges_the_step_to_its_stages():
    out = run_script(["benchmarks/head_breakdown.py", *TINY, "--steps", "1", "--heads", "cosface", "subcenter arcface (K=3)", "uniface (UCE-m)"]).stdout
    # stage -> cells of the columns: baseline, cosface, subcenter, uniface ("-": no op of that module there)
    rows = {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in out.splitlines() if line.startswith("| "))}
    for stage in ["cosine matmul x W^T", "backward matmuls (grad x, grad W)", "radial projection of grad W",
                  "row norms of W", "margin + scale + exp pass", "logit gradient pass", "closest of K centres",
                  "log-softmax + NLL forward", "**step, without the profiler**"]:
        assert stage in rows, out
    assert rows["radial projection of grad W"][0] == "-" and "-" not in rows["radial projection of grad W"][1:]
    assert rows["log-softmax + NLL forward"][0] != "-" and rows["log-softmax + NLL forward"][1:] == ["-", "-", "-"]
    assert rows["closest of K centres"] == ["-", "-", rows["closest of K centres"][2], "-"] and rows["closest of K centres"][2] != "-"
    assert rows["sigmoid heads: logits, softplus, sigmoid pass"] == ["-", "-", "-", rows["sigmoid heads: logits, softplus, sigmoid pass"][3]]
    assert rows["sigmoid heads: logits, softplus, sigmoid pass"][3] != "-" and rows["margin + scale + exp pass"][3] == "-"
    assert rows["backward matmuls (grad x, grad W)"].count("-") == 0

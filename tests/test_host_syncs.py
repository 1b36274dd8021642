"""At most one host sync per training step: the dense head, Partial FC and the dynamic scale, in one
process and under DDP (2 gloo processes). The preemption flags are agreed every N steps, and under
DDP a signal that reaches one rank stops every rank after the same batch.

Syncs are counted on CPU by tests/sync_counter.py (the calls that make the host wait for a GPU).
A logging step reads its metrics and may sync more; so does an epoch's last step, after which the
checkpoint is written.
"""
from __future__ import annotations

import json

import pytest
import torch

from conftest import TINY_RUN, run_script
from fault_injection import signal_at
from sync_counter import sync_counter

SKIP_DECISION = "step_guard.py"  # NonFiniteStepGuard.check, before each optimizer step: finite? stepped? (one read)
PREEMPTION_CHECK = "callbacks.py"
NO_VALIDATION = ["+trainer.limit_val_batches=0"]


def counted_run(tmp_path, overrides: list[str], ranks: int = 1) -> list[list[dict]]:
    """Each rank's per-step rows (see SyncCounter) of a TINY_RUN with `overrides`: 160 images, 16
    per batch and rank, no validation, logging every 4 steps."""
    path = tmp_path / "syncs"
    run_script(["train.py", *TINY_RUN, *NO_VALIDATION, "logger=csv", f"paths.log_dir={tmp_path}", "trainer.log_every_n_steps=4",
                *overrides, sync_counter(path)])
    return [json.loads((tmp_path / f"syncs.rank{rank}.json").read_text()) for rank in range(ranks)]


def sources(row: dict) -> list[str]:
    """Where each sync of a step came from: the file of the first frame outside torch."""
    return [where.split(" < ")[0].split(":")[0] for where in row["where"]]


@pytest.mark.parametrize("scale", ["auto", "dynamic"])
def test_a_step_of_one_process_syncs_once(tmp_path, scale):
    (rows,) = counted_run(tmp_path, [f"scale={scale}", "trainer.max_epochs=1"])
    assert len(rows) == 10
    for row in rows[:-1]:  # the last one writes the checkpoint
        if not row["logging"]:
            assert sources(row) == [SKIP_DECISION], row
    # a logging step reads its metrics: more syncs there, and only there
    assert [row["step"] for row in rows[:-1] if row["syncs"] > 1] == [3, 7]


@pytest.mark.slow
@pytest.mark.parametrize("sharding", [[], ["sharding=partial_fc", "sharding.sample_rate=0.5"]], ids=["dense", "partial_fc"])
def test_a_ddp_step_syncs_once_and_the_preemption_flags_every_n_steps(tmp_path, sharding):
    overrides = ["trainer=ddp_cpu", "trainer.max_epochs=2", "scale=dynamic", "callbacks.preemption.check_every_n_steps=3", *sharding]
    for rows in counted_run(tmp_path, overrides, ranks=2):
        assert len(rows) == 10  # 2 epochs of 5 steps
        for row in rows:
            if row["logging"] or row["step"] in (4, 9):  # the epochs' last steps write checkpoints
                continue
            check = (row["step"] + 1) % 3 == 0  # after batches 3, 6, 9
            assert sorted(sources(row)) == sorted([SKIP_DECISION] + [PREEMPTION_CHECK] * check), row


@pytest.mark.slow
def test_a_signal_to_one_ddp_rank_stops_both_after_the_same_batch(tmp_path):
    # SIGTERM reaches rank 1 alone as step 4 starts; the ranks agree on it after batch 6 (every 3).
    run_script(["train.py", *TINY_RUN, "trainer=ddp_cpu", "trainer.max_epochs=4", "logger=csv", f"paths.log_dir={tmp_path}",
                "sharding=partial_fc", "callbacks.preemption.check_every_n_steps=3", signal_at(4, rank=1)])
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    assert checkpoint["state_dict"]["head.centres.weight"].shape == (20, 128)  # both shards, gathered
    assert "received SIGTERM" in (run_dir / "train_ddp_process_1.log").read_text()
    assert "received SIGTERM" not in (run_dir / "train.log").read_text()
    assert "preemption checkpoint written" in (run_dir / "train.log").read_text()

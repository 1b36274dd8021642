"""Validation during training: every N steps, per-set metrics and their mean, ROC and table in W&B."""
from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import TINY_RUN, read_metrics, run_script


def wandb_tables(run: Path, key: str) -> list[dict]:
    """The tables an offline W&B run stored under media/table/val/<key>_<step>_<hash>.table.json, in step order."""
    files = (run / "files" / "media" / "table" / "val").glob(f"{key}_*.table.json")
    by_step = sorted(files, key=lambda p: int(re.match(rf"{key}_(\d+)_", p.name).group(1)))
    return [json.loads(p.read_text()) for p in by_step]


def test_validation_every_n_steps_reaches_csv_and_wandb(tmp_path):
    run_script(["train.py", *TINY_RUN, "logger=wandb_csv", "trainer.val_check_interval=5", f"hydra.run.dir={tmp_path}"])
    validations = [row for row in read_metrics(tmp_path) if row.get("val/accuracy_mean")]
    assert [int(row["step"]) for row in validations] == [4, 9, 14, 19]  # every 5 of the 2 x 10 steps
    for row in validations:
        assert row["val/accuracy_mean"] == row["val/synthetic_heldout/accuracy"]  # one set: the mean is its accuracy
        assert row["val/synthetic_heldout/tar@far=1e-01"] and not row.get("val/synthetic_heldout/tar@far=1e-02")

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = wandb_tables(run, "table")
    assert len(tables) == 4 and tables[0]["columns"][:4] == ["set", "pairs", "accuracy", "accuracy_std"]
    name, pairs, accuracy, _, tar, auc, eer, folds = tables[-1]["data"][0]
    last = validations[-1]
    assert (name, pairs, folds, tar) == ("synthetic_heldout", 80, "consecutive", None)  # 40 different pairs: no TAR@1e-3
    assert abs(accuracy - float(last["val/synthetic_heldout/accuracy"])) < 1e-6
    assert abs(auc - float(last["val/synthetic_heldout/auc"])) < 1e-6 and abs(eer - float(last["val/synthetic_heldout/eer"])) < 1e-6

    rocs = wandb_tables(run, "roc_table")
    assert len(rocs) == 4 and rocs[-1]["columns"] == ["set", "log10(FAR)", "FAR", "TAR"]
    far, tar = zip(*[(row[2], row[3]) for row in rocs[-1]["data"]])
    assert abs(far[0] - 1 / 40) < 1e-12 and far[-1] == 1.0 and tar[-1] == 1.0  # from 1/(different pairs) to 1
    assert all(a < b for a, b in zip(far, far[1:])) and all(a <= b for a, b in zip(tar, tar[1:]))
    record = next(run.glob("run-*.wandb")).read_bytes()
    assert b"val/roc" in record and b"wandb/line/v0" in record  # the custom line chart over the ROC table

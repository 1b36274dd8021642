"""Validation during training through the evaluation protocols eval.py runs: every N steps, per-set
metrics and their mean, tables and curves in W&B; pairs, IJB templates and 1:N by name (val_sets);
the same numbers from one process and from two under DDP; the model-selection metric."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

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
        assert float(row["val/synthetic_heldout/embedding_norm"]) > 0

    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    tables = wandb_tables(run, "pairs_table")
    assert len(tables) == 4 and tables[0]["columns"][:4] == ["set", "accuracy", "accuracy_std", "threshold"]
    row = dict(zip(tables[-1]["columns"], tables[-1]["data"][0]))
    last = validations[-1]
    assert row["set"] == "synthetic_heldout" and "tar@far=1e-03" not in row  # 40 different pairs: no TAR@1e-3
    for key in ("accuracy", "auc", "eer", "embedding_norm", "accuracy_low", "accuracy_high"):
        assert abs(row[key] - float(last[f"val/synthetic_heldout/{key}"])) < 1e-6, key
    assert row["accuracy_low"] <= row["accuracy"] <= row["accuracy_high"]  # val_bootstrap's 95 % interval
    assert (tmp_path / "val_scores.npz").is_file()  # the last validation's items, for facerec.tools.compare

    rocs = wandb_tables(run, "roc_table")
    assert len(rocs) == 4 and rocs[-1]["columns"] == ["set", "log10(FAR)", "FAR", "TAR"]
    far, tar = zip(*[(row[2], row[3]) for row in rocs[-1]["data"]])
    assert abs(far[0] - 1 / 40) < 1e-12 and far[-1] == 1.0 and tar[-1] == 1.0  # from 1/(different pairs) to 1
    assert all(a < b for a, b in zip(far, far[1:])) and all(a <= b for a, b in zip(tar, tar[1:]))
    record = next(run.glob("run-*.wandb")).read_bytes()
    assert b"val/roc" in record and b"wandb/line/v0" in record  # the custom line chart over the ROC table
    by_set = wandb_tables(run, "accuracy_by_set_table")  # each set's accuracy against the step, all validations so far
    assert len(by_set) == 4 and by_set[-1]["columns"] == ["step", "set", "accuracy"]
    # x: optimizer steps taken, as the W&B payloads' trainer/global_step (the CSV rows count from 0)
    assert by_set[-1]["data"] == [[int(row["step"]) + 1, "synthetic_heldout", pytest.approx(float(row["val/synthetic_heldout/accuracy"]))]
                                  for row in validations]  # fmt: skip


# The three kinds of protocol by name, on a model that takes the IJB fixture's 112x112 crops.
EVERY_KIND = ["val_sets=[synthetic_heldout,ijbc_fixture,ijbc_fixture_1n]", "dataset.train.image_size=112"]


def validation_row(run_dir: Path) -> dict[str, float]:
    (row,) = [row for row in read_metrics(run_dir) if row.get("val/ijbc_fixture/auc")]
    return {key: float(value) for key, value in row.items() if key.startswith("val/") and value}


def test_val_sets_validate_on_pairs_templates_and_identification(tmp_path, ijb_fixture):
    out = run_script(["train.py", *TINY_RUN, *EVERY_KIND, "trainer.max_epochs=1", "logger=wandb_csv", f"hydra.run.dir={tmp_path}"])
    row = validation_row(tmp_path)
    for key in ("val/synthetic_heldout/accuracy", "val/ijbc_fixture/tar@far=1e-02", "val/ijbc_fixture/tar_strict@far=1e-01",
                "val/ijbc_fixture_1n/rank1", "val/ijbc_fixture_1n/tpir@fpir=1e-01", "val/ijbc_fixture_1n/G2/rank5"):
        assert 0 <= row[key] <= 1, key
    assert row["val/accuracy_mean"] == row["val/synthetic_heldout/accuracy"]  # the pair set's: the only accuracy
    assert "held-out ijbc_fixture: tar@far=1e-04" in out.stdout and "held-out ijbc_fixture_1n: rank1" in out.stdout
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    assert wandb_tables(run, "templates_table")[-1]["data"][0][0] == "ijbc_fixture"
    identification = wandb_tables(run, "identification_table")[-1]
    assert identification["data"][0][0] == "ijbc_fixture_1n" and "rank1" in identification["columns"]
    cmc = wandb_tables(run, "cmc_table")[-1]
    assert cmc["columns"] == ["set", "rank", "identification rate"] and [r[1] for r in cmc["data"]] == list(range(1, 21))
    # eval.py on the checkpoint of that validation gives the same numbers
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    run_script(["eval.py", f"ckpt_path={checkpoint}", "eval_sets=[ijbc_fixture,ijbc_fixture_1n]", f"hydra.run.dir={tmp_path / 'eval'}"])
    sets = json.loads((tmp_path / "eval" / "results.json").read_text())["sets"]
    assert sets["ijbc_fixture"]["auc"] == pytest.approx(row["val/ijbc_fixture/auc"], abs=1e-6)
    assert sets["ijbc_fixture_1n"]["mean"]["cmc"]["1"] == pytest.approx(row["val/ijbc_fixture_1n/rank1"], abs=1e-6)


@pytest.mark.slow  # ~40 s: two processes start, and both validate on three sets
def test_two_ddp_processes_validate_as_one(tmp_path, ijb_fixture):
    # max_steps=0: no training, the seeded initial weights are validated once, by one process and by two
    common = [*TINY_RUN, *EVERY_KIND, "trainer.max_steps=0", "logger=csv"]
    run_script(["train.py", *common, f"hydra.run.dir={tmp_path / 'one'}"])
    run_script(["train.py", *common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}"])
    one, two = validation_row(tmp_path / "one"), validation_row(tmp_path / "two")
    assert one.keys() == two.keys() and len(one) > 30
    for key, value in one.items():  # float32 embeddings of other batch compositions: to ~1e-7
        assert two[key] == pytest.approx(value, abs=1e-6), key


def test_the_best_checkpoint_follows_the_optimized_metric(tmp_path, ijb_fixture):
    metric = "val/ijbc_fixture_1n/rank1"
    run_script(["train.py", *TINY_RUN, *EVERY_KIND, "trainer.max_epochs=3", f"optimized_metric={metric}", "logger=csv",
                f"hydra.run.dir={tmp_path}"])
    rows = [row for row in read_metrics(tmp_path) if row.get(metric)]
    assert len(rows) == 3
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    chosen = torch.load(best, weights_only=True)["epoch"]
    values = [float(row[metric]) for row in rows]
    assert values[chosen] == max(values) and values.index(max(values)) == chosen  # the first of the best


"""End-to-end training through the real entry point (train.py) on the synthetic default."""
from __future__ import annotations

import glob
from pathlib import Path

import torch

from conftest import TINY_RUN, column, read_metrics, run_script


def test_train_runs_logs_and_checkpoints(tmp_path):
    out = run_script(
        ["train.py", *TINY_RUN, "trainer.max_epochs=6", "logger=wandb_csv", "scale=fixed", f"hydra.run.dir={tmp_path}"]
    )
    assert "held-out verification synthetic_heldout: accuracy" in out.stdout
    rows = read_metrics(tmp_path)
    loss = column(rows, "train/loss")
    assert len(loss) == 6 * 10  # 160 images / batch 16, every step logged
    assert sum(loss[-10:]) / 10 < sum(loss[:10]) / 10
    for key in ["train/s", "train/theta_med", "train/theta_nontarget", "train/p_target", "train/top1", "train/lr"]:
        assert len(column(rows, key)) == len(loss), key
    assert set(column(rows, "train/s")) == {30.0}
    accuracy = column(rows, "val/synthetic_heldout/accuracy")
    assert len(accuracy) == 6 and all(0 <= a <= 1 for a in accuracy)
    assert column(rows, "val/accuracy_mean") == accuracy
    checkpoints = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert "last.ckpt" in checkpoints and len(checkpoints) == 2  # last + best by verification accuracy
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["facerec_config"]["scale"]["value"] == 30.0
    assert ckpt["state_dict"]["head.centres.weight"].shape == (20, 128)
    (wandb_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    # logger.wandb.define_metrics reached wandb.define_metric (the offline file holds the globs)
    assert b"val/*" in Path(wandb_file).read_bytes() and b"train/*" in Path(wandb_file).read_bytes()
    assert (tmp_path / ".hydra" / "config.yaml").exists()


def test_multirun_of_two_scales(tmp_path):
    run_script(
        [
            "train.py",
            "-m",
            "scale=fixed,auto",
            *TINY_RUN,
            "trainer.max_epochs=1",
            "logger=wandb_csv",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    runs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in runs] == ["0", "1"]
    scales = [column(read_metrics(run), "train/s")[0] for run in runs]
    assert scales[0] == 30.0
    assert abs(scales[1] - 2**0.5 * torch.log(torch.tensor(19.0)).item()) < 1e-4  # auto: sqrt(2) ln(C - 1)
    for run in runs:
        assert column(read_metrics(run), "val/accuracy_mean")
        assert (run / "checkpoints" / "last.ckpt").exists()
        assert (run / ".hydra" / "config.yaml").exists()
    wandb_runs = [glob.glob(str(run / "wandb" / "offline-run-*")) for run in runs]
    assert all(len(found) == 1 for found in wandb_runs)
    # The W&B run records (protobuf) hold the group and the run name as plain strings.
    records = [next(Path(found[0]).glob("run-*.wandb")).read_bytes() for found in wandb_runs]
    group = f"sweep_{tmp_path.name}".encode()
    assert all(group in record for record in records)
    assert b"scale=fixed" in records[0] and b"scale=auto" in records[1]
    assert b"experiment=smoke,logger" not in records[0]  # named by the swept key only

"""Preemption signals, atomic checkpoint writes, non-finite guards, refusing code in files, no secrets."""
from __future__ import annotations

import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from bad_inputs import WritesAFile
from fault_injection import infinite_gradient_at, nonfinite_images_at, record_buffers_at, signal_at
from conftest import REPO_ROOT, TINY_RUN, read_metrics, run_script
from facerec.checkpoint_files import load_checkpoint
from facerec.training.checkpoints import AtomicCheckpointIO


def test_sigusr1_saves_a_checkpoint_and_exits_cleanly(tmp_path):
    out = run_script(
        ["train.py", *TINY_RUN, "logger=csv", f"hydra.run.dir={tmp_path}",
         signal_at(5, "SIGUSR1")]
    )
    assert "held-out verification" not in out.stdout
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6


WRITER = """
import sys, torch
from facerec.training.checkpoints import AtomicCheckpointIO
io = AtomicCheckpointIO()
io.save_checkpoint({"version": 1, "w": torch.ones(3)}, sys.argv[1])
print("first saved", flush=True)
io.save_checkpoint({"version": 2, "w": torch.ones(150_000_000)}, sys.argv[1])  # 600 MB: slow to write
"""


def test_a_checkpoint_write_killed_midway_leaves_the_previous_one_loadable(tmp_path):
    target = tmp_path / "last.ckpt"
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    assert writer.stdout.readline().strip() == "first saved"
    deadline = time.time() + 60
    while not any(p.stat().st_size > 1_000_000 for p in tmp_path.glob(".last.ckpt.*.tmp")):
        assert time.time() < deadline and writer.poll() is None, "the second save never started"
        time.sleep(0.01)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert load_checkpoint(target)["version"] == 1
    AtomicCheckpointIO().save_checkpoint({"version": 3}, target)  # the next save clears the leftover
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_an_exception_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"version": 1}, target)
    with pytest.raises((pickle.PicklingError, AttributeError)):
        io.save_checkpoint({"version": 2, "bad": lambda: None}, target)
    assert load_checkpoint(target)["version"] == 1 and len(list(tmp_path.iterdir())) == 1
    assert oct(target.stat().st_mode & 0o777) != oct(0o600)  # an ordinary file, not mkstemp's 0600


def test_a_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": WritesAFile(marker)}, ckpt)
    with pytest.raises(ValueError, match="weights-only"):
        load_checkpoint(ckpt)
    result = run_script(
        ["train.py", *TINY_RUN, "logger=csv", f"hydra.run.dir={tmp_path / 'run'}", f"ckpt_path={ckpt}"], timeout=300, check=False
    )
    assert result.returncode != 0 and "weights-only" in result.stderr
    assert not marker.exists()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tmp_path):
    # a real non-finite forward: NaN input images at steps 3 and 4
    run_script(["train.py", *TINY_RUN, "logger=csv", f"hydra.run.dir={tmp_path / 'a'}",
                nonfinite_images_at(3, 4), record_buffers_at(3, tmp_path / "buffers.pt")])
    ckpt = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["step_guard.nonfinite_steps"] == 2 and ckpt["global_step"] == 20
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # the skipped step left every buffer (BatchNorm running statistics included) exactly as it was
    buffers = torch.load(tmp_path / "buffers.pt", weights_only=True)
    assert any("running_mean" in name for name in buffers["before"])
    for name, before in buffers["before"].items():
        assert torch.equal(before, buffers["after"][name]), name
    # and validation after it saw finite embeddings (it would raise otherwise) and scored them
    rows = read_metrics(tmp_path / "a")
    assert [row for row in rows if row.get("val/accuracy_mean")] and all(
        0 <= float(row["val/accuracy_mean"]) <= 1 for row in rows if row.get("val/accuracy_mean")
    )
    result = run_script(
        ["train.py", *TINY_RUN, "logger=csv", f"hydra.run.dir={tmp_path / 'b'}",
         nonfinite_images_at(3, 4, 5, 6), "max_consecutive_nonfinite=3"],
        timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient (last at step 5: loss=nan, s=" in result.stderr
    assert "lr=" in result.stderr


def test_under_fp16_a_skipped_step_also_leaves_the_buffers_as_they_were(tmp_path):
    """The GradScaler skips an overflowing step (not a failure: not counted) and a NaN forward is a
    skipped, counted step; both leave every buffer as it was before the step. On a CPU Lightning's
    16-mixed runs without a scaler, so the plugin is given one, as on a GPU."""
    plugin = ("+trainer.plugins=[{_target_:lightning.pytorch.plugins.MixedPrecision,precision:16-mixed,device:cpu,"
              "scaler:{_target_:torch.amp.GradScaler,device:cpu}}]")
    run_script(["train.py", *TINY_RUN, "logger=csv", "trainer.precision=null", plugin, f"hydra.run.dir={tmp_path / 'run'}",
                infinite_gradient_at(3), record_buffers_at(3, tmp_path / "overflow.pt", "overflow_buffers"),
                nonfinite_images_at(6), record_buffers_at(6, tmp_path / "nan.pt", "nan_buffers")])
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["state_dict"]["step_guard.nonfinite_steps"] == 1 and ckpt["global_step"] == 20
    for name in ("overflow.pt", "nan.pt"):
        buffers = torch.load(tmp_path / name, weights_only=True)
        assert buffers["before"] and all(torch.equal(v, buffers["after"][k]) for k, v in buffers["before"].items()), name
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_the_wandb_key_never_reaches_logs_configs_or_checkpoints(tmp_path):
    secret = "0123456789abcdef0123456789abcdef01234567"
    run_script(
        ["train.py", *TINY_RUN, "trainer.max_epochs=1", "logger=wandb_csv", f"hydra.run.dir={tmp_path}"],
        timeout=300, env={"WANDB_API_KEY": secret, "WANDB_MODE": "offline"},
    )
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(files) > 10
    assert not [p for p in files if secret.encode() in p.read_bytes()]


def test_resuming_into_a_different_class_set_is_refused(trained_run, tmp_path):
    shutil.copytree(trained_run, tmp_path, dirs_exist_ok=True)
    result = run_script(
        ["train.py", *TINY_RUN, "logger=csv", "dataset.num_classes=19", f"hydra.run.dir={tmp_path}", "ckpt_path=last"],
        timeout=300, check=False,
    )
    assert result.returncode != 0
    assert "dataset.num_classes: checkpoint 20, config 19" in result.stderr


def test_fp16_autocast_without_a_grad_scaler_is_refused(tmp_path):
    """fp16 gradients underflow silently without loss scaling: the run must not start."""
    from hydra.utils import instantiate

    from conftest import compose_config
    from facerec.training.checks import check_precision
    from facerec.training.fit import build_module

    cfg = compose_config([*TINY_RUN, "logger=csv", "+model.autocast=fp16"], tmp_path)
    module = build_module(cfg)
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="model.autocast=fp16 needs loss scaling, but trainer.precision=32-true runs without a GradScaler"):
        check_precision(trainer, module)
    result = run_script(["train.py", *TINY_RUN, "logger=csv", "+model.autocast=fp16", f"hydra.run.dir={tmp_path / 'run'}"], check=False)
    assert result.returncode != 0 and "needs loss scaling" in result.stderr
    check_precision(instantiate(cfg.trainer, logger=False, enable_checkpointing=False, precision="bf16-mixed"),
                    build_module(compose_config([*TINY_RUN, "+model.autocast=bf16"], tmp_path)))  # bf16 needs none

"""Preemption signals, atomic checkpoint writes, non-finite guards, refusing code in files, no secrets."""
from __future__ import annotations

import errno
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch

from bad_inputs import WritesAFile
from fault_injection import infinite_gradient_at, nonfinite_images_at, full_disk, record_buffers_at, signal_at
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


def test_last_ckpt_every_n_steps_keeps_the_end_and_a_resume_logs_each_step_once(tmp_path):
    """callbacks.last_checkpoint.every_n_train_steps=7 over 20 steps: last.ckpt is written at steps
    7, 10 (the epoch's end), 14 and 20 (the end of training). A run killed without warning at step 16
    resumes from 14; the CSV rows the killed run had written for steps 15-16 are dropped, not
    repeated, and the log equals the uninterrupted run's."""
    run = [*TINY_RUN, "trainer.deterministic=true", "logger=csv", "callbacks.last_checkpoint.every_n_train_steps=7",
           "+logger.csv.flush_logs_every_n_steps=1"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run_script(["train.py", *run, f"hydra.run.dir={straight}"])
    assert torch.load(straight / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20
    result = run_script(["train.py", *run, f"hydra.run.dir={killed}", signal_at(16, "SIGKILL")], check=False)
    assert result.returncode == -signal.SIGKILL
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 14
    assert max(int(row["step"]) for row in read_metrics(killed)) > 14  # rows of steps that will run again
    resumed = run_script(["train.py", *run, f"hydra.run.dir={killed}", "ckpt_path=last"])
    assert "dropped" in (killed / "train.log").read_text()
    assert torch.load(killed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 20

    def logged(run_dir):  # each (step, metric, value) with its count (Lightning logs `epoch` twice at an epoch's end)
        return Counter((row["step"], key, value) for row in read_metrics(run_dir) for key, value in row.items() if value and key != "step")

    assert logged(killed) == logged(straight), resumed.stdout
    # resuming the finished run trains no step again (it validates the final weights once more: the
    # value train.py returns to a sweeper)
    run_script(["train.py", *run, f"hydra.run.dir={killed}", "ckpt_path=last"])
    assert "(step 20)" in (killed / "train.log").read_text().rsplit("resuming from", 1)[1].splitlines()[0]

    def trained(counts):
        return {entry: n for entry, n in counts.items() if entry[1].startswith("train/")}

    assert trained(logged(killed)) == trained(logged(straight))


def test_resuming_with_another_scale_or_margin_is_refused_unless_allowed(trained_run, tmp_path):
    """The trained run used scale=auto (no state) and CosFace m=0.35. scale=dynamic has state the
    checkpoint lacks: refused by name, or with resume.allow_changes=[scale] it starts from its own
    initial s and the log names the change."""
    shutil.copytree(trained_run, tmp_path, dirs_exist_ok=True)
    resume = ["train.py", *TINY_RUN, "logger=csv", "trainer.max_epochs=2", f"hydra.run.dir={tmp_path}", "ckpt_path=last"]
    refused = run_script([*resume, "scale=dynamic", "head.m=0.2"], timeout=300, check=False)
    assert refused.returncode != 0
    assert "scale: checkpoint AutoScale(theta0=0.7853981633974483, criterion='half'), config DynamicScale(" in refused.stderr
    assert "head: checkpoint CosFace(m=0.35), config CosFace(m=0.2)" in refused.stderr
    assert "resume.allow_changes=[scale,head]" in refused.stderr and "Missing key" not in refused.stderr
    run_script([*resume, "scale=dynamic", "head.m=0.2", "resume.allow_changes=[scale,head]"], timeout=300)
    log = (tmp_path / "train.log").read_text()
    assert "with a changed setting (resume.allow_changes names scale)" in log
    assert "with a changed setting (resume.allow_changes names head)" in log
    assert "scale policy changed on resume: DynamicScale" in log
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 20 and torch.isfinite(final["state_dict"]["head.scale.s"])


def test_ckpt_path_names_a_directory_or_last_or_fail_finds_no_run(trained_run, tmp_path):
    from conftest import compose_config
    from facerec.training.fit import resolve_ckpt_path

    with pytest.raises(IsADirectoryError, match=r"is a directory, not a checkpoint file; name one of the checkpoints in it: .*checkpoints/last\.ckpt"):
        resolve_ckpt_path(compose_config([*TINY_RUN, f"ckpt_path={trained_run}"], tmp_path))
    nothing = [*TINY_RUN, f"paths.runs_dir={tmp_path / 'runs'}"]
    assert resolve_ckpt_path(compose_config([*nothing, "ckpt_path=last"], tmp_path / "new")) is None  # a new run, with a warning
    with pytest.raises(FileNotFoundError, match=r"ckpt_path=last_or_fail: no last\.ckpt in .*new or in a run under .*runs; nothing to resume"):
        resolve_ckpt_path(compose_config([*nothing, "ckpt_path=last_or_fail"], tmp_path / "new"))
    result = run_script(["train.py", *TINY_RUN, "logger=csv", f"paths.runs_dir={tmp_path / 'runs'}", "ckpt_path=last_or_fail"], check=False)
    assert result.returncode != 0 and "nothing to resume, and this setting never starts a new run" in result.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt"))


@pytest.fixture(params=["tmpfs", "writer"])
def small_disk(request, tmp_path):
    """A directory on a disk that fills: a real 256 KiB tmpfs where this machine lets the test mount
    one (root); with the "writer" parameter, or where mounting is not allowed, files opened for
    writing there fail with ENOSPC past 200 kB."""
    directory = tmp_path / "disk"
    directory.mkdir()
    mounted = request.param == "tmpfs" and os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(directory)], capture_output=True
    ).returncode == 0
    if not mounted:
        with full_disk():
            yield directory
        return
    yield directory
    subprocess.run(["umount", str(directory)], check=True)


def test_a_full_disk_during_a_save_names_the_checkpoint_the_space_and_keeps_the_previous(small_disk):
    target = small_disk / "last.ckpt"
    io_ = AtomicCheckpointIO()
    io_.save_checkpoint({"w": torch.ones(10_000)}, target)  # 40 kB: fits
    with pytest.raises(OSError) as raised:
        io_.save_checkpoint({"w": torch.ones(200_000)}, target)  # 800 kB: does not
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert f"no space left on the device for checkpoint {target}: it needs about 800,000 bytes" in message
    assert re.search(rf"had written [\d,]+ to a temporary file in {re.escape(str(small_disk))} when the disk filled; [\d,]+ bytes are free", message)
    assert "Nothing was replaced: the previous last.ckpt (" in message and "bytes) is intact" in message
    assert torch.equal(load_checkpoint(target)["w"], torch.ones(10_000))
    assert [p.name for p in small_disk.iterdir()] == ["last.ckpt"]  # the temporary file is gone

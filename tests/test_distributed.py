"""Multi-process training end to end on CPU (DDP over gloo), SLURM requeues and the SLURM launcher
config. SLURM is simulated: its environment variables, and fake `scontrol`/`sbatch` on PATH."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from fault_injection import signal_at
from conftest import TINY_RUN, compose_config, read_metrics, run_script
from facerec.cluster import slurm_job_id
from facerec.training.fit import build_head

SLURM_TASK = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
}


def fake_command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(0o755)


@pytest.mark.slow
def test_a_two_process_run_writes_one_run_dir_and_resumes_on_one_process(tmp_path):
    sharded = [*TINY_RUN, "sharding=partial_fc", f"paths.log_dir={tmp_path}"]
    out = run_script(["train.py", *sharded, "trainer=ddp_cpu", "trainer.devices=2", "logger=wandb_csv"])
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, runs  # the second rank ran in the first one's dir, without a config of its own
    run_dir = runs[0]
    assert [p.name for p in run_dir.glob(".hydra/**/config.yaml")] == ["config.yaml"]
    assert len(list(run_dir.glob("wandb/offline-run-*"))) == 1
    assert (run_dir / "train.log").exists() and (run_dir / "train_ddp_process_1.log").exists()
    assert "finished after 10 steps" in out.stdout  # 160 images, 16 per batch and rank, 2 epochs
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["head.centres.weight"].shape == (20, 128)  # the full classifier, not rank 0's half

    # One process resumes it, sharded (one shard) or with the plain head: the same checkpoint either way.
    resumed = {}
    for name, sharding in [("sharded", ["sharding=partial_fc"]), ("plain", [])]:
        copy = tmp_path / name
        copy.mkdir()
        ckpt = copy / "last.ckpt"
        ckpt.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
        out = run_script(["train.py", *TINY_RUN, *sharding, "logger=csv", f"hydra.run.dir={copy}", f"ckpt_path={ckpt}", "trainer.max_epochs=3"])
        assert "finished after 20 steps" in out.stdout  # one more epoch of 10 steps on one process
        resumed[name] = torch.load(copy / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for key, value in resumed["plain"].items():
        torch.testing.assert_close(resumed["sharded"][key], value, rtol=1e-3, atol=1e-5)


def test_a_multirun_does_not_start_ddp_ranks_itself(tmp_path):
    result = run_script(
        ["train.py", "-m", *TINY_RUN, "trainer=ddp_cpu", "seed=1,2", "logger=csv", f"paths.log_dir={tmp_path}"],
        env={}, check=False,
    )
    assert result.returncode != 0 and "cannot start multi-process DDP runs" in result.stderr


def test_the_slurm_job_id_names_array_tasks(monkeypatch):
    for key, value in SLURM_TASK.items():
        monkeypatch.setenv(key, value)
    assert slurm_job_id() == "4242"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "4240")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert slurm_job_id() == "4240_2"
    monkeypatch.setenv("SLURM_JOB_NAME", "interactive")  # srun in an salloc shell: not a batch job
    assert slurm_job_id() is None


@pytest.mark.slow
def test_a_slurm_job_requeues_itself_and_resumes_in_its_run_dir(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "scontrol", f'echo "$@" >> {tmp_path / "scontrol.log"}\n')
    env = {**SLURM_TASK, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    # The same command both times, as a requeued job runs it: SLURM's warning signal arrives in step 5.
    command = ["train.py", *TINY_RUN, "logger=csv", f"paths.log_dir={tmp_path}",
               signal_at(5, "SIGUSR1")]
    out = run_script(command, env=env)
    assert "held-out verification" not in out.stdout  # stopped early
    run_dir = tmp_path / "train" / "runs" / "slurm-4242"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242"]

    out = run_script(command, env=env)
    assert "was requeued: resuming from" in out.stderr + (run_dir / "train.log").read_text()
    assert "finished after 20 steps" in out.stdout
    assert [p.name for p in (tmp_path / "train" / "runs").iterdir()] == ["slurm-4242"]
    assert list((run_dir / ".hydra").glob("resumed_*/config.yaml"))


def test_the_slurm_launcher_submits_one_task_per_gpu_with_the_requeue_signal(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "srun", "exit 0\n")
    fake_command(bin_dir, "sbatch", f'cp "$1" {tmp_path / "job.sh"}\nexit 1\n')  # capture, then refuse
    result = run_script(
        ["train.py", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4",
         "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=600", f"paths.log_dir={tmp_path}"],
        env={"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, check=False,
    )
    script = (tmp_path / "job.sh").read_text()
    flags = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    expected = {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=600",
                "--signal=USR1@120", "--requeue"}
    assert expected <= flags, (flags, result.stderr[-2000:])


NEW_HEADS = ["adaface", "magface", "elasticface_arc", "curricularface", "subcenter_arcface"]


@pytest.mark.slow
@pytest.mark.parametrize("head", NEW_HEADS)
def test_every_new_head_trains_class_sharded_on_two_processes(head, tmp_path):
    out = run_script(
        ["train.py", *TINY_RUN, f"head={head}", "sharding=partial_fc", "trainer=ddp_cpu", "trainer.devices=2",
         "trainer.max_epochs=1", "logger=csv", f"hydra.run.dir={tmp_path}"]
    )
    assert "finished after 5 steps" in out.stdout
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    centres = 3 if head == "subcenter_arcface" else 1
    assert state["head.centres.weight"].shape == (20 * centres, 128)  # the full classifier, gathered from both ranks
    assert all(torch.isfinite(value).all() for value in state.values() if value.is_floating_point())
    buffers = {"adaface": ["head.margin.batch_mean", "head.margin.batch_std"], "curricularface": ["head.margin.t"], "elasticface_arc": ["head.margin.step"]}
    for key in buffers.get(head, []):
        assert key in state
    if head == "elasticface_arc":
        assert int(state["head.margin.step"]) == 5  # one draw per step, the same on both ranks
    rows = read_metrics(tmp_path)
    logged = [row for row in rows if row.get("train/theta_med")]
    assert logged and all(float(row["train/norm_mean"]) > 0 for row in logged)


@pytest.mark.slow
@pytest.mark.parametrize("head", ["uniface", "sphereface2"])
def test_a_sigmoid_head_trains_on_two_processes_class_sharded_as_it_does_dense(head, tmp_path):
    """The same two-process run (DDP, gloo) with the class centres sharded (Partial FC) and dense, in
    float64: after 10 steps the classifier, the backbone and the learned bias agree (in float32 the
    runs drift apart by rounding, ~1e-4 in SphereFace2's backbone, whose loss weight lw = 50 makes
    large steps), and the bias moved from its start."""
    states = {}
    for sharding, overrides in [("partial_fc", ["sharding=partial_fc"]), ("dense", [])]:
        run_dir = tmp_path / sharding
        run_script(
            ["train.py", *TINY_RUN, f"head={head}", "scale=fixed", *overrides, "trainer=ddp_cpu",
             "trainer.devices=2", "trainer.deterministic=true", "trainer.precision=64-true", "logger=csv",
             f"hydra.run.dir={run_dir}"]
        )
        states[sharding] = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert states["partial_fc"].keys() == states["dense"].keys()
    for key, value in states["dense"].items():
        torch.testing.assert_close(states["partial_fc"][key], value, rtol=1e-9, atol=1e-11, msg=key)
    start = build_head(compose_config([*TINY_RUN, f"head={head}", "scale=fixed"], tmp_path)).margin.bias
    assert abs(states["dense"]["head.margin.bias"].item() - start.item()) > 1e-3

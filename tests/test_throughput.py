"""The fast path on a CPU: compiled modules keep their checkpoint keys, the fused optimizer runs, the
throughput benchmark runs in a tiny configuration and prints its figures (it times nothing here)."""
from __future__ import annotations

import json

import torch

from conftest import TINY_RUN, compose_config, read_metrics, run_script
from facerec.backbones.weights import load_backbone
from facerec.training.fit import build_module


def test_compiled_fused_run_keeps_checkpoint_keys_and_logs_every_n_steps(tmp_path):
    # aot_eager traces and runs through AOTAutograd (what inductor compiles) without generating code.
    compiled = ["compile.backbone=true", "compile.head=true", "compile.backend=aot_eager", "optim.optimizer.fused=true"]
    run_script(["train.py", *TINY_RUN, *compiled, "trainer.max_epochs=1", "trainer.log_every_n_steps=5", "logger=csv",
                f"hydra.run.dir={tmp_path}"])
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    expected = build_module(compose_config(TINY_RUN, tmp_path / "eager")).state_dict()
    assert state.keys() == expected.keys()  # no `_orig_mod.` anywhere
    backbone, _ = load_backbone(tmp_path / "checkpoints" / "last.ckpt")
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    rows = [row for row in read_metrics(tmp_path) if row.get("train/loss")]
    # 10 steps, logged at steps 5 and 10: the loss with the diagnostics, not every step
    assert [int(row["step"]) for row in rows] == [4, 9]
    assert all(row["train/theta_med"] and row["train/s"] for row in rows)


def test_throughput_benchmark_runs_in_a_tiny_configuration(tmp_path):
    out = tmp_path / "figures.jsonl"
    result = run_script([
        "benchmarks/train_throughput.py", *TINY_RUN, "torch.num_threads=1", "compile.backend=aot_eager",
        "--compile", "off", "all", "--steps", "2", "--log-every", "2", "--warmup", "1", "--rounds", "1",
        "--data-source", "synthetic", "--data-images", "64", "--data-batches", "2", "--out", str(out),
    ])
    for line in ["raw+guard", "lightning/bare", "lightning/1", "FLOPs per image", "compile=backbone+head", "data path:", "worker(s) at", "summary",
                 "MiB on a logging step (statistics=True)"]:
        assert line in result.stdout, result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    configs, data = rows[:-1], rows[-1]["data_path"]
    assert [row["config"].split("compile=")[1].split()[0] for row in configs] == ["off", "backbone+head"]
    for row in configs:
        assert all(figures["images_per_s"] > 0 for figures in row["paths"].values())
        assert row["flops_per_image"] > 0 and row["head"]["layers"]["head"]["peak_bytes"] > 0
        assert row["step_peak_bytes"]["step"] > 0 and row["step_peak_bytes"]["logging_step"] > 0
    assert data["source"] == "synthetic" and data["images_per_s"]["1"] > 0

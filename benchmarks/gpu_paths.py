"""Runs each GPU code path that CPU tests can only fake, once, in short train.py runs (issue 18):

- compile_reduce_overhead: the backbone compiled with CUDA graphs (compile.mode=reduce-overhead),
  trained and validated with the flip test; its held-out accuracy against the same run eager;
- fp16: trainer.precision=16-mixed with model.autocast=fp16 (a GradScaler), one injected inf
  gradient that the scaler must skip while the run carries on;
- resume_fewer_devices: a checkpoint whose RNG states come from 8 ranks (and one in the format
  before per-rank states, with every visible device's CUDA state) resumed on this one device;
- partial_fc_dynamic: Partial FC's sampled classes (sample_rate 0.1) with scale=dynamic at
  C = 93,431 (MS1MV3), batch 256, on a real IResNet-50 step;
- host_syncs: the calls that wait for the device, per step (tests/sync_counter.py), for the dense
  head with scale=dynamic and for Partial FC.

    python benchmarks/gpu_paths.py [--out DIR] [--device cuda|cpu]

Prints one line per path (ok / FAILED with the error's tail) and writes DIR/gpu_paths.json.
`--device cpu` runs the same sequence on a CPU, with CUDA graphs and fp16 scaling left out: it
checks this script, not the GPU.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SMOKE = ["experiment=smoke", "logger=csv", "callbacks.progress_bar.refresh_rate=0"]
sys.path.insert(0, str(REPO / "tests"))
from fault_injection import infinite_gradient_at  # noqa: E402
from sync_counter import sync_counter  # noqa: E402


def train(run_dir: Path, overrides: list[str], timeout: float) -> tuple[bool, str]:
    command = [sys.executable, "train.py", *overrides, f"hydra.run.dir={run_dir}"]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"timed out after {timeout:.0f} s"
    return result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def last_metric(run_dir: Path, key: str) -> float | None:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        values = [float(row[key]) for row in csv.DictReader(file) if row.get(key)]
    return values[-1] if values else None


def compile_reduce_overhead(out: Path, device: list[str], cuda: bool) -> dict:
    mode = ["compile.mode=reduce-overhead"] if cuda else ["compile.backend=aot_eager"]
    result = {}
    for name, compiled in [("eager", []), ("compiled", ["compile.backbone=true", *mode])]:
        run_dir = out / f"compile_{name}"
        ok, tail = train(run_dir, [*SMOKE, *device, "trainer.max_epochs=2", *compiled], timeout=240)
        if not ok:
            return {"ok": False, "error": f"{name}: {tail}"}
        result[f"accuracy_{name}"] = last_metric(run_dir, "val/accuracy_mean")
    # the same data and seed: CUDA graphs must not change what validation sees (a few pairs may flip)
    result["ok"] = abs(result["accuracy_compiled"] - result["accuracy_eager"]) <= 0.05
    return result


def fp16(out: Path, device: list[str], cuda: bool) -> dict:
    if not cuda:
        return {"ok": True, "skipped": "no GradScaler on a CPU"}
    run_dir = out / "fp16"
    ok, tail = train(run_dir, [*SMOKE, *device, "trainer.precision=16-mixed", "model.autocast=fp16", infinite_gradient_at(3)], timeout=180)
    if not ok:
        return {"ok": False, "error": tail}
    nonfinite = last_metric(run_dir, "train/nonfinite_steps")
    accuracy = last_metric(run_dir, "val/accuracy_mean")
    # the scaler's skip is no failure: the counter stays 0 and the run ends with a finite accuracy
    return {"ok": nonfinite == 0 and accuracy is not None and accuracy > 0.5, "nonfinite_steps": nonfinite, "accuracy": accuracy}


def resume_fewer_devices(out: Path, device: list[str], cuda: bool) -> dict:
    first = out / "resume_first"
    ok, tail = train(first, [*SMOKE, *device, "trainer.max_epochs=1"], timeout=180)
    if not ok:
        return {"ok": False, "error": f"first run: {tail}"}
    checkpoint = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True)
    (state,) = checkpoint["rng_states"]["ranks"]
    variants = {
        "8_ranks": {"ranks": [state] * 8},  # written by 8 processes, each its own device's generator
        "before_per_rank": {  # rank 0's states and get_rng_state_all() of 8 visible devices
            "torch": state["torch"], "numpy": state["numpy"], "python": state["python"],
            "cuda": [state["cuda"]] * 8 if state["cuda"] is not None else [],
        },
    }
    result = {"ok": True}
    for name, rng_states in variants.items():
        checkpoint["rng_states"] = rng_states
        path = out / f"resume_{name}.ckpt"
        torch.save(checkpoint, path)
        ok, tail = train(out / f"resume_{name}", [*SMOKE, *device, "trainer.max_epochs=2", f"ckpt_path={path}"], timeout=180)
        result[name] = "resumed" if ok else tail
        result["ok"] &= ok
    return result


def partial_fc_dynamic(out: Path, device: list[str], cuda: bool) -> dict:
    size = ["--classes", "93431", "--batch-sizes", "256", "--warmup", "5", "--steps", "20", "--log-every", "10"] if cuda else \
        ["experiment=smoke", "--classes", "2000", "--batch-sizes", "16", "--warmup", "1", "--steps", "2", "--log-every", "2"]
    experiment = ["experiment=gpu_fast", "compile.backbone=false"] if cuda else []
    command = [sys.executable, "benchmarks/train_throughput.py", *experiment, "sharding=partial_fc", "sharding.sample_rate=0.1",
               "scale=dynamic", "--device", "cuda" if cuda else "cpu", "--compile", "off", "--rounds", "1",
               "--data-workers", "--out", str(out / "partial_fc_dynamic.jsonl"), *size]
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": "timed out after 300 s"}
    if result.returncode:
        return {"ok": False, "error": (result.stdout + result.stderr)[-3000:]}
    return {"ok": True, "table": result.stdout[-2500:]}


def host_syncs(out: Path, device: list[str], cuda: bool) -> dict:
    result = {"ok": True}
    for name, overrides in [("dense_dynamic", ["scale=dynamic"]), ("partial_fc", ["sharding=partial_fc", "sharding.sample_rate=0.5"])]:
        run_dir = out / f"syncs_{name}"
        ok, tail = train(run_dir, [*SMOKE, *device, "trainer.max_epochs=1", "trainer.log_every_n_steps=4",
                                   "+trainer.limit_val_batches=0", *overrides, sync_counter(run_dir / "syncs")], timeout=180)
        if not ok:
            return {"ok": False, "error": f"{name}: {tail}"}
        rows = json.loads((run_dir / "syncs.rank0.json").read_text())
        plain = [row["syncs"] for row in rows[:-1] if not row["logging"]]  # the last step writes the checkpoint
        result[name] = {"syncs_per_plain_step": sorted(set(plain)), "logging_steps": [row["syncs"] for row in rows if row["logging"]]}
        result["ok"] &= set(plain) == {1}
    return result


PATHS = [compile_reduce_overhead, fp16, resume_fewer_devices, partial_fc_dynamic, host_syncs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_paths")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--only", nargs="*", choices=[path.__name__ for path in PATHS], help="run these paths only")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    device = ["trainer=gpu"] if cuda else ["trainer=cpu", "torch.num_threads=1"]
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    for path in PATHS:
        if args.only and path.__name__ not in args.only:
            continue
        start = time.perf_counter()
        result = path(args.out, device, cuda)
        result["seconds"] = round(time.perf_counter() - start, 1)
        report[path.__name__] = result
        shown = {key: value for key, value in result.items() if key not in ("error", "table", "ok")}
        print(f"{path.__name__}: {'ok' if result['ok'] else 'FAILED'} {json.dumps(shown)}", flush=True)
        if not result["ok"] and "error" in result:
            print(result["error"], flush=True)
        if "table" in result:
            print(result["table"], flush=True)
        (args.out / "gpu_paths.json").write_text(json.dumps(report, indent=1))
    if not all(value["ok"] for key, value in report.items() if isinstance(value, dict)):
        sys.exit(1)


if __name__ == "__main__":
    main()

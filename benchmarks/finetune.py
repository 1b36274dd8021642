"""finetune=lora and finetune=linear_probe against finetune=full: training-step time and peak memory,
in one run (issue 25: IResNet-50, batch 64, on this CPU).

    python benchmarks/finetune.py                                   # IResNet-50, batch 64, 1,000 classes
    python benchmarks/finetune.py --model iresnet18 --steps 3       # quicker

Each mode runs in a fresh process (so that its peak resident memory is its own), built from the real
configs by build_module: the backbone, CosFace with the auto scale, the mode's parameter groups and
SGD (momentum 0.9, weight decay 5e-4) as configure_optimizers builds them. A step is what a Lightning
step computes: forward, head.loss, backward, optimizer step, on one fixed batch of random 112 x 112
images. Reported: the fastest and the median of `--steps` timed steps after two warm-up steps (one
thread, wall time), the peak resident set size of the process (ru_maxrss) and its rise over the
built model's (what the steps add: activations, gradients, optimizer state), and each ratio to
`full`. The load average is printed before and after (ratios measured under load are not to be
published).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from facerec.paths import REPO_ROOT

MODES = ("full", "lora", "linear_probe")


def resident_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(mode: str, model: str, batch: int, classes: int, steps: int) -> dict:
    """One mode's step times and memory, in this process."""
    sys.path.insert(0, str(REPO_ROOT / "tests"))  # the helper that composes the real configs, shared with the tests
    from config_helpers import compose_config

    from facerec.training.fit import build_module

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as output:
        cfg = compose_config([f"model={model}", "dataset.train.image_size=112", f"dataset.num_classes={classes}",
                              f"finetune={mode}", "optim.scheduler=null", "logger=csv", "val_sets=[]"], output)  # fmt: skip
        module = build_module(cfg, val_protocols={})
    optimizer = module.configure_optimizers()
    images = torch.randn(batch, 3, 112, 112)
    labels = torch.randint(0, classes, (batch,))
    built = resident_mib()
    module.train()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss, _ = module.head.loss(module.backbone(images), labels)
        loss.backward()
        optimizer.step()
        if step >= 2:
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    trainable = sum(p.numel() for p in module.backbone.parameters() if p.requires_grad)
    return {"min": min(times), "median": statistics.median(times), "peak_mib": peak, "built_mib": built, "trainable": trainable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="iresnet50")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode, after two warm-up steps")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: measure this mode and print JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.model, args.batch, args.classes, args.steps)))
        return
    load_before = os.getloadavg()[0]
    print(f"torch {torch.__version__}, 1 thread; model={args.model}, batch {args.batch}, C = {args.classes}, "
          f"{args.steps} timed steps per mode; load average (1 min) before: {load_before:.2f}", flush=True)  # fmt: skip
    results = {}
    for mode in MODES:
        child = subprocess.run(
            [sys.executable, __file__, "--child", mode, "--model", args.model, "--batch", str(args.batch),
             "--classes", str(args.classes), "--steps", str(args.steps)],
            capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        results[mode] = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"load average (1 min) after: {os.getloadavg()[0]:.2f}")
    full = results["full"]
    print("| finetune= | trainable backbone parameters | step, fastest (s) | step, median (s) | time / full | peak RSS (MiB) | "
          "RSS added by training (MiB) | added / full |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        added, added_full = r["peak_mib"] - r["built_mib"], full["peak_mib"] - full["built_mib"]
        print(f"| {mode} | {r['trainable']:,} | {r['min']:.2f} | {r['median']:.2f} | {r['min'] / full['min']:.2f}x | "
              f"{r['peak_mib']:.0f} | {added:.0f} | {added / added_full:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()

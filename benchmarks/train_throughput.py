"""Training throughput: our LightningModule + Trainer against a hand-written PyTorch loop, in one run.

    python benchmarks/train_throughput.py [options] [config overrides ...]
    python benchmarks/train_throughput.py torch.num_threads=1            # CPU: the default experiment (tiny net)
    python benchmarks/train_throughput.py experiment=smoke --steps 8 --log-every 4 --rounds 1   # CI size
    benchmarks/gpu_throughput.sh OUT_DIR                                 # the GPU figures of docs/research/benchmarks.md

Every path trains the one FaceRecognitionModule built from the real configs (conf/train.yaml plus
the overrides, composed as train.py composes them; --models/--classes/--batch-sizes/--compile
sweep over model=, dataset.num_classes=, dataset.batch_size= and compile.*) on the same synthetic
batches held in device memory, with the configured precision, optimizer, LR schedule, compile and
cudnn settings. Warm-up steps (compilation, autotuning) are not timed; the paths take turns round
by round, each round starting with the next path, and each path's best round counts.

  raw             forward, cross-entropy, backward, optimizer and scheduler step, zero_grad;
                  loss.item() every --log-every steps (what a hand-written loop logs)
  raw+guard       raw plus the module's non-finite guard: gradient norms and one host sync per step
  lightning/bare  backbone, head, loss, optimizer and schedule in a minimal LightningModule under
                  the Trainer below: what Lightning itself costs
  lightning       FaceRecognitionModule under the configured Trainer and callbacks (checkpoints
                  left out) with a CSV logger, logging its diagnostics every --log-every steps
  lightning/1     the same, logging every step (the cost of per-step diagnostics)

Per configuration: images/s, the ratio to raw (target: lightning >= 0.95), peak memory (CUDA
allocator), the peak memory of one step that does not log and of one logging step (the diagnostics:
`statistics=True`; CUDA allocator, or the profiler's allocation events on a CPU), FLOPs per image
(torch.utils.flop_counter, forward + backward) and the model FLOP utilisation against the device's
peak (--peak-tflops, or a datasheet figure for recent NVIDIA GPUs under bf16/fp16); the head's
time and peak memory against nn.Linear and the bare cosine layer (logits + cross-entropy, forward +
backward). Then the data path: RecordIO + decode + flip + normalise through FaceDataModule's
loader, images/s per worker, and the workers the fastest training path needs.
"""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import lightning as L
import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import CSVLogger
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader, Subset
from torch.utils.flop_counter import FlopCounterMode

from facerec.config import instantiate_all
from facerec.paths import REPO_ROOT
from facerec.paths import DATA_DIR
from facerec.data import FaceDataModule, RecordDataset, SyntheticIdentities
from facerec.data.convert import folder_to_rec
from facerec.training.module import total_grad_norm
from facerec.training.fit import build_module, compile_model, configure_torch

sys.path.insert(0, str(REPO_ROOT / "tests"))  # the helper that composes the real configs, shared with the tests
from config_helpers import compose_config  # noqa: E402

PATHS = ("raw", "raw+guard", "lightning/bare", "lightning", "lightning/1")
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16, "32-true": None}
# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from NVIDIA's datasheets, matched in order against the device name.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))
COMPILE = {"off": (False, False), "backbone": (True, False), "all": (True, True)}
LFW = DATA_DIR / "lfw" / "aligned_112"


class Clock:
    """Wall time and peak device memory of a window of steps; synchronises the device at its two ends only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = math.nan
        self.peak_bytes: int | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._start = time.perf_counter()

    def stop(self) -> None:
        self._sync()
        self.seconds = time.perf_counter() - self._start
        if self.device.type == "cuda":
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)


class StepTimer(L.Callback):
    """Starts `clock` before training batch `first` and stops it after batch `last`."""

    def __init__(self, clock: Clock, first: int, last: int):
        self.clock, self.first, self.last = clock, first, last

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.first:
            self.clock.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last:
            self.clock.stop()


class BareModule(L.LightningModule):
    """`module`'s backbone, head, loss, optimizer and LR schedule, and nothing else (no logging, no guard)."""

    def __init__(self, module):
        super().__init__()
        self.backbone, self.head = module.backbone, module.head
        self.optimizer_factory, self.scheduler_factory = module.optimizer_factory, module.scheduler_factory

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return self.head.loss(self.backbone(images), labels)[0]

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer, total_steps=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def autocast(precision: str, device: torch.device):
    if precision not in AUTOCAST_DTYPES:
        raise ValueError(f"trainer.precision={precision!r}: the raw loop knows {sorted(AUTOCAST_DTYPES)}")
    dtype = AUTOCAST_DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()


def batch_loader(batches: list, length: int) -> DataLoader:
    """`length` batches cycling through `batches` (already on the device), as a DataLoader yields them."""
    return DataLoader([batches[i % len(batches)] for i in range(length)], batch_size=None)


def raw_loop(module, cfg, batches, clock: Clock, warmup: int, steps: int, log_every: int, guard: bool) -> None:
    """The hand-written loop: what FaceRecognitionModule.training_step and Lightning do, minus the framework."""
    precision, device = str(cfg.trainer.precision), batches[0][0].device
    backbone, head = module.backbone.to(device).train(), module.head.to(device).train()
    optimizer = module.optimizer_factory(module.parameters())  # built as the module builds them
    scheduler = module.scheduler_factory(optimizer, total_steps=warmup + steps) if module.scheduler_factory else None
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    logged = []
    for step, (images, labels) in enumerate(batch_loader(batches, warmup + steps)):
        if step == warmup:
            clock.start()
        with autocast(precision, device):
            loss = head.loss(backbone(images), labels)[0]  # the training path (no diagnostics)
        (scaler.scale(loss) if scaler else loss).backward()
        take_step = True
        if guard:  # as FaceRecognitionModule.on_before_optimizer_step
            finite = torch.isfinite(loss.detach())
            grad_norms = total_grad_norm(backbone.parameters()) + total_grad_norm(head.parameters())
            if scaler is None:
                finite &= torch.isfinite(grad_norms)
            take_step = bool(finite)
        if take_step:
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler:
            scheduler.step()
        if (step + 1) % log_every == 0:
            logged.append(loss.item())
    clock.stop()


def lightning_fit(module, cfg, batches, clock: Clock, warmup: int, steps: int, log_every: int, log_dir: Path) -> None:
    """trainer.fit as train.py runs it (configured Trainer and callbacks), minus checkpoints and validation."""
    device = batches[0][0].device
    callbacks = [c for c in instantiate_all(cfg.get("callbacks")) if not isinstance(c, Checkpoint)]
    trainer = instantiate(
        cfg.trainer,
        accelerator=device.type,
        devices=[device.index or 0] if device.type == "cuda" else 1,
        max_epochs=1,
        max_steps=warmup + steps,
        log_every_n_steps=log_every,
        logger=CSVLogger(log_dir),
        enable_checkpointing=False,
        callbacks=[*callbacks, StepTimer(clock, warmup, warmup + steps - 1)],
    )
    trainer.fit(module, train_dataloaders=batch_loader(batches, warmup + steps))


def flops_per_image(cfg) -> float:
    """Forward + backward FLOPs of backbone, head and loss per image (matmuls and convolutions)."""
    module = build_module(cfg)  # eager, on the CPU, two images (BatchNorm needs more than one)
    size = module.backbone.input_size
    labels = torch.tensor([0, 1])
    with FlopCounterMode(display=False) as counter:
        module.head.loss(module.backbone(torch.randn(2, 3, size, size)), labels)[0].backward()
    return counter.get_total_flops() / 2


def peak_flops(device: torch.device, precision: str, tflops: float | None) -> float | None:
    if tflops:
        return tflops * 1e12
    if device.type != "cuda" or precision not in ("bf16-mixed", "16-mixed"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak * 1e12 for key, peak in PEAK_TFLOPS if key in name), None)


def peak_bytes(fn, device: torch.device) -> int:
    """Peak memory allocated while fn() runs, above what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    # CPU: replay the profiler's allocation events (signed sizes, in time order); kineto_results is the
    # event list torch.profiler's own memory timeline reads.
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def head_cost(cfg, batch_size: int, device: torch.device, repeats: int = 5) -> dict:
    """Peak memory and time of logits + cross-entropy, forward and backward in float32, for the configured
    head (compiled if the config says so) and the two layers it builds on: nn.Linear (no softmax classifier
    needs less) and the bare cosine F.linear(normalise(x), normalise(W)) that every margin head starts from."""
    module = build_module(cfg)
    compile_model(module, {**cfg.compile, "backbone": False})
    head = module.head.to(device)
    weight = head.centres.weight
    embeddings = torch.randn(batch_size, head.embedding_size, device=device, requires_grad=True)
    labels = torch.randint(head.num_classes, (batch_size,), device=device)
    losses = {
        "linear": lambda: F.cross_entropy(F.linear(embeddings, weight), labels),
        "cosine": lambda: F.cross_entropy(F.linear(F.normalize(embeddings), F.normalize(weight)), labels),
        "head": lambda: head.loss(embeddings, labels)[0],  # the training path: the fused margin cross-entropy
    }
    result = {}
    for name, loss in losses.items():
        def step():
            loss().backward()

        seconds = []
        for repeat in range(repeats + 2):
            embeddings.grad = weight.grad = None  # freed before the measured call, not inside it
            if repeat == 0:
                step()  # compilation, library workspaces
            elif repeat == 1:
                peak = peak_bytes(step, device)
            else:
                clock = Clock(device)
                clock.start()
                step()
                clock.stop()
                seconds.append(clock.seconds)
        result[name] = {"peak_bytes": peak, "ms": 1000 * float(np.median(seconds))}
    return {"layers": result, "logits_bytes": batch_size * head.num_classes * 4, "weight_bytes": weight.numel() * 4}


def step_memory(module, cfg, batch, device: torch.device) -> dict:
    """Peak bytes of one training step above what is allocated at its start, without the diagnostics
    ("step") and with them ("logging_step": what FaceRecognitionModule computes every
    log_every_n_steps). The step is the module's tensor work, outside the Trainer: backbone and
    head.loss under the configured precision, backward, optimizer step, zero_grad."""
    precision = str(cfg.trainer.precision)
    backbone, head = module.backbone.to(device).train(), module.head.to(device).train()
    optimizer = module.optimizer_factory(module.parameters())
    images, labels = batch

    def step(statistics: bool) -> None:
        with autocast(precision, device):
            loss, _ = head.loss(backbone(images), labels, statistics=statistics)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for statistics in (False, True):  # the optimizer's state and the first calls stay out of the figures
        step(statistics)
    return {"step": peak_bytes(lambda: step(False), device), "logging_step": peak_bytes(lambda: step(True), device)}


def measure(cfg, args, device: torch.device, workdir: Path) -> tuple[dict, dict]:
    """Images/s and peak memory of every path for one composed config; the peak memory of a step
    without and with the diagnostics (`step_memory`)."""
    configure_torch(cfg)
    torch.backends.cudnn.benchmark = bool(cfg.trainer.benchmark)  # what the Trainer sets for its own path
    L.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg)
    compile_model(module, cfg.compile)
    bare = BareModule(module)
    batch_size, size, classes = int(cfg.dataset.batch_size), module.backbone.input_size, module.head.num_classes
    batches = [
        (torch.rand(batch_size, 3, size, size, device=device) * 2 - 1, torch.randint(classes, (batch_size,), device=device))
        for _ in range(4)
    ]
    best = {path: {"images_per_s": 0.0, "peak_bytes": None} for path in PATHS}
    # One-time costs of a first fit (the logger's files, first calls of the diagnostics) stay out of the rounds.
    for trained in (bare, module):
        lightning_fit(trained, cfg, batches, Clock(device), 0, 2, 1, workdir / "lightning_logs")
    for round_ in range(args.rounds):
        for path in PATHS[round_ % len(PATHS):] + PATHS[: round_ % len(PATHS)]:  # each round starts elsewhere
            clock = Clock(device)
            if path.startswith("raw"):
                raw_loop(module, cfg, batches, clock, args.warmup, args.steps, args.log_every, guard=path == "raw+guard")
            else:
                every = 1 if path == "lightning/1" else args.log_every
                trained = bare if path == "lightning/bare" else module
                lightning_fit(trained, cfg, batches, clock, args.warmup, args.steps, every, workdir / "lightning_logs")
            rate = batch_size * args.steps / clock.seconds
            if rate > best[path]["images_per_s"]:
                best[path] = {"images_per_s": rate, "peak_bytes": clock.peak_bytes}
    return best, step_memory(module, cfg, batches[0], device)


def record_dataset(out: Path, images: int, source: Path | None) -> RecordDataset:
    """A train.rec of about `images` JPEG faces: the first identities of an image folder (real
    LFW faces by default), or synthetic identities where there is none."""
    if source is None or not source.is_dir():
        source = out / "synthetic"
        data = SyntheticIdentities(num_classes=max(2, images // 16), images_per_class=16)
        for index in range(len(data)):
            image, label = data[index]
            pixels = (image.permute(1, 2, 0) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
            path = source / f"id{label:05d}" / f"{index}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=90, colorspace="RGB"))
    people, count = [], 0
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        if count >= images:
            break
        people.append(folder.name)
        count += sum(1 for _ in folder.glob("*.jpg"))
    stats = folder_to_rec(source, out / "rec", identities=people)
    return RecordDataset(out / "rec", num_classes=stats["classes"])


def loader_rates(args, batch_size: int, device: torch.device, workdir: Path) -> dict:
    """Images/s of FaceDataModule's training loader over a RecordIO set, per number of workers."""
    dataset = record_dataset(workdir / "data", args.data_images, args.data_source)
    record_bytes = (dataset.root / "train.rec").stat().st_size / len(dataset)
    result = {"source": str(args.data_source if args.data_source and args.data_source.is_dir() else "synthetic"),
              "images": len(dataset), "mean_record_kib": record_bytes / 1024, "images_per_s": {}}
    for workers in args.data_workers:
        batches = args.data_batches * max(workers, 1)
        # One long epoch over the records repeated (epoch restarts would stall the workers' pipeline).
        order = np.random.default_rng(0).permutation((batches + 1) * batch_size) % len(dataset)
        datamodule = FaceDataModule(
            dataset.num_classes, Subset(dataset, order.tolist()), batch_size=batch_size, num_workers=workers,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
        )
        loader = iter(datamodule.train_dataloader())
        next(loader)  # worker start-up is not timed
        start, count = time.perf_counter(), 0
        for images, _ in loader:
            images.to(device, non_blocking=True)
            count += len(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        result["images_per_s"][workers] = count / (time.perf_counter() - start)
    return result


def sweep(args) -> list[list[str]]:
    """Config overrides of each configuration: the command line's, then one value of each swept option."""
    axes = [
        [[f"model={name}"] for name in args.models or []],
        [[f"dataset.num_classes={classes}"] for classes in args.classes or []],
        [[f"dataset.batch_size={size}"] for size in args.batch_sizes or []],
        [[f"compile.backbone={backbone}", f"compile.head={head}"] for backbone, head in map(COMPILE.get, args.compile or [])],
    ]
    return [list(args.overrides) + sum(choice, []) for choice in itertools.product(*(axis or [[]] for axis in axes))]


def describe(cfg) -> str:
    compiled = [name for name in ("backbone", "head") if cfg.compile[name]]
    return (f"model={cfg.model.name} C={cfg.dataset.num_classes} batch={cfg.dataset.batch_size} "
            f"precision={cfg.trainer.precision} optimizer={cfg.optim.optimizer._target_.rsplit('.', 1)[-1]}"
            f"(fused={cfg.optim.optimizer.get('fused')}) channels_last={cfg.model.get('channels_last', False)} "
            f"compile={'+'.join(compiled) or 'off'} head={cfg.head._target_.rsplit('.', 1)[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="config overrides, as for train.py (e.g. experiment=gpu_fast)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="*", help="model= options to sweep (default: the config's)")
    parser.add_argument("--classes", nargs="*", type=int, help="dataset.num_classes values to sweep")
    parser.add_argument("--batch-sizes", nargs="*", type=int, help="dataset.batch_size values to sweep")
    parser.add_argument("--compile", nargs="*", choices=sorted(COMPILE), help="torch.compile of: off | backbone | all")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps per path and round")
    parser.add_argument("--steps", type=int, default=100, help="timed steps per path and round")
    parser.add_argument("--log-every", type=int, default=50, help="log_every_n_steps of raw and lightning")
    parser.add_argument("--rounds", type=int, default=3, help="the paths take turns this many times; the best round counts")
    parser.add_argument("--peak-tflops", type=float, help="the device's peak for the MFU (known: recent NVIDIA GPUs, bf16/fp16)")
    parser.add_argument("--data-workers", nargs="*", type=int, default=[1], help="loader workers to measure (none: skip)")
    parser.add_argument("--data-images", type=int, default=2000, help="distinct images in the RecordIO set")
    parser.add_argument("--data-batches", type=int, default=30, help="timed loader batches per worker")
    parser.add_argument("--data-source", type=Path, default=LFW, help="image folder to pack (default: LFW); synthetic faces where it is no folder, e.g. --data-source synthetic")
    parser.add_argument("--out", type=Path, help="append one JSON line per configuration to this file")
    args = parser.parse_intermixed_args()  # config overrides may sit between the options
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # per-fit banners; warnings still show
    if args.steps < args.log_every:
        parser.error(f"--steps {args.steps} < --log-every {args.log_every}: the timed window would hold no logging step")
    device = torch.device(args.device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {device_name}; torch {torch.__version__}, lightning {L.__version__}; "
          f"{args.warmup} warm-up + {args.steps} timed steps, best of {args.rounds}, logging every {args.log_every} steps")

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        for overrides in sweep(args):
            cfg = compose_config(overrides, workdir / "run")
            rows.append(benchmark_config(cfg, args, device, workdir))
            rows[-1].update(device=device_name, torch=torch.__version__, overrides=overrides)
            append_json(args.out, rows[-1])
        if args.data_workers:
            fastest = max(figures["images_per_s"] for row in rows for figures in row["paths"].values())
            data = benchmark_loader(args, int(cfg.dataset.batch_size), fastest, device, workdir)
            append_json(args.out, {"device": device_name, "data_path": data, "fastest_training_images_per_s": fastest})

    print("\nsummary: lightning vs raw")
    for row in rows:
        lightning, raw = row["paths"]["lightning"], row["paths"]["raw"]
        mfu = f", MFU {100 * lightning['mfu']:.1f}%" if lightning["mfu"] else ""
        print(f"  {lightning['images_per_s'] / raw['images_per_s']:.3f} ({lightning['images_per_s']:.1f} / "
              f"{raw['images_per_s']:.1f} images/s{mfu})  {row['config']}")


def benchmark_config(cfg, args, device: torch.device, workdir: Path) -> dict:
    """Measure and print one configuration; returns its figures."""
    flops = flops_per_image(cfg)
    peak = peak_flops(device, str(cfg.trainer.precision), args.peak_tflops)
    paths, step_peaks = measure(cfg, args, device, workdir)
    head = head_cost(cfg, int(cfg.dataset.batch_size), device)
    print(f"\n{describe(cfg)}\n  FLOPs per image (forward + backward): {flops / 1e9:.3f} G; "
          f"peak {'n/a (give --peak-tflops)' if peak is None else f'{peak / 1e12:.1f} TFLOP/s'}")
    print(f"  {'path':15s} {'images/s':>10s} {'x raw':>7s} {'peak MiB':>9s} {'MFU':>7s}")
    for path, figures in paths.items():
        rate, memory = figures["images_per_s"], figures["peak_bytes"]
        figures["mfu"] = rate * flops / peak if peak else None
        mib = "n/a" if memory is None else f"{memory / 2**20:.0f}"
        mfu = "n/a" if peak is None else f"{100 * figures['mfu']:.1f}%"
        print(f"  {path:15s} {rate:10.1f} {rate / paths['raw']['images_per_s']:7.3f} {mib:>9s} {mfu:>7s}")
    print(f"  one step's peak above its start: {step_peaks['step'] / 2**20:.1f} MiB without the diagnostics, "
          f"{step_peaks['logging_step'] / 2**20:.1f} MiB on a logging step (statistics=True)")
    print(f"  logits + cross-entropy, forward + backward, float32 (one (B, C) tensor: {head['logits_bytes'] / 2**20:.1f} MiB, "
          f"the (C, d) weight: {head['weight_bytes'] / 2**20:.1f} MiB):")
    for name, figures in head["layers"].items():
        print(f"    {name:7s} {figures['ms']:8.2f} ms   peak {figures['peak_bytes'] / 2**20:8.1f} MiB")
    return {"config": describe(cfg), "flops_per_image": flops, "peak_flops": peak, "paths": paths,
            "step_peak_bytes": step_peaks, "head": head}


def benchmark_loader(args, batch_size: int, fastest: float, device: torch.device, workdir: Path) -> dict:
    """Measure and print the data path against the fastest training path's images/s."""
    data = loader_rates(args, batch_size, device, workdir)
    print(f"\ndata path: RecordIO ({data['images']} {data['source']} images, {data['mean_record_kib']:.1f} KiB per "
          f"record) + decode + flip + normalise, FaceDataModule's loader, batch {batch_size}")
    for workers, rate in data["images_per_s"].items():
        print(f"  {workers} worker(s): {rate:8.0f} images/s ({rate / max(workers, 1):.0f} per worker)")
    per_worker = data["images_per_s"].get(1)
    if per_worker:
        print(f"  the fastest training path takes {fastest:.0f} images/s: {math.ceil(fastest / per_worker)} worker(s) "
              f"at {per_worker:.0f} images/s each keep up (this machine: {os.cpu_count()} cores)")
    return data


def append_json(path: Path | None, row: dict) -> None:
    if path is not None:
        with path.open("a") as file:
            file.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

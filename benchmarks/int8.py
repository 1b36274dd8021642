"""INT8 against float32: what ONNX Runtime's quantisation of a trained face model costs in accuracy and
gains in speed on this CPU, through the same code as `python -m facerec.tools.export quantize=int8`.

    python benchmarks/int8.py tiny=<last.ckpt> mobilefacenet=<last.ckpt> --out /tmp/int8            # accuracy
    python benchmarks/int8.py tiny=<last.ckpt> ... --out /tmp/int8 --speed                          # + images/s

For each checkpoint: the float32 ONNX export, a static INT8 model (per-channel int8 weights, uint8
activations calibrated on --calibration-images of the checkpoint's training images, seed 0) and a
dynamic one. Accuracy: the check set (LFW View 2 by default: its 6,000 pairs, 10 folds) embedded by
the float32 ONNX model and both INT8 models (flip test as eval.py, or --flip none for half the
passes; the float32 export equals PyTorch to 1e-4, checked as it is written): accuracy, TAR@FAR
(1e-3, or 1e-2 where the set has too few negative pairs), AUC, and the cosine of each image's INT8
features to its float32 ones (mean, 1st percentile). Speed (--speed, or --speed-only without the
accuracy check): images/s of ONNX Runtime on --batch random images with 1 and with 2 intra-op
threads, every model of a checkpoint timed round by round in the same run (best of --rounds), INT8
over float32 as a ratio.
Speed needs an idle machine: the 1-minute load average is printed before and after, and the speed
table is marked UNDER LOAD above --max-load. Accuracy does not depend on load.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

from facerec.checkpoint_files import checkpoint_config, load_checkpoint
from facerec.evaluation.onnx_model import OnnxEmbedder
from facerec.paths import REPO_ROOT
from facerec.tools.export import accuracy_check, calibration_set, evaluation_protocol, export_checkpoint, exported_model
from facerec.tools.quantize import CalibrationImages, quantize_onnx

sys.path.insert(0, str(Path(__file__).parent))
from heads import cpu_model  # noqa: E402

MODES = ("static", "dynamic")


def export_config(checkpoint: Path, config: dict, out: Path):
    """export.py's config for `checkpoint`, with the model that evaluation set configs read (and the
    paths a Hydra run would set: this script composes outside one)."""
    cfg = compose(config_name="export", overrides=[f"ckpt_path={checkpoint}"])
    with open_dict(cfg):
        cfg.model = config["model"]
        cfg.paths.root_dir, cfg.paths.output_dir = str(REPO_ROOT), str(out)
    return cfg


def build_models(name: str, checkpoint: Path, cfg, config: dict, out: Path, calibration_images: int) -> tuple[dict[str, Path], dict]:
    """{precision: ONNX file}, {mode: QuantizationResult}."""
    fp32 = export_checkpoint(checkpoint, "onnx", out / f"{name}.onnx").model_path
    files, quantized = {"fp32": fp32}, {}
    for mode in MODES:
        calibration = CalibrationImages(calibration_set(cfg, config), "images", calibration_images, seed=0, name="train") if mode == "static" else None
        quantized[mode] = quantize_onnx(fp32, out / f"{name}.int8-{mode}.onnx", mode, calibration)
        files[f"int8 {mode}"] = quantized[mode].path
    return files, quantized


def images_per_second(path: Path, threads: int, images: np.ndarray) -> float:
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    session.run(None, {"images": images})  # warm-up
    start = time.perf_counter()
    session.run(None, {"images": images})
    return len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="name=<train.py checkpoint>")
    parser.add_argument("--out", type=Path, required=True, help="where the ONNX files go")
    parser.add_argument("--check-set", default="lfw", help="a conf/evalset name")
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--flip", default="sum", choices=["sum", "none"], help="flip test of the accuracy check (none: half the passes)")
    parser.add_argument("--speed", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="--speed without the accuracy check")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-load", type=float, default=1.5)
    args = parser.parse_args()
    args.speed |= args.speed_only
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    load_before = os.getloadavg()[0]
    import onnxruntime

    print(f"onnxruntime {onnxruntime.__version__}, torch {torch.__version__}, {cpu_model()}, {os.cpu_count()} cores; load average (1 min) before: {load_before:.2f}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    accuracy_rows, speed_rows = [], []
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        for item in args.models:
            name, checkpoint = item.split("=", 1)
            config = checkpoint_config(load_checkpoint(checkpoint, mmap=True), checkpoint)
            cfg = export_config(Path(checkpoint), config, args.out)
            files, quantized = build_models(name, Path(checkpoint), cfg, config, args.out, args.calibration_images)
            if not args.speed_only:
                protocol = evaluation_protocol(cfg, args.check_set, "--check-set")
                models = {precision: exported_model(path, "onnx") for precision, path in files.items()}
                check = accuracy_check(args.check_set, protocol, models, flip=args.flip)
                for precision in models:
                    entry, cosine = check[precision], check[precision].get("cosine_to_reference")
                    far = "1e-03" if "tar@far=1e-03" in entry else "1e-02"
                    accuracy_rows.append(
                        f"| {name} | {precision} | {files[precision].stat().st_size / 1e6:.2f} | "
                        f"{100 * entry['accuracy']:.2f} ± {100 * entry['accuracy_std']:.2f} | "
                        f"{100 * entry[f'tar@far={far}']:.2f} (FAR {far}) | {entry['auc']:.4f} | "
                        + (f"{cosine['mean']:.4f} / {cosine['p01']:.4f}" if cosine else "-") + " |"
                    )
                    print(accuracy_rows[-1], flush=True)  # as it comes: a later model's failure loses nothing
            for mode, result in quantized.items():
                print(f"{name} int8 {mode}: {result.quantised_nodes} weighted nodes int8; without an int8 form: {result.float_ops}", flush=True)
            if args.speed:
                size = OnnxEmbedder(files["fp32"]).input_size
                images = np.random.default_rng(0).standard_normal((args.batch, 3, size, size)).astype(np.float32)
                for threads in (1, 2):
                    best = dict.fromkeys(files, 0.0)
                    for _ in range(args.rounds):
                        for precision, path in files.items():
                            best[precision] = max(best[precision], images_per_second(path, threads, images))
                    cells = " | ".join(f"{best[p]:.1f}" + ("" if p == "fp32" else f" ({best[p] / best['fp32']:.2f}x)") for p in files)
                    speed_rows.append(f"| {name} | {threads} | {cells} |")
    load_after = os.getloadavg()[0]
    print(f"load average (1 min) after: {load_after:.2f}\n")
    if accuracy_rows:
        print(f"Accuracy on {args.check_set} (flip={args.flip}; cosine of each image's features to float32's):\n")
        print("| model | precision | file MB | accuracy % | TAR % | AUC | cosine to float32: mean / 1st pct |")
        print("|---|---|---:|---:|---:|---:|---:|")
        print("\n".join(accuracy_rows))
    if args.speed:
        if max(load_before, load_after) > args.max_load:
            print(f"\nUNDER LOAD: load average {load_before:.2f} before, {load_after:.2f} after (> --max-load {args.max_load}): do not publish the speeds.")
        print(f"\nImages/s of ONNX Runtime (CPU provider), batch {args.batch}, best of {args.rounds} rounds:\n")
        print("| model | threads | fp32 | int8 static | int8 dynamic |")
        print("|---|---:|---:|---:|---:|")
        print("\n".join(speed_rows))


if __name__ == "__main__":
    main()

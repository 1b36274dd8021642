#!/usr/bin/env bash
# The GPU figures of docs/benchmarks.md, on one CUDA GPU (estimated 8-10 minutes on an H100, mostly compiling):
#   benchmarks/gpu_throughput.sh [OUT_DIR]        (default: benchmarks/results)
# Needs facerec and its dependencies installed beside a CUDA build of torch; PYTHON names the interpreter
# (default python3). Writes OUT_DIR/*.txt (the printed tables) and OUT_DIR/train_throughput.jsonl (one JSON
# line per configuration, then the data path). Every configuration is experiment=gpu_fast (bf16,
# channels_last, fused SGD, cudnn benchmark) with the paths raw, raw+guard, lightning (logging every 50
# steps) and lightning/1 (every step); --compile off|backbone|all overrides its compile settings.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
run() {  # name, then the benchmark's arguments; a failing configuration does not stop the others
    local name=$1
    shift
    "${PYTHON:-python3}" benchmarks/train_throughput.py experiment=gpu_fast --device cuda --warmup 10 --steps 50 --log-every 50 \
        --rounds 1 --out "$out/train_throughput.jsonl" "$@" 2>&1 | tee "$out/$name.txt" || echo "FAILED: $name" | tee -a "$out/failed.txt"
}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# Most important first (each configuration's figures are written as soon as it is done):
# IResNet-50, batch 256, MS1MV3's 93,431 classes: eager, compiled backbone (the recipe), compiled backbone
# + head; then the loader (RecordIO + decode + flip + normalise) with 1 and 8 workers against the step rate.
run iresnet50_c93431 --models iresnet50 --classes 93431 --batch-sizes 256 --compile off backbone all --data-workers 1 8
# CASIA-WebFace's 10,575 classes.
run iresnet50_c10575 --models iresnet50 --classes 10575 --batch-sizes 256 --compile off backbone --data-workers
# IResNet-100, batch 256, 93,431 classes.
run iresnet100 --models iresnet100 --classes 93431 --batch-sizes 256 --compile off backbone --data-workers
# Batch size: 128 (insightface's per-GPU batch) and 512, eager.
run iresnet50_batch --models iresnet50 --classes 93431 --batch-sizes 128 512 --compile off --data-workers
grep -h -A 12 "^summary" "$out"/iresnet*.txt

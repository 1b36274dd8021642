#!/usr/bin/env bash
# Every GPU figure and GPU-only path check of docs/research/benchmarks.md, on one CUDA GPU, in under 10 minutes
# on an H100/H200 (estimated; the lower-priority throughput configurations are skipped past 7 minutes):
#   benchmarks/gpu_throughput.sh [OUT_DIR]        (default: benchmarks/results)
# Needs facerec and its dependencies installed beside a CUDA build of torch; PYTHON names the interpreter
# (default python3). Writes OUT_DIR/*.txt (the printed tables), OUT_DIR/gpu_paths/gpu_paths.json (the path
# checks) and OUT_DIR/train_throughput.jsonl (one JSON line per configuration, then the data path).
# Throughput configurations are experiment=gpu_fast (bf16, channels_last, fused SGD, cudnn benchmark) with
# the paths raw, raw+guard, lightning (logging every 50 steps) and lightning/1 (every step); --compile
# off|backbone|all overrides its compile settings.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
budget_s=420  # start no throughput configuration after this many seconds
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# 1. The paths CPU tests can only fake, first: CUDA graphs (compile.mode=reduce-overhead) with validation,
#    16-mixed with a GradScaler skip, resume from a checkpoint of 8 ranks on this one device, Partial FC
#    sampling with scale=dynamic at C = 93,431, and the host syncs per step.
"$python" benchmarks/gpu_paths.py --out "$out/gpu_paths" 2>&1 | tee "$out/gpu_paths.txt" || echo "FAILED: gpu_paths" | tee -a "$out/failed.txt"
run() {  # name, then the benchmark's arguments; a failing configuration does not stop the others
    local name=$1
    shift
    if (( SECONDS > budget_s )); then
        echo "skipped (time budget): $name" | tee -a "$out/skipped.txt"
        return
    fi
    "$python" benchmarks/train_throughput.py experiment=gpu_fast --device cuda --warmup 10 --steps 50 --log-every 50 \
        --rounds 1 --out "$out/train_throughput.jsonl" "$@" 2>&1 | tee "$out/$name.txt" || echo "FAILED: $name" | tee -a "$out/failed.txt"
}
# 2. Throughput, most important first (each configuration's figures are written as soon as it is done):
# IResNet-50, batch 256, MS1MV3's 93,431 classes: eager and compiled backbone (the recipe); then the loader
# (RecordIO + decode + flip + normalise) with 1 and 8 workers against the step rate.
run iresnet50_c93431 --models iresnet50 --classes 93431 --batch-sizes 256 --compile off backbone --data-workers 1 8
# CASIA-WebFace's 10,575 classes, eager.
run iresnet50_c10575 --models iresnet50 --classes 10575 --batch-sizes 256 --compile off --data-workers
# The compiled head's training path (compile.head compiles head.loss) on top of the compiled backbone.
run iresnet50_compile_all --models iresnet50 --classes 93431 --batch-sizes 256 --compile all --data-workers
# IResNet-100, batch 256, 93,431 classes, eager; batch size 128 (insightface's per-GPU batch) and 512.
run iresnet100 --models iresnet100 --classes 93431 --batch-sizes 256 --compile off --data-workers
run iresnet50_batch --models iresnet50 --classes 93431 --batch-sizes 128 512 --compile off --data-workers
grep -h -A 12 "^summary" "$out"/iresnet*.txt
echo "total: ${SECONDS} s"

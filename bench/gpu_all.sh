#!/usr/bin/env bash
# Every GPU figure of the speed work in one go (about 8 minutes on one H100/H200), results under $OUT:
#   OUT=bench/results/$(date +%Y%m%d) bash bench/gpu_all.sh
# 1. the gpu-marked tests (graph vs eager trainer for every method, real architectures, fused op)
# 2. bench_speed: floor, PEFT and every method at r16/r64 under CUDA graphs, SD1.5 and SDXL, plus SVD timings
# 3. the real trainer under CUDA graphs, x the frozen floor timed in the same process
# 4. a profile of the real trainer's LoRA² and LoRA steps on SDXL
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_all}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
timeout 260 python -m pytest -q -p no:cacheprovider tests -m gpu 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
timeout 240 python bench/bench_speed.py --only-graphs --arch sd15 sdxl --out "$OUT/speed" | grep -E "^\||layers"
timeout 200 python bench/train_gpu.py --arch sd15 sdxl --rank 16 64 --steps 25 --floor --no-gc-sweep \
    --step-modes cuda_graph --out "$OUT/train_graph.json" | grep "^{" | cut -c1-400
for m in lora2; do
  timeout 90 python bench/profile_trainer.py --arch sdxl --method "$m" --rank 16 --out "$OUT/trainer_profile" \
    | grep "wall"
done

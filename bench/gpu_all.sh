#!/usr/bin/env bash
# Every GPU figure of the speed work, results under $OUT:
#   OUT=bench/results/$(date +%Y%m%d) bash bench/gpu_all.sh [kernels|tests|bench|trainer|all]
# kernels (~6 min): the Triton kernels built for this GPU's architecture (bench/compile_kernels.py), timed
#                   against their torch forms at SDXL sizes (bench/bench_kernels.py), bench/capture_check.py (one
#                   graph per method, seconds), then the kernels' gpu-marked tests
#                   (each kernel = its torch form, the trainer's runs with and without them)
# tests   (~5 min): every other gpu-marked test (graph vs eager trainer for every method, no host syncs, real
#                   architectures, fused op, batched entropy)
# bench   (~4 min): bench_speed under CUDA graphs (floor, PEFT r16/r64, every method r16/r64, SD1.5 and SDXL, SVD
#                   timings), then the LoRA² ablation on SDXL
# trainer (~4 min): the real trainer under CUDA graphs x the frozen floor timed in the same process, and a
#                   profile of its LoRA² step on SDXL
# all: the four in a row (longer than one 600 s device call)
# one, two, three: the same work in three calls that each fit 600 s at their timeouts, what decides issue 7 first:
#   one   (<= 520 s): the table and its bars (bench_speed --only-graphs), compile_kernels, bench_kernels, capture
#   two   (<= 480 s): the trainer figures and profile, the LoRA² / TriLoRA r64 ablation
#   three (<= 580 s): the kernels' gpu tests, then the other gpu tests (cut at their timeout if slow)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu_all}
PART=${1:-all}
K="kernel or fold or entropy or slot"  # the Triton kernels' gpu tests (kernel = torch form, trainer runs)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1
rc() { local r=${PIPESTATUS[0]}; [[ $r == 0 ]] || echo "!! $1 exited $r (124: its timeout)"; }
if [[ $PART == one ]]; then
  timeout 240 python bench/bench_speed.py --only-graphs --arch sd15 sdxl --out "$OUT/speed" 2> "$OUT/speed.err" \
    | grep -E "^\||layers|entropy|checks|Bars"; rc bench_speed
  timeout 60 python bench/compile_kernels.py --out "$OUT/kernels.json" | tail -1; rc compile_kernels
  timeout 120 python bench/bench_kernels.py --out "$OUT/kernel_times" | grep "^|"; rc bench_kernels
  timeout 100 python bench/capture_check.py > "$OUT/capture_check.txt" 2>&1; rc capture_check
  grep -E "captured|FAILED" "$OUT/capture_check.txt"
  exit 0
fi
if [[ $PART == two ]]; then
  timeout 220 python bench/train_gpu.py --arch sd15 sdxl --rank 16 64 --steps 25 --floor --no-gc-sweep \
      --step-modes cuda_graph --out "$OUT/train_graph.json" 2> "$OUT/train.err" | grep "^{" | cut -c1-400
  rc train_gpu
  timeout 90 python bench/profile_trainer.py --arch sdxl --method lora2 --rank 16 --out "$OUT/trainer_profile" \
    | grep "wall"; rc profile_trainer
  timeout 160 python bench/bench_speed.py --ablation --arch sdxl --match "lora r64" "lora2 r64" \
      --out "$OUT/ablation" 2> "$OUT/ablation.err" | grep -E "^\||checks"; rc ablation  # "lora r64": tri_lora's too
  exit 0
fi
if [[ $PART == three ]]; then
  timeout 250 python -m pytest -q -p no:cacheprovider -W ignore tests -m gpu -k "$K" > "$OUT/pytest_kernels.txt" 2>&1
  rc "pytest (kernels)"; tail -8 "$OUT/pytest_kernels.txt"
  timeout 320 python -m pytest -q -p no:cacheprovider -W ignore tests -m gpu -k "not ($K)" > "$OUT/pytest_gpu.txt" 2>&1
  rc "pytest (the rest)"; tail -8 "$OUT/pytest_gpu.txt"
  exit 0
fi
if [[ $PART == kernels || $PART == all ]]; then
  timeout 60 python bench/compile_kernels.py --out "$OUT/kernels.json" | tail -1  # ptxas: registers, spills
  timeout 120 python bench/bench_kernels.py --out "$OUT/kernel_times" | grep "^|"  # each kernel vs its torch form
  timeout 100 python bench/capture_check.py > "$OUT/capture_check.txt" 2>&1  # seconds: does every method capture?
  cat "$OUT/capture_check.txt" | grep -E "captured|FAILED"
  timeout 280 python -m pytest -q -p no:cacheprovider -W ignore tests -m gpu -k "$K" > "$OUT/pytest_kernels.txt" 2>&1
  tail -12 "$OUT/pytest_kernels.txt"
fi
if [[ $PART == tests || $PART == all ]]; then
  timeout 500 python -m pytest -q -p no:cacheprovider -W ignore tests -m gpu -k "not ($K)" > "$OUT/pytest_gpu.txt" 2>&1
  tail -12 "$OUT/pytest_gpu.txt"
fi
if [[ $PART == bench || $PART == all ]]; then
  timeout 240 python bench/bench_speed.py --only-graphs --arch sd15 sdxl --out "$OUT/speed" | grep -E "^\||layers|entropy|checks"
  timeout 150 python bench/bench_speed.py --ablation --arch sdxl --out "$OUT/ablation" | grep -E "^\||entropy|checks"
fi
if [[ $PART == trainer || $PART == all ]]; then
  timeout 220 python bench/train_gpu.py --arch sd15 sdxl --rank 16 64 --steps 25 --floor --no-gc-sweep \
      --step-modes cuda_graph --out "$OUT/train_graph.json" | grep "^{" | cut -c1-400
  timeout 90 python bench/profile_trainer.py --arch sdxl --method lora2 --rank 16 --out "$OUT/trainer_profile" \
    | grep "wall"
fi

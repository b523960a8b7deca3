#!/usr/bin/env bash
# Context parallelism on the GPUs of one host (docs/context-parallel.md): builds keysel with CUDA and NCCL, then
#   1. the GPU tests of context parallelism on 2, 4 and 8 GPUs (as many as the machine has): the selection equals
#      select_topk bit for bit, the attention equals one GPU's (tests/gpu/test_cuda_context_parallel.cpp);
#   2. the decode step at N = 1M tokens on every GPU against N / R on one GPU (the goal: ratio <= 1.3), batch 1
#      and 16, contiguous shards and round-robin pages;
#   3. the largest context that fits on 1, 2, 4 and 8 GPUs, run once at that size.
# Results go to $OUT (default gpu-out/); the summary is printed last.
#
#   bench/gpu/context_parallel.sh            (BUILD_DIR, CUDA_ARCHS as bench/gpu/run.sh; SKIP_BUILD=1 reuses it)
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
BUILD=${BUILD_DIR:-build-gpu}
mkdir -p "$OUT"
summary=()

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvidia-smi topo -m; nvcc --version | tail -2
  grep -h "define NCCL_\(MAJOR\|MINOR\|PATCH\)" /usr/local/cuda/include/nccl.h 2>/dev/null; } >"$OUT/cp-machine.txt" 2>&1
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)

if [ -z "${SKIP_BUILD:-}" ]; then
  start=$SECONDS
  if cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEYSEL_CUDA=ON -DKEYSEL_NCCL=ON -DKEYSEL_FAISS=OFF \
       -DKEYSEL_BUILD_TOOLS=OFF -DKEYSEL_PYTHON=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90a}" \
       >"$OUT/cp-build.log" 2>&1 &&
     cmake --build "$BUILD" --target test_gpu bench_context_parallel -j"$(nproc)" >>"$OUT/cp-build.log" 2>&1; then
    summary+=("build: ok ($((SECONDS - start)) s)")
  else
    tail -40 "$OUT/cp-build.log"; echo "build failed"; exit 1
  fi
fi

devices() { seq -s, 0 $(($1 - 1)); }

for g in 2 4 8; do
  [ "$g" -le "$GPUS" ] || continue
  CUDA_VISIBLE_DEVICES=$(devices "$g") timeout 300 "$BUILD/tests/test_gpu" --gtest_filter='CudaContextParallel.*' \
    >"$OUT/cp-test-$g.log" 2>&1
  summary+=("tests on $g GPUs: rc=$? $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \] [0-9]' "$OUT/cp-test-$g.log" | tr '\n' ' ')")
  grep -E "Failure|FAILED|rank [0-9]" "$OUT/cp-test-$g.log" | head -20
done

for layout in contiguous round_robin; do
  for batch in 1 16; do
    timeout 300 "$BUILD/bench/bench_context_parallel" --n 1048576 --batch "$batch" --layout "$layout" \
      >>"$OUT/cp-bench.txt" 2>&1
    summary+=("decode step, N = 1M, batch $batch, $layout: rc=$? $(tail -1 "$OUT/cp-bench.txt")")
  done
done

for g in 1 2 4 8; do
  [ "$g" -le "$GPUS" ] || continue
  CUDA_VISIBLE_DEVICES=$(devices "$g") timeout 300 "$BUILD/bench/bench_context_parallel" --n max --iters 10 \
    >>"$OUT/cp-capacity.txt" 2>&1
  summary+=("largest context, $g GPUs: rc=$? $(grep -h "largest context on $g " "$OUT/cp-capacity.txt" | tail -1)")
done

cat "$OUT/cp-bench.txt" "$OUT/cp-capacity.txt"
printf '%s\n' "${summary[@]}" | tee "$OUT/cp-summary.txt"

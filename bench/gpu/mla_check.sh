#!/usr/bin/env bash
# The sparse MLA kernels on an sm_90 GPU in one call: builds test_gpu and the Python module for sm_90a
# (bench/gpu/run.sh's build and python stages: its pytest run narrowed to the sparse MLA files, then
# bench/gpu/mla_time.py, both kernels on the decode and prefill shapes), then runs CudaSparseMla.* through the
# wgmma kernel and through the portable one. Results under $OUT (mla_time.py's in mla-time.txt, printed with
# run.sh's summary first).
#
#   bash bench/gpu/mla_check.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD_DIR:-build-gpu}
start=$SECONDS
BUILD_TARGETS=test_gpu PYTEST_TARGETS="tests/python/test_mla.py tests/python/test_compat_mla.py" \
  bash bench/gpu/run.sh build python >"$OUT/run.txt" 2>&1
rc=$?
cat "$OUT/run.txt"
[ $rc -eq 0 ] && [ -x "$BUILD/tests/test_gpu" ] || { echo "build failed (rc=$rc): see $OUT/build.log"; exit 1; }
echo "==== cuda_sparse_mla.cu: registers, local memory, MMA instructions (from $OUT/resources.txt)"
sed -n '/^== .*cuda_sparse_mla\.cu\.o/,/^warpgroup MMA/p' "$OUT/resources.txt" |
  sed -E 's/_ZN6keysel12cuda_kernels[0-9]+_GLOBAL__N__[0-9a-f_]+cuda_sparse_mla_cu_[0-9a-f]+//'
echo "==== sparse MLA tests"
for kernel in wgmma portable; do
  KEYSEL_MLA_KERNEL=$kernel timeout 150 "$BUILD/tests/test_gpu" --gtest_filter='CudaSparseMla.*' \
    >"$OUT/test-mla-$kernel.log" 2>&1
  rc=$?
  result=$(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$OUT/test-mla-$kernel.log" | tr '\n' ' ')
  echo "CudaSparseMla.* with KEYSEL_MLA_KERNEL=$kernel: rc=$rc $result"
  grep -E "\[ sparse MLA \]|Failure|FAILED|T=" "$OUT/test-mla-$kernel.log" | head -12
done
echo "total $((SECONDS - start)) s"

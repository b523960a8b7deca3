#!/usr/bin/env bash
# Builds keysel with CUDA on a GPU machine, runs the GPU tests (plain, then under compute-sanitizer), the GPU
# benchmarks beside their PyTorch peers, and Nsight Compute on the kernels, in one call. Results go to $OUT.
#
#   bench/gpu/run.sh [stages]     stages: any of build test python sanitize bench ncu mla (default: all of them)
#
# BUILD_TARGETS names the C++ targets of the build stage (default: test_gpu bench_gpu).
# The python stage builds keysel._C into the same build tree (python3 of the machine, with its torch, nanobind
# and pytest; wheels carried in .whl/ are installed first where present) and runs tests/python on the GPU
# (PYTEST_TARGETS names other files).
#
# Builds for sm_90a (CUDA_ARCHS=90a by default): the Lightning Indexer's warpgroup-MMA kernel (wgmma, fp8 QGMMA)
# exists only in sm_90a code; a plain sm_90 or sm_80 build runs the mma.sync kernels instead.
#
# GoogleTest and Google Benchmark come from the system or, where the machine has none, from Debian packages
# unpacked out of .debs/ (fetch them once on a machine with a package mirror:
#   mkdir -p .debs && cd .debs && apt-get download libgtest-dev libbenchmark-dev libbenchmark1debian \
#     nlohmann-json3-dev libdlpack-dev libblas3 libblas-dev
# (or libopenblas-dev libopenblas0-pthread libopenblas-pthread-dev in place of the reference BLAS).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STAGES=${*:-build test python bench ncu mla sanitize}
has() { [[ " $STAGES " == *" $1 "* ]]; }
BUILD=${BUILD_DIR:-build-gpu}
JOBS=$(nproc)
summary=()

PREFIX_ARGS=()
if compgen -G ".debs/*.deb" >/dev/null; then
  DEPS=/tmp/keysel-deps
  mkdir -p "$DEPS"
  for f in .debs/*.deb; do dpkg -x "$f" "$DEPS"; done
  PREFIX_ARGS=(-DCMAKE_PREFIX_PATH="$DEPS/usr")
  # OpenBLAS unpacked from its .deb has no alternatives symlinks: name the library for FindBLAS.
  blas=$(compgen -G "$DEPS/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so*" | head -1)
  # Debian's reference BLAS (libblas3, libblas-dev: 0.3 MB against OpenBLAS's 11.7, enough for the GPU build,
  # whose C++ uses BLAS only in recall/): its cblas.h is an alternatives link too.
  if [ -z "$blas" ] && [ -e "$DEPS/usr/lib/x86_64-linux-gnu/blas/libblas.so.3" ]; then
    blas="$DEPS/usr/lib/x86_64-linux-gnu/blas/libblas.so.3"
    ln -sf cblas-netlib.h "$DEPS/usr/include/x86_64-linux-gnu/cblas.h"
    PREFIX_ARGS+=(-DCMAKE_CXX_FLAGS="-isystem $DEPS/usr/include/x86_64-linux-gnu")
    export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu/blas:${LD_LIBRARY_PATH:-}"
  fi
  [ -n "$blas" ] && PREFIX_ARGS+=(-DBLAS_LIBRARIES="$blas")
  export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu/openblas-pthread:${LD_LIBRARY_PATH:-}"
  export LD_LIBRARY_PATH="$DEPS/usr/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; nvcc --version | tail -2; } \
  2>&1 | tee "$OUT/machine.txt"

PYTHON_OPT=OFF; PY_TARGET=()
if has python || [ "${PYTHON_BUILD:-0}" = 1 ]; then  # PYTHON_BUILD=1: build keysel._C without the python stage
  if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/keysel-site .whl/*.whl &&
      export PYTHONPATH=/tmp/keysel-site${PYTHONPATH:+:$PYTHONPATH}
  fi
  PYTHON_OPT=ON; PY_TARGET=(keysel_python)
fi

if has build; then
  start=$SECONDS
  if cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DKEYSEL_CUDA=ON -DKEYSEL_FAISS=OFF \
       -DKEYSEL_BUILD_TOOLS=OFF -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHS:-90a}" "${PREFIX_ARGS[@]}" \
       -DKEYSEL_PYTHON="$PYTHON_OPT" -DPython_EXECUTABLE="$(command -v python3)" >"$OUT/build.log" 2>&1 &&
     cmake --build "$BUILD" --target ${BUILD_TARGETS:-test_gpu bench_gpu} "${PY_TARGET[@]}" -j"$JOBS" >>"$OUT/build.log" 2>&1; then
    summary+=("build: ok ($((SECONDS - start)) s)")
  else
    tail -40 "$OUT/build.log"
    echo "build failed"; exit 1
  fi
  for o in "$BUILD"/indexer/CMakeFiles/keysel_indexer.dir/src/cuda_*.cu.o \
           "$BUILD"/attention/CMakeFiles/keysel_attention.dir/src/cuda_*.cu.o; do
    echo "== $o"; cuobjdump --dump-resource-usage "$o" 2>&1 | grep -E "Function|REG" | sed -E 's/^\s+//'
    echo "local-memory instructions (LDL/STL): $(cuobjdump -sass "$o" 2>/dev/null | grep -c -E 'LDL|STL')"
    echo "MMA instructions (HMMA/QMMA/HGMMA/QGMMA): $(cuobjdump -sass "$o" 2>/dev/null | grep -c -E 'MMA')"
    echo "warpgroup MMA (HGMMA/QGMMA): $(cuobjdump -sass "$o" 2>/dev/null | grep -c -E 'GMMA')"
  done >"$OUT/resources.txt" 2>&1
fi

if has test; then
  start=$SECONDS
  "$BUILD/tests/test_gpu" --gtest_brief=0 >"$OUT/test.log" 2>&1
  rc=$?
  summary+=("tests: rc=$rc, $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]|^\[  SKIPPED \] [0-9]' "$OUT/test.log" | tr '\n' ' ') ($((SECONDS - start)) s)")
  grep -E "Failure|FAILED|error" "$OUT/test.log" | head -30
  # The indexer's portable (mma.sync) kernels on this GPU too: KEYSEL_CUDA_PORTABLE keeps the wgmma kernel out.
  KEYSEL_CUDA_PORTABLE=1 "$BUILD/tests/test_gpu" --gtest_filter='CudaLightningIndexer.*:CudaPagedMqa.*:CudaRaggedMqa.*:CudaGraph.*' \
    >"$OUT/test-portable.log" 2>&1
  summary+=("tests, portable indexer kernels: rc=$?, $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$OUT/test-portable.log" | tr '\n' ' ')")
  grep -E "Failure|FAILED" "$OUT/test-portable.log" | head -10
  # The portable sparse MLA kernel (what sm_80/sm_89 run) on this GPU too: the sm_90a wgmma kernel is the default.
  KEYSEL_MLA_KERNEL=portable "$BUILD/tests/test_gpu" --gtest_filter='CudaSparseMla.*' >"$OUT/test-mla-portable.log" 2>&1
  summary+=("tests, portable sparse MLA kernel: rc=$?, $(grep -E '^\[  PASSED  \]|^\[  FAILED  \]' "$OUT/test-mla-portable.log" | tr '\n' ' ')")
fi

if has python; then
  start=$SECONDS
  python3 -c 'import torch, nanobind, pytest; print("torch", torch.__version__, "nanobind", nanobind.__version__, "pytest", pytest.__version__, "gpu", torch.cuda.get_device_name())' \
    >"$OUT/pytest.log" 2>&1
  PYTHONPATH="$PWD/$BUILD/python${PYTHONPATH:+:$PYTHONPATH}" KEYSEL_EXPECT_BUILD_DIR="$PWD/$BUILD/python" \
    python3 -m pytest -q -rs -p no:cacheprovider ${PYTEST_TARGETS:-tests/python} >>"$OUT/pytest.log" 2>&1
  rc=$?
  summary+=("python: rc=$rc, $(tail -1 "$OUT/pytest.log") ($((SECONDS - start)) s)")
  grep -E "FAILED|Error" "$OUT/pytest.log" | head -30
  PYTHONPATH="$PWD/$BUILD/python${PYTHONPATH:+:$PYTHONPATH}" timeout 120 python3 bench/gpu/mla_time.py \
    >"$OUT/mla-time.txt" 2>&1
  cat "$OUT/mla-time.txt"
fi

if has bench; then
  start=$SECONDS
  { "$BUILD/bench/bench_gpu"; PYTHONUNBUFFERED=1 python3 bench/gpu/torch_peers.py; } >"$OUT/bench.txt" 2>&1
  summary+=("bench: rc=$? ($((SECONDS - start)) s)")
fi

if has ncu; then
  start=$SECONDS
  # --cache-control none: each kernel sees the L2 its predecessor left (the top-k chain reads its scores and
  # scratch from L2, as it does outside the profiler); the decode indexer rotates over caches larger than L2.
  ncu --clock-control none --cache-control none -k 'regex:topk_rows|indexer_logits|sparse_decode|merge_splits|segment_' \
    -c 20 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
    --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis --section SourceCounters \
    "$BUILD/bench/bench_gpu" --profile --quick >"$OUT/ncu.txt" 2>&1
  summary+=("ncu: rc=$? ($((SECONDS - start)) s)")
fi

if has mla; then
  start=$SECONDS
  # The sparse MLA kernels: memcheck and racecheck on their tests, Nsight Compute on the decode and prefill shapes.
  compute-sanitizer --tool memcheck --error-exitcode 9 "$BUILD/tests/test_gpu" --gtest_filter='CudaSparseMla.*' \
    >"$OUT/mla-sanitizer.log" 2>&1
  m=$?
  compute-sanitizer --tool racecheck --error-exitcode 9 "$BUILD/tests/test_gpu" --gtest_filter='CudaSparseMla.*' \
    >>"$OUT/mla-sanitizer.log" 2>&1
  r=$?
  for shape in "" "--heads 64" "--prefill"; do
    PYTHONPATH="$PWD/$BUILD/python${PYTHONPATH:+:$PYTHONPATH}" ncu --clock-control none -k 'regex:sparse_mla|merge_mla' \
      -c 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
      --section SchedulerStats --section WarpStateStats --section ComputeWorkloadAnalysis \
      python3 bench/gpu/mla_profile.py $shape >>"$OUT/ncu-mla.txt" 2>&1
  done
  summary+=("mla: memcheck rc=$m racecheck rc=$r, ncu in ncu-mla.txt ($((SECONDS - start)) s)")
  grep -E "ERROR SUMMARY|Invalid|Race|hazard" "$OUT/mla-sanitizer.log" | sort | uniq -c | head -20
fi

if has sanitize; then
  start=$SECONDS
  # memcheck over every test except the 1M-key rows (slow under the tool); racecheck and synccheck on a subset.
  compute-sanitizer --tool memcheck --leak-check full --error-exitcode 9 \
    "$BUILD/tests/test_gpu" --gtest_filter='-CudaTopk.LargeRowsAndLargeK' >"$OUT/sanitizer.log" 2>&1
  m=$?
  compute-sanitizer --tool racecheck --error-exitcode 9 "$BUILD/tests/test_gpu" \
    --gtest_filter='CudaTopk.MatchesCpuOnAwkwardShapes:CudaSparseAttention.MatchesReferencePaged:CudaLightningIndexer.PrefillMatchesReference:CudaGraph.*' \
    >>"$OUT/sanitizer.log" 2>&1
  r=$?
  compute-sanitizer --tool synccheck --error-exitcode 9 "$BUILD/tests/test_gpu" \
    --gtest_filter='CudaTopk.HeavyTiesPreferLowerPositions:CudaSparseAttention.MatchesReferenceContiguous:CudaLightningIndexer.DecodeMatchesReference:CudaGraph.*' \
    >>"$OUT/sanitizer.log" 2>&1
  s=$?
  summary+=("sanitizer: memcheck rc=$m racecheck rc=$r synccheck rc=$s ($((SECONDS - start)) s)")
  grep -E "ERROR SUMMARY|Invalid|Race|hazard" "$OUT/sanitizer.log" | sort | uniq -c | head -20
fi

echo "==== summary"
printf '%s\n' "${summary[@]}"
[ -f "$OUT/bench.txt" ] && cat "$OUT/bench.txt"
exit 0

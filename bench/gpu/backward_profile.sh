#!/usr/bin/env bash
# Profiles the CUDA sparse attention backward (SPEC §9) with Nsight Systems and Nsight Compute on one GPU, built
# with nvcc and g++ alone (no CMake, no packages: seconds on a bare machine). Results go to $OUT.
#
#   bash bench/gpu/backward_profile.sh        SHAPES="T:K:SHARED ..." (Hq = 32, Hkv = 8, D = Dv = 128, bf16,
#                                             per_kv_head; SHARED: the share of a row's keys common to its 16-token
#                                             block, 0 = scattered), NCU_SHAPE="T:K:SHARED" (default 8192:2048:0.75),
#                                             NCU_KERNELS="regex ..." (the kernels Nsight Compute profiles)
# backward_profile.txt: `backward_profile check` (the library's deterministic kernels and its tiled ones of
# attention/src/cuda_sparse_attention_tiled.cu against a double transcription of SPEC §9), then the median times
# of both per shape and
# PyTorch's flash attention forward + backward at the same token counts (bench/gpu/flash_peer.py);
# NCU=0 skips Nsight Compute. nsys_<T>_<K>.txt: time per kernel where Nsight Systems is installed; ncu_<kernel>.txt: Nsight Compute's
# SpeedOfLight, memory, occupancy and warp-state sections of each kernel at NCU_SHAPE.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
B=${BUILD_DIR:-/tmp/keysel-backward-profile}
ARCH=${CUDA_ARCH:-90a}
mkdir -p "$OUT" "$B/generated/keysel/core"
sed -e 's/@PROJECT_VERSION@/profile/' -e 's/#cmakedefine01 KEYSEL_CUDA/#define KEYSEL_CUDA 0/' \
    -e 's/#cmakedefine01 \(KEYSEL_[A-Z]*\)/#define \1 0/' core/build_config.h.in >"$B/generated/keysel/core/build_config.h"
INC=(-Icore/include -Iattention/include -I"$B/generated" -Iattention/src)
start=$SECONDS
for f in core/src/error.cpp core/src/device.cpp core/src/tensor.cpp core/src/dtype.cpp; do
  g++ -std=c++20 -O2 "${INC[@]}" -c "$f" -o "$B/$(basename "$f").o" &
done
for f in bench/gpu/backward_profile.cu attention/src/cuda_sparse_attention_backward.cu attention/src/cuda_sparse_attention.cu \
         attention/src/cuda_sparse_attention_tiled.cu attention/src/cuda_glue.cu; do
  nvcc -std=c++20 -O3 -lineinfo -arch=sm_$ARCH "${INC[@]}" -c "$f" -o "$B/$(basename "$f").o" &
done
wait
nvcc -arch=sm_$ARCH -o "$B/backward_profile" "$B"/*.o || { echo "build failed"; exit 1; }
echo "build: $((SECONDS - start)) s" | tee "$OUT/backward_profile.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader >>"$OUT/backward_profile.txt"
"$B/backward_profile" check >>"$OUT/backward_profile.txt" 2>&1 || echo "check FAILED" >>"$OUT/backward_profile.txt"
SHAPES=${SHAPES:-"8192:2048:0 8192:2048:0.75 8192:256:0.75 32768:2048:0.75 32768:256:0.75"}
for s in $SHAPES; do
  IFS=: read -r T K SH <<<"$s"
  "$B/backward_profile" "$T" 32 8 128 "$K" 3 "${SH:-0}" >>"$OUT/backward_profile.txt" 2>&1
  if command -v nsys >/dev/null; then
    nsys profile -o "$B/nsys_${T}_${K}" --force-overwrite true "$B/backward_profile" "$T" 32 8 128 "$K" 1 "${SH:-0}" \
      >/dev/null 2>&1 &&
      nsys stats -q --report cuda_gpu_kern_sum --format csv "$B/nsys_${T}_${K}.nsys-rep" >"$OUT/nsys_${T}_${K}.txt" 2>&1
  fi
done
# the dense peer a user would pick, at the same token counts, in the same call
TOKENS=$(for s in $SHAPES; do echo "${s%%:*}"; done | sort -un | tr '\n' ' ')
python3 bench/gpu/flash_peer.py --tokens $TOKENS >>"$OUT/backward_profile.txt" 2>&1 ||
  echo "flash peer: not run (python3 with torch and a GPU needed)" >>"$OUT/backward_profile.txt"
IFS=: read -r T K SH <<<"${NCU_SHAPE:-8192:2048:0.75}"
if [ "${NCU:-1}" != 0 ] && command -v ncu >/dev/null; then
  for kern in ${NCU_KERNELS:-backward_query_kernel backward_key_kernel ^tile_kernel forward_tile_kernel}; do
    timeout 150 ncu --kernel-name regex:"$kern" --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
      --section SchedulerStats "$B/backward_profile" "$T" 32 8 128 "$K" 0 \
      "${SH:-0}" >"$OUT/ncu_${kern#^}.txt" 2>&1
  done
fi
cat "$OUT/backward_profile.txt"

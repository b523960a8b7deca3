#!/usr/bin/env bash
# keysel beside the engines' kernels in one device call (docs/performance.md, "DSA-native selection"):
# ../shared/peers' run.sh builds and times DeepGEMM, FlashMLA and SGLang's top-k, then bench/gpu/dsa_peers.py times
# keysel's DSA entry points on the same shapes in one process with DeepGEMM and SGLang loaded, and checks keysel's
# outputs against theirs. keysel's Python module must be built first (bench/gpu/run.sh build python, same machine).
# Run from the repository root with .peers carried (MIRROR=... bash ../shared/peers/prepare.sh fills it).
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
W=${PEERS_WORK:-/tmp/peers}
mkdir -p "$OUT"
PYTHONUNBUFFERED=1 OUT=$OUT PEERS_WORK=$W bash .peers/scripts/run.sh >"$OUT/peers-run.txt" 2>&1
echo "peers run.sh rc=$?"
grep -E "DeepGEMM used|rc=" "$OUT/peers-run.txt" | head -20
STDCXX=$(ldconfig -p 2>/dev/null | awk '/libstdc\+\+\.so\.6 .*x86-64/ {print $NF; exit}')
STDCXX=${STDCXX:-/lib/x86_64-linux-gnu/libstdc++.so.6}
jit=$(ls -d "$W"/jit-* 2>/dev/null | head -1)
env LD_PRELOAD="$STDCXX" DG_JIT_CACHE_DIR="${jit:-$W/dg-jit}" PYTHONUNBUFFERED=1 \
  PYTHONPATH="$W/DeepGEMM:$W/FlashMLA:$W/sgl:$PWD/${BUILD_DIR:-build-gpu}/python" \
  timeout 280 python3 -X faulthandler bench/gpu/dsa_peers.py --json "$OUT/keysel-peers.jsonl" >"$OUT/keysel-peers.txt" 2>&1
echo "dsa_peers rc=$?"
grep -vE '^\{' "$OUT/keysel-peers.txt" | tail -n 70

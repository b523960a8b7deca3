#!/usr/bin/env bash
# Nsight Compute on keysel's DSA and sparse MLA kernels for the rows of docs/performance.md's "DSA-native selection"
# table whose goal is not met: paged logits B=1 and B=64, topk_rows B=1 and B=64, select_topk_paged B=1, indexer
# prefill 1024 x 8192 (both keysel paths, one row each: keysel.compat.deep_gemm.fp8_mqa_logits, the ragged path,
# and indexer_logits_cuda over pages), sparse MLA decode B=64 (h_q 128 and 64) and prefill. One ncu run per row
# over bench/gpu/dsa_peers.py --profile (keysel's calls only, three each, untimed; no peers needed) or
# bench/gpu/mla_profile.py (two keysel.sparse_mla calls), then a compact
# summary per kernel: duration, achieved occupancy, DRAM / L2 / SM throughput (% of peak), tensor pipes, the top
# stall reasons.
#
#   bash bench/gpu/run.sh build python     # keysel's module into build-gpu/python (same machine)
#   bash bench/gpu/dsa_profile.sh          # -> $OUT/dsa-profile.txt (+ $OUT/dsa-profile-<row>.csv raw metrics)
#   ONLY="paged_logits_B64 topk_rows_B64" bash bench/gpu/dsa_profile.sh   # a subset of the rows below
#
# SET=full chooses ncu's --set instead of the sections below (more replay passes). Sized to finish in about five
# minutes (ten ncu runs of at most 12 short kernels; each run is cut at 100 s).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
BUILD=${BUILD_DIR:-build-gpu}
export PYTHONPATH="$PWD/$BUILD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${SET:-}" ]; then
  WHAT=(--set "$SET")
else
  WHAT=(--section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats
        --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis)
fi
KERNELS='regex:indexer_logits|topk_rows|segment_'
MLA_KERNELS='regex:sparse_mla'
# row: the script and its arguments (dsa_peers.py --profile runs keysel's calls only; mla_profile.py one
# keysel.sparse_mla call on the FlashMLA peer shapes, the default kernel for the GPU unless KEYSEL_MLA_KERNEL says)
declare -A ROWS=(
  [paged_logits_B1]="bench/gpu/dsa_peers.py --only decode --batches 1 --profile paged"
  [paged_logits_B64]="bench/gpu/dsa_peers.py --only decode --batches 64 --profile paged"
  [select_topk_paged_B1]="bench/gpu/dsa_peers.py --only decode --batches 1 --profile fused"
  [topk_rows_B1]="bench/gpu/dsa_peers.py --only topk --batches 1 --profile topk"
  [topk_rows_B64]="bench/gpu/dsa_peers.py --only topk --batches 64 --profile topk"
  [indexer_prefill_ragged_1024x8192]="bench/gpu/dsa_peers.py --only prefill --profile prefill"
  [indexer_prefill_pages_1024x8192]="bench/gpu/dsa_peers.py --only prefill --profile prefill_pages"
  [mla_decode_B64_h128]="bench/gpu/mla_profile.py --batch 64 --heads 128"
  [mla_decode_B64_h64]="bench/gpu/mla_profile.py --batch 64 --heads 64"
  [mla_prefill_1024x32768_h128]="bench/gpu/mla_profile.py --prefill"
)
ALL="paged_logits_B1 paged_logits_B64 select_topk_paged_B1 topk_rows_B1 topk_rows_B64 indexer_prefill_ragged_1024x8192 indexer_prefill_pages_1024x8192 mla_decode_B64_h128 mla_decode_B64_h64 mla_prefill_1024x32768_h128"
# ONLY="row row ..." profiles a subset (default: every row).
: >"$OUT/dsa-profile.log"
for row in ${ONLY:-$ALL}; do
  [ -n "${ROWS[$row]:-}" ] || { echo "dsa_profile.sh: unknown row $row (rows: $ALL)" >&2; exit 2; }
  start=$SECONDS
  kernels=$KERNELS
  case $row in mla_*) kernels=$MLA_KERNELS ;; esac
  # --cache-control none: each kernel sees the L2 its predecessor left (a fused chain reads its logits from L2,
  # as outside the profiler); --clock-control none: the clocks the benchmarks run at.
  # shellcheck disable=SC2086
  timeout 100 ncu --clock-control none --cache-control none -k "$kernels" -c 12 "${WHAT[@]}" --csv --page raw \
    python3 ${ROWS[$row]} >"$OUT/dsa-profile-$row.csv" 2>>"$OUT/dsa-profile.log"
  echo "$row: ncu rc=$? ($((SECONDS - start)) s)" | tee -a "$OUT/dsa-profile.log"
done
python3 - "$OUT" ${ONLY:-$ALL} <<'EOF' | tee "$OUT/dsa-profile.txt"
"""Compact per-kernel summary of the raw ncu CSVs (the last of each row's launches of a kernel: warm caches)."""
import csv
import io
import re
import sys

out = sys.argv[1]
ROWS = sys.argv[2:]
PICK = [  # (label, candidate metric names, first present wins)
    ("duration us", ["gpu__time_duration.sum"]),
    ("achieved occupancy %", ["sm__warps_active.avg.pct_of_peak_sustained_active"]),
    ("DRAM throughput %", ["gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed",
                           "dram__throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("L2 throughput %", ["lts__throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("SM throughput %", ["sm__throughput.avg.pct_of_peak_sustained_elapsed"]),
    ("issue slots busy %", ["sm__inst_issued.avg.pct_of_peak_sustained_active"]),
    ("registers/thread", ["launch__registers_per_thread"]),
    ("grid", ["launch__grid_size"]),
    ("block", ["launch__block_size"]),
]
# The tensor pipes ComputeWorkloadAnalysis collects (names differ between GPUs and ncu versions: all are shown).
TENSOR = re.compile(r"sm__(pipe_tensor\w*_cycles_active|inst_executed_pipe_tensor\w*)\.avg\.pct_of_peak_sustained_active$")
# Stall reasons: WarpStateStats' cycles per issued instruction, else the sampled warp states (SourceCounters).
STALL = re.compile(r"smsp__average_warp_latency_issue_stalled_(\w+)\.ratio$|"
                   r"smsp__average_warps_issue_stalled_(\w+)_per_issue_active\.ratio$")
SAMPLED = re.compile(r"smsp__pcsamp_warps_issue_stalled_(\w+)$")


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


for row in ROWS:
    print(f"==== {row}")
    try:
        text = open(f"{out}/dsa-profile-{row}.csv", encoding="utf-8", errors="replace").read()
    except OSError as error:
        print(f"  no data: {error}")
        continue
    start = text.find('"ID"')
    if start < 0:
        print("  no kernels profiled (see dsa-profile.log and the CSV)")
        continue
    table = list(csv.reader(io.StringIO(text[start:])))
    header, rows = table[0], table[1:]
    units = rows[0] if rows and rows[0] and rows[0][0] == "" else None
    rows = [r for r in rows if r and r[0] != ""]
    col = {name: i for i, name in enumerate(header)}
    last = {}
    for r in rows:
        last[r[col["Kernel Name"]] if "Kernel Name" in col else r[4]] = r
    for kernel, r in last.items():
        print(f"  {kernel[:150]}")
        parts = []
        for label, names in PICK:
            for name in names:
                if name in col:
                    value = r[col[name]]
                    if name == "gpu__time_duration.sum" and units is not None:
                        unit = units[col[name]]
                        v = number(value)
                        if v is not None:
                            value = f"{v / 1000.0:.2f}" if unit == "nsecond" else f"{v:.2f}" if unit == "usecond" \
                                else f"{v * 1000.0:.2f}" if unit == "msecond" else f"{value} {unit}"
                    parts.append(f"{label} {value}")
                    break
            else:
                parts.append(f"{label} n/a")
        print("    " + "; ".join(parts))
        tensor = [f"{m.group(1)} {r[i]}" for name, i in col.items() if (m := TENSOR.match(name))]
        print("    tensor pipes % of peak: " + (", ".join(tensor) if tensor else "n/a"))
        stalls = []
        for name, i in col.items():
            m = STALL.match(name)
            v = number(r[i]) if m else None
            if m and v is not None:
                stalls.append((v, m.group(1) or m.group(2)))
        unit = "cycles per issued instruction"
        if not stalls:
            unit = "warp samples"
            for name, i in col.items():
                m = SAMPLED.match(name)
                v = number(r[i]) if m and not m.group(1).endswith("not_issued") else None
                if v is not None:
                    stalls.append((v, m.group(1)))
        stalls.sort(reverse=True)
        total = sum(v for v, _ in stalls) or 1.0
        print(f"    top stalls ({unit}): " +
              (", ".join(f"{reason} {v:.2f} ({100 * v / total:.0f}%)" for v, reason in stalls[:5]) or "n/a"))
EOF

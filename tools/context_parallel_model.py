"""The cost model of docs/context-parallel.md: bytes each rank receives and a latency estimate per decode step
for context-parallel selection (keysel/indexer/context_parallel.h) at 1M-16M tokens on 8-64 GPUs. No dependencies.

    python3 tools/context_parallel_model.py [--k 2048] [--batch 1] [--alpha-us 12] [--link-gbps 150]

Model (per decode step of `batch` sequences, one query row each, per-token selection):
  indexer scan      N / R tokens x 132 bytes (fp8 DI=128 + scale) per rank at `hbm-gbps`
  all_gather        one collective; every rank receives R x k x 8 bytes (score, position) per row
  threshold         three collectives: R x ceil(k / R) candidates, R counts, R x max_count candidates per row
                    (max_count ~ (k / R) x (1 + slack) on balanced round-robin shards)
  attention merge   all_gather of the partial outputs (what the simulation does): R x h_q x (d_v + 1) x 4 bytes
                    received per row; or all-reduce (max of lse, then the sum of exp(lse_r - max) (o_r, 1)):
                    about 2 x h_q x (d_v + 1) x 4 bytes per row whatever R, two collectives
  collective time   alpha x log2(R) + bytes_received / link bandwidth (a tree/ring latency term plus volume)
"""

import argparse
import math


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--dv", type=int, default=512)
    ap.add_argument("--alpha-us", type=float, default=12.0, help="latency of one small collective step")
    ap.add_argument("--link-gbps", type=float, default=150.0, help="per-GPU collective bandwidth (GB/s)")
    ap.add_argument("--hbm-gbps", type=float, default=3300.0, help="achieved HBM read bandwidth (GB/s)")
    ap.add_argument("--slack", type=float, default=0.25, help="threshold round 2: extra over k / R per rank")
    a = ap.parse_args()
    print(f"k={a.k} batch={a.batch} h_q={a.heads} d_v={a.dv} alpha={a.alpha_us} us link={a.link_gbps} GB/s "
          f"hbm={a.hbm_gbps} GB/s")
    print("| N | GPUs | indexer scan per GPU (us) | top-k all_gather: KiB, us | top-k threshold: KiB, us "
          "| merge all_gather (us) | merge all-reduce (us) | best communication / scan |")
    print("|---|---|---|---|---|---|---|---|")
    for n in (1 << 20, 1 << 22, 1 << 24):
        for r in (8, 16, 32, 64):
            scan_us = a.batch * (n / r) * 132 / (a.hbm_gbps * 1e3)
            per_row_ag = r * a.k * 8
            m = math.ceil(a.k / r)
            most = math.ceil(a.k / r * (1 + a.slack))
            per_row_th = r * m * 8 + r * 4 + r * most * 8
            step = a.alpha_us * max(1.0, math.log2(r))

            def t(received_bytes, collectives):
                return collectives * step + received_bytes / (a.link_gbps * 1e3)

            ag_bytes, th_bytes = a.batch * per_row_ag, a.batch * per_row_th
            partial = a.batch * a.heads * (a.dv + 1) * 4
            ag_us, th_us = t(ag_bytes, 1), t(th_bytes, 3)
            merge_gather_us, merge_reduce_us = t(r * partial, 1), t(2 * partial, 2)
            best = min(ag_us, th_us) + min(merge_gather_us, merge_reduce_us)
            print(f"| {n >> 20}M | {r} | {scan_us:.1f} | {ag_bytes / 1024:.0f}, {ag_us:.1f} | "
                  f"{th_bytes / 1024:.0f}, {th_us:.1f} | {merge_gather_us:.1f} | {merge_reduce_us:.1f} | "
                  f"{best / scan_us:.2f} |")


if __name__ == "__main__":
    main()

"""Where an eager Python call of keysel's DSA ops spends its host time (docs/performance.md, per-call overhead).

    PYTHONPATH=<keysel build>/python python3 bench/gpu/call_overhead.py [--calls 2000]

For B=1 decode shapes (N = 131072, HI = 64, DI = 128, k = 2048) it prints, per op: the host time per call (calls
issued back to back, no synchronisation: what the CPU spends before the GPU has work), the wall time per call with
the GPU in the loop, and a cProfile of the host calls (the functions with the most own time), beside a torch op of
the same arity as the floor a Python caller pays anyway.
"""

import argparse
import cProfile
import io
import pstats
import time

import torch

import keysel

N, HEADS, DIM, BLOCK, K = 131072, 64, 128, 64, 2048


def host_and_wall(fn, calls):
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - start) / calls
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / calls
    return host * 1e6, wall * 1e6


def profile(fn, calls, top):
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    blocks = N // BLOCK
    cache = torch.randint(0, 256, (blocks, BLOCK * (DIM + 4)), dtype=torch.uint8, device="cuda")
    cache[:, BLOCK * DIM:].view(torch.float32).uniform_(0.005, 0.02)
    cache = cache.view(blocks, BLOCK, 1, DIM + 4)
    q = torch.randint(0, 120, (1, 1, HEADS, DIM), dtype=torch.uint8, device="cuda").view(torch.float8_e4m3fn)
    weights = torch.rand(1, HEADS, device="cuda") * 0.1
    lens = torch.full((1, 1), N, dtype=torch.int32, device="cuda")
    table = torch.arange(blocks, dtype=torch.int32, device="cuda").view(1, blocks)
    logits = torch.empty(1, N, device="cuda")
    scores = torch.randn(1, N, device="cuda")
    lens1 = torch.full((1,), N, dtype=torch.int32, device="cuda")
    chosen = torch.empty(1, K, dtype=torch.int32, device="cuda")
    a, b = torch.randn(1, N, device="cuda"), torch.randn(1, N, device="cuda")

    ops = {
        "torch.add(a, b, out=) (floor)": lambda: torch.add(a, b, out=logits),
        "keysel.paged_mqa_logits": lambda: keysel.paged_mqa_logits(q, weights, cache, table, lens, N, out=logits),
        "keysel.topk_rows": lambda: keysel.topk_rows(scores, K, lengths=lens1, out=chosen),
    }
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.calls} calls each")
    for name, fn in ops.items():
        try:
            host, wall = host_and_wall(fn, args.calls)
        except Exception as exc:  # noqa: BLE001 - an op this build lacks is reported, the others still run
            print(f"{name}: {exc!r}")
            continue
        print(f"{name}: host {host:.1f} us/call, wall {wall:.1f} us/call")
    for name in ("keysel.paged_mqa_logits", "keysel.topk_rows"):
        try:
            print(f"\n## cProfile of {name}, {args.calls} calls, by own time\n" + profile(ops[name], args.calls,
                                                                                         args.top))
        except Exception as exc:  # noqa: BLE001
            print(f"{name}: {exc!r}")


if __name__ == "__main__":
    main()

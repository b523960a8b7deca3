"""CPU time of the backward of attention over a selection (docs/training.md, docs/SPEC.md §9) against the masked
dense baseline a PyTorch user would otherwise write.

    PYTHONPATH=build-cpu/python .venv/bin/python bench/attention_backward.py [--tokens 1024] [--k 64 256]

One causal prefill of T = N tokens, Hq query heads over Hkv key heads (GQA), the exact top-k per_kv_head
selection (computed once, outside the timings). Timed, median of --repeat runs after one warm-up:
  keysel backward      keysel.sparse_attention_backward (the fp32 CPU kernel; out and lse from the forward)
  keysel fwd+bwd       keysel.torch.sparse_attention forward and autograd backward
  dense masked fwd+bwd torch float32: scores [T, Hq, N] masked to -inf outside the selection, softmax, @ V,
                       autograd backward
Both sides use the same number of threads (torch.set_num_threads = keysel.num_threads()).
"""
import argparse
import math
import statistics
import time

import torch

import keysel
import keysel.torch as kt


def median_seconds(fn, repeat):
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_masked(q, k, v, mask, scale):
    """q [T, Hq, D], k/v [N, Hkv, D], mask bool [T, Hq, N] -> out [T, Hq, Dv]."""
    g = q.shape[1] // k.shape[1]
    kh = k.repeat_interleave(g, dim=1)
    vh = v.repeat_interleave(g, dim=1)
    scores = torch.einsum("thd,nhd->thn", q, kh) * scale
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.einsum("thn,nhd->thd", p, vh)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--heads", type=int, nargs=2, default=(8, 2), metavar=("HQ", "HKV"))
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, nargs="+", default=(64, 256))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(keysel.num_threads())
    t = n = args.tokens
    hq, hkv = args.heads
    d = args.dim
    scale = 1.0 / math.sqrt(d)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(t, hq, d, generator=g)
    k = torch.randn(n, hkv, d, generator=g)
    v = torch.randn(n, hkv, d, generator=g)
    grad = torch.randn(t, hq, d, generator=g)
    positions = torch.arange(t, dtype=torch.int32)
    print(f"T = N = {t}, Hq = {hq}, Hkv = {hkv}, D = Dv = {d}, per_kv_head, float32, threads = "
          f"{keysel.num_threads()}, simd = {keysel.simd_level()}")
    print(f"{'k':>6} {'keysel backward':>16} {'keysel fwd+bwd':>15} {'dense masked fwd+bwd':>21} {'speed-up':>9}")
    for top in args.k:
        sel = kt.exact_topk(q, k, positions, top, granularity="per_kv_head", scale=scale)
        out, lse = keysel.sparse_attention(q, k, v, sel, granularity="per_kv_head", scale=scale)
        backward = median_seconds(lambda: keysel.sparse_attention_backward(
            q, k, v, sel, out, lse, grad, granularity="per_kv_head", scale=scale), args.repeat)

        def sparse_step():
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            o, _ = kt.sparse_attention(*leaves, sel, granularity="per_kv_head", scale=scale)
            o.backward(grad)

        mask = torch.zeros(t, hq, n + 1, dtype=torch.bool)
        heads = torch.arange(hq) // (hq // hkv)
        rows = sel.to(torch.int64)[:, heads, :]
        mask.scatter_(2, torch.where(rows >= 0, rows, torch.full_like(rows, n)), True)
        mask = mask[:, :, :n].contiguous()

        def dense_step():
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
            dense_masked(*leaves, mask, scale).backward(grad)

        sparse = median_seconds(sparse_step, args.repeat)
        dense = median_seconds(dense_step, args.repeat)
        print(f"{top:>6} {backward * 1e3:>13.1f} ms {sparse * 1e3:>12.1f} ms {dense * 1e3:>18.1f} ms "
              f"{dense / sparse:>8.1f}x")


if __name__ == "__main__":
    main()

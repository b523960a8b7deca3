"""PyTorch peers of keysel's CUDA kernels, timed with CUDA events in the same run as bench_gpu.

  python3 bench/gpu/torch_peers.py        one line per case: name, median microseconds, bytes, GB/s

Peers: the HBM copy bandwidth; the Lightning Indexer as bmm + ReLU + weighted head sum (bf16, as a framework
composite would run it), decode and causal prefill; torch.topk; gather + scaled_dot_product_attention for sparse
attention decode.
"""
import torch
import torch.nn.functional as F


def time_us(fn, iterations=50, reps=7):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iterations):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(1000.0 * start.elapsed_time(stop) / iterations)
    samples.sort()
    return samples[len(samples) // 2]


def report(name, us, nbytes):
    print(f"{name:<58} {us:10.2f} us {nbytes:12.0f} bytes {nbytes / (us * 1e3):9.1f} GB/s", flush=True)


def copy_bandwidth():
    a = torch.randn(1 << 28, device="cuda")  # 1 GiB
    b = torch.empty_like(a)
    us = time_us(lambda: b.copy_(a), iterations=10)
    report("torch hbm_copy 1 GiB (read + write)", us, 2.0 * a.numel() * 4)


def indexer(batch, n, heads=64, dim=128):
    # Rotate over copies so that the keys do not sit in L2.
    copies = max(1, (256 << 20) // (batch * n * dim * 2))
    keys = [torch.randn(batch, n, dim, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
    q = torch.randn(batch, heads, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(batch, heads, 1, device="cuda", dtype=torch.float32)
    scale = torch.rand(batch, n, device="cuda") * 0.01
    state = {"i": 0}

    def run():
        k = keys[state["i"] % copies]
        state["i"] += 1
        logits = torch.bmm(q, k.transpose(1, 2)).relu_()  # [B, HI, N]
        return (logits.float() * w).sum(dim=1) * scale

    us = time_us(run)
    report(f"torch indexer bmm+relu+sum bf16 B={batch} N={n} HI={heads} DI={dim} (bf16 key bytes)", us,
           batch * n * dim * 2)


def indexer_prefill(rows=1024, n=8192, heads=64, dim=128):
    # The last `rows` query tokens of one sequence of n keys, causal; flops as in bench_gpu.
    q = torch.randn(rows * heads, dim, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(rows, heads, 1, device="cuda", dtype=torch.float32)
    scale = torch.rand(n, device="cuda") * 0.01
    pos = torch.arange(n - rows, n, device="cuda")
    masked = torch.arange(n, device="cuda")[None, :] > pos[:, None]

    def run():
        logits = torch.matmul(q, k.t()).view(rows, heads, n).relu_()
        out = (logits.float() * w).sum(dim=1) * scale
        return out.masked_fill_(masked, float("-inf"))

    us = time_us(run, iterations=10)
    flops = float(sum((n - rows + r + 1) for r in range(rows))) * heads * dim * 2
    print(f"{'torch indexer prefill bf16 matmul+relu+sum R=%d N=%d HI=%d DI=%d (causal MMA flops)' % (rows, n, heads, dim):<58} "
          f"{us:10.2f} us {flops:12.3g} flops {flops / (us * 1e6):9.1f} TFLOP/s", flush=True)


def topk(batch, n, k):
    scores = torch.rand(batch, n, device="cuda") * 10
    us = time_us(lambda: torch.topk(scores, k, dim=-1))
    report(f"torch.topk k={k} B={batch} N={n} (score bytes)", us, batch * n * 4)


def sparse_attention(batch=64, hq=32, hkv=8, dim=128, k=2048, n=16384):
    kc = torch.randn(batch, hkv, n, dim, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn(batch, hkv, n, dim, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(batch, hkv, hq // hkv, dim, device="cuda", dtype=torch.bfloat16)
    idx = torch.argsort(torch.rand(batch, hkv, n, device="cuda"), dim=-1)[..., :k].sort(dim=-1).values
    gather_idx = idx.unsqueeze(-1).expand(batch, hkv, k, dim)

    def run():
        ks = torch.gather(kc, 2, gather_idx)
        vs = torch.gather(vc, 2, gather_idx)
        return F.scaled_dot_product_attention(q, ks, vs)

    us = time_us(run, iterations=20)
    report(f"torch gather+sdpa B={batch} Hq={hq} Hkv={hkv} D={dim} k={k} (K+V bytes)", us,
           batch * hkv * k * 2 * dim * 2)


def main():
    print(f"# torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    copy_bandwidth()
    indexer(1, 131072)
    indexer(64, 131072)
    indexer_prefill()
    topk(1, 131072, 2048)
    topk(64, 131072, 2048)
    topk(1, 1 << 20, 2048)
    sparse_attention()


if __name__ == "__main__":
    main()

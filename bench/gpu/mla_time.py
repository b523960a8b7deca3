"""keysel.sparse_mla alone on the FlashMLA peer shapes (quick numbers without the peers' build; the side-by-side
comparison is bench/gpu/dsa_peers.py): CUDA-graph replay time of 20 calls (prefill: 3), averaged, per shape; each
shape times the portable and the sm_90a wgmma kernel and prints how far their outputs differ.
    PYTHONPATH=<build>/python python3 bench/gpu/mla_time.py"""

import os

import torch

import keysel

# Both sparse MLA kernels on every shape (KEYSEL_MLA_KERNEL; off an sm_90a build or GPU, "wgmma" runs the portable
# kernel too); MLA_KERNELS=portable (or wgmma) times one.
KERNELS = os.environ.get("MLA_KERNELS", "portable,wgmma").split(",")


def graph_us(call, calls=20, samples=5):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            call()
    best = float("inf")
    for _ in range(samples):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) * 1000.0 / calls)
    return best


def decode(batch, heads, topk=2048, seq=16384, block=64):
    blocks = batch * seq // block
    kv = torch.randint(0, 256, (blocks, block, 656), dtype=torch.uint8, device="cuda")
    kv[..., :512] &= 0x77
    kv[..., 512:528].view(torch.float32).uniform_(0.02, 0.05)
    kv[..., 528:].view(torch.bfloat16).normal_(0.0, 0.5)
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(batch, -1)
    pos = torch.argsort(torch.rand(batch, seq, device="cuda"), dim=1)[:, :topk].sort(dim=1).values.int()
    idx = (table.gather(1, (pos // block).long()) * block + pos % block).int()
    q = (torch.randn(batch, heads, 576, device="cuda") * 0.5).to(torch.bfloat16)
    ws = torch.empty(max(16, keysel.sparse_mla_workspace_bytes(batch, heads, topk)), dtype=torch.uint8, device="cuda")
    flops = 2.0 * batch * heads * topk * (576 + 512)
    results = {}
    for kernel in KERNELS:
        os.environ["KEYSEL_MLA_KERNEL"] = kernel  # read at each call, so also when the graph is captured
        out = torch.empty(batch, heads, 512, dtype=torch.bfloat16, device="cuda")
        lse, top = torch.empty(batch, heads, device="cuda"), torch.empty(batch, heads, device="cuda")
        us = graph_us(lambda: keysel.sparse_mla(q, kv, idx, out=out, lse=lse, max_logits=top, workspace=ws))
        results[kernel] = (out.float(), lse.clone())
        print(f"keysel sparse_mla decode B={batch} h_q={heads} topk={topk} fp8 V3.2 {kernel:>8}: {us:8.1f} us  "
              f"{flops / us / 1e6:6.0f} TFLOP/s  {batch * topk * 656 / us / 1e3:6.0f} GB/s gathered", flush=True)
    compare(results)


def compare(results):
    """How far the two kernels' outputs (out, lse) differ, where both ran."""
    if len(results) == 2:
        (a, lse_a), (b, lse_b) = results["wgmma"], results["portable"]
        rel = ((a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-30)).max().item()
        print(f"    wgmma vs portable: max per-row relative difference {rel:.2e}, "
              f"max |lse difference| {(lse_a - lse_b).abs().max().item():.2e}, "
              f"finite {bool(torch.isfinite(a).all())}", flush=True)
    os.environ.pop("KEYSEL_MLA_KERNEL", None)


def prefill(s_q=1024, s_kv=32768, heads=128, topk=2048):
    q = (torch.randn(s_q, heads, 576, device="cuda") * 0.5).to(torch.bfloat16)
    kv = (torch.randn(s_kv, 576, device="cuda") * 0.5).to(torch.bfloat16)
    idx = torch.argsort(torch.rand(s_q, s_kv, device="cuda"), dim=1)[:, :topk].int()
    flops = 2.0 * s_q * heads * topk * (576 + 512)
    results = {}
    for kernel in KERNELS:
        os.environ["KEYSEL_MLA_KERNEL"] = kernel
        out = torch.empty(s_q, heads, 512, dtype=torch.bfloat16, device="cuda")
        lse, top = torch.empty(s_q, heads, device="cuda"), torch.empty(s_q, heads, device="cuda")
        us = graph_us(lambda: keysel.sparse_mla(q, kv, idx, out=out, lse=lse, max_logits=top), calls=3, samples=3)
        results[kernel] = (out.float(), lse.clone())
        print(f"keysel sparse_mla prefill s_q={s_q} s_kv={s_kv} h_q={heads} topk={topk} bf16 {kernel:>8}: "
              f"{us:8.1f} us  {flops / us / 1e6:6.0f} TFLOP/s", flush=True)
    compare(results)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), flush=True)
    for b, h in ((64, 128), (64, 64), (1, 128), (8, 128)):
        decode(b, h)
    prefill()

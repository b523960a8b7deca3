"""The dense peer of bench/gpu/backward_profile.sh: PyTorch's flash attention forward + backward on a causal prefill
of T tokens (bf16, Hq query heads, K/V heads expanded from Hkv beforehand, outside the timing), CUDA events,
median of --repeat after two warm-ups. Needs only torch.

    python3 bench/gpu/flash_peer.py --tokens 8192 32768 [--heads 32 --kv-heads 8 --dim 128 --repeat 3]
"""
import argparse
import statistics

import torch
import torch.nn.functional as F


def cuda_ms(fn, repeat):
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    g = args.heads // args.kv_heads
    for t in args.tokens:
        gen = torch.Generator(device="cuda").manual_seed(t)
        q = torch.randn((1, args.heads, t, args.dim), device="cuda", dtype=torch.bfloat16, generator=gen)
        k = torch.randn((1, args.kv_heads, t, args.dim), device="cuda", dtype=torch.bfloat16, generator=gen)
        v = torch.randn((1, args.kv_heads, t, args.dim), device="cuda", dtype=torch.bfloat16, generator=gen)
        k = k.repeat_interleave(g, dim=1).requires_grad_()
        v = v.repeat_interleave(g, dim=1).requires_grad_()
        q.requires_grad_()
        grad = torch.randn_like(q)

        def forward():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        def both():
            out = forward()
            out.backward(grad)

        with torch.no_grad():
            fwd = cuda_ms(forward, args.repeat)
        total = cuda_ms(both, args.repeat)
        print(f"flash T={t} Hq={args.heads} Hkv={args.kv_heads} D={args.dim}: forward {fwd:.2f} ms, "
              f"forward + backward {total:.2f} ms ({torch.cuda.get_device_name()}, torch {torch.__version__})")
        del q, k, v, grad
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

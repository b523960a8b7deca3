"""GPU time of attention over a selection, forward + backward (docs/training.md, issue goal: at k/N <= 1/16 faster
than dense flash attention's forward + backward), beside the peers a PyTorch user would pick.

    PYTHONPATH=build-gpu/python python3 bench/gpu/attention_backward_gpu.py [--tokens 32768 8192] [--k 2048 256]
        [--json results.jsonl]

One causal prefill of T = N tokens (bfloat16), Hq query heads over Hkv key heads (GQA), head dim D = Dv. The
selection (per_kv_head, k keys per row and key head, every allowed key when fewer than k) is drawn once, outside
the timings: k distinct random keys at or before each row's position (random keys are the worst case for the
cache hit rate; an exact top-k selection clusters more). Timed with CUDA events, median of --repeat runs after
two warm-ups:
  keysel fwd+bwd      keysel.torch.sparse_attention (keysel's CUDA forward kernel over the one-page cache view,
                      then its deterministic CUDA backward kernel) with autograd
  keysel bwd          the backward kernel alone (keysel.sparse_attention_backward)
  flash fwd+bwd       torch scaled_dot_product_attention restricted to the FLASH_ATTENTION backend, is_causal,
                      K/V heads expanded to Hq beforehand (outside the timing), autograd backward
  masked fwd+bwd      dense float32-softmax attention with the selection as a -inf mask, autograd (where it fits)
"""
import argparse
import json
import math
import os

import torch
import torch.nn.functional as F

import keysel
import keysel.torch as kt
from flash_peer import cuda_ms  # the same timing as the flash peer of backward_profile.sh (same folder)


def random_causal_selection(t, groups, k, generator, chunk=512):
    """int32 [T, G, k] on the generator's device: row i holds min(k, i + 1) distinct random keys in [0, i] and -1 in
    its other entries (in no particular order)."""
    device = generator.device
    sel = torch.empty((t, groups, k), dtype=torch.int32, device=device)
    keys = torch.arange(t, device=device)
    for r0 in range(0, t, chunk):
        r1 = min(t, r0 + chunk)
        allowed = keys[None, :] <= torch.arange(r0, r1, device=device)[:, None]          # [rows, N]
        noise = torch.rand((r1 - r0, groups, t), device=device, generator=generator)
        noise = noise.masked_fill(~allowed[:, None, :], -1.0)
        values, index = torch.topk(noise, min(k, t), dim=-1, sorted=False)
        sel[r0:r1, :, :index.shape[-1]] = torch.where(values >= 0, index, torch.full_like(index, -1)).to(torch.int32)
        sel[r0:r1, :, index.shape[-1]:] = -1
    return sel


def selection_mask(selection, n):
    """bool [..., N] from an int selection [..., k]: True at each valid entry. -1 entries go to a spare column N
    (dropped after), so they cannot clear a selected key 0 (the order of scattered writes to one place is
    unspecified)."""
    mask = torch.zeros((*selection.shape[:-1], n + 1), dtype=torch.bool, device=selection.device)
    mask.scatter_(-1, torch.where(selection >= 0, selection, n).long(), True)
    return mask[..., :n]


def masked_dense(q, k, v, selection, scale):
    """[T, Hq, D] attention with float32 softmax over the selection (a -inf mask elsewhere)."""
    g = q.shape[1] // k.shape[1]
    mask = selection_mask(selection, k.shape[0]).repeat_interleave(g, dim=1)            # [T, Hq, N]
    scores = torch.einsum("thd,nhd->htn", q, k.repeat_interleave(g, dim=1)).float() * scale
    p = torch.softmax(scores.masked_fill(~mask.transpose(0, 1), float("-inf")), dim=-1)
    return torch.einsum("htn,nhd->thd", p.to(q.dtype), v.repeat_interleave(g, dim=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[32768, 8192])
    parser.add_argument("--k", type=int, nargs="+", default=[2048, 256])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--masked-max-tokens", type=int, default=8192,
                        help="run the masked dense baseline only up to this T (its scores are [Hq, T, N] fp32)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.cuda.get_device_name()
    print(f"# {device}; torch {torch.__version__}; keysel {keysel.__version__}; Hq={args.heads} Hkv={args.kv_heads}"
          f" D={args.dim} bf16 causal, per_kv_head")
    rows = []
    generator = torch.Generator(device="cuda").manual_seed(1)
    scale = 1.0 / math.sqrt(args.dim)
    for t in args.tokens:
        q = torch.randn((t, args.heads, args.dim), device="cuda", generator=generator).to(torch.bfloat16)
        k = torch.randn((t, args.kv_heads, args.dim), device="cuda", generator=generator).to(torch.bfloat16)
        v = torch.randn((t, args.kv_heads, args.dim), device="cuda", generator=generator).to(torch.bfloat16)
        grad = torch.randn((t, args.heads, args.dim), device="cuda", generator=generator).to(torch.bfloat16)
        g = args.heads // args.kv_heads
        # flash: [1, Hq, T, D] with the key heads expanded (what a user does for GQA on the flash kernel)
        qf = q.transpose(0, 1)[None].contiguous().requires_grad_(True)
        kf = k.repeat_interleave(g, dim=1).transpose(0, 1)[None].contiguous().requires_grad_(True)
        vf = v.repeat_interleave(g, dim=1).transpose(0, 1)[None].contiguous().requires_grad_(True)
        gf = grad.transpose(0, 1)[None].contiguous()

        def flash():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale)
            out.backward(gf)

        def flash_forward():
            with torch.no_grad(), torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                F.scaled_dot_product_attention(qf, kf, vf, is_causal=True, scale=scale)

        flash_ms = cuda_ms(flash, args.repeat)
        flash_fwd_ms = cuda_ms(flash_forward, args.repeat)
        qf.grad = kf.grad = vf.grad = None
        print(f"T=N={t}: flash fwd+bwd {flash_ms:.2f} ms (fwd {flash_fwd_ms:.2f} ms)", flush=True)
        for k_sel in args.k:
            sel = random_causal_selection(t, args.kv_heads, k_sel, generator)
            leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

            def keysel_both():
                out, _ = kt.sparse_attention(*leaves, sel, granularity="per_kv_head", scale=scale)
                out.backward(grad)

            def keysel_forward():
                with torch.no_grad():
                    kt.sparse_attention(q, k, v, sel, granularity="per_kv_head", scale=scale)

            with torch.no_grad():
                out, lse = kt.sparse_attention(q, k, v, sel, granularity="per_kv_head", scale=scale)
            grads = [torch.empty(x.shape, dtype=torch.float32, device="cuda") for x in (q, k, v)]

            def keysel_backward():
                keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad, granularity="per_kv_head",
                                                 scale=scale, grad_q=grads[0], grad_k=grads[1], grad_v=grads[2])

            row = {"tokens": t, "k": k_sel, "k_over_n": k_sel / t, "heads": args.heads, "kv_heads": args.kv_heads,
                   "dim": args.dim, "device": device, "flash_fwd_bwd_ms": flash_ms, "flash_fwd_ms": flash_fwd_ms}
            row["keysel_fwd_bwd_ms"] = cuda_ms(keysel_both, args.repeat)
            row["keysel_fwd_ms"] = cuda_ms(keysel_forward, args.repeat)
            row["keysel_bwd_ms"] = cuda_ms(keysel_backward, args.repeat)
            # agreement of the autograd path with the kernel called directly (same inputs, same selection)
            for x in leaves:
                x.grad = None  # the timed calls added theirs up
            keysel_both()
            row["grad_q_max_diff"] = float((leaves[0].grad.float() - grads[0]).abs().max())
            if t <= args.masked_max_tokens:
                try:
                    mq, mk, mv = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]

                    def masked():
                        masked_dense(mq, mk, mv, sel, scale).backward(grad)

                    row["masked_fwd_bwd_ms"] = cuda_ms(masked, max(1, args.repeat // 2))
                except torch.OutOfMemoryError:
                    row["masked_fwd_bwd_ms"] = None
                torch.cuda.empty_cache()
            row["speedup_vs_flash"] = flash_ms / row["keysel_fwd_bwd_ms"]
            rows.append(row)
            masked_text = (f"{row['masked_fwd_bwd_ms']:.2f} ms" if row.get("masked_fwd_bwd_ms")
                           else "not run (scores do not fit)" if t > args.masked_max_tokens else "out of memory")
            print(f"T=N={t} k={k_sel} (k/N = 1/{t // k_sel}): keysel fwd+bwd {row['keysel_fwd_bwd_ms']:.2f} ms "
                  f"(fwd {row['keysel_fwd_ms']:.2f}, bwd kernel {row['keysel_bwd_ms']:.2f}); flash fwd+bwd "
                  f"{flash_ms:.2f} ms -> {row['speedup_vs_flash']:.2f}x; masked {masked_text}", flush=True)
            del sel, leaves, grads, out, lse
            torch.cuda.empty_cache()
        del q, k, v, grad, qf, kf, vf, gf
        torch.cuda.empty_cache()
    if args.json:
        with open(args.json + ".tmp", "w") as f:  # renamed once whole: a reader never sees part of the rows
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()

"""One keysel.sparse_mla decode call on the FlashMLA peer shape (B=64, h_q=128, topk 2048 of 16384 tokens, fp8 V3.2
cache), for Nsight Compute (bench/gpu/run.sh, stage mla): ncu -k regex:sparse_mla python3 bench/gpu/mla_profile.py
[--batch B] [--heads H] [--prefill]."""

import argparse

import torch

import keysel

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=64)
ap.add_argument("--heads", type=int, default=128)
ap.add_argument("--prefill", action="store_true", help="s_q=1024, s_kv=32768 bf16 latents instead")
args = ap.parse_args()
torch.manual_seed(0)
topk = 2048
if args.prefill:
    q = (torch.randn(1024, args.heads, 576, device="cuda") * 0.5).to(torch.bfloat16)
    kv = (torch.randn(32768, 576, device="cuda") * 0.5).to(torch.bfloat16)
    idx = torch.argsort(torch.rand(1024, 32768, device="cuda"), dim=1)[:, :topk].int()
else:
    seq, block = 16384, 64
    blocks = args.batch * seq // block
    kv = torch.randint(0, 256, (blocks, block, 656), dtype=torch.uint8, device="cuda")
    kv[..., :512] &= 0x77  # finite e4m3 values
    kv[..., 512:528].view(torch.float32).uniform_(0.02, 0.05)
    kv[..., 528:].view(torch.bfloat16).normal_(0.0, 0.5)
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32).view(args.batch, -1)
    pos = torch.argsort(torch.rand(args.batch, seq, device="cuda"), dim=1)[:, :topk].sort(dim=1).values.int()
    idx = (table.gather(1, (pos // block).long()) * block + pos % block).int()
    q = (torch.randn(args.batch, args.heads, 576, device="cuda") * 0.5).to(torch.bfloat16)
out = torch.empty(q.shape[0], args.heads, 512, dtype=torch.bfloat16, device="cuda")
for _ in range(2):
    keysel.sparse_mla(q, kv, idx, out=out)
torch.cuda.synchronize()
print("ok", tuple(out.shape), float(out.float().abs().mean()))

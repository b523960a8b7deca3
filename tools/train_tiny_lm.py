#!/usr/bin/env python3
"""Train keysel's tiny byte-level language model and its Lightning Indexers, and write the files keysel ships.

The model (recall/include/keysel/recall/tiny_lm.h describes it and the weight layout; docs/tiny-lm.md explains
the study it serves): a byte-level GQA decoder, RMSNorm, rotate-half RoPE, SwiGLU, causal attention, plus one
Lightning Indexer per layer (I[t,s] = sum_j w[t,j] ReLU(qI[t,j] . kI[s]), SPEC section 3) over the normed input of
that layer's attention.

Training runs on one GPU in two phases within a wall-clock budget:
  1. the language model, next-byte cross entropy on Python sources already installed on the machine (the
     site-packages of the running interpreter), one package held out for evaluation;
  2. the indexers, with the model frozen: per layer the KL divergence from the mean attention distribution of all
     the layer's query heads to softmax(I) (DeepSeek-V3.2's indexer warm-up objective).

Outputs (in --out):
  model.safetensors   fp16 weights, metadata "format" = "keysel-tiny-lm/1", "config" (JSON), "training" (JSON)
  eval.txt            held-out text (--eval-bytes bytes of the held-out package's sources)
  logits.safetensors  "tokens" I32 [L] (the first L bytes of eval.txt) and "logits" F32 [L, 256]: the model's
                      logits computed in float64 from the fp16 weights; metadata "bpb_eval" = bits per byte of
                      the fp16 weights over eval.txt with full attention in float32, windows of the context length
  dump.safetensors    keysel dump (docs/dumps.md) of the first --dump-tokens bytes of eval.txt: every layer's q, k
                      (after RoPE), v, positions and index_q, index_k (after RoPE), index_w, F16
  train_log.json      what ran: arguments, steps, tokens, losses, held-out bits per byte, indexer recall

Usage (the exact command behind the shipped files is in docs/tiny-lm.md):
  python3 tools/train_tiny_lm.py --out /tmp/tiny_lm --lm-seconds 300 --indexer-seconds 60
Needs torch (CUDA), numpy and safetensors.
"""
import argparse
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

FORMAT = "keysel-tiny-lm/1"


# ----------------------------------------------------------------------------------------------- the model


class Config:
    def __init__(self, **kw):
        self.vocab = 256
        self.d_model = 384
        self.layers = 6
        self.heads = 6
        self.kv_heads = 2
        self.head_dim = 64
        self.ffn_dim = 1024
        self.context = 4096
        self.rope_theta = 10000.0
        self.norm_eps = 1e-5
        self.index_heads = 4
        self.index_dim = 32
        for key, value in kw.items():
            if not hasattr(self, key):
                raise ValueError(f"unknown config key {key}")
            setattr(self, key, value)

    def to_dict(self):
        return dict(self.__dict__)


def rms_norm(x, weight, eps):
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(y.dtype)).to(x.dtype)


def rope_tables(positions, dim, theta, dtype, device):
    """cos, sin [T, dim/2] in float64, then cast: angle = pos * theta^(-2i/dim)."""
    i = torch.arange(dim // 2, dtype=torch.float64, device=device)
    inv_freq = theta ** (-2.0 * i / dim)
    angle = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [..., T, H, dim]: rotate-half pairs (i, i + dim/2)."""
    half = x.shape[-1] // 2
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    x1, x2 = xf[..., :half], xf[..., half:]
    c = cos[:, None, :].to(xf.dtype)
    s = sin[:, None, :].to(xf.dtype)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class Indexer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hi, di = cfg.d_model, cfg.index_heads, cfg.index_dim
        self.index_wq = nn.Linear(d, hi * di, bias=False)
        self.index_wk = nn.Linear(d, di, bias=False)
        self.index_ww = nn.Linear(d, hi, bias=False)
        self.cfg = cfg

    def tensors(self, x, cos, sin):
        """x [B, T, d] (normed attention input) -> qI [B,T,HI,DI], kI [B,T,DI], w [B,T,HI] (qI, kI after RoPE)."""
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.index_wq(x).view(b, t, cfg.index_heads, cfg.index_dim)
        k = self.index_wk(x).view(b, t, 1, cfg.index_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)[:, :, 0]
        w = self.index_ww(x)
        return q, k, w

    def scores(self, x, cos, sin):
        """I [B, T, T] (no mask)."""
        q, k, w = self.tensors(x, cos, sin)
        logits = torch.einsum("bthd,bsd->bhts", q, k)
        return torch.einsum("bhts,bth->bts", F.relu(logits), w)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg.d_model, cfg.head_dim
        self.attn_norm = nn.Parameter(torch.ones(d))
        self.wq = nn.Linear(d, cfg.heads * hd, bias=False)
        self.wk = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.heads * hd, d, bias=False)
        self.mlp_norm = nn.Parameter(torch.ones(d))
        self.w_gate = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.w_up = nn.Linear(d, cfg.ffn_dim, bias=False)
        self.w_down = nn.Linear(cfg.ffn_dim, d, bias=False)
        self.indexer = Indexer(cfg)
        self.cfg = cfg

    def qkv(self, x, cos, sin):
        cfg = self.cfg
        b, t, _ = x.shape
        q = apply_rope(self.wq(x).view(b, t, cfg.heads, cfg.head_dim), cos, sin)
        k = apply_rope(self.wk(x).view(b, t, cfg.kv_heads, cfg.head_dim), cos, sin)
        v = self.wv(x).view(b, t, cfg.kv_heads, cfg.head_dim)
        return q, k, v

    def forward(self, h, cos, sin, exact=False, capture=None):
        cfg = self.cfg
        b, t, _ = h.shape
        x = rms_norm(h, self.attn_norm, cfg.norm_eps)
        q, k, v = self.qkv(x, cos, sin)
        if capture is not None:
            capture.append((x, q, k, v))
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if exact:
            # plain attention (the reference path): softmax(scale q.k) over s <= t, GQA by repeating key heads
            g = cfg.heads // cfg.kv_heads
            kh = kh.repeat_interleave(g, dim=1)
            vh = vh.repeat_interleave(g, dim=1)
            logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
            mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
            logits = logits.masked_fill(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(logits, dim=-1), vh)
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        h = h + self.wo(o.transpose(1, 2).reshape(b, t, cfg.heads * cfg.head_dim))
        x = rms_norm(h, self.mlp_norm, cfg.norm_eps)
        return h + self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class TinyLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.layers)])
        self.final_norm = nn.Parameter(torch.ones(cfg.d_model))
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=std)
                if name.endswith("wo.weight") or name.endswith("w_down.weight"):
                    p.data.mul_(1.0 / math.sqrt(2 * cfg.layers))

    def rope(self, t, device, dtype):
        pos = torch.arange(t, device=device)
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        cos, sin = rope_tables(pos, self.cfg.head_dim, self.cfg.rope_theta, dtype, device)
        ci, si = rope_tables(pos, self.cfg.index_dim, self.cfg.rope_theta, dtype, device)
        return cos, sin, ci, si

    def forward(self, tokens, exact=False, capture=None):
        b, t = tokens.shape
        h = self.embed(tokens)
        cos, sin, _, _ = self.rope(t, tokens.device, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, exact=exact, capture=capture)
        return self.lm_head(rms_norm(h, self.final_norm, self.cfg.norm_eps))


def export_state(model):
    """keysel's tensor names -> fp32 CPU tensors."""
    out = {"embed": model.embed.weight, "final_norm": model.final_norm, "lm_head": model.lm_head.weight}
    for i, layer in enumerate(model.layers):
        p = f"layers.{i}."
        out[p + "attn_norm"] = layer.attn_norm
        out[p + "mlp_norm"] = layer.mlp_norm
        for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
            out[p + name] = getattr(layer, name).weight
        for name in ("index_wq", "index_wk", "index_ww"):
            out[p + name] = getattr(layer.indexer, name).weight
    return {k: v.detach().float().cpu().contiguous() for k, v in out.items()}


def load_state(model, state):
    with torch.no_grad():
        model.embed.weight.copy_(state["embed"])
        model.final_norm.copy_(state["final_norm"])
        model.lm_head.weight.copy_(state["lm_head"])
        for i, layer in enumerate(model.layers):
            p = f"layers.{i}."
            layer.attn_norm.copy_(state[p + "attn_norm"])
            layer.mlp_norm.copy_(state[p + "mlp_norm"])
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
                getattr(layer, name).weight.copy_(state[p + name])
            for name in ("index_wq", "index_wk", "index_ww"):
                getattr(layer.indexer, name).weight.copy_(state[p + name])


# ----------------------------------------------------------------------------------------------- safetensors


def write_safetensors(path, tensors, metadata):
    """tensors: name -> numpy array; metadata: str -> str (the safetensors package's writer)."""
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, path, metadata=metadata)


# ----------------------------------------------------------------------------------------------- data


def site_packages():
    import sysconfig
    return sysconfig.get_paths()["purelib"]


def python_files(root):
    files = []
    for base, dirs, names in os.walk(root):
        dirs.sort()
        for n in sorted(names):
            if n.endswith(".py"):
                files.append(os.path.join(base, n))
    return files


def read_corpus(files, limit, seed):
    files = list(files)
    random.Random(seed).shuffle(files)
    parts, total = [], 0
    for path in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            continue
        if not data:
            continue
        parts.append(data + b"\n\n")
        total += len(data) + 2
        if total >= limit:
            break
    return b"".join(parts)[:limit]


# ----------------------------------------------------------------------------------------------- phases


def log(msg):
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bits_per_byte(model, data, context, device, exact=False, batch=8, autocast=True):
    """Mean -log2 p(next byte) over `data` in non-overlapping windows of `context` bytes (each from an empty
    cache; the first byte of each window is not predicted; a shorter last window is included)."""
    total_bits, total_count = 0.0, 0
    windows = [data[i:i + context] for i in range(0, len(data), context)]
    windows = [w for w in windows if len(w) >= 2]
    model.eval()
    with torch.no_grad():
        for i in range(0, len(windows), batch):
            group = windows[i:i + batch]
            for w in group:  # windows of different lengths: one at a time when lengths differ
                tokens = torch.tensor(np.frombuffer(w, dtype=np.uint8).astype(np.int64), device=device)[None]
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                    logits = model(tokens, exact=exact)
                lp = torch.log_softmax(logits.double(), dim=-1)[0, :-1]
                nll = -lp.gather(-1, tokens[0, 1:, None]).sum().item()
                total_bits += nll / math.log(2)
                total_count += tokens.shape[1] - 1
    return total_bits / total_count


def train_lm(model, data, args, device, info):
    cfg = model.cfg
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "indexer" not in n]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 and "indexer" not in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=True)
    n = data.shape[0]
    t = cfg.context
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    arange = torch.arange(t + 1, device=device)
    start = time.time()
    step_fn = model
    if args.compile:
        try:  # compiles on the first call; its time counts against the budget
            step_fn = torch.compile(model)
            warm = data[:t][None].long().expand(args.batch, t)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                step_fn(warm).float().mean().backward()
            model.zero_grad(set_to_none=True)
            log(f"torch.compile ready after {time.time() - start:.0f}s")
        except Exception as e:  # a compile failure leaves eager mode
            log(f"torch.compile failed ({type(e).__name__}: {e}); eager mode")
            model.zero_grad(set_to_none=True)
            step_fn = model
    step, tokens_seen, losses = 0, 0, []
    model.train()
    while True:
        elapsed = time.time() - start
        if elapsed >= args.lm_seconds:
            break
        frac = elapsed / args.lm_seconds
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        offs = torch.randint(0, n - t - 1, (args.batch,), device=device, generator=gen)
        batch = data[offs[:, None] + arange[None, :]].long()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = step_fn(batch[:, :-1])
        loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += args.batch * t
        if step % 50 == 0 or step == 1:
            lv = loss.item()
            losses.append([step, round(time.time() - start, 1), lv / math.log(2)])
            log(f"lm step {step} t={time.time() - start:.0f}s lr={lr:.2e} loss={lv / math.log(2):.4f} bits/byte "
                f"tok/s={tokens_seen / (time.time() - start):.3g}")
    info["lm"] = {"steps": step, "tokens": tokens_seen, "seconds": round(time.time() - start, 1),
                  "batch": args.batch, "context": t, "lr": args.lr, "losses": losses}


def train_indexers(model, data, args, device, info):
    cfg = model.cfg
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for layer in model.layers:
        for p in layer.indexer.parameters():
            p.requires_grad_(True)
            params.append(p)
    opt = torch.optim.AdamW(params, lr=args.indexer_lr, weight_decay=0.0, betas=(0.9, 0.95))
    t = args.indexer_context
    n = data.shape[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed + 1)
    arange = torch.arange(t, device=device)
    mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    scale = 1.0 / math.sqrt(cfg.head_dim)
    g = cfg.heads // cfg.kv_heads
    start = time.time()
    step, losses = 0, []
    model.eval()
    while time.time() - start < args.indexer_seconds:
        offs = torch.randint(0, n - t, (args.indexer_batch,), device=device, generator=gen)
        tokens = data[offs[:, None] + arange[None, :]].long()
        capture = []
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(tokens, capture=capture)
        _, _, ci, si = model.rope(t, device, torch.float32)
        total = 0.0
        for li, (x, q, k, v) in enumerate(capture):
            with torch.no_grad():
                # target: mean over all query heads of the layer's attention probabilities, fp32
                qf = q.float().transpose(1, 2)                         # [B, Hq, T, D]
                kf = k.float().transpose(1, 2).repeat_interleave(g, 1)  # [B, Hq, T, D]
                logits = torch.matmul(qf, kf.transpose(-1, -2)) * scale
                logits = logits.masked_fill(~mask, float("-inf"))
                pbar = torch.softmax(logits, dim=-1).mean(dim=1)        # [B, T, T]
                del logits
            scores = model.layers[li].indexer.scores(x.float().detach(), ci, si)
            scores = scores.masked_fill(~mask, float("-inf"))
            logp = torch.log_softmax(scores, dim=-1).masked_fill(~mask, 0.0)
            kl = (pbar * (torch.log(pbar.clamp_min(1e-30)) - logp)).sum(-1).mean()
            total = total + kl
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        step += 1
        if step % 20 == 0 or step == 1:
            losses.append([step, round(time.time() - start, 1), total.item() / cfg.layers])
            log(f"indexer step {step} t={time.time() - start:.0f}s mean KL={total.item() / cfg.layers:.4f} nats")
    info["indexer"] = {"steps": step, "seconds": round(time.time() - start, 1), "batch": args.indexer_batch,
                       "context": t, "lr": args.indexer_lr, "losses": losses}


def spec_recall(pbar, selected, k):
    """SPEC section 4 recall of each row (tie-aware): the best overlap of the selection with the exact top-k over
    every tie-break of it, / k. pbar [R, N] (0 where a row may not read), selected [R, W] allowed key indices,
    k <= every row's allowed keys. With pbar_k a row's k-th largest value, the selected keys above pbar_k count,
    and those equal to it count up to the k - |{s : pbar[s] > pbar_k}| slots the keys above it leave."""
    pbar_k = pbar.topk(k, dim=-1).values[:, -1:]
    above_all = (pbar > pbar_k).sum(-1)
    chosen = pbar.gather(-1, selected)
    above = (chosen > pbar_k).sum(-1)
    tied = (chosen == pbar_k).sum(-1)
    return torch.clamp(above + torch.minimum(tied, k - above_all), max=k).double() / k


def indexer_recall(model, data, device, ks=(32, 128, 512)):
    """Mean recall (SPEC section 4) of each layer's indexer top-k against the exact top-k of pbar (all heads),
    positions >= k."""
    cfg = model.cfg
    t = len(data)
    tokens = torch.tensor(np.frombuffer(data, dtype=np.uint8).astype(np.int64), device=device)[None]
    capture = []
    with torch.no_grad():
        model(tokens, exact=True, capture=capture)
        _, _, ci, si = model.rope(t, device, torch.float32)
        mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()
        g = cfg.heads // cfg.kv_heads
        out = {}
        for li, (x, q, k, v) in enumerate(capture):
            qf = q.float().transpose(1, 2)
            kf = k.float().transpose(1, 2).repeat_interleave(g, 1)
            logits = (torch.matmul(qf, kf.transpose(-1, -2)) / math.sqrt(cfg.head_dim)).masked_fill(~mask, -math.inf)
            pbar = torch.softmax(logits, dim=-1).mean(dim=1)[0]
            scores = model.layers[li].indexer.scores(x.float(), ci, si)[0].masked_fill(~mask, -math.inf)
            row = {}
            for kk in ks:
                rows = torch.arange(kk, t, device=device)
                e = pbar[rows].topk(kk, dim=-1).indices
                a = scores[rows].topk(kk, dim=-1).indices
                hit = spec_recall(pbar[rows], a, kk).mean().item()
                mass = pbar[rows].gather(-1, a).sum(-1).mean().item()
                emass = pbar[rows].gather(-1, e).sum(-1).mean().item()
                row[str(kk)] = {"recall": round(hit, 4), "mass": round(mass, 4), "exact_mass": round(emass, 4)}
            out[str(li)] = row
            log(f"layer {li} indexer: {row}")
    return out


# ----------------------------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lm-seconds", type=float, default=300)
    ap.add_argument("--indexer-seconds", type=float, default=60)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--indexer-batch", type=int, default=8)
    ap.add_argument("--indexer-context", type=int, default=2048)
    ap.add_argument("--indexer-lr", type=float, default=3e-3)
    ap.add_argument("--heldout", default="networkx", help="package directory held out for evaluation")
    ap.add_argument("--corpus-bytes", type=int, default=400_000_000)
    ap.add_argument("--eval-bytes", type=int, default=32768)
    ap.add_argument("--logit-tokens", type=int, default=512)
    ap.add_argument("--dump-tokens", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    args = ap.parse_args()

    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    info = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0), "args": vars(args)}
    t0 = time.time()

    root = site_packages()
    heldout_dir = os.path.join(root, args.heldout)
    if not os.path.isdir(heldout_dir):
        raise SystemExit(f"held-out package {heldout_dir} not found")
    all_files = python_files(root)
    train_files = [f for f in all_files if not f.startswith(heldout_dir + os.sep)]
    heldout_files = [f for f in all_files if f.startswith(heldout_dir + os.sep)]
    corpus = read_corpus(train_files, args.corpus_bytes, args.seed)
    heldout = b"".join(open(f, "rb").read() + b"\n\n" for f in heldout_files)
    mid = len(heldout) // 2
    eval_text = heldout[mid:mid + args.eval_bytes]
    heldout_eval = heldout[:min(len(heldout), 2_000_000)]
    info["data"] = {"site_packages": root, "train_files": len(train_files), "train_bytes": len(corpus),
                    "heldout": args.heldout, "heldout_files": len(heldout_files), "heldout_bytes": len(heldout),
                    "eval_txt": f"bytes [{mid}, {mid + len(eval_text)}) of the held-out sources (sorted paths, "
                                f"each followed by two newlines)"}
    log(f"corpus {len(corpus) / 1e6:.1f} MB from {len(train_files)} files; held-out {args.heldout}: "
        f"{len(heldout) / 1e6:.2f} MB; read in {time.time() - t0:.0f}s")
    data = torch.tensor(np.frombuffer(corpus, dtype=np.uint8), device=device)

    cfg = Config()
    model = TinyLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    info["parameters"] = n_params
    log(f"model: {n_params / 1e6:.2f} M parameters")

    train_lm(model, data, args, device, info)
    model.eval()
    bpb_heldout = bits_per_byte(model, heldout_eval, cfg.context, device)
    info["heldout_bpb_bf16"] = bpb_heldout
    log(f"held-out bits/byte (bf16, {len(heldout_eval)} bytes): {bpb_heldout:.4f}")

    train_indexers(model, data, args, device, info)

    # the shipped weights are fp16: everything below uses them, as keysel will
    state = export_state(model)
    state16 = {k: v.half() for k, v in state.items()}
    model32 = TinyLM(cfg).to(device).float()
    load_state(model32, {k: v.float() for k, v in state16.items()})
    model32.eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bpb_eval = bits_per_byte(model32, eval_text, cfg.context, device, exact=True, autocast=False)
    info["eval_bpb_fp32"] = bpb_eval
    log(f"eval.txt bits/byte (fp16 weights, fp32 math, full attention): {bpb_eval:.5f}")
    info["indexer_recall_eval"] = indexer_recall(model32, eval_text[:2048], device)

    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "training": json.dumps(
        {k: info[k] for k in ("command", "torch", "device", "parameters", "heldout_bpb_bf16", "eval_bpb_fp32")}
        | {"lm_steps": info["lm"]["steps"], "lm_tokens": info["lm"]["tokens"],
           "indexer_steps": info["indexer"]["steps"], "heldout": args.heldout})}
    write_safetensors(os.path.join(args.out, "model.safetensors"),
                      {k: v.numpy().astype(np.float16) for k, v in state16.items()}, meta)
    with open(os.path.join(args.out, "eval.txt"), "wb") as f:
        f.write(eval_text)

    # reference logits in float64 from the fp16 weights, on the CPU
    model64 = TinyLM(cfg).double()
    load_state(model64, {k: v.double() for k, v in state16.items()})
    model64.eval()
    ref_tokens = np.frombuffer(eval_text[:args.logit_tokens], dtype=np.uint8)
    with torch.no_grad():
        logits64 = model64(torch.tensor(ref_tokens.astype(np.int64))[None], exact=True)[0]
        logits32 = model32(torch.tensor(ref_tokens.astype(np.int64), device=device)[None], exact=True)[0]
    diff = (logits32.double().cpu() - logits64).abs().max().item() / logits64.abs().max().item()
    info["logits_fp32_vs_fp64_rel"] = diff
    log(f"reference logits: fp32 GPU vs fp64 CPU max rel diff {diff:.2e}")
    write_safetensors(os.path.join(args.out, "logits.safetensors"),
                      {"tokens": ref_tokens.astype(np.int32), "logits": logits64.numpy().astype(np.float32)},
                      {"format": "keysel-tiny-lm-logits/1", "bpb_eval": repr(bpb_eval),
                       "note": "logits of model.safetensors (fp16 weights) in float64 for tokens = eval.txt[0:L]"})

    # dump of the first dump_tokens bytes of eval.txt (full attention, fp32 math)
    t = min(args.dump_tokens, len(eval_text))
    tokens = torch.tensor(np.frombuffer(eval_text[:t], dtype=np.uint8).astype(np.int64), device=device)[None]
    capture = []
    with torch.no_grad():
        model32(tokens, exact=True, capture=capture)
        _, _, ci, si = model32.rope(t, device, torch.float32)
        tensors = {}
        for li, (x, q, k, v) in enumerate(capture):
            iq, ik, iw = model32.layers[li].indexer.tensors(x, ci, si)
            for name, value in (("q", q), ("k", k), ("v", v), ("index_q", iq), ("index_k", ik), ("index_w", iw)):
                tensors[f"layer{li}.{name}"] = value[0].float().cpu().numpy().astype(np.float16)
            tensors[f"layer{li}.positions"] = np.arange(t, dtype=np.int32)
    write_safetensors(os.path.join(args.out, "dump.safetensors"), tensors,
                      {"format": "keysel-dump/1", "model": "keysel tiny-lm (models/tiny_lm/model.safetensors)",
                       "scale": "0", "layers": ",".join(str(i) for i in range(cfg.layers)),
                       "prefill_tokens": str(t), "decode_tokens": "0", "queries": "all"})
    info["total_seconds"] = round(time.time() - t0, 1)
    with open(os.path.join(args.out, "train_log.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()

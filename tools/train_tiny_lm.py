#!/usr/bin/env python3
"""Train keysel's tiny byte-level language model and its Lightning Indexers, and write the files keysel ships.

The model (recall/include/keysel/recall/tiny_lm.h describes it and the weight layout; docs/tiny-lm.md explains
the study it serves): a byte-level GQA decoder, RMSNorm, rotate-half RoPE, SwiGLU, causal attention, plus one
Lightning Indexer per layer (I[t,s] = sum_j w[t,j] ReLU(qI[t,j] . kI[s]), SPEC section 3) over the normed input of
that layer's attention.

Training runs on one GPU (the CPU when there is none, in fp32 and eager mode: for tests with tiny shapes) in two
phases within a wall-clock budget:
  1. the language model, next-byte cross entropy on Python sources already installed on the machine (the
     site-packages of the running interpreter), one package held out for evaluation;
  2. the indexers, with the model frozen: per layer the KL divergence from the mean attention distribution of all
     the layer's query heads to softmax(I) (DeepSeek-V3.2's indexer warm-up objective).
The shape options (--d-model ... --context --rope-theta) default to the shipped models/tiny_lm. For a long context
(models/tiny_lm_32k, docs/tiny-lm.md "The 32K model and the retrieval task"): --batch-tokens keeps the tokens per
step fixed at any window; --short-context/--short-fraction make that share of the steps on short windows;
--retrieval-fraction fills that share of each step's rows with key-value retrieval examples (tools/retrieval_task.py)
made from the training corpus, their longest length growing to --context over the first --curriculum of the LM
time, their answer bytes' mean cross entropy added with weight --answer-weight; --budget-seconds bounds the whole
run (imports, data, compilation, both phases, evaluation and export), splitting what is left after loading, less
--reserve-seconds, between the LM and the indexers (--indexer-share).

Fine-tuning (--init DIR, docs/training.md "Top-k fine-tuning study"): the package's weights and config instead of a
fresh model, then --finetune-seconds (or --finetune-steps) of next-byte cross entropy with --train-attention full or
topk (--train-k keys per query token, per_token, chosen by --train-selector exact or indexer), every layer's indexer
trained beside the model, --retrieval-fraction of each step's rows retrieval examples as in training; --out then
receives model.safetensors, eval.txt (the package's), logits.safetensors and train_log.json (no dump).
tools/finetune_study.py runs every variant of the study in one process.

Outputs (in --out):
  model.safetensors   fp16 weights, metadata "format" = "keysel-tiny-lm/1", "config" (JSON), "training" (JSON)
  eval.txt            held-out text (--eval-bytes bytes of the held-out package's sources)
  logits.safetensors  "tokens" I32 [L] (the first L bytes of eval.txt) and "logits" F32 [L, 256]: the model's
                      logits computed in float64 from the fp16 weights; metadata "bpb_eval" = bits per byte of
                      the fp16 weights over eval.txt with full attention in float32, windows of the context length
  dump.safetensors    keysel dump (docs/dumps.md) of the first --dump-tokens bytes of eval.txt: every layer's q, k
                      (after RoPE), v, positions and index_q, index_k (after RoPE), index_w, F16 (none with
                      --dump-tokens 0)
  retrieval.json/.bin retrieval examples from the held-out package (tools/retrieval_task.py's format), --eval-per-cell
                      per (length, keys, depth), and their exact match with full attention in train_log.json
                      (none with --eval-per-cell 0)
  train_log.json      what ran: arguments, steps, tokens, losses, answer accuracy on training batches, held-out bits
                      per byte, retrieval exact match per (length, keys, depth), indexer recall
  train.log           the progress lines printed

Usage (the exact commands behind the shipped files are in docs/tiny-lm.md):
  python3 tools/train_tiny_lm.py --out /tmp/tiny_lm --lm-seconds 300 --indexer-seconds 60
Needs torch (CUDA), numpy and safetensors.
"""
import time

_T_START = time.time()  # the wall-clock budget (--budget-seconds) counts from here, imports included

import argparse
import contextlib
import json
import math
import os
import random
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import retrieval_task  # noqa: E402  (tools/retrieval_task.py: the retrieval examples)

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

    def forward(self, h, cos, sin, exact=False, capture=None, attention=None):
        cfg = self.cfg
        b, t, _ = h.shape
        x = rms_norm(h, self.attn_norm, cfg.norm_eps)
        q, k, v = self.qkv(x, cos, sin)
        if capture is not None:
            capture.append((x, q, k, v))
        qh, kh, vh = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        scale = 1.0 / math.sqrt(cfg.head_dim)
        if attention is not None:
            # fine-tuning's attention (TrainingAttention): full or top-k, and the indexer's loss beside it
            o = attention(self, x, qh, kh, vh, scale)
        elif exact:
            # plain attention (the reference path): softmax(scale q.k) over s <= t, GQA by repeating key heads
            g = cfg.heads // cfg.kv_heads
            kh = kh.repeat_interleave(g, dim=1)
            vh = vh.repeat_interleave(g, dim=1)
            logits = torch.matmul(qh, kh.transpose(-1, -2)) * scale
            mask = torch.ones(t, t, dtype=torch.bool, device=h.device).tril()
            logits = logits.masked_fill(~mask, float("-inf"))
            o = torch.matmul(torch.softmax(logits, dim=-1), vh)
        elif qh.dtype == torch.float32 and cfg.kv_heads != cfg.heads and t > 4096:
            # fp32 (evaluation) of long windows: repeat the key heads, so that SDPA's memory-efficient kernel runs
            # (its GQA path would fall back to the math kernel, which holds [heads, T, T] probabilities: 26 GB at
            # 32K); up to 4096 tokens the GQA call stays (keysel's tests stand in for it with enable_gqa=True)
            g = cfg.heads // cfg.kv_heads
            o = F.scaled_dot_product_attention(qh, kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1),
                                               is_causal=True, scale=scale)
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

    def forward(self, tokens, exact=False, capture=None, attention=None):
        b, t = tokens.shape
        h = self.embed(tokens)
        cos, sin, _, _ = self.rope(t, tokens.device, h.dtype)
        for layer in self.layers:
            h = layer(h, cos, sin, exact=exact, capture=capture, attention=attention)
        return self.lm_head(rms_norm(h, self.final_norm, self.cfg.norm_eps))


# ----------------------------------------------------------------------------------------------- top-k fine-tuning
#
# Fine-tuning a trained package (--init) with the attention that top-k decoding uses. Selections are per_token
# (SPEC section 2: one key set per query token shared by all heads of a layer), the granularity of keysel's tiny-lm
# studies and of DeepSeek's sparse attention. Top-k attention is masked dense attention: the selection is made
# without gradient, the keys outside it get -inf, and the softmax runs over the selected keys only (exactly
# keysel.torch.topk_attention's definition; tests/python/test_finetune_attention.py checks outputs and gradients).


def causal_mask(t, device):
    """bool [T, T]: query t reads keys s <= t."""
    return torch.ones(t, t, dtype=torch.bool, device=device).tril()


def head_mean_attention(qh, kh, scale):
    """pbar [B, T, T] (no gradient): the mean over all query heads of the causal attention probabilities
    softmax(scale q.k) (the per_token group's target, SPEC section 2), in float32 (float64 for float64 inputs),
    one sequence at a time. qh [B, Hq, T, D], kh [B, Hkv, T, D]."""
    b, hq, t, _ = qh.shape
    g = hq // kh.shape[1]
    dtype = torch.float64 if qh.dtype == torch.float64 else torch.float32
    causal = causal_mask(t, qh.device)
    out = torch.empty(b, t, t, dtype=dtype, device=qh.device)
    with torch.no_grad():
        for i in range(b):
            keys = kh[i].to(dtype).repeat_interleave(g, dim=0)
            logits = torch.matmul(qh[i].to(dtype), keys.transpose(-1, -2)) * scale
            logits.masked_fill_(~causal, float("-inf"))
            out[i] = torch.softmax(logits, dim=-1).mean(dim=0)
    return out


def topk_selection_mask(scores, k):
    """bool [B, 1, T, T] (no gradient): for each query row t the k_eff = min(k, t + 1) allowed keys (s <= t) with
    the largest scores [B, T, T] (pbar for the exact top-k, the indexer's I for the indexer's top-k); ties go to
    the lower position, as in keysel's selectors (a stable descending sort)."""
    b, t, _ = scores.shape
    causal = causal_mask(t, scores.device)
    with torch.no_grad():
        ranked = scores.detach().masked_fill(~causal, float("-inf"))
        idx = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :min(k, t)]
        mask = torch.zeros(b, t, t, dtype=torch.bool, device=scores.device).scatter_(-1, idx, True) & causal
    return mask[:, None]


def masked_topk_attention(qh, kh, vh, mask, scale):
    """Attention over the selected keys: softmax(scale q.k) over the keys where mask [B, 1, T, T] is True (-inf
    elsewhere), times v. qh [B, Hq, T, D], kh, vh [B, Hkv, T, D] -> [B, Hq, T, D]. The key heads are repeated so
    that SDPA's memory-efficient kernel takes the boolean mask on a GPU."""
    g = qh.shape[1] // kh.shape[1]
    return F.scaled_dot_product_attention(qh, kh.repeat_interleave(g, dim=1), vh.repeat_interleave(g, dim=1),
                                          attn_mask=mask, scale=scale)


def indexer_kl(scores, pbar, allowed):
    """SPEC section 9.1's indexer loss, batched: per row, KL(ptilde || softmax of I over the allowed keys), ptilde =
    pbar renormalised on them; the mean over rows with keys and target mass. scores I [B, T, T] (differentiable),
    pbar [B, T, T] (a constant), allowed bool [B, 1 or none, T, T]: every causal key (dense warm-up) or the
    selection (sparse stage)."""
    allowed = allowed.reshape(scores.shape)
    p = pbar.to(scores.dtype).masked_fill(~allowed, 0.0)
    mass = p.sum(-1, keepdim=True)
    rows = (mass[..., 0] > 0) & allowed.any(-1)
    ptilde = p / mass.clamp_min(torch.finfo(p.dtype).tiny)
    logq = torch.log_softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    terms = torch.where(ptilde > 0, ptilde * (torch.log(ptilde.clamp_min(torch.finfo(p.dtype).tiny)) - logq),
                        torch.zeros_like(ptilde))
    per_row = terms.sum(-1)
    return per_row[rows].sum() / rows.sum().clamp_min(1)


class TrainingAttention:
    """The attention of every layer in fine-tuning and in its evaluation (passed to TinyLM.forward).

    mode "full": causal attention over every key; "topk": over the k keys per query token that `selector` picks:
    "exact" (the largest pbar, the head-mean attention) or "indexer" (the largest score of the layer's Lightning
    Indexer). With indexer_loss "dense" or "sparse" (and gradients enabled) each layer's indexer is trained beside
    the model: the KL of section 9.1 over every causal key (dense) or over the selection (sparse, DSA's sparse
    stage), from the normed attention input detached from the model, so the loss reaches the indexer only; its
    backward runs at once (the graph is separate from the model's) and the layer's loss goes to self.losses."""

    def __init__(self, cfg, mode="full", k=None, selector="exact", indexer_loss=None):
        if mode not in ("full", "topk"):
            raise ValueError(f"attention mode must be 'full' or 'topk', got {mode!r}")
        if selector not in ("exact", "indexer"):
            raise ValueError(f"selector must be 'exact' or 'indexer', got {selector!r}")
        if mode == "topk" and (k is None or k < 1):
            raise ValueError(f"top-k attention needs k >= 1, got {k}")
        if indexer_loss not in (None, "dense", "sparse"):
            raise ValueError(f"indexer_loss must be None, 'dense' or 'sparse', got {indexer_loss!r}")
        self.cfg, self.mode, self.k, self.selector, self.indexer_loss = cfg, mode, k, selector, indexer_loss
        self.losses = []

    def describe(self):
        return "full attention" if self.mode == "full" else f"top-{self.k} ({self.selector} selector)"

    def __call__(self, block, x, qh, kh, vh, scale):
        t = qh.shape[2]
        train_indexer = self.indexer_loss is not None and torch.is_grad_enabled()
        use_indexer = self.mode == "topk" and self.selector == "indexer"
        pbar = None
        if train_indexer or (self.mode == "topk" and self.selector == "exact"):
            pbar = head_mean_attention(qh, kh, scale)
        scores = None
        if train_indexer or use_indexer:
            positions = torch.arange(t, device=x.device)
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            ci, si = rope_tables(positions, self.cfg.index_dim, self.cfg.rope_theta, dtype, x.device)
            with torch.autocast(x.device.type, enabled=False), torch.set_grad_enabled(train_indexer):
                scores = block.indexer.scores(x.detach().to(dtype), ci, si)
        if self.mode == "full":
            mask = None
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, scale=scale, enable_gqa=True)
        else:
            mask = topk_selection_mask(pbar if self.selector == "exact" else scores, self.k)
            o = masked_topk_attention(qh, kh, vh, mask, scale)
        if train_indexer:
            allowed = mask if (self.indexer_loss == "sparse" and mask is not None) else causal_mask(t, x.device)
            loss = indexer_kl(scores, pbar, allowed.expand(scores.shape[0], 1, t, t))
            loss.backward()
            self.losses.append(loss.detach())
        return o


def topk_lowest_on_ties(scores, k):
    """int64 [R, k]: the positions of the k largest of each row of scores [R, N] (k <= N), the lower position first
    among equal values (what a stable descending sort takes), in increasing position order. torch.topk finds the
    k-th largest value; the keys above it are all taken and the tied ones fill the rest from the lowest position."""
    kth = torch.topk(scores, k, dim=-1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    need = k - above.sum(-1, keepdim=True)
    chosen = above | (tied & (torch.cumsum(tied, dim=-1) <= need))
    return chosen.nonzero()[:, 1].view(scores.shape[0], k)


class ChunkedTopkAttention:
    """Top-k attention for evaluation at long contexts (no gradient): the selections and outputs of
    TrainingAttention(cfg, "topk", k, selector) without its dense [B, T, T] tensors. One sequence at a time, the
    query rows in chunks whose [heads, rows, keys] scores hold at most max_elements values (the keys of a chunk end
    at its last row); per chunk the exact selector's head-mean attention pbar (or the layer's indexer score), its
    top-k per row (ties to the lower position, as TrainingAttention and keysel's selectors), then attention over
    the gathered keys and values of the selection (per_token: one key set per query row for every head of the
    layer). Memory: about max_elements * 4 bytes * 3 for the scores, plus
    k_eff * rows * head_dim * 4 bytes * 2 per key head for the gathered keys and values."""

    def __init__(self, cfg, k, selector="exact", max_elements=1 << 27):
        if selector not in ("exact", "indexer"):
            raise ValueError(f"selector must be 'exact' or 'indexer', got {selector!r}")
        if k is None or k < 1:
            raise ValueError(f"top-k attention needs k >= 1, got {k}")
        if max_elements < 1:
            raise ValueError(f"max_elements must be >= 1, got {max_elements}")
        self.cfg, self.k, self.selector, self.max_elements = cfg, k, selector, max_elements
        self.mode = "topk"

    def describe(self):
        return f"top-{self.k} ({self.selector} selector, rows in chunks)"

    def __call__(self, block, x, qh, kh, vh, scale):
        b, hq, t, d = qh.shape
        hkv = kh.shape[1]
        g = hq // hkv
        dtype = torch.float64 if qh.dtype == torch.float64 else torch.float32
        if self.selector == "indexer":
            positions = torch.arange(t, device=x.device)
            ci, si = rope_tables(positions, self.cfg.index_dim, self.cfg.rope_theta, dtype, x.device)
            with torch.autocast(x.device.type, enabled=False):
                iq, ik, iw = block.indexer.tensors(x.detach().to(dtype), ci, si)
        heads = hq if self.selector == "exact" else self.cfg.index_heads
        rows = max(1, min(t, self.max_elements // (heads * t)))
        out = torch.empty_like(qh)
        with torch.no_grad():
            for i in range(b):
                keys = kh[i].to(dtype)
                values = vh[i].to(dtype)
                for r0 in range(0, t, rows):
                    r1 = min(t, r0 + rows)
                    pos = torch.arange(r0, r1, device=qh.device)
                    future = torch.arange(r1, device=qh.device)[None, :] > pos[:, None]   # [C, r1]
                    q = qh[i, :, r0:r1].to(dtype)                                           # [Hq, C, D]
                    if self.selector == "exact":
                        logits = torch.matmul(q, keys[:, :r1].repeat_interleave(g, dim=0).transpose(-1, -2))
                        logits.mul_(scale).masked_fill_(future, float("-inf"))
                        scores = torch.softmax(logits, dim=-1).mean(dim=0)                # pbar [C, r1]
                        del logits
                    else:
                        logits = torch.einsum("chd,sd->hcs", iq[i, r0:r1], ik[i, :r1])
                        scores = torch.einsum("hcs,ch->cs", F.relu(logits), iw[i, r0:r1])   # I [C, r1]
                        del logits
                    scores.masked_fill_(future, float("-inf"))
                    sel = topk_lowest_on_ties(scores, min(self.k, r1))                      # [C, k_eff]
                    del scores
                    valid = sel <= pos[:, None]
                    ks = keys[:, sel]                                                       # [Hkv, C, k_eff, D]
                    vs = values[:, sel]
                    lg = torch.einsum("hgcd,hckd->hgck", q.view(hkv, g, r1 - r0, d), ks) * scale
                    lg.masked_fill_(~valid[None, None], float("-inf"))
                    o = torch.einsum("hgck,hckd->hgcd", torch.softmax(lg, dim=-1), vs)
                    out[i, :, r0:r1] = o.reshape(hq, r1 - r0, d).to(out.dtype)
        return out


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


@contextlib.contextmanager
def replaced_file(path):
    """Yields a temporary name beside `path` to write; once the block completes, the file is renamed to `path`
    (a reader sees the old file or the whole new one, never a part). On an error the temporary file is removed."""
    temporary = f"{path}.tmp"
    try:
        yield temporary
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def write_bytes(path, data):
    with replaced_file(path) as temporary, open(temporary, "wb") as f:
        f.write(data)


def write_json(path, value):
    with replaced_file(path) as temporary, open(temporary, "w") as f:
        json.dump(value, f, indent=1)


def write_safetensors(path, tensors, metadata):
    """tensors: name -> numpy array; metadata: str -> str (the safetensors package's writer)."""
    from safetensors.numpy import save_file
    with replaced_file(path) as temporary:
        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, temporary, metadata=metadata)


# ----------------------------------------------------------------------------------------------- data


def read_bytes(path):
    with open(path, "rb") as f:
        return f.read()


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


def load_data(args, info):
    """The training corpus (site-packages without the held-out package), the held-out sources, eval.txt's text (the
    middle --eval-bytes of the held-out sources) and the first --heldout-eval-bytes of them; info["data"] says
    what was read."""
    t0 = time.time()
    root = site_packages()
    heldout_dir = os.path.join(root, args.heldout)
    if not os.path.isdir(heldout_dir):
        raise SystemExit(f"held-out package {heldout_dir} not found")
    all_files = python_files(root)
    train_files = [f for f in all_files if not f.startswith(heldout_dir + os.sep)]
    heldout_files = [f for f in all_files if f.startswith(heldout_dir + os.sep)]
    corpus = read_corpus(train_files, args.corpus_bytes, args.seed)
    heldout = b"".join(read_bytes(f) + b"\n\n" for f in heldout_files)
    mid = len(heldout) // 2
    eval_text = heldout[mid:mid + args.eval_bytes]
    heldout_eval = heldout[:min(len(heldout), args.heldout_eval_bytes)]
    info["data"] = {"site_packages": root, "train_files": len(train_files), "train_bytes": len(corpus),
                    "heldout": args.heldout, "heldout_files": len(heldout_files), "heldout_bytes": len(heldout),
                    "eval_txt": f"bytes [{mid}, {mid + len(eval_text)}) of the held-out sources (sorted paths, "
                                f"each followed by two newlines)"}
    log(f"corpus {len(corpus) / 1e6:.1f} MB from {len(train_files)} files; held-out {args.heldout}: "
        f"{len(heldout) / 1e6:.2f} MB; read in {time.time() - t0:.0f}s")
    return corpus, heldout, eval_text, heldout_eval


# ----------------------------------------------------------------------------------------------- phases


_LOG_FILE = None  # the run's log file (--out/train.log) once start_run opens it


def log(msg):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if _LOG_FILE is not None:
        _LOG_FILE.write(line + "\n")
        _LOG_FILE.flush()


def amp(device):
    """bf16 autocast on a GPU; nothing on the CPU (the CPU fallback trains in fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def bits_per_byte(model, data, context, device, exact=False, batch=8, autocast=True, attention=None):
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
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                    logits = model(tokens, exact=exact, attention=attention)
                lp = torch.log_softmax(logits.double(), dim=-1)[0, :-1]
                nll = -lp.gather(-1, tokens[0, 1:, None]).sum().item()
                total_bits += nll / math.log(2)
                total_count += tokens.shape[1] - 1
    return total_bits / total_count


def retrieval_cap(args, context, frac):
    """The longest retrieval example of the curriculum at training progress `frac` (0..1): from the short window
    (or the shortest example) up to the full context, geometrically over --curriculum of the LM time that starts
    where the short-windows-only part (--short-first) ends."""
    first = min(context, max(args.retrieval_min_context, args.short_context or 0))
    frac = frac - args.short_first
    if frac <= 0:
        return first
    if args.curriculum <= 0 or frac >= args.curriculum:
        return context
    return int(first * (context / first) ** (frac / args.curriculum))


def drill_share(args, frac):
    """The share of each LM step's rows that are induction drill rows at training progress `frac` (0..1):
    --drill-fraction at the start, falling linearly to 0 at --drill-until of the LM time."""
    if args.drill_fraction <= 0 or frac >= args.drill_until:
        return 0.0
    return args.drill_fraction * (1 - frac / args.drill_until)


def drill_rows(rows, t, rng, cue):
    """`rows` induction drill rows of t + 1 bytes (tools/retrieval_task.py's drill_row). Returns (tokens uint8
    [rows, t + 1], flat indices [answers, ANSWER_LENGTH] of the answer bytes' targets in a [rows, t] target
    tensor)."""
    out, answers = np.empty((rows, t + 1), dtype=np.uint8), []
    for r in range(rows):
        row, starts = retrieval_task.drill_row(t + 1, rng, cue=cue)
        out[r] = np.frombuffer(row, dtype=np.uint8)
        for a in starts:
            answers.append([r * t + a - 1 + i for i in range(retrieval_task.ANSWER_LENGTH)])
    return out, np.array(answers, dtype=np.int64).reshape(-1, retrieval_task.ANSWER_LENGTH)


def retrieval_rows(corpus, rows, t, cap, args, rng):
    """`rows` training rows of t + 1 bytes of packed retrieval examples (tools/retrieval_task.py) from the training
    corpus, half of them single examples of the curriculum's longest length, half examples of log-uniform lengths.
    Returns (tokens uint8 [rows, t + 1], flat indices [examples, ANSWER_LENGTH] of the answer bytes' targets in a
    [rows, t] target tensor)."""
    out, answers = np.empty((rows, t + 1), dtype=np.uint8), []
    for r in range(rows):
        lo = args.retrieval_min_context if r % 2 else min(cap, t + 1)
        row, starts = retrieval_task.pack_row(corpus, t + 1, rng, lo, min(cap, t + 1), args.retrieval_max_keys,
                                              args.question)
        out[r] = np.frombuffer(row, dtype=np.uint8)
        for a in starts:  # target position j predicts byte j + 1 of the row
            answers.append([r * t + a - 1 + i for i in range(retrieval_task.ANSWER_LENGTH)])
    return out, np.array(answers, dtype=np.int64).reshape(-1, retrieval_task.ANSWER_LENGTH)


def train_lm(model, data, args, device, info, corpus=None):
    """Next-byte cross entropy on windows of the corpus for args.lm_seconds (compilation included). With
    --short-fraction, that share of the steps uses windows of --short-context bytes; with --retrieval-fraction,
    that share of each step's rows holds retrieval examples from the training corpus, whose answer bytes' mean
    cross entropy is added with weight --answer-weight; with --drill-fraction, a share of the rows (decaying to 0 at
    --drill-until) are induction drill rows whose answers join the retrieval answers in that term; with --short-first,
    that share of the LM time uses short windows only."""
    cfg = model.cfg
    decay = [p for n, p in model.named_parameters() if p.dim() == 2 and "indexer" not in n]
    other = [p for n, p in model.named_parameters() if p.dim() < 2 and "indexer" not in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    n = data.shape[0]
    long_t = cfg.context
    short_on = args.short_fraction > 0 or args.short_first > 0
    short_t = args.short_context if short_on else long_t

    def rows_for(t):
        return max(1, args.batch_tokens // t) if args.batch_tokens else args.batch

    shapes = [long_t] if args.short_fraction < 1 else []
    if short_t != long_t or args.short_fraction >= 1:
        shapes.append(short_t)
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed)
    step_rng = random.Random(args.seed + 7)
    arange = torch.arange(long_t + 1, device=device)
    start = time.time()
    step_fn = model
    if args.compile and device.type != "cuda":
        log("no GPU: eager mode (torch.compile is for the GPU run)")
    elif args.compile:
        try:  # compiles on the first call of each window shape; its time counts against the budget
            step_fn = torch.compile(model, dynamic=False)
            for t in shapes:
                # the layout of a training batch (a [rows, t] slice of [rows, t + 1]): no recompilation at step 1
                warm = data[:t + 1].long()[None].repeat(rows_for(t), 1)[:, :-1]
                with amp(device):
                    step_fn(warm).float().mean().backward()
                model.zero_grad(set_to_none=True)
            log(f"torch.compile ready after {time.time() - start:.0f}s (windows {shapes})")
        except Exception as e:  # a compile failure leaves eager mode
            log(f"torch.compile failed ({type(e).__name__}: {e}); eager mode")
            model.zero_grad(set_to_none=True)
            step_fn = model
    step, tokens_seen, losses = 0, 0, []
    retrieval_on = args.retrieval_fraction > 0 or args.drill_fraction > 0
    # answer statistics since the last progress line, per row kind, kept on the device (no sync per step)
    kinds = ("short", "long", "drill")
    stats = {kind: torch.zeros(2, dtype=torch.float64, device=device) for kind in kinds}
    counts = {kind: [0, 0] for kind in kinds}  # answer bytes, examples
    retrieval_log = []
    model.train()
    while True:
        elapsed = time.time() - start
        if elapsed >= args.lm_seconds or (args.lm_steps and step >= args.lm_steps):
            break
        # training progress: by steps when they are fixed (reproducible), else by time
        frac = step / args.lm_steps if args.lm_steps else elapsed / args.lm_seconds
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        short = short_on and (args.short_fraction >= 1 or frac < args.short_first or
                              step_rng.random() < args.short_fraction)
        t = short_t if short else long_t
        rows = rows_for(t)
        n_ret, n_drill = 0, 0
        if args.retrieval_fraction > 0:
            want = rows * args.retrieval_fraction
            n_ret = min(rows, int(want) + (1 if step_rng.random() < want - int(want) else 0))
        if args.drill_fraction > 0:  # drill rows take the place of plain corpus rows
            want = rows * drill_share(args, frac)
            n_drill = min(rows - n_ret, int(want) + (1 if step_rng.random() < want - int(want) else 0))
        offs = torch.randint(0, n - t - 1, (rows - n_ret - n_drill,), device=device, generator=gen)
        batch = data[offs[:, None] + arange[None, :t + 1]].long()
        ans_idx, n_ret_answers = None, 0
        if n_ret or n_drill:
            parts, answer_parts = [], []
            if n_ret:
                cap = retrieval_cap(args, long_t, frac)
                ret, ans = retrieval_rows(corpus, n_ret, t, cap, args, step_rng)
                parts.append(ret)
                answer_parts.append(ans)
                n_ret_answers = ans.shape[0]
            if n_drill:  # after the retrieval rows: their target indices move by n_ret rows
                ret, ans = drill_rows(n_drill, t, step_rng, args.drill_cue)
                parts.append(ret)
                answer_parts.append(ans + n_ret * t)
            ret_t = torch.from_numpy(np.concatenate(parts))
            ans_t = torch.from_numpy(np.concatenate(answer_parts))
            if device.type == "cuda":
                ret_t, ans_t = ret_t.pin_memory(), ans_t.pin_memory()
            batch = torch.cat([ret_t.to(device, non_blocking=True).long(), batch], dim=0)
            ans_idx = ans_t.to(device, non_blocking=True)
        with amp(device):
            logits = step_fn(batch[:, :-1])
        targets = batch[:, 1:].reshape(-1)
        if ans_idx is None:
            loss = F.cross_entropy(logits.float().reshape(-1, cfg.vocab), targets)
            lm_loss = loss
        else:
            flat = logits.float().reshape(-1, cfg.vocab)
            ce = F.cross_entropy(flat, targets, reduction="none")
            lm_loss = ce.mean()
            loss = lm_loss + args.answer_weight * ce[ans_idx].mean()
            with torch.no_grad():
                hit = flat[ans_idx.reshape(-1)].argmax(-1) == targets[ans_idx.reshape(-1)]
                hit = hit.reshape(ans_idx.shape)
                for kind, part in (("short" if short else "long", hit[:n_ret_answers]), ("drill", hit[n_ret_answers:])):
                    if part.shape[0]:
                        stats[kind] += torch.stack([part.sum().double(), part.all(-1).sum().double()])
                        counts[kind][0] += part.numel()
                        counts[kind][1] += part.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += rows * t
        if step % args.log_every == 0 or step == 1:
            lv = lm_loss.item()
            now = time.time() - start
            losses.append([step, round(now, 1), lv / math.log(2)])
            msg = (f"lm step {step} t={now:.0f}s lr={lr:.2e} loss={lv / math.log(2):.4f} bits/byte "
                   f"tok/s={tokens_seen / now:.3g}")
            if retrieval_on:
                entry = {"step": step, "seconds": round(now, 1), "loss": round(loss.item(), 4),
                         "cap": retrieval_cap(args, long_t, frac), "drill_share": round(drill_share(args, frac), 4)}
                for kind, acc in stats.items():
                    (c, e), (nb, ne) = acc.tolist(), counts[kind]
                    counts[kind] = [0, 0]
                    if ne > 0:
                        entry[kind] = {"answer_byte_accuracy": round(c / nb, 4), "exact_match": round(e / ne, 4),
                                       "examples": int(ne)}
                        msg += f" {kind}: answer acc={c / nb:.3f} exact={e / ne:.3f} ({int(ne)} ex)"
                    acc.zero_()
                msg += f" loss+answer={loss.item():.4f} cap={entry['cap']}"
                retrieval_log.append(entry)
            log(msg)
    info["lm"] = {"steps": step, "tokens": tokens_seen, "seconds": round(time.time() - start, 1),
                  "batch": args.batch, "context": long_t, "lr": args.lr, "losses": losses}
    if args.batch_tokens or short_on or retrieval_on:
        info["lm"].update({"batch_tokens": args.batch_tokens, "short_context": short_t,
                           "short_fraction": args.short_fraction, "retrieval_fraction": args.retrieval_fraction,
                           "answer_weight": args.answer_weight, "question": args.question,
                           "drill_fraction": args.drill_fraction, "drill_until": args.drill_until,
                           "short_first": args.short_first, "retrieval": retrieval_log})


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
    while step == 0 or time.time() - start < args.indexer_seconds:  # one step at least
        offs = torch.randint(0, n - t, (args.indexer_batch,), device=device, generator=gen)
        tokens = data[offs[:, None] + arange[None, :]].long()
        capture = []
        with torch.no_grad(), amp(device):
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
            for kk in (kk for kk in ks if kk < t):
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


def attention_statistics(model, text, context, device, ks=(64, 256)):
    """The full-attention distributions of `model` over `text` in non-overlapping windows of `context` bytes (fp32
    or the model's float64): per layer and query head the mean over every query row of the entropy
    -sum_s p[s] ln p[s] (nats) of its distribution over the keys s <= t; per layer the same of pbar, the mean over
    the layer's query heads (the per_token group's distribution, SPEC section 2); and for each k in ks the exact
    top-k mass, the mean over rows at positions t >= k of the k largest probabilities' sum, of pbar (per layer) and
    of each head's own distribution (per layer and head). Windows shorter than 2 bytes are left out."""
    cfg = model.cfg
    g = cfg.heads // cfg.kv_heads
    scale = 1.0 / math.sqrt(cfg.head_dim)
    dtype = torch.float64 if next(model.parameters()).dtype == torch.float64 else torch.float32
    zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    head_entropy, group_entropy, rows = zeros(cfg.layers, cfg.heads), zeros(cfg.layers), 0
    group_mass = {k: zeros(cfg.layers) for k in ks}
    head_mass = {k: zeros(cfg.layers, cfg.heads) for k in ks}
    mass_rows = {k: 0 for k in ks}
    model.eval()
    with torch.no_grad():
        for w0 in range(0, len(text), context):
            window = text[w0:w0 + context]
            t = len(window)
            if t < 2:
                continue
            tokens = torch.tensor(np.frombuffer(window, dtype=np.uint8).astype(np.int64), device=device)[None]
            capture = []
            model(tokens, exact=True, capture=capture)
            causal = causal_mask(t, device)
            for li, (_, q, k, _) in enumerate(capture):
                qh = q[0].to(dtype).transpose(0, 1)                                  # [Hq, T, D]
                kh = k[0].to(dtype).transpose(0, 1).repeat_interleave(g, dim=0)
                logits = (torch.matmul(qh, kh.transpose(-1, -2)) * scale).masked_fill_(~causal, float("-inf"))
                p = torch.softmax(logits, dim=-1)
                del logits
                head_entropy[li] += torch.special.entr(p).sum(-1).sum(-1).double()
                pbar = p.mean(dim=0)
                group_entropy[li] += torch.special.entr(pbar).sum().double()
                for kk in ks:
                    if t > kk:
                        group_mass[kk][li] += pbar[kk:].topk(kk, dim=-1).values.sum().double()
                        head_mass[kk][li] += p[:, kk:].topk(kk, dim=-1).values.sum(-1).sum(-1).double()
                del p, pbar
            rows += t
            for kk in ks:
                mass_rows[kk] += max(0, t - kk)

    def rounded(x, n):
        return [[round(v, 5) for v in r] if isinstance(r, list) else round(r, 5) for r in (x / n).tolist()]

    out = {"context": context, "bytes": len(text), "rows": rows,
           "entropy_heads": rounded(head_entropy, max(rows, 1)), "entropy_pbar": rounded(group_entropy, max(rows, 1)),
           "exact_mass": {}}
    for kk in ks:
        n = mass_rows[kk]
        out["exact_mass"][str(kk)] = {"rows": n, "pbar": rounded(group_mass[kk], n) if n else None,
                                      "heads": rounded(head_mass[kk], n) if n else None}
    return out


def retrieval_eval(model, examples, device, deadline, autocast=False, attention=None):
    """Exact match (tools/retrieval_task.py) of each example: the argmax next-byte prediction at every answer
    position, teacher-forced, full attention (or `attention`, e.g. a ChunkedTopkAttention, in every layer).
    Returns one dict per example ("exact", "answer_bytes_correct"), or None for the examples left when
    time.time() passed `deadline`."""
    out = []
    model.eval()
    with torch.no_grad():
        for ex in examples:
            if time.time() > deadline:
                out.append(None)
                continue
            data = np.frombuffer(ex.data, dtype=np.uint8).astype(np.int64)
            tokens = torch.tensor(data[:-1], device=device)[None]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast and device.type == "cuda"):
                logits = model(tokens, attention=attention)
            pred = logits[0, -retrieval_task.ANSWER_LENGTH:].argmax(-1).cpu().numpy()
            correct = pred == data[-retrieval_task.ANSWER_LENGTH:]
            out.append({"exact": bool(correct.all()), "answer_bytes_correct": int(correct.sum())})
    return out


def retrieval_table(examples, results):
    """Exact match per (context, keys, depth) and per (context, keys): [{"context", "keys", "depth", "examples",
    "exact_match"}], depth None for the rows over all depths."""
    cells = {}
    for ex, res in zip(examples, results):
        if res is None:
            continue
        target = getattr(ex, "target_depth", ex.depth)
        for key in ((ex.length, ex.keys, target), (ex.length, ex.keys, None)):
            cells.setdefault(key, []).append(res["exact"])
    rows = []
    for (context, keys, depth), hits in sorted(cells.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] is None,
                                                                               kv[0][2] or 0)):
        rows.append({"context": context, "keys": keys, "depth": depth, "examples": len(hits),
                     "exact_match": round(sum(hits) / len(hits), 4)})
    return rows


def directory_bytes(path):
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
               if os.path.isfile(os.path.join(path, n)))


# ----------------------------------------------------------------------------------------------- fine-tuning


def load_package(path, device):
    """(Config, fp32 TinyLM on `device`) from a package directory (or its model.safetensors): the config in the
    metadata, the weights (fp16 or fp32) converted to fp32."""
    from safetensors.torch import load_file
    file = os.path.join(path, "model.safetensors") if os.path.isdir(path) else path
    with open(file, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header.get("__metadata__", {})
    if meta.get("format") != FORMAT:
        raise SystemExit(f"{file}: metadata format must be {FORMAT!r}, got {meta.get('format')!r}")
    cfg = Config(**json.loads(meta["config"]))
    model = TinyLM(cfg)
    load_state(model, {k: v.float() for k, v in load_file(file).items()})
    return cfg, model.to(device).float()


def training_attention(args):
    """The TrainingAttention of --train-attention, --train-k and --train-selector: the indexer is trained beside
    the model with the sparse-stage KL when it selects, with the dense KL otherwise (it follows the model)."""
    if args.train_attention == "full":
        return TrainingAttention(None, "full", indexer_loss="dense")
    return TrainingAttention(None, "topk", k=args.train_k, selector=args.train_selector,
                             indexer_loss="sparse" if args.train_selector == "indexer" else "dense")


def finetune(model, data, args, device, info, attention, seconds, max_steps=None, context=None, corpus=None):
    """Next-byte cross entropy with `attention` (a TrainingAttention) in every layer, on windows of `context` bytes
    (default the model's context), --batch rows, for `seconds` of wall time or max_steps steps, whichever ends
    first. Every weight but the indexers' trains with AdamW at --finetune-lr (linear warm-up over
    --finetune-warmup steps, cosine to a tenth over the steps, or over the seconds without max_steps); the indexers
    train on their own KL (attention's indexer_loss) at --finetune-indexer-lr. With --retrieval-fraction, that share
    of each step's rows (rounded at random) holds retrieval examples made from `corpus` (retrieval_rows: half of
    them single examples of the whole window, half packed examples of log-uniform lengths from
    --retrieval-min-context, 1..--retrieval-max-keys keys, --question), whose answer bytes' mean cross entropy is
    added with weight --answer-weight, as in the training of the long-context model. The batches, retrieval rows
    included, are the same for every variant (seeded by --seed)."""
    cfg = model.cfg
    attention.cfg = cfg
    named = list(model.named_parameters())
    for n, p in named:
        p.requires_grad_("indexer" not in n or attention.indexer_loss is not None)
    decay = [p for n, p in named if p.dim() == 2 and "indexer" not in n]
    other = [p for n, p in named if p.dim() < 2 and "indexer" not in n]
    main_params = decay + other
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.finetune_lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    index_params = [p for n, p in named if "indexer" in n]
    index_opt = None
    if attention.indexer_loss is not None:
        index_opt = torch.optim.AdamW(index_params, lr=args.finetune_indexer_lr, weight_decay=0.0,
                                      betas=(0.9, 0.95))
    t = context or cfg.context
    n = data.shape[0]
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed + 100)
    step_rng = random.Random(args.seed + 101)
    retrieval_fraction = getattr(args, "retrieval_fraction", 0.0)
    if retrieval_fraction > 0 and corpus is None:
        raise ValueError("finetune: --retrieval-fraction > 0 needs the training corpus (corpus=None)")
    arange = torch.arange(t + 1, device=device)
    start = time.time()
    step, tokens_seen, losses = 0, 0, []
    answers = torch.zeros(2, dtype=torch.float64, device=device)  # answer bytes right, examples right
    answer_counts = [0, 0]
    retrieval_log = []
    model.train()
    while (max_steps is None or step < max_steps) and (step == 0 or time.time() - start < seconds):
        elapsed = time.time() - start
        frac = step / max_steps if max_steps else min(1.0, elapsed / max(seconds, 1e-9))
        lr = args.finetune_lr * min(1.0, (step + 1) / args.finetune_warmup) * \
            (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for group in opt.param_groups:
            group["lr"] = lr
        n_ret = 0
        if retrieval_fraction > 0:
            want = args.batch * retrieval_fraction
            n_ret = min(args.batch, int(want) + (1 if step_rng.random() < want - int(want) else 0))
        offs = torch.randint(0, n - t - 1, (args.batch - n_ret,), device=device, generator=gen)
        batch = data[offs[:, None] + arange[None, :]].long()
        ans_idx = None
        if n_ret:
            ret, ans = retrieval_rows(corpus, n_ret, t, t, args, step_rng)
            batch = torch.cat([torch.from_numpy(ret).to(device).long(), batch], dim=0)
            ans_idx = torch.from_numpy(ans).to(device)
        attention.losses.clear()
        with amp(device):
            logits = model(batch[:, :-1], attention=attention)
        flat, targets = logits.float().reshape(-1, cfg.vocab), batch[:, 1:].reshape(-1)
        if ans_idx is None or ans_idx.shape[0] == 0:
            loss = lm_loss = F.cross_entropy(flat, targets)
        else:
            ce = F.cross_entropy(flat, targets, reduction="none")
            lm_loss = ce.mean()
            loss = lm_loss + args.answer_weight * ce[ans_idx].mean()
            with torch.no_grad():
                hit = (flat[ans_idx.reshape(-1)].argmax(-1) == targets[ans_idx.reshape(-1)]).reshape(ans_idx.shape)
                answers += torch.stack([hit.sum().double(), hit.all(-1).sum().double()])
                answer_counts[0] += hit.numel()
                answer_counts[1] += hit.shape[0]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(main_params, 1.0)
        opt.step()
        if index_opt is not None:  # the indexers' gradients came from their losses inside the forward pass
            torch.nn.utils.clip_grad_norm_(index_params, 1.0)
            index_opt.step()
            index_opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += args.batch * t
        if step % args.log_every == 0 or step == 1:
            now = time.time() - start
            kl = torch.stack(attention.losses).mean().item() if attention.losses else float("nan")
            losses.append([step, round(now, 1), lm_loss.item() / math.log(2), kl])
            msg = ""
            if answer_counts[1]:
                (c, e), (nb, ne) = answers.tolist(), answer_counts
                retrieval_log.append({"step": step, "answer_byte_accuracy": round(c / nb, 4),
                                      "exact_match": round(e / ne, 4), "examples": ne})
                msg = f" retrieval answers: acc={c / nb:.3f} exact={e / ne:.3f} ({ne} ex)"
                answers.zero_()
                answer_counts[:] = [0, 0]
            log(f"finetune {attention.describe()} step {step} t={now:.0f}s lr={lr:.2e} "
                f"loss={lm_loss.item() / math.log(2):.4f} bits/byte indexer KL={kl:.4f} nats"
                f" tok/s={tokens_seen / now:.3g}{msg}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    info["finetune"] = {"attention": attention.mode, "k": attention.k, "selector": attention.selector,
                        "granularity": "per_token", "indexer_loss": attention.indexer_loss, "steps": step,
                        "tokens": tokens_seen, "seconds": round(time.time() - start, 1), "batch": args.batch,
                        "context": t, "lr": args.finetune_lr, "indexer_lr": args.finetune_indexer_lr,
                        "final_train_loss_bits_per_byte": losses[-1][2] if losses else None,
                        "losses": losses}
    if retrieval_fraction > 0:
        info["finetune"].update({"retrieval_fraction": retrieval_fraction, "answer_weight": args.answer_weight,
                                 "retrieval_max_keys": args.retrieval_max_keys,
                                 "retrieval_min_context": args.retrieval_min_context, "question": args.question,
                                 "retrieval": retrieval_log})
    if losses and losses[-1][0] != step:
        info["finetune"]["final_train_loss_bits_per_byte"] = lm_loss.item() / math.log(2)
    return step


EVAL_SELECTIONS = (("exact", 64), ("exact", 256), ("indexer", 64), ("indexer", 256))


def evaluate_package(model32, eval_text, heldout_eval, device, context=None):
    """The figures of a fine-tuning summary, from fp32 weights (already rounded to what is shipped), in windows of
    `context` bytes (default the model's context): bits per byte of eval.txt with full attention (plain attention,
    fp32) and with top-k attention of each EVAL_SELECTIONS (per_token, every layer sparse: the forward mode of
    keysel's study), bits per byte of the held-out bytes with full attention (bf16 autocast on a GPU), the
    indexers' recall (first min(context, 4096) bytes of eval.txt; k = 64, 128, 256 where shorter) and
    attention_statistics over eval.txt (entropy per layer and head, exact top-k mass at k = 64 and 256)."""
    cfg = model32.cfg
    t = context or cfg.context
    exact = t <= 4096  # plain attention while its [heads, T, T] fits; SDPA in fp32 beyond
    out = {"context": t,
           "eval_bpb_full": bits_per_byte(model32, eval_text, t, device, exact=exact, autocast=False)}
    for selector, k in EVAL_SELECTIONS:
        attention = TrainingAttention(cfg, "topk", k=k, selector=selector) if t <= 4096 else \
            ChunkedTopkAttention(cfg, k, selector)
        out[f"eval_bpb_{selector}_{k}"] = bits_per_byte(model32, eval_text, t, device, autocast=False,
                                                        attention=attention)
    out["heldout_bpb_full"] = bits_per_byte(model32, heldout_eval, t, device)
    out["heldout_bytes"] = len(heldout_eval)
    recall_text = eval_text[:min(4096, t)]
    out["indexer_recall"] = indexer_recall(model32, recall_text, device,
                                           ks=tuple(k for k in (64, 128, 256) if k < len(recall_text)) or (1,))
    out["attention_statistics"] = attention_statistics(model32, eval_text, min(t, 4096), device)
    return out


def rounded_fp16(model):
    """(fp16 state, fp32 model holding exactly those weights) of `model`, as a package ships them."""
    state16 = {k: v.half() for k, v in export_state(model).items()}
    model32 = TinyLM(model.cfg).float()
    load_state(model32, {k: v.float() for k, v in state16.items()})
    return state16, model32.eval()


def write_model_dump(path, model, cfg, text, layers, device, exact=True):
    """A keysel dump (docs/dumps.md) of the fp32 `model` over the bytes `text` with full attention: for each layer
    in `layers`, q, k (after RoPE), v, positions 0..T-1 and the indexer's index_q, index_k (after RoPE), index_w,
    in F16. exact=False runs the attention through SDPA (for long texts: exact=True holds [heads, T, T] logits)."""
    t = len(text)
    layers = sorted(set(int(i) for i in layers))
    tokens = torch.tensor(np.frombuffer(text, dtype=np.uint8).astype(np.int64), device=device)[None]
    capture = []
    with torch.no_grad():
        model(tokens, exact=exact, capture=capture)
        _, _, ci, si = model.rope(t, device, torch.float32)
        tensors = {}
        for li in layers:
            x, q, k, v = capture[li]
            iq, ik, iw = model.layers[li].indexer.tensors(x, ci, si)
            for name, value in (("q", q), ("k", k), ("v", v), ("index_q", iq), ("index_k", ik), ("index_w", iw)):
                tensors[f"layer{li}.{name}"] = value[0].float().cpu().numpy().astype(np.float16)
            tensors[f"layer{li}.positions"] = np.arange(t, dtype=np.int32)
    name = "keysel tiny-lm (models/tiny_lm/model.safetensors)" if cfg.context == 4096 else \
        f"keysel tiny-lm, context {cfg.context} (model.safetensors beside this dump)"
    write_safetensors(path, tensors,
                      {"format": "keysel-dump/1", "model": name,
                       "scale": "0", "layers": ",".join(str(i) for i in layers),
                       "prefill_tokens": str(t), "decode_tokens": "0", "queries": "all"})


def dump_main(args):
    """--dump-from PACKAGE: only the dump of the package's model over its eval.txt (or --dump-text), written to
    --out/dump.safetensors; no training. Runs on the CPU when there is no GPU (32768 bytes: minutes)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg, model = load_package(args.dump_from, device)
    model.eval()
    text_file = args.dump_text or os.path.join(args.dump_from if os.path.isdir(args.dump_from)
                                               else os.path.dirname(args.dump_from), "eval.txt")
    text = read_bytes(text_file)
    t = min(args.dump_tokens, len(text), cfg.context)
    if t < 1:
        raise SystemExit(f"--dump-tokens must be >= 1 and {text_file} non-empty, got {args.dump_tokens} and "
                         f"{len(text)} bytes")
    layers = numbers(args.dump_layers, int) if args.dump_layers else list(range(cfg.layers))
    bad = [i for i in layers if not 0 <= i < cfg.layers]
    if bad or not layers:
        raise SystemExit(f"--dump-layers: the model has layers 0..{cfg.layers - 1}, got {args.dump_layers!r}")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "dump.safetensors")
    start = time.time()
    # the reference attention (exact=True) holds [heads, T, T] logits: only for short texts
    write_model_dump(path, model, cfg, text[:t], layers, device, exact=t <= 4096)
    print(f"{path}: layers {','.join(map(str, layers))} of {args.dump_from}, {t} bytes of {text_file}, "
          f"{os.path.getsize(path) / 2**20:.1f} MiB in {time.time() - start:.0f}s on {device}")


def write_eval_and_logits(out, state16, cfg, eval_text, logit_tokens, bpb_eval):
    """A package's eval.txt and logits.safetensors: the float64 logits of the fp16 weights `state16` (on the CPU)
    over eval.txt's first logit_tokens bytes, with bpb_eval, eval.txt's bits per byte. Returns (tokens uint8 [L],
    logits float64 [L, 256])."""
    write_bytes(os.path.join(out, "eval.txt"), eval_text)
    model64 = TinyLM(cfg).double()
    load_state(model64, {k: v.double() for k, v in state16.items()})
    model64.eval()
    tokens = np.frombuffer(eval_text[:logit_tokens], dtype=np.uint8)
    with torch.no_grad():
        logits64 = model64(torch.tensor(tokens.astype(np.int64))[None], exact=True)[0]
    write_safetensors(os.path.join(out, "logits.safetensors"),
                      {"tokens": tokens.astype(np.int32), "logits": logits64.numpy().astype(np.float32)},
                      {"format": "keysel-tiny-lm-logits/1", "bpb_eval": repr(bpb_eval),
                       "note": "logits of model.safetensors (fp16 weights) in float64 for tokens = eval.txt[0:L]"})
    return tokens, logits64


def write_package(out, state16, cfg, eval_text, info, logit_tokens):
    """A package in models/tiny_lm's format, without a dump: model.safetensors (fp16, format, config, training),
    eval.txt, logits.safetensors (float64 logits of the fp16 weights over eval.txt's first logit_tokens bytes,
    with its bits per byte) and train_log.json."""
    os.makedirs(out, exist_ok=True)
    training = {k: info[k] for k in ("command", "torch", "device", "init") if k in info}
    training.update({k: info["finetune"][k] for k in ("attention", "k", "selector", "granularity", "steps",
                                                       "tokens", "seconds")})
    training.update({k: info["evaluation"][k] for k in ("eval_bpb_full", "heldout_bpb_full")})
    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "training": json.dumps(training)}
    write_safetensors(os.path.join(out, "model.safetensors"),
                      {k: v.numpy().astype(np.float16) for k, v in state16.items()}, meta)
    write_eval_and_logits(out, state16, cfg, eval_text, logit_tokens, info["evaluation"]["eval_bpb_full"])
    write_json(os.path.join(out, "train_log.json"), info)


def start_run(out, seed, log_name):
    """The start of a run that writes into `out`: the directory, its log file `log_name` (log() writes there too),
    torch's seed, the device (the GPU where there is one) with TF32 matmuls. Returns (device, the run's record:
    command, torch version, device name)."""
    global _LOG_FILE
    os.makedirs(out, exist_ok=True)
    _LOG_FILE = open(os.path.join(out, log_name), "w")
    torch.manual_seed(seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    record = {"command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]), "torch": torch.__version__,
              "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    return device, record


def finetune_main(args):
    """--init: fine-tune a package with --train-attention for --finetune-seconds (or --finetune-steps) and write
    the fine-tuned package to --out."""
    device, info = start_run(args.out, args.seed, "train.log")
    info.update(args=vars(args), init=args.init)
    cfg, model = load_package(args.init, device)
    with open(os.path.join(args.init, "eval.txt"), "rb") as f:
        eval_text = f.read()
    corpus, _, _, heldout_eval = load_data(args, info)
    data = torch.tensor(np.frombuffer(corpus, dtype=np.uint8), device=device)
    seconds = args.finetune_seconds
    if args.budget_seconds is not None:
        seconds = min(seconds, _T_START + args.budget_seconds - args.reserve_seconds - time.time())
    finetune(model, data, args, device, info, training_attention(args), seconds, args.finetune_steps, corpus=corpus)
    del data
    torch.backends.cuda.matmul.allow_tf32 = False
    state16, model32 = rounded_fp16(model)
    info["evaluation"] = evaluate_package(model32.to(device), eval_text, heldout_eval, device)
    log(f"evaluation: { {k: v for k, v in info['evaluation'].items() if k != 'indexer_recall'} }")
    info["total_seconds"] = round(time.time() - _T_START, 1)
    write_package(args.out, state16, cfg, eval_text, info, args.logit_tokens)
    log(f"package {args.out}: {directory_bytes(args.out) / 2**20:.2f} MiB; done in {time.time() - _T_START:.0f}s")
    _LOG_FILE.close()


# ----------------------------------------------------------------------------------------------- main


def numbers(text, kind):
    return [kind(x) for x in text.split(",") if x.strip()]


def make_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--lm-seconds", type=float, default=300)
    ap.add_argument("--indexer-seconds", type=float, default=60)
    ap.add_argument("--lm-steps", type=int, default=0,
                    help="stop the LM phase after this many steps (the schedules then follow steps, not time: the "
                         "same run on any machine); 0: time only")
    ap.add_argument("--budget-seconds", type=float, default=None,
                    help="total wall-clock budget from the start of the process (imports and data included); "
                         "replaces --lm-seconds and --indexer-seconds: what is left after loading, less "
                         "--reserve-seconds, goes to the LM and the indexers by --indexer-share")
    ap.add_argument("--reserve-seconds", type=float, default=60,
                    help="with --budget-seconds: time kept for the evaluation and the export at the end")
    ap.add_argument("--indexer-share", type=float, default=0.15,
                    help="with --budget-seconds: the indexers' share of the training time")
    # model shape (defaults: the shipped models/tiny_lm)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--ffn-dim", type=int, default=1024)
    ap.add_argument("--index-heads", type=int, default=4)
    ap.add_argument("--index-dim", type=int, default=32)
    ap.add_argument("--context", type=int, default=4096, help="the model's context: the longest training window")
    ap.add_argument("--rope-theta", type=float, default=10000.0)
    # batches
    ap.add_argument("--batch", type=int, default=32, help="rows per LM step (without --batch-tokens)")
    ap.add_argument("--batch-tokens", type=int, default=None,
                    help="tokens per LM step at any window length (rows = batch_tokens / window)")
    ap.add_argument("--short-context", type=int, default=None, help="the window of the short steps")
    ap.add_argument("--short-fraction", type=float, default=0.0, help="share of the LM steps on short windows")
    # retrieval examples in training (tools/retrieval_task.py, from the training corpus)
    ap.add_argument("--retrieval-fraction", type=float, default=0.0,
                    help="share of each LM step's rows made of retrieval examples (with --init: of each "
                         "fine-tuning step's, windows of the model's context)")
    ap.add_argument("--retrieval-max-keys", type=int, default=4, help="planted keys per training example: 1..this")
    ap.add_argument("--retrieval-min-context", type=int, default=256, help="shortest training retrieval example")
    ap.add_argument("--curriculum", type=float, default=0.3,
                    help="share of the LM time over which the longest retrieval example grows from the short "
                         "window to --context")
    ap.add_argument("--answer-weight", type=float, default=1.0,
                    help="weight of the answer bytes' mean cross entropy added to the LM loss")
    ap.add_argument("--question", choices=sorted(retrieval_task.QUESTIONS), default=retrieval_task.DEFAULT_QUESTION,
                    help="the retrieval question form, in training and in the evaluation")
    ap.add_argument("--drill-fraction", type=float, default=0.0,
                    help="share of each LM step's rows that are induction drill rows at the start (a random hex run, "
                         "then its first characters again, to be completed), falling linearly to 0 at --drill-until")
    ap.add_argument("--drill-until", type=float, default=0.5, help="share of the LM time where the drill ends")
    ap.add_argument("--drill-cue", type=int, default=0,
                    help="characters of a drill run repeated before the 8 to be completed (0: all 8 right after the "
                         "newline)")
    ap.add_argument("--short-first", type=float, default=0.0,
                    help="share of the LM time, at the start, that uses only --short-context windows; the "
                         "curriculum starts after it")
    # evaluation of retrieval at the end (held-out package, full attention)
    ap.add_argument("--eval-contexts", default=None,
                    help="comma-separated example lengths (default: context/4, context/2, context)")
    ap.add_argument("--eval-keys", default="1,4")
    ap.add_argument("--eval-depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--eval-per-cell", type=int, default=3,
                    help="retrieval examples per (length, keys, depth), written to retrieval.json/.bin; 0: none")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--indexer-batch", type=int, default=8)
    ap.add_argument("--indexer-context", type=int, default=2048)
    ap.add_argument("--indexer-lr", type=float, default=3e-3)
    ap.add_argument("--heldout", default="networkx", help="package directory held out for evaluation")
    ap.add_argument("--corpus-bytes", type=int, default=400_000_000)
    ap.add_argument("--heldout-eval-bytes", type=int, default=2_000_000,
                    help="bytes of the held-out package for the bf16 bits per byte after the LM phase")
    ap.add_argument("--eval-bytes", type=int, default=32768)
    ap.add_argument("--logit-tokens", type=int, default=512)
    ap.add_argument("--dump-tokens", type=int, default=1024, help="0: no dump.safetensors")
    ap.add_argument("--dump-from", default=None,
                    help="a package directory (or its model.safetensors): write only --out/dump.safetensors of its "
                         "model over the first --dump-tokens bytes (at most its context) of its eval.txt (or "
                         "--dump-text); no training")
    ap.add_argument("--dump-text", default=None, help="with --dump-from: the text file instead of eval.txt")
    ap.add_argument("--dump-layers", default=None, help="with --dump-from: comma-separated layers (default all)")
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    # fine-tuning a trained package (docs/training.md "Top-k fine-tuning study"); the shape comes from --init
    ap.add_argument("--init", default=None,
                    help="a package directory (models/tiny_lm's format): fine-tune its weights instead of training "
                         "from scratch; the shape options are then ignored")
    ap.add_argument("--train-attention", choices=("full", "topk"), default="full",
                    help="with --init: the attention of every layer in fine-tuning")
    ap.add_argument("--train-k", type=int, default=64, help="with --train-attention topk: keys per query token")
    ap.add_argument("--train-selector", choices=("exact", "indexer"), default="exact",
                    help="with --train-attention topk: the exact top-k of the head-mean attention, or the layer's "
                         "Lightning Indexer's top-k (its KL then restricted to the selection, DSA's sparse stage)")
    ap.add_argument("--finetune-seconds", type=float, default=60)
    ap.add_argument("--finetune-steps", type=int, default=None, help="stop after this many steps (or the seconds)")
    ap.add_argument("--finetune-lr", type=float, default=3e-4)
    ap.add_argument("--finetune-warmup", type=int, default=20)
    ap.add_argument("--finetune-indexer-lr", type=float, default=1e-3)
    return ap


def config_from_args(args):
    return Config(d_model=args.d_model, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                  head_dim=args.head_dim, ffn_dim=args.ffn_dim, context=args.context, rope_theta=args.rope_theta,
                  index_heads=args.index_heads, index_dim=args.index_dim)


def default_config():
    """The model the script trains without shape options (models/tiny_lm's)."""
    return config_from_args(make_parser().parse_args(["--out", "unused"]))


def main():
    ap = make_parser()
    args = ap.parse_args()
    if args.dump_from is not None:
        return dump_main(args)
    if args.init is not None:
        if args.train_k < 1:
            ap.error(f"--train-k must be >= 1, got {args.train_k}")
        return finetune_main(args)
    if args.short_fraction > 0 and not args.short_context:
        ap.error("--short-fraction needs --short-context")
    if args.short_context and not 0 < args.short_context <= args.context:
        ap.error(f"--short-context must be in [1, --context = {args.context}], got {args.short_context}")
    if not 0 <= args.short_fraction <= 1 or not 0 <= args.retrieval_fraction <= 1:
        ap.error("--short-fraction and --retrieval-fraction must be in [0, 1]")
    if not 0 <= args.drill_fraction <= 1 or not 0 < args.drill_until <= 1 or not 0 <= args.short_first < 1:
        ap.error("--drill-fraction and --drill-until must be in [0, 1] (--drill-until > 0), --short-first in [0, 1); "
                 f"got {args.drill_fraction}, {args.drill_until}, {args.short_first}")
    if args.short_first > 0 and not args.short_context:
        ap.error("--short-first needs --short-context")
    if not 0 <= args.indexer_share < 1:
        ap.error(f"--indexer-share must be in [0, 1), got {args.indexer_share}")
    if args.retrieval_fraction > 0 and min(args.context, args.short_context or args.context) + 1 < \
            retrieval_task.min_context(args.retrieval_max_keys, args.question):
        ap.error(f"retrieval examples with {args.retrieval_max_keys} keys need windows of at least "
                 f"{retrieval_task.min_context(args.retrieval_max_keys, args.question) - 1} bytes")
    if args.indexer_context > args.context:
        ap.error(f"--indexer-context must be <= --context = {args.context}, got {args.indexer_context}")

    device, info = start_run(args.out, args.seed, "train.log")
    torch.backends.cudnn.allow_tf32 = True
    info["args"] = vars(args)

    corpus, heldout, eval_text, heldout_eval = load_data(args, info)
    data = torch.tensor(np.frombuffer(corpus, dtype=np.uint8), device=device)

    cfg = config_from_args(args)
    model = TinyLM(cfg).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    info["parameters"] = n_params
    log(f"model: {n_params / 1e6:.2f} M parameters ({2 * n_params / 2**20:.2f} MiB in fp16), "
        f"context {cfg.context}, RoPE theta {cfg.rope_theta:g}, device {info['device']}")

    budget_end = None
    if args.budget_seconds is not None:
        budget_end = _T_START + args.budget_seconds
        left = budget_end - time.time() - args.reserve_seconds
        if left <= 0:
            raise SystemExit(f"--budget-seconds {args.budget_seconds}: {time.time() - _T_START:.0f}s went to start-up "
                             f"and data, leaving nothing after the --reserve-seconds {args.reserve_seconds}")
        args.lm_seconds = left * (1 - args.indexer_share)
        args.indexer_seconds = left * args.indexer_share
        log(f"budget {args.budget_seconds:.0f}s: {time.time() - _T_START:.0f}s used, LM {args.lm_seconds:.0f}s, "
            f"indexers {args.indexer_seconds:.0f}s, reserve {args.reserve_seconds:.0f}s")

    train_lm(model, data, args, device, info, corpus)
    model.eval()
    bpb_heldout = bits_per_byte(model, heldout_eval, cfg.context, device)
    info["heldout_bpb_bf16"] = bpb_heldout
    log(f"held-out bits/byte (bf16, {len(heldout_eval)} bytes): {bpb_heldout:.4f}")

    if budget_end is not None:  # what the LM phase and the evaluation above overran comes off the indexers
        args.indexer_seconds = max(0.0, min(args.indexer_seconds, budget_end - time.time() - args.reserve_seconds))
    train_indexers(model, data, args, device, info)
    del data

    # the shipped weights are fp16: everything below uses them, as keysel will
    state = export_state(model)
    state16 = {k: v.half() for k, v in state.items()}
    model32 = TinyLM(cfg).to(device).float()
    load_state(model32, {k: v.float() for k, v in state16.items()})
    model32.eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    # plain attention up to 4096 (the shipped 4K model's measure); beyond, SDPA in fp32 (a plain [T, T] per head
    # would not fit)
    exact_bpb = cfg.context <= 4096
    bpb_eval = bits_per_byte(model32, eval_text, cfg.context, device, exact=exact_bpb, autocast=False)
    info["eval_bpb_fp32"] = bpb_eval
    log(f"eval.txt bits/byte (fp16 weights, fp32 math, full attention, windows of {cfg.context}): {bpb_eval:.5f}")
    # retrieval with full attention on examples from the held-out package (fp16 weights, fp32 math), shipped
    if args.eval_per_cell > 0:
        contexts = numbers(args.eval_contexts, int) if args.eval_contexts else sorted(
            {max(retrieval_task.min_context(4, args.question), cfg.context // 4),
             max(retrieval_task.min_context(4, args.question), cfg.context // 2), cfg.context})
        keys, depths = numbers(args.eval_keys, int), numbers(args.eval_depths, float)
        examples = []
        rng = random.Random(args.seed + 2)
        for context in contexts:
            for k in keys:
                for depth in depths:
                    for _ in range(args.eval_per_cell):
                        ex = retrieval_task.make_example(heldout, context, k, depth, rng, question=args.question)
                        ex.target_depth = depth
                        examples.append(ex)
        retrieval_task.write_retrieval(args.out, examples)
        deadline = (budget_end - 5) if budget_end is not None else float("inf")
        start = time.time()
        results = retrieval_eval(model32, examples, device, deadline)
        table = retrieval_table(examples, results)
        skipped = sum(r is None for r in results)
        info["retrieval_eval"] = {"contexts": contexts, "keys": keys, "depths": depths,
                                  "per_cell": args.eval_per_cell, "seconds": round(time.time() - start, 1),
                                  "skipped_for_time": skipped, "table": table,
                                  "examples": [None if r is None else dict(r, context=e.length, keys=e.keys,
                                                                            depth=round(e.depth, 6))
                                               for e, r in zip(examples, results)]}
        log(f"retrieval exact match, full attention, fp16 weights in fp32 ({len(examples)} held-out examples, "
            f"{time.time() - start:.0f}s{f', {skipped} skipped for time' if skipped else ''}):")
        for row in table:
            depth = "all" if row["depth"] is None else f"{row['depth']:g}"
            log(f"  context {row['context']:>6} keys {row['keys']} depth {depth:>4}: "
                f"{row['exact_match']:.3f} ({row['examples']} examples)")

    info["indexer_recall_eval"] = indexer_recall(model32, eval_text[:min(2048, cfg.context)], device)

    meta = {"format": FORMAT, "config": json.dumps(cfg.to_dict()), "training": json.dumps(
        {k: info[k] for k in ("command", "torch", "device", "parameters", "heldout_bpb_bf16", "eval_bpb_fp32")}
        | {"lm_steps": info["lm"]["steps"], "lm_tokens": info["lm"]["tokens"],
           "indexer_steps": info["indexer"]["steps"], "heldout": args.heldout})}
    write_safetensors(os.path.join(args.out, "model.safetensors"),
                      {k: v.numpy().astype(np.float16) for k, v in state16.items()}, meta)

    # reference logits in float64 from the fp16 weights, on the CPU
    ref_tokens, logits64 = write_eval_and_logits(args.out, state16, cfg, eval_text, args.logit_tokens, bpb_eval)
    with torch.no_grad():
        logits32 = model32(torch.tensor(ref_tokens.astype(np.int64), device=device)[None], exact=True)[0]
    diff = (logits32.double().cpu() - logits64).abs().max().item() / logits64.abs().max().item()
    info["logits_fp32_vs_fp64_rel"] = diff
    log(f"reference logits: fp32 GPU vs fp64 CPU max rel diff {diff:.2e}")

    # dump of the first dump_tokens bytes of eval.txt (full attention, fp32 math)
    t = min(args.dump_tokens, len(eval_text))
    if t > 0:
        write_model_dump(os.path.join(args.out, "dump.safetensors"), model32, cfg, eval_text[:t], range(cfg.layers),
                         device)

    info["total_seconds"] = round(time.time() - _T_START, 1)
    info["package_bytes"] = directory_bytes(args.out)
    log(f"package {args.out}: {info['package_bytes'] / 2**20:.2f} MiB (model.safetensors "
        f"{os.path.getsize(os.path.join(args.out, 'model.safetensors')) / 2**20:.2f} MiB)")
    write_json(os.path.join(args.out, "train_log.json"), info)
    log(f"done in {time.time() - _T_START:.0f}s")
    _LOG_FILE.close()


if __name__ == "__main__":
    main()

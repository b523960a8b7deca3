"""The operations behind keysel.compat.flash_mla and keysel.compat.vllm.concat_and_cache_mla (issue 16;
docs/compat.md "FlashMLA", docs/SPEC.md §8).

DeepSeek-V3.2 attends with MLA in MQA form: one latent per token, d_qk = 576 (512 latent channels, then 64 RoPE
channels), d_v = 512 (the first 512 latent channels are the value), h_q query heads sharing it. Every
FlashMLA-shaped function translates its arguments and calls one of these; on a GPU, sparse_mla_kernel (keysel's
CUDA kernel, keysel.sparse_mla) replaces the torch softmax wherever kernel_takes says it can:

    sparse_mla(q, gather, indices, valid, sm_scale, d_v, attn_sink)        the sparse softmax (both FlashMLA forms)
    gather_bf16(kv)          -> gather    a bf16 [S, d_qk] latent buffer (flash_mla_sparse_fwd's kv)
    gather_v32(k_cache)      -> gather    the fp8 V3.2 paged cache, 656 bytes per token (flash_mla_with_kvcache)
    dense_mla(q, k_cache, block_table, cache_seqlens, sm_scale, d_v, causal)   the dense paged decode
    quant_v32(kv, scale_fmt) -> uint8 [T, 656];  dequant_v32(bytes [..., 656]) -> float32 [..., 576]
    write_v32(kv_c, k_pe, kv_cache, slot_mapping, scale_fmt)              the cache writer (vLLM fp8_ds_mla)

The bodies are plain torch: they run on CPU tensors and, unchanged, on CUDA tensors. None reads a tensor value on
the host (sizes come from shapes), so CUDA calls queue work without synchronising and can be captured in a CUDA
graph. Numerics: fp8 values and scales decode exactly; q.k and p.v accumulate in float32 (torch.matmul: TF32 on
a GPU only if the caller enabled torch.backends.cuda.matmul.allow_tf32); the output is rounded once to bf16.
Argument checks live in the public modules; these functions assume checked arguments.
"""

from __future__ import annotations

import math

import torch

from ._ops import FP8, FP8_MAX

D_NOPE = 512          # latent channels, quantised in the fp8 cache; also d_v
D_ROPE = 64           # RoPE channels, kept in bf16
D_QK = D_NOPE + D_ROPE
V32_TILE = 128        # values per fp8 scale
V32_TILES = D_NOPE // V32_TILE
V32_BYTES = D_NOPE + 4 * V32_TILES + 2 * D_ROPE   # 512 + 16 + 128 = 656
V32_SCALE_AT = D_NOPE                              # bytes [512, 528): 4 float32 scales
V32_ROPE_AT = D_NOPE + 4 * V32_TILES               # bytes [528, 656): 64 bf16
LOG2_E = 1.0 / math.log(2.0)
FLT_MIN = 1.1754943508222875e-38

# Bound on the float32 temporaries (elements): rows are processed in chunks.
_CHUNK_ELEMENTS = 1 << 25


# ---- the fp8 V3.2 cache ------------------------------------------------------------------------------------
def dequant_v32(token_bytes):
    """uint8 [..., 656] -> float32 [..., 576]: fp8 e4m3 value * its tile's float32 scale (exact in float32), then
    the 64 bf16 RoPE values (exact)."""
    lead = token_bytes.shape[:-1]
    nope = token_bytes[..., :D_NOPE].contiguous().view(FP8).to(torch.float32)
    scales = token_bytes[..., V32_SCALE_AT:V32_ROPE_AT].contiguous().view(torch.float32)  # [..., 4]
    rope = token_bytes[..., V32_ROPE_AT:].contiguous().view(torch.bfloat16).to(torch.float32)
    nope = (nope.reshape(*lead, V32_TILES, V32_TILE) * scales.unsqueeze(-1)).reshape(*lead, D_NOPE)
    return torch.cat([nope, rope], dim=-1)


def v32_scales(nope, scale_fmt):
    """float32 [T, 512] -> float32 [T, 4] scales of the 4 tiles.

    scale_fmt None / "plain" (vLLM concat_and_cache_mla, fp8_ds_mla): max(amax / 448, FLT_MIN).
    scale_fmt "ue8m0" (FlashMLA tests/quant.py): the smallest power of two >= max(amax / 448, 1e-4), exactly."""
    amax = nope.reshape(-1, V32_TILES, V32_TILE).abs().amax(dim=2)
    # Divided by a tensor: torch rewrites "tensor / number" on CUDA as a multiplication by the reciprocal.
    scale = amax / torch.full_like(amax, FP8_MAX)
    if scale_fmt == "ue8m0":
        scale = torch.clamp(scale, min=1e-4)
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
        scale = torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))
    else:
        scale = torch.clamp(scale, min=FLT_MIN)
    return scale


def quant_v32(kv, scale_fmt=None):
    """Latents [T, 576] (bf16, or fp16 / fp32 rounded to bf16 for the RoPE part) -> uint8 [T, 656].

    Bytes [0, 512): fp8_e4m3(clamp(x / scale, -448, 448)) of the 512 latent channels, round to nearest even,
    tile j (channels 128j..128j+127) divided by scale j; [512, 528): the 4 float32 scales (v32_scales);
    [528, 656): the 64 RoPE channels as bf16."""
    t = kv.shape[0]
    return _pack_v32(kv[:, :D_NOPE], kv[:, D_NOPE:].to(torch.bfloat16), scale_fmt).reshape(t, V32_BYTES)


def _pack_v32(nope, rope16, scale_fmt):
    """nope [T, 512] any float dtype, rope16 [T, 64] (2-byte dtype, stored as its bits) -> uint8 [T, 656]."""
    t = nope.shape[0]
    x = nope.to(torch.float32)
    scale = v32_scales(x, scale_fmt)  # [T, 4]
    q = torch.clamp(x.reshape(t, V32_TILES, V32_TILE) / scale.unsqueeze(2), -FP8_MAX, FP8_MAX).to(FP8)
    return torch.cat([q.reshape(t, D_NOPE).view(torch.uint8), scale.contiguous().view(torch.uint8).reshape(t, 16),
                      rope16.contiguous().view(torch.uint8).reshape(t, 2 * D_ROPE)], dim=1)


def write_v32(kv_c, k_pe, kv_cache, slot_mapping, scale_fmt=None):
    """Quantise and store tokens into the fp8 V3.2 paged cache (vLLM concat_and_cache_mla, "fp8_ds_mla").

    kv_c:         [>= T, 512] bf16 / fp16; k_pe: [>= T, 64] of the same dtype (stored as its 2-byte bits)
    kv_cache:     uint8 [num_blocks, block_size, 656] (any block stride, a token's 656 bytes contiguous)
    slot_mapping: int64 / int32 [T]; token t goes to block slot // block_size, row slot % block_size;
                  slot < 0 (padding) and slots past the cache are skipped."""
    t = slot_mapping.shape[0]
    if t == 0 or kv_cache.shape[0] == 0 or kv_cache.shape[1] == 0:
        return None
    scatter_tokens(kv_cache, slot_mapping, _pack_v32(kv_c[:t], k_pe[:t], scale_fmt))
    return None


def scatter_tokens(cache_bytes, slot_mapping, new):
    """cache_bytes uint8 [num_blocks, block_size, E] <- new uint8 [T, E] at slot_mapping [T] (slot = block *
    block_size + row); slots < 0 or past the cache are skipped. Writes without reading the slot mask on the host:
    (new - old) mod 256 is added at kept slots and 0 elsewhere, so a skipped token writes nothing even where its
    placeholder index meets another token's bytes."""
    t, e = new.shape
    blocks, block_size = cache_bytes.shape[0], cache_bytes.shape[1]
    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0) & (slots < blocks * block_size)
    safe = torch.where(keep, slots, torch.zeros_like(slots))
    block = (safe // block_size).unsqueeze(1).expand(t, e)
    row = (safe % block_size).unsqueeze(1).expand(t, e)
    column = torch.arange(e, device=cache_bytes.device).unsqueeze(0).expand(t, e)
    old = cache_bytes[block, row, column]
    delta = (new.to(torch.int16) - old.to(torch.int16)).remainder(256).to(torch.uint8)
    delta = torch.where(keep.unsqueeze(1), delta, torch.zeros_like(delta))
    cache_bytes.index_put_((block, row, column), delta, accumulate=True)


# ---- token sources for the sparse softmax --------------------------------------------------------------------
def gather_bf16(kv):
    """kv [S, d_qk] (bf16) -> a function int64 [...] slot ids (in range) -> float32 [..., d_qk]."""
    return kv.shape[0], (lambda ids: kv[ids].to(torch.float32))


def gather_v32(k_cache_bytes):
    """k_cache_bytes uint8 [num_blocks, page_block_size, 656] -> (slots, function: int64 [...] slots (in range,
    slot = block * page_block_size + row) -> float32 [..., 576] dequantised)."""
    blocks, block_size = k_cache_bytes.shape[0], k_cache_bytes.shape[1]

    def gather(ids):
        return dequant_v32(k_cache_bytes[ids // block_size, ids % block_size])

    return blocks * block_size, gather


# ---- sparse MLA ---------------------------------------------------------------------------------------------
def sparse_mla(q, sources, sm_scale, d_v, attn_sink):
    """Softmax attention of each query row over its selected tokens.

    q:        bf16 [R, h_q, d_qk]
    sources:  list of (gather, slots, indices int32 [R, k_i], length None or int [R] (topk_length)), the tokens
              of all sources concatenated (FlashMLA's k_cache + extra_k_cache). Slot j of row r of a source is
              valid iff 0 <= indices[r, j] < slots and j < length[r]; invalid slots are never read into the
              result (their values, even NaN, do not matter).
    sm_scale: float; d_v: value channels (the first d_v of each token)
    attn_sink: None or float32 [h_q] (natural-log units)
    Returns (out bf16 [R, h_q, d_v], max_logits float32 [R, h_q], lse float32 [R, h_q]):
      s_j = sm_scale * q . kv_j (float32); max_logits = max_j s_j over valid j (-inf if none);
      lse = log sum_j exp(s_j) (natural log; +inf if no valid j, FlashMLA's convention);
      out = sum_j exp(s_j) v_j / (sum_j exp(s_j) + exp(attn_sink[h]))  (0 if no valid j, whatever the sink);
      attn_sink changes out only (not lse, not max_logits)."""
    r, h, d_qk = q.shape
    device = q.device
    width = sum(int(src[2].shape[1]) for src in sources)
    out = torch.empty((r, h, d_v), dtype=torch.bfloat16, device=device)
    max_logits = torch.empty((r, h), dtype=torch.float32, device=device)
    lse = torch.empty((r, h), dtype=torch.float32, device=device)
    if r == 0:
        return out, max_logits, lse
    step = max(1, _CHUNK_ELEMENTS // max(1, width * max(d_qk, h)))
    sink = None if attn_sink is None else attn_sink.to(torch.float32).reshape(1, h)
    for r0 in range(0, r, step):
        r1 = min(r, r0 + step)
        kv_parts, valid_parts = [], []
        for gather, slots, indices, length in sources:
            idx = indices[r0:r1].to(torch.int64)
            valid = (idx >= 0) & (idx < slots)
            if length is not None:
                columns = torch.arange(idx.shape[1], device=device, dtype=torch.int64)
                valid &= columns.unsqueeze(0) < length[r0:r1].to(torch.int64).unsqueeze(1)
            safe = torch.where(valid, idx, torch.zeros_like(idx))
            kv = gather(safe)  # [c, k_i, d_qk] float32
            kv_parts.append(torch.where(valid.unsqueeze(-1), kv, torch.zeros_like(kv)))
            valid_parts.append(valid)
        kv = torch.cat(kv_parts, dim=1) if len(kv_parts) > 1 else kv_parts[0]
        valid = torch.cat(valid_parts, dim=1) if len(valid_parts) > 1 else valid_parts[0]
        qc = q[r0:r1].to(torch.float32)  # [c, h, d_qk]
        logits = torch.matmul(qc, kv.transpose(1, 2)) * sm_scale  # [c, h, width]
        logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
        m = logits.amax(dim=2) if width > 0 else torch.full(qc.shape[:2], float("-inf"), device=device)
        any_valid = torch.isfinite(m)
        m_safe = torch.where(any_valid, m, torch.zeros_like(m))
        total = torch.exp(logits - m_safe.unsqueeze(2)).sum(dim=2)  # [c, h]
        row_lse = torch.log(total) + m_safe  # -inf where nothing is valid
        # The sink joins the denominator: lse_o = logaddexp(lse, sink); +inf (weights 0) where nothing is valid.
        lse_o = row_lse if sink is None else torch.logaddexp(row_lse, sink.expand_as(row_lse))
        lse_o = torch.where(any_valid, lse_o, torch.full_like(lse_o, float("inf")))
        weights = torch.exp(logits - lse_o.unsqueeze(2))  # [c, h, width]
        out[r0:r1] = torch.matmul(weights, kv[..., :d_v]).to(torch.bfloat16)
        max_logits[r0:r1] = m
        lse[r0:r1] = torch.where(any_valid, row_lse, torch.full_like(row_lse, float("inf")))
    return out, max_logits, lse


def kernel_takes(q, kv_rows, indices):
    """Whether keysel's CUDA sparse MLA kernel runs this call (else the torch body sparse_mla does): CUDA tensors
    in a CUDA build on a GPU of compute capability 8.0+, d_qk 576, h_q <= 65535, contiguous q, unit-stride
    indices rows, and 16-byte aligned q and cache (kv_rows: the V3.2 pages [P, page, 656] or bf16 rows [S, 576])."""
    from .. import built_with_cuda

    if q.device.type != "cuda" or not built_with_cuda():
        return False
    if q.shape[-1] != D_QK or q.shape[-2] > 65535 or not q.is_contiguous():
        return False
    if kv_rows.dim() == 3:
        layout_ok = kv_rows.stride(2) == 1 and kv_rows.stride(1) == V32_BYTES and kv_rows.stride(0) % 16 == 0
    else:
        layout_ok = kv_rows.stride(1) == 1 and kv_rows.stride(0) % 8 == 0
    return (layout_ok and kv_rows.stride(0) > 0 and (indices.shape[-1] == 0 or indices.stride(-1) == 1)
            and q.data_ptr() % 16 == 0 and kv_rows.data_ptr() % 16 == 0
            and torch.cuda.get_device_capability(q.device) >= (8, 0))


def sparse_mla_kernel(q, kv_rows, indices, length, sm_scale, attn_sink):
    """The sparse softmax of sparse_mla by keysel's CUDA kernel (kernel_takes said yes), on torch's current
    stream: q bf16 [R, h_q, 576], kv_rows the V3.2 pages [P, page, 656] (any 1-byte dtype) or bf16 rows [S, 576],
    indices int32 [R, k], length None or int32 [R]. Same results as sparse_mla (out bf16, max_logits, lse with +inf
    for a row with no valid slot)."""
    from .. import sparse_mla as keysel_sparse_mla

    r, h, _ = q.shape
    out = torch.empty((r, h, D_NOPE), dtype=torch.bfloat16, device=q.device)
    lse = torch.empty((r, h), dtype=torch.float32, device=q.device)
    max_logits = torch.empty((r, h), dtype=torch.float32, device=q.device)
    if r == 0:
        return out, max_logits, lse
    kv = kv_rows.view(torch.uint8) if kv_rows.dim() == 3 and kv_rows.dtype != torch.uint8 else kv_rows
    keysel_sparse_mla(q, kv, indices, scale=float(sm_scale), attn_sink=attn_sink,
                      topk_length=None if length is None else length.to(torch.int32).contiguous(),
                      out=out, lse=lse, max_logits=max_logits)
    lse = torch.where(torch.isinf(lse) & (lse < 0), torch.full_like(lse, float("inf")), lse)
    return out, max_logits, lse


def prefill_state_base2(max_logits, lse):
    """FlashMLA's sparse-prefill state before its commit 082094b (2026-01-16; e.g. 1408756, 2025-10): max_logits
    and lse in base 2 (log2 e times the natural values), lse = -inf for a row with no valid index. Converts the
    current (natural, +inf) pair returned by flash_mla_sparse_fwd."""
    base2_lse = torch.where(torch.isposinf(lse), torch.full_like(lse, float("-inf")), lse * LOG2_E)
    return max_logits * LOG2_E, base2_lse


# ---- dense paged MLA decode -----------------------------------------------------------------------------------
def dense_mla(q, k_cache, block_table, cache_seqlens, sm_scale, d_v, causal):
    """FlashMLA's dense decode over a bf16/fp16 paged cache.

    q: [b, s_q, h_q, d] (bf16 / fp16); k_cache: [num_blocks, page_block_size, h_k, d] (same dtype)
    block_table: int32 [b, max_blocks]; cache_seqlens: int32 [b]
    Key j < cache_seqlens[i] of sequence i is row j % page_block_size of block block_table[i, j // page_block_size]
    (entries past the sequence are never read). Query head hq reads key head hq // (h_q / h_k). With causal and
    s_q > 1, query row t reads keys j <= t + cache_seqlens[i] - s_q. Returns (out [b, s_q, h_q, d_v] in q's dtype,
    lse float32 [b, h_q, s_q] contiguous, natural log, +inf (and out 0) for a row with no key)."""
    b, s_q, h_q, d = q.shape
    blocks, block_size, h_k = k_cache.shape[0], k_cache.shape[1], k_cache.shape[2]
    device = q.device
    width = block_table.shape[1] * block_size
    g = h_q // h_k
    out = torch.empty((b, s_q, h_q, d_v), dtype=q.dtype, device=device)
    lse = torch.empty((b, h_q, s_q), dtype=torch.float32, device=device)
    if b == 0 or s_q == 0:
        return out, lse
    if causal and s_q == 1:
        causal = False  # FlashMLA: is_causal = False when seqlen_q == 1
    positions = torch.arange(width, device=device, dtype=torch.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, width * max(h_k * d, h_q * s_q)))
    for b0 in range(0, b, step):
        b1 = min(b, b0 + step)
        c = b1 - b0
        lens = cache_seqlens[b0:b1].to(torch.int64)  # [c]
        valid = positions.unsqueeze(0) < lens.unsqueeze(1)  # [c, W]
        page = block_table[b0:b1].to(torch.int64)[:, positions // block_size]  # [c, W]
        page = torch.where(valid, page, torch.zeros_like(page)).clamp(0, max(blocks - 1, 0))
        if blocks == 0:
            valid = valid & False
            keys = torch.zeros((c, width, h_k, d), dtype=torch.float32, device=device)
        else:
            keys = k_cache[page, (positions % block_size).unsqueeze(0).expand(c, width)].to(torch.float32)
        keys = torch.where(valid.reshape(c, width, 1, 1), keys, torch.zeros_like(keys))  # [c, W, h_k, d]
        qc = q[b0:b1].to(torch.float32).reshape(c, s_q, h_k, g, d).permute(0, 2, 3, 1, 4).reshape(c, h_k, g * s_q, d)
        kt = keys.permute(0, 2, 3, 1)  # [c, h_k, d, W]
        logits = torch.matmul(qc, kt).reshape(c, h_k, g, s_q, width) * sm_scale
        allowed = valid.reshape(c, 1, 1, 1, width)
        if causal:
            rows = torch.arange(s_q, device=device, dtype=torch.int64)
            limit = rows.unsqueeze(0) + lens.unsqueeze(1) - s_q  # [c, s_q]
            allowed = allowed & (positions.reshape(1, 1, width) <= limit.unsqueeze(2)).reshape(c, 1, 1, s_q, width)
        logits = logits.masked_fill(~allowed, float("-inf"))
        m = logits.amax(dim=4)
        any_valid = torch.isfinite(m)
        m_safe = torch.where(any_valid, m, torch.zeros_like(m))
        total = torch.exp(logits - m_safe.unsqueeze(4)).sum(dim=4)
        row_lse = torch.where(any_valid, torch.log(total) + m_safe, torch.full_like(m, float("inf")))
        weights = torch.exp(logits - row_lse.unsqueeze(4))  # 0 where row_lse = +inf
        values = keys[..., :d_v].permute(0, 2, 1, 3).unsqueeze(2)  # [c, h_k, 1, W, d_v]
        o = torch.matmul(weights, values)  # [c, h_k, g, s_q, d_v]
        out[b0:b1] = o.permute(0, 3, 1, 2, 4).reshape(c, s_q, h_q, d_v).to(q.dtype)
        lse[b0:b1] = row_lse.reshape(c, h_q, s_q)
    return out, lse

"""vLLM's DeepSeek-V3.2 indexer custom ops (vllm._custom_ops), served by keysel.

An engine calling ``vllm._custom_ops.<op>`` for the sparse-attention indexer can call ``keysel.compat.vllm.<op>``
with the same arguments (vLLM csrc/ops.h, csrc/cache_kernels.cu, csrc/sampler.cu; docs/compat.md):

    indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt) -> None
    cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens) -> None
    top_k_per_row_prefill(logits, cu_seqlen_ks, cu_seqlen_ke, raw_topk_indices, num_rows, stride0, stride1,
                          topk_tokens) -> None
    top_k_per_row_decode(logits, next_n, seq_lens, raw_topk_indices, num_rows, stride0, stride1,
                         topk_tokens) -> None
    concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale) -> None
        (the MLA latent cache writer; "fp8_ds_mla" is the 656-byte fp8 V3.2 cache FlashMLA's sparse decode reads)

All write their outputs in place, as vLLM's do. Top-k indices are relative to the row's first key (the prefill
row's cu_seqlen_ks, 0 for decode), -1 padded; keysel writes them in ascending order (vLLM's order is
unspecified) and resolves ties to the lower index (vLLM: arbitrary). topk_tokens may be any k >= 1 (vLLM's
kernels: 2048 or a few fixed values); when omitted it is raw_topk_indices.shape[1].
"""

from __future__ import annotations

import torch

from . import _mla, _ops
from ._ops import describe, fail, same_device, shape_is, tensor

__all__ = ["indexer_k_quant_and_cache", "cp_gather_indexer_k_quant_cache", "top_k_per_row_prefill",
           "top_k_per_row_decode", "concat_and_cache_mla"]


def indexer_k_quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt):
    """Quantise indexer keys to fp8 and write them into the paged indexer cache, in place.

    k:                bfloat16 / float16 / float32 [T, D]
    kv_cache:         uint8 [num_blocks, 64, D + 4 * D / quant_block_size] (vLLM's view; the 2-D and DeepGEMM
                      4-D views of the same bytes work too)
    slot_mapping:     int64 [T] (int32 accepted); slot < 0 (padding) is skipped
    quant_block_size: int dividing D (vLLM's DeepSeek-V3.2 setting: 128 = D, one scale per token)
    scale_fmt:        "ue8m0" rounds each scale up to a power of two; anything else keeps max(amax, 1e-4) / 448
    """
    _ops.quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)


def cp_gather_indexer_k_quant_cache(kv_cache, dst_k, dst_scale, block_table, cu_seq_lens):
    """Gather the cached fp8 keys and scales of a batch into contiguous (k_fp8, k_scale) buffers, in place.

    kv_cache:    uint8 paged indexer cache (see indexer_k_quant_and_cache), one scale per token
    dst_k:       uint8 or float8_e4m3fn [T, D], T = cu_seq_lens[-1] (not checked on the host)
    dst_scale:   uint8 [T, 4] (the float32 bytes, vLLM's buffer) or float32 [T, 1] / [T]
    block_table: int32 [B, max_pages]; cu_seq_lens: int32 [B + 1]
    Token t with cu_seq_lens[b] <= t < cu_seq_lens[b+1] is cache token j = t - cu_seq_lens[b] of sequence b:
    page block_table[b, j // 64], row j % 64. Rows t >= cu_seq_lens[-1] are left unwritten.
    """
    fn = "vllm.cp_gather_indexer_k_quant_cache"
    tensor(fn, "dst_k", dst_k, (torch.uint8, _ops.FP8), 2, "[T, D]")
    t, d = dst_k.shape
    pages, tokens = _ops.pages_view(fn, "kv_cache", kv_cache, d)
    tensor(fn, "dst_scale", dst_scale, (torch.uint8, torch.float32), (1, 2), "uint8 [T, 4] or float32 [T, 1]")
    wanted = (t, 4) if dst_scale.dtype == torch.uint8 else ((t,) if dst_scale.dim() == 1 else (t, 1))
    shape_is(fn, "dst_scale", dst_scale, wanted, "uint8 [T, 4] or float32 [T, 1] / [T]")
    tensor(fn, "block_table", block_table, torch.int32, 2, "[B, max_pages]")
    tensor(fn, "cu_seq_lens", cu_seq_lens, torch.int32, 1, "[B + 1]")
    shape_is(fn, "cu_seq_lens", cu_seq_lens, (block_table.shape[0] + 1,), "[B + 1]")
    same_device(fn, dst_k, kv_cache=kv_cache, dst_scale=dst_scale, block_table=block_table, cu_seq_lens=cu_seq_lens)
    if t == 0 or pages.shape[0] == 0 or block_table.shape[0] == 0 or block_table.shape[1] == 0:
        return None

    device = dst_k.device
    token = torch.arange(t, device=device, dtype=torch.int64)
    cu = cu_seq_lens.to(torch.int64)
    batch = (torch.searchsorted(cu[1:].contiguous(), token, right=True)).clamp(max=block_table.shape[0] - 1)
    inside = token < cu[-1]
    j = (token - cu[batch]).clamp(min=0)
    page_slot = (j // tokens).clamp(max=block_table.shape[1] - 1)
    page = block_table.to(torch.int64)[batch, page_slot].clamp(0, pages.shape[0] - 1)
    row = j % tokens
    values = pages[page.unsqueeze(1), row.unsqueeze(1) * d + torch.arange(d, device=device)]  # [T, D] uint8
    scales = pages[page.unsqueeze(1), tokens * d + row.unsqueeze(1) * 4 + torch.arange(4, device=device)]
    keep = inside.unsqueeze(1)
    k_bytes = dst_k.view(torch.uint8)
    k_bytes.copy_(torch.where(keep, values, k_bytes))
    s_bytes = dst_scale if dst_scale.dtype == torch.uint8 else None
    if s_bytes is not None:
        s_bytes.copy_(torch.where(keep, scales, s_bytes))
    else:
        scale_values = scales.contiguous().view(torch.float32).reshape(dst_scale.shape)
        dst_scale.copy_(torch.where(inside.reshape([t] + [1] * (dst_scale.dim() - 1)), scale_values, dst_scale))
    return None


def _check_rows(fn, logits, raw_topk_indices, num_rows, stride0, stride1, topk_tokens):
    tensor(fn, "logits", logits, torch.float32, 2, "[num_rows, L]")
    num_rows = _ops.integer(fn, "num_rows", num_rows, 0)
    if num_rows > logits.shape[0]:
        raise fail(fn, "num_rows", f"at most logits.shape[0] = {logits.shape[0]}", num_rows)
    if _ops.integer(fn, "stride0", stride0) != logits.stride(0) and logits.shape[0] > 1:
        raise fail(fn, "stride0", f"logits.stride(0) = {logits.stride(0)}", stride0)
    if _ops.integer(fn, "stride1", stride1) != logits.stride(1) and logits.shape[1] > 1:
        raise fail(fn, "stride1", f"logits.stride(1) = {logits.stride(1)}", stride1)
    tensor(fn, "raw_topk_indices", raw_topk_indices, torch.int32, 2, "[num_rows, topk_tokens]")
    if topk_tokens is None:
        topk_tokens = raw_topk_indices.shape[1]
    topk_tokens = _ops.integer(fn, "topk_tokens", topk_tokens, 1)
    if raw_topk_indices.shape[0] < num_rows or raw_topk_indices.shape[1] != topk_tokens:
        raise fail(fn, "raw_topk_indices", f"[>= {num_rows}, {topk_tokens}] (num_rows, topk_tokens)",
                   describe(raw_topk_indices))
    same_device(fn, logits, raw_topk_indices=raw_topk_indices)
    return num_rows, topk_tokens


def top_k_per_row_prefill(logits, cu_seqlen_ks, cu_seqlen_ke, raw_topk_indices, num_rows, stride0, stride1,
                          topk_tokens=None):
    """Per-row top-k of prefill logits, written into raw_topk_indices[:num_rows].

    logits:        float32 [num_rows, L] (rows from DeepGEMM's fp8_mqa_logits; any strides, given as stride0/1)
    cu_seqlen_ks, cu_seqlen_ke: int32 [num_rows]; row r chooses among columns [ks[r], ke[r])
    raw_topk_indices: int32 [num_rows, topk_tokens]: chosen columns minus ks[r], ascending, -1 padded
    """
    fn = "vllm.top_k_per_row_prefill"
    num_rows, topk_tokens = _check_rows(fn, logits, raw_topk_indices, num_rows, stride0, stride1, topk_tokens)
    tensor(fn, "cu_seqlen_ks", cu_seqlen_ks, torch.int32, 1, "[num_rows]")
    tensor(fn, "cu_seqlen_ke", cu_seqlen_ke, torch.int32, 1, "[num_rows]")
    for name, x in (("cu_seqlen_ks", cu_seqlen_ks), ("cu_seqlen_ke", cu_seqlen_ke)):
        if x.shape[0] < num_rows:
            raise fail(fn, name, f"[>= {num_rows}] (num_rows)", describe(x))
    same_device(fn, logits, cu_seqlen_ks=cu_seqlen_ks, cu_seqlen_ke=cu_seqlen_ke)
    _ops.topk_rows(logits[:num_rows], cu_seqlen_ks[:num_rows], cu_seqlen_ke[:num_rows], topk_tokens,
                   raw_topk_indices[:num_rows])


def top_k_per_row_decode(logits, next_n, seq_lens, raw_topk_indices, num_rows, stride0, stride1,
                         topk_tokens=None):
    """Per-row top-k of decode logits (rows = sequences x next_n MTP positions), into raw_topk_indices[:num_rows].

    logits:   float32 [num_rows, L] (from fp8_paged_mqa_logits), num_rows = B * next_n
    next_n:   int >= 1
    seq_lens: int32 [B]: row r reads keys [0, seq_lens[r // next_n] - next_n + r % next_n + 1);
              int32 [B, next_n] (DeepGEMM's 2-D context lens): row r reads [0, seq_lens.flatten()[r])
    raw_topk_indices: int32 [num_rows, topk_tokens]: chosen key positions ascending, -1 padded
    """
    fn = "vllm.top_k_per_row_decode"
    num_rows, topk_tokens = _check_rows(fn, logits, raw_topk_indices, num_rows, stride0, stride1, topk_tokens)
    next_n = _ops.integer(fn, "next_n", next_n, 1)
    tensor(fn, "seq_lens", seq_lens, torch.int32, (1, 2), "[B] or [B, next_n]")
    if seq_lens.dim() == 2 and seq_lens.shape[1] != next_n:
        raise fail(fn, "seq_lens", f"[B, next_n={next_n}]", describe(seq_lens))
    batch = seq_lens.shape[0]
    if batch * next_n < num_rows:
        raise fail(fn, "seq_lens", f"B >= ceil(num_rows / next_n) = {-(-num_rows // next_n)}", describe(seq_lens))
    same_device(fn, logits, seq_lens=seq_lens)
    ends = _ops.row_limits(seq_lens, batch, next_n)[:num_rows].clamp(min=0, max=2**31 - 1).to(torch.int32)
    starts = torch.zeros_like(ends)
    _ops.topk_rows(logits[:num_rows], starts, ends, topk_tokens, raw_topk_indices[:num_rows])


def concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale):
    """Store MLA latents (kv_c, then k_pe) of T = slot_mapping.shape[0] tokens into the paged cache, in place.

    kv_c:           bf16 / fp16 [>= T, kv_lora_rank]; k_pe: [>= T, pe_dim], the same dtype (vLLM uses the first
                    T rows: T = slot_mapping.shape[0], the rest is CUDA-graph padding)
    kv_cache:       "fp8_ds_mla": uint8 / float8_e4m3fn [num_blocks, block_size, 656], kv_lora_rank 512 and
                    pe_dim 64: per token 512 fp8 e4m3 values (tile j = channels 128j..128j+127 divided by its
                    scale), 4 float32 scales max(amax_j / 448, FLT_MIN) (not rounded to a power of two), then the
                    64 k_pe values' 2-byte bits;
                    "auto": kv_c's dtype [num_blocks, block_size, kv_lora_rank + pe_dim], a plain copy
    slot_mapping:   int64 [T] (int32 accepted): block slot // block_size, row slot % block_size; slot < 0 skipped
                    (and, unlike vLLM, slots past the cache)
    kv_cache_dtype: "fp8_ds_mla" or "auto" (vLLM's per-tensor "fp8" / "fp8_e4m3" forms are refused)
    scale:          float32 tensor (vLLM's per-tensor scale; unused by these two forms, as in vLLM)
    """
    fn = "vllm.concat_and_cache_mla"
    tensor(fn, "kv_c", kv_c, (torch.bfloat16, torch.float16), 2, "[T, kv_lora_rank]")
    tensor(fn, "k_pe", k_pe, kv_c.dtype, 2, "[T, pe_dim] in kv_c's dtype")
    tensor(fn, "slot_mapping", slot_mapping, (torch.int64, torch.int32), 1, "[T]")
    t = slot_mapping.shape[0]
    if kv_c.shape[0] < t or k_pe.shape[0] < t:
        raise fail(fn, "kv_c" if kv_c.shape[0] < t else "k_pe", f"at least T = {t} rows (slot_mapping.shape[0])",
                   describe(kv_c if kv_c.shape[0] < t else k_pe))
    if not isinstance(kv_cache_dtype, str) or kv_cache_dtype not in ("fp8_ds_mla", "auto"):
        raise fail(fn, "kv_cache_dtype", '"fp8_ds_mla" or "auto"', describe(kv_cache_dtype))
    if scale is not None and not isinstance(scale, torch.Tensor):
        raise fail(fn, "scale", "a float32 tensor", describe(scale))
    rank, pe = kv_c.shape[1], k_pe.shape[1]
    if kv_cache_dtype == "fp8_ds_mla":
        if rank != _mla.D_NOPE:
            raise fail(fn, "kv_c", "[T, 512] (kv_lora_rank 512 for fp8_ds_mla)", describe(kv_c))
        if pe != _mla.D_ROPE:
            raise fail(fn, "k_pe", "[T, 64] (pe_dim 64 for fp8_ds_mla)", describe(k_pe))
        layout = "uint8 [num_blocks, block_size, 656] (fp8_ds_mla)"
        tensor(fn, "kv_cache", kv_cache, (torch.uint8, _ops.FP8), 3, layout)
        if kv_cache.shape[2] != _mla.V32_BYTES or kv_cache.stride(2) != 1:
            raise fail(fn, "kv_cache", layout + ", each token's bytes contiguous", describe(kv_cache))
    else:
        layout = f"{str(kv_c.dtype).removeprefix('torch.')} [num_blocks, block_size, {rank + pe}] (auto)"
        tensor(fn, "kv_cache", kv_cache, kv_c.dtype, 3, layout)
        if kv_cache.shape[2] != rank + pe or kv_cache.stride(2) != 1:
            raise fail(fn, "kv_cache", layout + ", each token's values contiguous", describe(kv_cache))
    same_device(fn, kv_c, k_pe=k_pe, kv_cache=kv_cache, slot_mapping=slot_mapping)
    if t == 0:
        return None
    if kv_cache_dtype == "fp8_ds_mla":
        _mla.write_v32(kv_c, k_pe, kv_cache.view(torch.uint8), slot_mapping)
    elif kv_cache.shape[0] > 0 and kv_cache.shape[1] > 0:
        new = torch.cat([kv_c[:t], k_pe[:t]], dim=1).contiguous().view(torch.uint8)  # [T, 2 * (rank + pe)]
        _mla.scatter_tokens(kv_cache.view(torch.uint8), slot_mapping, new)
    return None

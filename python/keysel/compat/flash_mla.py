"""FlashMLA's MLA attention entry points (the ``flash_mla`` package), served by keysel (issue 16).

``from keysel.compat import flash_mla`` replaces ``import flash_mla`` for the calls DeepSeek-V3.2 serving makes
(github.com/deepseek-ai/FlashMLA at 9241ae3, flash_mla/flash_mla_interface.py; docs/compat.md "FlashMLA"):

    get_mla_metadata(*args, **kwargs) -> (FlashMLASchedMeta(), None)
    flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None) -> (out [b, s_q, h_q, 512], lse [b, h_q, s_q])
    flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None)
        -> (out [s_q, h_q, 512] bf16, max_logits [s_q, h_q] fp32, lse [s_q, h_q] fp32)

lse is the natural-log log-sum-exp of the scaled logits over the valid selected tokens, +inf for a row with none
(whose out is 0); attn_sink [h_q] (natural units) joins the softmax denominator of out only. The bodies are
keysel.compat._mla (torch today, CPU and CUDA, no host synchronisation). Deviations from FlashMLA: any h_q >= 1
and topk >= 1 (FlashMLA: h_q 64 or 128; topk a multiple of 64, of 128 for SM90 prefill); indices outside the
cache count as invalid (FlashMLA decode: only -1 is, others are out-of-bounds reads); the sched_meta's tensors
stay None (keysel needs no schedule). Bad arguments raise keysel.Error naming the argument.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _mla
from ._ops import describe, fail, same_device, shape_is, tensor

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "flash_mla_sparse_fwd"]

_FP8_CACHE_DTYPES = (_mla.FP8, torch.int8, torch.uint8)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """FlashMLA's scheduler metadata object: empty until the first flash_mla_with_kvcache call records the call's
    configuration; later calls with the same object must match it (FlashMLA reuses its schedule). keysel needs no
    schedule: tile_scheduler_metadata and num_splits stay None."""

    @dataclasses.dataclass
    class Config:
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int

        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]

        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None
    num_splits: Optional[torch.Tensor] = None


def get_mla_metadata(*args, **kwargs):
    """FlashMLA (since 082094b): takes anything (the old (cache_seqlens, num_q_tokens_per_head_k, h_k, h_q,
    is_fp8_kvcache, topk) arguments are accepted and ignored) and returns (FlashMLASchedMeta(), None)."""
    return FlashMLASchedMeta(), None


def _scalar(fn, name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise fail(fn, name, "a float", describe(value))
    return float(value)


def _flag(fn, name, value):
    if not isinstance(value, bool):
        raise fail(fn, name, "a bool", describe(value))
    return value


def _check_config(fn, meta, config):
    """FlashMLA's consistency check of a reused sched_meta."""
    if not meta.have_initialized:
        meta.have_initialized = True
        meta.config = config
        return
    old = meta.config
    for field, argument in (("b", "q"), ("s_q", "q"), ("h_q", "q"), ("page_block_size", "k_cache"),
                            ("h_k", "k_cache"), ("causal", "causal"), ("is_fp8_kvcache", "is_fp8_kvcache"),
                            ("topk", "indices"), ("extra_page_block_size", "extra_k_cache"),
                            ("extra_topk", "extra_indices_in_kvcache")):
        if getattr(old, field) != getattr(config, field):
            raise fail(fn, argument, f"{field} = {getattr(old, field)!r}, as in the first call with this "
                                     f"tile_scheduler_metadata (FlashMLA reuses its schedule)",
                       f"{field} = {getattr(config, field)!r}")


def _v32_cache(fn, name, k_cache):
    tensor(fn, name, k_cache, _FP8_CACHE_DTYPES, 4, "[num_blocks, page_block_size, 1, 656] (fp8 V3.2 cache)")
    if k_cache.shape[2] != 1 or k_cache.shape[3] != _mla.V32_BYTES:
        raise fail(fn, name, "[num_blocks, page_block_size, 1, 656] (h_k = 1, 656 bytes per token)",
                   describe(k_cache))
    if k_cache.shape[1] > 1 and k_cache.stride(1) != _mla.V32_BYTES or k_cache.stride(3) != 1:
        raise fail(fn, name, "each page block contiguous (stride(1) = 656, stride(3) = 1)",
                   f"strides {list(k_cache.stride())}")
    return k_cache.view(torch.uint8)[:, :, 0, :]


def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                           num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None,
                           attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None,
                           extra_topk_length=None):
    """MLA decode over a paged cache; sparse when indices are given.

    q:              bf16 [b, s_q, h_q, d_qk] (sparse: d_qk = 576; dense: bf16 or fp16, d_qk 576 or 512)
    k_cache:        sparse: the fp8 V3.2 cache, float8_e4m3fn / int8 / uint8 [num_blocks, page_block_size, 1, 656]:
                    per token 512 fp8 e4m3 latent values, 4 float32 scales (one per 128 values), 64 bf16 RoPE
                    values; dense: [num_blocks, 64, h_k, d_qk] in q's dtype
    block_table:    dense: int32 [b, max_blocks]; sparse: unused (may be None)
    cache_seqlens:  dense: int32 [b]; sparse: unused (may be None)
    head_dim_v:     512
    tile_scheduler_metadata: the FlashMLASchedMeta from get_mla_metadata; num_splits: None
    softmax_scale:  default d_qk ** -0.5
    causal:         dense only (s_q > 1: row t reads keys j <= t + cache_seqlens[i] - s_q)
    is_fp8_kvcache: must be True when indices are given (FlashMLA's sparse decode reads only the fp8 cache)
    indices:        int32 [b, s_q, topk]: cache slots block * page_block_size + row (the block table already
                    applied), -1 invalid
    attn_sink:      float32 [h_q]; topk_length: int32 [b] (only indices[i, :, :topk_length[i]] count)
    extra_k_cache, extra_indices_in_kvcache [b, s_q, extra_topk], extra_topk_length [b]: a second cache whose
                    selected tokens join the same softmax
    Returns out bf16 [b, s_q, h_q, 512] (dense: q's dtype) and lse float32 [b, h_q, s_q] (sparse: a transposed
    view of a [b, s_q, h_q] buffer, as FlashMLA's)."""
    fn = "flash_mla.flash_mla_with_kvcache"
    if not isinstance(tile_scheduler_metadata, FlashMLASchedMeta):
        raise fail(fn, "tile_scheduler_metadata", "the FlashMLASchedMeta returned by get_mla_metadata()",
                   describe(tile_scheduler_metadata))
    if num_splits is not None:
        raise fail(fn, "num_splits", "None (FlashMLA's current interface)", describe(num_splits))
    causal = _flag(fn, "causal", causal)
    is_fp8_kvcache = _flag(fn, "is_fp8_kvcache", is_fp8_kvcache)
    if isinstance(head_dim_v, bool) or not isinstance(head_dim_v, int) or head_dim_v != _mla.D_NOPE:
        raise fail(fn, "head_dim_v", "512", describe(head_dim_v))
    tensor(fn, "q", q, (torch.bfloat16, torch.float16), 4, "[b, s_q, h_q, d_qk]")
    b, s_q, h_q, d_qk = q.shape
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        raise fail(fn, "k_cache", "a 4-D torch tensor [num_blocks, page_block_size, h_k, d]", describe(k_cache))
    sm_scale = d_qk ** -0.5 if softmax_scale is None else _scalar(fn, "softmax_scale", softmax_scale)
    if indices is None:
        return _dense(fn, q, k_cache, block_table, cache_seqlens, tile_scheduler_metadata, sm_scale, causal,
                      is_fp8_kvcache, attn_sink, extra_k_cache, extra_indices_in_kvcache, topk_length,
                      extra_topk_length)

    # ---- sparse (FlashMLA sparse_decode_fwd) ----
    if causal:
        raise fail(fn, "causal", "False when indices are given (sparse attention)", causal)
    if not is_fp8_kvcache:
        raise fail(fn, "is_fp8_kvcache", "True when indices are given (FlashMLA's sparse decode reads the fp8 "
                                         "V3.2 cache)", is_fp8_kvcache)
    if q.dtype != torch.bfloat16 or d_qk != _mla.D_QK:
        raise fail(fn, "q", "a bfloat16 tensor [b, s_q, h_q, 576] (V3.2: 512 latent + 64 RoPE)", describe(q))
    cache = _v32_cache(fn, "k_cache", k_cache)
    tensor(fn, "indices", indices, torch.int32, 3, "[b, s_q, topk]")
    if indices.shape[0] != b or indices.shape[1] != s_q or indices.shape[2] < 1:
        raise fail(fn, "indices", f"[{b}, {s_q}, topk >= 1] (b, s_q of q)", describe(indices))
    if topk_length is not None:
        tensor(fn, "topk_length", topk_length, torch.int32, 1, "[b]")
        shape_is(fn, "topk_length", topk_length, (b,), "[b]")
    if attn_sink is not None:
        tensor(fn, "attn_sink", attn_sink, torch.float32, 1, "[h_q]")
        shape_is(fn, "attn_sink", attn_sink, (h_q,), "[h_q]")
    extra = None
    if extra_k_cache is not None:
        extra = _v32_cache(fn, "extra_k_cache", extra_k_cache)
        if extra_indices_in_kvcache is None:
            raise fail(fn, "extra_indices_in_kvcache", "a tensor when extra_k_cache is given", None)
        tensor(fn, "extra_indices_in_kvcache", extra_indices_in_kvcache, torch.int32, 3, "[b, s_q, extra_topk]")
        if extra_indices_in_kvcache.shape[:2] != (b, s_q) or extra_indices_in_kvcache.shape[2] < 1:
            raise fail(fn, "extra_indices_in_kvcache", f"[{b}, {s_q}, extra_topk >= 1]",
                       describe(extra_indices_in_kvcache))
        if extra_topk_length is not None:
            tensor(fn, "extra_topk_length", extra_topk_length, torch.int32, 1, "[b]")
            shape_is(fn, "extra_topk_length", extra_topk_length, (b,), "[b]")
    else:
        for name, x in (("extra_indices_in_kvcache", extra_indices_in_kvcache),
                        ("extra_topk_length", extra_topk_length)):
            if x is not None:
                raise fail(fn, name, "None when extra_k_cache is None", describe(x))
    same_device(fn, q, k_cache=k_cache, indices=indices, topk_length=topk_length, attn_sink=attn_sink,
                extra_k_cache=extra_k_cache, extra_indices_in_kvcache=extra_indices_in_kvcache,
                extra_topk_length=extra_topk_length)
    topk = indices.shape[2]
    _check_config(fn, tile_scheduler_metadata, FlashMLASchedMeta.Config(
        b, s_q, h_q, k_cache.shape[1], k_cache.shape[2], causal, is_fp8_kvcache, topk,
        extra_k_cache.shape[1] if extra is not None else None,
        extra_indices_in_kvcache.shape[2] if extra is not None else None))

    rows = b * s_q

    def per_row(length):
        return None if length is None else length.repeat_interleave(s_q)

    pages = cache  # [num_blocks, page_block_size, 656] bytes
    if extra is None and _mla.kernel_takes(q, pages, indices):
        out, _, lse = _mla.sparse_mla_kernel(q.reshape(rows, h_q, d_qk), pages, indices.reshape(rows, topk),
                                             per_row(topk_length), sm_scale, attn_sink)
        return out.reshape(b, s_q, h_q, head_dim_v), lse.reshape(b, s_q, h_q).transpose(1, 2)
    slots, gather = _mla.gather_v32(cache)
    sources = [(gather, slots, indices.reshape(rows, topk), per_row(topk_length))]
    if extra is not None:
        extra_slots, extra_gather = _mla.gather_v32(extra)
        sources.append((extra_gather, extra_slots, extra_indices_in_kvcache.reshape(rows, -1),
                        per_row(extra_topk_length)))
    out, _, lse = _mla.sparse_mla(q.reshape(rows, h_q, d_qk), sources, sm_scale, head_dim_v, attn_sink)
    return out.reshape(b, s_q, h_q, head_dim_v), lse.reshape(b, s_q, h_q).transpose(1, 2)


def _dense(fn, q, k_cache, block_table, cache_seqlens, meta, sm_scale, causal, is_fp8_kvcache, attn_sink,
           extra_k_cache, extra_indices_in_kvcache, topk_length, extra_topk_length):
    for name, x in (("attn_sink", attn_sink), ("extra_k_cache", extra_k_cache),
                    ("extra_indices_in_kvcache", extra_indices_in_kvcache), ("topk_length", topk_length),
                    ("extra_topk_length", extra_topk_length)):
        if x is not None:
            raise fail(fn, name, "None for dense attention (indices=None)", describe(x))
    if is_fp8_kvcache:
        raise fail(fn, "is_fp8_kvcache", "False for dense attention (FlashMLA's dense decode reads a bf16/fp16 "
                                         "cache)", is_fp8_kvcache)
    b, s_q, h_q, d_qk = q.shape
    if d_qk not in (512, 576):
        raise fail(fn, "q", "[b, s_q, h_q, 576 or 512]", describe(q))
    tensor(fn, "k_cache", k_cache, q.dtype, 4, "[num_blocks, 64, h_k, d_qk] in q's dtype")
    h_k = k_cache.shape[2]
    if k_cache.shape[1] != 64 or k_cache.shape[3] != d_qk or h_k < 1 or h_q % h_k != 0:
        raise fail(fn, "k_cache", f"[num_blocks, 64, h_k dividing {h_q}, {d_qk}]", describe(k_cache))
    if block_table is None:
        raise fail(fn, "block_table", "an int32 tensor [b, max_blocks] for dense attention", None)
    tensor(fn, "block_table", block_table, torch.int32, 2, "[b, max_blocks]")
    if block_table.shape[0] != b:
        raise fail(fn, "block_table", f"[{b}, max_blocks]", describe(block_table))
    if cache_seqlens is None:
        raise fail(fn, "cache_seqlens", "an int32 tensor [b] for dense attention", None)
    tensor(fn, "cache_seqlens", cache_seqlens, torch.int32, 1, "[b]")
    shape_is(fn, "cache_seqlens", cache_seqlens, (b,), "[b]")
    same_device(fn, q, k_cache=k_cache, block_table=block_table, cache_seqlens=cache_seqlens)
    _check_config(fn, meta, FlashMLASchedMeta.Config(b, s_q, h_q, k_cache.shape[1], h_k, causal, is_fp8_kvcache,
                                                     None, None, None))
    return _mla.dense_mla(q, k_cache, block_table, cache_seqlens, sm_scale, _mla.D_NOPE, causal)


def flash_mla_sparse_fwd(q, kv, indices, sm_scale, d_v=512, attn_sink=None, topk_length=None):
    """Sparse MLA prefill over a contiguous bf16 latent buffer.

    q:           bf16 [s_q, h_q, d_qk] (d_qk 576 or 512)
    kv:          bf16 [s_kv, 1, d_qk]
    indices:     int32 [s_q, 1, topk]: rows of kv; invalid = -1 or any value outside [0, s_kv)
    sm_scale:    float (no default)
    d_v:         512 (the first 512 channels of each kv row are its value)
    attn_sink:   float32 [h_q]: out *= exp(lse) / (exp(lse) + exp(attn_sink)); -inf no effect, +inf out = 0
    topk_length: int32 [s_q]: row t uses indices[t, :, :topk_length[t]] only
    Returns (out bf16 [s_q, h_q, 512], max_logits float32 [s_q, h_q] (the largest sm_scale * q.k over valid
    indices, -inf if none), lse float32 [s_q, h_q] (natural log, +inf if none)); attn_sink changes neither."""
    fn = "flash_mla.flash_mla_sparse_fwd"
    tensor(fn, "q", q, torch.bfloat16, 3, "[s_q, h_q, d_qk]")
    s_q, h_q, d_qk = q.shape
    if d_qk not in (512, 576):
        raise fail(fn, "q", "[s_q, h_q, d_qk] with d_qk 576 or 512", describe(q))
    tensor(fn, "kv", kv, torch.bfloat16, 3, "[s_kv, h_kv = 1, d_qk]")
    if kv.shape[1] != 1 or kv.shape[2] != d_qk:
        raise fail(fn, "kv", f"[s_kv, 1, {d_qk}] (h_kv = 1, d_qk of q)", describe(kv))
    tensor(fn, "indices", indices, torch.int32, 3, "[s_q, h_kv = 1, topk]")
    if indices.shape[0] != s_q or indices.shape[1] != 1 or indices.shape[2] < 1:
        raise fail(fn, "indices", f"[{s_q}, 1, topk >= 1]", describe(indices))
    sm_scale = _scalar(fn, "sm_scale", sm_scale)
    if isinstance(d_v, bool) or not isinstance(d_v, int) or d_v != _mla.D_NOPE:
        raise fail(fn, "d_v", "512", describe(d_v))
    if attn_sink is not None:
        tensor(fn, "attn_sink", attn_sink, torch.float32, 1, "[h_q]")
        shape_is(fn, "attn_sink", attn_sink, (h_q,), "[h_q]")
    if topk_length is not None:
        tensor(fn, "topk_length", topk_length, torch.int32, 1, "[s_q]")
        shape_is(fn, "topk_length", topk_length, (s_q,), "[s_q]")
    same_device(fn, q, kv=kv, indices=indices, attn_sink=attn_sink, topk_length=topk_length)
    if d_qk == _mla.D_QK and _mla.kernel_takes(q, kv[:, 0, :], indices[:, 0, :]):
        return _mla.sparse_mla_kernel(q, kv[:, 0, :], indices[:, 0, :], topk_length, sm_scale, attn_sink)
    slots, gather = _mla.gather_bf16(kv[:, 0, :])
    return _mla.sparse_mla(q, [(gather, slots, indices[:, 0, :], topk_length)], sm_scale, d_v, attn_sink)

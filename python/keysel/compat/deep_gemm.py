"""DeepGEMM's indexer-logits API (deep_gemm.fp8_mqa_logits and friends), served by keysel.

An engine that does ``import deep_gemm`` for DeepSeek-V3.2's Lightning Indexer can do
``from keysel.compat import deep_gemm`` instead: the names, argument order, defaults, shapes and dtypes are
DeepGEMM's (csrc/apis/attention.hpp of deepseek-ai/DeepGEMM), the results are keysel's exact float32 logits
(docs/SPEC.md §7, docs/compat.md).

    fp8_mqa_logits(q, (k_fp8, k_scale), weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True,
                   max_seqlen_k=0) -> float32 [M, N]  (or [M, max_seqlen_k] when max_seqlen_k > 0)
    get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms, indices=None) -> int32 [num_sms + 1, 2]
    fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                         clean_logits=False, indices=None) -> float32 [B * next_n, max_context_len]
    fp8_fp4_mqa_logits / fp8_fp4_paged_mqa_logits: the same with q given as (q_fp8, None) and logits_dtype
                         (fp8 only; an FP4 q raises keysel.Error).

Deviations (docs/compat.md): any H and D in keysel's supported sets on any device (CPU included); the returned
logits are contiguous (DeepGEMM returns a slice of a 1024-byte-aligned buffer); entries a row may not read are
always -inf, whatever clean_logits says; get_paged_mqa_logits_metadata returns keysel's own schedule (a split of
the query rows), which keysel's paged logits do not need.
"""

from __future__ import annotations

import torch

from . import _ops
from ._ops import describe, fail, tensor

__all__ = ["fp8_mqa_logits", "fp8_paged_mqa_logits", "fp8_fp4_mqa_logits", "fp8_fp4_paged_mqa_logits",
           "get_paged_mqa_logits_metadata", "get_num_sms"]

SUPPORTED_HEADS = (16, 32, 64, 128)
SUPPORTED_DIMS = (64, 128)


def _check_q(fn, q, rank, layout):
    tensor(fn, "q", q, _ops.FP8, rank, layout)
    heads, dim = q.shape[-2], q.shape[-1]
    if heads not in SUPPORTED_HEADS:
        raise fail(fn, "q", f"H in {list(SUPPORTED_HEADS)} ({layout})", describe(q))
    if dim not in SUPPORTED_DIMS:
        raise fail(fn, "q", f"D in {list(SUPPORTED_DIMS)} ({layout})", describe(q))


def _logits_dtype(fn, logits_dtype):
    if logits_dtype not in (torch.float32, torch.bfloat16):
        raise fail(fn, "logits_dtype", "torch.float32 or torch.bfloat16", describe(logits_dtype))


def get_num_sms() -> int:
    """The SM count DeepGEMM would use (the current CUDA device's, or 1 without CUDA)."""
    if torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count)
    return 1


def fp8_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0):
    """Ragged (prefill) indexer logits.

    q:       float8_e4m3fn [M, H, D] (contiguous); the per-(token, head) q scale is folded into weights
    kv:      (k_fp8 float8_e4m3fn [N, D], k_scale float32 [N])
    weights: float32 [M, H]
    cu_seq_len_k_start, cu_seq_len_k_end: int32 [M]; query t reads keys [start[t], end[t])
    clean_logits: bool (keysel always writes -inf outside the window)
    max_seqlen_k: 0 -> returns float32 [M, N], logits[t, s] for key s;
                  > 0 -> returns float32 [M, max_seqlen_k], logits[t, j] for key start[t] + j (DeepGEMM's
                  compressed form; requires clean_logits=False as DeepGEMM does).
    """
    fn = "deep_gemm.fp8_mqa_logits"
    _check_q(fn, q, 3, "[M, H, D]")
    if not isinstance(kv, (tuple, list)) or len(kv) != 2:
        raise fail(fn, "kv", "a pair (k_fp8 [N, D], k_scale [N])", describe(kv))
    k_fp8, k_scale = kv
    max_seqlen_k = _ops.integer(fn, "max_seqlen_k", max_seqlen_k, 0)
    if max_seqlen_k > 0 and clean_logits:
        raise fail(fn, "clean_logits", "False when max_seqlen_k > 0 (as DeepGEMM asserts)", clean_logits)
    # _ops.ragged_logits checks the rest before anything is written.
    m, n = q.shape[0], (k_fp8.shape[0] if isinstance(k_fp8, torch.Tensor) and k_fp8.dim() == 2 else 0)
    full = torch.empty((m, n), dtype=torch.float32, device=q.device)
    _ops.ragged_logits(q, k_fp8, k_scale, weights, cu_seq_len_k_start, cu_seq_len_k_end, bool(clean_logits),
                       full)
    if max_seqlen_k == 0:
        return full
    columns = cu_seq_len_k_start.to(torch.int64).unsqueeze(1) + torch.arange(max_seqlen_k, device=q.device)
    inside = (columns < cu_seq_len_k_end.to(torch.int64).unsqueeze(1)) & (columns >= 0) & (columns < n)
    gathered = torch.gather(full, 1, columns.clamp(0, max(n - 1, 0))) if n > 0 else \
        torch.empty((m, max_seqlen_k), dtype=torch.float32, device=q.device)
    return torch.where(inside, gathered, torch.full_like(gathered, float("-inf")))


def fp8_fp4_mqa_logits(q, kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits=True, max_seqlen_k=0,
                       logits_dtype=torch.float32):
    """fp8_mqa_logits with q given as (q_fp8, None) and the logits dtype chosen (float32 or bfloat16)."""
    fn = "deep_gemm.fp8_fp4_mqa_logits"
    if not isinstance(q, (tuple, list)) or len(q) != 2 or q[1] is not None:
        raise fail(fn, "q", "(q_fp8, None): keysel serves fp8 q only", describe(q))
    _logits_dtype(fn, logits_dtype)
    logits = fp8_mqa_logits(q[0], kv, weights, cu_seq_len_k_start, cu_seq_len_k_end, clean_logits, max_seqlen_k)
    return logits if logits_dtype == torch.float32 else logits.to(logits_dtype)


def get_paged_mqa_logits_metadata(context_lens, block_kv, num_sms, indices=None):
    """int32 [num_sms + 1, 2], keysel's schedule for fp8_paged_mqa_logits.

    context_lens: int32 [B] or [B, next_n]; block_kv: 64 (the page size); num_sms: int >= 1.
    Row i holds (first query row, 0) of work unit i, the query rows split evenly over num_sms units; row num_sms
    holds (B * next_n, 0). keysel's paged logits do not read it; it exists so engines can keep their call.
    """
    fn = "deep_gemm.get_paged_mqa_logits_metadata"
    tensor(fn, "context_lens", context_lens, torch.int32, (1, 2), "[B] or [B, next_n]")
    block_kv = _ops.integer(fn, "block_kv", block_kv, 1)
    if block_kv != _ops.PAGE_TOKENS:
        raise fail(fn, "block_kv", f"{_ops.PAGE_TOKENS} (tokens per page)", block_kv)
    num_sms = _ops.integer(fn, "num_sms", num_sms, 1)
    if indices is not None:
        tensor(fn, "indices", indices, torch.int32, 1, "[B]")
    rows = context_lens.numel()
    units = torch.arange(num_sms + 1, dtype=torch.int64, device=context_lens.device)
    return torch.stack([units * rows // num_sms, torch.zeros_like(units)], dim=1).to(torch.int32)


def fp8_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                         clean_logits=False, indices=None):
    """Paged (decode / MTP) indexer logits.

    q:            float8_e4m3fn [B, next_n, H, D]
    kv_cache:     uint8 [P, 64, 1, D + 4] (DeepGEMM's view; [P, 64*(D+4)] and [P, 64, D+4] work too)
    weights:      float32 [B * next_n, H]
    context_lens: int32 [B, next_n] (row b*next_n+i reads keys s < context_lens[b, i]; DeepGEMM's current form)
                  or int32 [B] (older DeepGEMM: row b*next_n+i reads s < context_lens[b] - next_n + i + 1)
    block_table:  int32 [B, max_pages]
    schedule_meta: int32 [num_sms + 1, 2] from get_paged_mqa_logits_metadata (checked, not read)
    max_context_len: int, the logits width
    indices:      optional int32 [B] (DeepGEMM's varlen hint: block_table / context_lens are already per row;
                  accepted and checked, not needed)
    Returns float32 [B * next_n, max_context_len]; -inf where a row may not read.
    """
    fn = "deep_gemm.fp8_paged_mqa_logits"
    _check_q(fn, q, 4, "[B, next_n, H, D]")
    tensor(fn, "schedule_meta", schedule_meta, torch.int32, 2, "[num_sms + 1, 2]")
    if schedule_meta.shape[1] != 2:
        raise fail(fn, "schedule_meta", "[num_sms + 1, 2]", describe(schedule_meta))
    max_context_len = _ops.integer(fn, "max_context_len", max_context_len, 0)
    if indices is not None:
        tensor(fn, "indices", indices, torch.int32, 1, "[B]")
    b, next_n = q.shape[0], q.shape[1]
    out = torch.empty((b * next_n, max_context_len), dtype=torch.float32, device=q.device)
    _ops.paged_logits(q, kv_cache, weights, context_lens, block_table, next_n, bool(clean_logits), out)
    return out


def fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_table, schedule_meta, max_context_len,
                             clean_logits=False, logits_dtype=torch.float32, indices=None):
    """fp8_paged_mqa_logits with q given as (q_fp8, None) and the logits dtype chosen (float32 or bfloat16)."""
    fn = "deep_gemm.fp8_fp4_paged_mqa_logits"
    if not isinstance(q, (tuple, list)) or len(q) != 2 or q[1] is not None:
        raise fail(fn, "q", "(q_fp8, None): keysel serves fp8 q only", describe(q))
    _logits_dtype(fn, logits_dtype)
    logits = fp8_paged_mqa_logits(q[0], kv_cache, weights, context_lens, block_table, schedule_meta,
                                  max_context_len, clean_logits, indices)
    return logits if logits_dtype == torch.float32 else logits.to(logits_dtype)

"""SGLang's DeepSeek-V3.2 top-k kernels (sgl_kernel.fast_topk_v2 and the fused transforms), served by keysel.

``from keysel.compat.sglang import fast_topk_v2, fast_topk_transform_fused, fast_topk_transform_ragged_fused``
replaces the sgl_kernel imports (sgl-kernel/python/sgl_kernel/top_k.py, sgl-kernel/csrc/elementwise/topk.cu;
docs/compat.md):

    fast_topk_v2(score, lengths, topk, row_starts=None) -> int32 [R, topk]
    fast_topk_transform_fused(score, lengths, page_table_size_1, cu_seqlens_q, topk, row_starts=None)
        -> int32 [R, topk]  (cache slots)
    fast_topk_transform_ragged_fused(score, lengths, topk_indices_offset, topk, row_starts=None)
        -> int32 [R, topk]  (positions in the ragged key buffer)

Row r chooses among score[r, row_starts[r] : row_starts[r] + lengths[r]] (row_starts = 0 when None). Raw
indices are relative to row_starts[r]; padding is -1. Deviations: any topk >= 1 (sgl_kernel asserts 2048);
exact with ties to the lower index (sgl_kernel: any of the tied); output in ascending raw-index order
(sgl_kernel: unspecified); CPU tensors work too.
"""

from __future__ import annotations

import torch

from . import _ops
from ._ops import describe, fail, same_device, shape_is, tensor

__all__ = ["fast_topk_v2", "fast_topk_transform_fused", "fast_topk_transform_ragged_fused"]


def _windows(fn, score, lengths, topk, row_starts):
    return _ops.length_windows(fn, score, lengths, topk, row_starts)


def fast_topk_v2(score, lengths, topk, row_starts=None):
    """Top-k positions of each score row.

    score:      float32 [R, L] (last dim contiguous in sgl_kernel; any strides here)
    lengths:    int32 [R]; topk: int; row_starts: optional int32 [R]
    Returns int32 [R, topk]: positions relative to row_starts[r], ascending, -1 padded.
    """
    fn = "sglang.fast_topk_v2"
    rows, topk, starts, ends = _windows(fn, score, lengths, topk, row_starts)
    out = torch.empty((rows, topk), dtype=torch.int32, device=score.device)
    return _ops.topk_rows(score, starts, ends, topk, out)


def fast_topk_transform_fused(score, lengths, page_table_size_1, cu_seqlens_q, topk, row_starts=None):
    """Top-k, then each chosen position translated to its cache slot through a page table of page size 1.

    page_table_size_1: int32 [B, max_len]; cu_seqlens_q: int32 [B + 1] (query rows of each request).
    Row r uses page-table row r when row_starts is None and B == R (decode), else the b with
    cu_seqlens_q[b] <= r < cu_seqlens_q[b + 1] (extend, target verify). Output[r, j] =
    page_table_size_1[b, raw[r, j]] (raw relative to row_starts[r]), -1 for padding. Returns int32 [R, topk].
    """
    fn = "sglang.fast_topk_transform_fused"
    rows, topk, starts, ends = _windows(fn, score, lengths, topk, row_starts)
    tensor(fn, "page_table_size_1", page_table_size_1, torch.int32, 2, "[B, max_len]")
    tensor(fn, "cu_seqlens_q", cu_seqlens_q, torch.int32, 1, "[B + 1]")
    batch = page_table_size_1.shape[0]
    shape_is(fn, "cu_seqlens_q", cu_seqlens_q, (batch + 1,), "[B + 1] (B = page_table_size_1.shape[0])")
    if batch > rows:
        raise fail(fn, "page_table_size_1", f"at most R = {rows} rows", describe(page_table_size_1))
    same_device(fn, score, page_table_size_1=page_table_size_1, cu_seqlens_q=cu_seqlens_q)
    raw = _ops.topk_rows(score, starts, ends, topk, torch.empty((rows, topk), dtype=torch.int32,
                                                                  device=score.device))
    if row_starts is None and batch == rows:
        row_batch = torch.arange(rows, device=score.device, dtype=torch.int64)
    else:
        row_batch = _ops.batch_of_rows(cu_seqlens_q, rows)
    return _ops.gather_slots(raw, page_table_size_1, row_batch)


def fast_topk_transform_ragged_fused(score, lengths, topk_indices_offset, topk, row_starts=None):
    """Top-k, then each chosen relative position plus topk_indices_offset[r] (-1 padding kept).

    topk_indices_offset: int32 [R]. Returns int32 [R, topk].
    """
    fn = "sglang.fast_topk_transform_ragged_fused"
    rows, topk, starts, ends = _windows(fn, score, lengths, topk, row_starts)
    tensor(fn, "topk_indices_offset", topk_indices_offset, torch.int32, 1, "[R]")
    shape_is(fn, "topk_indices_offset", topk_indices_offset, (rows,), "[R]")
    same_device(fn, score, topk_indices_offset=topk_indices_offset)
    raw = _ops.topk_rows(score, starts, ends, topk, torch.empty((rows, topk), dtype=torch.int32,
                                                                  device=score.device))
    return torch.where(raw < 0, raw, raw + topk_indices_offset.unsqueeze(1))

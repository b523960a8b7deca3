"""FlashInfer's top-k selection ops for sparse attention (flashinfer.topk), served by keysel.

``from keysel.compat import flashinfer`` gives the FlashInfer names and signatures (flashinfer/topk.py of
flashinfer-ai/flashinfer; docs/compat.md):

    top_k(input, k, sorted=False, deterministic=False, tie_break=0) -> (values [R, k], int64 indices [R, k])
    top_k_page_table_transform(input, src_page_table, lengths, k, row_to_batch=None, deterministic=False,
        tie_break=0, dsa_graph_safe=False, row_starts=None, page_table_row_starts=None, *, page_size=1,
        out=None, out_raw_indices=None) -> int32 [R, k]
    top_k_ragged_transform(input, offsets, lengths, k, deterministic=False, tie_break=0, dsa_graph_safe=False,
        row_starts=None) -> int32 [R, k]

Row i chooses among input[i, row_starts[i] : row_starts[i] + lengths[i]]; raw indices are relative to
row_starts[i]; padding is -1. keysel is always deterministic, exact, graph-safe and prefers the lower index on
ties, so deterministic, dsa_graph_safe and tie_break 0 / 1 are accepted and change nothing; tie_break=2 (prefer
larger indices) raises keysel.Error. Transform outputs list the chosen entries in ascending raw-index order.
"""

from __future__ import annotations

import torch

from . import _ops
from ._ops import describe, fail, same_device, shape_is, tensor

__all__ = ["TopKTieBreak", "top_k", "topk", "top_k_page_table_transform", "top_k_ragged_transform"]


class TopKTieBreak:
    """FlashInfer's tie-break modes (plain ints)."""

    NONE = 0
    SMALL = 1
    LARGE = 2


_SCORES = (torch.float32, torch.float16, torch.bfloat16)


def _tie_break(fn, tie_break):
    tie_break = _ops.integer(fn, "tie_break", int(tie_break) if hasattr(tie_break, "__int__") else tie_break, 0)
    if tie_break not in (0, 1):
        raise fail(fn, "tie_break", "0 (none) or 1 (prefer smaller indices): keysel always prefers the smaller",
                   tie_break)


def _windows(fn, scores, lengths, k, row_starts):
    return _ops.length_windows(fn, scores, lengths, k, row_starts, names=("input", "k"), dtypes=_SCORES,
                               rows_name="num_rows", width_name="max_len")


def _out(fn, name, buffer, rows, k, device):
    if buffer is None:
        return None
    tensor(fn, name, buffer, torch.int32, 2, "[num_rows, k]")
    shape_is(fn, name, buffer, (rows, k), "[num_rows, k]")
    if buffer.device != device:
        raise fail(fn, name, f"a tensor on {device}", describe(buffer))
    if not buffer.is_contiguous():
        raise fail(fn, name, "a contiguous tensor", f"strides {list(buffer.stride())}")
    return buffer


def top_k(input, k, sorted=False, deterministic=False, tie_break=0):
    """Top-k of each row of input (float32 / float16 / bfloat16 [R, d]), k <= d.

    Returns (values [R, k] in input's dtype, indices int64 [R, k]); sorted=True orders them by descending value
    (equal values: lower index first), sorted=False by ascending index.
    """
    fn = "flashinfer.top_k"
    _tie_break(fn, tie_break)
    tensor(fn, "input", input, _SCORES, 2, "[batch_size, d]")
    rows, width = input.shape
    k = _ops.integer(fn, "k", k, 1)
    if k > width:
        raise fail(fn, "k", f"at most d = {width}", k)
    zeros = torch.zeros(rows, dtype=torch.int32, device=input.device)
    raw = _ops.topk_rows(input, zeros, torch.full_like(zeros, width), k,
                         torch.empty((rows, k), dtype=torch.int32, device=input.device))
    indices = raw.to(torch.int64)
    values = torch.gather(input, 1, indices)
    if sorted:
        key = values.to(torch.float32)
        key = torch.where(torch.isnan(key), torch.full_like(key, float("-inf")), key)  # NaN last, as chosen
        order = torch.sort(key, dim=1, descending=True, stable=True).indices
        values, indices = torch.gather(values, 1, order), torch.gather(indices, 1, order)
    return values, indices


topk = top_k


def top_k_page_table_transform(input, src_page_table, lengths, k, row_to_batch=None, deterministic=False,
                               tie_break=0, dsa_graph_safe=False, row_starts=None, page_table_row_starts=None, *,
                               page_size=1, out=None, out_raw_indices=None):
    """Top-k per row, translated through a page table.

    input:          float32 / float16 / bfloat16 [num_rows, max_len]
    src_page_table: int32 [batch_size, max_page_table_length]
    lengths:        int32 [num_rows]; k: int >= 1
    row_to_batch:   optional int32 [num_rows] (page-table row of each row; default: the row itself)
    row_starts:     optional int32 [num_rows] (window start; default 0)
    page_table_row_starts: optional int32 [num_rows], in page-table entries (default: row_starts; required with
                    row_starts when page_size > 1)
    page_size:      positions per page-table entry (a power of two <= 2**30)
    out, out_raw_indices: optional contiguous int32 [num_rows, k] buffers
    Output[i, j] = src_page_table[b, page_table_row_starts[i] + idx // page_size] * page_size + idx % page_size
    for each chosen raw index idx (relative to row_starts[i]); -1 padding. Returns out (int32 [num_rows, k]).
    """
    fn = "flashinfer.top_k_page_table_transform"
    _tie_break(fn, tie_break)
    rows, k, starts, ends = _windows(fn, input, lengths, k, row_starts)
    tensor(fn, "src_page_table", src_page_table, torch.int32, 2, "[batch_size, max_page_table_length]")
    page_size = _ops.integer(fn, "page_size", page_size, 1)
    if page_size > (1 << 30) or page_size & (page_size - 1):
        raise fail(fn, "page_size", "a positive power of two <= 2**30", page_size)
    if page_size > 1 and row_starts is not None and page_table_row_starts is None:
        raise fail(fn, "page_table_row_starts", "a tensor when page_size > 1 and row_starts is given", None)
    if row_to_batch is not None:
        tensor(fn, "row_to_batch", row_to_batch, torch.int32, 1, "[num_rows]")
        shape_is(fn, "row_to_batch", row_to_batch, (rows,), "[num_rows]")
    elif src_page_table.shape[0] < rows:
        raise fail(fn, "src_page_table", f"at least num_rows = {rows} rows (no row_to_batch)",
                   describe(src_page_table))
    if page_table_row_starts is not None:
        tensor(fn, "page_table_row_starts", page_table_row_starts, torch.int32, 1, "[num_rows]")
        shape_is(fn, "page_table_row_starts", page_table_row_starts, (rows,), "[num_rows]")
    out = _out(fn, "out", out, rows, k, input.device)
    out_raw_indices = _out(fn, "out_raw_indices", out_raw_indices, rows, k, input.device)
    if out is not None and out_raw_indices is not None and out.data_ptr() == out_raw_indices.data_ptr():
        raise fail(fn, "out_raw_indices", "a buffer apart from out", "the same memory")
    same_device(fn, input, src_page_table=src_page_table, row_to_batch=row_to_batch,
                page_table_row_starts=page_table_row_starts)

    raw = out_raw_indices if out_raw_indices is not None else \
        torch.empty((rows, k), dtype=torch.int32, device=input.device)
    _ops.topk_rows(input, starts, ends, k, raw)
    batch = row_to_batch.to(torch.int64) if row_to_batch is not None else \
        torch.arange(rows, device=input.device, dtype=torch.int64)
    table_start = page_table_row_starts if page_table_row_starts is not None else row_starts
    slots = _ops.gather_slots(raw, src_page_table, batch,
                              table_start.to(torch.int64) if table_start is not None else None, page_size)
    if out is None:
        return slots
    out.copy_(slots)
    return out


def top_k_ragged_transform(input, offsets, lengths, k, deterministic=False, tie_break=0, dsa_graph_safe=False,
                           row_starts=None):
    """Top-k per row plus a per-row offset: output[i, j] = raw[i, j] + offsets[i] (raw relative to
    row_starts[i]), -1 padding. offsets: int32 [num_rows]. Returns int32 [num_rows, k]."""
    fn = "flashinfer.top_k_ragged_transform"
    _tie_break(fn, tie_break)
    rows, k, starts, ends = _windows(fn, input, lengths, k, row_starts)
    tensor(fn, "offsets", offsets, torch.int32, 1, "[num_rows]")
    shape_is(fn, "offsets", offsets, (rows,), "[num_rows]")
    same_device(fn, input, offsets=offsets)
    raw = _ops.topk_rows(input, starts, ends, k, torch.empty((rows, k), dtype=torch.int32, device=input.device))
    return torch.where(raw < 0, raw, raw + offsets.unsqueeze(1))

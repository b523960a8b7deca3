"""keysel: choose which cached keys top-k sparse attention reads, and measure how well a choice does.

keysel picks, for each query token, the k cached keys attention should read (the exact top-k of the attention
itself, or a cheap approximation such as DeepSeek-V3.2's Lightning Indexer over a low-precision key cache),
runs exact attention over just those keys, and scores any selection against the exact top-k (recall,
attention mass, KL, top-1, output error). This package is the Python face of the keysel C++ library;
docs/SPEC.md defines every number and docs/python.md every rule below.

Shapes (SPEC §1): T query tokens, N cached keys, Hq query heads, Hkv key/value heads, D head dim, HI indexer
heads, DI indexer dim, G selection groups (granularity "per_head": Hq, "per_kv_head": Hkv, "per_token": 1).

    q           [T, Hq, D]     float32, float16 or bfloat16
    k_cache     [N, Hkv, D]    as a KV cache stores it; v_cache [N, Hkv, Dv]
    positions   [T] int32      query t may read keys s <= positions[t]
    selection   [T, G, W] int32  ascending key positions, then -1 padding (W = k, or k + n_sink + n_local
                               with kept_on_top=True)

Tensors: NumPy arrays or any DLPack producer (torch, CuPy, JAX), CPU or CUDA, read in place without copies.
Results come back in the inputs' library (torch if any tensor argument is torch, else CuPy if any is CuPy, else
NumPy), or are written into out=. Bad input raises keysel.Error (a ValueError) naming the argument, and writes
nothing.

    import numpy as np, keysel
    q = np.random.randn(4, 8, 64).astype(np.float32); k = np.random.randn(100, 2, 64).astype(np.float32)
    pos = np.array([40, 60, 80, 99], np.int32)
    sel = keysel.exact_topk(q, k, pos, 16)                      # int32 [4, 2, 16]
    out, lse = keysel.sparse_attention(q, k, k, sel)            # float32 [4, 8, 64], [4, 8]

Functions: select_topk, exact_topk, indexer_scores, IndexerKeyCache, sparse_attention, metrics, make_selector,
load_dump, run_study; DeepSeek-V3.2's DSA formats: topk_rows, paged_mqa_logits, ragged_mqa_logits, select_topk_paged,
indexer_k_quant_and_cache, sparse_mla (and sparse_mla_backward), mla_v32_quantize; on a GPU also indexer_logits_cuda and indexer_topk_cuda (select_topk and sparse_attention
take CUDA tensors too); set_num_threads, num_threads, simd_level, built_with_cuda, cuda_device_count.
PyTorch integration lives in keysel.torch (import it explicitly: import keysel.torch).
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import _C
from . import _interop as _io

Error = _C.Error
__version__ = _C.__version__

built_with_cuda = _C.built_with_cuda
built_with_faiss = _C.built_with_faiss
cuda_device_count = _C.cuda_device_count
num_threads = _C.num_threads
set_num_threads = _C.set_num_threads
simd_level = _C.simd_level
set_simd_level = _C.set_simd_level

__all__ = [
    "Error", "IndexerKeyCache", "Selector", "built_with_cuda", "built_with_faiss", "cuda_device_count", "exact_topk",
    "indexer_logits_cuda", "indexer_scores", "indexer_topk_cuda", "load_dump", "make_selector", "metric_names",
    "metrics", "num_threads", "run_study", "select_topk", "select_topk_workspace_bytes", "set_num_threads",
    "set_simd_level", "simd_level", "sparse_attention", "sparse_attention_backward", "sparse_attention_prefill",
    "sparse_attention_prefill_supported", "indexer_kl_loss_reference", "indexer_topk_workspace_bytes", "topk_rows",
    "topk_rows_workspace_bytes", "paged_mqa_logits", "ragged_mqa_logits", "select_topk_paged", "paged_topk_workspace_bytes",
    "indexer_k_quant_and_cache", "sparse_mla", "sparse_mla_backward", "sparse_mla_workspace_bytes", "mla_v32_quantize",
]


def _scale(scale, function):
    if scale is None:
        return 0.0
    value = float(scale)
    if not (value > 0.0 and np.isfinite(value)):
        raise _io.fail(function, "scale", "a finite scale > 0 (or None for 1/sqrt(D))", scale)
    return value


def metric_names() -> list[str]:
    """The SPEC §4 metrics keysel.metrics reports, in order."""
    return list(_C.metric_names())


# ---- selection -------------------------------------------------------------------------------------------
def select_topk(scores, positions, k, *, n_sink=0, n_local=0, kept_on_top=False, out=None, stream=None,
                workspace=None):
    """Top-k of any score over the allowed keys, plus the always-kept keys (SPEC §2).

    scores:    float32 or float64 [T, G, N]; higher is better. NaN is never selected; -inf can be.
    positions: int32 [T]; row t may read keys s <= positions[t].
    k:         keys per row (>= 1). n_sink: always keep keys 0..n_sink-1; n_local: always keep the last n_local
               allowed keys; they count toward k unless kept_on_top=True (then W = k + n_sink + n_local).
    out:       optional int32 [T, G, W] written in place.
    stream:    CUDA inputs only: an int cudaStream_t or a torch/CuPy stream (default: the current one).
    workspace: CUDA inputs only (ignored on the CPU): a contiguous tensor on the same GPU of at least
               select_topk_workspace_bytes(T, G, N) bytes that the call uses as scratch, so that it allocates
               nothing (CUDA graph capture without memory nodes). None: scratch from a stream-ordered pool.
    Returns int32 [T, G, W]: per row the selected key positions ascending, then -1 padding. Equal scores prefer
    the lower position. CUDA tensors (float32 scores, int32 positions on the same GPU) run keysel's CUDA top-k
    asynchronously on the stream, with the identical result.
    """
    fn = "select_topk"
    scores_c, _ = _io.arg(scores, fn, "scores")
    positions_c, _ = _io.arg(positions, fn, "positions")
    t, g, _n = _io.shape(scores, fn, "scores", 3, "[T, G, N]")
    width = _io.call(fn, _io.POLICY, _C.selection_width, k, n_sink, n_local, kept_on_top, fn)
    result = out if out is not None else _io.empty((t, g, width), "int32", (scores, positions), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"selection": "out", **_io.POLICY}, _C.select_topk, scores_c, positions_c, k, n_sink, n_local,
             kept_on_top, out_c, _io.stream_handle(stream, (scores,)), _io.workspace(workspace, fn))
    return result


def exact_topk(q, k_cache, positions, k, *, granularity="per_kv_head", scale=None, n_sink=0, n_local=0,
               kept_on_top=False, out=None):
    """The exact top-k E[t, G] of the main attention (SPEC §2): the k allowed keys with the largest group-mean
    probability pbar, computed in double precision on the CPU.

    q: [T, Hq, D]; k_cache: [N, Hkv, D] (float32, float16 or bfloat16); positions: int32 [T].
    granularity: "per_head" (G = Hq), "per_kv_head" (G = Hkv) or "per_token" (G = 1). scale: softmax scale,
    default 1/sqrt(D). n_sink, n_local, kept_on_top as in select_topk. out: optional int32 [T, G, W].
    Returns int32 [T, G, W], ascending positions then -1 padding.
    """
    fn = "exact_topk"
    q_c, _ = _io.arg(q, fn, "q")
    k_c, _ = _io.arg(k_cache, fn, "k_cache")
    p_c, _ = _io.arg(positions, fn, "positions")
    t, hq, _d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
    _n, hkv, _d2 = _io.shape(k_cache, fn, "k_cache", 3, "[N, Hkv, D]")
    groups = _io.call(fn, _io.GROUPS, _C.group_count, granularity, hq, hkv)
    width = _io.call(fn, _io.POLICY, _C.selection_width, k, n_sink, n_local, kept_on_top, fn)
    result = out if out is not None else _io.empty((t, groups, width), "int32", (q, k_cache, positions), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"selection": "out", **_io.ATTENTION}, _C.exact_topk, q_c, k_c, p_c, k, granularity,
             _scale(scale, fn), n_sink, n_local, kept_on_top, out_c)
    return result


# ---- the Lightning Indexer -------------------------------------------------------------------------------
def _uint8_only(x, dtype):
    """dtype= applies to byte tensors (uint8 / int8) only; other tensors keep their own dtype."""
    if dtype is None:
        return None
    name = str(getattr(x, "dtype", "")).removeprefix("torch.")
    return dtype if name in ("uint8", "int8", "float8_e4m3fn", "float8_e5m2") else None


def _default_positions(t, n, like):
    """Every query may read every key: positions[t] = N - 1, in the library of `like`."""
    return _io.empty((t,), "int32", (like,), "indexer_scores", fill=n - 1)


def indexer_scores(q_index, weights, k_index, positions=None, *, out=None, dtype=None):
    """The Lightning-Indexer score I[t, s] = sum_j w[t, j] * ReLU(qI[t, j] . kI[s]) (SPEC §3), in float32.

    q_index:   [T, HI, DI] float32, float16, bfloat16 or float8 (torch.float8_e4m3fn / float8_e5m2, or uint8
               bytes with dtype="fp8_e4m3" / "fp8_e5m2"; fp8 values are decoded exactly)
    weights:   float32 [T, HI]
    k_index:   [N, DI], the same dtypes (one indexer key per cached token)
    positions: int32 [T] or None (every query reads every key); keys s > positions[t] score -inf.
    out:       optional float32 [T, N], contiguous.
    dtype:     the fp8 format of uint8 q_index / k_index bytes.
    Returns float32 [T, N]. Products are fp32, as the fp32 indexer computes them; for low-precision keys use
    IndexerKeyCache.
    """
    fn = "indexer_scores"
    q_c, q_dtype = _io.arg(q_index, fn, "q_index", _uint8_only(q_index, dtype))
    w_c, _ = _io.arg(weights, fn, "weights")
    k_c, k_dtype = _io.arg(k_index, fn, "k_index", _uint8_only(k_index, dtype))
    t, _hi, _di = _io.shape(q_index, fn, "q_index", 3, "[T, HI, DI]")
    n, _di2 = _io.shape(k_index, fn, "k_index", 2, "[N, DI]")
    if positions is None:
        positions = _default_positions(t, n, q_index)
    p_c, _ = _io.arg(positions, fn, "positions")
    result = out if out is not None else _io.empty((t, n), "float32", (q_index, weights, k_index), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"scores": "out", "queries": "q_index", "keys": "k_index"}, _C.indexer_scores, q_c, q_dtype, w_c,
             k_c, k_dtype, p_c, out_c)
    return result


class IndexerKeyCache:
    """The Lightning Indexer's low-precision key cache: one indexer key per cached token (SPEC §3).

    IndexerKeyCache(dim, format="fp8_e4m3", scale="per_token", group_size=128, power_of_two_scales=False,
                    hadamard=False, device="cpu")
      dim:    DI, channels per key
      format: "fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "int8" or "int4"
      scale:  "per_token" (one scale per key) or "per_group" (one per group_size channels: 32, 64 or 128)
      power_of_two_scales: round scales up to powers of two (DeepSeek-V3.2's ue8m0)
      hadamard: rotate the channel axis before quantising (queries are rotated alike; dot products unchanged)
      device: "cpu" (host memory), or a CUDA device ("cuda", "cuda:1"; torch tensors): the engines' paged fp8
              layout (SPEC §7) in GPU memory, scored by keysel's CUDA indexer; fp8_e4m3 per_token, DI 64 or 128,
              no hadamard; the same codes and scales as the CPU cache, results within the CUDA indexer's fp8
              accumulation of the CPU's

    .append(keys)                     keys [n, DI] float32/float16/bfloat16; quantised as appended
    .scores(q_index, weights, positions=None)            -> float32 [T, N]
    .select(q_index, weights, positions, k, ...)         -> int32 [T, 1, W] (one selection shared by all heads)
    .nbytes                           bytes the cache stores (codes and scales); len(cache) == N
    """

    def __init__(self, dim, format="fp8_e4m3", scale="per_token", group_size=128, power_of_two_scales=False,
                 hadamard=False, device="cpu"):
        fn = "IndexerKeyCache"
        if int(dim) < 1:
            raise _io.fail(fn, "dim", ">= 1", dim)
        self.last_cost = None
        if str(device) != "cpu":
            from ._cuda_key_cache import CudaKeyCache

            self._cache = CudaKeyCache(fn, int(dim), format, scale, power_of_two_scales, hadamard, device)
            self.device = str(self._cache.device)
            return
        self._cache = _io.call(fn, {}, _C.IndexerKeyCache, int(dim), format, scale, int(group_size),
                               bool(power_of_two_scales), bool(hadamard))
        self.device = "cpu"

    def __len__(self):
        return int(self._cache.size)

    def __repr__(self):
        return f"keysel.IndexerKeyCache(dim={self.dim}, {self.config}, tokens={len(self)})"

    @property
    def dim(self) -> int:
        return int(self._cache.dim)

    @property
    def config(self) -> str:
        """The storage as text: "fp8_e4m3", "int4/g32/ue8m0/hadamard", ..."""
        return self._cache.config

    @property
    def nbytes(self) -> int:
        """Bytes stored: per key the codes (padded to 32 channels) and 4 bytes per scale."""
        return int(self._cache.size) * self.bytes_per_token

    @property
    def bytes_per_token(self) -> int:
        return self.dim + 4 if self.device != "cpu" else int(self._cache.bytes_per_token)

    def append(self, keys, *, dtype=None):
        """Appends keys [n, DI] (float32, float16, bfloat16 or float8 on the CPU, any strides; uint8 bytes with
        dtype="fp8_e4m3" / "fp8_e5m2"). A non-finite value raises keysel.Error and leaves the cache unchanged."""
        fn = "IndexerKeyCache.append"
        if self.device != "cpu":
            self._cache.append(fn, keys)
            return
        keys_c, keys_dtype = _io.arg(keys, fn, "keys", _uint8_only(keys, dtype))
        _io.call(fn, {}, self._cache.append, keys_c, keys_dtype)

    def clear(self):
        """Removes every key (keeps the configuration)."""
        self._cache.clear()

    def scores(self, q_index, weights, positions=None, *, out=None, dtype=None):
        """I[t, s] for every cached key (SPEC §3), from quantised queries and keys.

        q_index [T, HI, DI] float32/float16/bfloat16; weights float32 [T, HI]; positions int32 [T] or None (every
        key allowed). Returns float32 [T, N]; keys s > positions[t] score -inf.
        """
        fn = "IndexerKeyCache.scores"
        q_c, q_dtype = _io.arg(q_index, fn, "q_index", _uint8_only(q_index, dtype))
        w_c, _ = _io.arg(weights, fn, "weights")
        t, _hi, _di = _io.shape(q_index, fn, "q_index", 3, "[T, HI, DI]")
        n = len(self)
        if positions is None:
            positions = _default_positions(t, n, q_index)
        if self.device != "cpu":
            return self._cache.scores(fn, q_index, weights, positions, out)
        p_c, _ = _io.arg(positions, fn, "positions")
        result = out if out is not None else _io.empty((t, n), "float32", (q_index, weights), fn)
        out_c, _ = _io.arg(result, fn, "out")
        _io.call(fn, {"scores": "out", "queries": "q_index"}, self._cache.scores, q_c, q_dtype, w_c, p_c, out_c)
        return result

    def select(self, q_index, weights, positions, k, *, n_sink=0, n_local=0, kept_on_top=False, out=None,
               dtype=None):
        """The top-k keys by the indexer score plus the kept keys, scored block by block (never holding [T, N]).

        Returns int32 [T, 1, W] (DeepSeek Sparse Attention shares one selection among all heads): the same
        selection select_topk makes from scores(), bit for bit. The cost (SPEC §5) is in .last_cost.
        """
        fn = "IndexerKeyCache.select"
        if self.device != "cpu":
            self.last_cost = None
            return self._cache.select(fn, q_index, weights, positions, k, n_sink, n_local, kept_on_top, out)
        q_c, q_dtype = _io.arg(q_index, fn, "q_index", _uint8_only(q_index, dtype))
        w_c, _ = _io.arg(weights, fn, "weights")
        p_c, _ = _io.arg(positions, fn, "positions")
        t, _hi, _di = _io.shape(q_index, fn, "q_index", 3, "[T, HI, DI]")
        width = _io.call(fn, _io.POLICY, _C.selection_width, k, n_sink, n_local, kept_on_top, fn)
        result = out if out is not None else _io.empty((t, 1, width), "int32", (q_index, weights, positions), fn)
        out_c, _ = _io.arg(result, fn, "out")
        self.last_cost = _io.call(fn, {"selection": "out", "queries": "q_index", **_io.POLICY}, self._cache.select,
                                  q_c, q_dtype, w_c, p_c, k, n_sink, n_local, kept_on_top, out_c)
        return result


def _paged_indexer_args(fn, q_index, weights, blocks, positions, block_table, sequence_of_row):
    """The core's views of the paged-indexer arguments shared by indexer_logits_cuda and indexer_topk_cuda, and R."""
    q_c, q_dtype = _io.arg(q_index, fn, "q_index", _uint8_only(q_index, "fp8_e4m3"))
    w_c, _ = _io.arg(weights, fn, "weights")
    b_c, b_dtype = _io.arg(blocks, fn, "blocks", _uint8_only(blocks, "fp8_e4m3"))
    p_c, _ = _io.arg(positions, fn, "positions")
    table_c = None if block_table is None else _io.arg(block_table, fn, "block_table")[0]
    rows_c = None if sequence_of_row is None else _io.arg(sequence_of_row, fn, "sequence_of_row")[0]
    r = _io.shape(q_index, fn, "q_index", 3, "[R, HI, DI]")[0]
    return q_c, q_dtype, w_c, b_c, b_dtype, p_c, table_c, rows_c, r


def indexer_logits_cuda(q_index, weights, blocks, positions, n_keys, *, block_table=None, sequence_of_row=None,
                        out=None, stream=None):
    """The Lightning Indexer on a GPU over a serving engine's paged fp8 key cache (keysel's CUDA kernel as it is).

    I[r, s] = scale[s] * sum_j weights[r, j] * ReLU(q_index[r, j] . k[s]) for s <= positions[r] (SPEC §3), fp8
    products accumulated in fp32 by the tensor cores; needs a GPU of compute capability 8.9 or newer.
      q_index:   fp8 e4m3 [R, HI, DI] (torch.float8_e4m3fn, or uint8 bytes), contiguous; HI 16/32/64/128, DI 64/128
      weights:   float32 [R, HI], each query head's scale (and any softmax scale) folded in
      blocks:    uint8 pages [num_blocks, 64 * (DI + 4)] (or viewed [num_blocks, 64, DI + 4] / [.., 64, 1, DI + 4]),
                 the engines' layout (SPEC §7): per page its 64 tokens' DI fp8 e4m3 bytes, then their 64 fp32 scales
      positions: int32 [R]; n_keys: N, the width of the logits
      block_table: int32 [S, max_blocks] (token s of sequence q is row s % 64 of block block_table[q, s // 64]) or
                 None (sequence q owns blocks [q * ceil(N/64), (q+1) * ceil(N/64)))
      sequence_of_row: int32 [R] (prefill: the sequence of each query row) or None (row r reads sequence r)
    Returns float32 [R, N] (-inf beyond each row's allowed keys), enqueued on `stream`.
    """
    fn = "indexer_logits_cuda"
    q_c, q_dtype, w_c, b_c, b_dtype, p_c, table_c, rows_c, r = _paged_indexer_args(
        fn, q_index, weights, blocks, positions, block_table, sequence_of_row)
    result = out if out is not None else _io.empty((r, int(n_keys)), "float32", (q_index, weights, positions), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"logits": "out", "q": "q_index", "cache.blocks": "blocks", "cache.block_table": "block_table"},
             _C.indexer_logits_cuda, q_c, q_dtype, w_c, b_c, b_dtype, table_c, p_c, rows_c, out_c,
             _io.stream_handle(stream, (q_index,)))
    return result


def indexer_topk_cuda(q_index, weights, blocks, positions, n_keys, k, *, n_sink=0, n_local=0, kept_on_top=False,
                      block_table=None, sequence_of_row=None, out=None, stream=None, workspace=None):
    """Decode selection on a GPU: indexer_logits_cuda into scratch memory, then keysel's CUDA top-k.

    Arguments as indexer_logits_cuda, plus k, n_sink, n_local, kept_on_top as in select_topk, and workspace: None
    (scratch from a stream-ordered pool) or a contiguous tensor on the GPU of at least
    indexer_topk_workspace_bytes(R, n_keys) bytes, used instead (the call then allocates nothing).
    Returns int32 [R, 1, W] (one selection per token, shared by all heads), enqueued on `stream`.
    """
    fn = "indexer_topk_cuda"
    q_c, q_dtype, w_c, b_c, b_dtype, p_c, table_c, rows_c, r = _paged_indexer_args(
        fn, q_index, weights, blocks, positions, block_table, sequence_of_row)
    width = _io.call(fn, _io.POLICY, _C.selection_width, k, n_sink, n_local, kept_on_top, fn)
    result = out if out is not None else _io.empty((r, 1, width), "int32", (q_index, weights, positions), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"selection": "out", "q": "q_index", "cache.blocks": "blocks", "cache.block_table": "block_table",
                  **_io.POLICY},
             _C.indexer_topk_cuda, q_c, q_dtype, w_c, b_c, b_dtype, table_c, p_c, int(n_keys), k, n_sink, n_local,
             kept_on_top, rows_c, out_c, _io.stream_handle(stream, (q_index,)), _io.workspace(workspace, fn))
    return result


def select_topk_workspace_bytes(t, g, n):
    """Bytes of GPU scratch select_topk may use for scores [T, G, N]: the size of its workspace= (an upper bound,
    the same on every GPU)."""
    return _io.call("select_topk_workspace_bytes", {}, _C.select_topk_workspace_bytes, t, g, n)


def indexer_topk_workspace_bytes(rows, n_keys):
    """Bytes of GPU scratch indexer_topk_cuda may use for R rows of n_keys keys: the size of its workspace=."""
    return _io.call("indexer_topk_workspace_bytes", {}, _C.indexer_topk_workspace_bytes, rows, n_keys)


# ---- DeepSeek-V3.2 in the engines' formats (SPEC §7; keysel.compat wraps these with the peers' signatures) ----
def topk_rows(logits, k, *, starts=None, ends=None, lengths=None, next_n=1, out=None, stream=None, workspace=None):
    """The engines' top-k over ranged rows (SPEC §7): per row r of logits, the k keys of its range with the largest
    logits, as indices from the range's start, ascending, then -1 where the range holds fewer than k keys.

    logits:  float32 [R, L], unit stride along L, any row stride (>= L); CPU or CUDA.
    starts:  int32 [R] or None (0): row r's range begins at starts[r].
    ends:    int32 [R]: the range ends before ends[r]; or
    lengths: int32 [R / next_n]: row r's range holds lengths[r // next_n] - next_n + r % next_n + 1 keys (decode
             with next_n query tokens per sequence; next_n = 1: lengths[r] keys). Exactly one of ends and lengths.
    Equal logits prefer the lower index; NaN is never selected; -inf can be. Ranges are clamped to [0, L).
    out: int32 [R, k] written in place; stream / workspace as select_topk (workspace of
    topk_rows_workspace_bytes(R, L) bytes). Returns int32 [R, k].
    """
    fn = "topk_rows"
    logits_c, _ = _io.arg(logits, fn, "logits")
    r = _io.shape(logits, fn, "logits", 2, "[R, L]")[0]
    extra = [x for x in (starts, ends, lengths) if x is not None]
    result = out if out is not None else _io.empty((r, int(k)), "int32", (logits, *extra), fn)
    out_c, _ = _io.arg(result, fn, "out")

    def optional(x, name):
        return None if x is None else _io.arg(x, fn, name)[0]

    _io.call(fn, {"selection": "out"}, _C.topk_rows, logits_c, optional(starts, "starts"), optional(ends, "ends"),
             optional(lengths, "lengths"), int(next_n), k, out_c, _io.stream_handle(stream, (logits,)),
             _io.workspace(workspace, fn))
    return result


def topk_rows_workspace_bytes(rows, n):
    """Bytes of GPU scratch topk_rows may use for R rows of L logits: the size of its workspace=."""
    return _io.call("topk_rows_workspace_bytes", {}, _C.topk_rows_workspace_bytes, rows, n)


def _paged_args(fn, q, weights, kv_cache, block_table, context_lens):
    q_c, q_dtype = _io.arg(q, fn, "q", _uint8_only(q, "fp8_e4m3"))
    w_c, _ = _io.arg(weights, fn, "weights")
    c_c, c_dtype = _io.arg(kv_cache, fn, "kv_cache", _uint8_only(kv_cache, "fp8_e4m3"))
    t_c, _ = _io.arg(block_table, fn, "block_table")
    l_c, _ = _io.arg(context_lens, fn, "context_lens")
    b, next_n = _io.shape(q, fn, "q", 4, "[B, next_n, HI, DI]")[:2]
    return (q_c, q_dtype, w_c, c_c, c_dtype, t_c, l_c), b, next_n


_PAGED_RENAMES = {"cache.blocks": "kv_cache", "cache.block_table": "block_table"}


def paged_mqa_logits(q, weights, kv_cache, block_table, context_lens, max_context_len, *, out=None, stream=None):
    """DeepSeek-V3.2's indexer logits over the engines' paged fp8 cache (SPEC §7; DeepGEMM's fp8_paged_mqa_logits).

    q:            fp8 e4m3 [B, next_n, HI, DI] (torch.float8_e4m3fn, or uint8 bytes); next_n 1-4, HI 16/32/64/128,
                  DI 64/128
    weights:      float32 [B * next_n, HI], the query scales folded in
    kv_cache:     uint8 (or float8) pages [num_pages, 64 * (DI + 4)] (or viewed [num_pages, 64, DI + 4] /
                  [num_pages, 64, 1, DI + 4]): per page its 64 tokens' DI fp8 values, then their 64 fp32 scales
    block_table:  int32 [B, max_pages]; context_lens: int32 [B] (row b * next_n + i reads keys
                  s < context_lens[b] - next_n + i + 1) or [B, next_n] (s < context_lens[b, i])
    Returns float32 [B * next_n, max_context_len]: I = scale[s] * sum_h w[h] ReLU(q[h] . k[s]), -inf beyond each
    row's keys. CUDA: keysel's tensor-core kernel on `stream` (compute capability 8.9+); CPU: the double-precision
    reference, rounded to float32.
    """
    fn = "paged_mqa_logits"
    args, b, next_n = _paged_args(fn, q, weights, kv_cache, block_table, context_lens)
    result = out if out is not None else _io.empty((b * next_n, int(max_context_len)), "float32", (q, weights), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"logits": "out", **_PAGED_RENAMES}, _C.paged_mqa_logits, *args, out_c,
             _io.stream_handle(stream, (q,)))
    return result


def ragged_mqa_logits(q, weights, k_fp8, k_scale, starts, ends, *, out=None, stream=None):
    """DeepSeek-V3.2's prefill indexer logits over one contiguous fp8 key array (SPEC §7; DeepGEMM's fp8_mqa_logits).

    q:            fp8 e4m3 [M, HI, DI] (torch.float8_e4m3fn, or uint8 bytes); HI 16/32/64/128, DI 64/128 on CUDA
    weights:      float32 [M, HI], the query scales folded in
    k_fp8:        fp8 e4m3 [N, DI] (or uint8 bytes); k_scale: float32 [N]
    starts, ends: int32 [M]: row t reads keys [max(starts[t], 0), min(ends[t], N))
    Returns float32 [M, N]: I = k_scale[s] * sum_h w[h] ReLU(q[h] . k[s]) inside each row's range, -inf elsewhere.
    CUDA: keysel's tensor-core indexer on `stream` (compute capability 8.9+); CPU: the double-precision reference,
    rounded to float32.
    """
    fn = "ragged_mqa_logits"
    q_c, q_dtype = _io.arg(q, fn, "q", _uint8_only(q, "fp8_e4m3"))
    w_c, _ = _io.arg(weights, fn, "weights")
    k_c, k_dtype = _io.arg(k_fp8, fn, "k_fp8", _uint8_only(k_fp8, "fp8_e4m3"))
    s_c, _ = _io.arg(k_scale, fn, "k_scale")
    b_c, _ = _io.arg(starts, fn, "starts")
    e_c, _ = _io.arg(ends, fn, "ends")
    m = _io.shape(q, fn, "q", 3, "[M, HI, DI]")[0]
    n = _io.shape(k_fp8, fn, "k_fp8", 2, "[N, DI]")[0]
    result = out if out is not None else _io.empty((m, n), "float32", (q, weights), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"logits": "out", "key_values": "k_fp8", "key_scales": "k_scale"}, _C.ragged_mqa_logits, q_c,
             q_dtype, w_c, k_c, k_dtype, s_c, b_c, e_c, out_c, _io.stream_handle(stream, (q,)))
    return result


def select_topk_paged(q, kv_cache, weights, context_lens, block_table, k, *, n_keys=None, out=None, out_slots=None,
                      stream=None, workspace=None):
    """DeepSeek-V3.2's decode selection in one call: paged_mqa_logits, then the top-k of each row's keys.

    Arguments as paged_mqa_logits (q [B, next_n, HI, DI] gives next_n); n_keys: the longest context (default:
    64 * max_pages). Returns int32 [B * next_n, k]: key positions ascending, -1 padded; equal logits prefer the lower
    position. The logits go to scratch memory (CUDA: workspace= of paged_topk_workspace_bytes(B * next_n, n_keys)
    bytes, else the stream-ordered pool), never to a tensor of the caller's. out_slots (torch): int32
    [B * next_n, k] also receives each selected key's cache slot, block_table[b, s // 64] * 64 + s % 64 (-1 for
    padding).
    """
    fn = "select_topk_paged"
    args, b, next_n = _paged_args(fn, q, weights, kv_cache, block_table, context_lens)
    max_pages = _io.shape(block_table, fn, "block_table", 2, "[B, max_pages]")[1]
    n = int(n_keys) if n_keys is not None else 64 * max_pages
    result = out if out is not None else _io.empty((b * next_n, int(k)), "int32", (q, weights), fn)
    out_c, _ = _io.arg(result, fn, "out")
    _io.call(fn, {"selection": "out", **_PAGED_RENAMES}, _C.paged_mqa_topk, *args, n, k, out_c,
             _io.stream_handle(stream, (q,)), _io.workspace(workspace, fn))
    if out_slots is not None:
        import torch

        from .compat import _ops

        rows = torch.arange(b * next_n, device=block_table.device, dtype=torch.int64) // next_n
        out_slots.copy_(_ops.gather_slots(result, block_table, rows, page_size=64))
    return result


def paged_topk_workspace_bytes(rows, n_keys):
    """Bytes of GPU scratch select_topk_paged may use for R = B * next_n rows of n_keys keys."""
    return _io.call("paged_topk_workspace_bytes", {}, _C.indexer_topk_workspace_bytes, rows, n_keys)


def indexer_k_quant_and_cache(k, kv_cache, slot_mapping, *, scale_fmt="ue8m0"):
    """The engines' indexer-cache writer on the CPU (vLLM's indexer_k_quant_and_cache; keysel.compat.vllm has it on
    any device): each row of k (float32/float16/bfloat16 [T, DI], DI 64 or 128) gets one scale, max(amax, 1e-4) /
    448 (rounded up to a power of two with scale_fmt="ue8m0"), its values fp8 e4m3 of k / scale, written to page
    slot_mapping[t] // 64, row slot_mapping[t] % 64 of kv_cache (uint8 pages as paged_mqa_logits reads them); a
    negative slot skips the row. int32 slot_mapping. Every slot is checked before anything is written.
    """
    fn = "indexer_k_quant_and_cache"
    k_c, _ = _io.arg(k, fn, "k")
    c_c, c_dtype = _io.arg(kv_cache, fn, "kv_cache", _uint8_only(kv_cache, "fp8_e4m3"))
    s_c, _ = _io.arg(slot_mapping, fn, "slot_mapping")
    _io.call(fn, {"cache": "kv_cache"}, _C.indexer_k_quant_and_cache, k_c, c_c, c_dtype, s_c, scale_fmt == "ue8m0")
    return kv_cache


# ---- attention -------------------------------------------------------------------------------------------
def sparse_attention(q, k_cache, v_cache, selection, *, granularity="per_kv_head", scale=None, out=None, lse=None,
                     block_table=None, stream=None):
    """Exact attention over the selected keys, renormalised on them (SPEC §4 o_A).

    o[t, h] = sum_{s in A[t, G(h)]} softmax_A(scale * q[t, h] . k[s, kv(h)]) v[s, kv(h)]
    lse[t, h] = log sum_{s in A} exp(scale * q[t, h] . k[s, kv(h)])

    CPU: q [T, Hq, D], k_cache [N, Hkv, D], v_cache [N, Hkv, Dv] (float32, float16 or bfloat16, any strides),
         selection int32 [T, G, W] (distinct keys < N in any order, then -1).
    CUDA (keysel's decode kernel): bfloat16 q [T, Hq, D] and a bfloat16 cache, contiguous, D = Dv in {64, 128,
         256}: either k_cache/v_cache [T, N, Hkv, D] (row t reads its own sequence) or paged
         [num_blocks, block_size, Hkv, D] with block_table int32 [T, max_blocks]; runs on `stream`.
    Returns (out float32 [T, Hq, Dv], lse float32 [T, Hq]); a query with no selected key gets zeros and -inf.
    out= and lse= are written in place when given.
    """
    fn = "sparse_attention"
    q_c, _ = _io.arg(q, fn, "q")
    k_c, _ = _io.arg(k_cache, fn, "k_cache")
    v_c, _ = _io.arg(v_cache, fn, "v_cache")
    s_c, _ = _io.arg(selection, fn, "selection")
    t, hq, _d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
    v_shape = tuple(int(n) for n in getattr(v_cache, "shape", ()))
    if len(v_shape) not in (3, 4):
        raise _io.fail(fn, "v_cache", "a rank-3 tensor [N, Hkv, Dv] (or rank 4 on CUDA)", f"shape {list(v_shape)}")
    dv = v_shape[-1]
    inputs = (q, k_cache, v_cache, selection)
    result = out if out is not None else _io.empty((t, hq, dv), "float32", inputs, fn)
    result_lse = lse if lse is not None else _io.empty((t, hq), "float32", inputs, fn)
    out_c, _ = _io.arg(result, fn, "out")
    lse_c, _ = _io.arg(result_lse, fn, "lse")
    table_c = None if block_table is None else _io.arg(block_table, fn, "block_table")[0]
    _io.call(fn, _io.ATTENTION, _C.sparse_attention, q_c, k_c, v_c, s_c, granularity, _scale(scale, fn), table_c,
             out_c, lse_c, _io.stream_handle(stream, (q,)))
    return result, result_lse


def sparse_attention_prefill(q, k_cache, v_cache, selection, *, granularity="per_kv_head", scale=None, out=None,
                             lse=None, stream=None):
    """sparse_attention's out and lse for every token of one sequence on a GPU, by keysel's tiled tensor-core
    forward (sparse_attention_prefill_cuda): tiles of 64 query rows (64 / g tokens x the g = Hq / Hkv heads of a key
    head) read the union of their selections once, in chunks of 64 keys; q K^T and P V on tensor cores, an online
    softmax in float32, P rounded to bfloat16 before P V. Deterministic; on `stream`.

    q bfloat16 [T, Hq, D], k_cache [N, Hkv, D], v_cache [N, Hkv, Dv] (bfloat16, contiguous, on one GPU), D and Dv
    of 64 or 128, Hq / Hkv dividing 64; selection int32 [T, G, W] with granularity "per_kv_head" or "per_token"
    ("per_head" only where Hq == Hkv); an entry outside [0, N) is skipped, a key repeated in a row counts once.
    Returns (out [T, Hq, Dv], lse float32 [T, Hq]); out is float32 unless out= is given (bfloat16 or float32);
    a query with no selected key gets zeros and -inf. Shapes the kernel does not take raise keysel.Error naming
    the argument (sparse_attention_prefill_supported tells beforehand; sparse_attention with a one-page block
    table runs the decode kernel on them).
    """
    fn = "sparse_attention_prefill"
    q_c, _ = _io.arg(q, fn, "q")
    k_c, _ = _io.arg(k_cache, fn, "k_cache")
    v_c, _ = _io.arg(v_cache, fn, "v_cache")
    s_c, _ = _io.arg(selection, fn, "selection")
    t, hq, _d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
    dv = _io.shape(v_cache, fn, "v_cache", 3, "[N, Hkv, Dv]")[2]
    inputs = (q, k_cache, v_cache, selection)
    result = out if out is not None else _io.empty((t, hq, dv), "float32", inputs, fn)
    result_lse = lse if lse is not None else _io.empty((t, hq), "float32", inputs, fn)
    out_c, _ = _io.arg(result, fn, "out")
    lse_c, _ = _io.arg(result_lse, fn, "lse")
    _io.call(fn, _io.ATTENTION, _C.sparse_attention_prefill, q_c, k_c, v_c, s_c, granularity, _scale(scale, fn),
             out_c, lse_c, _io.stream_handle(stream, (q,)))
    return result, result_lse


def sparse_attention_prefill_supported(q, k_cache, v_cache, selection, *, granularity="per_kv_head"):
    """Whether sparse_attention_prefill takes these tensors (the GPU's shared memory and the sizes included): False
    where it would raise keysel.Error, and without CUDA."""
    fn = "sparse_attention_prefill_supported"
    args = [_io.arg(x, fn, name)[0] for x, name in
            ((q, "q"), (k_cache, "k_cache"), (v_cache, "v_cache"), (selection, "selection"))]
    return bool(_io.call(fn, _io.ATTENTION, _C.sparse_attention_prefill_supported, *args, granularity))


def sparse_attention_backward(q, k_cache, v_cache, selection, out, lse, grad_out, *, granularity="per_kv_head",
                              scale=None, grad_lse=None, grad_q=None, grad_k=None, grad_v=None, stream=None,
                              deterministic=True):
    """Gradients of sparse_attention's out (and lse) with the selection held fixed (SPEC §9), on the CPU or a GPU.

    With P = exp(scale q.k - lse) over the selected keys, dP = grad_out . v, Delta = rowsum(grad_out * out),
    dS = P (dP - Delta) (+ P grad_lse with grad_lse, float32 [T, Hq]: d lse / d logit = P): grad_q = scale dS K,
    grad_k = scale dS^T Q, grad_v = P^T grad_out, the heads of a key head (GQA) and every query token that
    selects a key summed into that key's rows.

    q [T, Hq, D], k_cache [N, Hkv, D], v_cache [N, Hkv, Dv], out and grad_out [T, Hq, Dv] (float32, float16 or
    bfloat16, any strides), lse float32 [T, Hq] (out and lse as sparse_attention returned them), selection int32
    [T, G, W] as for sparse_attention. Arithmetic in float32; deterministic (the same bits for any thread count).
    Returns (grad_q float32 [T, Hq, D], grad_k float32 [N, Hkv, D], grad_v float32 [N, Hkv, Dv]); keys no row
    selects and queries with no selected key get zeros. grad_q=, grad_k=, grad_v= are written in place when given.

    CUDA tensors (torch or CuPy) run keysel's GPU backward on their device, asynchronously on `stream` (default:
    the library's current stream): q, k_cache, v_cache, out and grad_out all bfloat16 or all float32,
    contiguous, D and Dv <= 256, grad_lse float32 contiguous; the same definition and, by default, the same
    determinism (no atomics). deterministic=False runs keysel's tiled tensor-core backward instead where it takes
    the call (bfloat16, D and Dv of 64 or 128, Hq / Hkv dividing 64, granularity "per_kv_head" or "per_token"; the
    deterministic kernel otherwise): P and dS rounded to bfloat16 before the three products (as flash attention's
    backward), dK and dV added with atomics, so not bitwise reproducible. CPU tensors ignore it.
    """
    fn = "sparse_attention_backward"
    names = ("q", "k_cache", "v_cache", "selection", "out", "lse", "grad_out")
    tensors = (q, k_cache, v_cache, selection, out, lse, grad_out)
    converted = [_io.arg(x, fn, name)[0] for x, name in zip(tensors, names)]
    t, hq, d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
    n, hkv, _ = _io.shape(k_cache, fn, "k_cache", 3, "[N, Hkv, D]")
    dv = _io.shape(v_cache, fn, "v_cache", 3, "[N, Hkv, Dv]")[2]
    results = []
    for given, shape, name in ((grad_q, (t, hq, d), "grad_q"), (grad_k, (n, hkv, d), "grad_k"),
                               (grad_v, (n, hkv, dv), "grad_v")):
        result = given if given is not None else _io.empty(shape, "float32", tensors, fn)
        results.append(result)
        converted.append(_io.arg(result, fn, name)[0])
    glse_c = None if grad_lse is None else _io.arg(grad_lse, fn, "grad_lse")[0]
    _io.call(fn, _io.ATTENTION, _C.sparse_attention_backward, *converted[:4], granularity, _scale(scale, fn),
             *converted[4:], _io.stream_handle(stream, (q,)), glse_c, bool(deterministic))
    return tuple(results)


def indexer_kl_loss_reference(target, q_index, weights, k_index, positions, selection=None, *, reduction="mean"):
    """The Lightning Indexer's training loss (SPEC §9.1) and its gradients, in double precision (the reference).

    target:    float32/float64 [T, N]: the main attention's head-mean distribution pbar (SPEC §2, per_token)
    q_index:   float32/float64 [T, HI, DI];  weights: [T, HI];  k_index: [N, DI]
    positions: int32 [T] (query t reads keys s <= positions[t])
    selection: None for the dense warm-up (KL over every allowed key), or int32 [T, 1, W] / [T, W] (the per_token
               selection, -1 padded) for the sparse stage (KL over the selected keys, both sides renormalised)
    reduction: "mean" over the query tokens with keys, or "sum".
    Returns (loss float, grad_q_index, grad_weights, grad_k_index) as float64 NumPy arrays.
    """
    fn = "indexer_kl_loss_reference"
    if selection is not None and len(getattr(selection, "shape", ())) == 2:
        selection = selection[:, None, :]
    t, hi, di = _io.shape(q_index, fn, "q_index", 3, "[T, HI, DI]")
    n = _io.shape(k_index, fn, "k_index", 2, "[N, DI]")[0]
    grads = (np.zeros((t, hi, di)), np.zeros((t, hi)), np.zeros((n, di)))
    tensors = [_io.arg(x, fn, name)[0] for x, name in ((target, "target"), (q_index, "q_index"), (weights, "weights"),
                                                       (k_index, "k_index"), (positions, "positions"))]
    sel_c = None if selection is None else _io.arg(selection, fn, "selection")[0]
    renames = {"queries": "q_index", "keys": "k_index", "gradients.queries": "q_index",
               "gradients.weights": "weights", "gradients.keys": "k_index"}
    loss = _io.call(fn, renames, _C.indexer_kl_loss_reference, *tensors, sel_c, reduction, *grads)
    return (loss,) + grads


def sparse_mla(q, kv, indices, *, scale=None, attn_sink=None, topk_length=None, out=None, lse=None,
               max_logits=None, stream=None, workspace=None):
    """DeepSeek-V3.2's sparse MLA attention over selected cache slots (SPEC §8), MQA form: d_qk 576, d_v 512.

    q:           [T, h_q, 576] (CPU: float32/float16/bfloat16; CUDA: bfloat16, contiguous)
    kv:          the fp8 V3.2 cache, uint8 or float8 pages [P, page_size, 656] (512 e4m3 values, 4 float32 scales,
                 64 bfloat16 RoPE values a token; slot s = token s % page_size of page s // page_size), or a latent
                 cache [N, 576] (CPU: float32/float16/bfloat16; CUDA: bfloat16)
    indices:     int32 [T, topk]: slots, -1 invalid (anywhere). CPU: valid slots must be < the cache's slots and
                 distinct in a row (keysel.Error otherwise); CUDA: values are not read by the host, a slot outside
                 the cache counts as invalid
    scale:       softmax scale (default 1/sqrt(576)); attn_sink: float32 [h_q], an extra logit per head in the
                 denominator only; topk_length: int32 [T], only the first topk_length[t] entries of row t count
    Returns (out [T, h_q, 512], lse float32 [T, h_q], max_logits float32 [T, h_q]): lse and max_logits are the
    natural-log state of the selected keys (the sink never enters them); a row with no valid slot gets out = 0 and
    lse = max_logits = -inf. out is float32 unless out= is given (CUDA also writes bfloat16). CUDA runs keysel's
    tensor-core kernel on `stream`; workspace= (sparse_mla_workspace_bytes) makes it allocate nothing. Inside a
    CUDA graph capture pass out=, lse= and max_logits= (keysel allocates no output while a graph is captured).
    """
    fn = "sparse_mla"
    q_c, _ = _io.arg(q, fn, "q")
    kv_c, kv_dtype = _io.arg(kv, fn, "kv", _uint8_only(kv, "fp8_e4m3"))
    i_c, _ = _io.arg(indices, fn, "indices")
    t, h = _io.shape(q, fn, "q", 3, "[T, h_q, 576]")[:2]
    inputs = (q, kv, indices)
    result = out if out is not None else _io.empty((t, h, 512), "float32", inputs, fn)
    result_lse = lse if lse is not None else _io.empty((t, h), "float32", inputs, fn)
    result_max = max_logits if max_logits is not None else _io.empty((t, h), "float32", inputs, fn)
    sink_c = None if attn_sink is None else _io.arg(attn_sink, fn, "attn_sink")[0]
    len_c = None if topk_length is None else _io.arg(topk_length, fn, "topk_length")[0]
    _io.call(fn, {}, _C.sparse_mla, q_c, kv_c, kv_dtype, i_c, _io.arg(result, fn, "out")[0],
             _io.arg(result_lse, fn, "lse")[0], _io.arg(result_max, fn, "max_logits")[0],
             0.0 if scale is None else _scale(scale, fn), sink_c, len_c, _io.stream_handle(stream, (q,)),
             _io.workspace(workspace, fn))
    return result, result_lse, result_max


def sparse_mla_backward(q, kv, indices, out, lse, grad_out, *, grad_lse=None, scale=None, attn_sink=None,
                        topk_length=None, grad_q=None, grad_kv=None, grad_attn_sink=None, stream=None):
    """Gradients of sparse_mla (SPEC §9.2) on the CPU or a GPU, the indices and topk_length held fixed.

    q [T, h_q, 576], kv a latent cache [N, 576] (float32/float16/bfloat16; the fp8 V3.2 pages are not
    differentiated), indices, scale, attn_sink and topk_length as for sparse_mla; out [T, h_q, 512] and lse float32
    [T, h_q] as sparse_mla returned them; grad_out [T, h_q, 512] (float32/float16/bfloat16) and optionally
    grad_lse float32 [T, h_q] the gradients of the loss with respect to out and lse. With P' = exp(s - lse) over
    a row's valid slots, c = exp(lse) / (exp(lse) + exp(sink)), P = c P', dP = grad_out . kv[:512], Delta =
    rowsum(grad_out * out) and dS = P (dP - Delta) + P' grad_lse:
      grad_q = scale dS kv;  grad_kv = scale dS^T q + P^T grad_out (on channels 0..511);
      grad_attn_sink[h] = -sum_t (1 - c) Delta.
    Returns (grad_q float32 [T, h_q, 576], grad_kv float32 [N, 576], grad_attn_sink float32 [h_q] or None without
    attn_sink); slots no row reads get zeros. Arithmetic in float32, deterministic (the same bits for any thread
    count). grad_q=, grad_kv=, grad_attn_sink= are written in place when given.

    CUDA tensors (torch or CuPy) run keysel's GPU backward on their device, asynchronously on `stream` (default:
    the library's current stream): q and kv both bfloat16 or both float32, out and grad_out bfloat16 or float32,
    every tensor contiguous (indices: contiguous rows, any row stride); index values are not read by the host (a
    slot outside the cache counts as invalid, as in sparse_mla on CUDA). The same definition and the same
    determinism (no atomics).
    """
    fn = "sparse_mla_backward"
    names = ("q", "kv", "indices", "out", "lse", "grad_out")
    tensors = (q, kv, indices, out, lse, grad_out)
    converted = [_io.arg(x, fn, name)[0] for x, name in zip(tensors, names)]
    t, h = _io.shape(q, fn, "q", 3, "[T, h_q, 576]")[:2]
    n = _io.shape(kv, fn, "kv", 2, "[N, 576]")[0]
    d = 576
    result_q = grad_q if grad_q is not None else _io.empty((t, h, d), "float32", tensors, fn)
    result_kv = grad_kv if grad_kv is not None else _io.empty((n, d), "float32", tensors, fn)
    result_sink = grad_attn_sink
    if result_sink is None and attn_sink is not None:
        result_sink = _io.empty((h,), "float32", tensors, fn)
    optional = [None if x is None else _io.arg(x, fn, name)[0]
                for x, name in ((grad_lse, "grad_lse"), (attn_sink, "attn_sink"), (topk_length, "topk_length"))]
    renames = {"gradients.q": "grad_q", "gradients.kv": "grad_kv", "gradients.attn_sink": "grad_attn_sink"}
    _io.call(fn, renames, _C.sparse_mla_backward, *converted, optional[0],
             0.0 if scale is None else _scale(scale, fn), optional[1], optional[2],
             _io.arg(result_q, fn, "grad_q")[0], _io.arg(result_kv, fn, "grad_kv")[0],
             None if result_sink is None else _io.arg(result_sink, fn, "grad_attn_sink")[0],
             _io.stream_handle(stream, (q,)))
    return result_q, result_kv, result_sink


def sparse_mla_workspace_bytes(rows, heads, topk, device=0):
    """Bytes of GPU workspace sparse_mla may use for T = rows query rows, h_q = heads and topk slots on GPU
    `device` (0 when its rows are not split across thread blocks)."""
    return _io.call("sparse_mla_workspace_bytes", {}, _C.sparse_mla_workspace_bytes, rows, heads, topk, device)


def mla_v32_quantize(kv, cache, slot_mapping):
    """The fp8 V3.2 cache writer on the CPU (SPEC §8): row t of kv (float32/float16/bfloat16 [T, 576]) goes to
    slot slot_mapping[t] (int32 [T]; negative: skipped) of cache (uint8 or float8 [P, page_size, 656]): per group
    of 128 latent values scale = max(amax, 1e-4) / 448 rounded up to a power of two, values e4m3 of x / scale, the
    64 RoPE values as bfloat16. keysel.compat.vllm.concat_and_cache_mla writes it on any device."""
    fn = "mla_v32_quantize"
    kv_c, _ = _io.arg(kv, fn, "kv")
    cache_c, cache_dtype = _io.arg(cache, fn, "cache", _uint8_only(cache, "fp8_e4m3"))
    slots_c, _ = _io.arg(slot_mapping, fn, "slot_mapping")
    _io.call(fn, {}, _C.mla_v32_quantize, kv_c, cache_c, cache_dtype, slots_c)
    return cache


def metrics(q, k_cache, v_cache, positions, selection, k, *, granularity="per_kv_head", scale=None):
    """Fidelity of a selection against the exact top-k (SPEC §4), per row and aggregated.

    q [T, Hq, D], k_cache [N, Hkv, D], v_cache [N, Hkv, Dv] or None (then out_err is NaN), positions int32 [T],
    selection int32 [T, G, W] (distinct allowed keys, then -1), k: the k the selection was made for
    (k_eff = min(k, allowed keys)).
    Returns a dict: each metric of keysel.metric_names() ("recall", "mass", "mass_ratio", "kl", "top1",
    "out_err", "entropy", "entropy_normalized") as float64 [T, G] in the inputs' library (on the CPU), and
    "aggregates": {metric: {"mean", "min", "p5", "p50", "p95", "count"}} over the rows (NaN left out).
    """
    fn = "metrics"
    q_c, _ = _io.arg(q, fn, "q")
    k_c, _ = _io.arg(k_cache, fn, "k_cache")
    v_c = None if v_cache is None else _io.arg(v_cache, fn, "v_cache")[0]
    p_c, _ = _io.arg(positions, fn, "positions")
    s_c, _ = _io.arg(selection, fn, "selection")
    t, hq, _d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
    _n, hkv, _d2 = _io.shape(k_cache, fn, "k_cache", 3, "[N, Hkv, D]")
    groups = _io.call(fn, _io.GROUPS, _C.group_count, granularity, hq, hkv)
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool):
        raise _io.fail(fn, "k", "an integer >= 1", repr(k))
    rows = _io.call(fn, _io.ATTENTION, _C.metrics, q_c, k_c, v_c, p_c, s_c, int(k), granularity, _scale(scale, fn))
    torch_out = any(_io.is_torch(x) for x in (q, k_cache, v_cache, positions, selection))
    result = {}
    aggregates = {}
    for name in _C.metric_names():
        values = np.asarray(rows[name], dtype=np.float64).reshape(t, groups)
        aggregates[name] = _C.aggregate(rows[name])
        result[name] = _io._torch().from_numpy(values) if torch_out else values
    result["aggregates"] = aggregates
    return result


# ---- selectors -------------------------------------------------------------------------------------------
class Selector:
    """A selector built from a spec (make_selector): .name, and .select(...) once per call (decode step)."""

    def __init__(self, native, spec):
        self._native = native
        self.spec = spec
        self.last_cost = None

    @property
    def name(self) -> str:
        return self._native.name

    def __repr__(self):
        return f"keysel.Selector({self.name!r})"

    def select(self, q, k_cache, positions, k, *, granularity="per_kv_head", scale=None, n_sink=0, n_local=0,
               kept_on_top=False, q_index=None, weights=None, cache="unknown", unchanged_keys=0, out=None):
        """Writes the selection of one request (keysel::Selector::select with a SelectionRequest).

        q [T, Hq, D], k_cache [N, Hkv, D] (float32/float16/bfloat16, CPU), positions int32 [T]; k, granularity,
        n_sink, n_local, kept_on_top: the selection policy. q_index [T, HI, DI] and weights float32 [T, HI]: the
        step's Lightning-Indexer inputs for selectors that score with a trained indexer. cache: what changed in
        k_cache since this selector's previous call: "unknown", "appended" (keys [0, unchanged_keys) are those of
        the previous call, later ones new: a decode step) or "fresh" (another sequence).
        Returns int32 [T, G, W]; the cost (SPEC §5) is in .last_cost.
        """
        fn = "Selector.select"
        q_c, _ = _io.arg(q, fn, "q")
        k_c, _ = _io.arg(k_cache, fn, "k_cache")
        p_c, _ = _io.arg(positions, fn, "positions")
        qi_c = None if q_index is None else _io.arg(q_index, fn, "q_index")[0]
        w_c = None if weights is None else _io.arg(weights, fn, "weights")[0]
        t, hq, _d = _io.shape(q, fn, "q", 3, "[T, Hq, D]")
        _n, hkv, _d2 = _io.shape(k_cache, fn, "k_cache", 3, "[N, Hkv, D]")
        groups = _io.call(fn, _io.GROUPS, _C.group_count, granularity, hq, hkv)
        width = _io.call(fn, _io.POLICY, _C.selection_width, k, n_sink, n_local, kept_on_top, fn)
        result = out if out is not None else _io.empty((t, groups, width), "int32", (q, k_cache, positions), fn)
        out_c, _ = _io.arg(result, fn, "out")
        renames = {"selection": "out", "request.indexer_queries": "q_index", "request.indexer_weights": "weights",
                   **_io.ATTENTION}
        self.last_cost = _io.call(fn, renames, self._native.select, q_c, k_c, p_c, k, granularity, _scale(scale, fn),
                                  n_sink, n_local, kept_on_top, qi_c, w_c, cache, int(unchanged_keys), out_c)
        return result


def make_selector(spec, *, indexer=None) -> Selector:
    """Builds any selector keysel ships from its spec (docs/studies.md): a dict or JSON text, e.g.
    {"type": "exact"}, {"type": "random", "seed": 1}, {"type": "streaming", "n_sink": 4},
    {"type": "block_topk", "block_size": 16}, {"type": "indexer", "format": "fp8_e4m3"}, {"type": "faiss", ...}.

    indexer: optional trained Lightning-Indexer tensors (q_index [T, HI, DI], k_index [N, DI], weights [T, HI]) as a
    tuple or dict, which an "indexer" spec then scores with. Unknown keys or types raise keysel.Error.
    """
    fn = "make_selector"
    if isinstance(spec, dict):
        text = json.dumps(spec)
    elif isinstance(spec, str):
        text = spec
    else:
        raise _io.fail(fn, "spec", "a dict or JSON text", type(spec).__name__)
    if indexer is None:
        native = _io.call(fn, {}, _C.make_selector, text, None, None, None)
    else:
        if isinstance(indexer, dict):
            indexer = (indexer.get("q_index"), indexer.get("k_index"), indexer.get("weights"))
        q_index, k_index, weights = indexer
        native = _io.call(fn, {}, _C.make_selector, text, _io.arg(q_index, fn, "indexer.q_index")[0],
                          _io.arg(k_index, fn, "indexer.k_index")[0], _io.arg(weights, fn, "indexer.weights")[0])
    return Selector(native, text)


# ---- files and studies -----------------------------------------------------------------------------------
def load_dump(path) -> dict:
    """Loads and validates an attention dump (docs/dumps.md; tools/capture_dump.py writes them).

    Returns {"source", "model", "scale", "metadata", "layers"}; each layer a dict with "index" and NumPy arrays
    "q" [T, Hq, D], "k" [N, Hkv, D], "v" [N, Hkv, Dv] (float32, decoded from the stored dtype, named in
    layer["dtypes"]), "positions" int32 [T], and when present "index_q", "index_k", "index_w", "probs".
    """
    return _io.call("load_dump", {}, _C.load_dump, os.fspath(path))


def run_study(config, out=None) -> dict:
    """Runs a study file (docs/studies.md): workloads x selectors (with grids) x k values.

    config: a dict, JSON text, or the path of a study file. out: a directory to write results.csv, by_row.csv,
    results.json and report.html into (None: write nothing). Returns results.json's content as a dict.
    """
    fn = "run_study"
    if isinstance(config, dict):
        text, path = json.dumps(config), ""
    elif isinstance(config, (str, os.PathLike)) and (isinstance(config, os.PathLike) or
                                                       not config.lstrip().startswith("{")):
        text, path = "", os.fspath(config)
    elif isinstance(config, str):
        text, path = config, ""
    else:
        raise _io.fail(fn, "config", "a dict, JSON text or a path", type(config).__name__)
    result = _io.call(fn, {}, _C.run_study, text, path, "" if out is None else os.fspath(out))
    return json.loads(result)

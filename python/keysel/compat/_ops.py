"""The four heavy operations behind keysel.compat (docs/SPEC.md §7, docs/compat.md).

Every peer-shaped function in keysel.compat.deep_gemm / vllm / sglang / flashinfer translates its arguments and
calls one of these, so that a keysel kernel replaces a body without changing a signature:

    ragged_logits(q_fp8, k_fp8, k_scale, weights, starts, ends, clean, out)
    paged_logits(q_fp8, kv_cache, weights, context_lens, block_table, next_n, clean, out)
    topk_rows(logits, starts, ends, k, out)
    quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt)

Where keysel has a kernel for the call, it runs: topk_rows through keysel.topk_rows (keysel's exact top-k, CPU
and CUDA), paged_logits on CUDA through keysel.paged_mqa_logits and ragged_logits on CUDA through
keysel.ragged_mqa_logits (keysel's tensor-core indexer, where _indexer_kernel_takes the call). Otherwise the
bodies are plain torch: they run on CPU tensors and, unchanged, on CUDA tensors (the reference the tests compare
against). Neither reads a tensor value on the host (every size comes from shapes and Python ints), so on CUDA
they queue work without synchronising and can be captured in a CUDA graph. Each validates all of its arguments
first and raises keysel.Error (a ValueError) naming the argument, the expectation and what came; nothing is
written on failure.

Numerics: fp8 e4m3 values are decoded exactly to float32 and every dot product and head sum accumulates in
float32. q.k of two fp8 values is exact in TF32 too (4 significant bits each), so torch's allow_tf32 setting
cannot change the q.k products; the head weighting is an elementwise float32 multiply and sum (no matmul).
"""

from __future__ import annotations

import torch

from .. import Error
from .. import built_with_cuda as _built_with_cuda
from .. import paged_mqa_logits as _keysel_paged_mqa_logits
from .. import ragged_mqa_logits as _keysel_ragged_mqa_logits
from .. import topk_rows as _keysel_topk_rows

if not hasattr(torch, "float8_e4m3fn"):
    raise ImportError(f"keysel.compat needs torch.float8_e4m3fn (torch >= 2.1, as the engines); this is torch "
                      f"{torch.__version__}")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
PAGE_TOKENS = 64  # tokens per page of the engines' indexer cache (DeepGEMM block_kv on SM90, vLLM/SGLang pages)

# Bound on the float32 temporaries of the logits ops (elements), so long contexts are processed in column chunks.
_CHUNK_ELEMENTS = 1 << 25


# ---- argument checks (shared by the compat modules) ----------------------------------------------------------
def fail(function: str, argument: str, expected: str, got) -> Error:
    return Error(f"keysel.compat.{function}: argument '{argument}': expected {expected}, got {got}")


def describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).removeprefix('torch.')} tensor of shape {list(x.shape)} on {x.device}"
    return f"{type(x).__name__} {x!r}"


def tensor(fn, name, x, dtypes, rank=None, layout=""):
    """Check that x is a torch tensor of one of dtypes (a dtype or tuple) and, if given, of the rank."""
    dtypes = dtypes if isinstance(dtypes, tuple) else (dtypes,)
    names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
    ranks = rank if isinstance(rank, tuple) else ((rank,) if rank is not None else None)
    wanted = f"a torch {names} tensor" + (f" {layout}" if layout else "")
    if not isinstance(x, torch.Tensor):
        raise fail(fn, name, wanted, describe(x))
    if x.dtype not in dtypes:
        raise fail(fn, name, wanted, describe(x))
    if ranks is not None and x.dim() not in ranks:
        raise fail(fn, name, wanted, describe(x))
    return x


def shape_is(fn, name, x, shape, layout):
    if tuple(x.shape) != tuple(shape):
        raise fail(fn, name, f"shape {list(shape)} {layout}", describe(x))


def same_device(fn, reference, **tensors):
    for name, x in tensors.items():
        if x is not None and x.device != reference.device:
            raise fail(fn, name, f"a tensor on {reference.device} (the device of the other arguments)", describe(x))


def integer(fn, name, value, minimum=None):
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np  # numpy ints are fine

            if isinstance(value, np.integer):
                value = int(value)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise fail(fn, name, "an int", describe(value)) from None
    if minimum is not None and value < minimum:
        raise fail(fn, name, f"an int >= {minimum}", value)
    return value


def length_windows(fn, scores, lengths, k, row_starts, *, names=("score", "topk"), dtypes=torch.float32,
                   rows_name="R", width_name="L"):
    """Checks the (scores [rows, width], lengths [rows], k, row_starts [rows] or None) of the SGLang / FlashInfer
    top-k ops, naming the arguments as the peer does (names = (scores, k)), and returns (rows, k, starts, ends):
    the windows [row_starts[r], row_starts[r] + lengths[r]) as int32, row_starts defaulting to 0."""
    score_name, k_name = names
    tensor(fn, score_name, scores, dtypes, 2, f"[{rows_name}, {width_name}]")
    rows = scores.shape[0]
    tensor(fn, "lengths", lengths, torch.int32, 1, f"[{rows_name}]")
    shape_is(fn, "lengths", lengths, (rows,), f"[{rows_name}]")
    k = integer(fn, k_name, k, 1)
    if row_starts is not None:
        tensor(fn, "row_starts", row_starts, torch.int32, 1, f"[{rows_name}]")
        shape_is(fn, "row_starts", row_starts, (rows,), f"[{rows_name}]")
    same_device(fn, scores, lengths=lengths, row_starts=row_starts)
    starts = row_starts if row_starts is not None else torch.zeros_like(lengths)
    ends = (starts.to(torch.int64) + lengths.to(torch.int64)).clamp(max=2**31 - 1).to(torch.int32)
    return rows, k, starts, ends


def writable_out(fn, out, shape, dtype, device, layout):
    tensor(fn, "out", out, dtype, len(shape), layout)
    shape_is(fn, "out", out, shape, layout)
    if out.device != device:
        raise fail(fn, "out", f"a tensor on {device}", describe(out))


def pages_view(fn, name, kv_cache, head_dim, scale_bytes=4):
    """The paged indexer cache as a [num_pages, page_bytes] uint8 view sharing memory.

    Accepted: uint8 [P, 64*(D+4)], [P, 64, D+4] (vLLM) or [P, 64, 1, D+4] (DeepGEMM); the bytes of one page
    contiguous, any page stride. Returns (pages, tokens_per_page)."""
    layout = f"uint8 [P, 64*(D+4)], [P, 64, D+4] or [P, 64, 1, D+4] with D = {head_dim}"
    tensor(fn, name, kv_cache, torch.uint8, (2, 3, 4), layout)
    token_bytes = head_dim + scale_bytes
    if kv_cache.dim() == 2:
        if kv_cache.shape[1] % token_bytes != 0 or kv_cache.shape[1] == 0:
            raise fail(fn, name, layout, describe(kv_cache))
        tokens = kv_cache.shape[1] // token_bytes
        inner_ok = kv_cache.stride(1) == 1 or kv_cache.shape[1] == 1
    else:
        tokens = kv_cache.shape[1]
        if kv_cache.shape[-1] != token_bytes or (kv_cache.dim() == 4 and kv_cache.shape[2] != 1):
            raise fail(fn, name, layout, describe(kv_cache))
        inner_ok = kv_cache.stride(-1) == 1 and kv_cache.stride(1) == token_bytes
    if tokens != PAGE_TOKENS:
        raise fail(fn, name, f"pages of {PAGE_TOKENS} tokens ({layout})", describe(kv_cache))
    if not inner_ok:
        raise fail(fn, name, "the bytes of each page contiguous", f"strides {list(kv_cache.stride())}")
    pages = kv_cache.shape[0]
    page_bytes = tokens * token_bytes
    view = torch.as_strided(kv_cache, (pages, page_bytes), (kv_cache.stride(0) if pages > 1 else page_bytes, 1))
    return view, tokens


def _decode_pages(page_bytes, head_dim, tokens):
    """[..., page_bytes] uint8 -> (values float32 [..., tokens, D], scales float32 [..., tokens])."""
    lead = page_bytes.shape[:-1]
    values = page_bytes[..., : tokens * head_dim].reshape(*lead, tokens, head_dim).view(FP8).to(torch.float32)
    scales = page_bytes[..., tokens * head_dim: tokens * (head_dim + 4)].contiguous().view(torch.float32)
    return values, scales.reshape(*lead, tokens)


# ---- ragged logits (prefill) ---------------------------------------------------------------------------------
def ragged_logits(q_fp8, k_fp8, k_scale, weights, starts, ends, clean, out):
    """out[t, s] = k_scale[s] * sum_h weights[t, h] * relu(q[t, h] . k[s]) for starts[t] <= s < ends[t].

    q_fp8:   float8_e4m3fn [M, H, D]
    k_fp8:   float8_e4m3fn [N, D];  k_scale: float32 [N]
    weights: float32 [M, H];  starts, ends: int32 [M] (the range is intersected with [0, N))
    clean:   bool. Both the torch body and keysel's CUDA kernel always write -inf outside [starts[t], ends[t]);
             the engines' kernels may leave those entries unspecified when clean is False, so portable callers
             must not rely on them then.
    out:     float32 [M, N] (any strides), written in place and returned.
    CUDA tensors run keysel.ragged_mqa_logits (the tensor-core indexer kernels) where _kernel_takes_ragged says
    so; every other call runs ragged_logits_torch, the plain torch reference.
    """
    fn = "_ops.ragged_logits"
    tensor(fn, "q_fp8", q_fp8, FP8, 3, "[M, H, D]")
    m, h, d = q_fp8.shape
    tensor(fn, "k_fp8", k_fp8, FP8, 2, "[N, D]")
    n = k_fp8.shape[0]
    if k_fp8.shape[1] != d:
        raise fail(fn, "k_fp8", f"[N, {d}] (D of q_fp8)", describe(k_fp8))
    tensor(fn, "k_scale", k_scale, torch.float32, 1, "[N]")
    shape_is(fn, "k_scale", k_scale, (n,), "[N]")
    tensor(fn, "weights", weights, torch.float32, 2, "[M, H]")
    shape_is(fn, "weights", weights, (m, h), "[M, H]")
    tensor(fn, "starts", starts, torch.int32, 1, "[M]")
    shape_is(fn, "starts", starts, (m,), "[M]")
    tensor(fn, "ends", ends, torch.int32, 1, "[M]")
    shape_is(fn, "ends", ends, (m,), "[M]")
    writable_out(fn, out, (m, n), torch.float32, q_fp8.device, "[M, N]")
    same_device(fn, q_fp8, k_fp8=k_fp8, k_scale=k_scale, weights=weights, starts=starts, ends=ends)

    if _kernel_takes_ragged(q_fp8, k_fp8, k_scale, weights, starts, ends, out):
        _keysel_ragged_mqa_logits(q_fp8, weights, k_fp8, k_scale, starts, ends, out=out)
        return out
    return ragged_logits_torch(q_fp8, k_fp8, k_scale, weights, starts, ends, out)


def _kernel_takes_ragged(q_fp8, k_fp8, k_scale, weights, starts, ends, out):
    """Whether keysel's CUDA indexer runs ragged_logits (else the torch body does): CUDA tensors on a GPU of
    compute capability 8.9+, contiguous operands with q and k 16-byte aligned, HI in {16, 32, 64, 128}, DI in
    {64, 128} and at most 65535 rows."""
    m, h, d = q_fp8.shape
    return 0 < k_fp8.shape[0] < 2**31 and _indexer_kernel_takes(
        q_fp8, m, h, d, (q_fp8, k_fp8, k_scale, weights, starts, ends, out), (q_fp8, k_fp8))


def _indexer_kernel_takes(q_fp8, rows, heads, dim, operands, aligned):
    """What every keysel CUDA indexer entry point needs: a CUDA build and q_fp8 on a GPU of compute capability
    8.9+, HI (heads) in {16, 32, 64, 128}, DI (dim) in {64, 128}, 1 to 65535 query rows, every operand contiguous
    and the fp8 arrays in `aligned` 16-byte aligned."""
    if q_fp8.device.type != "cuda" or not _built_with_cuda():
        return False
    return (heads in (16, 32, 64, 128) and dim in (64, 128) and 0 < rows <= 65535
            and torch.cuda.get_device_capability(q_fp8.device) >= (8, 9)
            and all(x.is_contiguous() for x in operands) and all(x.data_ptr() % 16 == 0 for x in aligned))


def ragged_logits_torch(q_fp8, k_fp8, k_scale, weights, starts, ends, out):
    """ragged_logits in plain torch (arguments already checked): the reference of the keysel kernel."""
    m, h, d = q_fp8.shape
    n = k_fp8.shape[0]
    q = q_fp8.to(torch.float32).reshape(m * h, d)
    w = weights.unsqueeze(-1)  # [M, H, 1]
    step = max(1, _CHUNK_ELEMENTS // max(1, m * h))
    for s0 in range(0, n, step):
        s1 = min(n, s0 + step)
        k = k_fp8[s0:s1].to(torch.float32)
        dots = torch.relu(torch.matmul(q, k.t())).reshape(m, h, s1 - s0)
        out[:, s0:s1] = (dots * w).sum(dim=1) * k_scale[s0:s1]
    columns = torch.arange(n, device=q_fp8.device, dtype=torch.int32)
    valid = (columns >= starts.unsqueeze(1)) & (columns < ends.unsqueeze(1))
    out.masked_fill_(~valid, float("-inf"))
    return out


# ---- paged logits (decode, MTP) ------------------------------------------------------------------------------
def row_limits(context_lens, batch, next_n):
    """Keys row b*next_n+i may read: [B] context_lens -> context_lens[b] - next_n + i + 1 (causal MTP);
    [B, next_n] -> context_lens[b, i]. Returned as int64 [B*next_n]."""
    if context_lens.dim() == 1:
        offsets = torch.arange(next_n, device=context_lens.device, dtype=torch.int64) - next_n + 1
        return (context_lens.to(torch.int64).unsqueeze(1) + offsets).reshape(batch * next_n)
    return context_lens.to(torch.int64).reshape(batch * next_n)


def paged_logits(q_fp8, kv_cache, weights, context_lens, block_table, next_n, clean, out):
    """Indexer logits over the paged fp8 cache, one row per (sequence, MTP draft position).

    q_fp8:        float8_e4m3fn [B, next_n, H, D]
    kv_cache:     uint8 [P, 64*(D+4)] / [P, 64, D+4] / [P, 64, 1, D+4]: page p holds its 64 tokens' D fp8 values
                  (token i at bytes [i*D, (i+1)*D)) then their 64 float32 scales (token i's at 64*D + 4*i)
    weights:      float32 [B*next_n, H]
    context_lens: int32 [B] (row b*next_n+i reads keys s < context_lens[b] - next_n + i + 1) or
                  int32 [B, next_n] (row b*next_n+i reads s < context_lens[b, i], DeepGEMM's 2-D form)
    block_table:  int32 [B, max_pages]; token s of sequence b is row s % 64 of page block_table[b, s // 64].
                  Entries of pages no row reads are never dereferenced (they may hold anything).
    next_n:       int, 1.. ; must equal q_fp8.shape[1]
    clean:        bool; this reference always writes -inf where a row may not read (see ragged_logits).
    out:          float32 [B*next_n, L] (L = the engines' max_context_len), written in place and returned;
                  out[r, s] = scale[s] * sum_h weights[r, h] * relu(q[r, h] . k[s]) for s < min(limit_r, L).
    """
    fn = "_ops.paged_logits"
    tensor(fn, "q_fp8", q_fp8, FP8, 4, "[B, next_n, H, D]")
    b, nn, h, d = q_fp8.shape
    next_n = integer(fn, "next_n", next_n, 1)
    if nn != next_n:
        raise fail(fn, "q_fp8", f"[B, next_n={next_n}, H, D]", describe(q_fp8))
    pages, tokens = pages_view(fn, "kv_cache", kv_cache, d)
    tensor(fn, "weights", weights, torch.float32, 2, "[B*next_n, H]")
    shape_is(fn, "weights", weights, (b * nn, h), "[B*next_n, H]")
    tensor(fn, "context_lens", context_lens, torch.int32, (1, 2), "[B] or [B, next_n]")
    if tuple(context_lens.shape) not in ((b,), (b, nn)):
        raise fail(fn, "context_lens", f"shape [{b}] or [{b}, {nn}]", describe(context_lens))
    tensor(fn, "block_table", block_table, torch.int32, 2, "[B, max_pages]")
    if block_table.shape[0] != b:
        raise fail(fn, "block_table", f"[{b}, max_pages]", describe(block_table))
    tensor(fn, "out", out, torch.float32, 2, "[B*next_n, max_context_len]")
    if out.shape[0] != b * nn:
        raise fail(fn, "out", f"[{b * nn}, max_context_len]", describe(out))
    if out.device != q_fp8.device:
        raise fail(fn, "out", f"a tensor on {q_fp8.device}", describe(out))
    same_device(fn, q_fp8, kv_cache=kv_cache, weights=weights, context_lens=context_lens, block_table=block_table)

    if _kernel_takes_paged(q_fp8, pages, weights, context_lens, block_table, out):
        _keysel_paged_mqa_logits(q_fp8, weights, pages, block_table, context_lens, out.shape[1], out=out)
        return out
    width = out.shape[1]
    num_pages = pages.shape[0]
    max_pages = block_table.shape[1]
    limits = row_limits(context_lens, b, nn)  # [B*nn]
    used_pages = min(max_pages, -(-width // tokens))
    q = q_fp8.to(torch.float32).reshape(b, nn * h, d)
    w = weights.reshape(b, nn, h, 1)
    step = max(1, _CHUNK_ELEMENTS // max(1, b * nn * h * tokens))
    if num_pages > 0:
        for p0 in range(0, used_pages, step):
            p1 = min(used_pages, p0 + step)
            ids = block_table[:, p0:p1].to(torch.int64).clamp(0, num_pages - 1)  # unread entries may be junk
            values, scales = _decode_pages(pages[ids], d, tokens)  # [B, c, 64, D], [B, c, 64]
            keys = values.reshape(b, (p1 - p0) * tokens, d)
            dots = torch.relu(torch.matmul(q, keys.transpose(1, 2))).reshape(b, nn, h, -1)
            logits = (dots * w).sum(dim=2) * scales.reshape(b, 1, -1)  # [B, nn, c*64]
            c0, c1 = p0 * tokens, min(width, p1 * tokens)
            out[:, c0:c1] = logits.reshape(b * nn, -1)[:, : c1 - c0]
    columns = torch.arange(width, device=q_fp8.device, dtype=torch.int64)
    valid = (columns < limits.unsqueeze(1)) & (columns < max_pages * tokens)
    if num_pages == 0:
        valid &= False
    out.masked_fill_(~valid, float("-inf"))
    return out


def _kernel_takes_paged(q_fp8, pages, weights, context_lens, block_table, out):
    """Whether keysel's CUDA indexer runs this call (else the torch body does): CUDA tensors on a GPU of compute
    capability 8.9+, contiguous 16-byte aligned operands, HI in {16, 32, 64, 128}, DI in {64, 128}, next_n <= 4,
    and a block table wide enough for the logits' width."""
    b, next_n, h, d = q_fp8.shape
    return (1 <= next_n <= 4 and pages.shape[0] > 0 and block_table.shape[1] * PAGE_TOKENS >= out.shape[1]
            and _indexer_kernel_takes(q_fp8, b * next_n, h, d, (q_fp8, pages, weights, context_lens, block_table, out),
                                      (q_fp8, pages)))


# ---- exact per-row top-k -------------------------------------------------------------------------------------
_LOW = 1 << 32


def topk_rows(logits, starts, ends, k, out):
    """Per row r, the min(k, ends[r] - starts[r]) positions of the largest logits[r, starts[r]:ends[r]].

    logits:      float32 [R, L], any strides (float16 / bfloat16 are widened exactly)
    starts, ends: int32 [R]; the window is intersected with [0, L)
    k:           int >= 1 (any value; k > L is fine)
    out:         int32 [R, k], written in place and returned: the chosen positions relative to the row's start
                 (s - starts[r]), in ascending order, then -1 padding.
    Order: larger value first; equal values prefer the lower position; NaN is never chosen (a window of fewer
    than k numbers pads with -1); -inf can be; -0.0 equals +0.0 (keysel's rule, SPEC §2).
    float32 logits with unit stride along L run keysel.topk_rows (keysel's top-k, CPU and CUDA). The torch body
    (other dtypes and strides, and the tests' reference): one int64 key per entry (the order-preserving integer
    of the float in the high 32 bits, L-1-s in the low 32 bits, so every key is distinct and the tie rule is part
    of the key), torch.topk over the keys, then an ascending sort of the chosen positions. Exact on every input
    (ties included) and deterministic.
    """
    fn = "_ops.topk_rows"
    tensor(fn, "logits", logits, (torch.float32, torch.float16, torch.bfloat16), 2, "[R, L]")
    r, length = logits.shape
    tensor(fn, "starts", starts, torch.int32, 1, "[R]")
    shape_is(fn, "starts", starts, (r,), "[R]")
    tensor(fn, "ends", ends, torch.int32, 1, "[R]")
    shape_is(fn, "ends", ends, (r,), "[R]")
    k = integer(fn, "k", k, 1)
    writable_out(fn, out, (r, k), torch.int32, logits.device, "[R, k]")
    same_device(fn, logits, starts=starts, ends=ends)
    if length >= (1 << 31) - 1:
        raise fail(fn, "logits", "rows shorter than 2**31 - 1", describe(logits))
    if _kernel_takes_rows(logits, starts, ends, out):
        _keysel_topk_rows(logits, k, starts=starts, ends=ends, out=out)
        return out
    return topk_rows_torch(logits, starts, ends, k, out)


def _kernel_takes_rows(logits, starts, ends, out):
    r, length = logits.shape
    if logits.device.type == "cuda" and not _built_with_cuda():
        return False
    return (logits.dtype == torch.float32 and (logits.stride(1) == 1 or length <= 1)
            and (r <= 1 or logits.stride(0) >= length) and starts.is_contiguous() and ends.is_contiguous()
            and out.is_contiguous())


def topk_rows_torch(logits, starts, ends, k, out):
    """topk_rows in plain torch (arguments already checked): the reference of the keysel kernels."""
    r, length = logits.shape
    chosen = min(k, length)
    if chosen > 0:
        device = logits.device
        values = logits.to(torch.float32) + 0.0  # -0.0 -> +0.0 (and a private copy)
        bits = values.view(torch.int32)
        ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)  # monotone in the float order
        columns = torch.arange(length, device=device, dtype=torch.int64)
        keys = ordered * _LOW + (length - 1 - columns)
        valid = (columns >= starts.to(torch.int64).unsqueeze(1)) & (columns < ends.to(torch.int64).unsqueeze(1))
        valid &= ~torch.isnan(values)  # NaN is never chosen
        keys = torch.where(valid, keys, torch.full_like(keys, torch.iinfo(torch.int64).min))
        top = torch.topk(keys, chosen, dim=1, largest=True, sorted=False).values
        taken = top != torch.iinfo(torch.int64).min
        positions = (length - 1) - torch.remainder(top, _LOW)  # absolute column
        positions = torch.where(taken, positions, torch.full_like(positions, 1 << 40))
        positions = torch.sort(positions, dim=1).values
        relative = positions - starts.to(torch.int64).unsqueeze(1)
        result = torch.where(positions == (1 << 40), torch.full_like(relative, -1), relative)
        out[:, :chosen] = result.to(torch.int32)
    if chosen < k:
        out[:, chosen:] = -1
    return out


# ---- the indexer-cache writer ----------------------------------------------------------------------------------
def quant_and_cache(k, kv_cache, slot_mapping, quant_block_size, scale_fmt):
    """Quantise indexer keys to fp8 e4m3 and store them in the paged cache (vLLM's indexer_k_quant_and_cache).

    k:                bfloat16, float16 or float32 [T, D]
    kv_cache:         uint8 paged cache (see paged_logits) with pages of 64 tokens, each token D fp8 bytes and
                      D / quant_block_size float32 scales; [P, 64*(D+4*G)], [P, 64, D+4*G] or [P, 64, 1, D+4*G]
    slot_mapping:     int64 or int32 [T]; token t goes to page slot // 64, row slot % 64; slot < 0 is skipped
    quant_block_size: int dividing D (128 = D gives one scale per token, the engines' setting)
    scale_fmt:        "ue8m0" (scale rounded up to a power of two, exactly) or anything else / None (plain)
    Per block of quant_block_size values: scale = max(amax, 1e-4) / 448 (float32), then values =
    fp8_e4m3(clamp(x / scale, -448, 448)) rounded to nearest even. Group j of token t has its scale at byte
    64*D + 4*(row*G + j) of the page. Returns None (writes kv_cache in place).
    """
    fn = "_ops.quant_and_cache"
    tensor(fn, "k", k, (torch.bfloat16, torch.float16, torch.float32), 2, "[T, D]")
    t, d = k.shape
    quant_block_size = integer(fn, "quant_block_size", quant_block_size, 1)
    if d % quant_block_size != 0:
        raise fail(fn, "quant_block_size", f"a divisor of D = {d}", quant_block_size)
    if scale_fmt is not None and not isinstance(scale_fmt, str):
        raise fail(fn, "scale_fmt", "a str (\"ue8m0\" for power-of-two scales) or None", describe(scale_fmt))
    groups = d // quant_block_size
    pages, tokens = pages_view(fn, "kv_cache", kv_cache, d, 4 * groups)
    tensor(fn, "slot_mapping", slot_mapping, (torch.int64, torch.int32), 1, "[T]")
    shape_is(fn, "slot_mapping", slot_mapping, (t,), "[T]")
    same_device(fn, k, kv_cache=kv_cache, slot_mapping=slot_mapping)
    if t == 0 or pages.shape[0] == 0:
        return None

    device = k.device
    blocks = k.to(torch.float32).reshape(t, groups, quant_block_size)
    amax = blocks.abs().amax(dim=2)
    # Divided by a tensor, not a Python number: torch turns "tensor / number" on CUDA into a multiplication by the
    # reciprocal, which is not the correctly rounded quotient the engines' kernels compute.
    scale = torch.clamp(amax, min=1e-4) / torch.full_like(amax, FP8_MAX)  # [T, G]
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
        scale = torch.where(mantissa == 0.5, scale, torch.ldexp(torch.ones_like(scale), exponent))
    quantised = torch.clamp(blocks / scale.unsqueeze(2), -FP8_MAX, FP8_MAX).to(FP8)
    value_bytes = quantised.reshape(t, d).view(torch.uint8)
    scale_bytes = scale.contiguous().view(torch.uint8).reshape(t, 4 * groups)

    slots = slot_mapping.to(torch.int64)
    keep = (slots >= 0) & (slots < pages.shape[0] * tokens)
    safe = torch.where(keep, slots, torch.zeros_like(slots))
    page = safe // tokens
    row = safe % tokens
    value_columns = row.unsqueeze(1) * d + torch.arange(d, device=device)
    scale_columns = tokens * d + row.unsqueeze(1) * (4 * groups) + torch.arange(4 * groups, device=device)
    columns = torch.cat([value_columns, scale_columns], dim=1)  # [T, D + 4G]
    new = torch.cat([value_bytes, scale_bytes], dim=1)
    page_index = page.unsqueeze(1).expand_as(columns)
    # Without reading the mask on the host: add (new - old) mod 256 at kept slots and 0 elsewhere, so a skipped
    # token (slot < 0) writes nothing even where its placeholder index meets another token's bytes.
    old = pages[page_index, columns]
    delta = (new.to(torch.int16) - old.to(torch.int16)).remainder(256).to(torch.uint8)
    delta = torch.where(keep.unsqueeze(1), delta, torch.zeros_like(delta))
    pages.index_put_((page_index, columns), delta, accumulate=True)
    return None


# ---- light helpers of the fused top-k + transform ops (gathers on [R, k]) ------------------------------------
def gather_slots(raw, page_table, batch_of_row, table_start=None, page_size=1):
    """Translate relative top-k positions into cache slots through a page table (-1 stays -1).

    raw:          int32 [R, k] relative positions, -1 padded (topk_rows' output)
    page_table:   int32 [B, W]; batch_of_row: int64 [R] (which page-table row each top-k row uses)
    table_start:  optional int64 [R], added (in page-table entries) before the lookup
    page_size:    positions per page-table entry; slot = page_table[b, start + idx // page_size] * page_size
                  + idx % page_size. Lookups outside [0, W) read the clamped entry (an engine error upstream).
    Returns int32 [R, k].
    """
    idx = raw.to(torch.int64)
    column = idx // page_size
    if table_start is not None:
        column = column + table_start.unsqueeze(1)
    column = column.clamp(0, max(page_table.shape[1] - 1, 0))
    rows = batch_of_row.clamp(0, max(page_table.shape[0] - 1, 0)).unsqueeze(1).expand_as(column)
    if page_table.shape[0] == 0 or page_table.shape[1] == 0:
        return torch.full_like(raw, -1)
    slots = page_table.to(torch.int64)[rows, column] * page_size + idx % page_size
    return torch.where(raw < 0, torch.full_like(slots, -1), slots).to(torch.int32)


def batch_of_rows(cu_seqlens_q, rows):
    """int64 [rows]: the b with cu_seqlens_q[b] <= r < cu_seqlens_q[b+1] for each row r."""
    r = torch.arange(rows, device=cu_seqlens_q.device, dtype=torch.int64)
    return torch.searchsorted(cu_seqlens_q[1:].to(torch.int64).contiguous(), r, right=True)

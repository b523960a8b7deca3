"""keysel.compat (docs/compat.md, SPEC §7) against plain float64 NumPy references written here.

Tolerances: logits are float32 sums of exactly decoded fp8 products; each entry must lie within
2e-5 * (the same sum over |terms|) of the float64 reference (float32 accumulation of <= 128 x 128 terms), and -inf
exactly where a row may not read. Top-k, page-table transforms, gathers and cache bytes are compared exactly.
Every test draws fresh inputs (the rng fixture prints its seed).
"""

import math

import numpy as np
import pytest

import keysel

torch = pytest.importorskip("torch")
if not hasattr(torch, "float8_e4m3fn"):
    pytest.skip(f"keysel.compat needs torch.float8_e4m3fn (torch >= 2.1); this is torch {torch.__version__}",
                allow_module_level=True)

from keysel.compat import _ops, deep_gemm, flashinfer, sglang, vllm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda)"))]
HEADS = [16, 32, 64, 128]
DIMS = [64, 128]
FP8 = torch.float8_e4m3fn
NEG_INF = float("-inf")


# ---- helpers ----------------------------------------------------------------------------------------------------
def fp8(rng, shape, spread=1.0):
    """Random fp8 e4m3 values (normal * spread, saturated to +-448) as a CPU torch tensor."""
    x = torch.from_numpy((rng.standard_normal(shape) * spread).astype(np.float32)).clamp(-448, 448)
    return x.to(FP8)


def decoded(x):
    return x.to(torch.float32).double().numpy()


def i32(a, device="cpu"):
    return torch.tensor(np.asarray(a), dtype=torch.int32, device=device)


def assert_logits(actual, expected, magnitude, terms=256):
    """Within (terms + 4) * 2**-24 * magnitude of float64: the worst case of float32 summation of `terms` = D + H
    products, each exact (fp8 x fp8 fits float32); -inf exactly where expected. On a CUDA tensor (keysel's
    tensor-core kernel): within 1e-3 * magnitude, since Hopper's fp8 MMA accumulates with about 14 bits per step
    (the DeepSeek-V3 report; DeepGEMM's logits carry the same error)."""
    on_cuda = actual.device.type == "cuda"
    actual = actual.detach().cpu().double().numpy()
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isneginf(actual), ~finite)
    bound = (1e-3 if on_cuda else (terms + 4) * 2.0**-24) * magnitude[finite] + 1e-30
    assert np.all(np.abs(actual[finite] - expected[finite]) <= bound), np.abs(actual[finite] - expected[finite]).max()


def ref_scores(q, k, w, scale):
    """float64 [M, H, D] x [N, D] -> (logits [M, N], magnitude [M, N]) of sum_h w relu(q.k) * scale."""
    dots = np.einsum("mhd,nd->mhn", q, k)
    absdots = np.einsum("mhd,nd->mhn", np.abs(q), np.abs(k))
    logits = np.einsum("mhn,mh->mn", np.maximum(dots, 0), w) * scale[None, :]
    magnitude = np.einsum("mhn,mh->mn", absdots, np.abs(w)) * np.abs(scale)[None, :]
    return logits, magnitude


def ref_topk_row(values, start, end, k):
    """Keysel's rule in plain Python: larger first, ties to the lower index, NaN never; relative, ascending."""
    width = len(values)
    window = [s for s in range(max(start, 0), min(end, width)) if not math.isnan(values[s])]
    ranked = sorted(window, key=lambda s: (-values[s], s))
    chosen = sorted(ranked[:k])
    return [s - start for s in chosen] + [-1] * (k - len(chosen))


def ref_topk(logits, starts, ends, k):
    x = np.asarray(logits, dtype=np.float64)
    return np.array([ref_topk_row(list(x[r]), int(starts[r]), int(ends[r]), k) for r in range(x.shape[0])],
                    dtype=np.int64).reshape(x.shape[0], k)


def scores_of(rng, kind, shape):
    if kind == "uniform":
        x = rng.uniform(-1, 1, shape)
    elif kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "tied":
        x = rng.choice(np.array([-1.5, 0.0, 0.25, 3.0]), size=shape)
    elif kind == "equal":
        x = np.full(shape, 0.75)
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


def pack_pages(values_fp8, scales):
    """Test-side packer of the engines' page layout: [P, 64, D] fp8 + [P, 64] fp32 -> uint8 [P, 64*(D+4)]."""
    p, t, d = values_fp8.shape
    v = values_fp8.view(torch.uint8).reshape(p, t * d)
    s = scales.contiguous().view(torch.uint8).reshape(p, t * 4)
    return torch.cat([v, s], dim=1).contiguous()


def paged_case(rng, b, next_n, h, d, two_d=False):
    """A paged indexer cache with shuffled pages, junk in unused block-table entries, and its reference."""
    lens = rng.integers(next_n, 200, size=b)
    lens[0] = max(next_n, 64 * rng.integers(1, 3) + rng.integers(1, 63))  # not a multiple of 64
    max_pages = int(-(-lens.max() // 64)) + 1
    needed = [int(-(-n // 64)) for n in lens]
    num_pages = sum(needed) + 3
    order = rng.permutation(num_pages)
    table = np.full((b, max_pages), 10**6, dtype=np.int64)  # junk where no row reads
    table[1:, -1] = -5
    at = 0
    for i, n in enumerate(needed):
        table[i, :n] = order[at:at + n]
        at += n
    values = fp8(rng, (num_pages, 64, d), spread=8.0)
    scales = torch.from_numpy(rng.uniform(0.001, 0.05, (num_pages, 64)).astype(np.float32))
    cache = pack_pages(values, scales)
    q = fp8(rng, (b, next_n, h, d), spread=4.0)
    weights = torch.from_numpy(rng.standard_normal((b * next_n, h)).astype(np.float32))
    width = int(lens.max()) + 5
    if two_d:
        ctx = np.stack([rng.integers(0, n + 1, size=next_n) for n in lens]).astype(np.int32)
        limits = ctx.reshape(-1)
        ctx_t = i32(ctx)
    else:
        limits = np.array([lens[r // next_n] - next_n + r % next_n + 1 for r in range(b * next_n)])
        ctx_t = i32(lens)
    vals, scl = decoded(values), scales.double().numpy()
    qd, wd = decoded(q).reshape(b * next_n, h, d), weights.double().numpy()
    expected = np.full((b * next_n, width), NEG_INF)
    magnitude = np.zeros((b * next_n, width))
    for r in range(b * next_n):
        seq = r // next_n
        n = min(int(limits[r]), width)
        if n <= 0:
            continue
        pages = table[seq, np.arange(n) // 64]
        keys = vals[pages, np.arange(n) % 64]
        lg, mg = ref_scores(qd[r:r + 1], keys, wd[r:r + 1], scl[pages, np.arange(n) % 64])
        expected[r, :n], magnitude[r, :n] = lg[0], mg[0]
    return dict(q=q, cache=cache, weights=weights, ctx=ctx_t, table=i32(table.clip(-2**31, 2**31 - 1)),
                width=width, expected=expected, magnitude=magnitude, lens=lens)


def capture_in_a_cuda_graph(fn):
    """(graph, what fn returned inside the capture): fn runs once on a side stream (warm-up outside capture, as the
    engines do), then is captured on the current device."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph, result


def to(device, *xs):
    return [x.to(device) for x in xs]


# ---- ragged logits ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h", HEADS)
@pytest.mark.parametrize("d", DIMS)
def test_fp8_mqa_logits_matches_float64(rng, device, h, d):
    m, n = 7, 150
    q, k = fp8(rng, (m, h, d), 4.0), fp8(rng, (n, d), 8.0)
    scale = torch.from_numpy(rng.uniform(0.001, 0.05, n).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((m, h)).astype(np.float32))
    ks = rng.integers(0, 60, m)
    ke = np.minimum(n, ks + rng.integers(0, 120, m))
    ke[0] = ks[0]  # an empty window
    q_d, k_d, s_d, w_d = to(device, q, k, scale, w)
    logits = deep_gemm.fp8_mqa_logits(q_d, (k_d, s_d), w_d, i32(ks, device), i32(ke, device))
    assert logits.shape == (m, n) and logits.dtype == torch.float32 and logits.device.type == device
    expected, magnitude = ref_scores(decoded(q), decoded(k), w.double().numpy(), scale.double().numpy())
    cols = np.arange(n)
    expected[(cols[None] < ks[:, None]) | (cols[None] >= ke[:, None])] = NEG_INF
    assert_logits(logits, expected, magnitude, d + h)


def ragged_case(rng, m, n, h, d, kind):
    """Query rows over one key array: "causal" (two sequences laid end to end, each query reading its sequence's keys
    up to its own position) or "random" (mid-block starts, empty rows, starts < 0, ends > N, rows of one
    256 / H group with different ranges). Returns the CPU tensors and the float64 reference."""
    q, k = fp8(rng, (m, h, d), 4.0), fp8(rng, (n, d), 8.0)
    scale = torch.from_numpy(rng.uniform(0.001, 0.05, n).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((m, h)).astype(np.float32))
    if kind == "causal":
        m0, n0 = m // 3, n // 3 + 5
        t = np.arange(m)
        first = t < m0
        base = np.where(first, 0, n0)
        length = np.where(first, n0 - m0 + t + 1, (n - n0) - (m - m0) + (t - m0) + 1).clip(0)
        ks, ke = base, base + length
    else:
        ks = rng.integers(-10, n + 10, m)
        ke = ks + rng.integers(0, n // 2 + 80, m)
        ke[3::7] = ks[3::7] - 1  # empty rows
    expected, magnitude = ref_scores(decoded(q), decoded(k), w.double().numpy(), scale.double().numpy())
    cols = np.arange(n)
    expected[(cols[None] < ks[:, None]) | (cols[None] >= ke[:, None])] = NEG_INF
    return q, k, scale, w, ks.astype(np.int64), ke.astype(np.int64), expected, magnitude


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["causal", "random"])
@pytest.mark.parametrize("h,d", [(64, 128), (16, 64), (128, 128), (32, 64)])
def test_fp8_mqa_logits_prefill_ranges(rng, device, kind, h, d):
    """The prefill shapes keysel's CUDA indexer serves (rows grouped 256 / H per key block, N not a multiple of 64,
    ranges starting mid-block, empty rows) against float64; on CPU the torch body."""
    m, n = 70, 333
    q, k, scale, w, ks, ke, expected, magnitude = ragged_case(rng, m, n, h, d, kind)
    q_d, k_d, s_d, w_d = to(device, q, k, scale, w)
    starts = i32(ks.clip(-2**31, 2**31 - 1), device)
    ends = i32(ke.clip(-2**31, 2**31 - 1), device)
    logits = deep_gemm.fp8_mqa_logits(q_d, (k_d, s_d), w_d, starts, ends)
    assert_logits(logits, expected, magnitude, d + h)
    width = int((ke - ks).clip(0).max()) + 3
    packed = deep_gemm.fp8_mqa_logits(q_d, (k_d, s_d), w_d, starts, ends, clean_logits=False, max_seqlen_k=width)
    for t in range(m):
        lo, hi = max(int(ks[t]), 0), min(int(ke[t]), n)
        if hi > lo:
            torch.testing.assert_close(packed[t, lo - int(ks[t]):hi - int(ks[t])], logits[t, lo:hi], rtol=0, atol=0)


def test_ragged_mqa_logits_cpu_is_the_torch_body(rng):
    """keysel.ragged_mqa_logits on CPU tensors (the C++ double reference of the CUDA kernel, rounded to float32)
    against _ops.ragged_logits_torch: both within float32 rounding of float64."""
    m, n, h, d = 9, 130, 32, 64
    q, k, scale, w, ks, ke, expected, magnitude = ragged_case(rng, m, n, h, d, "random")
    starts, ends = i32(ks), i32(ke)
    ours = keysel.ragged_mqa_logits(q, w, k, scale, starts, ends)
    assert ours.shape == (m, n) and ours.dtype == torch.float32
    assert_logits(ours, expected, magnitude, d + h)
    body = _ops.ragged_logits_torch(q, k, scale, w, starts, ends, torch.empty(m, n))
    assert_logits(body, expected, magnitude, d + h)
    with pytest.raises(keysel.Error, match="'k_scale'"):
        keysel.ragged_mqa_logits(q, w, k, scale[:-1], starts, ends)


def small_integers(rng, shape):
    """fp8 values from {-3, ..., 3}: with power-of-two weights and scales every partial sum is exact in float32."""
    return torch.from_numpy(rng.integers(-3, 4, shape).astype(np.float32)).to(FP8)


@pytest.mark.parametrize("device", DEVICES)
def test_logits_exact_when_float32_is_exact(rng, device):
    m, n, h, d = 4, 70, 64, 128
    q, k = small_integers(rng, (m, h, d)), small_integers(rng, (n, d))
    scale = torch.from_numpy(2.0 ** rng.integers(-12, -2, n).astype(np.float32))
    w = torch.from_numpy((2.0 ** rng.integers(-3, 3, (m, h)) * rng.choice([-1, 1], (m, h))).astype(np.float32))
    expected, _ = ref_scores(decoded(q), decoded(k), w.double().numpy(), scale.double().numpy())
    q_d, k_d, s_d, w_d = to(device, q, k, scale, w)
    logits = deep_gemm.fp8_mqa_logits(q_d, (k_d, s_d), w_d, i32([0] * m, device), i32([n] * m, device))
    np.testing.assert_array_equal(logits.cpu().double().numpy(), expected)
    pages = torch.from_numpy(np.stack([np.arange(2), np.arange(2)[::-1]]).astype(np.int32))
    values = k[:64].reshape(1, 64, d).repeat(2, 1, 1)
    cache = pack_pages(values, scale[:64].reshape(1, 64).repeat(2, 1))
    qp = q[:2].reshape(2, 1, h, d)
    out = deep_gemm.fp8_paged_mqa_logits(*to(device, qp, cache, w[:2], i32([128, 100]), pages),
                                         deep_gemm.get_paged_mqa_logits_metadata(i32([128, 100], device), 64, 2), 128)
    ref = np.concatenate([expected[:2, :64], expected[:2, :64]], axis=1)
    ref[1, 100:] = NEG_INF
    np.testing.assert_array_equal(out.cpu().double().numpy(), ref)


def test_fp8_mqa_logits_compressed_form(rng):
    m, n, h, d, width = 5, 90, 16, 64, 40
    q, k = fp8(rng, (m, h, d), 4.0), fp8(rng, (n, d), 8.0)
    scale = torch.from_numpy(rng.uniform(0.01, 0.02, n).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((m, h)).astype(np.float32))
    ks = rng.integers(0, 60, m)
    ke = np.minimum(n, ks + rng.integers(1, width + 1, m))
    full = deep_gemm.fp8_mqa_logits(q, (k, scale), w, i32(ks), i32(ke))
    packed = deep_gemm.fp8_mqa_logits(q, (k, scale), w, i32(ks), i32(ke), clean_logits=False, max_seqlen_k=width)
    assert packed.shape == (m, width)
    for t in range(m):
        span = ke[t] - ks[t]
        torch.testing.assert_close(packed[t, :span], full[t, ks[t]:ke[t]], rtol=0, atol=0)
        assert torch.all(packed[t, span:] == NEG_INF)
    with pytest.raises(keysel.Error, match="clean_logits"):
        deep_gemm.fp8_mqa_logits(q, (k, scale), w, i32(ks), i32(ke), clean_logits=True, max_seqlen_k=width)


def test_fp8_fp4_mqa_logits_is_the_fp8_path(rng):
    m, n, h, d = 3, 20, 32, 64
    q, k = fp8(rng, (m, h, d)), fp8(rng, (n, d))
    scale = torch.ones(n)
    w = torch.ones(m, h)
    ks, ke = i32([0, 1, 2]), i32([20, 19, 3])
    a = deep_gemm.fp8_mqa_logits(q, (k, scale), w, ks, ke)
    b = deep_gemm.fp8_fp4_mqa_logits((q, None), (k, scale), w, ks, ke, logits_dtype=torch.bfloat16)
    assert b.dtype == torch.bfloat16
    torch.testing.assert_close(b, a.to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(keysel.Error, match="'q'"):
        deep_gemm.fp8_fp4_mqa_logits((q, torch.ones(m, h, dtype=torch.int32)), (k, scale), w, ks, ke)


# ---- paged logits -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("view", ["4d", "2d", "3d"])
def test_fp8_paged_mqa_logits_next_n(rng, device, next_n, view):
    c = paged_case(rng, 3, next_n, 32, 128)
    cache = c["cache"]
    cache = {"2d": cache, "3d": cache.view(cache.shape[0], 64, 132), "4d": cache.view(cache.shape[0], 64, 1, 132)}[view]
    q, cache, w, ctx, table = to(device, c["q"], cache, c["weights"], c["ctx"], c["table"])
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, deep_gemm.get_num_sms())
    assert meta.dtype == torch.int32 and meta.shape == (deep_gemm.get_num_sms() + 1, 2)
    logits = deep_gemm.fp8_paged_mqa_logits(q, cache, w, ctx, table, meta, c["width"])
    assert logits.shape == (3 * next_n, c["width"]) and logits.dtype == torch.float32
    assert_logits(logits, c["expected"], c["magnitude"], 128 + 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("h", HEADS)
@pytest.mark.parametrize("d", DIMS)
def test_fp8_paged_mqa_logits_heads_and_dims(rng, device, h, d):
    c = paged_case(rng, 3, 2, h, d)
    q, cache, w, ctx, table = to(device, c["q"], c["cache"].view(-1, 64, 1, d + 4), c["weights"], c["ctx"],
                                 c["table"])
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 4)
    assert_logits(deep_gemm.fp8_paged_mqa_logits(q, cache, w, ctx, table, meta, c["width"]), c["expected"],
                  c["magnitude"], d + h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_n", [1, 3])
def test_fp8_paged_mqa_logits_two_d_context_lens(rng, device, next_n):
    c = paged_case(rng, 3, next_n, 64, 64, two_d=True)
    q, cache, w, ctx, table = to(device, c["q"], c["cache"], c["weights"], c["ctx"], c["table"])
    meta = deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 8)
    assert_logits(deep_gemm.fp8_paged_mqa_logits(q, cache, w, ctx, table, meta, c["width"]), c["expected"],
                  c["magnitude"], 64 + 64)
    wide = deep_gemm.fp8_fp4_paged_mqa_logits((q, None), cache, w, ctx, table, meta, c["width"] + 70)
    assert torch.all(wide[:, c["width"]:] == NEG_INF)


# ---- top-k ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["uniform", "normal", "tied", "equal"])
@pytest.mark.parametrize("k", [1, 7, 2048])
def test_topk_rows_exact(rng, device, kind, k):
    r, width = 6, 2500
    x = scores_of(rng, kind, (r, width))
    starts = rng.integers(0, 300, r)
    ends = starts + rng.integers(0, width - 300, r)
    ends[1] = starts[1] + min(k, 5)  # shorter than k
    ends[2] = starts[2] + 2100  # longer than 2048
    ends[3] = width + 40  # beyond the row: intersected with [0, L)
    out = torch.full((r, k), 12345, dtype=torch.int32, device=device)
    _ops.topk_rows(torch.from_numpy(x).to(device), i32(starts, device), i32(ends, device), k, out)
    np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, starts, ends, k))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_rows_nan_inf_zero_and_strides(rng, device):
    x = np.array([[1.0, np.nan, 3.0, -np.inf, 3.0, -0.0, 0.0, np.inf, np.nan, -2.0]] * 2, dtype=np.float32)
    x[1] = x[1][::-1]
    big = torch.zeros((2, 30), device=device)
    big[:, ::3] = torch.from_numpy(x).to(device)
    view = big[:, ::3]  # a strided row
    for k in (1, 3, 6, 9, 10, 12):
        out = torch.empty((2, k), dtype=torch.int32, device=device)
        _ops.topk_rows(view, i32([0, 2], device), i32([10, 10], device), k, out)
        np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, [0, 2], [10, 10], k))
    dense = torch.from_numpy(x).to(device)  # unit stride: keysel's kernel (the strided view took the torch body)
    for k in (1, 6, 9, 12):
        out = torch.empty((2, k), dtype=torch.int32, device=device)
        _ops.topk_rows(dense, i32([0, 2], device), i32([10, 10], device), k, out)
        np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, [0, 2], [10, 10], k))
    out = torch.empty((2, 4), dtype=torch.int32, device=device)
    _ops.topk_rows(view.to(torch.bfloat16), i32([0, 0], device), i32([10, 10], device), 4, out)  # widened exactly
    np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, [0, 0], [10, 10], 4))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 2048])
def test_vllm_top_k_per_row_prefill(rng, device, k):
    r, width = 5, 2300
    x = scores_of(rng, "tied", (r, width))
    ks = rng.integers(0, 200, r)
    ke = np.minimum(width, ks + rng.integers(1, width, r))
    logits = torch.from_numpy(x).to(device)
    out = torch.full((r + 2, k), 777, dtype=torch.int32, device=device)
    vllm.top_k_per_row_prefill(logits, i32(ks, device), i32(ke, device), out, r, logits.stride(0),
                               logits.stride(1), k)
    np.testing.assert_array_equal(out[:r].cpu().numpy(), ref_topk(x, ks, ke, k))
    assert torch.all(out[r:] == 777)  # rows past num_rows untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("next_n", [1, 2, 3, 4])
@pytest.mark.parametrize("k", [1, 7, 2048])
def test_vllm_top_k_per_row_decode(rng, device, next_n, k):
    b, width = 3, 2600
    lens = rng.integers(next_n, width, b)
    lens[0] = next_n + 2  # rows shorter than k
    x = scores_of(rng, "normal", (b * next_n, width))
    logits = torch.from_numpy(x).to(device)
    out = torch.empty((b * next_n, k), dtype=torch.int32, device=device)
    vllm.top_k_per_row_decode(logits, next_n, i32(lens, device), out, b * next_n, width, 1, k)
    ends = [lens[r // next_n] - next_n + r % next_n + 1 for r in range(b * next_n)]
    np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, [0] * (b * next_n), ends, k))
    vllm.top_k_per_row_decode(logits, next_n, i32(lens, device), out, b * next_n, width, 1)  # topk_tokens omitted
    np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, [0] * (b * next_n), ends, k))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("k", [1, 7, 2048])
def test_sglang_fast_topk_v2_and_ragged(rng, device, k):
    r, width = 5, 2400
    x = scores_of(rng, "uniform", (r, width))
    starts = rng.integers(0, 100, r)
    lengths = rng.integers(0, width - 100, r)
    lengths[1] = 3
    score = torch.from_numpy(x).to(device)
    got = sglang.fast_topk_v2(score, i32(lengths, device), k, i32(starts, device))
    expected = ref_topk(x, starts, starts + lengths, k)
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    no_starts = sglang.fast_topk_v2(score, i32(lengths, device), k)
    np.testing.assert_array_equal(no_starts.cpu().numpy(), ref_topk(x, [0] * r, lengths, k))
    offset = rng.integers(0, 5000, r)
    ragged = sglang.fast_topk_transform_ragged_fused(score, i32(lengths, device), i32(offset, device), k,
                                                     i32(starts, device))
    np.testing.assert_array_equal(ragged.cpu().numpy(), np.where(expected < 0, -1, expected + offset[:, None]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["decode", "target_verify", "extend"])
def test_sglang_fast_topk_transform_fused(rng, device, mode):
    k, width, batch = 7, 300, 3
    per = {"decode": [1, 1, 1], "target_verify": [2, 2, 2], "extend": [3, 1, 2]}[mode]
    rows = sum(per)
    cu = np.concatenate([[0], np.cumsum(per)])
    table = rng.integers(0, 10**6, (batch, width))
    x = scores_of(rng, "tied", (rows, width))
    lengths = rng.integers(1, 200, rows)
    starts = rng.integers(0, 50, rows) if mode == "extend" else None
    s = starts if starts is not None else np.zeros(rows, np.int64)
    out = sglang.fast_topk_transform_fused(torch.from_numpy(x).to(device), i32(lengths, device), i32(table, device),
                                           i32(cu, device), k, None if starts is None else i32(starts, device))
    raw = ref_topk(x, s, s + lengths, k)
    row_batch = np.searchsorted(cu[1:], np.arange(rows), side="right")
    expected = np.where(raw < 0, -1, table[row_batch[:, None], raw.clip(0)])
    np.testing.assert_array_equal(out.cpu().numpy(), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 4])
def test_flashinfer_page_table_transform(rng, device, page_size):
    rows, k, width = 6, 7, 260
    x = scores_of(rng, "normal", (rows, width))
    lengths = rng.integers(0, 200, rows)
    lengths[0] = 4
    starts = rng.integers(0, 40, rows) if page_size == 1 else None
    s = starts if starts is not None else np.zeros(rows, np.int64)
    row_to_batch = rng.integers(0, 2, rows)
    table = rng.integers(0, 10**5, (2, 400))
    out = torch.full((rows, k), 5, dtype=torch.int32, device=device)
    raw_out = torch.full((rows, k), 5, dtype=torch.int32, device=device)
    got = flashinfer.top_k_page_table_transform(
        torch.from_numpy(x).to(device), i32(table, device), i32(lengths, device), k, i32(row_to_batch, device),
        row_starts=None if starts is None else i32(starts, device), page_size=page_size, out=out,
        out_raw_indices=raw_out)
    assert got is out
    raw = ref_topk(x, s, s + lengths, k)
    np.testing.assert_array_equal(raw_out.cpu().numpy(), raw)
    column = raw.clip(0) // page_size + (s[:, None] if starts is not None else 0)
    expected = np.where(raw < 0, -1, table[row_to_batch[:, None], column] * page_size + raw.clip(0) % page_size)
    np.testing.assert_array_equal(out.cpu().numpy(), expected)
    offsets = rng.integers(0, 1000, rows)
    ragged = flashinfer.top_k_ragged_transform(torch.from_numpy(x).to(device), i32(offsets, device),
                                               i32(lengths, device), k, row_starts=None if starts is None else
                                               i32(starts, device))
    np.testing.assert_array_equal(ragged.cpu().numpy(), np.where(raw < 0, -1, raw + offsets[:, None]))


def test_flashinfer_top_k_sorted_and_half(rng):
    x = scores_of(rng, "tied", (4, 50))
    values, indices = flashinfer.top_k(torch.from_numpy(x).to(torch.float16), 9, sorted=True)
    assert indices.dtype == torch.int64 and values.dtype == torch.float16
    for r in range(4):
        expected = sorted(range(50), key=lambda s: (-x[r, s], s))[:9]
        assert indices[r].tolist() == expected
    _, plain = flashinfer.top_k(torch.from_numpy(x), 9)
    assert plain.tolist() == [sorted(row) for row in indices.tolist()]
    with pytest.raises(keysel.Error, match="tie_break"):
        flashinfer.top_k(torch.from_numpy(x), 3, tie_break=2)


# ---- the writer and the gather -------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("d", DIMS)
@pytest.mark.parametrize("scale_fmt", ["ue8m0", ""])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_indexer_k_quant_and_cache_round_trip(rng, device, d, scale_fmt, dtype):
    tokens, pages = 70, 4
    k = torch.from_numpy((rng.standard_normal((tokens, d)) * rng.uniform(0.01, 30, (tokens, 1))).astype(np.float32))
    k[3] = 0.0  # amax below 1e-4: scale 1e-4 / 448
    k[4, :5] = torch.tensor([1e-5, -3e-4, 2.5e-6, 0.0, 1e-6])
    k = k.to(dtype)
    slots = rng.permutation(pages * 64)[:tokens].astype(np.int64)
    slots[rng.choice(tokens, 6, replace=False)] = -1
    slots[5] = -1
    cache = torch.from_numpy(rng.integers(0, 256, (pages, 64, d + 4), dtype=np.uint8))
    before = cache.clone()
    k_d, cache_d = to(device, k, cache)
    vllm.indexer_k_quant_and_cache(k_d, cache_d, torch.from_numpy(slots).to(device), 128 if d == 128 else d,
                                   scale_fmt)
    flat = cache_d.cpu().reshape(pages, -1)
    values = flat[:, : 64 * d].reshape(pages, 64, d).view(FP8).float().double().numpy()
    scales = flat[:, 64 * d:].contiguous().view(torch.float32).double().numpy()
    kd = k.float().double().numpy()
    written = np.zeros((pages, 64), bool)
    for t in range(tokens):
        if slots[t] < 0:
            continue
        p, row = divmod(int(slots[t]), 64)
        written[p, row] = True
        scale = scales[p, row]
        amax = np.abs(kd[t]).max()
        needed = np.float32(max(amax, 1e-4)) / np.float32(448.0)
        if scale_fmt == "ue8m0":
            mant, _ = math.frexp(scale)
            assert mant == 0.5 and scale >= needed and scale < 2 * needed  # the power of two just above
        else:
            assert scale == needed
        deq = values[p, row] * scale
        # e4m3: 3 mantissa bits (relative half-ulp 2**-4), subnormal step 2**-9 (absolute half-step 2**-10)
        bound = np.maximum(np.abs(kd[t]) * 2.0**-4, scale * 2.0**-10) * (1 + 1e-6)
        assert np.all(np.abs(deq - kd[t]) <= bound)
        assert np.all(np.abs(values[p, row]) <= 448)
    old = before.reshape(pages, -1)
    for p in range(pages):
        for row in range(64):
            if not written[p, row]:
                assert torch.equal(flat[p, row * d:(row + 1) * d], old[p, row * d:(row + 1) * d])
                assert torch.equal(flat[p, 64 * d + 4 * row: 64 * d + 4 * row + 4],
                                   old[p, 64 * d + 4 * row: 64 * d + 4 * row + 4])


def test_indexer_k_quant_and_cache_quant_groups(rng):
    d, qbs = 128, 32
    k = torch.from_numpy(rng.standard_normal((5, d)).astype(np.float32)).to(torch.bfloat16)
    cache = torch.zeros((1, 64 * (d + 16)), dtype=torch.uint8)
    vllm.indexer_k_quant_and_cache(k, cache, torch.tensor([0, 63, 7, -1, 8]), qbs, "ue8m0")
    for t, slot in enumerate([0, 63, 7, None, 8]):
        if slot is None:
            continue
        vals = cache[0, slot * d:(slot + 1) * d].view(FP8).float()
        scales = cache[0, 64 * d + 16 * slot: 64 * d + 16 * slot + 16].view(torch.float32)
        deq = vals.reshape(4, 32) * scales[:, None]
        ref = k[t].float().reshape(4, 32)
        assert torch.all((deq - ref).abs() <= torch.maximum(ref.abs() / 16, scales[:, None] / 1024) * 1.000001)


@pytest.mark.parametrize("device", DEVICES)
def test_cp_gather_indexer_k_quant_cache(rng, device):
    d, b = 128, 3
    lens = np.array([70, 5, 130])
    c = paged_case(rng, b, 1, 16, d)
    table = c["table"].clone()
    table[:, :] = torch.from_numpy(rng.permutation(table.numel()).reshape(table.shape) % c["cache"].shape[0]).to(
        torch.int32)
    cu = np.concatenate([[0], np.cumsum(lens)])
    total = int(cu[-1])
    cache, table_d = to(device, c["cache"], table)
    dst_k = torch.full((total + 2, d), 9, dtype=torch.uint8, device=device)
    dst_scale = torch.full((total + 2, 4), 9, dtype=torch.uint8, device=device)
    vllm.cp_gather_indexer_k_quant_cache(cache, dst_k, dst_scale, table_d, i32(cu, device))
    flat = c["cache"]
    for seq in range(b):
        for j in range(lens[seq]):
            page, row = int(table[seq, j // 64]), j % 64
            t = cu[seq] + j
            assert torch.equal(dst_k[t].cpu(), flat[page, row * d:(row + 1) * d])
            assert torch.equal(dst_scale[t].cpu(), flat[page, 64 * d + 4 * row: 64 * d + 4 * row + 4])
    assert torch.all(dst_k[total:] == 9) and torch.all(dst_scale[total:] == 9)


# ---- errors: keysel.Error naming the argument, nothing written -------------------------------------------------
def test_errors_name_the_argument_and_leave_out_untouched(rng):
    m, n, h, d = 3, 20, 16, 64
    q, k = fp8(rng, (m, h, d)), fp8(rng, (n, d))
    scale, w = torch.ones(n), torch.ones(m, h)
    ks, ke = i32([0, 0, 0]), i32([5, 6, 7])
    out = torch.full((m, n), 3.0)
    cases = [
        (dict(q_fp8=q.float()), "q_fp8"),
        (dict(k_fp8=fp8(rng, (n, d + 1))), "k_fp8"),
        (dict(k_scale=torch.ones(n + 1)), "k_scale"),
        (dict(weights=torch.ones(m, h, dtype=torch.float64)), "weights"),
        (dict(starts=ks.long()), "starts"),
        (dict(ends=torch.empty(m, dtype=torch.int32, device="meta")), "ends"),
    ]
    for change, name in cases:
        args = dict(q_fp8=q, k_fp8=k, k_scale=scale, weights=w, starts=ks, ends=ke, clean=True, out=out)
        args.update(change)
        with pytest.raises(keysel.Error, match=f"'{name}'") as info:
            _ops.ragged_logits(**args)
        assert "expected" in str(info.value) and "got" in str(info.value)
        assert torch.all(out == 3.0)
    with pytest.raises(keysel.Error, match="'out'"):
        _ops.ragged_logits(q, k, scale, w, ks, ke, True, torch.empty(m, n + 1))
    with pytest.raises(ValueError):  # keysel.Error is a ValueError
        deep_gemm.fp8_mqa_logits(fp8(rng, (m, 12, d)), (k, scale), torch.ones(m, 12), ks, ke)

    sel = torch.full((2, 4), 42, dtype=torch.int32)
    logits = torch.randn(2, 30)
    for bad, name in ((dict(starts=i32([0])), "starts"), (dict(k=0), "k"), (dict(logits=logits.double()), "logits"),
                      (dict(ends=i32([1, 2]).to("meta")), "ends")):
        args = dict(logits=logits, starts=i32([0, 0]), ends=i32([30, 30]), k=4, out=sel)
        args.update(bad)
        with pytest.raises(keysel.Error, match=f"'{name}'"):
            _ops.topk_rows(**args)
        assert torch.all(sel == 42)
    with pytest.raises(keysel.Error, match="'stride0'"):
        vllm.top_k_per_row_prefill(logits, i32([0, 0]), i32([3, 3]), sel, 2, 7, 1, 4)
    with pytest.raises(keysel.Error, match="'raw_topk_indices'"):
        vllm.top_k_per_row_decode(logits, 1, i32([3, 3]), sel, 2, 30, 1, 5)
    assert torch.all(sel == 42)

    c = paged_case(rng, 2, 2, 16, 64)
    page_out = torch.full((4, c["width"]), 3.0)
    for bad, name in ((dict(kv_cache=c["cache"][:, :-1]), "kv_cache"), (dict(next_n=3), "q_fp8"),
                      (dict(context_lens=i32([1, 2, 3])), "context_lens"),
                      (dict(block_table=c["table"].long()), "block_table"),
                      (dict(weights=torch.ones(3, 16)), "weights")):
        args = dict(q_fp8=c["q"], kv_cache=c["cache"], weights=c["weights"], context_lens=c["ctx"],
                    block_table=c["table"], next_n=2, clean=False, out=page_out)
        args.update(bad)
        with pytest.raises(keysel.Error, match=f"'{name}'"):
            _ops.paged_logits(**args)
        assert torch.all(page_out == 3.0)

    cache = torch.zeros((2, 64, 132), dtype=torch.uint8)
    kk = torch.ones(3, 128, dtype=torch.bfloat16)
    for bad, name in ((dict(k=kk.to(torch.int32)), "k"), (dict(slot_mapping=torch.zeros(4, dtype=torch.int64)),
                                                          "slot_mapping"),
                      (dict(quant_block_size=100), "quant_block_size"),
                      (dict(kv_cache=torch.zeros((2, 64, 133), dtype=torch.uint8)), "kv_cache")):
        args = dict(k=kk, kv_cache=cache, slot_mapping=torch.zeros(3, dtype=torch.int64), quant_block_size=128,
                    scale_fmt="ue8m0")
        args.update(bad)
        with pytest.raises(keysel.Error, match=f"'{name}'"):
            vllm.indexer_k_quant_and_cache(**args)
        assert torch.all(cache == 0)


# ---- CUDA graphs --------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda) for graph capture")
def test_cuda_graph_capture_and_replay(rng):
    device = "cuda"
    c = paged_case(rng, 3, 2, 64, 128)
    q, cache, w, ctx, table = to(device, c["q"], c["cache"], c["weights"], c["ctx"], c["table"])
    logits = torch.empty((6, c["width"]), device=device)
    k = 7
    sel = torch.empty((6, k), dtype=torch.int32, device=device)
    starts = torch.zeros(6, dtype=torch.int32, device=device)
    ends = torch.full((6,), c["width"], dtype=torch.int32, device=device)
    m, n = 5, 100
    rq, rk = fp8(rng, (m, 32, 64)).to(device), fp8(rng, (n, 64)).to(device)
    rs, rw = torch.ones(n, device=device), torch.ones(m, 32, device=device)
    rks, rke = i32([0, 1, 2, 3, 4], device), i32([50, 60, 70, 80, 100], device)
    rout = torch.empty((m, n), device=device)
    rsel = torch.empty((m, k), dtype=torch.int32, device=device)

    def work():
        _ops.paged_logits(q, cache, w, ctx, table, 2, False, logits)
        _ops.topk_rows(logits, starts, ends, k, sel)
        _ops.ragged_logits(rq, rk, rs, rw, rks, rke, True, rout)
        _ops.topk_rows(rout, rks, rke, k, rsel)

    graph, _ = capture_in_a_cuda_graph(work)
    for _ in range(2):  # new inputs into the captured buffers, then replay
        q.copy_(fp8(rng, tuple(q.shape), 4.0).to(device))
        rq.copy_(fp8(rng, tuple(rq.shape)).to(device))
        graph.replay()
        torch.cuda.synchronize()
        eager = torch.empty_like(logits)
        _ops.paged_logits(q, cache, w, ctx, table, 2, False, eager)
        torch.testing.assert_close(logits, eager, rtol=0, atol=0, equal_nan=True)
        np.testing.assert_array_equal(sel.cpu().numpy(), ref_topk(eager.cpu().numpy(), [0] * 6, [c["width"]] * 6, k))
        eager_r = torch.empty_like(rout)
        _ops.ragged_logits(rq, rk, rs, rw, rks, rke, True, eager_r)
        torch.testing.assert_close(rout, eager_r, rtol=0, atol=0)
        np.testing.assert_array_equal(rsel.cpu().numpy(), ref_topk(eager_r.cpu().numpy(), rks.cpu().numpy(),
                                                                   rke.cpu().numpy(), k))


def _entry_point_calls(rng, device):
    """Each entry point of the issue's list on fresh CUDA inputs: name -> (call() returning its outputs, the inputs
    a replay refreshes in place)."""
    c = paged_case(rng, 3, 2, 64, 128)
    q, cache, w, ctx, table = to(device, c["q"], c["cache"], c["weights"], c["ctx"], c["table"])
    m, n = 40, 300
    rq, rk, rs, rw, rks, rke, _, _ = ragged_case(rng, m, n, 64, 128, "causal")
    rq, rk, rs, rw = to(device, rq, rk, rs, rw)
    rks, rke = i32(rks, device), i32(rke, device)
    rows, width, k = 6, 2100, 2048
    scores = torch.from_numpy(scores_of(rng, "normal", (rows, width))).to(device)
    starts = i32(rng.integers(0, 50, rows), device)
    lengths = i32(rng.integers(1, width - 50, rows), device)
    ends = (starts + lengths).to(torch.int32)
    seq_lens = i32(rng.integers(2, width, 3), device)
    page_table = i32(rng.integers(0, 10**5, (3, width)), device)
    cu = i32([0, 2, 3, 6], device)
    row_to_batch = i32([0, 0, 1, 2, 2, 1], device)
    keys = torch.from_numpy(rng.standard_normal((20, 128)).astype(np.float32)).to(torch.bfloat16).to(device)
    writer_cache = torch.zeros((4, 64 * 132), dtype=torch.uint8, device=device)
    slots = torch.from_numpy(rng.permutation(256)[:20].astype(np.int64)).to(device)
    out_prefill = torch.empty((rows, k), dtype=torch.int32, device=device)
    out_decode = torch.empty((rows, k), dtype=torch.int32, device=device)
    workspace = torch.empty(keysel.paged_topk_workspace_bytes(6, c["width"]), dtype=torch.uint8, device=device)

    def topk_prefill():
        vllm.top_k_per_row_prefill(scores, starts, ends, out_prefill, rows, scores.stride(0), scores.stride(1), k)
        return [out_prefill]

    def topk_decode():
        vllm.top_k_per_row_decode(scores, 2, seq_lens, out_decode, rows, width, 1, k)
        return [out_decode]

    def writer():
        vllm.indexer_k_quant_and_cache(keys, writer_cache, slots, 128, "ue8m0")
        return [writer_cache]

    calls = {
        "fp8_mqa_logits": (lambda: [deep_gemm.fp8_mqa_logits(rq, (rk, rs), rw, rks, rke)], [rq]),
        "fp8_paged_mqa_logits": (lambda: [deep_gemm.fp8_paged_mqa_logits(
            q, cache, w, ctx, table, deep_gemm.get_paged_mqa_logits_metadata(ctx, 64, 8), c["width"])], [q]),
        "top_k_per_row_prefill": (topk_prefill, [scores]),
        "top_k_per_row_decode": (topk_decode, [scores]),
        "fast_topk_v2": (lambda: [sglang.fast_topk_v2(scores, lengths, k, starts)], [scores]),
        "fast_topk_transform_fused": (lambda: [sglang.fast_topk_transform_fused(scores, lengths, page_table, cu, k,
                                                                                starts)], [scores]),
        "top_k_page_table_transform": (lambda: [flashinfer.top_k_page_table_transform(
            scores, page_table, lengths, k, row_to_batch.to(torch.int32))], [scores]),
        "indexer_k_quant_and_cache": (writer, [keys]),
        "select_topk_paged": (lambda: [keysel.select_topk_paged(
            q, cache, w, ctx, table, 64, n_keys=c["width"], out=torch.empty((6, 64), dtype=torch.int32,
                                                                           device=device), workspace=workspace)], [q]),
    }
    return calls


ENTRY_POINTS = ["fp8_mqa_logits", "fp8_paged_mqa_logits", "top_k_per_row_prefill", "top_k_per_row_decode",
                "fast_topk_v2", "fast_topk_transform_fused", "top_k_page_table_transform", "indexer_k_quant_and_cache",
                "select_topk_paged"]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda) for graph capture")
@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_entry_point_is_captured_by_a_cuda_graph(rng, name):
    """Each entry point captured as the engines capture it (outputs allocated by torch inside the capture), replayed
    on new inputs written into the captured buffers, and compared exactly with an eager call on the same inputs."""
    call, inputs = _entry_point_calls(rng, "cuda")[name]
    graph, captured = capture_in_a_cuda_graph(call)
    for _ in range(2):
        for x in inputs:
            fresh = torch.from_numpy((rng.standard_normal(tuple(x.shape)) * 4).astype(np.float32)).clamp(-448, 448)
            x.copy_(fresh.to(x.dtype).to(x.device))
        graph.replay()
        torch.cuda.synchronize()
        replayed = [t.clone() for t in captured]
        eager = call()
        torch.cuda.synchronize()
        for a, b in zip(replayed, eager):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda)")
def test_cuda_tests_pass_on_the_portable_kernels():
    """The CUDA tests of this file and of test_dsa.py again in a fresh process with KEYSEL_CUDA_PORTABLE=1 (read once
    per process): the indexer's mma.sync kernels, which sm_89 GPUs run, instead of the sm_90a wgmma kernel."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, KEYSEL_CUDA_PORTABLE="1")
    files = [__file__, os.path.join(os.path.dirname(os.path.abspath(__file__)), "test_dsa.py")]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files, "-k",
                             "cuda and not portable"], env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " passed" in result.stdout, result.stdout[-500:]

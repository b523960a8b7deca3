"""keysel.compat.flash_mla and vllm.concat_and_cache_mla (docs/compat.md "FlashMLA", docs/SPEC.md §8)
against float64 NumPy references written here.

The fp8 V3.2 cache is decoded here from its bits (e4m3: 1 sign, 4 exponent bits of bias 7, 3 mantissa bits; the
scales and the bf16 RoPE values from their bytes), independently of torch's float8 conversion. Tolerances: out is
the float32 result rounded once to bf16, so |out - ref| <= 2**-8 |ref| + 2e-4 max|v|; lse and max_logits are
float32 sums of 576 products, within 1e-4 (+ 1e-6 relative). Empty rows must give exactly out 0, lse +inf and
max_logits -inf. Every test draws fresh inputs (the rng fixture prints its seed).
"""

import math

import numpy as np
import pytest

import keysel

torch = pytest.importorskip("torch")
if not hasattr(torch, "float8_e4m3fn"):
    pytest.skip(f"keysel.compat needs torch.float8_e4m3fn (torch >= 2.1); this is torch {torch.__version__}",
                allow_module_level=True)

from keysel.compat import _mla, flash_mla, vllm  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda)"))]
H_Q = 64
INF = float("inf")


# ---- independent decoders and references ------------------------------------------------------------------
def e4m3(codes):
    """uint8 codes -> float64 values of float8 e4m3fn (0x7F / 0xFF are NaN)."""
    c = np.asarray(codes, dtype=np.int64)
    sign = np.where(c >> 7, -1.0, 1.0)
    exponent = (c >> 3) & 0xF
    mantissa = c & 7
    value = np.where(exponent == 0, mantissa / 8.0 * 2.0**-6, (1 + mantissa / 8.0) * 2.0 ** (exponent - 7.0))
    return np.where((exponent == 15) & (mantissa == 7), np.nan, sign * value)


def bf16_bits_to_f64(u16):
    return (np.asarray(u16, dtype=np.uint32) << 16).view(np.float32).astype(np.float64)


def decode_v32(token_bytes):
    """uint8 [..., 656] -> float64 [..., 576]."""
    b = np.ascontiguousarray(token_bytes, dtype=np.uint8)
    scales = b[..., 512:528].copy().view("<f4").astype(np.float64)  # [..., 4]
    nope = e4m3(b[..., :512]).reshape(*b.shape[:-1], 4, 128) * scales[..., None]
    rope = bf16_bits_to_f64(b[..., 528:].copy().view("<u2"))
    return np.concatenate([nope.reshape(*b.shape[:-1], 512), rope], axis=-1)


def bf16(rng, shape, spread=0.3):
    """Random bf16 tensor (CPU) and its exact float64 values."""
    x = torch.from_numpy((rng.standard_normal(shape) * spread).astype(np.float32)).to(torch.bfloat16)
    return x, x.double().numpy()


def ref_attention(q, kv, valid, scale, sink, d_v=512):
    """q [R, H, D], kv [R, K, D] (rows per query), valid bool [R, K], sink None or [H] -> (out, max_logits, lse)."""
    kv = np.where(valid[..., None], kv, 0.0)
    s = np.einsum("rhd,rkd->rhk", q, kv) * scale
    s = np.where(valid[:, None, :], s, -np.inf)
    m = s.max(axis=2)
    empty = ~np.isfinite(m)
    m0 = np.where(empty, 0.0, m)
    total = np.exp(s - m0[..., None]).sum(axis=2)
    with np.errstate(divide="ignore"):
        lse = np.log(total) + m0
    denom = total if sink is None else total + np.exp(np.asarray(sink, dtype=np.float64) - m0)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.exp(s - m0[..., None]) / denom[..., None]
    p = np.where(empty[..., None] | ~np.isfinite(p), 0.0, p)
    out = np.einsum("rhk,rkd->rhd", p, kv[..., :d_v])
    return out, np.where(empty, -np.inf, m), np.where(empty, np.inf, lse), np.abs(kv[..., :d_v]).max()


def assert_attention(out, max_logits, lse, ref):
    r_out, r_max, r_lse, vmax = ref
    # keysel's CUDA kernel (the sparse forms on a GPU), like FlashMLA, rounds the probabilities and the decoded
    # values to bf16 before p.v: each term errs by up to 2^-9 of p_j |v_j| twice, at most 2^-8 vmax in all. The
    # torch body accumulates p.v in float32 from exact values: 2e-4 vmax covers its float32 sums.
    kernel = out.device.type == "cuda" and keysel.built_with_cuda()
    out = out.detach().float().cpu().double().numpy()
    bound = 2.0**-8 * np.abs(r_out) + (2.0**-8 if kernel else 2e-4) * max(vmax, 1e-30)
    assert np.all(np.abs(out - r_out) <= bound), np.abs(out - r_out).max()
    for got, want in ((lse, r_lse), (max_logits, r_max)):
        if got is None:
            continue
        got = got.detach().cpu().double().numpy()
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        np.testing.assert_array_equal(got[np.isinf(want)], want[np.isinf(want)])
        finite = np.isfinite(want)
        # The kernel's logits come from keys decoded to bf16 (2^-9 of each value when a scale is not a power of
        # two, as vLLM's writer makes them): about 1e-3 of logits of order one.
        tolerance = 1e-3 if kernel else 1e-4
        assert np.all(np.abs(got[finite] - want[finite]) <= tolerance + 1e-6 * np.abs(want[finite]))


def random_indices(rng, rows, topk, slots, invalid=(-1,)):
    """int32 [rows, topk] distinct slots per row, a quarter replaced by invalid values, row 1 all invalid."""
    idx = np.stack([rng.permutation(slots)[:topk] if topk <= slots else
                    np.concatenate([rng.permutation(slots), np.full(topk - slots, -1)]) for _ in range(rows)])
    junk = rng.random(idx.shape) < 0.25
    idx = np.where(junk, rng.choice(np.asarray(invalid), size=idx.shape), idx)
    if rows > 1:
        idx[1] = invalid[0]
    return idx.astype(np.int32)


def sinks(rng, h):
    s = rng.standard_normal(h).astype(np.float32)
    s[:3] = [INF, -INF, 30.0]  # out 0; no effect; nearly all weight on the sink
    return torch.from_numpy(s)


# ---- flash_mla_sparse_fwd -------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("topk,d_qk", [(1, 576), (100, 576), (128, 512), (200, 576)])
@pytest.mark.parametrize("features", ["plain", "sink", "topk_length", "both"])
def test_sparse_fwd_matches_float64(rng, device, topk, d_qk, features):
    s_q, s_kv = 5, 173
    q, qn = bf16(rng, (s_q, H_Q, d_qk))
    kv, kvn = bf16(rng, (s_kv, 1, d_qk))
    idx = random_indices(rng, s_q, topk, s_kv, invalid=(-1, s_kv, 2**31 - 1, -123456))
    sink = sinks(rng, H_Q) if features in ("sink", "both") else None
    length = rng.integers(0, topk + 1, size=s_q).astype(np.int32) if features in ("topk_length", "both") else None
    if length is not None:
        length[0] = topk + 5  # larger than topk: all count
    scale = 0.5 * d_qk**-0.5
    args = [torch.from_numpy(idx).reshape(s_q, 1, topk), sink,
            None if length is None else torch.from_numpy(length)]
    q_d, kv_d = q.to(device), kv.to(device)
    out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q_d, kv_d, args[0].to(device), scale, 512,
                                                          *[None if a is None else a.to(device) for a in args[1:]])
    assert out.shape == (s_q, H_Q, 512) and out.dtype == torch.bfloat16 and out.device.type == device
    assert max_logits.shape == lse.shape == (s_q, H_Q) and lse.dtype == max_logits.dtype == torch.float32

    valid = (idx >= 0) & (idx < s_kv)
    if length is not None:
        valid &= np.arange(topk)[None, :] < length[:, None]
    gathered = kvn[np.clip(idx, 0, s_kv - 1), 0]  # [s_q, topk, d_qk]
    assert_attention(out, max_logits, lse, ref_attention(qn, gathered, valid, scale, None if sink is None else
                                                         sink.double().numpy()))
    assert torch.all(out[1] == 0) and torch.all(torch.isposinf(lse[1])) and torch.all(torch.isneginf(max_logits[1]))


def test_sparse_fwd_sink_leaves_lse_and_nan_outside_selection(rng):
    s_q, s_kv, topk = 3, 90, 64
    q, _ = bf16(rng, (s_q, H_Q, 576))
    kv, _ = bf16(rng, (s_kv, 1, 576))
    idx = torch.from_numpy(random_indices(rng, s_q, topk, s_kv)).reshape(s_q, 1, topk)
    chosen = set(idx[idx >= 0].tolist())
    unused = [s for s in range(s_kv) if s not in chosen]
    kv[unused] = float("nan")  # never read into the result
    length = torch.tensor([topk, 0, 10], dtype=torch.int32)
    kv2 = kv.clone()
    read = set(idx[0, 0].tolist()) | set(idx[2, 0, :10].tolist())
    beyond = [s for s in idx[2, 0, 10:].tolist() if s >= 0 and s not in read]
    kv2[beyond] = float("nan")  # selected by row 2 only beyond its topk_length: not read either
    plain = flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.04, topk_length=length)
    sunk = flash_mla.flash_mla_sparse_fwd(q, kv, idx, 0.04, attn_sink=sinks(rng, H_Q), topk_length=length)
    masked = flash_mla.flash_mla_sparse_fwd(q, kv2, idx, 0.04, topk_length=length)
    assert not torch.isnan(plain[0]).any() and not torch.isnan(masked[0]).any()
    assert torch.equal(plain[1], sunk[1]) and torch.equal(plain[2], sunk[2])  # sink: out only
    assert torch.equal(plain[0][2], masked[0][2])
    assert torch.all(sunk[0][:, 0] == 0)  # +inf sink


def test_lse_is_natural_and_base2_conversion(rng):
    s_q, s_kv, topk = 4, 120, 64
    q, qn = bf16(rng, (s_q, H_Q, 576))
    kv, kvn = bf16(rng, (s_kv, 1, 576))
    idx = random_indices(rng, s_q, topk, s_kv)
    _, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv, torch.from_numpy(idx).reshape(s_q, 1, topk), 0.05)
    max2, lse2 = _mla.prefill_state_base2(max_logits, lse)
    valid = idx >= 0
    p2 = np.einsum("rhd,rkd->rhk", qn, kvn[np.clip(idx, 0, None), 0]) * 0.05 * math.log2(math.e)
    p2 = np.where(valid[:, None, :], p2, -np.inf)
    with np.errstate(divide="ignore"):
        ref_lse2 = np.log2(np.exp2(p2).sum(axis=2))  # FlashMLA before 082094b: log2-sum-exp2, -inf when empty
    ref_max2 = p2.max(axis=2)
    np.testing.assert_array_equal(torch.isneginf(lse2).numpy(), np.isneginf(ref_lse2))
    assert torch.isneginf(lse2[1]).all() and torch.isposinf(lse[1]).all()
    finite = np.isfinite(ref_lse2)
    assert np.allclose(lse2.double().numpy()[finite], ref_lse2[finite], rtol=1e-6, atol=1e-4)
    assert np.allclose(max2.double().numpy()[finite], ref_max2[finite], rtol=1e-6, atol=1e-4)
    assert np.allclose(lse.double().numpy()[finite], ref_lse2[finite] * math.log(2.0), rtol=1e-6, atol=1e-4)


# ---- the fp8 V3.2 cache: writer and decoding -----------------------------------------------------------------
def nearest_e4m3(x):
    """Round-to-nearest-even onto the e4m3 grid (finite, |x| <= 448): the code of each value."""
    codes = np.array([c for c in range(256) if not np.isnan(e4m3(c))])
    grid = e4m3(codes)
    dist = np.abs(x[..., None] - grid)
    best = dist.min(axis=-1, keepdims=True)
    ties = dist == best
    even = ties & ((codes & 1) == 0)  # of two nearest grid points, the one with an even mantissa
    pick = np.where(even.any(axis=-1, keepdims=True), even, ties)
    return grid[np.argmax(pick, axis=-1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_concat_and_cache_mla_fp8_ds_mla_bytes(rng, device, dtype):
    blocks, block_size, t = 3, 5, 9
    kv_c = torch.from_numpy(rng.standard_normal((t + 2, 512)).astype(np.float32) * 3).to(dtype)
    kv_c[0, :128] = 0  # an all-zero tile: scale FLT_MIN
    kv_c[1, 128:256] *= 1e-6
    k_pe = torch.from_numpy(rng.standard_normal((t + 2, 64)).astype(np.float32)).to(dtype)
    slots = rng.permutation(blocks * block_size)[:t].astype(np.int64)
    slots[3] = -1
    cache = torch.full((blocks, block_size + 1, 656), 7, dtype=torch.uint8)[:, :block_size]  # padded blocks
    vllm.concat_and_cache_mla(kv_c.to(device), k_pe.to(device), cache.to(device) if device == "cpu" else
                              (cache_d := cache.to(device)), torch.from_numpy(slots).to(device), "fp8_ds_mla",
                              torch.ones(1, device=device))
    got = (cache if device == "cpu" else cache_d.cpu()).reshape(-1, 656).numpy()
    x = kv_c.double().numpy()
    for token, slot in enumerate(slots):
        if slot < 0:
            continue
        row = got[slot]
        amax = np.abs(x[token, :512]).reshape(4, 128).max(axis=1)
        scale = np.maximum((amax.astype(np.float32) / np.float32(448)).astype(np.float32), np.float32(1.1754944e-38))
        np.testing.assert_array_equal(row[512:528].view("<f4"), scale)
        target = np.clip(x[token, :512].reshape(4, 128) / scale[:, None].astype(np.float64), -448, 448)
        np.testing.assert_array_equal(e4m3(row[:512]).reshape(4, 128), nearest_e4m3(target.astype(np.float32)))
        np.testing.assert_array_equal(row[528:].view("<u2"), k_pe[token].view(torch.int16).numpy().view("<u2"))
    untouched = np.setdiff1d(np.arange(blocks * block_size), slots[slots >= 0])
    assert np.all(got[untouched] == 7)


def test_quant_v32_ue8m0_and_exact_dequant(rng):
    kv, _ = bf16(rng, (40, 576), spread=2.0)
    kv[0, :128] = 0
    kvn = kv.double().numpy()
    packed = _mla.quant_v32(kv, "ue8m0")
    assert packed.shape == (40, 656) and packed.dtype == torch.uint8
    scales = packed[:, 512:528].contiguous().view(torch.float32).double().numpy()
    amax = np.abs(kvn[:, :512]).reshape(40, 4, 128).max(axis=2)
    want = np.maximum(amax / 448.0, 1e-4)
    assert np.all(scales >= want * (1 - 1e-7)) and np.all(scales < 2 * want)
    assert np.all(np.log2(scales) == np.round(np.log2(scales)))  # powers of two
    np.testing.assert_array_equal(_mla.dequant_v32(packed).double().numpy(), decode_v32(packed.numpy()))
    np.testing.assert_array_equal(decode_v32(packed.numpy())[:, 512:], kvn[:, 512:])  # RoPE exact
    rel = np.abs(decode_v32(packed.numpy())[:, :512] - kvn[:, :512]) / np.repeat(scales, 128, axis=1)
    assert rel.max() <= 16  # half an e4m3 step at |x / scale| <= 448 is at most 16


def test_concat_and_cache_mla_auto(rng):
    kv_c, _ = bf16(rng, (6, 512))
    k_pe, _ = bf16(rng, (6, 64))
    cache = torch.zeros((2, 4, 576), dtype=torch.bfloat16)
    vllm.concat_and_cache_mla(kv_c, k_pe, cache, torch.tensor([5, -1, 0, 7], dtype=torch.int64), "auto",
                              torch.ones(1))
    flat = cache.reshape(8, 576)
    assert torch.equal(flat[5], torch.cat([kv_c[0], k_pe[0]])) and torch.equal(flat[0], torch.cat([kv_c[2], k_pe[2]]))
    assert torch.equal(flat[7], torch.cat([kv_c[3], k_pe[3]]))
    assert torch.all(flat[[1, 2, 3, 4, 6]] == 0)


# ---- flash_mla_with_kvcache, sparse (fp8 V3.2 cache) --------------------------------------------------------------
def v32_case(rng, b, s_q, topk, block_size, seq=150, h=H_Q):
    """A V3.2 cache written by concat_and_cache_mla over shuffled blocks; tokens no valid index reads are NaN."""
    per_seq = -(-seq // block_size)
    blocks = b * per_seq + 2
    table = rng.permutation(blocks)[: b * per_seq].reshape(b, per_seq).astype(np.int32)
    latents, _ = bf16(rng, (blocks * block_size, 576))
    cache = torch.zeros((blocks, block_size, 656), dtype=torch.uint8)
    vllm.concat_and_cache_mla(latents[:, :512], latents[:, 512:], cache,
                              torch.arange(blocks * block_size, dtype=torch.int64), "fp8_ds_mla", torch.ones(1))
    logical = np.stack([random_indices(rng, s_q, topk, seq) for _ in range(b)])  # [b, s_q, topk], -1 invalid
    safe = np.clip(logical, 0, None)
    slots = table[np.arange(b)[:, None, None], safe // block_size] * block_size + safe % block_size
    slots = np.where(logical >= 0, slots, -1).astype(np.int32)
    flat = cache.reshape(-1, 656)
    unused = np.setdiff1d(np.arange(blocks * block_size), slots[slots >= 0])
    flat[unused, :512] = 0x7F  # e4m3 NaN
    flat[unused, 528:] = torch.tensor([0xC0, 0x7F], dtype=torch.uint8).repeat(64)  # bf16 NaN
    q, qn = bf16(rng, (b, s_q, h, 576), spread=0.5)
    return dict(cache=cache, slots=slots, q=q, qn=qn, decoded=decode_v32(flat.numpy()))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("s_q", [1, 2, 3, 4])
@pytest.mark.parametrize("features", ["plain", "sink_and_length"])
def test_sparse_decode_fp8_matches_float64(rng, device, s_q, features):
    b, topk, block_size = 3, 72, 61
    c = v32_case(rng, b, s_q, topk, block_size)
    sink = sinks(rng, H_Q) if features != "plain" else None
    length = torch.tensor([topk, 0, 33], dtype=torch.int32) if features != "plain" else None
    meta, none = flash_mla.get_mla_metadata(torch.zeros(b, dtype=torch.int32), s_q * H_Q, 1, H_Q, True, topk)
    assert none is None and isinstance(meta, flash_mla.FlashMLASchedMeta)
    k_cache = c["cache"].view(torch.float8_e4m3fn).unsqueeze(2).to(device)
    idx = torch.from_numpy(c["slots"]).to(device)
    run = [c["q"].to(device), k_cache, None, None, 512, meta, None, 576**-0.5, False, True, idx,
           None if sink is None else sink.to(device)]
    out, lse = flash_mla.flash_mla_with_kvcache(*run, topk_length=None if length is None else length.to(device))
    assert out.shape == (b, s_q, H_Q, 512) and out.dtype == torch.bfloat16
    assert lse.shape == (b, H_Q, s_q) and lse.stride() == (s_q * H_Q, 1, H_Q)  # FlashMLA's transposed buffer
    valid = c["slots"] >= 0
    if length is not None:
        valid &= np.arange(topk)[None, None, :] < length.numpy()[:, None, None]
    gathered = c["decoded"][np.clip(c["slots"], 0, None)]  # [b, s_q, topk, 576]
    ref = ref_attention(c["qn"].reshape(b * s_q, H_Q, 576), gathered.reshape(b * s_q, topk, 576),
                        valid.reshape(b * s_q, topk), 576**-0.5, None if sink is None else sink.double().numpy())
    assert_attention(out.reshape(b * s_q, H_Q, 512), None, lse.transpose(1, 2).reshape(b * s_q, H_Q), ref)
    if s_q > 1:  # row 1 of every sequence has no valid index
        assert torch.all(out[:, 1] == 0) and torch.all(torch.isposinf(lse[:, :, 1]))
    again, _ = flash_mla.flash_mla_with_kvcache(*run, topk_length=None if length is None else length.to(device))
    assert torch.equal(again, out) and meta.have_initialized and meta.config.topk == topk


def test_sparse_decode_h128_and_extra_cache(rng):
    b, s_q, topk, block_size = 2, 2, 64, 64
    c = v32_case(rng, b, s_q, topk, block_size, h=128)
    e = v32_case(rng, b, s_q, 8, 16)
    meta, _ = flash_mla.get_mla_metadata()
    extra_len = torch.tensor([8, 3], dtype=torch.int32)
    out, lse = flash_mla.flash_mla_with_kvcache(
        c["q"], c["cache"].unsqueeze(2), None, None, 512, meta, None, None, False, True, torch.from_numpy(c["slots"]),
        extra_k_cache=e["cache"].unsqueeze(2), extra_indices_in_kvcache=torch.from_numpy(e["slots"]),
        extra_topk_length=extra_len)
    ev = (e["slots"] >= 0) & (np.arange(8)[None, None, :] < extra_len.numpy()[:, None, None])
    kv = np.concatenate([c["decoded"][np.clip(c["slots"], 0, None)], e["decoded"][np.clip(e["slots"], 0, None)]], 2)
    valid = np.concatenate([c["slots"] >= 0, ev], axis=2)
    ref = ref_attention(c["qn"].reshape(b * s_q, 128, 576), kv.reshape(b * s_q, topk + 8, 576),
                        valid.reshape(b * s_q, -1), 576**-0.5, None)
    assert_attention(out.reshape(b * s_q, 128, 512), None, lse.transpose(1, 2).reshape(b * s_q, 128), ref)


# ---- flash_mla_with_kvcache, dense -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s_q,h_k", [(1, 1), (3, 1), (2, 2)])
def test_dense_decode_matches_float64(rng, device, causal, s_q, h_k):
    b, h, block_size, max_blocks = 3, 8, 64, 3
    lens = np.array([150, 0, 2], dtype=np.int32)  # empty; shorter than s_q under causal
    blocks = b * max_blocks + 1
    table = rng.permutation(blocks)[: b * max_blocks].reshape(b, max_blocks).astype(np.int32)
    table[1, :] = 2**31 - 48  # junk past the sequence: never read
    table[2, 1:] = -5
    k_cache, kn = bf16(rng, (blocks, block_size, h_k, 576))
    q, qn = bf16(rng, (b, s_q, h, 576), spread=0.5)
    meta, _ = flash_mla.get_mla_metadata()
    out, lse = flash_mla.flash_mla_with_kvcache(q.to(device), k_cache.to(device), torch.from_numpy(table).to(device),
                                                torch.from_numpy(lens).to(device), 512, meta, causal=causal)
    assert out.shape == (b, s_q, h, 512) and lse.shape == (b, h, s_q) and lse.is_contiguous()
    width = max_blocks * block_size
    pos = np.arange(width)
    for i in range(b):
        keys = kn[np.clip(table[i, pos // block_size], 0, blocks - 1), pos % block_size]  # [W, h_k, 576]
        for kvh in range(h_k):
            heads = slice(kvh * (h // h_k), (kvh + 1) * (h // h_k))
            qi = qn[i, :, heads].transpose(1, 0, 2).reshape(-1, 576)  # rows (head, t)
            valid = np.broadcast_to(pos < lens[i], (s_q, width))
            if causal and s_q > 1:
                valid = valid & (pos[None, :] <= np.arange(s_q)[:, None] + lens[i] - s_q)
            valid = np.tile(valid, (h // h_k, 1))
            ref = ref_attention(qi[:, None, :], np.broadcast_to(keys[:, kvh], (len(qi), width, 576)), valid,
                                576**-0.5, None)
            got_out = out[i, :, heads].transpose(0, 1).reshape(-1, 1, 512)
            assert_attention(got_out, None, lse[i, heads].reshape(-1, 1), ref)
    assert torch.all(out[1] == 0) and torch.all(torch.isposinf(lse[1]))


# ---- scheduler metadata and errors --------------------------------------------------------------------------------
def test_sched_meta_reuse_must_match(rng):
    c = v32_case(rng, 2, 1, 64, 64)
    meta, _ = flash_mla.get_mla_metadata()
    k_cache = c["cache"].unsqueeze(2)
    flash_mla.flash_mla_with_kvcache(c["q"], k_cache, None, None, 512, meta, None, None, False, True,
                                     torch.from_numpy(c["slots"]))
    with pytest.raises(keysel.Error, match="'indices'.*topk"):
        flash_mla.flash_mla_with_kvcache(c["q"], k_cache, None, None, 512, meta, None, None, False, True,
                                         torch.from_numpy(c["slots"][:, :, :32].copy()))
    with pytest.raises(keysel.Error, match="'q'"):
        flash_mla.flash_mla_with_kvcache(c["q"][:1], k_cache, None, None, 512, meta, None, None, False, True,
                                         torch.from_numpy(c["slots"][:1].copy()))


def test_errors_name_the_argument(rng):
    c = v32_case(rng, 2, 1, 64, 64)
    q, cache, slots = c["q"], c["cache"].unsqueeze(2), torch.from_numpy(c["slots"])
    base = dict(q=q, k_cache=cache, block_table=None, cache_seqlens=None, head_dim_v=512,
                tile_scheduler_metadata=None, num_splits=None, softmax_scale=None, causal=False,
                is_fp8_kvcache=True, indices=slots)
    cases = [
        (dict(q=q.float()), "q"), (dict(q=q[..., :512]), "q"), (dict(k_cache=cache[..., :655]), "k_cache"),
        (dict(k_cache=cache.view(torch.uint8).to(torch.int16)), "k_cache"), (dict(indices=slots.long()), "indices"),
        (dict(indices=slots[:1]), "indices"), (dict(is_fp8_kvcache=False), "is_fp8_kvcache"),
        (dict(causal=True), "causal"), (dict(head_dim_v=576), "head_dim_v"), (dict(num_splits=torch.ones(3)),
                                                                               "num_splits"),
        (dict(tile_scheduler_metadata=torch.zeros(4, 8, dtype=torch.int32)), "tile_scheduler_metadata"),
        (dict(attn_sink=torch.zeros(63)), "attn_sink"), (dict(topk_length=torch.zeros(2)), "topk_length"),
        (dict(extra_indices_in_kvcache=slots), "extra_indices_in_kvcache"),
        (dict(softmax_scale="x"), "softmax_scale"),
        (dict(indices=None, block_table=None, cache_seqlens=torch.zeros(2, dtype=torch.int32),
              is_fp8_kvcache=False, k_cache=torch.zeros(3, 64, 1, 576, dtype=torch.bfloat16)), "block_table"),
        (dict(indices=None, is_fp8_kvcache=True), "is_fp8_kvcache"),
    ]
    for change, name in cases:
        args = dict(base, tile_scheduler_metadata=flash_mla.get_mla_metadata()[0])
        args.update(change)
        with pytest.raises(keysel.Error, match=f"'{name}'") as info:
            flash_mla.flash_mla_with_kvcache(**args)
        assert "expected" in str(info.value) and "got" in str(info.value)

    qp, _ = bf16(rng, (3, H_Q, 576))
    kv, _ = bf16(rng, (20, 1, 576))
    idx = torch.zeros((3, 1, 8), dtype=torch.int32)
    base = dict(q=qp, kv=kv, indices=idx, sm_scale=0.1)
    for change, name in ((dict(kv=kv.reshape(20, 576)), "kv"), (dict(kv=kv.float()), "kv"),
                         (dict(indices=idx.reshape(3, 8)), "indices"), (dict(sm_scale=None), "sm_scale"),
                         (dict(d_v=256), "d_v"), (dict(attn_sink=torch.zeros(H_Q, dtype=torch.float64)), "attn_sink"),
                         (dict(topk_length=torch.zeros(4, dtype=torch.int32)), "topk_length"),
                         (dict(q=qp[..., :500]), "q")):
        with pytest.raises(keysel.Error, match=f"'{name}'"):
            flash_mla.flash_mla_sparse_fwd(**dict(base, **change))

    cache8 = torch.full((2, 4, 656), 3, dtype=torch.uint8)
    kv_c, k_pe, slot = torch.zeros(2, 512, dtype=torch.bfloat16), torch.zeros(2, 64, dtype=torch.bfloat16), \
        torch.zeros(2, dtype=torch.int64)
    for change, name in ((dict(kv_c=kv_c[:, :256]), "kv_c"), (dict(k_pe=k_pe.half()), "k_pe"),
                         (dict(kv_cache=cache8[..., :600]), "kv_cache"), (dict(kv_cache_dtype="fp8"),
                                                                          "kv_cache_dtype"),
                         (dict(slot_mapping=torch.zeros(3, dtype=torch.int64)), "kv_c")):
        args = dict(kv_c=kv_c, k_pe=k_pe, kv_cache=cache8, slot_mapping=slot, kv_cache_dtype="fp8_ds_mla",
                    scale=torch.ones(1))
        args.update(change)
        with pytest.raises(keysel.Error, match=f"'{name}'"):
            vllm.concat_and_cache_mla(**args)
        assert torch.all(cache8 == 3)


# ---- CUDA graphs -----------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (torch.cuda) for graph capture")
def test_cuda_graph_capture_and_replay(rng):
    device = "cuda"
    c = v32_case(rng, 2, 2, 64, 64)
    q, cache, slots = c["q"].to(device), c["cache"].unsqueeze(2).to(device), torch.from_numpy(c["slots"]).to(device)
    sink = sinks(rng, H_Q).to(device)
    pq, _ = bf16(rng, (5, H_Q, 576))
    pkv, _ = bf16(rng, (90, 1, 576))
    pq, pkv = pq.to(device), pkv.to(device)
    pidx = torch.from_numpy(random_indices(rng, 5, 64, 90)).reshape(5, 1, 64).to(device)
    lat, _ = bf16(rng, (4, 576))
    lat = lat.to(device)
    wcache = torch.zeros((2, 4, 656), dtype=torch.uint8, device=device)
    wslots = torch.tensor([3, -1, 6, 0], dtype=torch.int64, device=device)
    meta, _ = flash_mla.get_mla_metadata()

    def work():
        vllm.concat_and_cache_mla(lat[:, :512], lat[:, 512:], wcache, wslots, "fp8_ds_mla", None)
        d = flash_mla.flash_mla_with_kvcache(q, cache, None, None, 512, meta, None, None, False, True, slots, sink)
        p = flash_mla.flash_mla_sparse_fwd(pq, pkv, pidx, 0.05, attn_sink=sink)
        return d, p

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        work()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = work()
    for _ in range(2):
        q.copy_(bf16(rng, tuple(q.shape), 0.5)[0].to(device))
        pq.copy_(bf16(rng, tuple(pq.shape))[0].to(device))
        lat.copy_(bf16(rng, tuple(lat.shape))[0].to(device))
        graph.replay()
        torch.cuda.synchronize()
        written = wcache.clone()
        wcache.zero_()
        eager = work()
        torch.testing.assert_close(wcache, written, rtol=0, atol=0)
        for got, want in zip(captured[0] + captured[1], eager[0] + eager[1]):
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)

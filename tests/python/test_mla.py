"""keysel.sparse_mla and keysel.mla_v32_quantize (SPEC §8) against float64 NumPy references: the CPU fp32 path,
and on a GPU keysel's CUDA kernel (bf16 tensor cores) against the CPU path, inside a CUDA graph with a workspace,
and behind keysel.compat.flash_mla against the torch body it replaces."""

import numpy as np
import pytest

import keysel

torch = pytest.importorskip("torch")
CUDA = torch.cuda.is_available() and keysel.built_with_cuda()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and a CUDA build of keysel")
HAS_FP8 = hasattr(torch, "float8_e4m3fn")
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="torch < 2.1 has no float8 dtypes (decoding the V3.2 cache)")
INF = float("inf")


@pytest.fixture
def rng():
    return np.random.default_rng(20261205)


def bf16(rng, shape, spread=1.0):
    x = torch.from_numpy((rng.standard_normal(shape) * spread).astype(np.float32)).to(torch.bfloat16)
    return x, x.double().numpy()


def reference(q, rows, indices, scale, sink=None, length=None):
    """float64 (out, lse, max_logits): q [T, H, 576], rows [N, 576] (decoded latents), indices int [T, k]."""
    t_count, h = q.shape[:2]
    out = np.zeros((t_count, h, 512))
    lse = np.full((t_count, h), -np.inf)
    top = np.full((t_count, h), -np.inf)
    for t in range(t_count):
        count = indices.shape[1] if length is None else int(np.clip(length[t], 0, indices.shape[1]))
        slots = [s for s in indices[t, :count] if 0 <= s < rows.shape[0]]
        if not slots:
            continue
        kv = rows[slots]
        s = scale * q[t] @ kv.T  # [H, k]
        m = s.max(axis=1)
        p = np.exp(s - m[:, None])
        total = p.sum(axis=1)
        denominator = total if sink is None else total + np.exp(sink - m)
        out[t] = (p @ kv[:, :512]) / denominator[:, None]
        lse[t] = m + np.log(total)
        top[t] = m
    return out, lse, top


def decode_v32(cache):
    """uint8 [P, page, 656] -> float64 [P * page, 576], exactly (fp8 e4m3 x its group's scale; bf16 RoPE)."""
    flat = torch.from_numpy(np.ascontiguousarray(cache.reshape(-1, 656)))
    nope = flat[:, :512].view(torch.float8_e4m3fn).double()
    scales = flat[:, 512:528].contiguous().view(torch.float32).double()
    rope = flat[:, 528:].contiguous().view(torch.bfloat16).double()
    nope = (nope.reshape(-1, 4, 128) * scales[:, :, None]).reshape(-1, 512)
    return torch.cat([nope, rope], dim=1).numpy()


def distinct_indices(rng, t_count, k, n):
    idx = np.stack([rng.permutation(n)[:k] if k <= n else np.concatenate([rng.permutation(n), -np.ones(k - n, int)])
                    for _ in range(t_count)])
    idx[rng.random(idx.shape) < 0.2] = -1
    idx[0] = -1  # a row with no valid slot
    return idx.astype(np.int32)


def check(got, want, out_tol):
    out, lse, top = (x.detach().cpu().double().numpy() for x in got)
    r_out, r_lse, r_top = want
    assert np.all(np.isfinite(out))
    error = np.linalg.norm(out - r_out, axis=-1)
    assert np.all(error <= out_tol * np.linalg.norm(r_out, axis=-1) + 1e-6), error.max()
    for g, w in ((lse, r_lse), (top, r_top)):
        np.testing.assert_array_equal(np.isneginf(g), np.isneginf(w))
        finite = np.isfinite(w)
        np.testing.assert_allclose(g[finite], w[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("cache", ["bf16", "fp32", pytest.param("v32", marks=needs_fp8)])
@pytest.mark.parametrize("features", ["plain", "sink_and_length"])
def test_cpu_matches_float64(rng, cache, features):
    t_count, h, n, k = 7, 20, 150, 45
    q, qn = bf16(rng, (t_count, h, 576))
    latents, ln = bf16(rng, (n, 576))
    if cache == "v32":
        kv = torch.zeros((3, 64, 656), dtype=torch.uint8)
        keysel.mla_v32_quantize(latents, kv, torch.arange(n, dtype=torch.int32))
        rows = decode_v32(kv.numpy())
    elif cache == "fp32":
        kv, rows = latents.float(), ln
    else:
        kv, rows = latents, ln
    idx = distinct_indices(rng, t_count, k, n)
    sink = length = None
    if features != "plain":
        sink = rng.standard_normal(h).astype(np.float32)
        sink[:2] = [INF, -INF]
        length = np.array([k, 3, 0, k + 9, 20, 44, 1], dtype=np.int32)
    got = keysel.sparse_mla(q, kv, torch.from_numpy(idx), scale=0.05,
                            attn_sink=None if sink is None else torch.from_numpy(sink),
                            topk_length=None if length is None else torch.from_numpy(length))
    assert got[0].dtype == torch.float32 and got[0].shape == (t_count, h, 512)
    check(got, reference(qn, rows, idx, 0.05, None if sink is None else sink.astype(np.float64), length), 1e-5)


@needs_fp8
def test_quantize_matches_the_compat_writer_and_skips_negative_slots(rng):
    from keysel.compat import _mla

    latents, _ = bf16(rng, (10, 576), spread=3.0)
    cache = torch.full((2, 8, 656), 0xEE, dtype=torch.uint8)
    slots = torch.tensor([0, 3, -1, 15, 4, 5, 6, 7, 8, 9], dtype=torch.int32)
    keysel.mla_v32_quantize(latents, cache, slots)
    want = _mla.quant_v32(latents, "ue8m0")
    flat = cache.reshape(-1, 656)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s], want[t]), t
    assert torch.all(flat[1] == 0xEE) and torch.all(flat[2] == 0xEE)  # untouched


def test_errors_name_the_argument_and_write_nothing(rng):
    q, _ = bf16(rng, (2, 4, 576))
    kv, _ = bf16(rng, (30, 576))
    out = torch.full((2, 4, 512), 5.0)
    bad = torch.tensor([[1, 2, 30], [0, 1, 2]], dtype=torch.int32)  # 30 is past the cache
    with pytest.raises(keysel.Error, match="indices"):
        keysel.sparse_mla(q, kv, bad, out=out)
    with pytest.raises(keysel.Error, match="indices"):
        keysel.sparse_mla(q, kv, torch.tensor([[1, 1, 2], [0, 1, 2]], dtype=torch.int32), out=out)
    with pytest.raises(keysel.Error, match="attn_sink"):
        keysel.sparse_mla(q, kv, bad.clamp(max=3), out=out, attn_sink=torch.zeros(3))
    with pytest.raises(keysel.Error, match="q"):
        keysel.sparse_mla(q[..., :288], kv, bad.clamp(max=3), out=out)
    assert torch.all(out == 5.0)
    with pytest.raises(keysel.Error, match="workspace"):
        keysel.sparse_mla(q, kv, bad.clamp(max=3), workspace=torch.empty(64, dtype=torch.uint8))


def gpu_case(rng, t_count, h, n, k, v32):
    q, qn = bf16(rng, (t_count, h, 576))
    latents, ln = bf16(rng, (n, 576))
    if v32:
        pages = -(-n // 64)
        kv = torch.zeros((pages, 64, 656), dtype=torch.uint8)
        keysel.mla_v32_quantize(latents, kv, torch.arange(n, dtype=torch.int32))
        rows = decode_v32(kv.numpy())
    else:
        kv, rows = latents, ln
    idx = distinct_indices(rng, t_count, k, n)
    return q, qn, kv, rows, idx


@needs_gpu
@pytest.mark.parametrize("v32", [True, False])
@pytest.mark.parametrize("t_count,h,n,k", [(3, 128, 4000, 2048), (40, 64, 900, 256), (5, 24, 300, 100)])
def test_cuda_matches_float64(rng, v32, t_count, h, n, k):
    q, qn, kv, rows, idx = gpu_case(rng, t_count, h, n, k, v32)
    sink = rng.standard_normal(h).astype(np.float32)
    length = rng.integers(0, k + 3, size=t_count).astype(np.int32)
    cuda_idx = torch.from_numpy(idx).cuda()
    cuda_idx[1::2, 5] = rows.shape[0] + 7  # out of the cache: invalid on the GPU
    idx_ref = idx.copy()
    idx_ref[1::2, 5] = -1
    want = reference(qn, rows, idx_ref, 576**-0.5, sink.astype(np.float64), length)
    for out_dtype in (torch.bfloat16, torch.float32):
        out = torch.empty((t_count, h, 512), dtype=out_dtype, device="cuda")
        got = keysel.sparse_mla(q.cuda(), kv.cuda(), cuda_idx, attn_sink=torch.from_numpy(sink).cuda(),
                                topk_length=torch.from_numpy(length).cuda(), out=out)
        assert got[0] is out
        check(got, want, 8e-3)


@needs_gpu
def test_cuda_graph_capture_with_workspace(rng):
    t_count, h, n, k = 2, 128, 3000, 2048  # few rows: split across thread blocks, so it needs the workspace
    q, _, kv, _, idx = gpu_case(rng, t_count, h, n, k, True)
    q, kv, idx = q.cuda(), kv.cuda(), torch.from_numpy(idx).cuda()
    nbytes = keysel.sparse_mla_workspace_bytes(t_count, h, k)
    assert nbytes > 0
    workspace = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    out = torch.empty((t_count, h, 512), dtype=torch.bfloat16, device="cuda")
    lse = torch.empty((t_count, h), device="cuda")
    top = torch.empty((t_count, h), device="cuda")  # under capture every output is the caller's
    eager = keysel.sparse_mla(q, kv, idx)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        keysel.sparse_mla(q, kv, idx, out=out, lse=lse, max_logits=top, workspace=workspace)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keysel.sparse_mla(q, kv, idx, out=out, lse=lse, max_logits=top, workspace=workspace)
    out.zero_()
    lse.zero_()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out.float(), eager[0], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(lse, eager[1], rtol=1e-6, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("kind", ["prefill_bf16", "decode_v32"])
def test_compat_kernel_path_matches_the_torch_body(rng, kind):
    from keysel.compat import _mla, flash_mla

    h, n, k = 64, 700, 128
    q, _, kv, _, idx = gpu_case(rng, 6, h, n, k, kind == "decode_v32")
    sink = torch.from_numpy(rng.standard_normal(h).astype(np.float32)).cuda()
    q, idx = q.cuda(), torch.from_numpy(idx).cuda()
    if kind == "prefill_bf16":
        kv3 = kv.cuda().unsqueeze(1)
        assert _mla.kernel_takes(q, kv3[:, 0, :], idx)
        out, max_logits, lse = flash_mla.flash_mla_sparse_fwd(q, kv3, idx.unsqueeze(1), 0.04, attn_sink=sink)
        slots, gather = _mla.gather_bf16(kv3[:, 0, :])
        want = _mla.sparse_mla(q, [(gather, slots, idx, None)], 0.04, 512, sink)
        torch.testing.assert_close(max_logits, want[1], rtol=1e-5, atol=1e-4)
    else:
        cache = kv.cuda().view(torch.float8_e4m3fn).unsqueeze(2)  # [P, 64, 1, 656]
        meta, _ = flash_mla.get_mla_metadata(torch.zeros(2, dtype=torch.int32), 3 * h, 1, h, True, k)
        out, lse = flash_mla.flash_mla_with_kvcache(q.reshape(2, 3, h, 576), cache, None, None, 512, meta,
                                                    is_fp8_kvcache=True, indices=idx.reshape(2, 3, k),
                                                    attn_sink=sink)
        out, lse = out.reshape(6, h, 512), lse.transpose(1, 2).reshape(6, h)
        slots, gather = _mla.gather_v32(cache.view(torch.uint8)[:, :, 0, :])
        want = _mla.sparse_mla(q, [(gather, slots, idx, None)], 576**-0.5, 512, sink)
    assert torch.all(torch.isposinf(lse[0])) and torch.all(out[0] == 0)  # row 0: nothing valid, FlashMLA's +inf
    torch.testing.assert_close(lse, want[2], rtol=1e-5, atol=1e-4)
    error = (out.float() - want[0].float()).norm(dim=-1)
    assert torch.all(error <= 8e-3 * want[0].float().norm(dim=-1) + 1e-6)

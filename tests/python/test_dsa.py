"""keysel's own DSA entry points (SPEC §7): topk_rows, paged_mqa_logits, ragged_mqa_logits, select_topk_paged,
indexer_k_quant_and_cache,
against the torch references of keysel.compat._ops and the float64 references of test_compat.

The C++ CPU paths are keysel's references (double-precision logits, keysel's exact top-k); on a GPU the same calls
run keysel's CUDA kernels and must agree: logits within the float32 bound of test_compat, selections exactly (the
selection of the GPU's own logits), cache bytes exactly. GPU tests skip where torch sees no CUDA GPU.
"""

import numpy as np
import pytest

import keysel

torch = pytest.importorskip("torch")
if not hasattr(torch, "float8_e4m3fn"):
    pytest.skip(f"keysel.compat needs torch.float8_e4m3fn (torch >= 2.1); this is torch {torch.__version__}",
                allow_module_level=True)

from keysel.compat import _ops, vllm  # noqa: E402
from test_compat import assert_logits, i32, paged_case, ragged_case, ref_topk, scores_of, to  # noqa: E402

CUDA = torch.cuda.is_available() and keysel.built_with_cuda()
FP8_CUDA = CUDA and torch.cuda.get_device_capability() >= (8, 9)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU and keysel "
                                                                                "built with CUDA"))]
FP8_DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not FP8_CUDA, reason="needs a CUDA GPU of compute capability 8.9+ (fp8 MMA) and keysel built with CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["uniform", "normal", "tied", "equal"])
@pytest.mark.parametrize("k", [1, 7, 2048])
def test_topk_rows_ends_and_lengths(rng, device, kind, k):
    r, width = 6, 3001
    x = scores_of(rng, kind, (r, width))
    logits = torch.from_numpy(x).to(device)
    starts = rng.integers(0, 300, r)
    ends = np.minimum(width + 40, starts + rng.integers(0, width, r))  # some past L: clamped
    got = keysel.topk_rows(logits, k, starts=i32(starts, device), ends=i32(ends, device))
    assert got.device.type == device and got.dtype == torch.int32 and tuple(got.shape) == (r, k)
    np.testing.assert_array_equal(got.cpu().numpy(), ref_topk(x, starts, np.minimum(ends, width), k))
    # lengths with next_n = 2: row r reads lengths[r // 2] - 2 + r % 2 + 1 keys from 0
    lengths = rng.integers(2, width, r // 2)
    got = keysel.topk_rows(logits, k, lengths=i32(lengths, device), next_n=2)
    row_ends = [lengths[i // 2] - 2 + i % 2 + 1 for i in range(r)]
    np.testing.assert_array_equal(got.cpu().numpy(), ref_topk(x, [0] * r, row_ends, k))


@pytest.mark.parametrize("device", DEVICES)
def test_topk_rows_row_stride_and_out(rng, device):
    x = scores_of(rng, "normal", (4, 1000))
    wide = torch.zeros((4, 1037), device=device)
    wide[:, :1000] = torch.from_numpy(x).to(device)
    logits = wide[:, :1000]                                       # row stride 1037: rows not 16-byte aligned
    out = torch.full((4, 50), -7, dtype=torch.int32, device=device)
    pointer = out.data_ptr()
    assert keysel.topk_rows(logits, 50, ends=i32([1000, 999, 10, 0], device), out=out) is out
    assert out.data_ptr() == pointer
    np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(x, [0] * 4, [1000, 999, 10, 0], 50))


def test_topk_rows_errors_name_the_argument():
    logits = torch.zeros((3, 10))
    out = torch.full((3, 4), -7, dtype=torch.int32)
    with pytest.raises(keysel.Error, match="argument 'bounds'.*exactly one of ends and lengths"):
        keysel.topk_rows(logits, 4, out=out)
    with pytest.raises(keysel.Error, match="argument 'bounds'"):
        keysel.topk_rows(logits, 4, ends=i32([1, 2, 3]), lengths=i32([1, 2, 3]), out=out)
    with pytest.raises(keysel.Error, match="argument 'next_n'"):
        keysel.topk_rows(logits, 4, lengths=i32([5]), next_n=2, out=out)     # 3 rows: next_n must divide
    with pytest.raises(keysel.Error, match="argument 'ends'"):
        keysel.topk_rows(logits, 4, ends=i32([1, 2]), out=out)
    with pytest.raises(keysel.Error, match="argument 'logits'"):
        keysel.topk_rows(logits[:, ::2], 4, ends=i32([1, 2, 3]), out=out)    # stride 2 along the keys
    assert bool((out == -7).all())


@pytest.mark.parametrize("device", FP8_DEVICES)
@pytest.mark.parametrize("b, next_n, h, d, two_d", [
    (3, 1, 64, 128, False), (2, 2, 32, 64, False), (2, 3, 16, 128, False), (2, 4, 128, 64, True),
    (4, 1, 16, 64, True)])
def test_paged_mqa_logits_matches_float64(rng, device, b, next_n, h, d, two_d):
    c = paged_case(rng, b, next_n, h, d, two_d=two_d)  # junk in table entries no row reads
    q, cache, w, ctx, table = to(device, c["q"], c["cache"], c["weights"], c["ctx"], c["table"])
    logits = keysel.paged_mqa_logits(q, w, cache, table, ctx, c["width"])
    assert logits.device.type == device and tuple(logits.shape) == (b * next_n, c["width"])
    assert_logits(logits, c["expected"], c["magnitude"], terms=d + h)


@pytest.mark.parametrize("device", FP8_DEVICES)
@pytest.mark.parametrize("m, n, h, d, kind", [
    (130, 400, 64, 128, "causal"), (70, 333, 16, 64, "random"), (33, 200, 128, 64, "causal"),
    (64, 129, 32, 128, "random")])
def test_ragged_mqa_logits_matches_float64(rng, device, m, n, h, d, kind):
    q, k, scale, w, ks, ke, expected, magnitude = ragged_case(rng, m, n, h, d, kind)
    q, k, scale, w = to(device, q, k, scale, w)
    out = torch.full((m, n), 7.0, device=device)  # every entry must be written
    got = keysel.ragged_mqa_logits(q, w, k, scale, i32(ks, device), i32(ke, device), out=out)
    assert got is out
    assert_logits(out, expected, magnitude, terms=d + h)


@pytest.mark.parametrize("device", FP8_DEVICES)
@pytest.mark.parametrize("next_n", [1, 2])
def test_select_topk_paged_is_topk_rows_of_the_logits(rng, device, next_n):
    c = paged_case(rng, 3, next_n, 64, 128)
    q, cache, w, ctx, table = to(device, c["q"], c["cache"], c["weights"], c["ctx"], c["table"])
    k = 37
    logits = keysel.paged_mqa_logits(q, w, cache, table, ctx, c["width"])
    slots = torch.full((3 * next_n, k), -9, dtype=torch.int32, device=device)
    got = keysel.select_topk_paged(q, cache, w, ctx, table, k, n_keys=c["width"], out_slots=slots)
    limits = [int(c["lens"][r // next_n]) - next_n + r % next_n + 1 for r in range(3 * next_n)]
    expected = ref_topk(logits.cpu().numpy(), [0] * (3 * next_n), limits, k)
    np.testing.assert_array_equal(got.cpu().numpy(), expected)
    table_np = c["table"].numpy()
    want_slots = np.where(expected < 0, -1,
                          table_np[np.arange(3 * next_n)[:, None] // next_n, np.maximum(expected, 0) // 64] * 64
                          + np.maximum(expected, 0) % 64)
    np.testing.assert_array_equal(slots.cpu().numpy(), want_slots)


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale_fmt", ["ue8m0", None])
def test_cache_writer_matches_the_compat_writer_byte_for_byte(rng, d, dtype, scale_fmt):
    t, pages = 150, 4
    k = torch.from_numpy((rng.standard_normal((t, d)) * rng.uniform(0.01, 30, (t, 1))).astype(np.float32)).to(dtype)
    k[3] = 0                                                   # amax 0: the 1e-4 floor
    slots = rng.permutation(pages * 64)[:t].astype(np.int32)
    slots[::9] = -1                                            # skipped
    ours = torch.full((pages, 64 * (d + 4)), 0x5A, dtype=torch.uint8)
    theirs = ours.clone()
    assert keysel.indexer_k_quant_and_cache(k, ours, i32(slots), scale_fmt=scale_fmt) is ours
    vllm.indexer_k_quant_and_cache(k, theirs.view(pages, 64, d + 4), torch.from_numpy(slots.astype(np.int64)), d,
                                   scale_fmt)
    assert torch.equal(ours, theirs)
    bad = slots.copy()
    bad[5] = pages * 64
    before = ours.clone()
    with pytest.raises(keysel.Error, match="argument 'slot_mapping'"):
        keysel.indexer_k_quant_and_cache(k, ours, i32(bad))
    assert torch.equal(ours, before)


@pytest.mark.skipif(not FP8_CUDA, reason="needs a CUDA GPU of compute capability 8.9+ and keysel built with CUDA")
def test_select_topk_paged_with_workspace_is_captured(rng):
    c = paged_case(rng, 4, 1, 64, 128)
    q, cache, w, ctx, table = to("cuda", c["q"], c["cache"], c["weights"], c["ctx"], c["table"])
    k = 64
    rows, n = 4, c["width"]
    workspace = torch.empty(keysel.paged_topk_workspace_bytes(rows, n), dtype=torch.uint8, device="cuda")
    out = torch.empty((rows, k), dtype=torch.int32, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        keysel.select_topk_paged(q, cache, w, ctx, table, k, n_keys=n, out=out, workspace=workspace)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keysel.select_topk_paged(q, cache, w, ctx, table, k, n_keys=n, out=out, workspace=workspace)
    for _ in range(2):
        q.copy_(torch.from_numpy((rng.standard_normal(tuple(q.shape)) * 4).astype(np.float32)).clamp(-448, 448)
                .to(torch.float8_e4m3fn).to("cuda"))
        graph.replay()
        torch.cuda.synchronize()
        logits = keysel.paged_mqa_logits(q, w, cache, table, ctx, n)
        torch.cuda.synchronize()
        np.testing.assert_array_equal(out.cpu().numpy(), ref_topk(logits.cpu().numpy(), [0] * rows,
                                                                   [int(x) for x in c["lens"]], k))

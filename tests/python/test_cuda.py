"""keysel's CUDA paths through the Python API, against the CPU paths and the NumPy references.

Every test here needs a CUDA GPU and a keysel built with CUDA; without them each is skipped and says why."""

import numpy as np
import pytest

import keysel
import reference

torch = pytest.importorskip("torch", reason="the CUDA tests drive keysel with torch CUDA tensors")

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: torch.cuda.is_available() is false", allow_module_level=True)
if not keysel.built_with_cuda():
    pytest.skip("keysel was built without CUDA (no nvcc found at configure time)", allow_module_level=True)

DEVICE = torch.device("cuda")


@pytest.fixture
def generator():
    seed = int(np.random.SeedSequence().entropy % (2**31))
    print(f"seed {seed}")
    return torch.Generator(device="cpu").manual_seed(seed)


@pytest.mark.parametrize("t, g, n, k", [(9, 3, 1000, 37), (2, 1, 40000, 2048), (5, 2, 77, 100)])
def test_select_topk_cuda_equals_cpu(generator, t, g, n, k):
    scores = torch.randn(t, g, n, generator=generator)
    scores[0, 0, 10:20] = 0.5                                # ties
    positions = torch.randint(0, n + 3, (t,), generator=generator, dtype=torch.int32)
    expected = keysel.select_topk(scores, positions, k, n_sink=2, n_local=3)
    got = keysel.select_topk(scores.to(DEVICE), positions.to(DEVICE), k, n_sink=2, n_local=3)
    assert got.device.type == "cuda" and got.dtype == torch.int32
    assert torch.equal(got.cpu(), expected)


def test_select_topk_cuda_runs_on_the_current_stream_into_out(generator):
    scores = torch.randn(4, 2, 3000, generator=generator)
    positions = torch.full((4,), 2999, dtype=torch.int32)
    expected = keysel.select_topk(scores, positions, 64)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        scores_gpu, positions_gpu = scores.to(DEVICE, non_blocking=True), positions.to(DEVICE, non_blocking=True)
        out = torch.full((4, 2, 64), -7, dtype=torch.int32, device=DEVICE)
        pointer = out.data_ptr()
        returned = keysel.select_topk(scores_gpu, positions_gpu, 64, out=out)       # stream = side
    side.synchronize()
    assert returned is out and out.data_ptr() == pointer
    assert torch.equal(out.cpu(), expected)
    again = torch.empty_like(out)
    keysel.select_topk(scores_gpu, positions_gpu, 64, out=again, stream=side.cuda_stream)
    side.synchronize()
    assert torch.equal(again.cpu(), expected)


def test_select_topk_cuda_is_captured_by_a_cuda_graph(generator):
    scores = torch.randn(3, 1, 5000, generator=generator).to(DEVICE)
    positions = torch.tensor([100, 2500, 4999], dtype=torch.int32, device=DEVICE)
    out = torch.empty(3, 1, 50, dtype=torch.int32, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        keysel.select_topk(scores, positions, 50, out=out)                            # warm-up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keysel.select_topk(scores, positions, 50, out=out)
    fresh = torch.randn(3, 1, 5000, generator=generator)
    scores.copy_(fresh.to(DEVICE))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), keysel.select_topk(fresh, positions.cpu(), 50))


@pytest.mark.parametrize("granularity", ["per_kv_head", "per_token", "per_head"])
def test_sparse_attention_cuda_decode_matches_reference(generator, granularity):
    t, hq, hkv, n, d = 3, 8, 2, 300, 128
    q = torch.randn(t, hq, d, generator=generator).to(torch.bfloat16)
    k = torch.randn(t, n, hkv, d, generator=generator).to(torch.bfloat16)     # one sequence per query row
    v = torch.randn(t, n, hkv, d, generator=generator).to(torch.bfloat16)
    groups = {"per_kv_head": hkv, "per_token": 1, "per_head": hq}[granularity]
    selection = torch.full((t, groups, 40), -1, dtype=torch.int32)
    for r in range(t):
        for g in range(groups):
            count = 40 - 7 * r
            selection[r, g, :count] = torch.randperm(n, generator=generator)[:count].to(torch.int32)
    out, lse = keysel.sparse_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), selection.to(DEVICE),
                                       granularity=granularity)
    assert out.device.type == "cuda" and out.dtype == torch.float32
    torch.cuda.synchronize()
    for r in range(t):
        expected_out, expected_lse = reference.sparse_attention(q[r:r + 1].float().numpy(), k[r].float().numpy(),
                                                                v[r].float().numpy(), selection[r:r + 1].numpy(),
                                                                granularity)
        np.testing.assert_allclose(out[r:r + 1].cpu().numpy(), expected_out, rtol=2e-2, atol=2e-3)
        np.testing.assert_allclose(lse[r:r + 1].cpu().numpy(), expected_lse, rtol=1e-3, atol=1e-3)


def test_sparse_attention_cuda_paged_cache(generator):
    t, hq, hkv, n, d, block = 2, 4, 1, 100, 64, 16
    q = torch.randn(t, hq, d, generator=generator).to(torch.bfloat16)
    keys = torch.randn(n, hkv, d, generator=generator).to(torch.bfloat16)
    values = torch.randn(n, hkv, d, generator=generator).to(torch.bfloat16)
    blocks_needed = (n + block - 1) // block
    order = torch.randperm(blocks_needed + 3, generator=generator)[:blocks_needed]   # scattered blocks
    k_blocks = torch.zeros(blocks_needed + 3, block, hkv, d, dtype=torch.bfloat16)
    v_blocks = torch.zeros_like(k_blocks)
    for b in range(blocks_needed):
        rows = slice(b * block, min((b + 1) * block, n))
        k_blocks[order[b], : rows.stop - rows.start] = keys[rows]
        v_blocks[order[b], : rows.stop - rows.start] = values[rows]
    table = order.to(torch.int32).repeat(t, 1)
    selection = keysel.exact_topk(q.float(), keys.float(), torch.tensor([n - 1, 50], dtype=torch.int32), 12)
    out, lse = keysel.sparse_attention(q.to(DEVICE), k_blocks.to(DEVICE), v_blocks.to(DEVICE), selection.to(DEVICE),
                                       block_table=table.to(DEVICE))
    expected_out, expected_lse = reference.sparse_attention(q.float().numpy(), keys.float().numpy(),
                                                            values.float().numpy(), selection.numpy())
    np.testing.assert_allclose(out.cpu().numpy(), expected_out, rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(lse.cpu().numpy(), expected_lse, rtol=1e-3, atol=1e-3)


def test_indexer_cuda_logits_and_topk_match_reference(generator):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the fp8 indexer kernel needs compute capability 8.9 or newer")
    r, hi, di, n = 3, 64, 128, 500
    q = torch.randn(r, hi, di, generator=generator).to(torch.float8_e4m3fn)
    weights = torch.randn(r, hi, generator=generator)
    keys = torch.randn(n, di, generator=generator).to(torch.float8_e4m3fn)
    scales = torch.rand(n, generator=generator) + 0.5
    blocks_per_sequence = (n + 63) // 64
    blocks = torch.zeros(r * blocks_per_sequence, 64 * (di + 4), dtype=torch.uint8)  # the engines' pages
    for seq in range(r):                                      # each row reads its own copy of the cache
        for s in range(n):
            b, row = seq * blocks_per_sequence + s // 64, s % 64
            blocks[b, row * di:(row + 1) * di] = keys[s].view(torch.uint8)
            blocks[b, 64 * di + 4 * row:64 * di + 4 * row + 4] = scales[s : s + 1].view(torch.uint8)
    positions = torch.tensor([n - 1, 200, 63], dtype=torch.int32)
    logits = keysel.indexer_logits_cuda(q.to(DEVICE), weights.to(DEVICE), blocks.to(DEVICE), positions.to(DEVICE), n)
    torch.cuda.synchronize()
    expected = reference.indexer_scores(q.float().numpy(), weights.numpy(),
                                        keys.float().numpy() * scales.numpy()[:, None], positions.numpy())
    got = logits.cpu().numpy().astype(np.float64)
    assert np.array_equal(np.isfinite(got), np.isfinite(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-3, atol=1e-3 * np.abs(expected[finite]).max())
    selection = keysel.indexer_topk_cuda(q.to(DEVICE), weights.to(DEVICE), blocks.to(DEVICE), positions.to(DEVICE), n,
                                         32, n_sink=1)
    assert torch.equal(selection.cpu(), keysel.select_topk(logits.cpu()[:, None, :], positions, 32, n_sink=1))


def test_capture_without_out_is_refused(generator):
    scores = torch.randn(2, 1, 100, generator=generator).to(DEVICE)
    positions = torch.tensor([99, 99], dtype=torch.int32, device=DEVICE)
    keysel.select_topk(scores, positions, 4)                                          # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(keysel.Error, match="argument 'out'"):
        with torch.cuda.graph(graph):
            keysel.select_topk(scores, positions, 4)


def test_select_topk_cuda_uses_the_callers_workspace_under_capture(generator):
    t, g, n, k = 2, 1, 40000, 2048                     # few long rows: the several-blocks-per-row path needs scratch
    scores = torch.randn(t, g, n, generator=generator).to(DEVICE)
    positions = torch.tensor([n - 1, 30000], dtype=torch.int32, device=DEVICE)
    out = torch.empty(t, g, k, dtype=torch.int32, device=DEVICE)
    workspace = torch.full((keysel.select_topk_workspace_bytes(t, g, n),), 0xAB, dtype=torch.uint8, device=DEVICE)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        keysel.select_topk(scores, positions, k, out=out, workspace=workspace)      # warm-up
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    assert not bool((workspace == 0xAB).all()), "the call did not use the caller's workspace"
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        keysel.select_topk(scores, positions, k, out=out, workspace=workspace)
    for _ in range(2):
        fresh = torch.randn(t, g, n, generator=generator)
        fresh[1, 0, 100:5000] = 1.25                                                   # heavy ties
        scores.copy_(fresh.to(DEVICE))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), keysel.select_topk(fresh, positions.cpu(), k))


def test_workspace_too_small_or_elsewhere_is_refused(generator):
    scores = torch.randn(2, 1, 40000, generator=generator).to(DEVICE)
    positions = torch.tensor([39999, 39999], dtype=torch.int32, device=DEVICE)
    out = torch.full((2, 1, 16), -7, dtype=torch.int32, device=DEVICE)
    small = torch.empty(keysel.select_topk_workspace_bytes(2, 1, 40000) - 16, dtype=torch.uint8, device=DEVICE)
    with pytest.raises(keysel.Error, match="argument 'workspace'.*at least"):
        keysel.select_topk(scores, positions, 16, out=out, workspace=small)
    host = torch.empty(keysel.select_topk_workspace_bytes(2, 1, 40000), dtype=torch.uint8)
    with pytest.raises(keysel.Error, match="argument 'workspace'"):
        keysel.select_topk(scores, positions, 16, out=out, workspace=host)
    torch.cuda.synchronize()
    assert bool((out == -7).all())


def test_indexer_topk_cuda_with_workspace_equals_without(generator):
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("the fp8 indexer kernel needs compute capability 8.9 or newer")
    r, hi, di, n = 2, 32, 64, 20000
    q = torch.randn(r, hi, di, generator=generator).to(torch.float8_e4m3fn).to(DEVICE)
    weights = torch.randn(r, hi, generator=generator).to(DEVICE)
    blocks_per_sequence = (n + 63) // 64
    blocks = torch.randint(0, 120, (r * blocks_per_sequence, 64 * (di + 4)), generator=generator, dtype=torch.uint8)
    blocks[:, 64 * di:] = torch.full((r * blocks_per_sequence, 64), 0.75).view(torch.uint8)  # the pages' scales
    blocks = blocks.to(DEVICE)
    positions = torch.tensor([n - 1, 12345], dtype=torch.int32, device=DEVICE)
    expected = keysel.indexer_topk_cuda(q, weights, blocks, positions, n, 300)
    workspace = torch.empty(keysel.indexer_topk_workspace_bytes(r, n), dtype=torch.uint8, device=DEVICE)
    got = keysel.indexer_topk_cuda(q, weights, blocks, positions, n, 300, workspace=workspace)
    torch.cuda.synchronize()
    assert torch.equal(got, expected)

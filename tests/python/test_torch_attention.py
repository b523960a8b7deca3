"""keysel.torch.topk_attention against a plain masked-softmax reference in float64 (written out below), the
torch.library ops (schemas, fake implementations, torch.compile fullgraph) and CUDA graph capture (GPU only).

The reference is deliberately naive: full logits [B, Hq, T, N] in float64, the allowed keys of each query, the
mean probabilities of each selection group, the exact top-k by sorting (equal values prefer the lower position,
keysel's tie rule; the kept keys first), then softmax over everything but the selected keys masked to -inf.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import keysel.torch as kt
from conftest import SDPA_TAKES_GQA, TORCH_VERSION

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GRANULARITIES = ("per_head", "per_kv_head", "per_token")


# ----------------------------------------------------------------------------------------------- the reference


def reference_allowed(t, n, is_causal, device="cpu"):
    """bool [T, N]: query t (at key position n - T + t when causal) may read key s."""
    s = torch.arange(n, device=device)
    if not is_causal:
        return torch.ones(t, n, dtype=torch.bool, device=device)
    return s[None, :] <= (n - t + torch.arange(t, device=device))[:, None]


def reference_groups(granularity, hq, hkv):
    """The selection group of each query head, as a list."""
    if granularity == "per_head":
        return list(range(hq))
    if granularity == "per_kv_head":
        return [h // (hq // hkv) for h in range(hq)]
    return [0] * hq


def reference_exact_selection(query, key, *, k, is_causal=True, scale=None, granularity="per_kv_head", n_sink=0,
                              n_local=0):
    """bool [B, G, T, N]: the exact top-k of every query and group, plus the kept keys (float64, by sorting)."""
    b, hq, t, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    g = hq // hkv
    kk = key.double().repeat_interleave(g, dim=1)
    logits = torch.matmul(query.double(), kk.transpose(-1, -2)) * scale          # [B, Hq, T, N]
    allowed = reference_allowed(t, n, is_causal)
    p = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1)
    groups = reference_groups(granularity, hq, hkv)
    n_groups = max(groups) + 1
    pbar = torch.zeros(b, n_groups, t, n, dtype=torch.float64)
    counts = [groups.count(x) for x in range(n_groups)]
    for h, grp in enumerate(groups):
        pbar[:, grp] += p[:, h] / counts[grp]
    chosen = torch.zeros(b, n_groups, t, n, dtype=torch.bool)
    for bi in range(b):
        for gi in range(n_groups):
            for ti in range(t):
                keys = [s for s in range(n) if allowed[ti, s]]
                last = keys[-1]
                kept = [s for s in keys if s < n_sink or s > last - n_local]
                others = sorted((s for s in keys if s not in kept), key=lambda s: (-pbar[bi, gi, ti, s].item(), s))
                for s in kept + others[:max(0, k - len(kept))]:
                    chosen[bi, gi, ti, s] = True
    return chosen


def reference_attention(query, key, value, chosen, *, scale=None, granularity="per_kv_head"):
    """float64 [B, Hq, T, Dv]: softmax over the chosen keys (bool [B, G, T, N]) only."""
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    g = hq // hkv
    kk = key.double().repeat_interleave(g, dim=1)
    vv = value.double().repeat_interleave(g, dim=1)
    logits = torch.matmul(query.double(), kk.transpose(-1, -2)) * scale
    groups = torch.tensor(reference_groups(granularity, hq, hkv))
    mask = chosen[:, groups]                                                       # [B, Hq, T, N]
    p = torch.softmax(logits.masked_fill(~mask, -math.inf), dim=-1)
    return torch.matmul(p, vv)


def full_attention(query, key, value, mask=None):
    """float64 [B, Hq, T, Dv] over every key `mask` (bool [T, N], None: all) allows: torch's own
    F.scaled_dot_product_attention where it takes enable_gqa (torch >= 2.5); on an older torch (1.13 has no SDPA)
    reference_attention with every allowed key chosen."""
    if SDPA_TAKES_GQA:
        return F.scaled_dot_product_attention(query.double(), key.double(), value.double(), attn_mask=mask,
                                              enable_gqa=True)
    b, hq, t, _ = query.shape
    n = key.shape[2]
    allowed = torch.ones(t, n, dtype=torch.bool) if mask is None else mask
    return reference_attention(query, key, value, allowed.expand(b, hq, t, n), granularity="per_head")


def reference_topk_attention(query, key, value, *, k, is_causal=True, scale=None, granularity="per_kv_head",
                             n_sink=0, n_local=0):
    chosen = reference_exact_selection(query, key, k=k, is_causal=is_causal, scale=scale, granularity=granularity,
                                       n_sink=n_sink, n_local=n_local)
    return reference_attention(query, key, value, chosen, scale=scale, granularity=granularity)


def random_qkv(b, hq, hkv, t, n, d, dv=None, seed=0, dtype=torch.float32, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, t, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, n, dv or d, generator=gen, dtype=torch.float64)
    return (x.to(dtype).to(device) for x in (q, k, v))


def selection_sets(selection):
    """int32 [T, G, W] -> list of lists of sets."""
    return [[set(int(s) for s in row if s >= 0) for row in groups] for groups in selection.tolist()]


# ----------------------------------------------------------------------------------------------- the function


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("t,n", [(9, 9), (1, 17), (4, 13)])
def test_every_key_selected_is_full_causal_attention(granularity, t, n):
    q, k, v = random_qkv(2, 6, 2, t, n, 16, seed=t * n)
    for kk in (n, n + 5):
        out = kt.topk_attention(q, k, v, k=kk, granularity=granularity)
        assert out.shape == (2, 6, t, 16) and out.dtype == torch.float32
        mask = reference_allowed(t, n, True)
        expected = full_attention(q, k, v, mask)
        torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (4, 1)])
@pytest.mark.parametrize("t,n,k", [(12, 12, 3), (1, 40, 7), (5, 30, 8)])
def test_topk_matches_the_masked_softmax_reference(granularity, hq, hkv, t, n, k):
    q, key, v = random_qkv(2, hq, hkv, t, n, 8, dv=12, seed=hq * 100 + t * 10 + k)
    out = kt.topk_attention(q, key, v, k=k, granularity=granularity)
    expected = reference_topk_attention(q, key, v, k=k, granularity=granularity)
    assert out.shape == (2, hq, t, 12)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    # and it is not full attention: restricting to k keys changes the output of the queries that see more
    full = full_attention(q, key, v, reference_allowed(t, n, True))
    assert (out.double() - full).abs().max() > 1e-3


def test_float64_inputs_match_the_reference_to_rounding():
    q, key, v = random_qkv(1, 4, 2, 6, 20, 8, seed=5, dtype=torch.float64)
    out = kt.topk_attention(q, key, v, k=5, scale=0.3)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_topk_attention(q, key, v, k=5, scale=0.3), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("n_sink,n_local", [(2, 0), (0, 3), (1, 2)])
def test_kept_keys_count_toward_k(n_sink, n_local):
    q, key, v = random_qkv(1, 4, 2, 7, 25, 8, seed=11)
    out = kt.topk_attention(q, key, v, k=6, n_sink=n_sink, n_local=n_local)
    expected = reference_topk_attention(q, key, v, k=6, n_sink=n_sink, n_local=n_local)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    chosen = reference_exact_selection(q, key, k=6, n_sink=n_sink, n_local=n_local)
    assert int(chosen.sum(-1).max()) == 6


def test_not_causal_reads_every_key():
    q, key, v = random_qkv(1, 4, 2, 5, 11, 8, seed=2)
    out = kt.topk_attention(q, key, v, k=11, is_causal=False)
    expected = full_attention(q, key, v)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    out = kt.topk_attention(q, key, v, k=3, is_causal=False)
    expected = reference_topk_attention(q, key, v, k=3, is_causal=False)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)


def test_bfloat16_runs_and_returns_bfloat16():
    q, key, v = random_qkv(1, 4, 2, 3, 16, 8, seed=4, dtype=torch.bfloat16)
    out = kt.topk_attention(q, key, v, k=5)
    assert out.dtype == torch.bfloat16
    expected = reference_topk_attention(q, key, v, k=5)
    torch.testing.assert_close(out.double(), expected, atol=3e-2, rtol=3e-2)


def test_a_callable_selector_decides_the_keys():
    q, key, v = random_qkv(2, 4, 2, 3, 20, 8, seed=8)
    calls = []

    def last_keys(q1, k_cache, positions, k, *, granularity, scale, n_sink, n_local):
        calls.append((tuple(q1.shape), tuple(k_cache.shape), positions.tolist(), k, granularity))
        t = q1.shape[0]
        rows = [[p - k + 1 + i for i in range(k)] for p in positions.tolist()]
        return torch.tensor(rows, dtype=torch.int32).view(t, 1, k).expand(t, 2, k).contiguous()

    out = kt.topk_attention(q, key, v, k=4, selector=last_keys)
    assert calls == [((3, 4, 8), (20, 2, 8), [17, 18, 19], 4, "per_kv_head")] * 2
    chosen = torch.zeros(2, 2, 3, 20, dtype=torch.bool)
    for t, p in enumerate([17, 18, 19]):
        chosen[:, :, t, p - 3:p + 1] = True
    torch.testing.assert_close(out.double(), reference_attention(q, key, v, chosen), atol=2e-6, rtol=1e-5)


def test_a_selector_of_the_wrong_shape_is_refused():
    q, key, v = random_qkv(1, 4, 2, 3, 20, 8)
    with pytest.raises(ValueError, match="expected \\[T=3, G=2, W\\]"):
        kt.topk_attention(q, key, v, k=4, selector=lambda *a, **kw: torch.zeros(3, 1, 4, dtype=torch.int32))


@pytest.mark.parametrize("change,message", [
    (lambda q, k, v: (q[0], k, v), "query must be a 4-D tensor"),
    (lambda q, k, v: (q, k[:, :1].expand(1, 3, 20, 8), v[:, :1].expand(1, 3, 20, 8)), "must divide query heads"),
    (lambda q, k, v: (q, k[..., :4], v), "key head dim"),
    (lambda q, k, v: (q, k, v[:, :, :5]), "key .* and value"),
    (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2]), "T <= N"),
    (lambda q, k, v: (q.long(), k, v), "floating point"),
])
def test_bad_arguments_name_what_is_wrong(change, message):
    q, key, v = random_qkv(1, 4, 2, 3, 20, 8)
    q, key, v = change(q, key, v)
    with pytest.raises(ValueError, match=message):
        kt.topk_attention(q, key, v, k=4)


@pytest.mark.parametrize("kwargs,message", [
    ({"k": 0}, "k must be an integer >= 1"),
    ({"k": 2.5}, "k must be an integer >= 1"),
    ({"k": 4, "granularity": "per_layer"}, "granularity must be one of"),
    ({"k": 4, "n_sink": -1}, "n_sink must be"),
    ({"k": 4, "n_sink": 3, "n_local": 2}, "n_sink \\+ n_local"),
    ({"k": 4, "scale": math.nan}, "scale must be finite"),
])
def test_bad_options_name_what_is_wrong(kwargs, message):
    q, key, v = random_qkv(1, 4, 2, 3, 20, 8)
    with pytest.raises(ValueError, match=message):
        kt.topk_attention(q, key, v, **kwargs)


# ----------------------------------------------------------------------------------------------- selection rules


def test_equal_scores_prefer_the_lower_position_and_nan_is_never_selected():
    scores = torch.tensor([[[1.0, 3.0, 3.0, 3.0, float("nan"), 5.0]],
                           [[float("nan")] * 3 + [-math.inf, 2.0, 2.0]]], dtype=torch.float32)
    positions = torch.tensor([5, 5], dtype=torch.int32)
    sel = kt.topk_select(scores, positions, 3)
    assert sel.dtype == torch.int32 and sel.tolist() == [[[1, 2, 5]], [[3, 4, 5]]]
    # fewer allowed keys than k: -1 padding after ascending positions
    sel = kt.topk_select(scores, torch.tensor([1, 0], dtype=torch.int32), 3)
    assert sel.tolist() == [[[0, 1, -1]], [[-1, -1, -1]]]
    # kept keys: a sink and the local window, whatever their scores
    sel = kt.topk_select(scores[:1], positions[:1], 3, n_sink=1, n_local=1)
    assert sel.tolist() == [[[0, 1, 5]]]
    sel = kt.topk_select(scores[:1], positions[:1], 2, n_sink=1, n_local=1, kept_on_top=True)
    assert sel.tolist() == [[[0, 1, 2, 5]]]


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_exact_topk_matches_the_reference_selection(granularity):
    q, key, _ = random_qkv(1, 6, 2, 7, 30, 8, seed=21)
    chosen = reference_exact_selection(q, key, k=5, granularity=granularity, n_sink=1)
    positions = torch.arange(23, 30, dtype=torch.int32)
    sel = kt.exact_topk(q[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous(), positions, 5,
                        granularity=granularity, n_sink=1)
    assert sel.shape == (7, chosen.shape[1], 5)
    for t, groups in enumerate(selection_sets(sel)):
        for g, got in enumerate(groups):
            assert got == set(torch.nonzero(chosen[0, g, t]).flatten().tolist())
        assert all(row == sorted(row) for row in sel[t].tolist())


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_exact_topk_from_skips_the_padding_keys(backend):
    q, key, _ = random_qkv(1, 6, 2, 4, 30, 8, seed=22)
    q, key = q[0].transpose(0, 1).contiguous(), key[0].transpose(0, 1).contiguous()
    positions = torch.tensor([20, 25, 27, 29], dtype=torch.int32)
    with kt.options(backend=backend):
        got = kt.exact_topk_from(q, key, positions, torch.tensor(10), 5, n_sink=2)
        alone = kt.exact_topk(q, key[10:], positions - 10, 5, n_sink=2)
    assert torch.equal(got, torch.where(alone >= 0, alone + 10, alone))
    assert int(got[got >= 0].min()) == 10 and bool((got[:, :, :2] == torch.tensor([10, 11])).all())


@pytest.mark.parametrize("float_mask", [False, True])
def test_the_transformers_attention_function_reads_a_left_padded_mask(float_mask):
    # transformers_attention without transformers (which test_transformers_topk.py drives): a boolean or additive
    # causal mask with left padding becomes key_start and query positions; padding keys are never read
    q, key, v = random_qkv(2, 4, 2, 3, 9, 8, seed=31)
    mask = torch.ones(2, 1, 3, 9, dtype=torch.bool).tril(6)
    mask[1, :, :, :2] = False                                                      # sequence 1: two padding keys
    layer = type("Attention", (), {"config": type("Config", (), {"keysel_topk": {"k": 4}})(), "layer_idx": 0,
                                   "training": False, "is_causal": True})()
    passed = torch.zeros(mask.shape).masked_fill(~mask, -math.inf) if float_mask else mask
    out, weights = kt.transformers_attention(layer, q, key, v, passed)
    assert weights is None and out.shape == (2, 3, 4, 8)                           # [B, T, Hq, Dv]
    for b, first in ((0, 0), (1, 2)):
        expected = reference_topk_attention(q[b:b + 1], key[b:b + 1, :, first:], v[b:b + 1, :, first:], k=4)
        torch.testing.assert_close(out[b:b + 1].transpose(1, 2).double(), expected, atol=2e-6, rtol=1e-5)
    window = mask.clone()
    window[0, :, 2, 0] = False                               # query 2 of sequence 0 starts at key 1: its own run
    out, _ = kt.transformers_attention(layer, q, key, v, window)
    expected = reference_topk_attention(q[:1, :, 2:], key[:1, :, 1:], v[:1, :, 1:], k=4)
    torch.testing.assert_close(out[:1, 2:].transpose(1, 2).double(), expected, atol=2e-6, rtol=1e-5)
    gap = mask.clone()
    gap[0, :, 2, 3] = False                                  # a gap inside query 2's run
    with pytest.raises(NotImplementedError, match="contiguous"):
        kt.transformers_attention(layer, q, key, v, gap)


def test_the_pure_torch_backend_agrees_with_the_default_one():
    q, key, v = random_qkv(2, 6, 2, 5, 40, 16, seed=3)
    with kt.options(backend="torch"):
        assert kt.backend() == "torch"
        fallback = kt.topk_attention(q, key, v, k=9)
    default = kt.topk_attention(q, key, v, k=9)
    torch.testing.assert_close(default, fallback, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- ops and compile


CUSTOM_OPS = hasattr(torch.library, "custom_op")
needs_registered_ops = pytest.mark.skipif(
    not CUSTOM_OPS, reason=f"torch.library.custom_op (torch.ops.keysel.*) needs torch >= 2.4; this is torch "
                           f"{TORCH_VERSION}, where keysel.torch runs the same functions unregistered")
needs_torch_compile = pytest.mark.skipif(
    not CUSTOM_OPS or not hasattr(torch, "compile"),
    reason=f"torch.compile through keysel.torch needs the keysel ops of torch.library.custom_op (torch >= 2.4); "
           f"this is torch {TORCH_VERSION}")


def test_the_ops_are_registered_exactly_where_torch_library_can():
    # torch >= 2.4: torch.ops.keysel.*; older torch (no torch.library.custom_op): none, the functions run directly
    assert kt.ops_registered() == CUSTOM_OPS
    assert (hasattr(torch.ops, "keysel") and hasattr(torch.ops.keysel, "sparse_attention")) == CUSTOM_OPS
    q, key, v = random_qkv(1, 4, 2, 3, 12, 8, seed=6)
    q, key, v = (x[0].transpose(0, 1).contiguous() for x in (q, key, v))
    positions = torch.arange(9, 12, dtype=torch.int32)
    sel = kt.exact_topk(q, key, positions, 4, scale=0.25)
    assert sel.shape == (3, 2, 4) and sel.dtype == torch.int32
    out, lse = kt.sparse_attention(q, key, v, sel, scale=0.25)
    assert out.shape == (3, 4, 8) and lse.shape == (3, 4) and lse.dtype == torch.float32
    assert torch.equal(kt.topk_select(torch.randn(3, 2, 12), positions, 4).ge(0).sum(-1), torch.full((3, 2), 4))


@needs_registered_ops
def test_the_ops_are_registered_with_fake_implementations():
    assert kt.ops_registered()
    q, key, v = random_qkv(1, 4, 2, 3, 12, 8)
    q, key, v = (x[0].transpose(0, 1).contiguous() for x in (q, key, v))
    positions = torch.arange(9, 12, dtype=torch.int32)
    sel = torch.ops.keysel.exact_topk(q, key, positions, 4, "per_kv_head", 0.25, 0, 0)
    scores = torch.randn(3, 2, 12)
    # opcheck runs the schema, fake-tensor and autograd-registration checks of torch.library
    torch.library.opcheck(torch.ops.keysel.topk_select.default, (scores, positions, 4, 1, 1, False))
    torch.library.opcheck(torch.ops.keysel.exact_topk.default, (q, key, positions, 4, "per_token", 0.25, 0, 0))
    torch.library.opcheck(torch.ops.keysel.sparse_attention.default, (q, key, v, sel, "per_kv_head", 0.25))
    torch.library.opcheck(torch.ops.keysel.exact_topk_from.default,
                          (q, key, positions, torch.tensor(2), 4, "per_kv_head", 0.3, 1, 0))


@needs_torch_compile
@pytest.mark.parametrize("t,n", [(6, 6), (1, 24)])
def test_torch_compile_fullgraph_gives_the_eager_result(t, n):
    torch._dynamo.reset()
    q, key, v = random_qkv(2, 4, 2, t, n, 8, seed=n)

    def attend(q, key, v):
        return kt.topk_attention(q, key, v, k=5, granularity="per_kv_head", n_sink=1)

    compiled = torch.compile(attend, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(q, key, v), attend(q, key, v), atol=1e-6, rtol=1e-6)
    # the compiled graph holds the keysel ops, not a graph break
    graphs = []

    def count(gm, inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(attend, fullgraph=True, backend=count)(q, key, v)
    assert len(graphs) == 1
    targets = {str(node.target).removesuffix(".default") for node in graphs[0].graph.nodes
               if node.op == "call_function"}
    assert {"keysel.exact_topk", "keysel.sparse_attention"} <= targets


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")


@needs_cuda
def test_cuda_matches_cpu_and_is_captured_by_a_cuda_graph():
    q, key, v = random_qkv(2, 8, 2, 1, 300, 64, seed=9)
    expected = kt.topk_attention(q, key, v, k=32)
    qc, kc, vc = (x.cuda() for x in (q, key, v))
    out = kt.topk_attention(qc, kc, vc, k=32)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
    static_out = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            kt.topk_attention(qc, kc, vc, k=32)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = kt.topk_attention(qc, kc, vc, k=32)
    q2, k2, v2 = random_qkv(2, 8, 2, 1, 300, 64, seed=10)
    qc.copy_(q2.cuda()), kc.copy_(k2.cuda()), vc.copy_(v2.cuda())
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_out.cpu(), kt.topk_attention(q2, k2, v2, k=32), atol=1e-4, rtol=1e-4)


@needs_torch_compile
@needs_cuda
def test_cuda_bfloat16_decode_under_torch_compile_with_cuda_graphs():
    torch._dynamo.reset()
    q, key, v = random_qkv(2, 8, 2, 1, 500, 128, seed=12, dtype=torch.bfloat16, device="cuda")

    def attend(q, key, v):
        return kt.topk_attention(q, key, v, k=64, granularity="per_token", n_sink=4, n_local=16)

    eager = attend(q, key, v)
    compiled = torch.compile(attend, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # the first calls record the graph, the later ones replay it
        out = compiled(q, key, v)
    torch.testing.assert_close(out, eager, atol=2e-2, rtol=2e-2)
    expected = reference_topk_attention(q.cpu(), key.cpu(), v.cpu(), k=64, granularity="per_token", n_sink=4,
                                        n_local=16)
    torch.testing.assert_close(out.double().cpu(), expected, atol=2e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------- statistics


def test_stats_aggregate_as_keysel_metrics_does():
    import keysel
    q, key, v = random_qkv(1, 4, 2, 37, 50, 8, seed=23)
    q, key, v = (x[0].transpose(0, 1).contiguous() for x in (q, key, v))
    positions = torch.arange(13, 50, dtype=torch.int32)
    selection = keysel.make_selector({"type": "random", "seed": 3}).select(q, key, positions, 5)
    metrics = keysel.metrics(q, key, v, positions, selection, 5)
    stats = kt.TopkStats()
    stats.record(7, metrics)
    summary = stats.summary()
    assert stats.layers == [7] and set(summary) == {7, "all"}
    for name in keysel.metric_names():
        for what, value in metrics["aggregates"][name].items():
            assert summary[7][name][what] == pytest.approx(value, rel=1e-12, abs=1e-15), (name, what)
    # NaN rows are left out (out_err without values), as keysel.metrics leaves them out
    stats.record(7, keysel.metrics(q, key, None, positions, selection, 5))
    assert stats.summary()[7]["out_err"]["count"] == 74 and stats.summary()[7]["recall"]["count"] == 148
    assert stats.rows(7)["recall"].shape == (148,)
    stats.reset()
    assert stats.layers == [] and stats.summary() == {}


def test_topk_attention_records_stats_of_its_selection():
    q, key, v = random_qkv(2, 4, 2, 6, 30, 8, seed=24)
    stats = kt.TopkStats()
    kt.topk_attention(q, key, v, k=4, stats=stats, layer=3)
    kt.topk_attention(q, key, v, k=4, stats=stats, layer=3, selector=lambda q1, kc, pos, k, **kw: torch.arange(
        4, dtype=torch.int32).expand(q1.shape[0], 2, 4).contiguous())
    rows = stats.rows(3)
    assert rows["recall"].shape == (2 * 2 * 6 * 2,)
    assert bool((rows["recall"][:24] == 1).all()) and rows["recall"][24:].mean() < 0.6
    assert bool((rows["mass_ratio"][:24] - 1).abs().max() < 1e-12)


def test_backend_keysel_refuses_what_the_core_cannot_run():
    q, key, v = random_qkv(1, 4, 2, 3, 12, 8, dtype=torch.float64)
    with kt.options(backend="keysel"):
        with pytest.raises(ValueError, match="backend='keysel' runs the compiled core on CPU tensors"):
            kt.topk_attention(q, key, v, k=4)
        out = kt.topk_attention(q.float(), key.float(), v.float(), k=4)  # float32 on the CPU runs
    torch.testing.assert_close(out.double(), reference_topk_attention(q, key, v, k=4), atol=2e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="backend must be"):
        kt.configure(backend="cuda")


def test_without_registered_ops_the_same_functions_run_directly(monkeypatch):
    # what a torch older than 2.4 (no torch.library.custom_op) runs
    q, key, v = random_qkv(2, 4, 2, 5, 20, 8, seed=25)
    expected = kt.topk_attention(q, key, v, k=6, n_local=2)
    monkeypatch.setattr(kt, "_ops_registered", False)
    torch.testing.assert_close(kt.topk_attention(q, key, v, k=6, n_local=2), expected, atol=0, rtol=0)
    assert not kt.ops_registered()

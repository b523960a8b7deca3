"""Gradients of attention over a selection (docs/SPEC.md §9): keysel.sparse_attention_backward (the CPU kernel, with
and without the lse term), keysel.torch.sparse_attention (through out and lse) and keysel.torch.topk_attention
under autograd, against a plain float64
masked-softmax reference written below (dense scores with -inf outside the selection, differentiated by torch's
autograd), and torch.autograd.gradcheck in float64.

Tolerances: the kernel computes in float32 (unit roundoff 6e-8) over at most a few dozen products per value:
1e-4 relative to the largest gradient leaves a wide margin while a wrong term moves gradients by O(1e-1).
Every API used here exists in torch 1.13 (ctest's python.pytest_oldest_torch).
"""
import math

import numpy as np
import pytest
import torch

import keysel
import keysel.torch as kt

GRANULARITIES = ("per_head", "per_kv_head", "per_token")


def group_of_heads(granularity, hq, hkv):
    if granularity == "per_head":
        return list(range(hq))
    if granularity == "per_kv_head":
        return [h // (hq // hkv) for h in range(hq)]
    return [0] * hq


def random_selection(generator, t, n, groups, width, positions):
    """int32 [T, G, W]: per row a random number of distinct allowed keys in random order, then -1; row (0, 0)
    is empty."""
    sel = torch.full((t, groups, width), -1, dtype=torch.int32)
    for i in range(t):
        allowed = min(int(positions[i]) + 1, n)
        for g in range(groups):
            if i == 0 and g == 0:
                continue
            count = int(torch.randint(0, min(width, allowed) + 1, (1,), generator=generator))
            keys = torch.randperm(allowed, generator=generator)[:count]
            sel[i, g, :count] = keys.to(torch.int32)
    return sel


def masked_lse_scores(q, k, selection, granularity, scale):
    """scale * q.k [T, Hq, N] in float64 with -inf outside the selection (rows with no key stay all -inf)."""
    t, hq, _ = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    groups = group_of_heads(granularity, hq, hkv)
    mask = torch.zeros(t, hq, n, dtype=torch.bool)
    for i in range(t):
        for h in range(hq):
            for s in selection[i, groups[h]].tolist():
                if s >= 0:
                    mask[i, h, s] = True
    scores = torch.einsum("thd,nhd->thn", q.double(), k.double()[:, [h // g for h in range(hq)], :]) * scale
    return scores.masked_fill(~mask, float("-inf"))


def masked_reference(q, k, v, selection, granularity, scale):
    """out [T, Hq, Dv] in float64 from dense scores [T, Hq, N] masked to -inf outside the selection; a row with
    no key gives zeros. Differentiable by torch's autograd."""
    hq, hkv = q.shape[1], k.shape[1]
    v_heads = v.double()[:, [h // (hq // hkv) for h in range(hq)], :]  # [N, Hq, Dv]
    scores = masked_lse_scores(q, k, selection, granularity, scale)
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    return torch.einsum("thn,nhd->thd", p, v_heads)


def make_problem(seed, t=5, n=19, hq=6, hkv=2, d=7, dv=5, width=8, granularity="per_kv_head",
                 dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(t, hq, d, generator=generator, dtype=torch.float64).to(dtype)
    k = torch.randn(n, hkv, d, generator=generator, dtype=torch.float64).to(dtype)
    v = torch.randn(n, hkv, dv, generator=generator, dtype=torch.float64).to(dtype)
    positions = torch.tensor([n - 1, 3, n + 4, 0, 11][:t] + [n - 1] * max(0, t - 5))
    groups = len(set(group_of_heads(granularity, hq, hkv)))
    selection = random_selection(generator, t, n, groups, width, positions)
    grad_out = torch.randn(t, hq, dv, generator=generator, dtype=torch.float64)
    return q, k, v, selection, grad_out


def reference_gradients(q, k, v, selection, grad_out, granularity, scale, grad_lse=None):
    """Gradients of sum(out * grad_out) (+ sum(lse * grad_lse) over rows with a selected key) in float64."""
    leaves = [x.detach().double().requires_grad_(True) for x in (q, k, v)]
    out = masked_reference(*leaves, selection, granularity, scale)
    loss = (out * grad_out.double()).sum()
    if grad_lse is not None:
        lse = torch.logsumexp(masked_lse_scores(leaves[0], leaves[1], selection, granularity, scale), dim=-1)
        loss = loss + torch.where(torch.isfinite(lse), lse * grad_lse.double(), torch.zeros_like(lse)).sum()
    return torch.autograd.grad(loss, leaves)


def assert_close(got, want, relative=1e-4):
    bound = relative * (1.0 + float(want.abs().max()))
    error = float((got.double() - want).abs().max())
    assert error <= bound, f"max error {error} > {bound}"


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_core_backward_matches_the_masked_softmax_reference(granularity):
    q, k, v, sel, grad_out = make_problem(1, granularity=granularity)
    scale = 0.37
    out, lse = keysel.sparse_attention(q, k, v, sel, granularity=granularity, scale=scale)
    dq, dk, dv = keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity=granularity,
                                                  scale=scale)
    assert dq.dtype == dk.dtype == dv.dtype == torch.float32
    want = reference_gradients(q, k, v, sel, grad_out, granularity, scale)
    for got, expected in zip((dq, dk, dv), want):
        assert float(expected.abs().max()) > 0.1  # not a comparison of zeros
        assert_close(got, expected)
    assert torch.all(dq[0, [h for h, g in enumerate(group_of_heads(granularity, 6, 2)) if g == 0]] == 0)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_core_backward_with_an_lse_gradient(granularity):
    q, k, v, sel, grad_out = make_problem(11, granularity=granularity)
    grad_lse = torch.randn(5, 6, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    out, lse = keysel.sparse_attention(q, k, v, sel, granularity=granularity, scale=0.37)
    got = keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity=granularity,
                                           scale=0.37, grad_lse=grad_lse.float())
    want = reference_gradients(q, k, v, sel, grad_out, granularity, 0.37, grad_lse)
    without = reference_gradients(q, k, v, sel, grad_out, granularity, 0.37)
    for g, expected, plain in zip(got, want, without):
        assert_close(g, expected)
    assert float((want[0] - without[0]).abs().max()) > 0.1  # the lse term matters
    with pytest.raises(keysel.Error, match="grad_lse"):
        keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity=granularity,
                                         grad_lse=grad_lse.float()[:, :2])


def test_core_backward_takes_numpy_and_writes_in_place():
    q, k, v, sel, grad_out = make_problem(2)
    qn, kn, vn, sn = (x.numpy() for x in (q, k, v, sel))
    out, lse = keysel.sparse_attention(qn, kn, vn, sn)
    grads = [np.full(x.shape, 7.0, dtype=np.float32) for x in (qn, kn, vn)]
    result = keysel.sparse_attention_backward(qn, kn, vn, sn, out, lse, grad_out.float().numpy(), grad_q=grads[0],
                                              grad_k=grads[1], grad_v=grads[2])
    assert all(a is b for a, b in zip(result, grads))
    want = reference_gradients(q, k, v, sel, grad_out, "per_kv_head", 1 / math.sqrt(7))
    for got, expected in zip(grads, want):
        assert_close(torch.from_numpy(got), expected)


def test_core_backward_rejects_bad_input_naming_the_argument():
    q, k, v, sel, grad_out = make_problem(3)
    out, lse = keysel.sparse_attention(q, k, v, sel)
    with pytest.raises(keysel.Error, match="grad_q"):
        keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), grad_q=torch.zeros(5, 6, 6))
    bad = sel.clone()
    bad[1, 0, 0] = 19  # N = 19 keys
    with pytest.raises(keysel.Error, match="selection"):
        keysel.sparse_attention_backward(q, k, v, bad, out, lse, grad_out.float())
    with pytest.raises(keysel.Error, match="lse"):
        keysel.sparse_attention_backward(q, k, v, sel, out, lse.double(), grad_out.float())


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_gradcheck_float64(granularity):
    q, k, v, sel, _ = make_problem(4, t=4, n=9, hq=4, hkv=2, d=3, dv=2, width=5, granularity=granularity,
                                   dtype=torch.float64)
    leaves = tuple(x.clone().requires_grad_(True) for x in (q, k, v))

    def attention(q, k, v):
        return kt.sparse_attention(q, k, v, sel, granularity=granularity, scale=0.6)[0]

    assert torch.autograd.gradcheck(attention, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_lse_gradient_in_float64(granularity):
    """lse is float32 whatever the inputs (so gradcheck of it would measure float32 rounding); the float64 backward
    of the lse term is checked against the float64 reference instead, to 1e-6 (its incoming gradient, like lse,
    is float32: 6e-8 relative)."""
    q, k, v, sel, grad_out = make_problem(14, granularity=granularity, dtype=torch.float64)
    grad_lse = torch.randn(5, 6, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, lse = kt.sparse_attention(*leaves, sel, granularity=granularity, scale=0.6)
    loss = (out * grad_out).sum() + torch.where(torch.isfinite(lse), lse * grad_lse, torch.zeros_like(lse)).sum()
    loss.backward()
    want = reference_gradients(q, k, v, sel, grad_out, granularity, 0.6, grad_lse)
    for leaf, expected in zip(leaves, want):
        assert_close(leaf.grad, expected, 1e-6)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_torch_sparse_attention_gradients(granularity, backend):
    """backend auto: keysel's CPU kernel; backend torch: the gather-based pure-torch backward (what CUDA tensors the
    CUDA kernels do not take run)."""
    q, k, v, sel, grad_out = make_problem(5, t=6, n=23, hq=6, hkv=3, d=9, dv=11, width=7, granularity=granularity)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    grad_lse = torch.randn(6, 6, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    with kt.options(backend=backend):
        out, lse = kt.sparse_attention(*leaves, sel, granularity=granularity, scale=0.45)
        assert lse.requires_grad
        out.backward(grad_out.float())
    want = reference_gradients(q, k, v, sel, grad_out, granularity, 0.45)
    for leaf, expected in zip(leaves, want):
        assert_close(leaf.grad, expected)
    # Through lse as well (the lse of a row with no key, -inf, is left out of the loss).
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    with kt.options(backend=backend):
        out, lse = kt.sparse_attention(*leaves, sel, granularity=granularity, scale=0.45)
        loss = (out * grad_out.float()).sum() + torch.where(torch.isfinite(lse), lse * grad_lse.float(),
                                                            torch.zeros_like(lse)).sum()
        loss.backward()
    want = reference_gradients(q, k, v, sel, grad_out, granularity, 0.45, grad_lse)
    for leaf, expected in zip(leaves, want):
        assert_close(leaf.grad, expected)


def test_autograd_function_of_older_torches():
    """The torch.autograd.Function torch < 2.4 uses (newer ones register the same backward on the custom op)."""
    q, k, v, sel, grad_out = make_problem(6, granularity="per_token")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    out, _ = kt._SparseAttentionFunction.apply(*leaves, sel, "per_token", 0.5, None)
    out.backward(grad_out.float())
    want = reference_gradients(q, k, v, sel, grad_out, "per_token", 0.5)
    for leaf, expected in zip(leaves, want):
        assert_close(leaf.grad, expected)


def test_backward_is_bitwise_identical_across_thread_counts():
    q, k, v, sel, grad_out = make_problem(7, t=20, n=60, hq=8, hkv=2, d=32, dv=16, width=30, granularity="per_token")
    out, lse = keysel.sparse_attention(q, k, v, sel, granularity="per_token")
    before = keysel.num_threads()
    try:
        keysel.set_num_threads(1)
        one = keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity="per_token")
        keysel.set_num_threads(2)
        two = keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity="per_token")
    finally:
        keysel.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def dense_topk_reference(query, key, value, k, granularity, scale):
    """[B, Hq, T, Dv] float64, causal prefill (T = N), the selection of keysel's exact top-k held fixed."""
    b, hq, t, d = query.shape
    outputs = []
    positions = torch.arange(t, dtype=torch.int32)
    for i in range(b):
        q = query[i].transpose(0, 1)
        kc = key[i].transpose(0, 1)
        vc = value[i].transpose(0, 1)
        with torch.no_grad():
            sel = kt.exact_topk(q.detach().float(), kc.detach().float(), positions, k, granularity=granularity,
                                scale=scale)
        outputs.append(masked_reference(q, kc, vc, sel, granularity, scale))
    return torch.stack(outputs).transpose(1, 2)


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)])
def test_topk_attention_gradients_match_masked_softmax(granularity, heads):
    hq, hkv = heads
    generator = torch.Generator().manual_seed(8)
    b, t, d, dv, k = 2, 13, 10, 6, 4
    tensors = [torch.randn(b, hq, t, d, generator=generator), torch.randn(b, hkv, t, d, generator=generator),
               torch.randn(b, hkv, t, dv, generator=generator)]
    weights = torch.randn(b, hq, t, dv, generator=generator, dtype=torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in tensors]
    out = kt.topk_attention(*leaves, k=k, granularity=granularity)
    (out.double() * weights).sum().backward()
    ref_leaves = [x.double().requires_grad_(True) for x in tensors]
    ref = dense_topk_reference(*ref_leaves, k, granularity, 1 / math.sqrt(d))
    assert_close(out.detach(), ref.detach())
    (ref * weights).sum().backward()
    for leaf, expected in zip(leaves, ref_leaves):
        assert float(expected.grad.abs().max()) > 0.1
        assert_close(leaf.grad, expected.grad)


@pytest.mark.skipif(not kt.ops_registered(),
                    reason=f"torch.ops.keysel.* and torch.library.opcheck need torch >= 2.4 (this is {torch.__version__})")
def test_opcheck_of_the_differentiable_op_and_its_backward():
    q, k, v, sel, grad_out = make_problem(9, granularity="per_head")
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
    # With inputs that require grad, opcheck also runs the registered autograd formula.
    torch.library.opcheck(torch.ops.keysel.sparse_attention.default, (*leaves, sel, "per_head", 0.5))
    torch.library.opcheck(torch.ops.keysel.sparse_attention.default, (*leaves, sel, "per_head", 0.5, False))
    out, lse = kt.sparse_attention(q, k, v, sel, granularity="per_head", scale=0.5)
    torch.library.opcheck(torch.ops.keysel.sparse_attention_backward.default,
                          (q, k, v, sel, out, lse, grad_out.float(), "per_head", 0.5, None))
    torch.library.opcheck(torch.ops.keysel.sparse_attention_backward.default,
                          (q, k, v, sel, out, lse, grad_out.float(), "per_head", 0.5, torch.ones(5, 6), True))


CUDA_KERNELS = torch.cuda.is_available() and keysel.built_with_cuda()
needs_cuda = pytest.mark.skipif(not CUDA_KERNELS, reason="no CUDA GPU here, or keysel built without CUDA: the "
                                "GPU backward runs on the GPU machine (bench/gpu/run.sh python)")


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_backward_kernel_matches_the_masked_softmax_reference(granularity, dtype):
    """keysel.sparse_attention_backward on CUDA tensors (the GPU kernel) against the float64 reference, on the
    forward's out and lse computed in float64 from the same (rounded) inputs; awkward sizes, empty rows."""
    q, k, v, sel, grad_out = make_problem(21, t=37, n=71, hq=6, hkv=2, d=24, dv=40, width=13,
                                          granularity=granularity, dtype=dtype)
    out = masked_reference(q, k, v, sel, granularity, 0.3)
    lse = torch.logsumexp(masked_lse_scores(q, k, sel, granularity, 0.3), dim=-1).float()
    cuda = torch.device("cuda")
    dq, dk, dv = keysel.sparse_attention_backward(
        q.to(cuda), k.to(cuda), v.to(cuda), sel.to(cuda), out.to(dtype).to(cuda).contiguous(), lse.to(cuda),
        grad_out.to(dtype).to(cuda), granularity=granularity, scale=0.3)
    assert dq.device.type == "cuda" and dq.dtype == torch.float32
    want = reference_gradients(q, k, v, sel, grad_out.to(dtype), granularity, 0.3)
    relative = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 out and grad_out enter Delta rounded
    for got, expected in zip((dq, dk, dv), want):
        assert_close(got.cpu(), expected, relative)


@needs_cuda
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_torch_attention_on_cuda_runs_keysel_kernels_both_ways(granularity):
    """keysel.torch.sparse_attention on bf16 CUDA tensors (D = Dv = 64) runs keysel's CUDA forward and backward
    kernels; out, lse and the gradients against the float64 reference of the same bf16 inputs."""
    q, k, v, sel, grad_out = make_problem(22, t=45, n=133, hq=8, hkv=2, d=64, dv=64, width=29,
                                          granularity=granularity, dtype=torch.bfloat16)
    cuda = torch.device("cuda")
    leaves = [x.to(cuda).requires_grad_(True) for x in (q, k, v)]
    assert kt._cuda_kernels_take(*leaves, forward=True)
    out, lse = kt.sparse_attention(*leaves, sel.to(cuda), granularity=granularity, scale=0.125)
    out.backward(grad_out.to(torch.bfloat16).to(cuda))
    want_out = masked_reference(q, k, v, sel, granularity, 0.125)
    assert_close(out.detach().float().cpu(), want_out, 2e-2)
    want_lse = torch.logsumexp(masked_lse_scores(q, k, sel, granularity, 0.125), dim=-1)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert_close(lse.cpu()[finite], want_lse[finite], 1e-4)
    want = reference_gradients(q, k, v, sel, grad_out.to(torch.bfloat16), granularity, 0.125)
    for leaf, expected in zip(leaves, want):
        assert leaf.grad.dtype == torch.bfloat16
        assert_close(leaf.grad.float().cpu(), expected, 3e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_cuda_backward_kernel_takes_an_lse_gradient(granularity, dtype):
    """keysel.sparse_attention_backward on CUDA tensors with grad_lse (dS = P (dP - Delta + dLse)) against the
    float64 reference of sum(out * grad_out) + sum(lse * grad_lse); two runs give the same bits."""
    q, k, v, sel, grad_out = make_problem(23, t=37, n=71, hq=6, hkv=2, d=24, dv=40, width=13,
                                          granularity=granularity, dtype=dtype)
    grad_lse = torch.randn(37, 6, generator=torch.Generator().manual_seed(24), dtype=torch.float64)
    out = masked_reference(q, k, v, sel, granularity, 0.3)
    lse = torch.logsumexp(masked_lse_scores(q, k, sel, granularity, 0.3), dim=-1).float()
    cuda = torch.device("cuda")
    args = (q.to(cuda), k.to(cuda), v.to(cuda), sel.to(cuda), out.to(dtype).to(cuda).contiguous(), lse.to(cuda),
            grad_out.to(dtype).to(cuda))
    got = keysel.sparse_attention_backward(*args, granularity=granularity, scale=0.3,
                                           grad_lse=grad_lse.float().to(cuda))
    want = reference_gradients(q, k, v, sel, grad_out.to(dtype), granularity, 0.3, grad_lse.float())
    without = reference_gradients(q, k, v, sel, grad_out.to(dtype), granularity, 0.3)
    assert float((want[0] - without[0]).abs().max()) > 0.1  # the lse term matters
    relative = 1e-4 if dtype == torch.float32 else 3e-2  # bf16 out and grad_out enter Delta rounded
    for g, expected in zip(got, want):
        assert g.device.type == "cuda"
        assert_close(g.cpu(), expected, relative)
    again = keysel.sparse_attention_backward(*args, granularity=granularity, scale=0.3,
                                             grad_lse=grad_lse.float().to(cuda))
    for a, b in zip(got, again):
        assert torch.equal(a, b)
    with pytest.raises(keysel.Error, match="grad_lse"):
        keysel.sparse_attention_backward(*args, granularity=granularity, scale=0.3,
                                         grad_lse=grad_lse.float().to(cuda)[:, :2])


@needs_cuda
@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_torch_attention_on_cuda_differentiates_lse_with_keysel_kernels(granularity, monkeypatch):
    """A loss that uses lse on bf16 CUDA tensors: keysel.torch's backward runs keysel's CUDA kernel (the
    gather-based fallback is made to fail) and matches the float64 reference."""
    q, k, v, sel, grad_out = make_problem(25, t=45, n=133, hq=8, hkv=2, d=64, dv=64, width=29,
                                          granularity=granularity, dtype=torch.bfloat16)
    grad_lse = torch.randn(45, 8, generator=torch.Generator().manual_seed(26), dtype=torch.float64)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the gather-based backward ran on CUDA tensors keysel's kernel takes")

    monkeypatch.setattr(kt._fallback, "sparse_attention_backward", no_fallback)
    cuda = torch.device("cuda")
    leaves = [x.to(cuda).requires_grad_(True) for x in (q, k, v)]
    out, lse = kt.sparse_attention(*leaves, sel.to(cuda), granularity=granularity, scale=0.125)
    glse = grad_lse.float().to(cuda)
    loss = (out.float() * grad_out.to(torch.bfloat16).float().to(cuda)).sum() + torch.where(
        torch.isfinite(lse), lse * glse, torch.zeros_like(lse)).sum()
    loss.backward()
    want = reference_gradients(q, k, v, sel, grad_out.to(torch.bfloat16), granularity, 0.125, grad_lse.float())
    for leaf, expected in zip(leaves, want):
        assert leaf.grad.dtype == torch.bfloat16
        assert_close(leaf.grad.float().cpu(), expected, 3e-2)

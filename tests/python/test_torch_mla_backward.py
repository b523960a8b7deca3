"""Gradients of sparse MLA (docs/SPEC.md §9.2): keysel.sparse_mla_backward (the CPU kernel, and the CUDA kernel on
CUDA tensors) and keysel.torch.sparse_mla under autograd (keysel's kernels on CPU float32/bfloat16 tensors, its
CUDA backward on CUDA tensors, the gather-based torch version for float64 and backend "torch"), against a dense
float64 reference written below (scores over every slot of the cache, -inf outside a row's valid slots, the sink
as one more column of the softmax that is dropped from the output, differentiated by torch's autograd), and
torch.autograd.gradcheck in float64. The CUDA tests skip without a GPU (or a CUDA build of keysel), saying so.

Tolerances: the kernel computes in float32 (unit roundoff 6e-8); a gradient sums at most 576 products per logit
and a few dozen rows per slot, so 2e-4 relative to the largest gradient leaves a margin of about ten while a wrong
term moves gradients by O(1e-1). Every API used here exists in torch 1.13 (ctest's python.pytest_oldest_torch).
"""
import math

import numpy as np
import pytest
import torch

import keysel
import keysel.torch as kt

D_QK, D_V = 576, 512


def make_problem(seed, t=6, h=3, n=23, k=9, dtype=torch.float32):
    """q [T, H, 576], kv [N, 576], indices int32 [T, k] (distinct slots, -1 anywhere, row 0 empty), topk_length
    int32 [T], sinks [H], and the incoming gradients of out and lse."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(t, h, D_QK, generator=generator, dtype=torch.float64).to(dtype)
    kv = torch.randn(n, D_QK, generator=generator, dtype=torch.float64).to(dtype)
    indices = torch.full((t, k), -1, dtype=torch.int32)
    for i in range(1, t):
        slots = torch.randperm(n, generator=generator)[:k].to(torch.int32)
        drop = torch.rand(k, generator=generator) < 0.2
        indices[i] = torch.where(drop, torch.full_like(slots, -1), slots)
    topk_length = torch.randint(0, k + 3, (t,), generator=generator, dtype=torch.int32)
    sink = torch.randn(h, generator=generator, dtype=torch.float64).float() + 0.5
    grad_out = torch.randn(t, h, D_V, generator=generator, dtype=torch.float64)
    grad_lse = torch.randn(t, h, generator=generator, dtype=torch.float64)
    return q, kv, indices, topk_length, sink, grad_out, grad_lse


def valid_mask(indices, topk_length, n):
    """bool [T, N]: the slots each row reads (SPEC §8)."""
    t, k = indices.shape
    mask = torch.zeros(t, n, dtype=torch.bool)
    for i in range(t):
        length = k if topk_length is None else max(0, min(k, int(topk_length[i])))
        for s in indices[i, :length].tolist():
            if 0 <= s < n:
                mask[i, s] = True
    return mask


def dense_reference(q, kv, indices, topk_length, sink, scale):
    """(out [T, H, 512], lse [T, H]) in float64 from dense scores [T, H, N]; differentiable by torch's autograd."""
    mask = valid_mask(indices, topk_length, kv.shape[0])
    scores = torch.einsum("thd,nd->thn", q.double(), kv.double()) * scale
    scores = scores.masked_fill(~mask[:, None, :], float("-inf"))
    empty = ~mask.any(-1)[:, None, None]                                # [T, 1, 1]
    lse = torch.logsumexp(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty[..., 0], float("-inf"))
    if sink is None:
        p = torch.softmax(scores.masked_fill(empty, 0.0), dim=-1)
    else:  # the sink: one more logit per head in the softmax, no value
        column = sink.double()[None, :, None].expand(scores.shape[0], -1, 1)
        p = torch.softmax(torch.cat([scores.masked_fill(empty, 0.0), column], dim=-1), dim=-1)[..., :-1]
    out = torch.einsum("thn,nd->thd", p.masked_fill(empty, 0.0), kv.double()[:, :D_V])
    return out, lse


def reference_gradients(q, kv, indices, topk_length, sink, grad_out, grad_lse, scale):
    leaves = [q.detach().double().requires_grad_(True), kv.detach().double().requires_grad_(True)]
    if sink is not None:
        leaves.append(sink.detach().double().requires_grad_(True))
    out, lse = dense_reference(leaves[0], leaves[1], indices, topk_length, leaves[2] if sink is not None else None,
                               scale)
    loss = (out * grad_out).sum()
    if grad_lse is not None:
        loss = loss + torch.where(torch.isfinite(lse), lse * grad_lse, torch.zeros_like(lse)).sum()
    grads = torch.autograd.grad(loss, leaves)
    return grads if sink is not None else (*grads, None)


def assert_close(got, want, relative=2e-4):
    bound = relative * (1.0 + float(want.abs().max()))
    error = float((got.double() - want).abs().max())
    assert error <= bound, f"max error {error} > {bound}"


@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_core_backward_matches_the_dense_reference(with_sink, with_lse, dtype):
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(1, dtype=dtype)
    scale = 0.07
    sink = sink if with_sink else None
    out, lse, _ = keysel.sparse_mla(q, kv, indices, scale=scale, attn_sink=sink, topk_length=length)
    dq, dkv, dsink = keysel.sparse_mla_backward(q, kv, indices, out, lse, grad_out.float(),
                                                grad_lse=grad_lse.float() if with_lse else None, scale=scale,
                                                attn_sink=sink, topk_length=length)
    assert dq.dtype == dkv.dtype == torch.float32 and dq.shape == q.shape and dkv.shape == kv.shape
    want = reference_gradients(q, kv, indices, length, sink, grad_out, grad_lse if with_lse else None, scale)
    for got, expected in zip((dq, dkv), want[:2]):
        assert float(expected.abs().max()) > 0.1  # not a comparison of zeros
        assert_close(got, expected)
    if with_sink:
        assert float(want[2].abs().max()) > 1e-2
        assert_close(dsink, want[2])
    else:
        assert dsink is None
    read = valid_mask(indices, length, kv.shape[0]).any(0)
    assert torch.all(dkv[~read] == 0) and torch.all(dq[0] == 0)  # unread slots, the empty row


def test_core_backward_takes_numpy_writes_in_place_and_is_deterministic():
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(2, t=17, h=4, n=40, k=24)
    qn, kvn, idn, ln, sn = (x.numpy() for x in (q, kv, indices, length, sink))
    out, lse, _ = keysel.sparse_mla(qn, kvn, idn, attn_sink=sn, topk_length=ln)
    grads = (np.full(qn.shape, 7.0, np.float32), np.full(kvn.shape, 7.0, np.float32), np.full(sn.shape, 7.0, np.float32))
    before = keysel.num_threads()
    try:
        keysel.set_num_threads(1)
        result = keysel.sparse_mla_backward(qn, kvn, idn, out, lse, grad_out.float().numpy(),
                                            grad_lse=grad_lse.float().numpy(), attn_sink=sn, topk_length=ln,
                                            grad_q=grads[0], grad_kv=grads[1], grad_attn_sink=grads[2])
        keysel.set_num_threads(3)
        again = keysel.sparse_mla_backward(qn, kvn, idn, out, lse, grad_out.float().numpy(),
                                           grad_lse=grad_lse.float().numpy(), attn_sink=sn, topk_length=ln)
    finally:
        keysel.set_num_threads(before)
    assert all(a is b for a, b in zip(result, grads))
    for a, b in zip(result, again):
        assert np.array_equal(a, b)
    want = reference_gradients(q, kv, indices, length, sink, grad_out, grad_lse, 1 / math.sqrt(D_QK))
    for got, expected in zip(grads, want):
        assert_close(torch.from_numpy(got), expected)


def test_core_backward_rejects_bad_input_naming_the_argument():
    q, kv, indices, length, sink, grad_out, _ = make_problem(3)
    out, lse, _ = keysel.sparse_mla(q, kv, indices, attn_sink=sink)
    pages = torch.zeros(1, 64, 656, dtype=torch.uint8)
    with pytest.raises(keysel.Error, match="kv"):
        keysel.sparse_mla_backward(q, pages, indices, out, lse, grad_out.float())
    with pytest.raises(keysel.Error, match="grad_attn_sink"):
        keysel.sparse_mla_backward(q, kv, indices, out, lse, grad_out.float(), grad_attn_sink=torch.zeros(3))
    with pytest.raises(keysel.Error, match="grad_kv"):
        keysel.sparse_mla_backward(q, kv, indices, out, lse, grad_out.float(), grad_kv=torch.zeros(5, D_QK))
    bad = indices.clone()
    bad[2, :2] = torch.tensor([4, 4], dtype=torch.int32)
    with pytest.raises(keysel.Error, match="indices"):
        keysel.sparse_mla_backward(q, kv, bad, out, lse, grad_out.float())
    with pytest.raises(keysel.Error, match="lse"):
        keysel.sparse_mla_backward(q, kv, indices, out, lse.double(), grad_out.float())


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("with_sink", [False, True])
def test_torch_sparse_mla_forward_and_gradients(backend, with_sink):
    """backend auto: keysel's CPU kernels; backend torch: the gather-based pure-torch version (what the forward
    runs on CUDA tensors)."""
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(4, t=7, h=2, n=31, k=11)
    sink = sink if with_sink else None
    leaves = [x.clone().requires_grad_(True) for x in (q, kv)] + ([sink.clone().requires_grad_(True)] if with_sink
                                                                  else [])
    with kt.options(backend=backend):
        out, lse = kt.sparse_mla(leaves[0], leaves[1], indices, topk_length=length,
                                 attn_sink=leaves[2] if with_sink else None, scale=0.06)
        assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.requires_grad
        live = torch.isfinite(lse)
        ((out * grad_out.float()).sum() + torch.where(live, lse * grad_lse.float(), torch.zeros_like(lse)).sum()
         ).backward()
    want_out, want_lse = dense_reference(q, kv, indices, length, sink, 0.06)
    assert_close(out.detach(), want_out, 1e-5)
    assert torch.equal(torch.isinf(lse.detach()), torch.isinf(want_lse))
    assert_close(lse.detach()[live], want_lse[live], 1e-5)
    want = reference_gradients(q, kv, indices, length, sink, grad_out, grad_lse, 0.06)
    for leaf, expected in zip(leaves, want):
        assert_close(leaf.grad, expected)


def test_unused_lse_or_out_gets_no_gradient_term():
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(5, t=5, h=2, n=17, k=6)
    for use in ("out", "lse"):
        leaves = [x.clone().requires_grad_(True) for x in (q, kv)]
        out, lse = kt.sparse_mla(*leaves, indices, topk_length=length, scale=0.06)
        loss = (out * grad_out.float()).sum() if use == "out" else torch.where(
            torch.isfinite(lse), lse * grad_lse.float(), torch.zeros_like(lse)).sum()
        loss.backward()
        want = reference_gradients(q, kv, indices, length, None, grad_out if use == "out" else 0 * grad_out,
                                   grad_lse if use == "lse" else None, 0.06)
        for leaf, expected in zip(leaves, want):
            assert_close(leaf.grad, expected)


def test_gradcheck_float64():
    """The gather-based torch backward (float64 tensors) against torch's numerical Jacobian of the same op."""
    q, kv, indices, length, sink, _, _ = make_problem(6, t=3, h=2, n=6, k=4, dtype=torch.float64)
    indices[1] = torch.tensor([5, -1, 0, 2], dtype=torch.int32)
    leaves = (q.clone().requires_grad_(True), kv.clone().requires_grad_(True),
              sink.double().clone().requires_grad_(True))

    def mla(q, kv, sink):
        out, lse = kt.sparse_mla(q, kv, indices, topk_length=length, attn_sink=sink, scale=0.05)
        return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    assert torch.autograd.gradcheck(mla, leaves, eps=1e-6, atol=1e-6, rtol=1e-5, fast_mode=True)


def test_autograd_function_of_older_torches():
    """The torch.autograd.Function torch < 2.4 uses (newer ones register the same backward on the custom op)."""
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(7, t=4, h=2, n=13, k=5)
    leaves = [x.clone().requires_grad_(True) for x in (q, kv, sink)]
    out, lse = kt._SparseMlaFunction.apply(leaves[0], leaves[1], indices, length, leaves[2], 0.06)
    ((out * grad_out.float()).sum() + torch.where(torch.isfinite(lse), lse * grad_lse.float(),
                                                  torch.zeros_like(lse)).sum()).backward()
    want = reference_gradients(q, kv, indices, length, sink, grad_out, grad_lse, 0.06)
    for leaf, expected in zip(leaves, want):
        assert_close(leaf.grad, expected)


@pytest.mark.skipif(not kt.ops_registered(),
                    reason=f"torch.ops.keysel.* and torch.library.opcheck need torch >= 2.4 (this is {torch.__version__})")
def test_opcheck_of_the_differentiable_op_and_its_backward():
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(8, t=4, h=2, n=13, k=5)
    leaves = [x.clone().requires_grad_(True) for x in (q, kv, sink)]
    torch.library.opcheck(torch.ops.keysel.sparse_mla.default, (leaves[0], leaves[1], indices, length, leaves[2], 0.06))
    out, lse = kt.sparse_mla(q, kv, indices, topk_length=length, attn_sink=sink, scale=0.06)
    torch.library.opcheck(torch.ops.keysel.sparse_mla_backward.default,
                          (q, kv, indices, length, sink, out, lse, grad_out.float(), grad_lse.float(), 0.06))


CUDA_KERNELS = torch.cuda.is_available() and keysel.built_with_cuda()
needs_cuda = pytest.mark.skipif(not CUDA_KERNELS, reason="no CUDA GPU here, or keysel built without CUDA: the "
                                "GPU backward runs on the GPU machine (bench/gpu/run.sh python)")


def cuda_problem(seed, dtype, t=37, h=16, n=150, k=61):
    """make_problem's tensors at awkward sizes, with out-of-range and negative slots besides -1 (invalid on the
    GPU: the reference's valid_mask skips them too)."""
    q, kv, indices, length, sink, grad_out, grad_lse = make_problem(seed, t=t, h=h, n=n, k=k, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 1000)
    odd = torch.rand(t, k, generator=generator)
    indices = torch.where(odd < 0.05, torch.full_like(indices, n + 3), indices)
    indices = torch.where((odd >= 0.05) & (odd < 0.1), torch.full_like(indices, -9), indices)
    length[1] = -2
    return q, kv, indices, length, sink, grad_out, grad_lse


@needs_cuda
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("with_lse", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backward_matches_the_dense_reference(with_sink, with_lse, dtype):
    """keysel.sparse_mla_backward on CUDA tensors (keysel's GPU kernel) against the float64 reference, from the
    float64 forward's out (in q's dtype) and lse; two runs give the same bits."""
    q, kv, indices, length, sink, grad_out, grad_lse = cuda_problem(11, dtype)
    sink = sink if with_sink else None
    scale = 0.06
    out, lse = dense_reference(q, kv, indices, length, sink, scale)
    cuda = torch.device("cuda")
    args = [x.to(cuda) for x in (q, kv, indices)] + [out.to(dtype).to(cuda), lse.float().to(cuda),
                                                     grad_out.to(dtype).to(cuda)]
    options = dict(grad_lse=grad_lse.float().to(cuda) if with_lse else None, scale=scale,
                   attn_sink=None if sink is None else sink.to(cuda), topk_length=length.to(cuda))
    dq, dkv, dsink = keysel.sparse_mla_backward(*args, **options)
    assert dq.device.type == "cuda" and dq.dtype == dkv.dtype == torch.float32
    want = reference_gradients(q, kv, indices, length, sink, grad_out.to(dtype), grad_lse if with_lse else None,
                               scale)
    relative = 2e-4 if dtype == torch.float32 else 3e-2  # bf16 out enters Delta rounded
    for got, expected in zip((dq, dkv), want[:2]):
        assert float(expected.abs().max()) > 0.1  # not a comparison of zeros
        assert_close(got.cpu(), expected, relative)
    if with_sink:
        assert_close(dsink.cpu(), want[2], relative)
    else:
        assert dsink is None
    read = valid_mask(indices, length, kv.shape[0]).any(0)
    assert torch.all(dkv.cpu()[~read] == 0) and torch.all(dq.cpu()[0] == 0)
    again = keysel.sparse_mla_backward(*args, **options)
    for a, b in zip((dq, dkv, dsink), again):
        assert (a is None and b is None) or torch.equal(a, b)


@needs_cuda
def test_cuda_backward_takes_a_float32_out_of_a_bfloat16_forward():
    """keysel.sparse_mla returns a float32 out by default for bfloat16 q and kv; the CUDA backward takes it."""
    q, kv, indices, length, sink, grad_out, grad_lse = cuda_problem(12, torch.bfloat16, h=3)
    cuda = torch.device("cuda")
    qc, kvc, ic, lc, sc = (x.to(cuda) for x in (q, kv, indices, length, sink))
    out, lse, _ = keysel.sparse_mla(qc, kvc, ic, scale=0.06, attn_sink=sc, topk_length=lc)
    assert out.dtype == torch.float32
    dq, dkv, dsink = keysel.sparse_mla_backward(qc, kvc, ic, out, lse, grad_out.float().to(cuda),
                                                grad_lse=grad_lse.float().to(cuda), scale=0.06, attn_sink=sc,
                                                topk_length=lc)
    want = reference_gradients(q, kv, indices, length, sink, grad_out.float(), grad_lse, 0.06)
    # The forward's bf16 tensor-core products move out and lse by about 2^-9 relative.
    for got, expected in zip((dq, dkv, dsink), want):
        assert_close(got.cpu(), expected, 3e-2)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_sparse_mla_backward_on_cuda_runs_keysel_kernel(dtype, monkeypatch):
    """keysel.torch.sparse_mla on CUDA tensors: the forward is the gather-based torch version, the backward keysel's
    CUDA kernel (the gather-based backward is made to fail); gradients into q, kv and attn_sink against the float64
    reference, through out and lse."""
    q, kv, indices, length, sink, grad_out, grad_lse = cuda_problem(13, dtype)

    def no_fallback(*args, **kwargs):
        raise AssertionError("the gather-based backward ran on CUDA tensors keysel's kernel takes")

    monkeypatch.setattr(kt._fallback, "sparse_mla_backward", no_fallback)
    cuda = torch.device("cuda")
    leaves = [q.to(cuda).requires_grad_(True), kv.to(cuda).requires_grad_(True), sink.to(cuda).requires_grad_(True)]
    out, lse = kt.sparse_mla(leaves[0], leaves[1], indices.to(cuda), topk_length=length.to(cuda),
                             attn_sink=leaves[2], scale=0.06)
    assert out.dtype == dtype and lse.dtype == torch.float32
    go = grad_out.to(dtype).to(cuda)
    glse = grad_lse.float().to(cuda)
    loss = (out.float() * go.float()).sum() + torch.where(torch.isfinite(lse), lse * glse,
                                                          torch.zeros_like(lse)).sum()
    loss.backward()
    want = reference_gradients(q, kv, indices, length, sink, grad_out.to(dtype), grad_lse.float(), 0.06)
    relative = 2e-4 if dtype == torch.float32 else 3e-2
    for leaf, expected in zip(leaves, want):
        assert leaf.grad.dtype == leaf.dtype
        assert_close(leaf.grad.float().cpu(), expected, relative)

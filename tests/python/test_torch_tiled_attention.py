"""keysel's tiled tensor-core CUDA kernels from Python: keysel.sparse_attention_prefill (the forward),
keysel.sparse_attention_backward(..., deterministic=False) and keysel.torch.sparse_attention's use of both on
bfloat16 CUDA tensors, against the float64 masked-softmax reference of test_torch_backward.py (dense scores, -inf
outside the selection, differentiated by torch's autograd).

Tolerances: the inputs are bfloat16 and the reference reads the same rounded values; the kernels round P and dS
to bfloat16 (at most 2^-8 relative per term) and accumulate in float32, and out enters Delta rounded to bfloat16,
so an element's error is at most 2^-7 of the sum of its terms' absolute values. With unit-variance inputs and at
most a few dozen terms per element that sum stays within a few times the largest gradient: 3e-2 relative to the
largest value (the bound of the other bfloat16 CUDA tests; a PyTorch emulation of the kernels' roundings on these
shapes stayed below 0.14 of it), lse within 1e-4 (1 + |lse|). A wrong term moves values by O(1).

The CUDA cases skip without a GPU (or without keysel's CUDA build) and say so; the CPU cases check the plumbing of
the `deterministic` argument everywhere.
"""
import pytest
import torch

import keysel
import keysel.torch as kt
from test_torch_backward import (assert_close, make_problem, masked_lse_scores, masked_reference,  # noqa: E402
                                 reference_gradients)

CUDA_KERNELS = torch.cuda.is_available() and keysel.built_with_cuda()
needs_cuda = pytest.mark.skipif(not CUDA_KERNELS, reason="no CUDA GPU here, or keysel built without CUDA: the "
                                "tiled kernels run on the GPU machine (bench/gpu/run.sh python)")


def test_deterministic_argument_on_cpu_tensors():
    """CPU tensors take deterministic= everywhere and run the (deterministic) CPU kernel either way."""
    q, k, v, sel, grad_out = make_problem(31, granularity="per_token")
    out, lse = keysel.sparse_attention(q, k, v, sel, granularity="per_token")
    one = keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity="per_token")
    two = keysel.sparse_attention_backward(q, k, v, sel, out, lse, grad_out.float(), granularity="per_token",
                                           deterministic=False)
    for a, b in zip(one, two):
        assert torch.equal(a, b)
    grads = []
    for deterministic in (None, True, False):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out, _ = kt.sparse_attention(*leaves, sel, granularity="per_token", scale=0.5, deterministic=deterministic)
        out.backward(grad_out.float())
        grads.append([leaf.grad for leaf in leaves])
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)
    assert not keysel.sparse_attention_prefill_supported(q.bfloat16(), k.bfloat16(), v.bfloat16(), sel,
                                                         granularity="per_token")
    with pytest.raises(keysel.Error):
        keysel.sparse_attention_prefill(q.bfloat16(), k.bfloat16(), v.bfloat16(), sel, granularity="per_token")


@needs_cuda
@pytest.mark.parametrize("granularity", ["per_kv_head", "per_token"])
@pytest.mark.parametrize("dims", [(64, 64), (128, 64), (64, 128)])
def test_prefill_matches_the_masked_softmax_reference(granularity, dims):
    """keysel.sparse_attention_prefill on bf16 CUDA tensors (T = 70: a partial last tile) against float64; float32
    and bfloat16 out; two runs give the same bits (no atomics)."""
    d, dv = dims
    q, k, v, sel, _ = make_problem(32, t=70, n=150, hq=8, hkv=2, d=d, dv=dv, width=29, granularity=granularity,
                                   dtype=torch.bfloat16)
    cuda = torch.device("cuda")
    args = [x.to(cuda) for x in (q, k, v, sel)]
    assert keysel.sparse_attention_prefill_supported(*args, granularity=granularity)
    out, lse = keysel.sparse_attention_prefill(*args, granularity=granularity, scale=0.2)
    assert out.dtype == torch.float32 and out.device.type == "cuda"
    want_out = masked_reference(q, k, v, sel, granularity, 0.2)
    assert_close(out.cpu(), want_out, 2e-2)
    want_lse = torch.logsumexp(masked_lse_scores(q, k, sel, granularity, 0.2), dim=-1)
    finite = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), finite)
    assert torch.all((lse.cpu()[finite].double() - want_lse[finite]).abs() <= 1e-4 * (1 + want_lse[finite].abs()))
    out_bf16 = torch.empty(out.shape, dtype=torch.bfloat16, device=cuda)
    keysel.sparse_attention_prefill(*args, granularity=granularity, scale=0.2, out=out_bf16)
    assert_close(out_bf16.float().cpu(), want_out, 2e-2)
    again, _ = keysel.sparse_attention_prefill(*args, granularity=granularity, scale=0.2)
    assert torch.equal(out, again)


@needs_cuda
def test_prefill_refuses_shapes_it_does_not_take_naming_the_argument():
    q, k, v, sel, _ = make_problem(33, t=20, n=40, hq=6, hkv=2, d=64, dv=64, width=7, dtype=torch.bfloat16)
    cuda = torch.device("cuda")
    args = [x.to(cuda) for x in (q, k, v, sel)]
    assert not keysel.sparse_attention_prefill_supported(*args)
    with pytest.raises(keysel.Error, match="'q'"):  # Hq / Hkv = 3 does not divide 64
        keysel.sparse_attention_prefill(*args)
    with pytest.raises(keysel.Error, match="'q'"):  # float32
        keysel.sparse_attention_prefill(args[0].float(), args[1].float(), args[2].float(), args[3])


@needs_cuda
@pytest.mark.parametrize("granularity", ["per_kv_head", "per_token"])
def test_nondeterministic_backward_matches_the_masked_softmax_reference(granularity):
    """keysel.sparse_attention_backward(..., deterministic=False) on bf16 CUDA tensors (the tiled kernel), with and
    without grad_lse, against float64."""
    q, k, v, sel, grad_out = make_problem(34, t=70, n=150, hq=8, hkv=1, d=128, dv=64, width=29,
                                          granularity=granularity, dtype=torch.bfloat16)
    grad_lse = torch.randn(70, 8, generator=torch.Generator().manual_seed(35), dtype=torch.float64)
    out = masked_reference(q, k, v, sel, granularity, 0.3)
    lse = torch.logsumexp(masked_lse_scores(q, k, sel, granularity, 0.3), dim=-1).float()
    cuda = torch.device("cuda")
    args = (q.to(cuda), k.to(cuda), v.to(cuda), sel.to(cuda), out.to(torch.bfloat16).to(cuda).contiguous(),
            lse.to(cuda), grad_out.to(torch.bfloat16).to(cuda))
    for glse in (None, grad_lse.float()):
        got = keysel.sparse_attention_backward(*args, granularity=granularity, scale=0.3, deterministic=False,
                                               grad_lse=None if glse is None else glse.to(cuda))
        want = reference_gradients(q, k, v, sel, grad_out.to(torch.bfloat16), granularity, 0.3, glse)
        for g, expected in zip(got, want):
            assert g.device.type == "cuda" and g.dtype == torch.float32
            assert_close(g.cpu(), expected, 3e-2)


@needs_cuda
@pytest.mark.parametrize("granularity", ["per_kv_head", "per_token"])
def test_torch_attention_runs_the_tiled_kernels(granularity, monkeypatch):
    """keysel.torch.sparse_attention on bf16 CUDA tensors with T >= 64: the tiled forward (the decode path and the
    gather-based fallbacks made to fail) and the tiled backward (deterministic=False reaches keysel), through out
    and lse, against float64."""
    q, k, v, sel, grad_out = make_problem(36, t=70, n=150, hq=8, hkv=2, d=64, dv=64, width=29,
                                          granularity=granularity, dtype=torch.bfloat16)
    grad_lse = torch.randn(70, 8, generator=torch.Generator().manual_seed(37), dtype=torch.float64)

    def fail(*args, **kwargs):
        raise AssertionError("a path other than keysel's tiled kernels ran")

    monkeypatch.setattr(kt, "_sparse_attention_cuda", fail)
    monkeypatch.setattr(kt._fallback, "sparse_attention", fail)
    monkeypatch.setattr(kt._fallback, "sparse_attention_backward", fail)
    seen = []
    backward = keysel.sparse_attention_backward

    def recording_backward(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return backward(*args, **kwargs)

    monkeypatch.setattr(keysel, "sparse_attention_backward", recording_backward)
    cuda = torch.device("cuda")
    leaves = [x.to(cuda).requires_grad_(True) for x in (q, k, v)]
    out, lse = kt.sparse_attention(*leaves, sel.to(cuda), granularity=granularity, scale=0.125)
    assert out.dtype == torch.bfloat16
    glse = grad_lse.float().to(cuda)
    loss = (out.float() * grad_out.to(torch.bfloat16).float().to(cuda)).sum() + torch.where(
        torch.isfinite(lse), lse * glse, torch.zeros_like(lse)).sum()
    loss.backward()
    assert seen == [False]
    assert_close(out.detach().float().cpu(), masked_reference(q, k, v, sel, granularity, 0.125), 2e-2)
    want = reference_gradients(q, k, v, sel, grad_out.to(torch.bfloat16), granularity, 0.125, grad_lse.float())
    for leaf, expected in zip(leaves, want):
        assert leaf.grad.dtype == torch.bfloat16
        assert_close(leaf.grad.float().cpu(), expected, 3e-2)


@needs_cuda
def test_torch_attention_is_deterministic_when_asked(monkeypatch):
    """deterministic=True, or torch.use_deterministic_algorithms(True) with the default None, runs keysel's
    deterministic CUDA backward: two runs give the same bits."""
    q, k, v, sel, grad_out = make_problem(38, t=70, n=150, hq=8, hkv=2, d=64, dv=64, width=29,
                                          dtype=torch.bfloat16)
    seen = []
    backward = keysel.sparse_attention_backward

    def recording_backward(*args, **kwargs):
        seen.append(kwargs.get("deterministic"))
        return backward(*args, **kwargs)

    monkeypatch.setattr(keysel, "sparse_attention_backward", recording_backward)
    cuda = torch.device("cuda")

    def gradients(deterministic):
        leaves = [x.to(cuda).requires_grad_(True) for x in (q, k, v)]
        out, _ = kt.sparse_attention(*leaves, sel.to(cuda), deterministic=deterministic)
        out.backward(grad_out.to(torch.bfloat16).to(cuda))
        return [leaf.grad for leaf in leaves]

    first, second = gradients(True), gradients(True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
        gradients(None)
    finally:
        torch.use_deterministic_algorithms(before)
    gradients(None)
    assert seen == [True, True, True, before]


@needs_cuda
def test_torch_attention_takes_the_decode_kernel_below_the_tile_threshold(monkeypatch):
    """T < keysel.torch.TILED_MIN_TOKENS: the forward runs the decode kernel, not the tiled one."""
    q, k, v, sel, _ = make_problem(39, t=kt.TILED_MIN_TOKENS - 1, n=90, hq=8, hkv=2, d=64, dv=64, width=13,
                                   dtype=torch.bfloat16)

    def fail(*args, **kwargs):
        raise AssertionError("the tiled forward ran below the threshold")

    monkeypatch.setattr(kt, "_sparse_attention_prefill_cuda", fail)
    cuda = torch.device("cuda")
    out, _ = kt.sparse_attention(*(x.to(cuda) for x in (q, k, v, sel)), scale=0.125)
    assert_close(out.float().cpu(), masked_reference(q, k, v, sel, "per_kv_head", 0.125), 2e-2)

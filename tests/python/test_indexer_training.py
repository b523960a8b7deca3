"""The Lightning Indexer's training objectives (docs/SPEC.md §9.1): keysel.torch.indexer_kl_loss against a plain
NumPy float64 transcription written below and against keysel.indexer_kl_loss_reference (the C++ double reference,
loss and gradients), torch.autograd.gradcheck in float64, and the target computed from the main attention.
Every API used here exists in torch 1.13 (ctest's python.pytest_oldest_torch).
"""
import math

import numpy as np
import pytest
import torch

import keysel
import keysel.torch as kt


def numpy_loss(pbar, q, w, k, positions, selection=None, reduction="mean"):
    """SPEC §9.1 written out in float64 NumPy, one row at a time."""
    total, rows = 0.0, 0
    for t in range(q.shape[0]):
        if selection is None:
            keys = list(range(min(int(positions[t]) + 1, k.shape[0])))
        else:
            keys = [int(s) for s in np.asarray(selection).reshape(q.shape[0], -1)[t] if s >= 0]
        target = np.array([pbar[t, s] for s in keys])
        if not keys or target.sum() <= 0:
            continue
        target = target / target.sum()
        scores = np.array([(w[t] * np.maximum(q[t] @ k[s], 0.0)).sum() for s in keys])
        log_q = scores - scores.max() - np.log(np.exp(scores - scores.max()).sum())
        nz = target > 0
        total += float((target[nz] * (np.log(target[nz]) - log_q[nz])).sum())
        rows += 1
    return total / max(rows, 1) if reduction == "mean" else total


def make_problem(seed, t=6, n=14, hi=3, di=5, hq=4, hkv=2, d=8, width=5):
    g = torch.Generator().manual_seed(seed)
    index_q = torch.randn(t, hi, di, generator=g, dtype=torch.float64)
    index_w = torch.randn(t, hi, generator=g, dtype=torch.float64)
    index_k = torch.randn(n, di, generator=g, dtype=torch.float64)
    q = torch.randn(t, hq, d, generator=g, dtype=torch.float64)
    k_cache = torch.randn(n, hkv, d, generator=g, dtype=torch.float64)
    positions = torch.tensor([n - 1, 4, 0, n + 3, 9, 2][:t], dtype=torch.int32)
    selection = torch.full((t, width), -1, dtype=torch.int32)
    for i in range(t):
        allowed = min(int(positions[i]) + 1, n)
        count = 0 if i == 2 else min(width, allowed)  # row 2 selects nothing
        selection[i, :count] = torch.randperm(allowed, generator=g)[:count].to(torch.int32)
    return index_q, index_w, index_k, q, k_cache, positions, selection


def main_pbar(q, k_cache, positions, scale):
    """The per_token head mean of the main attention's probabilities, written out."""
    t, hq, _ = q.shape
    n, hkv, _ = k_cache.shape
    pbar = np.zeros((t, n))
    for i in range(t):
        allowed = min(int(positions[i]) + 1, n)
        for h in range(hq):
            logits = np.array([float(q[i, h] @ k_cache[s, h // (hq // hkv)]) * scale for s in range(allowed)])
            p = np.exp(logits - logits.max())
            pbar[i, :allowed] += p / p.sum() / hq
    return pbar


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_gradients_match_the_references(sparse, reduction):
    index_q, index_w, index_k, q, k_cache, positions, selection = make_problem(1)
    sel = selection if sparse else None
    pbar = main_pbar(q.numpy(), k_cache.numpy(), positions.numpy(), 1 / math.sqrt(8))
    leaves = [x.clone().requires_grad_(True) for x in (index_q, index_w, index_k)]
    loss = kt.indexer_kl_loss(*leaves, (q, k_cache), positions, sel, reduction=reduction)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    want = numpy_loss(pbar, index_q.numpy(), index_w.numpy(), index_k.numpy(), positions.numpy(),
                      None if sel is None else sel.numpy(), reduction)
    assert want > 0.05
    assert abs(float(loss.detach()) - want) <= 1e-10 * (1 + want)
    loss.backward()
    ref_loss, *ref_grads = keysel.indexer_kl_loss_reference(pbar, index_q.numpy(), index_w.numpy(),
                                                            index_k.numpy(), positions.numpy(),
                                                            None if sel is None else sel.numpy(),
                                                            reduction=reduction)
    assert abs(ref_loss - want) <= 1e-10 * (1 + want)
    for leaf, ref in zip(leaves, ref_grads):
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(leaf.grad.numpy(), ref, rtol=1e-9, atol=1e-12)


def test_target_given_as_probabilities_equals_target_from_q_and_k():
    index_q, index_w, index_k, q, k_cache, positions, selection = make_problem(2)
    pbar = torch.from_numpy(main_pbar(q.numpy(), k_cache.numpy(), positions.numpy(), 0.3))
    a = kt.indexer_kl_loss(index_q, index_w, index_k, pbar, positions, selection)
    b = kt.indexer_kl_loss(index_q, index_w, index_k, (q, k_cache), positions, selection, scale=0.3)
    assert abs(float(a) - float(b)) <= 1e-12


@pytest.mark.parametrize("sparse", [False, True])
def test_gradcheck_float64(sparse):
    index_q, index_w, index_k, q, k_cache, positions, selection = make_problem(3, t=4, n=7, hi=2, di=3, width=3)
    pbar = torch.from_numpy(main_pbar(q.numpy(), k_cache.numpy(), positions.numpy(), 0.4))
    leaves = tuple(x.clone().requires_grad_(True) for x in (index_q, index_w, index_k))

    def loss(a, b, c):
        return kt.indexer_kl_loss(a, b, c, pbar, positions, selection if sparse else None)

    assert torch.autograd.gradcheck(loss, leaves, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_no_gradient_reaches_the_main_attention_and_float32_is_close():
    index_q, index_w, index_k, q, k_cache, positions, selection = make_problem(4)
    q = q.clone().requires_grad_(True)
    leaves = [x.float().requires_grad_(True) for x in (index_q, index_w, index_k)]
    loss = kt.indexer_kl_loss(*leaves, (q, k_cache), positions, selection)
    assert loss.dtype == torch.float32
    loss.backward()
    assert q.grad is None
    exact = kt.indexer_kl_loss(index_q, index_w, index_k, (q, k_cache), positions, selection)
    assert abs(float(loss.detach()) - float(exact)) <= 1e-5 * (1 + float(exact))


def test_loss_is_zero_when_the_indexer_matches_the_target():
    # One channel, w = 1, qI = 1: I[t, s] = ReLU(kI[s]); the target softmax of it over each row's allowed keys.
    index_k = torch.tensor([[0.3], [-0.2], [1.7], [0.9]], dtype=torch.float64, requires_grad=True)
    index_q = torch.ones(2, 1, 1, dtype=torch.float64)
    index_w = torch.ones(2, 1, dtype=torch.float64)
    positions = torch.tensor([3, 1], dtype=torch.int32)
    e = torch.exp(torch.relu(index_k.detach()[:, 0]))
    pbar = torch.stack([e / e.sum(), torch.cat([e[:2] / e[:2].sum(), torch.zeros(2, dtype=torch.float64)])])
    loss = kt.indexer_kl_loss(index_q, index_w, index_k, pbar, positions)
    loss.backward()
    assert abs(float(loss.detach())) <= 1e-15
    assert float(index_k.grad.abs().max()) <= 1e-15


def test_bad_input():
    index_q, index_w, index_k, q, k_cache, positions, selection = make_problem(5)
    with pytest.raises(ValueError, match="reduction"):
        kt.indexer_kl_loss(index_q, index_w, index_k, (q, k_cache), positions, reduction="max")
    with pytest.raises(ValueError, match="target"):
        kt.indexer_kl_loss(index_q, index_w, index_k, torch.zeros(6, 3), positions)
    with pytest.raises(keysel.Error, match="weights"):
        keysel.indexer_kl_loss_reference(np.zeros((6, 14)), index_q.numpy(), np.zeros((6, 2)), index_k.numpy(),
                                         positions.numpy())

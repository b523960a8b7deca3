"""The attention of top-k fine-tuning in tools/train_tiny_lm.py (masked dense attention: the selection without
gradient, -inf outside it) against keysel.torch.topk_attention, and its batched indexer loss against
keysel.torch.indexer_kl_loss: outputs and gradients on small random inputs of awkward sizes, in float64."""
import math

import pytest

torch = pytest.importorskip("torch")

import keysel.torch as kt  # noqa: E402
from conftest import SDPA_TAKES_GQA, load_training_module  # noqa: E402

pytestmark = pytest.mark.skipif(not SDPA_TAKES_GQA, reason="tools/train_tiny_lm.py needs torch >= 2.5 "
                                "(scaled_dot_product_attention with enable_gqa)")


TRAIN = load_training_module() if SDPA_TAKES_GQA else None
B, HQ, HKV, T, D = 2, 6, 2, 37, 8
HI, DI = 3, 5


def random_inputs(seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, HQ, T, D, generator=gen, dtype=torch.float64) * 1.5
    k = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64) * 1.5
    v = torch.randn(B, HKV, T, D, generator=gen, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)]


def indexer_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    iq = torch.randn(B, T, HI, DI, generator=gen, dtype=torch.float64)
    ik = torch.randn(B, T, DI, generator=gen, dtype=torch.float64)
    iw = torch.randn(B, T, HI, generator=gen, dtype=torch.float64)
    return iq, ik, iw


def index_scores(iq, ik, iw):
    """I[b, t, s] = sum_j w[b, t, j] ReLU(qI[b, t, j] . kI[b, s]) (SPEC section 3)."""
    return torch.einsum("bths,bth->bts", torch.relu(torch.einsum("bthd,bsd->bths", iq, ik)), iw)


def masked(q, k, v, scores, k_top):
    mask = TRAIN.topk_selection_mask(scores, k_top)
    return TRAIN.masked_topk_attention(q, k, v, mask, 1.0 / math.sqrt(D)), mask


@pytest.mark.parametrize("k_top", [1, 5, 16, T + 3])
def test_exact_topk_matches_keysel(k_top):
    q, k, v = random_inputs(10 + k_top)
    pbar = TRAIN.head_mean_attention(q, k, 1.0 / math.sqrt(D))
    assert not pbar.requires_grad
    ours, mask = masked(q, k, v, pbar, k_top)
    # each row reads min(k, t + 1) keys, all causal
    assert torch.equal(mask[:, 0].sum(-1), torch.clamp(torch.arange(1, T + 1), max=k_top).expand(B, T))
    assert not (mask[:, 0] & ~TRAIN.causal_mask(T, "cpu")).any()
    q2, k2, v2 = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = kt.topk_attention(q2, k2, v2, k=k_top, granularity="per_token", selector="exact")
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    grad = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ours.backward(grad)
    ref.backward(grad)
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("k_top", [3, 11])
def test_indexer_topk_matches_keysel(k_top):
    q, k, v = random_inputs(20 + k_top)
    iq, ik, iw = indexer_tensors(30 + k_top)
    ours, _ = masked(q, k, v, index_scores(iq, ik, iw), k_top)
    q2, k2, v2 = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref = kt.topk_attention(q2, k2, v2, k=k_top, granularity="per_token", selector={"type": "indexer",
                            "format": "fp32"}, indexer=(iq.float(), ik.float(), iw.float()))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-12)
    ours.sum().backward()
    ref.sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("sparse", [False, True])
def test_indexer_loss_matches_keysel(sparse):
    q, k, _ = random_inputs(40)
    q, k = q.detach(), k.detach()
    iq, ik, iw = [x.requires_grad_() for x in indexer_tensors(41)]
    scores = index_scores(iq, ik, iw)
    pbar = TRAIN.head_mean_attention(q, k, 1.0 / math.sqrt(D))
    allowed = TRAIN.topk_selection_mask(scores, 7) if sparse else TRAIN.causal_mask(T, "cpu").expand(B, 1, T, T)
    ours = TRAIN.indexer_kl(scores, pbar, allowed)
    ours.backward()
    ref_total = torch.zeros((), dtype=torch.float64)
    grads = []
    for b in range(B):
        jq, jk, jw = [x.detach()[b].clone().requires_grad_() for x in (iq, ik, iw)]
        selection = None
        if sparse:  # [T, W] key positions, ascending, -1 padded
            rows = allowed[b, 0]
            selection = torch.full((T, 7), -1, dtype=torch.int32)
            for t in range(T):
                keys = rows[t].nonzero()[:, 0]
                selection[t, :len(keys)] = keys.int()
        loss = kt.indexer_kl_loss(jq, jw, jk, pbar[b], torch.arange(T, dtype=torch.int32), selection)
        loss.backward()
        ref_total = ref_total + loss.detach()
        grads.append((jq.grad, jk.grad, jw.grad))
    # every row has keys and mass here, so the batch mean is the mean of the per-sequence means
    torch.testing.assert_close(ours.detach(), ref_total / B, rtol=1e-10, atol=1e-12)
    for b in range(B):
        for ours_grad, ref_grad in zip((iq.grad[b], ik.grad[b], iw.grad[b]), grads[b]):
            torch.testing.assert_close(ours_grad, ref_grad / B, rtol=1e-8, atol=1e-11)


def test_training_attention_trains_the_indexer_only_through_its_loss():
    """TrainingAttention in a tiny model: the LM loss's gradient leaves the indexer untouched, the indexer's
    loss (run inside the forward pass) reaches only the indexer, and top-k with k >= T equals full attention."""
    cfg = TRAIN.Config(d_model=24, layers=2, heads=4, kv_heads=2, head_dim=6, ffn_dim=32, context=64,
                       index_heads=2, index_dim=4)
    torch.manual_seed(5)
    model = TRAIN.TinyLM(cfg).double()
    tokens = torch.randint(0, 256, (2, 29))
    full = model(tokens, exact=True)
    with torch.no_grad():
        wide = model(tokens, attention=TRAIN.TrainingAttention(cfg, "topk", k=64, selector="indexer"))
    torch.testing.assert_close(wide, full.detach(), rtol=1e-10, atol=1e-12)
    attention = TRAIN.TrainingAttention(cfg, "topk", k=5, selector="indexer", indexer_loss="sparse")
    logits = model(tokens, attention=attention)
    assert len(attention.losses) == cfg.layers and all(loss > 0 for loss in attention.losses)
    index_grads = {n: p.grad.clone() for n, p in model.named_parameters() if "indexer" in n}
    assert all(g.abs().sum() > 0 for g in index_grads.values())
    assert all(p.grad is None for n, p in model.named_parameters() if "indexer" not in n)
    logits.float().logsumexp(-1).mean().backward()
    for n, p in model.named_parameters():
        if "indexer" in n:
            assert torch.equal(p.grad, index_grads[n])
        else:
            assert p.grad is not None

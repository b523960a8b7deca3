"""attn_implementation="keysel_topk" in a Hugging Face decoder: a small randomly initialised Llama built from a
LlamaConfig (nothing is downloaded: HF_HUB_OFFLINE=1), against eager attention (k >= N) and against a plain
float64 torch reference registered as its own attention implementation, that masks all but the exact top-k keys
of each query and group (k < N), in prefill, in generate() decoding through the KV cache, and with left padding.
"""
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402

# The CI run against the oldest supported torch (Debian's python3-torch 1.13, ctest's python.pytest_oldest_torch)
# has no transformers: transformers 5.x, which keysel_topk is written against, needs a far newer torch.
pytest.importorskip("transformers", reason="transformers is not installed for this Python (the Hugging Face "
                                          "integration is tested with transformers 5.x, python/requirements.txt)")

from transformers import AttentionInterface, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: E402

import keysel.torch as kt  # noqa: E402

GRANULARITIES = ("per_head", "per_kv_head", "per_token")
REFERENCE = {"k": None, "granularity": "per_kv_head", "allowed": None}


# ----------------------------------------------------------------------------------------------- the reference


def reference_allowed(attention_mask, b, t, n):
    """bool [B, T, N] from what transformers passes (None: causal, queries at the last T positions)."""
    if attention_mask is None:  # SDPA's is_causal: aligned top-left for T > 1 (T == N, or a static cache's
        s = torch.arange(n)     # prefill), every key for T == 1
        first = n - 1 if t == 1 else 0
        return (s[None, :] <= (first + torch.arange(t))[:, None]).expand(b, t, n)
    mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
    return mask[:, 0].expand(b, t, n)


def reference_topk_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain torch in float64: logits, softmax over the allowed keys, group means, the k largest, masked softmax."""
    b, hq, t, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    g = hq // hkv
    logits = torch.matmul(query.double(), key.double().repeat_interleave(g, 1).transpose(-1, -2)) * scaling
    allowed = reference_allowed(attention_mask, b, t, n)[:, None]                 # [B, 1, T, N]
    if REFERENCE["allowed"] is not None:
        allowed = allowed & REFERENCE["allowed"](t, n)
    p = torch.softmax(logits.masked_fill(~allowed, -math.inf), dim=-1).nan_to_num(0.0)
    granularity = REFERENCE["granularity"]
    if granularity == "per_head":
        pbar, expand = p, (lambda m: m)
    elif granularity == "per_kv_head":
        pbar = p.view(b, hkv, g, t, n).mean(2)
        expand = lambda m: m.repeat_interleave(g, 1)  # noqa: E731
    else:
        pbar = p.mean(1, keepdim=True)
        expand = lambda m: m.expand(b, hq, t, n)  # noqa: E731
    k = min(REFERENCE["k"], n)
    top = pbar.masked_fill(~allowed, -1.0).topk(k, dim=-1).indices
    chosen = torch.zeros_like(pbar, dtype=torch.bool).scatter_(-1, top, True) & allowed
    probs = torch.softmax(logits.masked_fill(~expand(chosen), -math.inf), dim=-1).nan_to_num(0.0)
    out = torch.matmul(probs, value.double().repeat_interleave(g, 1)).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register("reference_topk", reference_topk_forward)
AttentionMaskInterface.register("reference_topk", sdpa_mask)


# ----------------------------------------------------------------------------------------------- the model


def small_llama(seed=0, **config):
    settings = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    settings.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    return model


def tokens(b, t, seed=0):
    return torch.randint(3, 101, (b, t), generator=torch.Generator().manual_seed(seed))


def logits_with(model, implementation, ids, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture(autouse=True)
def fresh_settings():
    previous = kt.settings()
    yield
    kt.configure(**previous)
    REFERENCE.update(k=None, granularity="per_kv_head", allowed=None)


def use(k, granularity="per_kv_head", **kwargs):
    kt.configure(k=k, granularity=granularity, **kwargs)
    REFERENCE.update(k=k, granularity=granularity)


# ----------------------------------------------------------------------------------------------- tests


def test_configure_registers_the_attention_and_its_mask_function():
    kt.configure(k=8)
    assert AttentionInterface._global_mapping["keysel_topk"] is kt.transformers_attention
    assert AttentionMaskInterface._global_mapping["keysel_topk"] is sdpa_mask


def test_every_key_selected_gives_eager_logits():
    model = small_llama()
    ids = tokens(2, 24)
    use(24)
    eager = logits_with(model, "eager", ids)
    topk = logits_with(model, "keysel_topk", ids)
    torch.testing.assert_close(topk, eager, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_topk_prefill_matches_the_reference(granularity):
    model = small_llama(seed=1)
    ids = tokens(2, 30, seed=1)
    use(5, granularity)
    expected = logits_with(model, "reference_topk", ids)
    topk = logits_with(model, "keysel_topk", ids)
    torch.testing.assert_close(topk, expected, atol=2e-5, rtol=1e-5)
    assert (topk - logits_with(model, "eager", ids)).abs().max() > 1e-3  # and it is not full attention


def test_generate_decodes_through_the_cache_as_the_reference_does():
    model = small_llama(seed=2)
    prompt = tokens(1, 12, seed=2)
    use(6)
    runs = {}
    for name in ("reference_topk", "keysel_topk"):
        model.set_attn_implementation(name)
        with torch.no_grad():
            runs[name] = model.generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                                        return_dict_in_generate=True)
    assert runs["keysel_topk"].sequences.shape == (1, 22)
    assert torch.equal(runs["keysel_topk"].sequences, runs["reference_topk"].sequences)
    for ours, theirs in zip(runs["keysel_topk"].logits, runs["reference_topk"].logits):
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-5)


def test_generate_with_every_key_selected_equals_eager_generate():
    model = small_llama(seed=3)
    prompt = tokens(2, 9, seed=3)
    use(64)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        eager = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        topk = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                              return_dict_in_generate=True)
    assert torch.equal(topk.sequences, eager.sequences)
    torch.testing.assert_close(torch.stack(topk.logits), torch.stack(eager.logits), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("k", [64, 5])
def test_a_static_cache_generates_as_the_dynamic_one(k):
    # A static cache hands attention all of its slots, the empty ones included; prefill comes without a mask.
    model = small_llama(seed=10)
    prompt = tokens(1, 12, seed=10)
    use(k)
    runs = {}
    for name, cache in (("eager", None), ("reference_topk", None), ("keysel_topk", "static"),
                        ("keysel_topk", None)):
        model.set_attn_implementation(name)
        with torch.no_grad():
            runs[name, cache] = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                                               return_dict_in_generate=True, cache_implementation=cache)
    expected = runs["eager", None] if k == 64 else runs["reference_topk", None]
    for cache in (None, "static"):
        assert torch.equal(runs["keysel_topk", cache].sequences, expected.sequences)
        torch.testing.assert_close(torch.stack(runs["keysel_topk", cache].logits), torch.stack(expected.logits),
                                   atol=2e-5, rtol=1e-5)


def test_left_padding_reads_only_the_real_keys():
    model = small_llama(seed=4)
    use(4)
    a, b = tokens(1, 14, seed=4), tokens(1, 9, seed=5)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone_a = model(a).logits
        alone_b = model(b).logits
    torch.testing.assert_close(batch[0], alone_a[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1, 5:], alone_b[0], atol=2e-5, rtol=1e-5)
    expected = logits_with(model, "reference_topk", ids, attention_mask=mask)
    torch.testing.assert_close(batch[1, 5:], expected[1, 5:], atol=2e-5, rtol=1e-5)
    # generate() with the padded batch continues each sequence as it continues alone
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        together = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
        single = model.generate(b, max_new_tokens=6, do_sample=False)
    assert torch.equal(together[1, 5:], single[0])


def test_the_model_config_overrides_configure():
    model = small_llama(seed=6, keysel_topk={"k": 3, "granularity": "per_token"})
    ids = tokens(1, 20, seed=6)
    kt.configure(k=50)
    REFERENCE.update(k=3, granularity="per_token")
    torch.testing.assert_close(logits_with(model, "keysel_topk", ids), logits_with(model, "reference_topk", ids),
                               atol=2e-5, rtol=1e-5)


def test_without_k_the_error_says_how_to_set_it():
    model = small_llama()
    kt.configure(k=None)
    with pytest.raises(ValueError, match="configure\\(k=...\\)"):
        logits_with(model, "keysel_topk", tokens(1, 5))


def test_a_selector_spec_picks_the_keys():
    # keysel's streaming selector: 2 sinks and the most recent keys, k = 6
    model = small_llama(seed=7)
    ids = tokens(1, 20, seed=7)
    use(6, selector={"type": "streaming", "n_sink": 2})
    REFERENCE["allowed"] = lambda t, n: ((torch.arange(n)[None, :] < 2) |
                                         (torch.arange(n)[None, :] > (n - t + torch.arange(t))[:, None] - 4))
    expected = logits_with(model, "reference_topk", ids)
    torch.testing.assert_close(logits_with(model, "keysel_topk", ids), expected, atol=2e-5, rtol=1e-5)


def test_stats_record_every_layer_against_the_exact_topk():
    model = small_llama(seed=8)
    ids = tokens(2, 16, seed=8)
    stats = kt.TopkStats()
    use(4, stats=stats)
    logits_with(model, "keysel_topk", ids)
    assert stats.layers == [0, 1]
    summary = stats.summary()
    for layer in (0, 1):
        recall = summary[layer]["recall"]
        assert recall["count"] == 2 * 16 * 2                 # B x T x G
        assert recall["mean"] == 1.0 and recall["min"] == 1.0
        assert summary[layer]["mass_ratio"]["mean"] == pytest.approx(1.0, abs=1e-12)
        assert 0 < summary[layer]["mass"]["mean"] < 1
    # a random selector finds part of the exact top-k, and stats say so
    random_stats = kt.TopkStats()
    kt.configure(selector={"type": "random", "seed": 1}, stats=random_stats)
    logits_with(model, "keysel_topk", ids)
    recall = random_stats.summary()["all"]["recall"]
    assert recall["count"] == 2 * 2 * 16 * 2
    assert recall["mean"] < 0.9 and recall["min"] < 1.0
    assert random_stats.rows(0)["recall"].shape == (2 * 16 * 2,)


def test_a_sliding_window_mask_reads_each_querys_window():
    # Query t reads keys (t - 3, t]: every query starts at its own key, so the selection runs per first key.
    torch.manual_seed(3)
    q, k, v = torch.randn(1, 4, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    window = torch.ones(9, 9, dtype=torch.bool).tril() & ~torch.ones(9, 9, dtype=torch.bool).tril(-3)
    model = small_llama()
    kt.configure(k=3)  # k = the window: every allowed key, so this is masked dense attention
    got, _ = kt.transformers_attention(model.model.layers[0].self_attn, q, k, v, window[None, None], scaling=0.3)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                             attn_mask=window, scale=0.3)
    torch.testing.assert_close(got, dense.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_masks_with_gaps_are_refused():
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    gaps = torch.ones(6, 6, dtype=torch.bool).tril()
    gaps[5, 2] = False  # the last query skips one key in the middle of its run
    model = small_llama()
    kt.configure(k=4)
    with pytest.raises(NotImplementedError, match="contiguous"):
        kt.transformers_attention(model.model.layers[0].self_attn, q, k, v, gaps[None, None], scaling=0.3)


def small_mistral(seed=0, **config):
    from transformers import MistralConfig, MistralForCausalLM
    settings = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, sliding_window=8,
                    pad_token_id=0, bos_token_id=1, eos_token_id=2)
    settings.update(config)
    torch.manual_seed(seed)
    return MistralForCausalLM(MistralConfig(**settings)).eval()


@pytest.mark.parametrize("granularity", GRANULARITIES)
def test_a_sliding_window_model_matches_the_reference(granularity):
    model = small_mistral(seed=2)
    ids = tokens(2, 30, seed=2)
    use(8, granularity)  # k = the window: full attention within it, as eager computes it
    torch.testing.assert_close(logits_with(model, "keysel_topk", ids), logits_with(model, "eager", ids),
                               atol=2e-5, rtol=1e-5)
    use(3, granularity)  # k < the window: the exact top-k of each query's window
    expected = logits_with(model, "reference_topk", ids)
    topk = logits_with(model, "keysel_topk", ids)
    torch.testing.assert_close(topk, expected, atol=2e-5, rtol=1e-5)
    assert (topk - logits_with(model, "eager", ids)).abs().max() > 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
def test_cuda_generate_matches_the_cpu():
    model = small_llama(seed=9)
    prompt = tokens(2, 12, seed=9)
    use(5)
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        cpu = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        model.cuda()
        gpu = model.generate(prompt.cuda(), max_new_tokens=8, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    assert torch.equal(gpu.sequences.cpu(), cpu.sequences)
    torch.testing.assert_close(torch.stack(gpu.logits).cpu(), torch.stack(cpu.logits), atol=1e-4, rtol=1e-4)


def test_right_padding_and_a_prefill_in_chunks():
    model = small_llama(seed=11)
    use(4)
    a, b = tokens(1, 14, seed=11), tokens(1, 9, seed=12)
    ids = torch.cat([a, torch.cat([b, torch.zeros(1, 5, dtype=torch.long)], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        batch = model(ids, attention_mask=mask).logits
        alone_a, alone_b = model(a).logits, model(b).logits
        # the same 14 tokens in two chunks: the second chunk's 6 queries sit after 8 cached keys
        first = model(a[:, :8], use_cache=True)
        second = model(a[:, 8:], past_key_values=first.past_key_values).logits
    torch.testing.assert_close(batch[0], alone_a[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(batch[1, :9], alone_b[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(second[0], alone_a[0, 8:], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_torch_compile_fullgraph_of_the_model_with_padding(backend):
    # transformers materialises the mask while tracing; keysel_topk turns it into key positions with tensor ops
    # and the padding start goes into torch.ops.keysel.exact_topk_from, so the whole model is one graph.
    torch._dynamo.reset()
    model = small_llama(seed=13)
    a, b = tokens(1, 14, seed=13), tokens(1, 9, seed=14)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], dim=1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    use(5, n_sink=1, backend=backend)
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        eager = model(ids, attention_mask=mask, use_cache=False).logits
        alone = model(b, use_cache=False).logits
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(out, eager, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, 5:], alone[0], atol=2e-5, rtol=1e-5)  # the sink is the first real key

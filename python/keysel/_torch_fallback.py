"""Pure-torch stand-ins for keysel's selection and sparse attention (private to keysel.torch).

keysel.torch runs these when the compiled core (keysel._C) is absent, or cannot take the tensors' device, or when
`keysel.torch.configure(backend="torch")` asks for them. They follow docs/SPEC.md as the C++ core does:

- select_topk: the kept keys (sinks 0..n_sink-1 and the last n_local allowed positions), then the highest-scoring
  other allowed keys; NaN scores are never selected, -inf scores can be; equal scores prefer the lower position
  (the core's tie rule); output int32 [T, G, W] in ascending position order, then -1 padding.
- exact_topk: select_topk over pbar, the mean over a group's heads of the softmax probabilities, in float64.
- sparse_attention: softmax renormalised over the selected keys; a row with no key gets zeros and lse = -inf.

Every step is a tensor operation with shapes fixed by the arguments (no host synchronisation), so the functions
run under torch.compile and inside CUDA graphs.
"""
import torch

GRANULARITIES = ("per_head", "per_kv_head", "per_token")


def group_count(granularity, query_heads, kv_heads):
    """G of SPEC §2: per_head -> Hq, per_kv_head -> Hkv, per_token -> 1."""
    if granularity == "per_head":
        return query_heads
    if granularity == "per_kv_head":
        return kv_heads
    if granularity == "per_token":
        return 1
    raise ValueError(f"granularity: expected one of {', '.join(GRANULARITIES)}; got {granularity!r}")


def head_groups(granularity, query_heads, kv_heads, device):
    """int64 [Hq]: the selection group of each query head."""
    h = torch.arange(query_heads, device=device)
    if granularity == "per_head":
        return h
    if granularity == "per_kv_head":
        return h // (query_heads // kv_heads)
    return torch.zeros_like(h)


def selection_width(k, n_sink, n_local, kept_on_top):
    return k + n_sink + n_local if kept_on_top else k


def select_topk(scores, positions, k, n_sink=0, n_local=0, kept_on_top=False, key_start=None):
    """scores [T, G, N] (float), positions int [T] -> int32 [T, G, W]. key_start: None or an int64 scalar tensor;
    keys before it are padding, never selected (the sinks are the first n_sink keys from it)."""
    t, g, n = scores.shape
    width = selection_width(k, n_sink, n_local, kept_on_top)
    device = scores.device
    s = torch.arange(n, device=device)
    pos = positions.to(torch.int64)[:, None, None]                 # [T, 1, 1]
    first = torch.zeros((), dtype=torch.int64, device=device) if key_start is None else key_start.to(device)
    allowed = (s[None, None, :] <= pos) & (s[None, None, :] >= first)  # [T, 1, N]
    kept = allowed & ((s[None, None, :] < first + n_sink) | (s[None, None, :] > pos - n_local))
    candidate = allowed & ~kept & ~torch.isnan(scores)              # [T, G, N]
    kept = kept.expand(t, g, n)
    # Lexicographic order (kept, candidate, other) then by score, stable so that equal scores keep the lower
    # position first: sort by score, then (stably) by tier.
    value = torch.where(torch.isnan(scores), torch.zeros_like(scores), scores)
    by_score = torch.sort(value, dim=-1, descending=True, stable=True).indices
    tier = kept.to(torch.int8) * 2 + candidate.to(torch.int8)
    by_tier = torch.sort(tier.gather(-1, by_score), dim=-1, descending=True, stable=True).indices
    order = by_score.gather(-1, by_tier)                            # [T, G, N] positions, best first
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n, device=device).expand(t, g, n).contiguous())
    n_kept = kept.sum(-1, keepdim=True)
    quota = torch.full_like(n_kept, k) if kept_on_top else (k - n_kept).clamp_min(0)
    chosen = kept | (candidate & (rank - n_kept < quota))
    # Ascending positions of the chosen keys, then -1.
    key = torch.where(chosen, s.expand(t, g, n), torch.full_like(order, n))
    ascending = torch.sort(key, dim=-1).values
    if ascending.shape[-1] < width:
        pad = torch.full((t, g, width - n), n, dtype=ascending.dtype, device=device)
        ascending = torch.cat([ascending, pad], dim=-1)
    ascending = ascending[..., :width]
    return torch.where(ascending == n, torch.full_like(ascending, -1), ascending).to(torch.int32)


def group_probabilities(q, k_cache, positions, granularity, scale, key_start=None):
    """pbar [T, G, N] in float64 (SPEC §2); 0 on keys a query may not read (after positions[t], before key_start)."""
    t, hq, _ = q.shape
    n, hkv, _ = k_cache.shape
    kv_of_head = torch.arange(hq, device=q.device) // (hq // hkv)
    keys = k_cache.to(torch.float64)[:, kv_of_head, :]               # [N, Hq, D]
    logits = torch.einsum("thd,nhd->thn", q.to(torch.float64), keys) * scale
    allowed = torch.arange(n, device=q.device)[None, None, :] <= positions.to(torch.int64)[:, None, None]
    if key_start is not None:
        allowed = allowed & (torch.arange(n, device=q.device)[None, None, :] >= key_start.to(q.device))
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    if granularity == "per_head":
        return p
    if granularity == "per_kv_head":
        return p.view(t, hkv, hq // hkv, n).mean(dim=2)
    return p.mean(dim=1, keepdim=True)


def exact_topk(q, k_cache, positions, k, granularity, scale, n_sink=0, n_local=0, key_start=None):
    pbar = group_probabilities(q, k_cache, positions, granularity, scale, key_start)
    return select_topk(pbar, positions, k, n_sink, n_local, False, key_start)


def sparse_attention(q, k_cache, v_cache, selection, granularity, scale):
    """q [T, Hq, D], caches [N, Hkv, D|Dv], selection int [T, G, W] -> out [T, Hq, Dv] (q's dtype), lse f32 [T, Hq].

    Computes in float32 (float64 for float64 inputs)."""
    t, hq, _ = q.shape
    _, hkv, _ = k_cache.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = head_groups(granularity, hq, hkv, q.device)              # [Hq]
    kv_of_head = torch.arange(hq, device=q.device) // (hq // hkv)    # [Hq]
    sel = selection.to(torch.int64)[:, groups, :]                      # [T, Hq, W]
    valid = sel >= 0
    idx = sel.clamp_min(0)
    heads = kv_of_head[None, :, None].expand_as(idx)
    keys = k_cache.to(compute)[idx, heads]                             # [T, Hq, W, D]
    values = v_cache.to(compute)[idx, heads]                           # [T, Hq, W, Dv]
    logits = torch.einsum("thd,thwd->thw", q.to(compute), keys) * scale
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                              # -inf for an empty row
    p = torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.einsum("thw,thwd->thd", p, values)
    return out.to(q.dtype), lse.to(torch.float32)



def sparse_attention_backward(q, k_cache, v_cache, selection, grad_out, granularity, scale, grad_lse=None):
    """Gradients of sparse_attention's out (SPEC §9), and of its lse when grad_lse [T, Hq] is given, by gathering
    the selected rows: (dq, dk, dv) in the dtypes of q, k_cache, v_cache. Recomputes P in float32 (float64 for
    float64 inputs); dk and dv are summed with index_add_ (on CUDA in an unspecified order: not bitwise
    reproducible)."""
    t, hq, d = q.shape
    n, hkv, _ = k_cache.shape
    dv_dim = v_cache.shape[2]
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    groups = head_groups(granularity, hq, hkv, q.device)              # [Hq]
    kv_of_head = torch.arange(hq, device=q.device) // (hq // hkv)    # [Hq]
    sel = selection.to(torch.int64)[:, groups, :]                      # [T, Hq, W]
    valid = sel >= 0
    idx = sel.clamp_min(0)
    heads = kv_of_head[None, :, None].expand_as(idx)
    qc = q.to(compute)
    go = grad_out.to(compute)
    keys = k_cache.to(compute)[idx, heads]                             # [T, Hq, W, D]
    values = v_cache.to(compute)[idx, heads]                           # [T, Hq, W, Dv]
    logits = torch.einsum("thd,thwd->thw", qc, keys) * scale
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    p = torch.where(valid, torch.exp(logits - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None]),
                    torch.zeros_like(logits))                          # [T, Hq, W]
    out = torch.einsum("thw,thwd->thd", p, values)
    dp = torch.einsum("thd,thwd->thw", go, values)
    delta = (go * out).sum(-1, keepdim=True)
    if grad_lse is not None:                                           # d lse / d logit = P
        dp = dp + grad_lse.to(compute)[..., None]
    ds = p * (dp - delta)                                              # 0 on padding slots
    dq = torch.einsum("thw,thwd->thd", ds, keys) * scale
    flat = (idx * hkv + heads).reshape(-1)                             # row of [N * Hkv]
    dk = torch.zeros(n * hkv, d, dtype=compute, device=q.device)
    dk.index_add_(0, flat, (ds[..., None] * qc[:, :, None, :] * scale).reshape(-1, d))
    dv = torch.zeros(n * hkv, dv_dim, dtype=compute, device=q.device)
    dv.index_add_(0, flat, (p[..., None] * go[:, :, None, :]).reshape(-1, dv_dim))
    return (dq.to(q.dtype), dk.reshape(n, hkv, d).to(k_cache.dtype), dv.reshape(n, hkv, dv_dim).to(v_cache.dtype))


# ---- sparse MLA (SPEC §8, §9.2): one latent [N, 576] per token, values its first 512 channels ------------------

MLA_D_V = 512


def _mla_rows(q, kv, indices, topk_length, attn_sink, scale):
    """The pieces both directions share: gathered latents [T, k, 576], the valid mask [T, k], logits [T, H, k],
    lse [T, H] (-inf for a row with no valid slot), P' = exp(logit - lse) and the sink's share c of the keys."""
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    n = kv.shape[0]
    idx = indices.to(torch.int64)
    valid = (idx >= 0) & (idx < n)
    if topk_length is not None:
        columns = torch.arange(idx.shape[1], device=q.device)
        valid = valid & (columns[None, :] < topk_length.to(torch.int64)[:, None])
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    latents = kv.to(compute)[safe]                                     # [T, k, 576]
    latents = torch.where(valid[..., None], latents, torch.zeros_like(latents))
    logits = torch.einsum("thd,tkd->thk", q.to(compute), latents) * scale
    logits = logits.masked_fill(~valid[:, None, :], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)                              # -inf for an empty row
    finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p_keys = torch.where(valid[:, None, :], torch.exp(logits - finite[..., None]), torch.zeros_like(logits))
    if attn_sink is None:
        share = torch.ones_like(lse)
    else:
        share = torch.sigmoid(finite - attn_sink.to(compute)[None, :])  # exp(lse) / (exp(lse) + exp(sink))
    return compute, safe, valid, latents, lse, p_keys, share


def sparse_mla(q, kv, indices, topk_length, attn_sink, scale):
    """q [T, H, 576], kv [N, 576], indices int [T, k] -> (out [T, H, 512] float32 (float64 for float64 q), lse
    float32/float64 [T, H]); a slot is valid when 0 <= index < N and it lies among the first topk_length[t]."""
    _, _, _, latents, lse, p_keys, share = _mla_rows(q, kv, indices, topk_length, attn_sink, scale)
    out = torch.einsum("thk,tkd->thd", p_keys * share[..., None], latents[..., :MLA_D_V])
    return out, lse


def sparse_mla_backward(q, kv, indices, topk_length, attn_sink, scale, grad_out, grad_lse):
    """(dq, dkv, dsink or None) of sparse_mla (SPEC §9.2) by gathering the valid slots; dkv summed with
    index_add_."""
    compute, safe, valid, latents, lse, p_keys, share = _mla_rows(q, kv, indices, topk_length, attn_sink, scale)
    go = grad_out.to(compute)
    p = p_keys * share[..., None]
    out = torch.einsum("thk,tkd->thd", p, latents[..., :MLA_D_V])
    delta = (go * out).sum(-1)                                         # [T, H]
    dp = torch.einsum("thd,tkd->thk", go, latents[..., :MLA_D_V])
    ds = p * (dp - delta[..., None])
    if grad_lse is not None:
        ds = ds + p_keys * grad_lse.to(compute)[..., None]
    dq = torch.einsum("thk,tkd->thd", ds, latents) * scale
    rows = torch.einsum("thk,thd->tkd", ds, q.to(compute)) * scale     # [T, k, 576]
    rows[..., :MLA_D_V] += torch.einsum("thk,thd->tkd", p, go)
    rows = torch.where(valid[..., None], rows, torch.zeros_like(rows))
    dkv = torch.zeros(kv.shape, dtype=compute, device=q.device)
    dkv.index_add_(0, safe.reshape(-1), rows.reshape(-1, kv.shape[1]))
    dsink = None
    if attn_sink is not None:
        live = torch.isfinite(lse)
        dsink = -torch.where(live, (1.0 - share) * delta, torch.zeros_like(delta)).sum(0)
        dsink = dsink.to(attn_sink.dtype)
    return dq.to(q.dtype), dkv.to(kv.dtype), dsink

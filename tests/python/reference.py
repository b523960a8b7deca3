"""Plain NumPy float64 references written from docs/SPEC.md, independent of keysel's C++ code."""

import math

import numpy as np


def allowed(position, n_keys):
    return 0 if position < 0 else min(int(position) + 1, n_keys)


def groups_of(granularity, hq, hkv):
    """For each group, the list of its query heads (SPEC §2)."""
    if granularity == "per_head":
        return [[h] for h in range(hq)]
    if granularity == "per_kv_head":
        g = hq // hkv
        return [list(range(j * g, (j + 1) * g)) for j in range(hkv)]
    return [list(range(hq))]


def probabilities(q, k, positions, scale=None):
    """p[t, h, s] (SPEC §1), float64 [T, Hq, N], 0 beyond the allowed keys."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    t_count, hq, d = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    p = np.zeros((t_count, hq, n))
    for t in range(t_count):
        a = allowed(positions[t], n)
        for h in range(hq):
            logits = scale * (k[:a, h // g, :] @ q[t, h])
            logits -= logits.max()
            e = np.exp(logits)
            p[t, h, :a] = e / e.sum()
    return p


def group_mean(p, granularity, hkv):
    t_count, hq, n = p.shape
    groups = groups_of(granularity, hq, hkv)
    return np.stack([p[:, heads, :].mean(axis=1) for heads in groups], axis=1)


def row_plan(k, n_sink, n_local, kept_on_top, a):
    """(sink_end, local_begin, fill) of one row, from SPEC §2's layout (kept sinks, chosen keys, kept window)."""
    sink_end = min(n_sink, a)
    local_begin = max(a - n_local, sink_end)
    kept = sink_end + (a - local_begin)
    wanted = k if kept_on_top else min(k, a) - kept
    fill = max(0, min(wanted, local_begin - sink_end))
    return sink_end, local_begin, fill


def select_topk(scores, positions, k, n_sink=0, n_local=0, kept_on_top=False):
    """The SPEC §2 selection of a score [T, G, N]: kept keys plus the best free keys (NaN never, ties to the
    lower position), ascending, then -1."""
    scores = np.asarray(scores, np.float64)
    t_count, groups, n = scores.shape
    width = k + n_sink + n_local if kept_on_top else k
    out = np.full((t_count, groups, width), -1, np.int32)
    for t in range(t_count):
        a = allowed(positions[t], n)
        sink_end, local_begin, fill = row_plan(k, n_sink, n_local, kept_on_top, a)
        for g in range(groups):
            free = [s for s in range(sink_end, local_begin) if not np.isnan(scores[t, g, s])]
            free.sort(key=lambda s: (-scores[t, g, s], s))
            row = sorted(list(range(sink_end)) + free[:fill] + list(range(local_begin, a)))
            out[t, g, :len(row)] = row
    return out


def assert_same_selection(actual, expected, scores, tolerance=1e-12):
    """Equal selections, or rows that differ only among keys whose scores tie within `tolerance`."""
    actual = np.asarray(actual)
    if np.array_equal(actual, expected):
        return
    scores = np.asarray(scores, np.float64)
    for t, g in zip(*np.nonzero((actual != expected).any(axis=2))):
        a = sorted(set(actual[t, g][actual[t, g] >= 0]))
        e = sorted(set(expected[t, g][expected[t, g] >= 0]))
        assert len(a) == len(e), f"row ({t}, {g}): {a} != {e}"
        sa, se = np.sort(scores[t, g, a]), np.sort(scores[t, g, e])
        assert np.allclose(sa, se, rtol=0, atol=tolerance), f"row ({t}, {g}): {a} != {e}"


def indexer_scores(q_index, weights, k_index, positions=None):
    """I[t, s] = sum_j w[t, j] ReLU(qI[t, j] . kI[s]) (SPEC §3), -inf beyond the allowed keys."""
    q = np.asarray(q_index, np.float64)
    w = np.asarray(weights, np.float64)
    k = np.asarray(k_index, np.float64)
    logits = np.einsum("tjd,sd->tjs", q, k)
    scores = np.einsum("tj,tjs->ts", w, np.maximum(logits, 0.0))
    if positions is not None:
        for t, p in enumerate(positions):
            scores[t, allowed(p, k.shape[0]):] = -np.inf
    return scores


def sparse_attention(q, k, v, selection, granularity="per_kv_head", scale=None):
    """o_A and lse over the selected keys (SPEC §4), float64."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    t_count, hq, d = q.shape
    n, hkv, dv = v.shape
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    group_of = {h: i for i, heads in enumerate(groups_of(granularity, hq, hkv)) for h in heads}
    out = np.zeros((t_count, hq, dv))
    lse = np.full((t_count, hq), -np.inf)
    for t in range(t_count):
        for h in range(hq):
            keys = [s for s in selection[t, group_of[h]] if s >= 0]
            if not keys:
                continue
            logits = scale * (k[keys, h // g, :] @ q[t, h])
            m = logits.max()
            e = np.exp(logits - m)
            lse[t, h] = m + math.log(e.sum())
            out[t, h] = (e / e.sum()) @ v[keys, h // g, :]
    return out, lse


def metrics(q, k, v, positions, selection, k_value, granularity="per_kv_head", scale=None):
    """Every SPEC §4 metric per row, float64 [T, G] each."""
    q = np.asarray(q, np.float64)
    k = np.asarray(k, np.float64)
    v = np.asarray(v, np.float64)
    t_count, hq, _ = q.shape
    n, hkv, _ = k.shape
    g = hq // hkv
    p = probabilities(q, k, positions, scale)
    pbar = group_mean(p, granularity, hkv)
    groups = groups_of(granularity, hq, hkv)
    names = ["recall", "mass", "mass_ratio", "kl", "top1", "out_err", "entropy", "entropy_normalized"]
    result = {name: np.zeros((t_count, len(groups))) for name in names}
    for t in range(t_count):
        a = allowed(positions[t], n)
        k_eff = min(k_value, a)
        for gi, heads in enumerate(groups):
            pb = pbar[t, gi, :a]
            sel = [int(s) for s in selection[t, gi] if s >= 0]
            ordered = np.sort(pb)[::-1]
            pk = ordered[k_eff - 1]
            above = sum(1 for s in sel if pb[s] > pk)
            at = sum(1 for s in sel if pb[s] == pk)
            above_all = int((pb > pk).sum())
            recall = min(k_eff, above + min(at, k_eff - above_all)) / k_eff
            mass = pb[sel].sum()
            mass_exact = ordered[:k_eff].sum()
            errors = []
            for h in heads:
                ph = p[t, h, :a]
                o = ph @ v[:a, h // g, :]
                pa = ph[sel] / ph[sel].sum()
                oa = pa @ v[sel, h // g, :]
                errors.append(np.linalg.norm(oa - o) / np.linalg.norm(o))
            nz = pb[pb > 0]
            entropy = -(nz * np.log(nz)).sum()
            result["recall"][t, gi] = recall
            result["mass"][t, gi] = mass
            result["mass_ratio"][t, gi] = mass / mass_exact
            result["kl"][t, gi] = -math.log(mass)
            result["top1"][t, gi] = 1.0 if pb.max() in pb[sel] else 0.0
            result["out_err"][t, gi] = np.mean(errors)
            result["entropy"][t, gi] = entropy
            result["entropy_normalized"][t, gi] = entropy / math.log(a) if a > 1 else 0.0
    return result


def round_fp8_e4m3(x):
    """Nearest fp8 e4m3 value (ties to even, saturating at 448), float64, from the format's definition."""
    x = np.asarray(x, np.float64)
    out = np.zeros_like(x)
    sign = np.sign(x)
    m = np.minimum(np.abs(x), 448.0)
    nonzero = m > 0
    exponent = np.floor(np.log2(np.where(nonzero, m, 1.0)))
    exponent = np.maximum(exponent, -6.0)      # subnormals share the exponent of the smallest normal
    step = 2.0 ** (exponent - 3)               # 3 mantissa bits
    out = np.round(m / step) * step            # np.round rounds half to even
    return np.where(nonzero, sign * np.minimum(out, 448.0), 0.0)


def quantize_rows(x, fmt):
    """Stored values of rows quantised with one scale per row (SPEC §3 per_token): fp8_e4m3 or int8."""
    # keysel divides in float32 (SPEC §3): the quotient is formed as float32 / float32, so that a value whose
    # quotient lands within float64's reach of a rounding midpoint rounds as keysel rounds it.
    x32 = np.asarray(x, np.float32)
    amax = np.abs(x32).max(axis=-1, keepdims=True)
    if fmt == "fp8_e4m3":
        scale = np.where(amax > 0, amax / np.float32(448.0), np.float32(1.0)).astype(np.float32)
        return round_fp8_e4m3((x32 / scale).astype(np.float64)) * scale.astype(np.float64)
    if fmt == "int8":
        scale = np.where(amax > 0, amax / np.float32(127.0), np.float32(1.0)).astype(np.float32)
        return np.clip(np.round((x32 / scale).astype(np.float64)), -127, 127) * scale.astype(np.float64)
    raise ValueError(fmt)

"""keysel.sparse_attention and keysel.metrics against the NumPy references of SPEC §4."""

import math

import numpy as np
import pytest

import keysel
import reference
from conftest import as_library, attention_inputs, to_numpy


def random_selection(rng, positions, n, groups, width):
    """Distinct allowed keys in random order, then -1 padding (any order is accepted as input)."""
    out = np.full((len(positions), groups, width), -1, np.int32)
    for t, p in enumerate(positions):
        a = reference.allowed(p, n)
        for g in range(groups):
            count = int(rng.integers(1, min(width, a) + 1))
            out[t, g, :count] = rng.choice(a, size=count, replace=False)
    return out


@pytest.mark.parametrize("granularity, groups", [("per_head", 6), ("per_kv_head", 3), ("per_token", 1)])
def test_sparse_attention_matches_reference(rng, library, granularity, groups):
    q, k, v, positions = attention_inputs(rng, t=5, hq=6, hkv=3, n=53, d=24, dv=20)
    selection = random_selection(rng, positions, 53, groups, 9)
    selection[1, 0, :] = -1                          # a row with no key: zeros and -inf
    out, lse = keysel.sparse_attention(as_library(q, library), as_library(k, library), as_library(v, library),
                                       as_library(selection, library), granularity=granularity, scale=0.2)
    expected_out, expected_lse = reference.sparse_attention(q, k, v, selection, granularity, 0.2)
    assert tuple(out.shape) == (5, 6, 20) and tuple(lse.shape) == (5, 6)
    np.testing.assert_allclose(to_numpy(out), expected_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_numpy(lse), expected_lse, rtol=1e-5, atol=1e-5)


def test_sparse_attention_half_precision_cache(rng):
    torch = pytest.importorskip("torch")
    q, k, v, positions = attention_inputs(rng, t=3, hq=4, hkv=1, n=30, d=16, dv=16)
    kb, vh = torch.from_numpy(k).to(torch.bfloat16), torch.from_numpy(v).to(torch.float16)
    selection = keysel.exact_topk(q, k, positions, 6, granularity="per_token")
    out, lse = keysel.sparse_attention(torch.from_numpy(q), kb, vh, torch.from_numpy(selection),
                                       granularity="per_token")
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    expected_out, expected_lse = reference.sparse_attention(q, kb.float().numpy(), vh.float().numpy(), selection,
                                                            "per_token")
    np.testing.assert_allclose(out.numpy(), expected_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(lse.numpy(), expected_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("granularity", ["per_head", "per_kv_head", "per_token"])
def test_metrics_match_reference(rng, library, granularity):
    q, k, v, positions = attention_inputs(rng, t=6, hq=4, hkv=2, n=41, d=12, dv=10)
    groups = {"per_head": 4, "per_kv_head": 2, "per_token": 1}[granularity]
    selection = random_selection(rng, positions, 41, groups, 8)
    result = keysel.metrics(as_library(q, library), as_library(k, library), as_library(v, library),
                            as_library(positions, library), as_library(selection, library), 8,
                            granularity=granularity)
    expected = reference.metrics(q, k, v, positions, selection, 8, granularity)
    assert set(keysel.metric_names()) == set(expected)
    for name, values in expected.items():
        got = result[name]
        assert type(got).__module__.split(".")[0] == ("numpy" if library == "numpy" else "torch")
        np.testing.assert_allclose(to_numpy(got), values, rtol=1e-9, atol=1e-12, err_msg=name)
        aggregate = result["aggregates"][name]
        flat = values.ravel()
        assert aggregate["count"] == flat.size
        np.testing.assert_allclose([aggregate["mean"], aggregate["min"], aggregate["p5"], aggregate["p50"],
                                    aggregate["p95"]],
                                   [flat.mean(), flat.min(), np.percentile(flat, 5), np.percentile(flat, 50),
                                    np.percentile(flat, 95)], rtol=1e-9, atol=1e-12, err_msg=name)


def test_metrics_of_exact_topk_are_the_ceiling(rng, library):
    q, k, v, positions = attention_inputs(rng, t=4, hq=4, hkv=2, n=37, d=8, dv=8)
    selection = keysel.exact_topk(q, k, positions, 5)
    result = keysel.metrics(as_library(q, library), as_library(k, library), None, as_library(positions, library),
                            as_library(selection, library), 5)
    np.testing.assert_allclose(to_numpy(result["recall"]), 1.0)
    np.testing.assert_allclose(to_numpy(result["mass_ratio"]), 1.0, rtol=1e-12)
    assert np.all(np.isnan(to_numpy(result["out_err"])))       # no v_cache: no output error
    assert result["aggregates"]["out_err"]["count"] == 0
    assert math.isclose(result["aggregates"]["recall"]["min"], 1.0)

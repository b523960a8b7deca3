"""keysel.indexer_scores and keysel.IndexerKeyCache against SPEC §3 in NumPy float64."""

import numpy as np
import pytest

import keysel
import reference
from conftest import as_library, needs_torch_float8, to_numpy


def indexer_inputs(rng, t=5, hi=7, di=40, n=75):
    q = rng.standard_normal((t, hi, di)).astype(np.float32)
    w = rng.standard_normal((t, hi)).astype(np.float32)
    k = rng.standard_normal((n, di)).astype(np.float32)
    positions = np.sort(rng.integers(0, n + 3, size=t)).astype(np.int32)
    return q, w, k, positions


def close(actual, expected, relative=1e-5):
    """fp32 accumulation against float64: error bounded relative to the row's largest |score|."""
    actual, expected = to_numpy(actual).astype(np.float64), np.asarray(expected)
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(actual), finite)
    np.testing.assert_array_equal(actual[~finite], expected[~finite])
    bound = relative * (np.abs(np.where(finite, expected, 0)).max(axis=1, keepdims=True) + 1.0)
    difference = np.abs(np.where(finite, actual, 0) - np.where(finite, expected, 0))
    assert np.all(difference <= bound), difference.max()


def test_indexer_scores_matches_reference(rng, library):
    q, w, k, positions = indexer_inputs(rng)
    out = keysel.indexer_scores(as_library(q, library), as_library(w, library), as_library(k, library),
                                as_library(positions, library))
    assert tuple(out.shape) == (5, 75) and str(out.dtype).endswith("float32")
    close(out, reference.indexer_scores(q, w, k, positions))


def test_indexer_scores_without_positions_reads_every_key(rng, library):
    q, w, k, _ = indexer_inputs(rng, t=3, hi=2, di=17, n=9)
    out = keysel.indexer_scores(as_library(q, library), as_library(w, library), as_library(k, library))
    close(out, reference.indexer_scores(q, w, k))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "int8"])
def test_key_cache_quantised_scores_match_reference(rng, library, fmt):
    q, w, k, positions = indexer_inputs(rng, di=64, n=70)
    cache = keysel.IndexerKeyCache(64, format=fmt)
    cache.append(as_library(k[:30], library))          # appended in two pieces
    cache.append(as_library(k[30:], library))
    assert len(cache) == 70 and cache.nbytes == 70 * cache.bytes_per_token
    assert cache.bytes_per_token == 64 + 4
    scores = cache.scores(as_library(q, library), as_library(w, library), as_library(positions, library))
    qs = reference.quantize_rows(q, fmt)               # queries: one scale per token and head
    ks = reference.quantize_rows(k, fmt)
    close(scores, reference.indexer_scores(qs, w, ks, positions), relative=1e-4)
    # The fused selection is select_topk of the scores, bit for bit.
    sel = cache.select(as_library(q, library), as_library(w, library), as_library(positions, library), 13, n_sink=1)
    expected = keysel.select_topk(to_numpy(scores)[:, None, :], positions, 13, n_sink=1)
    assert tuple(sel.shape) == (5, 1, 13)
    np.testing.assert_array_equal(to_numpy(sel), expected)
    assert cache.last_cost["rows"] == 5


def test_key_cache_fp32_equals_indexer_scores(rng):
    q, w, k, positions = indexer_inputs(rng, di=33, n=41)
    cache = keysel.IndexerKeyCache(33, format="fp32", hadamard=False)
    cache.append(k)
    np.testing.assert_array_equal(cache.scores(q, w, positions), keysel.indexer_scores(q, w, k, positions))


def test_key_cache_hadamard_keeps_exact_scores(rng):
    q, w, k, positions = indexer_inputs(rng, di=64, n=20)
    cache = keysel.IndexerKeyCache(64, format="fp32", hadamard=True)
    cache.append(k)
    close(cache.scores(q, w, positions), reference.indexer_scores(q, w, k, positions), relative=1e-5)


@needs_torch_float8
def test_fp8_inputs_via_torch_float8_and_uint8_with_dtype(rng):
    torch = pytest.importorskip("torch")
    q, w, k, positions = indexer_inputs(rng, di=32, n=19)
    q8 = torch.from_numpy(q).to(torch.float8_e4m3fn)
    k8 = torch.from_numpy(k * 8).to(torch.float8_e5m2)
    expected = reference.indexer_scores(q8.float().numpy(), w, k8.float().numpy(), positions)
    via_float8 = keysel.indexer_scores(q8, torch.from_numpy(w), k8, torch.from_numpy(positions))
    close(via_float8, expected)
    # uint8 bytes with dtype= (one format per call: both tensors in e4m3 here)
    k8b = torch.from_numpy(k).to(torch.float8_e4m3fn)
    expected_b = reference.indexer_scores(q8.float().numpy(), w, k8b.float().numpy(), positions)
    via_bytes = keysel.indexer_scores(q8.view(torch.uint8).numpy(), w, k8b.view(torch.uint8).numpy(), positions,
                                      dtype="fp8_e4m3")
    assert isinstance(via_bytes, np.ndarray)
    close(via_bytes, expected_b)
    assert keysel._C.tensor_view_info(q8.view(torch.uint8).numpy(), "fp8_e4m3")["dtype"] == "fp8_e4m3"
    # fp8 keys appended to a cache decode exactly: an fp32 cache then scores like the decoded values.
    cache = keysel.IndexerKeyCache(32, format="fp32")
    cache.append(k8b.view(torch.uint8), dtype="fp8_e4m3")
    close(cache.scores(q, w, positions), reference.indexer_scores(q, w, k8b.float().numpy(), positions))

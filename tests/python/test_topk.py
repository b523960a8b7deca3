"""keysel.select_topk and keysel.exact_topk against the NumPy references of SPEC §2."""

import numpy as np
import pytest

import keysel
import reference
from conftest import as_library, attention_inputs, to_numpy


@pytest.mark.parametrize("k, n_sink, n_local, kept_on_top", [
    (1, 0, 0, False), (7, 0, 0, False), (64, 0, 0, False),   # k above N pads with -1
    (7, 2, 3, False), (64, 2, 3, False),
    (1, 1, 4, True), (7, 1, 4, True), (64, 1, 4, True),
])
def test_select_topk_matches_reference(rng, library, k, n_sink, n_local, kept_on_top):
    t, g, n = 7, 3, 61
    scores = rng.standard_normal((t, g, n)).astype(np.float32)
    scores[1, 0, 5:9] = 0.25                  # ties: lower positions win
    scores[2, 1, ::3] = np.nan                # NaN never selected
    positions = rng.integers(0, n + 4, size=t).astype(np.int32)
    out = keysel.select_topk(as_library(scores, library), as_library(positions, library), k, n_sink=n_sink,
                             n_local=n_local, kept_on_top=kept_on_top)
    expected = reference.select_topk(scores, positions, k, n_sink, n_local, kept_on_top)
    assert type(out).__module__.split(".")[0] == ("numpy" if library == "numpy" else "torch")
    assert tuple(out.shape) == expected.shape
    np.testing.assert_array_equal(to_numpy(out), expected)


def test_select_topk_float64_scores_and_strided_view(rng, library):
    base = rng.standard_normal((4, 5, 90))
    scores = base[:, ::2, 3:80]               # strided view [4, 3, 77], read in place
    positions = np.array([0, 10, 76, 200], np.int32)
    if library == "torch":
        import torch
        scores_in = torch.from_numpy(base)[:, ::2, 3:80]
    else:
        scores_in = scores
    out = keysel.select_topk(scores_in, as_library(positions, library), 9)
    np.testing.assert_array_equal(to_numpy(out), reference.select_topk(scores, positions, 9))


@pytest.mark.parametrize("granularity", ["per_head", "per_kv_head", "per_token"])
def test_exact_topk_matches_reference(rng, library, granularity):
    q, k, _v, positions = attention_inputs(rng, t=6, hq=6, hkv=2, n=47, d=20)
    scale = 0.3
    out = keysel.exact_topk(as_library(q, library), as_library(k, library), as_library(positions, library), 11,
                            granularity=granularity, scale=scale, n_sink=1, n_local=2)
    pbar = reference.group_mean(reference.probabilities(q, k, positions, scale), granularity, 2)
    expected = reference.select_topk(pbar, positions, 11, 1, 2, False)
    groups = {"per_head": 6, "per_kv_head": 2, "per_token": 1}[granularity]
    assert tuple(out.shape) == (6, groups, 11)
    reference.assert_same_selection(to_numpy(out), expected, pbar)


def test_exact_topk_default_scale_and_half_precision(rng):
    torch = pytest.importorskip("torch")
    q, k, _v, positions = attention_inputs(rng, t=3, hq=4, hkv=4, n=33, d=16)
    q16, k16 = torch.from_numpy(q).to(torch.bfloat16), torch.from_numpy(k).to(torch.float16)
    out = keysel.exact_topk(q16, k16, torch.from_numpy(positions), 5, kept_on_top=True, n_sink=2)
    qd, kd = q16.float().numpy(), k16.float().numpy()     # the values keysel reads
    pbar = reference.group_mean(reference.probabilities(qd, kd, positions), "per_kv_head", 4)
    assert out.dtype == torch.int32 and tuple(out.shape) == (3, 4, 7)
    reference.assert_same_selection(out.numpy(), reference.select_topk(pbar, positions, 5, 2, 0, True), pbar)


def test_workspace_sizes_are_plain_arithmetic():
    small = keysel.select_topk_workspace_bytes(1, 1, 1000)
    assert small > 4 * 1000 and keysel.select_topk_workspace_bytes(4, 2, 1000) == 8 * small
    assert keysel.indexer_topk_workspace_bytes(3, 5000) >= 3 * 5000 * 4 + keysel.select_topk_workspace_bytes(3, 1, 5000)
    with pytest.raises(keysel.Error, match="argument 'n'"):
        keysel.select_topk_workspace_bytes(1, 1, -1)
    with pytest.raises(keysel.Error, match="argument 'groups'"):
        keysel.select_topk_workspace_bytes(2**40, 2**40, 10)

"""IndexerKeyCache(device="cuda"): the engines' paged fp8 layout in GPU memory, scored by keysel's CUDA indexer,
against the CPU cache of the same configuration (the same codes and scales; fp8 products accumulated by the
tensor cores, SPEC §7's tolerance)."""

import numpy as np
import pytest

import keysel

torch = pytest.importorskip("torch")
GPU = torch.cuda.is_available() and keysel.built_with_cuda()


def test_device_and_format_are_checked():
    if not GPU:
        with pytest.raises(keysel.Error, match="device"):
            keysel.IndexerKeyCache(128, device="cuda")
        return
    with pytest.raises(keysel.Error, match="format"):
        keysel.IndexerKeyCache(128, format="int8", device="cuda")
    with pytest.raises(keysel.Error, match="dim"):
        keysel.IndexerKeyCache(96, device="cuda")
    with pytest.raises(keysel.Error, match="device"):
        keysel.IndexerKeyCache(128, device="tpu")


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU and a CUDA build of keysel")
@pytest.mark.parametrize("dim,heads,pow2", [(128, 64, True), (64, 16, False)])
def test_cuda_cache_matches_the_cpu_cache(dim, heads, pow2):
    rng = np.random.default_rng(dim + heads)
    n, t, k = 517, 9, 40
    keys = torch.from_numpy(rng.standard_normal((n, dim)).astype(np.float32)).to(torch.bfloat16)
    keys[7] = 0  # an all-zero key: scale 1, codes 0
    q = torch.from_numpy(rng.standard_normal((t, heads, dim)).astype(np.float32)).to(torch.bfloat16)
    w = torch.from_numpy(rng.standard_normal((t, heads)).astype(np.float32))
    positions = torch.tensor([516, 300, 63, 64, 0, 516, 200, 450, 129], dtype=torch.int32)
    cpu = keysel.IndexerKeyCache(dim, power_of_two_scales=pow2)
    gpu = keysel.IndexerKeyCache(dim, power_of_two_scales=pow2, device="cuda")
    for chunk in (keys[:100], keys[100:101], keys[101:]):  # appends that cross page boundaries
        cpu.append(chunk)
        gpu.append(chunk.cuda())
    assert len(gpu) == len(cpu) == n and gpu.nbytes == n * (dim + 4)
    want = cpu.scores(q, w, positions).double().numpy()
    got = gpu.scores(q.cuda(), w.cuda(), positions.cuda()).cpu().double().numpy()
    # |terms| bound from the unquantised values (fp8 rounding keeps magnitudes within a few percent).
    bound = np.einsum("th,thd,sd->ts", np.abs(w.double().numpy()), np.abs(q.double().numpy()),
                      np.abs(keys.double().numpy()))
    allowed = np.arange(n)[None, :] <= positions.numpy()[:, None]
    assert np.all(np.isneginf(got[~allowed]))
    assert np.all(np.abs(got[allowed] - want[allowed]) <= 2e-3 * bound[allowed] + 1e-6)
    sel = gpu.select(q.cuda(), w.cuda(), positions.cuda(), k).cpu().numpy()[:, 0, :]
    for row in range(t):
        chosen = sel[row][sel[row] >= 0]
        assert len(chosen) == min(k, int(positions[row]) + 1)
        kth = np.sort(want[row][allowed[row]])[::-1][len(chosen) - 1]
        slack = 4e-3 * bound[row].max() + 1e-6
        assert np.all(want[row][chosen] >= kth - slack)  # nothing chosen that the CPU ranks clearly below

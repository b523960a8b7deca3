"""Any DLPack producer, not only NumPy and torch: an object that offers nothing but __dlpack__ and
__dlpack_device__ (what CuPy and JAX arrays offer keysel beyond a shape) is read in place, and written in place
when given as out=. NumPy's and torch's own exporters stand behind it, so the bytes are those of the array."""

import numpy as np
import pytest

import keysel


class Producer:
    """The DLPack protocol and nothing else (no shape, no dtype, no array interface)."""

    def __init__(self, array):
        self._array = array

    def __dlpack__(self, **kwargs):
        return self._array.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()


def test_cpu_producer_in_and_out_in_place():
    rng = np.random.default_rng(3)
    scores = rng.standard_normal((5, 2, 40)).astype(np.float32)
    positions = np.array([39, 20, 3, 39, 0], np.int32)
    want = keysel.select_topk(scores, positions, 7)
    got = keysel.select_topk(Producer(scores), Producer(positions), 7)
    assert isinstance(got, np.ndarray) and np.array_equal(got, want)
    out = np.full((5, 2, 7), -5, np.int32)
    returned = keysel.select_topk(Producer(scores), Producer(positions), 7, out=Producer(out))
    assert isinstance(returned, Producer) and np.array_equal(out, want)  # written into the caller's memory


def test_producer_of_the_wrong_rank_names_the_argument():
    with pytest.raises(keysel.Error, match="scores"):
        keysel.select_topk(Producer(np.zeros((4, 40), np.float32)), np.zeros(4, np.int32), 3)


torch = pytest.importorskip("torch")


@pytest.mark.skipif(not (torch.cuda.is_available() and keysel.built_with_cuda()),
                    reason="needs a CUDA GPU and a CUDA build of keysel")
def test_cuda_producer_needs_out_and_is_written_in_place():
    scores = torch.randn(6, 1, 300, device="cuda")
    positions = torch.full((6,), 299, dtype=torch.int32, device="cuda")
    want = keysel.select_topk(scores, positions, 16)
    with pytest.raises(keysel.Error, match="out"):  # keysel allocates outputs only in torch or CuPy
        keysel.select_topk(Producer(scores), Producer(positions), 16)
    out = torch.full((6, 1, 16), -7, dtype=torch.int32, device="cuda")
    pointer = out.data_ptr()
    keysel.select_topk(Producer(scores), Producer(positions), 16, out=Producer(out))
    torch.cuda.synchronize()
    assert out.data_ptr() == pointer and torch.equal(out, want)

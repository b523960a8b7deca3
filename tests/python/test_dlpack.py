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


# CuPy and JAX themselves, where they are installed (the GPU machine has both): keysel reads their arrays in place,
# answers CuPy inputs with CuPy arrays on CuPy's current stream, and writes into a CuPy out= in place. JAX arrays are
# immutable, so a JAX caller gets NumPy back on the CPU and passes out= (here CuPy) on a GPU.
def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("CuPy sees no CUDA GPU")
    except cupy.cuda.runtime.CUDARuntimeError:
        pytest.skip("CuPy sees no CUDA GPU")
    if not keysel.built_with_cuda():
        pytest.skip("needs a CUDA build of keysel")
    return cupy


def test_cupy_in_cupy_out_on_cupys_stream():
    cupy = _cupy()
    rng = np.random.default_rng(11)
    scores = rng.standard_normal((7, 3, 333)).astype(np.float32)
    positions = np.array([332, 5, 0, 200, 332, 100, 17], np.int32)
    want = keysel.select_topk(scores, positions, 9)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        got = keysel.select_topk(cupy.asarray(scores), cupy.asarray(positions), 9)
        assert isinstance(got, cupy.ndarray) and got.dtype == cupy.int32 and got.shape == (7, 3, 9)
        stream.synchronize()
        assert np.array_equal(cupy.asnumpy(got), want)
        out = cupy.full((7, 3, 9), -3, dtype=cupy.int32)
        pointer = out.data.ptr
        returned = keysel.select_topk(cupy.asarray(scores), cupy.asarray(positions), 9, out=out)
        stream.synchronize()
    assert returned is out and out.data.ptr == pointer and np.array_equal(cupy.asnumpy(out), want)


def test_cupy_topk_rows_equals_numpy():
    cupy = _cupy()
    rng = np.random.default_rng(12)
    logits = rng.standard_normal((5, 700)).astype(np.float32)
    lengths = np.array([700, 3, 0, 512, 129], np.int32)
    want = keysel.topk_rows(logits, 64, lengths=lengths)
    got = keysel.topk_rows(cupy.asarray(logits), 64, lengths=cupy.asarray(lengths))
    cupy.cuda.get_current_stream().synchronize()
    assert isinstance(got, cupy.ndarray) and np.array_equal(cupy.asnumpy(got), want)


def _jax():
    import os

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX would otherwise take 75% of the GPU
    return pytest.importorskip("jax")


def test_jax_cpu_arrays_are_read_in_place():
    jax = _jax()
    rng = np.random.default_rng(13)
    scores = rng.standard_normal((6, 2, 77)).astype(np.float32)
    positions = np.array([76, 30, 0, 76, 50, 9], np.int32)
    want = keysel.select_topk(scores, positions, 5)
    cpu = jax.devices("cpu")[0]
    got = keysel.select_topk(jax.device_put(scores, cpu), jax.device_put(positions, cpu), 5)
    assert isinstance(got, np.ndarray) and np.array_equal(got, want)


def test_jax_gpu_arrays_are_read_in_place_into_out():
    jax = _jax()
    cupy = _cupy()
    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("JAX sees no GPU")
    rng = np.random.default_rng(14)
    scores = rng.standard_normal((4, 1, 500)).astype(np.float32)
    positions = np.array([499, 250, 1, 499], np.int32)
    want = keysel.select_topk(scores, positions, 32)
    js, jp = jax.device_put(scores, gpu), jax.device_put(positions, gpu)
    jax.block_until_ready((js, jp))
    with pytest.raises(keysel.Error, match="out"):  # keysel cannot make a JAX array
        keysel.select_topk(js, jp, 32)
    out = cupy.full((4, 1, 32), -1, dtype=cupy.int32)
    keysel.select_topk(js, jp, 32, out=out, stream=0)
    cupy.cuda.runtime.deviceSynchronize()
    assert np.array_equal(cupy.asnumpy(out), want)

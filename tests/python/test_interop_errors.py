"""Zero-copy inputs, out= written in place, and bad input raising keysel.Error that names the argument while
leaving out= untouched."""

import numpy as np
import pytest

import keysel
from conftest import as_library, attention_inputs, needs_torch_float8, to_numpy


def test_error_is_a_value_error():
    assert issubclass(keysel.Error, ValueError)


def test_numpy_views_cross_without_copy(rng):
    base = rng.standard_normal((6, 8, 40)).astype(np.float32)
    view = base[1:5, ::2, 3:]
    info = keysel._C.tensor_view_info(view)
    assert info["data_ptr"] == view.__array_interface__["data"][0]
    assert info["shape"] == [4, 4, 37] and info["strides"] == [320, 80, 1]
    assert info["dtype"] == "fp32" and info["device"] == "cpu"
    read_only = base.copy()
    read_only.flags.writeable = False                 # inputs may be read-only
    assert keysel._C.tensor_view_info(read_only)["data_ptr"] == read_only.ctypes.data


def test_torch_tensors_cross_without_copy(rng):
    torch = pytest.importorskip("torch")
    base = torch.randn(5, 3, 64, requires_grad=True)
    view = base[:, 1:, ::4]
    info = keysel._C.tensor_view_info(view.detach())
    assert info["data_ptr"] == view.data_ptr() and info["strides"] == list(view.stride())
    assert keysel._C.tensor_view_info(torch.zeros(3, dtype=torch.bfloat16))["dtype"] == "bf16"
    # A tensor that requires grad is read in place too, and a change after the view is seen by keysel.
    scores = torch.zeros(2, 1, 10, requires_grad=True)
    positions = torch.tensor([9, 9], dtype=torch.int32)
    with torch.no_grad():
        scores[0, 0, 7] = 5.0
        scores[1, 0, 2] = 5.0
    out = keysel.select_topk(scores, positions, 1)
    assert out[:, 0, 0].tolist() == [7, 2]


@needs_torch_float8
def test_torch_float8_crosses_as_its_format():
    torch = pytest.importorskip("torch")
    x = torch.zeros(4, 8, dtype=torch.float8_e4m3fn)
    from keysel import _interop
    as_c, name = _interop.arg(x, "test", "x")
    assert name == "fp8_e4m3" and as_c.data_ptr() == x.data_ptr()
    assert keysel._C.tensor_view_info(as_c, name)["dtype"] == "fp8_e4m3"
    y = torch.zeros(4, 8, dtype=torch.float8_e5m2)
    assert _interop.arg(y, "test", "y")[1] == "fp8_e5m2"


def test_out_numpy_is_written_in_place(rng):
    scores = rng.standard_normal((3, 2, 30)).astype(np.float32)
    positions = np.array([4, 17, 29], np.int32)
    out = np.full((3, 2, 6), 12345, np.int32)
    pointer = out.ctypes.data
    returned = keysel.select_topk(scores, positions, 6, out=out)
    assert returned is out and out.ctypes.data == pointer
    np.testing.assert_array_equal(out, keysel.select_topk(scores, positions, 6))


def test_out_torch_is_written_in_place(rng):
    torch = pytest.importorskip("torch")
    q, k, v, positions = attention_inputs(rng, t=3, hq=4, hkv=2, n=25, d=8, dv=8)
    tq, tk, tv, tp = (torch.from_numpy(x) for x in (q, k, v, positions))
    selection = torch.full((3, 2, 5), 77, dtype=torch.int32)
    pointer = selection.data_ptr()
    returned = keysel.exact_topk(tq, tk, tp, 5, out=selection)
    assert returned is selection and selection.data_ptr() == pointer
    assert torch.equal(selection, keysel.exact_topk(tq, tk, tp, 5))
    out, lse = torch.zeros(3, 4, 8), torch.zeros(3, 4)
    pointers = (out.data_ptr(), lse.data_ptr())
    keysel.sparse_attention(tq, tk, tv, selection, out=out, lse=lse)
    assert (out.data_ptr(), lse.data_ptr()) == pointers
    expected_out, expected_lse = keysel.sparse_attention(q, k, v, selection.numpy())
    np.testing.assert_array_equal(out.numpy(), expected_out)
    np.testing.assert_array_equal(lse.numpy(), expected_lse)
    scores = torch.zeros(3, 25)
    keysel.indexer_scores(torch.randn(3, 2, 8), torch.randn(3, 2), torch.randn(25, 8), tp, out=scores)
    assert scores.abs().sum() > 0


def test_mixed_inputs_return_torch(rng):
    torch = pytest.importorskip("torch")
    scores = rng.standard_normal((2, 1, 9)).astype(np.float32)
    out = keysel.select_topk(scores, torch.tensor([8, 8], dtype=torch.int32), 3)
    assert isinstance(out, torch.Tensor)


# ---- bad input: keysel.Error naming the argument, out= untouched ---------------------------------------
def select_args(rng, library):
    scores = rng.standard_normal((3, 2, 20)).astype(np.float32)
    positions = np.array([1, 10, 19], np.int32)
    return as_library(scores, library), as_library(positions, library)


def sentinel_out(library, shape=(3, 2, 4)):
    return as_library(np.full(shape, 4242, np.int32), library)


def assert_untouched(out, value=4242):
    assert np.all(to_numpy(out) == value)


def test_wrong_dtype(rng, library):
    scores, positions = select_args(rng, library)
    out = sentinel_out(library)
    with pytest.raises(keysel.Error, match="argument 'scores'"):
        keysel.select_topk(as_library(to_numpy(scores).astype(np.int32), library), positions, 4, out=out)
    with pytest.raises(keysel.Error, match="argument 'positions'"):
        keysel.select_topk(scores, as_library(to_numpy(positions).astype(np.int64), library), 4, out=out)
    with pytest.raises(keysel.Error, match="argument 'out'"):
        keysel.select_topk(scores, positions, 4, out=as_library(np.zeros((3, 2, 4), np.float32), library))
    assert_untouched(out)


def test_wrong_rank(rng, library):
    scores, positions = select_args(rng, library)
    out = sentinel_out(library)
    with pytest.raises(keysel.Error, match="argument 'scores'"):
        keysel.select_topk(scores[0], positions, 4, out=out)
    q, k, v, pos = attention_inputs(rng)
    with pytest.raises(keysel.Error, match="argument 'q'"):
        keysel.exact_topk(as_library(q[0], library), as_library(k, library), as_library(pos, library), 4)
    with pytest.raises(keysel.Error, match="argument 'k_cache'"):
        keysel.metrics(as_library(q, library), as_library(k[0], library), None, as_library(pos, library),
                       np.zeros((5, 3, 4), np.int32), 4)
    assert_untouched(out)


def test_k_out_of_range(rng, library):
    scores, positions = select_args(rng, library)
    out = sentinel_out(library)
    for k in (0, -3):
        with pytest.raises(keysel.Error, match="argument 'k'"):
            keysel.select_topk(scores, positions, k, out=out)
    with pytest.raises(keysel.Error, match="n_sink"):
        keysel.select_topk(scores, positions, 4, n_sink=3, n_local=2, out=out)
    with pytest.raises(keysel.Error, match="argument 'n_local'"):
        keysel.select_topk(scores, positions, 4, n_local=-1, out=out)
    assert_untouched(out)


def test_mismatched_shapes(rng, library):
    scores, positions = select_args(rng, library)
    out = sentinel_out(library)
    with pytest.raises(keysel.Error, match="argument 'positions'"):
        keysel.select_topk(scores, positions[:2], 4, out=out)
    with pytest.raises(keysel.Error, match="argument 'out'"):
        keysel.select_topk(scores, positions, 5, out=out)            # out is [3, 2, 4]
    assert_untouched(out)
    q, k, v, pos = attention_inputs(rng, t=5, hq=6, hkv=3, n=53, d=24, dv=20)
    selection = keysel.exact_topk(q, k, pos, 4)
    out_attention = as_library(np.full((5, 6, 20), 3.0, np.float32), library)
    with pytest.raises(keysel.Error, match="argument 'v_cache'"):
        keysel.sparse_attention(as_library(q, library), as_library(k, library), as_library(v[:50], library),
                                as_library(selection, library), out=out_attention)
    with pytest.raises(keysel.Error, match="argument 'k_cache'"):
        keysel.exact_topk(as_library(q, library), as_library(k[:, :, :10], library), as_library(pos, library), 4)
    with pytest.raises(keysel.Error, match="argument 'k_cache'"):    # Hq % Hkv != 0
        keysel.exact_topk(as_library(q[:, :5], library), as_library(k, library), as_library(pos, library), 4)
    assert_untouched(out_attention, 3.0)


def test_bad_selection_entries_write_nothing(rng, library):
    q, k, v, pos = attention_inputs(rng, t=5, hq=6, hkv=3, n=53, d=24, dv=20)
    selection = keysel.exact_topk(q, k, pos, 4)
    selection[2, 1, 0] = 53                                          # beyond the cache
    out = as_library(np.full((5, 6, 20), 3.0, np.float32), library)
    with pytest.raises(keysel.Error, match="argument 'selection'"):
        keysel.sparse_attention(as_library(q, library), as_library(k, library), as_library(v, library),
                                as_library(selection, library), out=out)
    assert_untouched(out, 3.0)
    selection[2, 1, 0] = selection[2, 1, 1]                          # a key twice
    with pytest.raises(keysel.Error, match="argument 'selection'"):
        keysel.metrics(q, k, v, pos, selection, 4)


def test_non_contiguous_where_contiguity_is_required(rng, library):
    q = rng.standard_normal((3, 2, 8)).astype(np.float32)
    w = rng.standard_normal((3, 2)).astype(np.float32)
    keys = rng.standard_normal((10, 8)).astype(np.float32)
    wide = np.full((3, 20), 9.0, np.float32)
    out = as_library(wide, library)[:, ::2]                          # [3, 10], stride 2
    with pytest.raises(keysel.Error, match="argument 'out'"):
        keysel.indexer_scores(as_library(q, library), as_library(w, library), as_library(keys, library), out=out)
    assert np.all(to_numpy(as_library(wide, library)) == 9.0)


def test_not_a_tensor_and_bad_keywords(rng):
    scores = rng.standard_normal((2, 1, 9)).astype(np.float32)
    with pytest.raises(keysel.Error, match="argument 'positions'"):
        keysel.select_topk(scores, [8, 8], 3)
    with pytest.raises(keysel.Error, match="argument 'out'"):
        read_only = np.zeros((2, 1, 3), np.int32)
        read_only.flags.writeable = False
        keysel.select_topk(scores, np.array([8, 8], np.int32), 3, out=read_only)
    q, k, _v, pos = attention_inputs(rng)
    with pytest.raises(keysel.Error, match="granularity"):
        keysel.exact_topk(q, k, pos, 3, granularity="per_layer")
    with pytest.raises(keysel.Error, match="argument 'scale'"):
        keysel.exact_topk(q, k, pos, 3, scale=-1.0)
    with pytest.raises(keysel.Error, match="format"):
        keysel.IndexerKeyCache(64, format="fp4")
    with pytest.raises(keysel.Error, match="argument 'dtype'"):
        keysel.indexer_scores(np.zeros((1, 1, 4), np.uint8), np.zeros((1, 1), np.float32),
                              np.zeros((3, 4), np.uint8), dtype="bf16")


def test_key_cache_rejects_bad_keys_and_stays_unchanged(rng):
    cache = keysel.IndexerKeyCache(16, format="int8")
    cache.append(rng.standard_normal((5, 16)).astype(np.float32))
    bad = rng.standard_normal((4, 16)).astype(np.float32)
    bad[2, 3] = np.inf
    with pytest.raises(keysel.Error):
        cache.append(bad)
    with pytest.raises(keysel.Error, match="keys"):
        cache.append(rng.standard_normal((4, 15)).astype(np.float32))
    assert len(cache) == 5


def test_help_and_introspection():
    assert "exact_topk" in keysel.__doc__ and "[T, Hq, D]" in keysel.__doc__
    for function in (keysel.select_topk, keysel.exact_topk, keysel.indexer_scores, keysel.sparse_attention,
                     keysel.metrics, keysel.make_selector, keysel.load_dump, keysel.run_study):
        assert "[" in function.__doc__ or "dict" in function.__doc__
    assert keysel.simd_level() in ("scalar", "avx2", "avx512")
    previous = keysel.num_threads()
    keysel.set_num_threads(1)
    assert keysel.num_threads() == 1
    keysel.set_num_threads(previous)
    assert isinstance(keysel.built_with_cuda(), bool)
    # keysel.torch is imported explicitly, never by `import keysel` (which also never imports torch).
    import subprocess
    import sys

    probe = "import sys, keysel; print('keysel.torch' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert result.stdout.split() == ["False", "False"]


def test_committed_stub_matches_the_module(tmp_path):
    """python/keysel/_C.pyi is nanobind's stubgen output for the _C that was built (docs/python.md)."""
    import pathlib
    import subprocess
    import sys

    pytest.importorskip("nanobind.stubgen", reason=f"nanobind is not installed for {sys.executable} (the build's "
                                                    "Python, which has it, runs this test: ctest's python.pytest)")
    committed = pathlib.Path(__file__).resolve().parents[2] / "python" / "keysel" / "_C.pyi"
    generated = tmp_path / "_C.pyi"
    subprocess.run([sys.executable, "-m", "nanobind.stubgen", "-q", "-m", "keysel._C", "-o", str(generated)],
                   check=True)
    assert generated.read_text() == committed.read_text(), "regenerate python/keysel/_C.pyi (docs/python.md)"


def test_the_package_under_test_is_the_one_just_built():
    """Under ctest (python.pytest), keysel must come from the build tree, not from an older installed copy."""
    import os
    import pathlib

    build = os.environ.get("KEYSEL_EXPECT_BUILD_DIR")
    location = pathlib.Path(keysel.__file__).resolve()
    if build is not None:
        assert location.is_relative_to(pathlib.Path(build).resolve()), location
    assert location.parent.name == "keysel"


def test_arrays_keysel_cannot_view_are_refused_by_name(rng):
    scores = rng.standard_normal((2, 1, 20)).astype(np.float32)
    positions = np.array([19, 19], np.int32)
    out = np.full((2, 1, 3), 4242, np.int32)
    for bad, what in [(scores[:, :, ::-1], "non-negative strides"), (scores.astype(">f4"), "native byte order"),
                      (scores > 0, "float32"), (scores.astype(np.int64), "float32")]:
        with pytest.raises(keysel.Error, match=f"argument 'scores'.*{what}"):
            keysel.select_topk(bad, positions, 3, out=out)
    assert_untouched(out)

"""Shared helpers of keysel's Python tests: seeded inputs of awkward sizes, in NumPy or torch."""

import importlib.util
import pathlib

import numpy as np
import pytest

import keysel

try:
    import torch
except ImportError:  # the tests that need torch say so
    torch = None

LIBRARIES = ["numpy", "torch"]


def _sdpa_takes_gqa():
    """Whether torch.nn.functional.scaled_dot_product_attention exists (torch >= 2.0) and takes enable_gqa
    (torch >= 2.5). ctest's python.pytest_oldest_torch runs these tests on torch 1.13, which has neither."""
    sdpa = getattr(getattr(torch, "nn", None) and torch.nn.functional, "scaled_dot_product_attention", None)
    if sdpa is None:
        return False
    try:
        sdpa(torch.zeros(1, 2, 1, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), enable_gqa=True)
    except TypeError:
        return False
    return True


TORCH_VERSION = None if torch is None else torch.__version__
SDPA_TAKES_GQA = torch is not None and _sdpa_takes_gqa()
TORCH_FLOAT8 = torch is not None and hasattr(torch, "float8_e4m3fn") and hasattr(torch, "float8_e5m2")
needs_torch_float8 = pytest.mark.skipif(
    not TORCH_FLOAT8, reason="torch is not installed" if torch is None else
    f"torch.float8_e4m3fn and float8_e5m2 need torch >= 2.1 (this is torch {TORCH_VERSION})")


def as_library(array, library):
    """The same values as a NumPy array or a torch CPU tensor (sharing memory)."""
    if library == "numpy":
        return array
    if torch is None:
        pytest.skip("torch is not installed (python/requirements.txt pins it)")
    return torch.from_numpy(np.ascontiguousarray(array))


def to_numpy(x):
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


@pytest.fixture(params=LIBRARIES)
def library(request):
    return request.param


@pytest.fixture
def rng(request):
    # A fresh seed per test, printed on failure, so every run draws new inputs.
    seed = np.random.SeedSequence().entropy % (2**32)
    request.node.user_properties.append(("seed", seed))
    print(f"seed {seed}")
    return np.random.default_rng(seed)


def attention_inputs(rng, t=5, hq=6, hkv=3, n=53, d=24, dv=20, spread=2.0):
    """q [T, Hq, D], k [N, Hkv, D], v [N, Hkv, Dv] float32 and positions int32 [T] (some beyond N - 1)."""
    q = (rng.standard_normal((t, hq, d)) * spread).astype(np.float32)
    k = rng.standard_normal((n, hkv, d)).astype(np.float32)
    v = rng.standard_normal((n, hkv, dv)).astype(np.float32)
    positions = np.sort(rng.integers(0, n + 5, size=t)).astype(np.int32)
    positions[0] = 0
    return q, k, v, positions


def load_training_module():
    """tools/train_tiny_lm.py as a module (it needs torch; tools/ is not a package)."""
    path = pathlib.Path(__file__).resolve().parents[2] / "tools" / "train_tiny_lm.py"
    spec = importlib.util.spec_from_file_location("train_tiny_lm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module

"""Shared helpers of the tests of tools/: the package held out of training data."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools"))


@pytest.fixture(scope="session")
def heldout_package():
    """A package of the interpreter's site-packages to hold out (the training script reads the same place)."""
    import train_tiny_lm as tl  # needs torch: imported by the tests that skip without it first
    root = tl.site_packages()
    for name in ("networkx", "pytest", "numpy", "_pytest"):
        if os.path.isdir(os.path.join(root, name)):
            return name
    pytest.fail(f"no package to hold out under {root}")

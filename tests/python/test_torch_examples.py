"""The scripts of examples/python run and print what they promise."""
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest

from conftest import SDPA_TAKES_GQA, TORCH_VERSION

ROOT = pathlib.Path(__file__).resolve().parents[2]


def missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


def needs(*modules, sdpa_gqa=False):
    """Skips unless this Python has `modules` (and, with sdpa_gqa, a torch whose scaled_dot_product_attention takes
    enable_gqa: torch >= 2.5, which tools/train_tiny_lm.py's full attention calls)."""
    lacking = [f"{m} (not installed for {sys.executable})" for m in missing(*modules)]
    if sdpa_gqa and not SDPA_TAKES_GQA:
        lacking.append(f"F.scaled_dot_product_attention(enable_gqa=True) (torch >= 2.5; this is torch {TORCH_VERSION})")
    return pytest.mark.skipif(bool(lacking), reason="the example needs " + ", ".join(lacking))


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "python" / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@needs("torch", "transformers")
def test_topk_decoding_prints_both_continuations_and_layer_metrics():
    out = run("topk_decoding.py", "--k", "8", "--prompt-tokens", "20", "--new-tokens", "4")
    assert "backend keysel" in out
    assert re.search(r"full attention : \[(\d+, ){3}\d+\]", out)
    assert re.search(r"top-k attention: \[(\d+, ){3}\d+\]", out)
    rows = re.findall(r"^(\d+|all)\s+(\d+)\s+([\d.]+)", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["0", "1", "2", "3", "all"]
    assert all(int(r[1]) == (20 + 3) * 2 for r in rows[:4])  # prefill and decode rows x 2 key/value heads
    assert all(float(r[2]) == 1.0 for r in rows)              # the exact top-k has recall 1


@needs("torch", "safetensors", sdpa_gqa=True)
def test_the_study_script_matches_the_cpp_bits_per_byte():
    out = run("study_tiny_lm.py")
    assert re.search(r"full attention 1\.\d+ bits per byte", out)
    diffs = re.findall(r"difference ([-+][\d.]+e-\d+)\)", out)
    assert len(diffs) == 2 and all(abs(float(d)) < 5e-6 for d in diffs)

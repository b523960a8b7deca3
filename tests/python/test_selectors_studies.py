"""keysel.make_selector, keysel.load_dump and keysel.run_study."""

import json
import struct

import numpy as np
import pytest

import keysel
import reference
from conftest import as_library, attention_inputs, to_numpy


def test_exact_selector_equals_exact_topk(rng, library):
    q, k, _v, positions = attention_inputs(rng, t=4, hq=6, hkv=3, n=45, d=16)
    selector = keysel.make_selector({"type": "exact"})
    assert selector.name == "exact"
    out = selector.select(as_library(q, library), as_library(k, library), as_library(positions, library), 7,
                          n_sink=1)
    pbar = reference.group_mean(reference.probabilities(q, k, positions), "per_kv_head", 3)
    reference.assert_same_selection(to_numpy(out), reference.select_topk(pbar, positions, 7, 1), pbar)
    assert selector.last_cost["rows"] == 4 * 3


def test_streaming_selector_from_json_text_keeps_sinks_and_recent_keys(rng):
    q, k, _v, positions = attention_inputs(rng, t=3, hq=2, hkv=1, n=40, d=8)
    positions = np.array([3, 20, 39], np.int32)
    selector = keysel.make_selector('{"type": "streaming", "n_sink": 2}')
    out = selector.select(q, k, positions, 6, granularity="per_token", cache="fresh")
    np.testing.assert_array_equal(out[0, 0], [0, 1, 2, 3, -1, -1])
    np.testing.assert_array_equal(out[1, 0], [0, 1, 17, 18, 19, 20])
    np.testing.assert_array_equal(out[2, 0], [0, 1, 36, 37, 38, 39])


def test_indexer_selector_per_call_inputs(rng):
    """An "indexer" spec over trained tensors reads each call's q_index / weights (SelectionRequest)."""
    t, hi, di, n = 3, 4, 32, 50
    q, k, _v, positions = attention_inputs(rng, t=t, hq=2, hkv=1, n=n, d=8)
    q_index = rng.standard_normal((t, hi, di)).astype(np.float32)
    k_index = rng.standard_normal((n, di)).astype(np.float32)
    weights = rng.standard_normal((t, hi)).astype(np.float32)
    selector = keysel.make_selector({"type": "indexer", "format": "fp32"}, indexer=(q_index, k_index, weights))
    out = selector.select(q, k, positions, 5, granularity="per_token", q_index=q_index, weights=weights)
    scores = reference.indexer_scores(q_index, weights, k_index, positions)
    reference.assert_same_selection(out, reference.select_topk(scores[:, None, :], positions, 5), scores[:, None, :],
                                    tolerance=1e-4)


def test_bad_spec_raises_naming_the_key():
    with pytest.raises(keysel.Error, match="bogus"):
        keysel.make_selector({"type": "random", "bogus": 1})
    with pytest.raises(keysel.Error):
        keysel.make_selector({"type": "no-such-selector"})


def write_safetensors(path, tensors, metadata):
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        dtype = {"float32": "F32", "int32": "I32", "float16": "F16"}[str(array.dtype)]
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def test_load_dump_and_study_over_it(rng, tmp_path):
    q, k, v, positions = attention_inputs(rng, t=4, hq=4, hkv=2, n=70, d=16, dv=16)
    positions = np.minimum(positions, 69)            # a dump's positions are < N
    path = tmp_path / "dump.safetensors"
    write_safetensors(path, {"layer3.q": q, "layer3.k": k.astype(np.float16), "layer3.v": v,
                             "layer3.positions": positions},
                      {"format": "keysel-dump/1", "model": "test-model", "scale": "0.25"})
    dump = keysel.load_dump(path)
    assert dump["model"] == "test-model" and dump["scale"] == 0.25
    layer = dump["layers"][0]
    assert layer["index"] == 3 and layer["dtypes"]["k"] == "fp16"
    np.testing.assert_array_equal(layer["q"], q)
    np.testing.assert_array_equal(layer["k"], k.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(layer["positions"], positions)

    config = {"workloads": [{"type": "dump", "path": str(path), "layer": 3}],
              "selectors": [{"type": "exact"}, {"type": "random", "seed": 2}], "k": [4, 16]}
    out_dir = tmp_path / "results"
    results = keysel.run_study(config, out=out_dir)
    for name in ("results.csv", "results.json", "by_row.csv", "report.html"):
        assert (out_dir / name).is_file()
    assert json.loads((out_dir / "results.json").read_text()) == results
    text = json.dumps(results)
    assert "exact" in text and "random" in text and "recall" in text


def test_run_study_from_file_and_bad_config(tmp_path):
    path = tmp_path / "study.json"
    path.write_text(json.dumps({"workloads": [{"type": "synthetic", "keys": 256, "tokens": 2, "query_heads": 4,
                                               "kv_heads": 2, "head_dim": 16, "seed": 3}],
                                "selectors": [{"type": "exact"}], "k": [8]}))
    results = keysel.run_study(str(path))
    assert "exact" in json.dumps(results)
    with pytest.raises(keysel.Error, match="nonsense"):
        keysel.run_study({"workloads": [], "selectors": [], "k": [8], "nonsense": 1})


def test_load_dump_missing_file_raises(tmp_path):
    with pytest.raises(keysel.Error):
        keysel.load_dump(tmp_path / "missing.safetensors")

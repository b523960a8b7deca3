"""tools/selection_overlap.py: union sizes of tiles of selections, the random-selection expectation, the report."""
import itertools
import pathlib
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import selection_overlap as so  # noqa: E402


def test_union_sizes_counts_distinct_keys_per_tile_and_group():
    # rows 0..4, two groups, width 3, -1 padding; tiles of 2 from row 1: rows {1, 2}, {3, 4}
    sel = np.array([[[0, -1, -1], [0, -1, -1]],
                    [[0, 1, -1], [1, -1, -1]],
                    [[0, 2, -1], [1, 2, -1]],
                    [[3, 1, 0], [3, -1, -1]],
                    [[3, 1, 0], [0, 1, 2]]], np.int32)
    sizes = so.union_sizes(sel, 1, 2)
    assert sizes.tolist() == [[3, 2], [3, 4]]
    # a short last tile: rows {3, 4} from first row 3 with tiles of 3 is one tile
    assert so.union_sizes(sel, 3, 3).tolist() == [[3, 4]]


def test_random_union_expectation_matches_enumeration():
    # every selection of counts[t] keys of [0, positions[t]] equally likely: enumerate them all
    positions = np.array([2, 3, 3, 4], np.int32)
    counts = np.array([1, 2, 3, 2])
    expected = so.random_union_expectation(positions, counts, 1, 3)
    choices = [list(itertools.combinations(range(int(positions[t]) + 1), int(counts[t]))) for t in (1, 2, 3)]
    total = 0.0
    n = 0
    for combo in itertools.product(*choices):
        total += len(set().union(*combo))
        n += 1
    assert expected.shape == (1,)
    assert expected[0] == pytest.approx(total / n, rel=1e-12)
    # rows that keep every allowed key: the union is every key
    full = so.random_union_expectation(np.array([1, 2], np.int32), np.array([5, 5]), 0, 2)
    assert full[0] == pytest.approx(3.0)


def test_report_on_the_shipped_dump(capsys):
    dump = ROOT / "models" / "tiny_lm" / "dump.safetensors"
    assert so.main(["--dump", str(dump), "--k", "32", "--tiles", "8", "--rows", "900:1024", "--first-row", "60"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = [line.split("|")[1:-1] for line in lines[2:]]
    # 6 layers x (exact, indexer)
    assert len(rows) == 12
    for cells in rows:
        union, rand, saving = (float(c) for c in cells[4:7])
        assert 1.0 <= union <= 8.0  # between one row's selection and 8 disjoint ones
        assert saving == pytest.approx(8.0 / union, rel=0.01)
        assert rand <= 8.0
    # the model's neighbouring rows share keys: on average their unions are smaller than random ones
    assert np.mean([float(c[4]) for c in rows]) < np.mean([float(c[5]) for c in rows])

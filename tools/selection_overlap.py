#!/usr/bin/env python3
"""How much the selections of neighbouring query rows overlap, per layer of a dump (docs/training.md "GPU speed").

A backward (or forward) kernel over a selection that takes a tile of R consecutive query rows of one selection
group reads the union of their selections; with the per-row selections of a real model that union is far smaller
than R k, with independent random selections it is not. For each layer, selection (the exact top-k per key head,
SPEC §2 `per_kv_head`, and the trained Lightning Indexer's top-k, `per_token`) and tile size R, this prints the
mean union of the tile's selections over k, the same for independent uniform random selections of the same sizes
from the same allowed keys (its expectation, computed exactly), and R k / union (how many times fewer key rows a
tile reads than R rows one at a time).

  --dump PATH      a keysel dump (docs/dumps.md) with q, k (and index_q, index_k, index_w for the indexer)
  --k K [K ...]    keys per row (default 64)
  --tiles R [...]  rows per tile (default 16 64)
  --first-row F    measure tiles from row F on (default: half the dump's rows)
  --rows A:B       keep only query rows A .. B-1 of each layer (all keys) before selecting; --first-row counts
                   from A (a long dump's last rows: --rows 31744:32768)

  PYTHONPATH=build-cpu/python python3 tools/selection_overlap.py --dump models/tiny_lm/dump.safetensors
"""
import argparse
import sys

import numpy as np


def union_sizes(selection, first_row, tile):
    """selection int32 [T, G, W] (-1 padding): [tiles, G] sizes of the union of each tile's rows, per group.

    Tiles are rows first_row + i R .. first_row + (i + 1) R - 1 (the last one may be shorter)."""
    t_rows, groups, _ = selection.shape
    sizes = []
    for start in range(first_row, t_rows, tile):
        block = selection[start:start + tile]
        sizes.append([np.unique(block[:, g][block[:, g] >= 0]).size for g in range(groups)])
    return np.asarray(sizes, dtype=np.int64)


def random_union_expectation(positions, counts, first_row, tile):
    """[tiles] expected union of independent uniform random selections: row t picks counts[t] distinct keys of
    [0, positions[t]]; key s is in the union unless every row that allows it skipped it."""
    t_rows = positions.shape[0]
    out = []
    for start in range(first_row, t_rows, tile):
        rows = range(start, min(start + tile, t_rows))
        top = int(max(positions[t] for t in rows)) + 1
        miss = np.ones(top)
        for t in rows:
            allowed = int(positions[t]) + 1
            miss[:allowed] *= 1.0 - min(int(counts[t]), allowed) / allowed
        out.append(float(np.sum(1.0 - miss)))
    return np.asarray(out)


def layer_selections(keysel, layer, k, scale):
    """{name: int32 [T, G, W]}: the exact top-k per key head and, where the layer has them, the indexer's top-k.

    layer: one of keysel.load_dump(...)["layers"]."""
    positions = layer["positions"]
    out = {"exact (per key head)": keysel.exact_topk(layer["q"], layer["k"], positions, k, granularity="per_kv_head",
                                                     scale=scale)}
    if "index_q" in layer:
        scores = keysel.indexer_scores(layer["index_q"], layer["index_w"], layer["index_k"], positions)
        out["indexer (per token)"] = keysel.select_topk(scores[:, None, :], positions, k)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", required=True)
    parser.add_argument("--k", type=int, nargs="+", default=[64])
    parser.add_argument("--tiles", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--first-row", type=int, default=None)
    parser.add_argument("--rows", default=None)
    args = parser.parse_args(argv)
    import keysel
    dump = keysel.load_dump(args.dump)
    print("| layer | selection | k | R | union / k | random union / k | R k / union |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for layer in dump["layers"]:
        if args.rows:
            begin, end = (int(x) for x in args.rows.split(":"))
            layer = dict(layer, q=np.ascontiguousarray(layer["q"][begin:end]),
                         positions=np.ascontiguousarray(layer["positions"][begin:end]))
            if "index_q" in layer:
                layer["index_q"] = np.ascontiguousarray(layer["index_q"][begin:end])
                layer["index_w"] = np.ascontiguousarray(layer["index_w"][begin:end])
        positions = layer["positions"]
        for k in args.k:
            selections = layer_selections(keysel, layer, k, dump["scale"] or None)
            first = args.first_row if args.first_row is not None else positions.shape[0] // 2
            for name, selection in selections.items():
                counts = (selection >= 0).sum(axis=2)[:, 0]
                for tile in args.tiles:
                    union = union_sizes(selection, first, tile).mean()
                    rand = random_union_expectation(positions, counts, first, tile).mean()
                    print(f"| {layer['index']} | {name} | {k} | {tile} | {union / k:.2f} | {rand / k:.2f} | "
                          f"{tile * k / union:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

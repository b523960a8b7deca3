#!/usr/bin/env python3
"""Read a long-context retrieval study (`keysel study --config examples/studies/tiny_lm_32k.json`) and print the
figures docs/tiny-lm.md "Long-context study" quotes, as Markdown:

  1. exact-match accuracy and bits per byte per selector, k and context, with full attention's;
  2. for each selector, the smallest k from which its accuracy stays at full attention's in every context
     (where the indexer's accuracy saturates);
  3. which controlled-fidelity protocol a selector's misses resemble: the fidelity selectors keep a fraction p of
     the exact top-k (recall p) by dropping random keys or the lowest-ranked ones; at the selector's measured
     recall, the two protocols' bits per byte (and accuracy), interpolated linearly in recall between p = 0.5,
     p = 0.9 and the exact top-k (recall 1) at the same k and context, against the selector's own;
  4. per layer and selection group (head), the mean attention entropy of the scored rows against the exact
     top-k's mass and the indexer's recall, with Pearson correlations over those cells and over single rows.

  --study DIR     the study's output directory (results.json, by_row.csv)
  --indexer NAME  the selector whose recall item 4 reads (default "indexer": the fp32 trained indexer)

  python3 tools/long_context_findings.py --study tiny-lm-32k-study > findings.md
"""
import argparse
import collections
import csv
import json
import math
import os
import sys

FIDELITY = "fidelity[drop={drop},precision={p}]"


def read_results(directory):
    """([context names], {(context, selector, k): {metric: mean}}, {context: full attention means + counts})."""
    with open(os.path.join(directory, "results.json")) as f:
        results = json.load(f)
    contexts, rows, full = [], {}, {}
    for study in results["studies"]:
        name = study["workload"]
        contexts.append(name)
        fa = study["full_attention"]
        full[name] = {"bpb": fa["bpb"]["mean"], "exact_match": fa.get("exact_match", {}).get("mean"),
                      "examples": fa.get("exact_match", {}).get("count")}
        for row in study["rows"]:
            rows[(name, row["selector"], row["k"])] = {m: v["mean"] for m, v in row["metrics"].items()}
    return contexts, rows, full


def pearson(xs, ys):
    n = len(xs)
    if n < 3:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def interpolate(points, x):
    """Linear interpolation of y at x through points [(x, y)] sorted by x; clamped at the ends."""
    points = sorted(points)
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def fmt(x, digits=3):
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def by_row_cells(directory, selectors):
    """{(context, layer, group, selector, k): [entropy, mass, recall] sums and count}, and the rows themselves
    keyed by (context, layer, token, group, selector, k) for the row-level correlations."""
    cells = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    rows = {}
    with open(os.path.join(directory, "by_row.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if row["selector"] not in selectors:
                continue
            context, _, layer = row["workload"].rpartition(" layer ")
            key = (context, int(layer), int(row["group"]), row["selector"], int(row["k"]))
            values = (float(row["entropy"]), float(row["mass"]), float(row["recall"]))
            cell = cells[key]
            for i, v in enumerate(values):
                cell[i] += v
            cell[3] += 1
            rows[(context, int(layer), int(row["token"]), int(row["group"]), row["selector"], int(row["k"]))] = values
    return {key: [s / c[3] for s in c[:3]] for key, c in cells.items()}, rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True)
    ap.add_argument("--indexer", default="indexer")
    args = ap.parse_args()
    contexts, rows, full = read_results(args.study)
    if not contexts or not any(v.get("examples") for v in full.values()):
        sys.exit(f"long_context_findings: --study {args.study}: expected a retrieval task study (exact_match per "
                 f"workload), got workloads {contexts}")
    selectors = list(dict.fromkeys(s for (_, s, _) in rows))
    ks = sorted({k for (_, _, k) in rows})
    out = []

    out += ["## Exact-match accuracy (mean over the examples) per selector and k", ""]
    header = ["selector"] + [f"{c.rpartition(' ')[2]} k={k}" for c in contexts for k in ks]
    lines = [["full attention"] + [fmt(full[c]["exact_match"], 2) for c in contexts for _ in ks]]
    lines += [[s] + [fmt(rows.get((c, s, k), {}).get("exact_match"), 2) for c in contexts for k in ks]
              for s in selectors]
    examples = ", ".join(f"{c.rpartition(' ')[2]}: {full[c]['examples']}" for c in contexts)
    out += [f"Examples per context: {examples}.", "", table(header, lines), ""]

    out += ["## Bits per byte of the sampled prompt rows (in brackets: rows at positions >= 2k)", ""]
    lines = [["full attention"] + [fmt(full[c]["bpb"]) for c in contexts for _ in ks]]
    for s in selectors:
        line = [s]
        for c in contexts:
            for k in ks:
                r = rows.get((c, s, k), {})
                line.append(f"{fmt(r.get('bpb'))} ({fmt(r.get('bpb_sparse'))})" if r else "")
        lines.append(line)
    out += [table(header, lines), ""]

    out += ["## Where accuracy reaches full attention's", "",
            "The smallest k from which a selector's exact match equals full attention's at every larger k studied, "
            "per context (\"never\": not even at the largest k), with its mean recall there.", ""]
    lines = []
    for s in selectors:
        line = [s]
        for c in contexts:
            target = full[c]["exact_match"]
            found = None
            for i, k in enumerate(ks):
                if all(rows.get((c, s, kk), {}).get("exact_match", -1) >= target - 1e-12 for kk in ks[i:]):
                    found = k
                    break
            line.append("never" if found is None else f"{found} (recall {fmt(rows[(c, s, found)].get('recall'))})")
        lines.append(line)
    out += [table(["selector"] + [c.rpartition(" ")[2] for c in contexts], lines), ""]

    out += ["## Which fidelity protocol a selector's misses resemble", "",
            "At the selector's own recall, the bits per byte that dropping random keys and dropping the lowest-ranked "
            "keys of the exact top-k give (interpolated in recall between p = 0.5, p = 0.9 and the exact top-k at "
            "the same k and context). \"closer\": the protocol whose bpb is nearer the selector's.", ""]
    protocols = {}
    for c in contexts:
        for k in ks:
            exact = rows.get((c, "exact", k))
            for drop in ("random", "lowest"):
                pts = []
                for p in ("0.5", "0.9"):
                    r = rows.get((c, FIDELITY.format(drop=drop, p=p), k))
                    if r:
                        pts.append((r["recall"], r["bpb"], r.get("exact_match")))
                if exact and pts:
                    pts.append((1.0, exact["bpb"], exact.get("exact_match")))
                    protocols[(c, k, drop)] = pts
    lines, tally = [], collections.Counter()
    for s in selectors:
        if s == "exact" or s.startswith("fidelity"):
            continue
        for c in contexts:
            for k in ks:
                r = rows.get((c, s, k))
                if not r or (c, k, "random") not in protocols or (c, k, "lowest") not in protocols:
                    continue
                rb = interpolate([(x, y) for x, y, _ in protocols[(c, k, "random")]], r["recall"])
                lb = interpolate([(x, y) for x, y, _ in protocols[(c, k, "lowest")]], r["recall"])
                ra = interpolate([(x, a) for x, _, a in protocols[(c, k, "random")] if a is not None], r["recall"])
                la = interpolate([(x, a) for x, _, a in protocols[(c, k, "lowest")] if a is not None], r["recall"])
                closer = "lowest" if abs(r["bpb"] - lb) < abs(r["bpb"] - rb) else "random"
                em = r.get("exact_match")
                if em is None or abs(em - la) == abs(em - ra):
                    closer_em = "either"
                else:
                    closer_em = "lowest" if abs(em - la) < abs(em - ra) else "random"
                tally[(s, "bpb", closer)] += 1
                tally[(s, "accuracy", closer_em)] += 1
                lines.append([s, c.rpartition(" ")[2], k, fmt(r["recall"]), fmt(r["bpb"]), fmt(rb), fmt(lb), closer,
                              fmt(em, 2), fmt(ra, 2), fmt(la, 2), closer_em])
    out += [table(["selector", "context", "k", "recall", "bpb", "bpb drop=random", "bpb drop=lowest", "closer (bpb)",
                   "exact match", "drop=random", "drop=lowest", "closer (accuracy)"], lines), ""]
    out += ["Cells closer to each protocol, by bits per byte and by accuracy: " +
            "; ".join(f"{s}: bpb random {tally[(s, 'bpb', 'random')]} / lowest {tally[(s, 'bpb', 'lowest')]}, "
                      f"accuracy random {tally[(s, 'accuracy', 'random')]} / lowest {tally[(s, 'accuracy', 'lowest')]}"
                      f" / either {tally[(s, 'accuracy', 'either')]}"
                      for s in dict.fromkeys(s for s, _, _ in tally)) + ".", ""]

    cells, by_row = by_row_cells(args.study, {"exact", args.indexer})
    if cells:
        top_k = max(ks)
        out += [f"## Attention entropy against exact top-k mass and {args.indexer} recall, per layer and group", "",
                f"Cells: (context, layer, group); entropy (nats) of the scored rows' group-mean attention, from the "
                f"exact rows at k = {top_k}. Pearson r over the cells, and over single rows (row entropy against the "
                "row's mass or recall).", ""]
        keys = sorted({(c, layer, g) for (c, layer, g, s, k) in cells if s == "exact" and k == top_k})
        lines = []
        for k in ks:
            ent = [cells[(c, layer, g, "exact", top_k)][0] for c, layer, g in keys if (c, layer, g, "exact", k) in cells]
            mass = [cells[(c, layer, g, "exact", k)][1] for c, layer, g in keys if (c, layer, g, "exact", k) in cells]
            rec = [cells[(c, layer, g, args.indexer, k)][2] for c, layer, g in keys
                   if (c, layer, g, args.indexer, k) in cells]
            ent_i = [cells[(c, layer, g, "exact", top_k)][0] for c, layer, g in keys
                     if (c, layer, g, args.indexer, k) in cells]
            row_e = [v[0] for key, v in by_row.items() if key[4] == "exact" and key[5] == k]
            row_m = [v[1] for key, v in by_row.items() if key[4] == "exact" and key[5] == k]
            row_i = [(by_row[key[:4] + ("exact", k)][0], v[2]) for key, v in by_row.items()
                     if key[4] == args.indexer and key[5] == k and key[:4] + ("exact", k) in by_row]
            lines.append([k, len(ent), fmt(pearson(ent, mass)), fmt(pearson(ent_i, rec)),
                          len(row_e), fmt(pearson(row_e, row_m)), fmt(pearson([a for a, _ in row_i], [b for _, b in row_i]))])
        out += [table(["k", "cells", "r(entropy, exact mass)", f"r(entropy, {args.indexer} recall)", "rows",
                       "r(entropy, exact mass), rows", f"r(entropy, {args.indexer} recall), rows"], lines), ""]
        lines = []
        for c, layer, g in keys:
            line = [c.rpartition(" ")[2], layer, g, fmt(cells[(c, layer, g, "exact", top_k)][0], 2)]
            line += [fmt(cells.get((c, layer, g, "exact", k), [None] * 3)[1]) for k in ks]
            line += [fmt(cells.get((c, layer, g, args.indexer, k), [None] * 3)[2]) for k in ks]
            lines.append(line)
        out += [table(["context", "layer", "group", "entropy"] + [f"exact mass k={k}" for k in ks] +
                      [f"{args.indexer} recall k={k}" for k in ks], lines), ""]
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()

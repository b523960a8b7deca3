#!/usr/bin/env python3
"""Gather the top-k fine-tuning study's `keysel study` outputs into one Markdown report (docs/training.md
"Top-k fine-tuning study").

  --study DIR   the output of `keysel study --config examples/studies/finetune_4k.json` (per_token selections):
                bits per byte per model at each decoding k and selector, the indexers' recall and mass, attention
                entropy per layer
  --heads DIR   optional, the output of examples/studies/finetune_4k_heads.json (per_head): entropy per layer and
                head
  --summary F   optional, tools/finetune_study.py's summary.json: steps, seconds, training loss of each package

Every figure is read from those files; the tables compare each model with the first workload (the base).
  python3 tools/finetune_table.py --study ft-study --heads ft-heads --summary summary.json > finetune.md
"""
import argparse
import collections
import csv
import json
import os
import sys


def read_results(directory):
    with open(os.path.join(directory, "results.json")) as f:
        results = json.load(f)
    models, rows = [], {}
    for study in results["studies"]:
        name = study["workload"]
        models.append(name)
        rows[(name, "full", 0)] = {"bpb": study["full_attention"]["bpb"]["mean"]}
        for row in study["rows"]:
            rows[(name, row["selector"], row["k"])] = {m: v["mean"] for m, v in row["metrics"].items()}
    return models, rows


def entropy_by_layer_group(directory, selector, k):
    """{(model, layer, group): mean entropy (nats)} over by_row.csv's rows of `selector` at `k`."""
    sums = collections.defaultdict(lambda: [0.0, 0])
    with open(os.path.join(directory, "by_row.csv"), newline="") as f:
        for row in csv.DictReader(f):
            if row["selector"] != selector or int(row["k"]) != k:
                continue
            model, _, layer = row["workload"].rpartition(" layer ")
            cell = sums[(model, int(layer), int(row["group"]))]
            cell[0] += float(row["entropy"])
            cell[1] += 1
    return {key: s / n for key, (s, n) in sums.items()}


def fmt(x, digits=4):
    return "" if x is None else f"{x:.{digits}f}"


def table(header, lines):
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", required=True)
    ap.add_argument("--heads", default=None)
    ap.add_argument("--summary", default=None)
    args = ap.parse_args()
    models, rows = read_results(args.study)
    if not models:
        sys.exit(f"finetune_table: --study {args.study}: expected results.json with at least one workload, got none")
    base = models[0]
    selections = sorted({(s, k) for (_, s, k) in rows if s != "full"}, key=lambda sk: (sk[0], sk[1]))
    if not any(s == "exact" for s, _ in selections):
        sys.exit(f"finetune_table: --study {args.study}: expected rows of the exact selector (the entropy table "
                 f"reads them), got selectors {sorted({s for s, _ in selections})}")
    out = []
    if args.summary:
        with open(args.summary) as f:
            packages = json.load(f)["packages"]
        lines = []
        for name in models:
            p = packages.get(name, {})
            lines.append([name, p.get("steps", ""), p.get("seconds") or "", fmt(p.get("final_train_loss_bits_per_byte")),
                          fmt(p.get("eval_bpb_full")), fmt(p.get("heldout_bpb_full"))])
        out += ["## Training (summary.json)", "", table(["model", "steps", "seconds", "final train loss (bits/byte)",
                                                       "eval.txt bpb, full", "held-out bpb, full"], lines), ""]

    out += ["## Bits per byte of top-k decoding (sampled rows; in brackets: rows at positions >= 2k)", ""]
    lines = []
    for name in models:
        line = [name, fmt(rows[(name, "full", 0)]["bpb"])]
        for s, k in selections:
            r = rows.get((name, s, k), {})
            line.append(f"{fmt(r.get('bpb'))} ({fmt(r.get('bpb_sparse'))})")
        lines.append(line)
    out += [table(["model", "full attention"] + [f"{s} k={k}" for s, k in selections], lines), ""]

    out += ["## Change against the base (negative: fewer bits); top-k columns: bpb_increase over the model's own "
            "full attention", ""]
    lines = []
    for name in models:
        line = [name, fmt(rows[(name, "full", 0)]["bpb"] - rows[(base, "full", 0)]["bpb"], 4)]
        for s, k in selections:
            r, b = rows.get((name, s, k), {}), rows.get((base, s, k), {})
            line.append(f"{fmt(r.get('bpb', 0) - b.get('bpb', 0))} / {fmt(r.get('bpb_increase'))}"
                        if r and b else "")
        lines.append(line)
    out += [table(["model", "full attention vs base"] + [f"{s} k={k}: vs base / vs own full" for s, k in selections],
                  lines), ""]

    indexer = [(s, k) for s, k in selections if s != "exact"]
    if indexer:
        out += ["## Indexer recall and mass (SPEC section 4, against the exact top-k of each model)", ""]
        lines = [[name] + [f"{fmt(rows.get((name, s, k), {}).get('recall'))} / "
                           f"{fmt(rows.get((name, s, k), {}).get('mass'))}" for s, k in indexer] for name in models]
        out += [table(["model"] + [f"{s} k={k}: recall / mass" for s, k in indexer], lines), ""]

    exact_k = max(k for s, k in selections if s == "exact")
    ent = entropy_by_layer_group(args.study, "exact", exact_k)
    layers = sorted({layer for (_, layer, _) in ent})
    out += [f"## Attention entropy per layer (nats, head-mean distribution, exact k={exact_k} rows)", ""]
    lines = []
    for name in models:
        values = [ent.get((name, layer, 0)) for layer in layers]
        mean = sum(v for v in values if v is not None) / max(1, sum(v is not None for v in values))
        base_values = [ent.get((base, layer, 0)) for layer in layers]
        base_mean = sum(v for v in base_values if v is not None) / max(1, sum(v is not None for v in base_values))
        lines.append([name] + [fmt(v, 3) for v in values] + [fmt(mean, 3), fmt(mean - base_mean, 3)])
    out += [table(["model"] + [f"layer {layer}" for layer in layers] + ["mean", "mean vs base"], lines), ""]

    if args.heads:
        head_models, head_rows = read_results(args.heads)
        ks = sorted({k for (_, s, k) in head_rows if s == "exact"})
        if not ks:
            sys.exit(f"finetune_table: --heads {args.heads}: expected rows of the exact selector, got none")
        heads = entropy_by_layer_group(args.heads, "exact", ks[0])
        groups = sorted({(layer, group) for (_, layer, group) in heads})
        out += [f"## Attention entropy per layer and head (nats, per_head, exact k={ks[0]} rows); "
                "after the base, each model's change against it", ""]
        lines = [[head_models[0]] + [fmt(heads.get((head_models[0], lg[0], lg[1])), 3) for lg in groups]]
        for name in head_models[1:]:
            lines.append([name] + [fmt(heads[(name, *lg)] - heads[(head_models[0], *lg)], 3)
                                   if (name, *lg) in heads and (head_models[0], *lg) in heads else ""
                                   for lg in groups])
        out += [table(["model"] + [f"L{layer}H{group}" for layer, group in groups], lines), ""]
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()

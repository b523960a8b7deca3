#!/usr/bin/env python3
"""Gather the top-k fine-tuning study's figures into one Markdown report (docs/training.md "Top-k fine-tuning
study"): tools/finetune_study.py's summary.json alone (--summary), or with the `keysel study` outputs (--study).

  --study DIR   the output of `keysel study --config examples/studies/finetune_4k.json` (per_token selections):
                bits per byte per model at each decoding k and selector, the indexers' recall and mass, attention
                entropy per layer
  --heads DIR   optional, the output of examples/studies/finetune_4k_heads.json (per_head): entropy per layer and
                head
  --summary F   tools/finetune_study.py's summary.json: steps, seconds, training loss of each package; without
                --study also its own evaluation: bits per byte at each decoding k and selector, retrieval exact
                match per mode and context, indexer recall, attention entropy per layer and head and exact top-k
                mass, and whether the entropy change goes with the gain (Pearson r over the packages)

Every figure is read from those files; the tables compare each model with the first workload (the base).
  python3 tools/finetune_table.py --summary summary.json > finetune.md
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


SELECTIONS = ("exact_64", "exact_256", "indexer_64", "indexer_256")


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def pearson(xs, ys):
    """Pearson's r of the pairs with both values, or None with fewer than 3 pairs or no spread."""
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pairs) < 3:
        return None
    mx, my = mean([x for x, _ in pairs]), mean([y for _, y in pairs])
    sxy = sum((x - mx) * (y - my) for x, y in pairs)
    sxx = sum((x - mx) ** 2 for x, _ in pairs)
    syy = sum((y - my) ** 2 for _, y in pairs)
    return sxy / (sxx * syy) ** 0.5 if sxx > 0 and syy > 0 else None


def diff(a, b):
    return None if a is None or b is None else a - b


def summary_report(summary):
    """The Markdown tables of summary.json's own evaluation (tools/finetune_study.py), base first."""
    packages = {n: p for n, p in summary["packages"].items() if "eval_bpb_full" in p}
    if "base" not in packages:
        sys.exit("finetune_table: --summary: expected an evaluated package named 'base', got "
                 f"{sorted(summary['packages'])}")
    names = ["base"] + [n for n in packages if n != "base"]
    base = packages["base"]
    control = packages.get("control-full")
    context = summary.get("context")
    out = [f"## Evaluation in summary.json (windows of {context} bytes; {summary.get('device')}, "
           f"budget {summary.get('budget_seconds')} s, {summary.get('total_seconds')} s in all)", ""]
    skipped = {n: p for n, p in summary["packages"].items() if n not in packages}
    if skipped:
        out += ["Not evaluated: " + "; ".join(f"{n} ({p.get('skipped') or p.get('error')})"
                                              for n, p in skipped.items()), ""]
    lines = [[n, packages[n].get("steps", ""), packages[n].get("seconds") or "",
              fmt(packages[n].get("final_train_loss_bits_per_byte")),
              fmt(packages[n].get("final_train_answer_exact_match"), 3), fmt(packages[n]["heldout_bpb_full"])]
             for n in names]
    out += ["### Training", "", table(["model", "steps", "seconds", "final train loss (bits/byte)",
                                       "train answers exact (last log)", "held-out bpb, full"], lines), ""]

    out += ["### Bits per byte of eval.txt (every layer top-k, per_token); in brackets: against the model's own "
            "full attention", ""]
    lines = []
    for n in names:
        p = packages[n]
        lines.append([n, fmt(p["eval_bpb_full"])] +
                     [f"{fmt(p[f'eval_bpb_{m}'])} ({fmt(p[f'eval_bpb_{m}'] - p['eval_bpb_full'])})"
                      for m in SELECTIONS])
    out += [table(["model", "full"] + [m.replace("_", " k=") for m in SELECTIONS], lines), ""]
    refs = [("base", base)] + ([("control-full", control)] if control else [])
    for ref_name, ref in refs:
        lines = [[n, fmt(packages[n]["eval_bpb_full"] - ref["eval_bpb_full"])] +
                 [fmt(packages[n][f"eval_bpb_{m}"] - ref[f"eval_bpb_{m}"]) for m in SELECTIONS]
                 for n in names if n != ref_name]
        out += [f"Change against {ref_name} (negative: fewer bits):", "",
                table(["model", "full"] + [m.replace("_", " k=") for m in SELECTIONS], lines), ""]

    modes = ["full"] + list(SELECTIONS)
    contexts = sorted({int(c) for p in packages.values()
                       for c in p.get("retrieval", {}).get("examples_by_context", {})})
    if contexts:
        out += ["### Retrieval exact match (teacher-forced argmax of the 8 answer bytes; examples per context in "
                "the header)", ""]
        counts = base.get("retrieval", {}).get("examples_by_context", {})
        header = ["model", "mode"] + [f"{c} ({counts.get(str(c), 0)})" for c in contexts] + ["all"]
        lines = []
        for n in names:
            ret = packages[n].get("retrieval", {})
            if "error" in ret:
                out.append(f"{n}: retrieval evaluation failed ({ret['error'][:200]})")
            for m in modes:
                em = ret.get("exact_match", {}).get(m, {})
                lines.append([n, m] + [fmt(em.get("by_context", {}).get(str(c)), 3) for c in contexts] +
                             [fmt(em.get("all"), 3)])
        out += [table(header, lines), ""]
        timing = base.get("retrieval", {}).get("seconds_per_example", {})
        out += ["Seconds per example (base): " + "; ".join(
            f"{m} " + ", ".join(f"{c}: {v}" for c, v in timing.get(m, {}).items()) for m in modes), ""]

    ks = sorted({k for p in packages.values() for layer in p["indexer_recall"].values() for k in layer}, key=int)
    lines = [[n] + [fmt(mean([layer.get(k, {}).get("recall") for layer in packages[n]["indexer_recall"].values()]))
                    for k in ks] for n in names]
    out += ["### Indexer recall (SPEC section 4, mean over layers, positions >= k)", "",
            table(["model"] + [f"recall@{k}" for k in ks], lines), ""]

    stats = {n: packages[n]["attention_statistics"] for n in names}
    layers = len(stats["base"]["entropy_heads"])
    heads = len(stats["base"]["entropy_heads"][0])
    lines = []
    for n in names:
        st = stats[n]
        per_layer = [mean(h) for h in st["entropy_heads"]]
        lines.append([n] + [fmt(v, 3) for v in per_layer] + [fmt(mean(per_layer), 3),
                                                             fmt(mean(st["entropy_pbar"]), 3)] +
                     [fmt(mean(st["exact_mass"].get(str(k), {}).get("pbar") or [None]), 3) for k in (64, 256)])
    out += [f"### Attention entropy (nats, mean over query rows of eval.txt in windows of "
            f"{stats['base']['context']}; per layer the mean over heads) and exact top-k mass of pbar", "",
            table(["model"] + [f"layer {i}" for i in range(layers)] + ["mean", "pbar (head mean)", "mass@64",
                                                                         "mass@256"], lines), ""]
    lines = [["base"] + [fmt(stats["base"]["entropy_heads"][i][h], 3) for i in range(layers) for h in range(heads)]]
    for n in names[1:]:
        lines.append([n] + [fmt(stats[n]["entropy_heads"][i][h] - stats["base"]["entropy_heads"][i][h], 3)
                            for i in range(layers) for h in range(heads)])
    out += ["### Entropy per layer and head (nats); after the base, each model's change against it", "",
            table(["model"] + [f"L{i}H{h}" for i in range(layers) for h in range(heads)], lines), ""]

    # does the entropy fall, and does it predict the gain?
    def head_mean(n):
        return mean([v for h in stats[n]["entropy_heads"] for v in h])

    lines = []
    for n in names[1:]:
        p = packages[n]
        own = f"{p.get('selector')}_{p.get('k')}" if p.get("k") else None
        fell = sum(stats[n]["entropy_heads"][i][h] < stats["base"]["entropy_heads"][i][h]
                   for i in range(layers) for h in range(heads))
        row = [n, fmt(head_mean(n) - head_mean("base"), 3), f"{fell}/{layers * heads}",
               fmt(diff(mean(stats[n]["entropy_pbar"]), mean(stats["base"]["entropy_pbar"])), 3)]
        for m in ([own] if own in SELECTIONS else []) or ["exact_64"]:
            gain = base[f"eval_bpb_{m}"] - p[f"eval_bpb_{m}"]
            gain_c = control[f"eval_bpb_{m}"] - p[f"eval_bpb_{m}"] if control and n != "control-full" else None
            em = p.get("retrieval", {}).get("exact_match", {}).get(m, {}).get("all")
            em_b = base.get("retrieval", {}).get("exact_match", {}).get(m, {}).get("all")
            row += [m, fmt(gain), fmt(gain_c), fmt(diff(em, em_b), 3)]
        lines.append(row)
    out += ["### Entropy change against the gain (each model against the base; the gain at the model's own "
            "training selection, exact k=64 for the control)", "",
            table(["model", "mean head entropy change", "heads whose entropy fell", "pbar entropy change",
                   "selection", "bpb gain vs base", "bpb gain vs control", "retrieval exact match change"], lines),
            ""]
    entropies = [head_mean(n) for n in names]
    lines = []
    for m in SELECTIONS:
        penalty = [packages[n][f"eval_bpb_{m}"] - packages[n]["eval_bpb_full"] for n in names]
        em = [packages[n].get("retrieval", {}).get("exact_match", {}).get(m, {}).get("all") for n in names]
        lines.append([m, fmt(pearson(entropies, penalty), 3), fmt(pearson(entropies, em), 3)])
    out += [f"Pearson r over the {len(names)} models between the mean head entropy and the top-k penalty (top-k bpb "
            "minus the model's full-attention bpb) and the top-k retrieval exact match (positive r with the "
            "penalty: lower entropy, smaller penalty):", "",
            table(["selection", "r(entropy, bpb penalty)", "r(entropy, retrieval exact match)"], lines), ""]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--study", default=None)
    ap.add_argument("--heads", default=None)
    ap.add_argument("--summary", default=None)
    args = ap.parse_args()
    if args.study is None:
        if args.summary is None:
            sys.exit("finetune_table: expected --summary (summary.json) and/or --study (a keysel study output), "
                     "got neither")
        with open(args.summary) as f:
            sys.stdout.write("\n".join(summary_report(json.load(f))))
        return
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

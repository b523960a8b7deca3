#!/usr/bin/env python3
"""Train every model of the top-k fine-tuning study (docs/training.md "Top-k fine-tuning study") on one GPU within a
wall-clock budget, from a shipped package (--init, default models/tiny_lm).

Each variant starts from the same weights and sees the same batches (tools/train_tiny_lm.py's finetune, per_token
selections, every layer's indexer trained beside the model):
  full         the control: full attention, the indexer on the dense KL (it follows the model)
  exact:K      top-K attention by the exact top-k of the head-mean attention, the indexer on the dense KL
  indexer:K    top-K attention by the layer's Lightning Indexer, the indexer on the KL over its own selection
               (DeepSeek's sparse stage)
--variants picks them (default exact:64, full, indexer:64, exact:256: the packages examples/studies/finetune_4k.json
compares). The first variant trains for its share of the budget; the others train for as many steps (or their share of what
is left, if that ends first: the summary gives every variant's steps and seconds). Each becomes a package in
models/tiny_lm's format under --out/<name> (fp16 weights, eval.txt, logits.safetensors, train_log.json; no dump),
next to summary.json: per package (the base included) steps, seconds, final training loss, and bits per byte of
eval.txt with full attention and with top-k attention at k = 64 and 256 (exact and indexer selections), of the
held-out bytes with full attention, and the indexers' recall. With --pack DIR, --out goes into DIR as one tar in
parts of at most --part-mib MiB (reassemble with `cat finetune_packages.tar.part* | tar -x`), beside summary.json.

  python3 tools/finetune_study.py --out /tmp/finetune --pack "$OUT" --budget-seconds 420
"""
import time

_T_START = time.time()  # the budget counts from here

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_tiny_lm as tl  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_variant(text):
    """"full", "exact:K" or "indexer:K" -> (name, attention mode, k, selector)."""
    if text == "full":
        return "control-full", "full", None, "exact"
    selector, _, k = text.partition(":")
    if selector not in ("exact", "indexer") or not k.isdigit() or int(k) < 1:
        raise argparse.ArgumentTypeError(f"a variant is 'full', 'exact:K' or 'indexer:K' (K >= 1), got {text!r}")
    return f"{selector}-k{k}", "topk", int(k), selector


def make_parser():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", default=os.path.join(REPO, "models", "tiny_lm"), help="the base package")
    ap.add_argument("--out", required=True, help="directory of the packages and summary.json")
    ap.add_argument("--pack", default=None, help="write --out as a tar in parts here, with summary.json")
    ap.add_argument("--part-mib", type=int, default=16, help="the largest tar part, MiB")
    ap.add_argument("--budget-seconds", type=float, default=420,
                    help="the whole run from the start of the process: start-up, data, every variant, the packing")
    ap.add_argument("--reserve-seconds", type=float, default=15, help="kept for summary and packing at the end")
    ap.add_argument("--export-seconds", type=float, default=15,
                    help="first guess of one package's evaluation and export (then the measured time)")
    ap.add_argument("--variants", default="exact:64,full,indexer:64,exact:256",
                    help="comma-separated, in training order; the first sets the steps of the others")
    ap.add_argument("--batch", type=int, default=8, help="rows of --context bytes per step")
    ap.add_argument("--finetune-lr", type=float, default=3e-4)
    ap.add_argument("--finetune-warmup", type=int, default=20)
    ap.add_argument("--finetune-indexer-lr", type=float, default=1e-3)
    ap.add_argument("--corpus-bytes", type=int, default=100_000_000)
    ap.add_argument("--heldout", default="networkx")
    ap.add_argument("--heldout-eval-bytes", type=int, default=1_000_000)
    ap.add_argument("--logit-tokens", type=int, default=512)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    return ap


def training_args(args):
    """train_tiny_lm's options (its defaults, then this study's)."""
    targs = tl.make_parser().parse_args(["--out", args.out, "--init", args.init])
    for name in ("batch", "finetune_lr", "finetune_warmup", "finetune_indexer_lr", "corpus_bytes", "heldout",
                 "heldout_eval_bytes", "logit_tokens", "log_every", "seed"):
        setattr(targs, name, getattr(args, name))
    return targs


def summary_entry(info):
    ft = info.get("finetune", {})
    entry = {k: ft.get(k) for k in ("attention", "k", "selector", "indexer_loss", "steps", "tokens", "seconds",
                                    "final_train_loss_bits_per_byte")}
    entry.update(info["evaluation"])
    return entry


def pack(out, pack_dir, part_bytes):
    """--out as one uncompressed tar (paths relative to --out) split into parts of at most part_bytes."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in sorted(os.listdir(out)):
            tar.add(os.path.join(out, name), arcname=name)
    data = buffer.getvalue()
    os.makedirs(pack_dir, exist_ok=True)
    parts = []
    for i in range(0, len(data), part_bytes):
        path = os.path.join(pack_dir, f"finetune_packages.tar.part{i // part_bytes:03d}")
        tl.write_bytes(path, data[i:i + part_bytes])
        parts.append(os.path.basename(path))
    return parts, len(data)


def main():
    ap = make_parser()
    args = ap.parse_args()
    try:
        variants = [parse_variant(v.strip()) for v in args.variants.split(",") if v.strip()]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if not variants:
        ap.error("--variants is empty")
    if len({v[0] for v in variants}) != len(variants):
        ap.error(f"--variants repeats a variant: {args.variants}")
    if args.part_mib < 1:
        ap.error(f"--part-mib must be >= 1, got {args.part_mib}")
    budget_end = _T_START + args.budget_seconds
    device, common = tl.start_run(args.out, args.seed, "study.log")
    common["init"] = args.init
    targs = training_args(args)
    cfg, base = tl.load_package(args.init, device)
    with open(os.path.join(args.init, "eval.txt"), "rb") as f:
        eval_text = f.read()
    data_info = {}
    corpus, _, _, heldout_eval = tl.load_data(targs, data_info)
    data = torch.tensor(np.frombuffer(corpus, dtype=np.uint8), device=device)
    del corpus
    summary = {"budget_seconds": args.budget_seconds, "batch": args.batch, "context": cfg.context,
               "granularity": "per_token", "device": common["device"], "torch": common["torch"],
               "init": args.init, "data": data_info["data"], "packages": {}}

    def evaluate(model):
        torch.backends.cuda.matmul.allow_tf32 = False
        _, model32 = tl.rounded_fp16(model)
        result = tl.evaluate_package(model32.to(device), eval_text, heldout_eval, device)
        torch.backends.cuda.matmul.allow_tf32 = True
        return result

    start = time.time()
    summary["packages"]["base"] = dict(summary_entry({"evaluation": evaluate(base)}), steps=0)
    tl.log(f"base: {summary['packages']['base']}")
    export_seconds = max(args.export_seconds, time.time() - start)
    first_steps = None
    for i, (name, mode, k, selector) in enumerate(variants):
        left = budget_end - args.reserve_seconds - time.time()
        seconds = left / (len(variants) - i) - export_seconds
        if seconds <= 0:
            tl.log(f"{name}: skipped, {left:.0f}s left for {len(variants) - i} variants")
            summary["packages"][name] = {"skipped": f"no time left ({left:.0f}s for {len(variants) - i} variants)"}
            continue
        info = dict(common, variant=name)
        attention = tl.TrainingAttention(cfg, mode, k=k, selector=selector,
                                         indexer_loss="sparse" if selector == "indexer" and mode == "topk"
                                         else "dense")
        model = copy.deepcopy(base)
        tl.log(f"{name}: {attention.describe()}, up to {seconds:.0f}s"
               f"{'' if first_steps is None else f' or {first_steps} steps'}")
        try:
            steps = tl.finetune(model, data, targs, device, info, attention, seconds, first_steps)
        except torch.cuda.OutOfMemoryError as e:
            tl.log(f"{name}: out of memory at batch {targs.batch} ({e}); skipped")
            summary["packages"][name] = {"error": f"out of memory at batch {targs.batch}"}
            del model
            torch.cuda.empty_cache()
            continue
        if first_steps is None:
            first_steps = steps
        t0 = time.time()
        info["evaluation"] = evaluate(model)
        info["total_seconds"] = round(time.time() - _T_START, 1)
        state16, _ = tl.rounded_fp16(model)
        tl.write_package(os.path.join(args.out, name), state16, cfg, eval_text, info, args.logit_tokens)
        export_seconds = max(export_seconds, time.time() - t0)
        summary["packages"][name] = summary_entry(info)
        tl.log(f"{name}: {summary['packages'][name]} (evaluation and export {time.time() - t0:.0f}s)")
        del model
        if device.type == "cuda":
            summary["packages"][name]["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            torch.cuda.empty_cache()
    summary["total_seconds"] = round(time.time() - _T_START, 1)
    tl.write_json(os.path.join(args.out, "summary.json"), summary)
    tl.log(f"summary {os.path.join(args.out, 'summary.json')}; {summary['total_seconds']:.0f}s so far")
    tl._LOG_FILE.close()
    if args.pack:
        parts, size = pack(args.out, args.pack, args.part_mib * 2**20)
        tl.write_json(os.path.join(args.pack, "summary.json"), dict(summary, parts=parts, tar_bytes=size))
        print(f"packed {size / 2**20:.1f} MiB into {len(parts)} parts in {args.pack} "
              f"({time.time() - _T_START:.0f}s in all)", flush=True)


if __name__ == "__main__":
    main()

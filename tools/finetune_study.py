#!/usr/bin/env python3
"""Train every model of the top-k fine-tuning study (docs/training.md "Top-k fine-tuning study") on one GPU within a
wall-clock budget, from a shipped package (--init, default models/tiny_lm; models/tiny_lm_32k with --context).

Each variant starts from the same weights and sees the same batches (tools/train_tiny_lm.py's finetune, per_token
selections, every layer's indexer trained beside the model):
  full         the control: full attention, the indexer on the dense KL (it follows the model)
  exact:K      top-K attention by the exact top-k of the head-mean attention, the indexer on the dense KL
  indexer:K    top-K attention by the layer's Lightning Indexer, the indexer on the KL over its own selection
               (DeepSeek's sparse stage)
--variants picks them (default exact:64, full, indexer:64, exact:256: the packages examples/studies/finetune_4k.json
compares). The first variant trains for its share of the budget; the others train for as many steps (or their share of what
is left, if that ends first: the summary gives every variant's steps and seconds); --steps N caps every variant, the
first included. Training windows are --context
bytes (default the model's context; top-k training builds dense [rows, T, T] tensors, so a long-context model
fine-tunes on shorter windows). --retrieval-fraction of each step's rows (default: the base's own training share,
from its train_log.json) are retrieval examples (tools/retrieval_task.py) made from the training corpus, the same
rows for every variant, their answers weighted as in the base's training.

Each variant becomes a package in models/tiny_lm's format under --out/<name> (fp16 weights, eval.txt,
logits.safetensors, train_log.json; no dump), next to summary.json: per package (the base included) steps, seconds,
final training loss, and, in windows of --context bytes, bits per byte of eval.txt with full attention and with
top-k attention at k = 64 and 256 (exact and indexer selections, per_token, every layer), of the held-out bytes with
full attention, the indexers' recall, attention entropy per layer and head and the exact top-k mass; and retrieval
exact match on the base package's retrieval examples (retrieval.json; examples generated from the held-out sources
when it has none) up to --retrieval-max-context, with full attention and with each top-k attention (rows in
chunks: tools/train_tiny_lm.py's ChunkedTopkAttention). Every package's evaluation is bounded by its share of
--eval-share of the budget: examples that do not fit are skipped and counted, and every variant evaluates at most
the examples the base did. With --pack DIR, --out goes into DIR as one tar in parts of at most --part-mib MiB
(reassemble with `cat finetune_packages.tar.part* | tar -x`), beside summary.json.

  python3 tools/finetune_study.py --out /tmp/finetune --pack "$OUT" --budget-seconds 420
  python3 tools/finetune_study.py --init models/tiny_lm_32k --context 4096 --out /tmp/finetune32k --pack "$OUT" \
      --budget-seconds 525
"""
import time

_T_START = time.time()  # the budget counts from here

import argparse  # noqa: E402
import copy  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import retrieval_task  # noqa: E402
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
    ap.add_argument("--steps", type=int, default=0,
                    help="train every variant for at most this many steps (0: the first variant's time share decides)")
    ap.add_argument("--batch", type=int, default=8, help="rows of --context bytes per step")
    ap.add_argument("--context", type=int, default=None,
                    help="bytes per training window and per evaluation window of the bits per byte (default the "
                         "model's context; at most it)")
    ap.add_argument("--retrieval-fraction", type=float, default=None,
                    help="share of each step's rows holding retrieval examples (default the base's training share "
                         "from its train_log.json, 0 without one)")
    ap.add_argument("--answer-weight", type=float, default=None,
                    help="weight of the retrieval answers' cross entropy (default the base's, else 1)")
    ap.add_argument("--retrieval-max-context", type=int, default=16384,
                    help="the longest retrieval example evaluated")
    ap.add_argument("--retrieval-per-context", type=int, default=0,
                    help="at most this many retrieval examples per context (0: all)")
    ap.add_argument("--retrieval-min-examples", type=int, default=0,
                    help="evaluate at least this many retrieval examples per package whatever the time left "
                         "(default 0: the evaluation share alone decides)")
    ap.add_argument("--retrieval-contexts", default=None,
                    help="without retrieval.json in --init: comma-separated lengths of the examples generated from "
                         "the held-out sources (default context/4, context/2, context)")
    ap.add_argument("--eval-share", type=float, default=0.4,
                    help="share of --budget-seconds for the evaluation of all packages (the base's included), "
                         "split evenly between them")
    ap.add_argument("--row-chunk-elements", type=int, default=1 << 27,
                    help="the largest [heads, rows, keys] score block of the chunked top-k attention")
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
    # the retrieval task as the base's training had it (its train_log.json), unless given
    base_args = {}
    log_path = os.path.join(args.init, "train_log.json")
    if os.path.exists(log_path):
        with open(log_path) as f:
            base_args = json.load(f).get("args", {})
    for name in ("question", "retrieval_max_keys", "retrieval_min_context"):
        if name in base_args:
            setattr(targs, name, base_args[name])
    targs.retrieval_fraction = args.retrieval_fraction if args.retrieval_fraction is not None else \
        base_args.get("retrieval_fraction", 0.0)
    targs.answer_weight = args.answer_weight if args.answer_weight is not None else \
        base_args.get("answer_weight", 1.0)
    return targs


RETRIEVAL_MODES = (("full", None),) + tl.EVAL_SELECTIONS


def mode_name(selector, k):
    return "full" if selector == "full" else f"{selector}_{k}"


def retrieval_examples(args, targs, cfg, heldout):
    """(examples, source): the base package's retrieval examples up to --retrieval-max-context (or, without
    retrieval.json, examples generated from the held-out sources), --retrieval-per-context at most per context, in
    the order they are evaluated."""
    path = os.path.join(args.init, "retrieval.json")
    if os.path.exists(path):
        examples = []
        for data, rec in retrieval_task.read_retrieval(args.init):
            ex = retrieval_task.Example(data, rec["keys"], rec["depth"], None, None, rec["question"])
            examples.append(ex)
        source = f"{path}: the base package's held-out examples"
    else:
        contexts = tl.numbers(args.retrieval_contexts, int) if args.retrieval_contexts else sorted(
            {max(retrieval_task.min_context(4, targs.question), cfg.context // d) for d in (4, 2, 1)})
        examples = retrieval_task.generate_suite(heldout, [c for c in contexts if c <= args.retrieval_max_context],
                                                 [1, 4], [0, 0.25, 0.5, 0.75, 1], 3, args.seed + 2, targs.question)
        source = (f"generated from the held-out sources ({targs.heldout}): contexts {contexts}, keys 1 and 4, depths "
                  f"0..1 by 0.25, 3 each, seed {args.seed + 2}")
    examples = [ex for ex in examples if ex.length <= args.retrieval_max_context]
    # replicate-major, contexts interleaved: the first example of every (keys, depth) cell of every context, then
    # the second, ...; a cut for time or --retrieval-per-context keeps every context and cell alike
    replicate, seen = [], {}
    for ex in examples:
        cell = (ex.length, ex.keys, round(ex.depth * 4))
        replicate.append(seen.get(cell, 0))
        seen[cell] = replicate[-1] + 1
    order = sorted(range(len(examples)), key=lambda i: (replicate[i], examples[i].keys, round(examples[i].depth * 4),
                                                        examples[i].length))
    examples = [examples[i] for i in order]
    if args.retrieval_per_context > 0:
        count, kept = {}, []
        for ex in examples:
            count[ex.length] = count.get(ex.length, 0) + 1
            if count[ex.length] <= args.retrieval_per_context:
                kept.append(ex)
        examples = kept
    return examples, source


def evaluate_retrieval(model32, examples, device, deadline, max_elements, estimate=None, minimum=0):
    """Exact match of each example with full attention and with each top-k attention of tl.EVAL_SELECTIONS
    (ChunkedTopkAttention, per_token, every layer), example after example, all modes of an example or none: the
    first example whose context's measured time (or, before one, the longest measured context's scaled by the
    squared length ratio) would pass `deadline` ends the evaluation. `estimate` ({context: seconds of one example,
    every mode}) carries the measured times from one package to the next and is updated here."""
    cfg = model32.cfg
    per_mode = {mode_name(s, k): [] for s, k in RETRIEVAL_MODES}
    seconds = {name: {} for name in per_mode}
    done = []
    estimate = {} if estimate is None else estimate
    for ex in examples:
        guess = estimate.get(ex.length)
        if guess is None and estimate:
            last = max(estimate)
            guess = estimate[last] * (ex.length / last) ** 2
        if len(done) >= minimum and time.time() + (guess or 0) > deadline:
            break
        t0 = time.time()
        for selector, k in RETRIEVAL_MODES:
            attention = None if selector == "full" else tl.ChunkedTopkAttention(cfg, k, selector, max_elements)
            m0 = time.time()
            result = tl.retrieval_eval(model32, [ex], device, float("inf"), attention=attention)[0]
            name = mode_name(selector, k)
            per_mode[name].append(result["answer_bytes_correct"])
            seconds[name][ex.length] = seconds[name].get(ex.length, 0.0) + time.time() - m0
        estimate[ex.length] = max(estimate.get(ex.length, 0.0), time.time() - t0)
        done.append(ex)
    contexts = sorted({ex.length for ex in done})
    exact_match = {}
    for name, correct in per_mode.items():
        hits = [c == retrieval_task.ANSWER_LENGTH for c in correct]

        def share(pick):
            chosen = [h for h, ex in zip(hits, done) if pick(ex)]
            return round(sum(chosen) / len(chosen), 4) if chosen else None
        exact_match[name] = {
            "all": share(lambda ex: True),
            "by_context": {str(c): share(lambda ex, c=c: ex.length == c) for c in contexts},
            "by_context_keys": {f"{c}/{kk}": share(lambda ex, c=c, kk=kk: ex.length == c and ex.keys == kk)
                                for c in contexts for kk in sorted({ex.keys for ex in done if ex.length == c})}}
    counts = {str(c): sum(ex.length == c for ex in done) for c in contexts}
    return {"examples": len(done), "examples_by_context": counts, "skipped_for_time": len(examples) - len(done),
            "exact_match": exact_match,
            "seconds_per_example": {name: {str(c): round(v / counts[str(c)], 3) for c, v in sorted(s.items())}
                                    for name, s in seconds.items()},
            "per_example": dict({"context": [ex.length for ex in done], "keys": [ex.keys for ex in done],
                                 "depth": [round(ex.depth, 4) for ex in done]},
                                answer_bytes_correct=per_mode)}


def summary_entry(info):
    ft = info.get("finetune", {})
    entry = {k: ft.get(k) for k in ("attention", "k", "selector", "indexer_loss", "steps", "tokens", "seconds",
                                    "final_train_loss_bits_per_byte", "retrieval_fraction")}
    if ft.get("retrieval"):
        entry["final_train_answer_exact_match"] = ft["retrieval"][-1]["exact_match"]
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
    if args.retrieval_fraction is not None and not 0 <= args.retrieval_fraction <= 1:
        ap.error(f"--retrieval-fraction must be in [0, 1], got {args.retrieval_fraction}")
    if not 0 < args.eval_share < 1:
        ap.error(f"--eval-share must be in (0, 1), got {args.eval_share}")
    if args.steps < 0:
        ap.error(f"--steps must be >= 0, got {args.steps}")
    if args.row_chunk_elements < 1 or args.retrieval_per_context < 0 or args.retrieval_min_examples < 0:
        ap.error(f"--row-chunk-elements must be >= 1, --retrieval-per-context and --retrieval-min-examples >= 0, got "
                 f"{args.row_chunk_elements}, {args.retrieval_per_context} and {args.retrieval_min_examples}")
    budget_end = _T_START + args.budget_seconds
    device, common = tl.start_run(args.out, args.seed, "study.log")
    common["init"] = args.init
    targs = training_args(args)
    cfg, base = tl.load_package(args.init, device)
    context = args.context or cfg.context
    if not 2 <= context <= cfg.context:
        ap.error(f"--context must be in [2, the model's context {cfg.context}], got {context}")
    if targs.retrieval_fraction > 0 and context + 1 < retrieval_task.min_context(targs.retrieval_max_keys,
                                                                                  targs.question):
        ap.error(f"retrieval rows with {targs.retrieval_max_keys} keys need --context >= "
                 f"{retrieval_task.min_context(targs.retrieval_max_keys, targs.question) - 1}, got {context}")
    with open(os.path.join(args.init, "eval.txt"), "rb") as f:
        eval_text = f.read()
    data_info = {}
    corpus, heldout, _, heldout_eval = tl.load_data(targs, data_info)
    data = torch.tensor(np.frombuffer(corpus, dtype=np.uint8), device=device)
    examples, source = retrieval_examples(args, targs, cfg, heldout)
    del heldout
    eval_seconds = args.eval_share * args.budget_seconds / (len(variants) + 1)
    summary = {"budget_seconds": args.budget_seconds, "batch": args.batch, "context": context,
               "model_context": cfg.context, "granularity": "per_token", "device": common["device"],
               "torch": common["torch"], "init": args.init, "data": data_info["data"],
               "retrieval_fraction": targs.retrieval_fraction, "answer_weight": targs.answer_weight,
               "question": targs.question,
               "evaluation": {"seconds_per_package": round(eval_seconds, 1), "windows": context,
                              "selections": [mode_name(s, k) for s, k in RETRIEVAL_MODES],
                              "retrieval_source": source, "retrieval_max_context": args.retrieval_max_context,
                              "retrieval_examples_available": len(examples)},
               "packages": {}}
    tl.log(f"training windows of {context} bytes, retrieval rows {targs.retrieval_fraction:g} of each batch "
           f"(answer weight {targs.answer_weight:g}); evaluation up to {eval_seconds:.0f}s per package, "
           f"{len(examples)} retrieval examples ({source})")
    retrieval_limit = [len(examples)]  # the base's count, then every variant's cap
    retrieval_seconds = {}  # the longest time of one example (all modes) per context, over every package so far

    def evaluate(model):
        """bpb, entropy and recall of the shipped (fp16-rounded) weights, then retrieval until the package's
        evaluation share is spent."""
        start = time.time()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        torch.backends.cuda.matmul.allow_tf32 = False
        _, model32 = tl.rounded_fp16(model)
        model32 = model32.to(device)
        result = tl.evaluate_package(model32, eval_text, heldout_eval, device, context)
        result["bpb_seconds"] = round(time.time() - start, 1)
        deadline = min(start + eval_seconds, budget_end - args.reserve_seconds)
        r0 = time.time()
        try:
            result["retrieval"] = evaluate_retrieval(model32, examples[:retrieval_limit[0]], device, deadline,
                                                     args.row_chunk_elements, retrieval_seconds,
                                                     min(args.retrieval_min_examples, retrieval_limit[0]))
        except (RuntimeError, ValueError) as e:  # CUDA out of memory included: the packages and the rest still ship
            tl.log(f"retrieval evaluation failed: {type(e).__name__}: {e}")
            result["retrieval"] = {"error": f"{type(e).__name__}: {e}"[:2000], "examples": 0,
                                   "skipped_for_time": 0}
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result["retrieval"]["seconds"] = round(time.time() - r0, 1)
        result["retrieval"]["skipped_for_time"] += len(examples) - min(len(examples), retrieval_limit[0])
        retrieval_limit[0] = result["retrieval"]["examples"]
        if result["retrieval"]["skipped_for_time"]:
            result["retrieval"]["note"] = (f"{result['retrieval']['skipped_for_time']} of {len(examples)} examples not "
                                           f"evaluated: the package's evaluation share ({eval_seconds:.0f}s) was "
                                           f"spent, or the base's evaluation stopped there")
        if device.type == "cuda":
            result["eval_peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        torch.backends.cuda.matmul.allow_tf32 = True
        del model32
        return result

    def show(name, entry):
        brief = {k: v for k, v in entry.items() if k not in ("indexer_recall", "attention_statistics", "retrieval")}
        ret = entry.get("retrieval", {})
        tl.log(f"{name}: {brief}")
        tl.log(f"{name}: retrieval exact match over {ret.get('examples')} examples "
               f"({ret.get('skipped_for_time')} skipped for time, {ret.get('seconds')}s): "
               f"{ {m: v['all'] for m, v in ret.get('exact_match', {}).items()} }; "
               f"mean head entropy {np.mean(entry['attention_statistics']['entropy_heads']):.4f} nats")

    start = time.time()
    summary["packages"]["base"] = dict(summary_entry({"evaluation": evaluate(base)}), steps=0)
    show("base", summary["packages"]["base"])
    export_seconds = max(args.export_seconds, time.time() - start)
    first_steps = args.steps or None
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
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        try:
            steps = tl.finetune(model, data, targs, device, info, attention, seconds, first_steps, context, corpus)
        except torch.cuda.OutOfMemoryError as e:
            tl.log(f"{name}: out of memory at batch {targs.batch} ({e}); skipped")
            summary["packages"][name] = {"error": f"out of memory at batch {targs.batch}"}
            del model
            torch.cuda.empty_cache()
            continue
        train_peak = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None
        if first_steps is None:
            first_steps = steps
        t0 = time.time()
        info["evaluation"] = evaluate(model)
        info["total_seconds"] = round(time.time() - _T_START, 1)
        state16, _ = tl.rounded_fp16(model)
        tl.write_package(os.path.join(args.out, name), state16, cfg, eval_text, info, args.logit_tokens)
        export_seconds = max(export_seconds, time.time() - t0)
        summary["packages"][name] = summary_entry(info)
        if train_peak is not None:
            summary["packages"][name]["train_peak_gpu_gib"] = train_peak
        show(name, summary["packages"][name])
        tl.log(f"{name}: evaluation and export {time.time() - t0:.0f}s")
        del model
        if device.type == "cuda":
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

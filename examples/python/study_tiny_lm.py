#!/usr/bin/env python3
"""A recall-vs-accuracy study of keysel's tiny language model, notebook style (run it whole, or cell by cell in
an editor that knows "# %%" cells):

    python3 examples/python/study_tiny_lm.py

1. keysel.run_study: keysel's C++ decoder reads 512 bytes of held-out text with every layer restricted to each
   selector's keys, and reports bits per byte beside the SPEC §4 metrics (docs/tiny-lm.md, docs/studies.md).
2. keysel.metrics on one layer of the shipped dump: the fidelity of two selections of that layer's keys.
3. The same model in PyTorch (tools/train_tiny_lm.py) with its attention replaced by keysel.torch.topk_attention
   and a TopkStats recording every layer: the same bits per byte as step 1, and metrics per layer.
"""
# %% setup
import importlib.util
import math
import pathlib

import torch
from safetensors.torch import load_file

import keysel
import keysel.torch as kt

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tiny_lm"
TOKENS = 512

# %% 1. the C++ study: bits per byte beside recall and mass
study = keysel.run_study({
    "workloads": [{"type": "tiny-lm", "tokens": TOKENS, "offset": 0}],
    "selectors": [{"type": "exact"}, {"type": "indexer", "format": "fp8_e4m3"}, {"type": "streaming", "n_sink": 4}],
    "k": [32, 128],
    "granularity": "per_token",
})
result = study["studies"][0]
full_bpb = result["full_attention"]["bpb"]["mean"]
print(f"{result['workload']}: full attention {full_bpb:.4f} bits per byte")
print(f"{'selector':<22} {'k':>4} {'recall':>7} {'mass':>7} {'top1':>6} {'bpb':>7} {'increase':>9}")
cpp_bpb = {}
for row in result["rows"]:
    m = row["metrics"]
    cpp_bpb[(row["selector"], row["k"])] = m["bpb"]["mean"]
    print(f"{row['selector']:<22} {row['k']:>4} {m['recall']['mean']:>7.3f} {m['mass']['mean']:>7.3f} "
          f"{m['top1']['mean']:>6.3f} {m['bpb']['mean']:>7.4f} {m['bpb']['mean'] - full_bpb:>9.4f}")

# %% 2. keysel.metrics on one layer of the dump (q, k, v of the first 1024 bytes, as the trained model saw them)
dump = keysel.load_dump(MODEL_DIR / "dump.safetensors")
layer = dump["layers"][3]
q, k_cache, v_cache, positions = layer["q"], layer["k"], layer["v"], layer["positions"]
for name, spec in (("exact", {"type": "exact"}), ("streaming", {"type": "streaming", "n_sink": 4})):
    selection = keysel.make_selector(spec).select(q, k_cache, positions, 64, granularity="per_kv_head")
    agg = keysel.metrics(q, k_cache, v_cache, positions, selection, 64, granularity="per_kv_head")["aggregates"]
    print(f"dump layer 3, {name:<9} k=64: recall {agg['recall']['mean']:.3f} (p5 {agg['recall']['p5']:.3f}), "
          f"mass {agg['mass']['mean']:.3f}, out_err {agg['out_err']['mean']:.4f}")

# %% 3. the same model in PyTorch, attention through keysel.torch.topk_attention
spec = importlib.util.spec_from_file_location("train_tiny_lm", ROOT / "tools" / "train_tiny_lm.py")
train = importlib.util.module_from_spec(spec)
spec.loader.exec_module(train)
model = train.TinyLM(train.Config()).float().eval()
train.load_state(model, {n: t.float() for n, t in load_file(str(MODEL_DIR / "model.safetensors")).items()})
tokens = torch.tensor(list((MODEL_DIR / "eval.txt").read_bytes()[:TOKENS]))[None]


class TopkFunctional:
    """torch.nn.functional for train_tiny_lm, with scaled_dot_product_attention replaced by topk_attention."""

    def __init__(self, **options):
        self.options, self.calls = options, 0

    def scaled_dot_product_attention(self, q, k, v, is_causal, scale, enable_gqa):
        layer, self.calls = self.calls % model.cfg.layers, self.calls + 1
        return kt.topk_attention(q, k, v, is_causal=is_causal, scale=scale, layer=layer, **self.options)

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)


def bits_per_byte(logits):
    logp = torch.log_softmax(logits[0].double(), dim=-1)[:-1]
    return -logp.gather(-1, tokens[0, 1:, None]).mean().item() / math.log(2)


for k in (32, 128):
    stats = kt.TopkStats()
    train.F = TopkFunctional(k=k, granularity="per_token", stats=stats)
    with torch.no_grad():
        bpb = bits_per_byte(model(tokens))
    train.F = torch.nn.functional
    cpp = cpp_bpb[("exact", k)]
    print(f"PyTorch exact top-{k}: {bpb:.6f} bits per byte (C++ decoder {cpp:.6f}, difference {bpb - cpp:+.1e})")
    summary = stats.summary()
    print("  mass per layer: " + ", ".join(f"{summary[l]['mass']['mean']:.3f}" for l in stats.layers))

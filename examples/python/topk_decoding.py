#!/usr/bin/env python3
"""Top-k decoding of a Hugging Face decoder with keysel: every attention layer reads only the k keys of the
exact top-k (or of any keysel selector) for each query token and key/value head.

    python3 examples/python/topk_decoding.py [--k 16] [--selector '{"type": "streaming", "n_sink": 4}']

A small Llama is built from a LlamaConfig with random weights (nothing is downloaded), so the text is noise: what
the script shows is the mechanism. It generates greedily with full attention (eager) and with
attn_implementation="keysel_topk", then prints where the two continuations part and the SPEC §4 metrics of every
layer's selections (keysel.torch.TopkStats). With a real checkpoint, replace the model line with
AutoModelForCausalLM.from_pretrained(name, attn_implementation="keysel_topk").
"""
import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import keysel.torch as kt  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=16, help="keys each query token reads per key/value head")
    parser.add_argument("--selector", default="exact", help='"exact" or a keysel selector spec (JSON)')
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=24)
    args = parser.parse_args()
    selector = args.selector if args.selector == "exact" else json.loads(args.selector)

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random model's attention (trained models attend to few keys; N(0, 0.02)
        for layer in model.model.layers:  # weights attend almost uniformly, which no top-k can approximate)
            layer.self_attn.q_proj.weight.mul_(12.0)
            layer.self_attn.k_proj.weight.mul_(12.0)
    prompt = torch.randint(3, config.vocab_size, (1, args.prompt_tokens))

    model.set_attn_implementation("eager")
    with torch.no_grad():
        full = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
        full_logits = model(prompt).logits

    stats = kt.TopkStats()
    kt.configure(k=args.k, granularity="per_kv_head", selector=selector, stats=stats)  # registers "keysel_topk"
    model.set_attn_implementation("keysel_topk")
    with torch.no_grad():
        sparse_logits = model(prompt).logits
        stats.reset()
        sparse = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)

    new_full, new_sparse = full[0, args.prompt_tokens:], sparse[0, args.prompt_tokens:]
    same = int((new_full == new_sparse).cumprod(0).sum())
    print(f"k = {args.k} of up to {sparse.shape[1] - 1} keys, selector {args.selector}, backend {kt.backend()}")
    print(f"full attention : {new_full.tolist()}")
    print(f"top-k attention: {new_sparse.tolist()}")
    print(f"the first {same} of {args.new_tokens} generated tokens agree (a random model's next-token logits are "
          f"near-ties: the prompt's logits differ by at most {(sparse_logits - full_logits).abs().max():.4f}, "
          f"against a spread of {full_logits.std():.4f})")
    print("\nlayer  rows    recall  mass    mass_ratio  top1    out_err (means over prefill and decode rows)")
    summary = stats.summary()
    for layer in stats.layers + ["all"]:
        m = summary[layer]
        print(f"{layer!s:<6} {m['recall']['count']:<7} {m['recall']['mean']:.4f}  {m['mass']['mean']:.4f}  "
              f"{m['mass_ratio']['mean']:.4f}      {m['top1']['mean']:.4f}  {m['out_err']['mean']:.4f}")


if __name__ == "__main__":
    main()

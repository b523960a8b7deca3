#!/usr/bin/env python3
"""Capture a keysel attention dump (docs/dumps.md) from a Hugging Face transformers causal LM.

Forward hooks on every attention module record, for a prefill of the prompt and then greedy decode steps:
  layer{L}.q          [T, Hq, D]   queries after RoPE, exactly as the model applies it
  layer{L}.k          [N, Hkv, D]  keys after RoPE (the KV cache of the whole sequence)
  layer{L}.v          [N, Hkv, Dv] values
  layer{L}.positions  [T] int32    position of each query token (prefill tokens first, then decode tokens)
  layer{L}.probs      [T, Hq, N]   fp32, the model's own attention probabilities (only with --probs; needs
                                   attn_implementation="eager", which the script then selects)
and writes them to one safetensors file with metadata (format, model, scale, layers, prefill/decode counts).

q and k are recomputed inside the hook from the module's inputs with the model's own projections, optional
q/k norms and the apply_rotary_pos_emb of the model's modeling file, so RoPE (including scaled variants) is the
model's. Tested with Llama-style models (Llama, Mistral, Qwen2/3); other architectures may need a small adapter.

Examples:
  python3 tools/capture_dump.py --model meta-llama/Llama-3.2-1B --prompt-file prompt.txt --decode 16 \
      --layers 0,8,15 --out llama.safetensors
  python3 tools/capture_dump.py --tiny-random --out tiny.safetensors --probs     # no download: random weights

Only torch and transformers are needed (numpy and the safetensors package are not).
"""

import argparse
import ctypes
import importlib
import json
import struct
import sys

import torch

FORMAT = "keysel-dump/1"

_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float64: "F64",
    torch.int8: "I8",
}
if hasattr(torch, "float8_e4m3fn"):
    _SAFETENSORS_DTYPES[torch.float8_e4m3fn] = "F8_E4M3"
if hasattr(torch, "float8_e5m2"):
    _SAFETENSORS_DTYPES[torch.float8_e5m2] = "F8_E5M2"


def _tensor_bytes(tensor):
    t = tensor.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return b""
    return ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())


def write_safetensors(path, tensors, metadata):
    """A minimal safetensors writer: 8-byte little-endian header length, JSON header, raw little-endian data."""
    if sys.byteorder != "little":
        raise RuntimeError("write_safetensors: big-endian hosts are not supported")
    header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}}
    blobs = []
    offset = 0
    for name, tensor in tensors.items():
        if tensor.dtype not in _SAFETENSORS_DTYPES:
            raise ValueError(f"write_safetensors: tensor '{name}': unsupported dtype {tensor.dtype}")
        blob = _tensor_bytes(tensor)
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for blob in blobs:
            f.write(blob)


def _attention_modules(model):
    """(layer index, attention module) of every decoder layer."""
    layers = None
    for attr in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers"):
        obj = model
        try:
            for part in attr.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        layers = obj
        break
    if layers is None:
        raise RuntimeError("capture_dump: cannot find the decoder layers of this model")
    out = []
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attention", None) or getattr(layer, "attn", None)
        if attn is None:
            raise RuntimeError(f"capture_dump: layer {i} has no self_attn/attention module")
        out.append((i, attn))
    return out


class Recorder:
    """Forward hook of one attention module: recomputes post-RoPE q, k and v from the module's own inputs."""

    def __init__(self, index, module, config):
        self.index = index
        self.module = module
        self.head_dim = getattr(module, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.q, self.k, self.v, self.positions, self.probs = [], [], [], [], []
        self.apply_rope = getattr(importlib.import_module(type(module).__module__), "apply_rotary_pos_emb")

    def __call__(self, module, args, kwargs, output):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        batch, steps, _ = hidden.shape
        if batch != 1:
            raise RuntimeError("capture_dump: batch size must be 1")
        shape = (batch, steps, -1, self.head_dim)
        q = module.q_proj(hidden).view(shape)
        k = module.k_proj(hidden).view(shape)
        v = module.v_proj(hidden).view(shape)
        if hasattr(module, "q_norm"):  # Qwen3 / OLMo-style per-head norms, applied before RoPE
            q, k = module.q_norm(q), module.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, steps, D]
        position_ids = kwargs.get("position_ids")
        cache_position = kwargs.get("cache_position")
        if position_ids is None:
            position_ids = cache_position.unsqueeze(0) if cache_position is not None else _CURRENT["position_ids"]
        embeddings = kwargs.get("position_embeddings")
        if embeddings is None:  # older transformers: the module owns its rotary embedding
            embeddings = module.rotary_emb(v, position_ids)
        cos, sin = embeddings
        q, k = self.apply_rope(q, k, cos, sin)
        self.q.append(q[0].transpose(0, 1).float().cpu())  # [steps, Hq, D]
        self.k.append(k[0].transpose(0, 1).float().cpu())  # [steps, Hkv, D]
        self.v.append(v[0].transpose(0, 1).float().cpu())
        self.positions.append(position_ids.reshape(-1).to(torch.int32).cpu())
        weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        if weights is not None:
            self.probs.append(weights[0].transpose(0, 1).float().cpu())  # [steps, Hq, keys so far]

    def tensors(self, dtype, with_probs):
        q, k, v = torch.cat(self.q), torch.cat(self.k), torch.cat(self.v)
        positions = torch.cat(self.positions)
        out = {
            f"layer{self.index}.q": q.to(dtype),
            f"layer{self.index}.k": k.to(dtype),
            f"layer{self.index}.v": v.to(dtype),
            f"layer{self.index}.positions": positions,
        }
        if with_probs:
            if len(self.probs) != len(self.q):
                raise RuntimeError("capture_dump: the model returned no attention weights; use an eager model")
            n = k.shape[0]
            probs = torch.zeros(q.shape[0], q.shape[1], n)
            row = 0
            for p in self.probs:
                probs[row:row + p.shape[0], :, :p.shape[2]] = p
                row += p.shape[0]
            out[f"layer{self.index}.probs"] = probs
        return out


_CURRENT = {"position_ids": None}


def check_probabilities(tensors, index, scale):
    """Largest difference between causal softmax(scale q.k) recomputed from the dump and the model's probs."""
    q = tensors[f"layer{index}.q"].float()
    k = tensors[f"layer{index}.k"].float()
    pos = tensors[f"layer{index}.positions"].long()
    probs = tensors[f"layer{index}.probs"]
    group = q.shape[1] // k.shape[1]
    kk = k.repeat_interleave(group, dim=1)  # [N, Hq, D]
    logits = scale * torch.einsum("thd,shd->ths", q, kk)
    allowed = torch.arange(k.shape[0]).view(1, 1, -1) <= pos.view(-1, 1, 1)
    p = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (p - probs).abs().max().item()


def tiny_random_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rope_theta=10000.0)
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)
    # Random weights give nearly uniform attention; sharpen q/k so the dump has some structure.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model, "tiny-random-llama"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face model id or local path")
    ap.add_argument("--tiny-random", action="store_true",
                    help="a randomly initialised 2-layer Llama (hidden 64, 4 heads, 2 kv heads); no download")
    ap.add_argument("--prompt", default=None, help="prompt text (default: a fixed sentence, or random ids)")
    ap.add_argument("--prompt-file", default=None)
    ap.add_argument("--prefill", type=int, default=24, help="prompt tokens when no tokenizer is used")
    ap.add_argument("--decode", type=int, default=8, help="greedy decode steps after the prefill")
    ap.add_argument("--queries", choices=["all", "decode"], default="all",
                    help="keep the queries of every token (prefill and decode) or of the decode steps only")
    ap.add_argument("--layers", default=None, help="comma-separated layer indices (default: all)")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                    help="storage dtype of q, k, v in the dump")
    ap.add_argument("--probs", action="store_true", help="also store the model's attention probabilities")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    tokenizer = None
    if args.tiny_random:
        model, name = tiny_random_llama(args.seed)
    elif args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        kwargs = {"torch_dtype": torch.float32}
        if args.probs:
            kwargs["attn_implementation"] = "eager"
        model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        name = args.model
    else:
        ap.error("give --model or --tiny-random")
    model.to(args.device).eval()

    if tokenizer is not None and (args.prompt or args.prompt_file):
        text = args.prompt if args.prompt else open(args.prompt_file, encoding="utf-8").read()
        ids = tokenizer(text, return_tensors="pt").input_ids
    else:
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (1, args.prefill), generator=generator)
    ids = ids.to(args.device)

    modules = _attention_modules(model)
    wanted = set(range(len(modules))) if args.layers is None else {int(x) for x in args.layers.split(",")}
    recorders, handles = [], []
    for index, module in modules:
        if index in wanted:
            rec = Recorder(index, module, model.config)
            recorders.append(rec)
            handles.append(module.register_forward_hook(rec, with_kwargs=True))

    prefill = ids.shape[1]
    with torch.no_grad():
        positions = torch.arange(prefill, device=args.device).unsqueeze(0)
        _CURRENT["position_ids"] = positions
        out = model(input_ids=ids, position_ids=positions, use_cache=True, output_attentions=args.probs)
        cache = out.past_key_values
        token = out.logits[:, -1:].argmax(-1)
        for step in range(args.decode):
            positions = torch.tensor([[prefill + step]], device=args.device)
            _CURRENT["position_ids"] = positions
            out = model(input_ids=token, position_ids=positions, past_key_values=cache, use_cache=True,
                        output_attentions=args.probs)
            cache = out.past_key_values
            token = out.logits[:, -1:].argmax(-1)
    for h in handles:
        h.remove()

    dtype = getattr(torch, args.dtype)
    tensors = {}
    scale = None
    for rec in recorders:
        layer = rec.tensors(dtype, args.probs)
        if args.queries == "decode":
            for suffix in ("q", "positions", "probs"):
                key = f"layer{rec.index}.{suffix}"
                if key in layer:
                    layer[key] = layer[key][prefill:].contiguous()
        tensors.update(layer)
        scale = getattr(rec.module, "scaling", None) or rec.head_dim ** -0.5
    metadata = {
        "format": FORMAT,
        "model": name,
        "scale": repr(float(scale)),
        "layers": ",".join(str(r.index) for r in recorders),
        "prefill_tokens": str(prefill),
        "decode_tokens": str(args.decode),
        "queries": args.queries,
        "rope": "applied (post-RoPE q and k, the model's apply_rotary_pos_emb)",
    }
    try:
        import transformers
        metadata["transformers"] = transformers.__version__
    except ImportError:
        pass
    metadata["torch"] = torch.__version__
    write_safetensors(args.out, tensors, metadata)
    if args.probs:
        for rec in recorders:
            print(f"layer {rec.index}: max |softmax(scale q.k) from the dump - model probabilities| = "
                  f"{check_probabilities(tensors, rec.index, float(scale)):.3e}")
    n = prefill + args.decode
    print(f"wrote {args.out}: {len(recorders)} layers, N = {n} keys, "
          f"T = {tensors[f'layer{recorders[0].index}.q'].shape[0]} queries, scale = {scale}")


if __name__ == "__main__":
    main()

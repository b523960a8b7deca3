"""keysel's tiny language model (tools/train_tiny_lm.py, weights in models/tiny_lm/) in PyTorch with every layer's
attention replaced by keysel.torch.topk_attention, against keysel's C++ decoder: for the same selector (the
model's trained Lightning Indexers included), k and granularity the bits per byte (and the SPEC §4 metrics of every layer's selections) must equal what keysel's
tiny-lm study computes (keysel.run_study, the C++ TinyLm forward pass with each layer restricted to the
selector's keys).
"""
import json
import math
import pathlib

import numpy as np
import pytest
import torch

import keysel
import keysel.torch as kt
from conftest import SDPA_TAKES_GQA, load_training_module

try:
    from safetensors.torch import load_file
except ImportError:  # Debian's python3-torch (ctest's python.pytest_oldest_torch) comes without safetensors
    _SAFETENSORS_DTYPES = {"F16": "<f2", "F32": "<f4", "F64": "<f8", "I32": "<i4", "I64": "<i8", "U8": "u1"}

    def load_file(path):
        """name -> CPU tensor of a .safetensors file: an 8-byte little-endian header size, a JSON header of
        {name: {dtype, shape, data_offsets}} (plus "__metadata__"), then the little-endian data."""
        raw = pathlib.Path(path).read_bytes()
        size = int.from_bytes(raw[:8], "little")
        data = memoryview(raw)[8 + size:]
        out = {}
        for name, info in json.loads(raw[8:8 + size]).items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            array = np.frombuffer(data[begin:end], dtype=_SAFETENSORS_DTYPES[info["dtype"]])
            out[name] = torch.from_numpy(array.reshape(info["shape"]).astype(array.dtype.newbyteorder("=")))
        return out

ROOT = pathlib.Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "models" / "tiny_lm"
TOKENS = 256


TRAIN = load_training_module()


class TopkFunctional:
    """Stands in for torch.nn.functional inside train_tiny_lm: scaled_dot_product_attention becomes
    topk_attention (the layer is the call's index within a forward pass); everything else is torch's. With
    `indexer`, each layer's trained Lightning-Indexer tensors (from the normed input x that Block.qkv receives)
    go to topk_attention too."""

    def __init__(self, model, indexer=False, **options):
        self.model = model
        self.layers = model.cfg.layers
        self.indexer = indexer
        self.options = options
        self.calls = 0
        self.x = None

    def scaled_dot_product_attention(self, q, k, v, is_causal, scale, enable_gqa):
        assert is_causal and enable_gqa
        layer = self.calls % self.layers
        self.calls += 1
        extra = {}
        if self.indexer:
            t = self.x.shape[1]
            _, _, ci, si = self.model.rope(t, self.x.device, torch.float32)
            extra["indexer"] = self.model.layers[layer].indexer.tensors(self.x, ci, si)
        return kt.topk_attention(q, k, v, is_causal=True, scale=scale, layer=layer, **self.options, **extra)

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)


@pytest.fixture(scope="module")
def model():
    cfg = TRAIN.Config()
    net = TRAIN.TinyLM(cfg).float().eval()
    TRAIN.load_state(net, {name: t.float() for name, t in load_file(str(MODEL_DIR / "model.safetensors")).items()})
    return net


@pytest.fixture(scope="module")
def text():
    data = (MODEL_DIR / "eval.txt").read_bytes()
    return torch.tensor(list(data[:TOKENS]), dtype=torch.long)[None]


def full_forward(model, tokens):
    """The model's logits with full attention: its F.scaled_dot_product_attention(enable_gqa=True) where torch has
    that (torch >= 2.5), else its plain reference attention (exact=True: softmax over s <= t, key heads repeated)."""
    with torch.no_grad():
        return model(tokens) if SDPA_TAKES_GQA else model(tokens, exact=True)


def bits_per_byte(logits, tokens):
    logp = torch.log_softmax(logits[0].double(), dim=-1)[:-1]
    return -logp.gather(-1, tokens[0, 1:, None]).mean().item() / math.log(2)


def forward(model, tokens, monkeypatch, indexer=False, **options):
    functional = TopkFunctional(model, indexer=indexer, **options)
    monkeypatch.setattr(TRAIN, "F", functional)
    qkv = TRAIN.Block.qkv

    def capture(block, x, cos, sin):
        functional.x = x
        return qkv(block, x, cos, sin)

    monkeypatch.setattr(TRAIN.Block, "qkv", capture)
    with torch.no_grad():
        logits = model(tokens)
    monkeypatch.setattr(TRAIN, "F", torch.nn.functional)
    monkeypatch.setattr(TRAIN.Block, "qkv", qkv)
    assert functional.calls == model.cfg.layers
    return logits


def cpp_study(selector, k, granularity):
    """keysel's C++ tiny-lm study of the first TOKENS bytes of eval.txt: its one row's metrics and full bpb."""
    result = keysel.run_study({"workloads": [{"type": "tiny-lm", "tokens": TOKENS, "offset": 0}],
                               "selectors": [selector], "k": [k], "granularity": granularity})
    study = result["studies"][0]
    assert study["shape"]["tokens"] == TOKENS
    (row,) = study["rows"]
    return row["metrics"], study["full_attention"]["bpb"]["mean"]


def test_pytorch_full_attention_matches_the_shipped_reference_logits(model, text, monkeypatch):
    reference = load_file(str(MODEL_DIR / "logits.safetensors"))
    n = min(TOKENS, reference["tokens"].shape[0])
    assert torch.equal(reference["tokens"][:n].long(), text[0, :n])
    logits = full_forward(model, text)[0, :n]
    scale = reference["logits"].abs().max()
    assert (logits - reference["logits"][:n]).abs().max() / scale < 1e-5
    # topk_attention with k >= T is full attention
    topk = forward(model, text, monkeypatch, k=TOKENS)
    torch.testing.assert_close(topk[0, :n], logits, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("selector,k,granularity", [
    ({"type": "exact"}, 32, "per_kv_head"),
    ({"type": "exact"}, 16, "per_token"),
    ({"type": "streaming", "n_sink": 4}, 32, "per_kv_head"),
    ({"type": "random", "seed": 1}, 64, "per_head"),
    ({"type": "indexer", "format": "fp8_e4m3"}, 32, "per_token"),
    ({"type": "indexer", "format": "int4", "hadamard": True}, 16, "per_kv_head"),
])
def test_bits_per_byte_and_metrics_equal_the_cpp_decoder(model, text, monkeypatch, selector, k, granularity):
    metrics, full_bpb = cpp_study(selector, k, granularity)
    stats = kt.TopkStats()
    torch_selector = "exact" if selector["type"] == "exact" else selector
    logits = forward(model, text, monkeypatch, indexer=selector["type"] == "indexer", k=k, granularity=granularity,
                     selector=torch_selector, stats=stats)
    bpb = bits_per_byte(logits, text)
    full = bits_per_byte(full_forward(model, text), text)
    assert full == pytest.approx(full_bpb, abs=2e-5)
    # The low-precision indexer's scores are summed in other orders by the two sides (and by keysel's SIMD levels,
    # one row or many), so a near-tied key can swap places: measured 1.1e-4 bits per byte and 2e-5 recall apart
    # (fp8, top-32, an AVX-512 + AMX Xeon; torch 1.13 at the scalar level). Exact, streaming and random selections
    # do not depend on such sums: 2e-7 apart.
    swaps = selector["type"] == "indexer"
    assert bpb == pytest.approx(metrics["bpb"]["mean"], abs=5e-4 if swaps else 5e-6)
    assert abs(bpb - full) > 1e-3  # the selection matters at this k
    summary = stats.summary()
    assert stats.layers == list(range(model.cfg.layers))
    for name in ("recall", "mass", "mass_ratio", "top1", "out_err"):
        ours = summary["all"][name]
        assert ours["count"] == metrics[name]["count"], name
        # out_err = |o_sel - o_full| / |o_full| differences two fp32 outputs that torch and the C++ decoder compute
        # in different orders: 7e-6 relative apart on an AVX-512 Xeon; the selections themselves agree to 1e-6.
        tolerance = dict(rel=5e-5, abs=1e-6) if name == "out_err" else dict(abs=1e-6)
        if swaps:
            tolerance = dict(rel=2e-3, abs=2e-4)
        assert ours["mean"] == pytest.approx(metrics[name]["mean"], **tolerance), name


def test_write_model_dump_matches_the_shipped_dump(model, tmp_path):
    """tools/train_tiny_lm.py's write_model_dump (also behind --dump-from) over the first TOKENS bytes of eval.txt
    gives the shipped dump's first TOKENS rows (causal: a prefix's tensors do not depend on later bytes), within
    fp16 rounding (the shipped one was computed on a GPU), for the requested layers only; its SDPA path (the one
    that long texts take) gives the same tensors."""
    try:
        import safetensors.numpy  # noqa: F401  (write_model_dump writes through it)
    except ImportError:
        pytest.skip("the safetensors package is not installed for this Python (Debian's python3-torch, ctest's "
                    "python.pytest_oldest_torch); ctest's python.pytest runs this test with it")
    text = (MODEL_DIR / "eval.txt").read_bytes()[:TOKENS]
    shipped = load_file(str(MODEL_DIR / "dump.safetensors"))
    names = ("q", "k", "v", "index_q", "index_k", "index_w", "positions")
    path = tmp_path / "dump.safetensors"
    TRAIN.write_model_dump(str(path), model, model.cfg, text, [4, 1], "cpu")
    written = load_file(str(path))
    assert set(written) == {f"layer{layer}.{name}" for layer in (1, 4) for name in names}
    for name, tensor in written.items():
        reference = shipped[name][:TOKENS]
        assert tensor.shape == reference.shape, name
        if name.endswith("positions"):
            assert torch.equal(tensor, torch.arange(TOKENS, dtype=torch.int32)), name
            continue
        assert tensor.dtype == torch.float16, name
        scale = reference.double().abs().max().item()
        assert (tensor.double() - reference.double()).abs().max().item() <= 2e-3 * scale, name
    if SDPA_TAKES_GQA:
        sdpa_path = tmp_path / "dump_sdpa.safetensors"
        TRAIN.write_model_dump(str(sdpa_path), model, model.cfg, text, [1, 4], "cpu", exact=False)
        for name, tensor in load_file(str(sdpa_path)).items():
            scale = written[name].double().abs().max().item()
            assert (tensor.double() - written[name].double()).abs().max().item() <= 2e-3 * max(scale, 1.0), name

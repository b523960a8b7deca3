"""tools/train_tiny_lm.py end to end on the CPU with a tiny model and a few seconds of budget: the long-context
options, the retrieval examples in training, the budget and the package it writes."""
import json
import os
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import retrieval_task as rt  # noqa: E402
import train_tiny_lm as tl  # noqa: E402

# the fields of keysel::TinyLmConfig (recall/include/keysel/recall/tiny_lm.h): the C++ decoder requires exactly these
CPP_CONFIG_FIELDS = {"vocab", "d_model", "layers", "heads", "kv_heads", "head_dim", "ffn_dim", "context", "rope_theta",
                     "norm_eps", "index_heads", "index_dim"}


@pytest.fixture(scope="module")
def package(tmp_path_factory, heldout_package):
    out = tmp_path_factory.mktemp("tiny_lm_long") / "pkg"
    budget = 32
    cmd = [sys.executable, os.path.join(TOOLS, "train_tiny_lm.py"), "--out", str(out), "--budget-seconds", str(budget),
           "--reserve-seconds", "16", "--indexer-share", "0.2", "--d-model", "48", "--layers", "2", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "12", "--ffn-dim", "64", "--index-heads", "2", "--index-dim", "8",
           "--context", "512", "--rope-theta", "500000", "--batch-tokens", "2048", "--short-context", "128",
           "--short-fraction", "0.5", "--retrieval-fraction", "0.5", "--retrieval-max-keys", "4",
           "--retrieval-min-context", "128", "--answer-weight", "2", "--drill-fraction", "0.5", "--drill-until", "0.6",
           "--short-first", "0.2", "--indexer-context", "128", "--indexer-batch", "2",
           "--heldout", heldout_package, "--corpus-bytes", "3000000", "--heldout-eval-bytes", "4096",
           "--eval-bytes", "3000", "--logit-tokens", "40", "--dump-tokens", "32", "--eval-per-cell", "1",
           "--eval-depths", "0,0.5,1", "--log-every", "2", "--no-compile"]
    start = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    seconds = time.time() - start
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, run.stdout, seconds, budget


def test_package_files(package):
    out, stdout, seconds, budget = package
    assert sorted(os.listdir(out)) == ["dump.safetensors", "eval.txt", "logits.safetensors", "model.safetensors",
                                       "retrieval.bin", "retrieval.json", "train.log", "train_log.json"]
    assert seconds < budget + 10  # the process start before the script's clock is all that is not counted
    log = json.loads((out / "train_log.json").read_text())
    assert log["total_seconds"] <= budget + 5  # the export after the evaluation is a fixed cost the reserve covers
    assert log["lm"]["steps"] > 0 and log["indexer"]["steps"] > 0
    assert (out / "train.log").read_text().splitlines()[-1].endswith(stdout.splitlines()[-1].split("] ", 1)[1])
    assert len((out / "eval.txt").read_bytes()) == 3000


def test_model_config_is_what_the_cpp_decoder_reads(package):
    out = package[0]
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta = header["__metadata__"]
    assert meta["format"] == "keysel-tiny-lm/1"
    config = json.loads(meta["config"])
    assert set(config) == CPP_CONFIG_FIELDS
    assert config == {"vocab": 256, "d_model": 48, "layers": 2, "heads": 4, "kv_heads": 2, "head_dim": 12,
                      "ffn_dim": 64, "context": 512, "rope_theta": 500000.0, "norm_eps": 1e-5, "index_heads": 2,
                      "index_dim": 8}
    assert all(v["dtype"] == "F16" for k, v in header.items() if k != "__metadata__")
    assert header["layers.1.wk"]["shape"] == [2 * 12, 48] and header["layers.0.index_wq"]["shape"] == [2 * 8, 48]


def load(out):
    state = safetensors_torch.load_file(str(out / "model.safetensors"))
    with open(out / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    model = tl.TinyLM(tl.Config(**json.loads(header["__metadata__"]["config"]))).float()
    tl.load_state(model, {k: v.float() for k, v in state.items()})
    return model.eval()


def test_reference_logits_match_the_weights(package):
    out = package[0]
    model = load(out)
    ref = safetensors_torch.load_file(str(out / "logits.safetensors"))
    tokens = ref["tokens"].long()
    assert torch.equal(tokens, torch.tensor(list((out / "eval.txt").read_bytes()[:40])))
    with torch.no_grad():
        logits = model(tokens[None], exact=True)[0]
        sdpa = model(tokens[None])[0]
    scale = ref["logits"].abs().max()
    assert (logits - ref["logits"]).abs().max() <= 1e-5 * scale
    assert (sdpa - ref["logits"]).abs().max() <= 1e-5 * scale  # the fp32 SDPA path of the long-context evaluation


def test_retrieval_files_and_evaluation(package):
    out = package[0]
    examples = rt.read_retrieval(str(out))
    log = json.loads((out / "train_log.json").read_text())
    ev = log["retrieval_eval"]
    # default lengths: context / 4, context / 2, context; keys 1 and 4; the requested depths
    assert ev["contexts"] == [128, 256, 512] and ev["keys"] == [1, 4] and ev["depths"] == [0.0, 0.5, 1.0]
    assert [(r["context"], r["keys"]) for _, r in examples] == [(c, k) for c in (128, 256, 512) for k in (1, 4)
                                                                for _ in range(3)]
    assert ev["skipped_for_time"] == 0
    # the logged results are those of the shipped weights on the shipped examples, recomputed here
    model = load(out)
    for (data, rec), logged in zip(examples, ev["examples"], strict=True):
        assert len(data) == rec["length"] and logged["context"] == rec["length"]
        with torch.no_grad():
            pred = model(torch.tensor(list(data[:-1]))[None])[0].argmax(-1).numpy()
        correct = int((pred[-8:] == list(data[-8:])).sum())
        assert logged["answer_bytes_correct"] == correct
        assert logged["exact"] == rt.exact_match(pred, data) == (correct == 8)
    cells = [row for row in ev["table"] if row["depth"] is None]
    assert len(cells) == 6 and all(row["examples"] == 3 for row in cells)


def test_training_log_reports_retrieval_progress(package):
    out, stdout = package[0], package[1]
    log = json.loads((out / "train_log.json").read_text())
    entries = log["lm"]["retrieval"]
    assert entries and entries[0]["step"] == 1
    assert any("short" in e for e in entries) and any("long" in e for e in entries)
    assert all(0 <= e[k]["answer_byte_accuracy"] <= 1 for e in entries for k in ("short", "long") if k in e)
    assert "answer acc=" in stdout and "retrieval exact match" in stdout
    caps = [e["cap"] for e in entries]
    assert caps == sorted(caps) and caps[0] >= 128 and caps[-1] <= 512
    # the drill: a share falling from 0.5 to 0 at 60% of the LM time, its answers counted apart
    shares = [e["drill_share"] for e in entries]
    # (the share follows elapsed time: the first logged step is a moment after the start, hence not exactly 0.5)
    assert shares == sorted(shares, reverse=True) and 0.45 <= shares[0] <= 0.5 and shares[-1] == 0
    assert "drill" in entries[0] and "drill" not in entries[-1]
    assert "drill: answer acc=" in stdout
    assert log["lm"]["question"] == "definition" and log["lm"]["short_first"] == 0.2
    assert json.loads((out / "retrieval.json").read_text())["question"] == "definition"


def test_default_shape_is_the_shipped_model():
    """Without the new options the script builds the model of models/tiny_lm (its metadata config)."""
    shipped = os.path.join(TOOLS, "..", "models", "tiny_lm", "model.safetensors")
    with open(shipped, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    parser_defaults = tl.default_config().to_dict()
    assert parser_defaults == json.loads(header["__metadata__"]["config"])


def test_files_are_replaced_whole(tmp_path):
    """write_bytes / write_json / write_safetensors go through a temporary name: a failed write leaves the old file
    as it was and no temporary file behind; a finished one replaces it."""
    path = str(tmp_path / "train_log.json")
    tl.write_json(path, {"steps": 1})
    with pytest.raises(ValueError):
        with tl.replaced_file(path) as temporary, open(temporary, "w") as f:
            f.write('{"steps": ')
            raise ValueError("interrupted")
    assert json.loads((tmp_path / "train_log.json").read_text()) == {"steps": 1}
    assert sorted(os.listdir(tmp_path)) == ["train_log.json"]
    tl.write_json(path, {"steps": 2})
    assert json.loads((tmp_path / "train_log.json").read_text()) == {"steps": 2}
    tensors = str(tmp_path / "t.safetensors")
    tl.write_safetensors(tensors, {"x": torch.arange(5, dtype=torch.int32).numpy()}, {"format": "test"})
    assert safetensors_torch.load_file(tensors)["x"].tolist() == [0, 1, 2, 3, 4]
    assert sorted(os.listdir(tmp_path)) == ["t.safetensors", "train_log.json"]


def test_dump_from_writes_the_package_models_dump(package, tmp_path):
    """--dump-from: the package's model over its eval.txt, at most its context (512 of the 3000 bytes asked for),
    only the layers asked for; its first 32 rows are the training run's own dump within fp16 rounding. A layer the
    model lacks is refused with a message."""
    out = package[0]
    base = [sys.executable, os.path.join(TOOLS, "train_tiny_lm.py"), "--dump-from", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    run = subprocess.run(base + ["--dump-tokens", "3000", "--dump-layers", "1", "--out", str(tmp_path)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    written = safetensors_torch.load_file(str(tmp_path / "dump.safetensors"))
    assert set(written) == {f"layer1.{n}" for n in ("q", "k", "v", "index_q", "index_k", "index_w", "positions")}
    assert written["layer1.q"].shape == (512, 4, 12) and written["layer1.index_k"].shape == (512, 8)
    assert torch.equal(written["layer1.positions"], torch.arange(512, dtype=torch.int32))
    shipped = safetensors_torch.load_file(str(out / "dump.safetensors"))
    for name in ("q", "k", "v", "index_q", "index_k", "index_w"):
        reference = shipped[f"layer1.{name}"].double()
        got = written[f"layer1.{name}"][:32].double()
        assert (got - reference).abs().max().item() <= 2e-3 * max(reference.abs().max().item(), 1.0), name
    bad = subprocess.run(base + ["--dump-layers", "2", "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         env=env)
    assert bad.returncode != 0 and "--dump-layers: the model has layers 0..1" in bad.stderr

"""The top-k fine-tuning study's training on the CPU with a tiny random base package and a few seconds of budget:
tools/train_tiny_lm.py --init and tools/finetune_study.py write packages in models/tiny_lm's format that load, with
the summary, and the tar parts hold exactly those files."""
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
ROOT = os.path.join(TOOLS, "..")
sys.path.insert(0, TOOLS)
import finetune_study as fs  # noqa: E402
import train_tiny_lm as tl  # noqa: E402

TINY = dict(d_model=40, layers=2, heads=4, kv_heads=2, head_dim=10, ffn_dim=48, context=160, index_heads=2,
            index_dim=6)
VARIANTS = "exact:24,full,indexer:24"
NAMES = ["exact-k24", "control-full", "indexer-k24"]
PACKAGE_FILES = ["eval.txt", "logits.safetensors", "model.safetensors", "train_log.json"]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")


def header(path):
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny model written as a package (fp16 weights, eval.txt), the starting point of fine-tuning."""
    out = tmp_path_factory.mktemp("finetune") / "base"
    out.mkdir()
    cfg = tl.Config(**TINY)
    torch.manual_seed(3)
    model = tl.TinyLM(cfg)
    tl.write_safetensors(str(out / "model.safetensors"),
                         {k: v.half().numpy() for k, v in tl.export_state(model).items()},
                         {"format": tl.FORMAT, "config": json.dumps(cfg.to_dict()), "training": "{}"})
    (out / "eval.txt").write_bytes(open(os.path.join(TOOLS, "train_tiny_lm.py"), "rb").read()[:700])
    return out


@pytest.fixture(scope="module")
def study(base, heldout_package):
    out, pack = base.parent / "study", base.parent / "pack"
    budget = 30
    cmd = [sys.executable, os.path.join(TOOLS, "finetune_study.py"), "--init", str(base), "--out", str(out),
           "--pack", str(pack), "--part-mib", "1", "--budget-seconds", str(budget), "--reserve-seconds", "3",
           "--export-seconds", "2", "--variants", VARIANTS, "--batch", "2", "--corpus-bytes", "2000000",
           "--heldout", heldout_package, "--heldout-eval-bytes", "2048", "--logit-tokens", "24", "--log-every", "2"]
    start = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out, pack, time.time() - start, budget


def test_study_writes_loadable_packages(base, study):
    out, _, seconds, budget = study
    assert seconds < budget + 10  # the interpreter's start before the script's clock is all that is not counted
    base_state = {k: v.float() for k, v in safetensors_torch.load_file(str(base / "model.safetensors")).items()}
    for name in NAMES:
        assert sorted(os.listdir(out / name)) == PACKAGE_FILES
        meta = header(out / name / "model.safetensors")
        assert all(v["dtype"] == "F16" for k, v in meta.items() if k != "__metadata__")
        assert json.loads(meta["__metadata__"]["config"]) == tl.Config(**TINY).to_dict()
        assert (out / name / "eval.txt").read_bytes() == (base / "eval.txt").read_bytes()
        cfg, model = tl.load_package(str(out / name), "cpu")
        state = tl.export_state(model)
        # fine-tuning moved the model's weights and (trained beside it) the indexers'
        assert not torch.equal(state["layers.0.wq"], base_state["layers.0.wq"])
        assert not torch.equal(state["layers.1.index_wq"], base_state["layers.1.index_wq"])
        ref = safetensors_torch.load_file(str(out / name / "logits.safetensors"))
        with torch.no_grad():
            logits = model(ref["tokens"].long()[None], exact=True)[0]
        assert (logits - ref["logits"]).abs().max() <= 1e-5 * ref["logits"].abs().max()


def test_summary(study):
    out, pack, _, budget = study
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_seconds"] <= budget
    packages = summary["packages"]
    assert list(packages) == ["base"] + NAMES
    first = packages[NAMES[0]]["steps"]
    assert first >= 1 and all(1 <= packages[n]["steps"] <= first for n in NAMES)
    assert [(packages[n]["attention"], packages[n]["k"], packages[n]["selector"], packages[n]["indexer_loss"])
            for n in NAMES] == [("topk", 24, "exact", "dense"), ("full", None, "exact", "dense"),
                                ("topk", 24, "indexer", "sparse")]
    for name in ["base"] + NAMES:
        p = packages[name]
        for key in ("eval_bpb_full", "eval_bpb_exact_64", "eval_bpb_exact_256", "eval_bpb_indexer_64",
                    "eval_bpb_indexer_256", "heldout_bpb_full"):
            assert 0 < p[key] < 9, (name, key, p[key])
        # k = 256 >= the 160-byte context reads every key: top-k equals full attention
        assert abs(p["eval_bpb_exact_256"] - p["eval_bpb_full"]) < 1e-6
        assert set(p["indexer_recall"]) == {"0", "1"}
        log = json.loads((out / name / "train_log.json").read_text()) if name != "base" else None
        if log is not None:
            assert log["evaluation"]["eval_bpb_full"] == p["eval_bpb_full"]
            assert log["finetune"]["steps"] == p["steps"]


def test_tar_parts_hold_the_packages(study):
    out, pack, _, _ = study
    summary = json.loads((pack / "summary.json").read_text())
    parts = sorted(n for n in os.listdir(pack) if n.startswith("finetune_packages.tar.part"))
    assert parts == summary["parts"] and len(parts) >= 1
    assert all((pack / n).stat().st_size <= 2**20 for n in parts)
    data = b"".join((pack / n).read_bytes() for n in parts)
    assert len(data) == summary["tar_bytes"]
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        assert set(members) == {f"{n}/{f}" for n in NAMES for f in PACKAGE_FILES} | {"study.log", "summary.json"}
        for name, member in members.items():
            assert tar.extractfile(member).read() == (out / name).read_bytes()


def test_single_finetune_command(base, tmp_path, heldout_package):
    """train_tiny_lm.py --init: one variant, stopped by --finetune-steps."""
    out = tmp_path / "ft"
    cmd = [sys.executable, os.path.join(TOOLS, "train_tiny_lm.py"), "--init", str(base), "--out", str(out),
           "--train-attention", "topk", "--train-k", "16", "--train-selector", "indexer", "--finetune-steps", "3",
           "--finetune-seconds", "60", "--batch", "2", "--corpus-bytes", "1000000", "--heldout",
           heldout_package, "--heldout-eval-bytes", "1024", "--logit-tokens", "16", "--log-every", "1"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(PACKAGE_FILES + ["train.log"])
    log = json.loads((out / "train_log.json").read_text())
    assert log["finetune"]["steps"] == 3 and log["finetune"]["selector"] == "indexer"
    assert json.loads(header(out / "model.safetensors")["__metadata__"]["training"])["k"] == 16
    assert "finetune top-16 (indexer selector) step 3" in run.stdout


def test_example_study_compares_the_study_packages():
    """examples/studies/finetune_4k.json (and _heads) name the base and every default variant's package."""
    defaults = [fs.parse_variant(v)[0] for v in fs.make_parser().get_default("variants").split(",")]
    for file in ("finetune_4k.json", "finetune_4k_heads.json"):
        with open(os.path.join(ROOT, "examples", "studies", file)) as f:
            config = json.load(f)
        names = [w["name"] for w in config["workloads"]]
        assert names[0] == "base" and sorted(names[1:]) == sorted(defaults)
        assert all(w["model"] == f"models/tiny_lm_finetune/{w['name']}" for w in config["workloads"][1:])
        assert all(w["text"] == "models/tiny_lm/eval.txt" and w["tokens"] == 4096 for w in config["workloads"])


def write_study_output(directory, bpb, entropy, selectors):
    """A `keysel study` output with what tools/finetune_table.py reads: results.json (per model, full attention
    and one row per (selector, k)) and by_row.csv (entropy per model, layer and row)."""
    directory.mkdir()
    studies = []
    for model, full in bpb.items():
        rows = [{"selector": s, "k": k, "metrics": {"bpb": {"mean": full + 0.01 * k / 64},
                                                   "recall": {"mean": 0.5 + 0.1 * (model != "base")},
                                                   "mass": {"mean": 0.75}}}
                for s, k in selectors]
        studies.append({"workload": model, "full_attention": {"bpb": {"mean": full}}, "rows": rows})
    (directory / "results.json").write_text(json.dumps({"studies": studies}))
    lines = ["workload,selector,k,group,entropy"]
    for (model, layer), values in entropy.items():
        lines += [f"{model} layer {layer},{s},{k},0,{v}" for s, k in selectors for v in values]
    (directory / "by_row.csv").write_text("\n".join(lines) + "\n")


def test_table_reports_each_model_against_the_base(tmp_path):
    """tools/finetune_table.py: bits per byte, change against the base, indexer recall / mass and entropy per layer,
    each computed from the study files (entropy: the mean over a layer's rows, then over layers)."""
    bpb = {"base": 1.25, "exact-k64": 1.5}
    entropy = {("base", 0): [1.0, 2.0], ("base", 1): [3.0], ("exact-k64", 0): [2.5], ("exact-k64", 1): [4.5, 5.5]}
    write_study_output(tmp_path / "study", bpb, entropy, [("exact", 64), ("indexer", 64)])
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "finetune_table.py"), "--study", str(tmp_path / "study")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    table = run.stdout.split("## ")
    bpb_table = next(t for t in table if t.startswith("Bits per byte"))
    assert "| exact-k64 | 1.5000 | 1.5100 (" in bpb_table
    change = next(t for t in table if t.startswith("Change against the base"))
    assert "| exact-k64 | 0.2500 | 0.2500 / " in change
    recall = next(t for t in table if t.startswith("Indexer recall"))
    assert "| base | 0.5000 / 0.7500 |" in recall and "| exact-k64 | 0.6000 / 0.7500 |" in recall
    ent = next(t for t in table if t.startswith("Attention entropy per layer"))
    # base: layers 1.5 and 3.0 (mean 2.25); exact-k64: 2.5 and 5.0 (mean 3.75, +1.5 against the base)
    assert "| base | 1.500 | 3.000 | 2.250 | 0.000 |" in ent
    assert "| exact-k64 | 2.500 | 5.000 | 3.750 | 1.500 |" in ent


def test_table_without_exact_rows_names_what_it_needs(tmp_path):
    write_study_output(tmp_path / "study", {"base": 1.0}, {("base", 0): [1.0]}, [("indexer", 64)])
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "finetune_table.py"), "--study", str(tmp_path / "study")],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "expected rows of the exact selector" in run.stderr and "['indexer']" in run.stderr

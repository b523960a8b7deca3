"""The top-k fine-tuning study's training on the CPU with a tiny random base package and a few seconds of budget:
tools/train_tiny_lm.py --init and tools/finetune_study.py write packages in models/tiny_lm's format that load, with
the summary (shorter training windows than the model's context, the retrieval task in the batches, retrieval exact
match with full and top-k attention, attention entropy), and the tar parts hold exactly those files; the chunked
top-k attention of the long-context evaluation against the dense one, and the attention statistics against a plain
computation."""
import io
import json
import math
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
import retrieval_task as rt  # noqa: E402
import train_tiny_lm as tl  # noqa: E402

TINY = dict(d_model=40, layers=2, heads=4, kv_heads=2, head_dim=10, ffn_dim=48, context=160, index_heads=2,
            index_dim=6)
VARIANTS = "exact:24,full,indexer:24"
NAMES = ["exact-k24", "control-full", "indexer-k24"]
PACKAGE_FILES = ["eval.txt", "logits.safetensors", "model.safetensors", "train_log.json"]
ENV = dict(os.environ, CUDA_VISIBLE_DEVICES="")
CONTEXT = 128  # the study's windows, shorter than the model's 160
BASE_TRAINING = {"retrieval_fraction": 0.3, "answer_weight": 5.0, "question": "definition", "retrieval_max_keys": 4,
                 "retrieval_min_context": 128}
MODES = ["full", "exact_64", "exact_256", "indexer_64", "indexer_256"]


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
    # the retrieval task as a long-context package ships it: its examples (two contexts, one beyond the study's
    # --retrieval-max-context) and its training's retrieval options
    source = open(os.path.join(TOOLS, "retrieval_task.py"), "rb").read()
    rt.write_retrieval(str(out), rt.generate_suite(source, [160, 320], [1, 4], [0, 1], 2, 5))
    (out / "train_log.json").write_text(json.dumps({"args": BASE_TRAINING}))
    return out


@pytest.fixture(scope="module")
def study(base, heldout_package):
    out, pack = base.parent / "study", base.parent / "pack"
    budget = 54
    cmd = [sys.executable, os.path.join(TOOLS, "finetune_study.py"), "--init", str(base), "--out", str(out),
           "--pack", str(pack), "--part-mib", "1", "--budget-seconds", str(budget), "--reserve-seconds", "3",
           "--export-seconds", "2", "--variants", VARIANTS, "--batch", "2", "--corpus-bytes", "2000000",
           "--heldout", heldout_package, "--heldout-eval-bytes", "2048", "--logit-tokens", "24", "--log-every", "2",
           "--context", str(CONTEXT), "--retrieval-max-context", "200", "--row-chunk-elements", "20000",
           "--eval-share", "0.4", "--retrieval-min-examples", "2"]
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
        assert p["context"] == CONTEXT
        log = json.loads((out / name / "train_log.json").read_text()) if name != "base" else None
        if log is not None:
            assert log["evaluation"]["eval_bpb_full"] == p["eval_bpb_full"]
            assert log["finetune"]["steps"] == p["steps"]
            assert log["finetune"]["context"] == CONTEXT and log["finetune"]["answer_weight"] == 5.0
            assert p["retrieval_fraction"] == 0.3 and 0 <= p["final_train_answer_exact_match"] <= 1
    # the retrieval rows are the same for every variant: as many answers at every logged step
    logs = [json.loads((out / n / "train_log.json").read_text())["finetune"]["retrieval"] for n in NAMES]
    assert all(logs) and sum(e["examples"] for e in logs[0]) >= 1
    for other in logs[1:]:
        steps = min(len(other), len(logs[0]))
        assert [(e["step"], e["examples"]) for e in other[:steps]] == [(e["step"], e["examples"]) for e in logs[0][:steps]]


def test_summary_evaluation(study):
    """Entropy and top-k mass per layer and head, and retrieval exact match of every package on the base's examples
    up to --retrieval-max-context (200: the 8 examples of 160 bytes), with full and top-k attention."""
    out, _, _, _ = study
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["context"], summary["model_context"]) == (CONTEXT, TINY["context"])
    assert (summary["retrieval_fraction"], summary["answer_weight"]) == (0.3, 5.0)
    assert summary["evaluation"]["retrieval_examples_available"] == 8
    assert "retrieval.json" in summary["evaluation"]["retrieval_source"]
    packages = summary["packages"]
    base_examples = packages["base"]["retrieval"]["examples"]
    assert base_examples >= 1
    for name in ["base"] + NAMES:
        att = packages[name]["attention_statistics"]
        assert att["context"] == CONTEXT and att["rows"] == 700
        heads = att["entropy_heads"]
        assert len(heads) == TINY["layers"] and all(len(h) == TINY["heads"] for h in heads)
        # a row at position t has at most t + 1 keys: entropy in (0, ln CONTEXT)
        assert all(0 < e < math.log(CONTEXT) for h in heads for e in h)
        assert all(0 < e < math.log(CONTEXT) for e in att["entropy_pbar"])
        mass = att["exact_mass"]
        assert mass["64"]["rows"] == 5 * (CONTEXT - 64)  # five windows of 128 bytes, then one of 60
        assert all(64 / CONTEXT < m <= 1 + 1e-9 for m in mass["64"]["pbar"])
        assert mass["256"] == {"rows": 0, "pbar": None, "heads": None}  # no row at position >= 256
        ret = packages[name]["retrieval"]
        assert ret["examples"] + ret["skipped_for_time"] == 8
        assert ret["examples"] <= base_examples and ret["examples_by_context"] == {"160": ret["examples"]}
        correct = ret["per_example"]["answer_bytes_correct"]
        assert sorted(correct) == sorted(MODES) and all(len(c) == ret["examples"] for c in correct.values())
        assert all(0 <= c <= rt.ANSWER_LENGTH for c in sum(correct.values(), []))
        # k = 256 >= 160 bytes reads every key: the same predictions as full attention
        assert correct["exact_256"] == correct["full"] and correct["indexer_256"] == correct["full"]
        if ret["examples"]:
            em = ret["exact_match"]["full"]
            assert em["all"] == sum(c == rt.ANSWER_LENGTH for c in correct["full"]) / ret["examples"]
            assert set(em["by_context_keys"]) <= {"160/1", "160/4"}
            assert all(v > 0 for v in ret["seconds_per_example"]["exact_64"].values())


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


def tiny_float64_model(seed=5):
    """A random tiny model in float64 with weights large enough for peaked attention (no ties in its scores)."""
    cfg = tl.Config(**dict(TINY, context=64))
    torch.manual_seed(seed)
    model = tl.TinyLM(cfg).double()
    with torch.no_grad():
        for layer in model.layers:
            for w in (layer.wq, layer.wk, layer.indexer.index_wq, layer.indexer.index_wk, layer.indexer.index_ww):
                w.weight.mul_(15.0)
    return cfg, model.eval()


def test_topk_lowest_on_ties_takes_what_a_stable_sort_takes():
    """Rows of few distinct values (many ties, -inf included): the same key sets as the first k of a stable
    descending sort, for every k."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.randint(0, 4, (50, 23), generator=gen).double()
    scores[scores == 3] = float("-inf")
    for k in range(1, 24):
        ref = torch.sort(scores, dim=-1, descending=True, stable=True).indices[:, :k].sort(-1).values
        assert torch.equal(tl.topk_lowest_on_ties(scores, k), ref), k


@pytest.mark.parametrize("selector", ["exact", "indexer"])
def test_chunked_topk_attention_matches_the_dense_one(selector):
    """ChunkedTopkAttention (query rows in chunks, the selected keys gathered) gives the logits of TrainingAttention
    (dense [B, T, T] masks) in float64: chunks of one row, of several rows that do not divide T, and one chunk; k
    below, near and above the row counts; two sequences."""
    cfg, model = tiny_float64_model()
    tokens = torch.randint(0, 256, (2, 37), generator=torch.Generator().manual_seed(2))
    for k in (1, 5, 16, 40):
        with torch.no_grad():
            ref = model(tokens, attention=tl.TrainingAttention(cfg, "topk", k=k, selector=selector))
        for max_elements in (1, 7 * TINY["heads"] * 37, 1 << 20):
            with torch.no_grad():
                got = model(tokens, attention=tl.ChunkedTopkAttention(cfg, k, selector, max_elements))
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            assert err < 1e-12, (k, max_elements, err)
    with torch.no_grad():
        full = model(tokens, exact=True)
        sparse = model(tokens, attention=tl.ChunkedTopkAttention(cfg, 4, selector))
    assert (full - sparse).abs().max() > 1e-3  # 4 of 37 keys is not full attention
    with pytest.raises(ValueError, match="selector"):
        tl.ChunkedTopkAttention(cfg, 4, "proxy")
    with pytest.raises(ValueError, match="k >= 1"):
        tl.ChunkedTopkAttention(cfg, 0, selector)


def test_attention_statistics_against_a_plain_computation():
    """Entropy per layer and head (and of the head mean) and the exact top-k mass, against per-row sums in plain
    Python over each window's attention probabilities: windows of 20 bytes over 50 (the last of 10), k = 4 and 16."""
    cfg, model = tiny_float64_model(seed=7)
    text = bytes(range(60, 110))
    stats = tl.attention_statistics(model, text, 20, "cpu", ks=(4, 16))
    g = cfg.heads // cfg.kv_heads
    ent = [[0.0] * cfg.heads for _ in range(cfg.layers)]
    ent_bar = [0.0] * cfg.layers
    mass = {k: [0.0] * cfg.layers for k in (4, 16)}
    head_mass = {k: [[0.0] * cfg.heads for _ in range(cfg.layers)] for k in (4, 16)}
    rows, mass_rows = 0, {4: 0, 16: 0}
    for w0 in range(0, len(text), 20):
        window = text[w0:w0 + 20]
        capture = []
        with torch.no_grad():
            model(torch.tensor(list(window))[None], exact=True, capture=capture)
        for li, (_, q, k, _) in enumerate(capture):
            for t in range(len(window)):
                probs = []
                for h in range(cfg.heads):
                    logits = [float(q[0, t, h] @ k[0, s, h // g]) / math.sqrt(cfg.head_dim) for s in range(t + 1)]
                    top = max(logits)
                    e = [math.exp(x - top) for x in logits]
                    p = [x / sum(e) for x in e]
                    probs.append(p)
                    ent[li][h] += -sum(x * math.log(x) for x in p if x > 0)
                    for kk in (4, 16):
                        if t >= kk:
                            head_mass[kk][li][h] += sum(sorted(p, reverse=True)[:kk])
                pbar = [sum(p[s] for p in probs) / cfg.heads for s in range(t + 1)]
                ent_bar[li] += -sum(x * math.log(x) for x in pbar if x > 0)
                for kk in (4, 16):
                    if t >= kk:
                        mass[kk][li] += sum(sorted(pbar, reverse=True)[:kk])
        rows += len(window)
        for kk in (4, 16):
            mass_rows[kk] += max(0, len(window) - kk)
    assert stats["rows"] == rows == 50 and mass_rows == {4: 16 + 16 + 6, 16: 4 + 4}
    for li in range(cfg.layers):
        assert stats["entropy_pbar"][li] == pytest.approx(ent_bar[li] / rows, abs=1e-5)
        for h in range(cfg.heads):
            assert stats["entropy_heads"][li][h] == pytest.approx(ent[li][h] / rows, abs=1e-5)
        for kk in (4, 16):
            assert stats["exact_mass"][str(kk)]["rows"] == mass_rows[kk]
            assert stats["exact_mass"][str(kk)]["pbar"][li] == pytest.approx(mass[kk][li] / mass_rows[kk], abs=1e-5)
            for h in range(cfg.heads):
                assert stats["exact_mass"][str(kk)]["heads"][li][h] == pytest.approx(
                    head_mass[kk][li][h] / mass_rows[kk], abs=1e-5)
    # the weights make attention peaked: below the uniform distribution's mean entropy
    uniform = sum(math.log(t + 1) for t in range(20)) * 2 / 50 + sum(math.log(t + 1) for t in range(10)) / 50
    assert min(min(h) for h in stats["entropy_heads"]) < uniform - 0.1


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


def test_table_from_the_summary_alone(study):
    """tools/finetune_table.py --summary: the study's own evaluation, each figure read from summary.json (bits per
    byte, the change against the base, retrieval exact match, entropy per layer and head and its change)."""
    out, _, _, _ = study
    summary = json.loads((out / "summary.json").read_text())
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "finetune_table.py"), "--summary",
                          str(out / "summary.json")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    sections = run.stdout.split("### ")
    p, b = summary["packages"]["exact-k24"], summary["packages"]["base"]
    bpb = next(t for t in sections if t.startswith("Bits per byte"))
    assert (f"| exact-k24 | {p['eval_bpb_full']:.4f} | {p['eval_bpb_exact_64']:.4f} "
            f"({p['eval_bpb_exact_64'] - p['eval_bpb_full']:.4f}) |") in bpb
    assert f"| exact-k24 | {p['eval_bpb_full'] - b['eval_bpb_full']:.4f} |" in bpb
    retrieval = next(t for t in sections if t.startswith("Retrieval exact match"))
    em = p["retrieval"]["exact_match"]["indexer_64"]
    assert f"| exact-k24 | indexer_64 | {em['by_context']['160']:.3f} | {em['all']:.3f} |" in retrieval
    heads = next(t for t in sections if t.startswith("Entropy per layer and head"))
    change = p["attention_statistics"]["entropy_heads"][1][2] - b["attention_statistics"]["entropy_heads"][1][2]
    line = next(row for row in heads.splitlines() if row.startswith("| exact-k24 |"))
    assert line.split(" | ")[1 + 1 * TINY["heads"] + 2] == f"{change:.3f}"  # L1H2
    assert "Pearson r over the 4 models" in run.stdout


def test_pearson():
    import finetune_table as ft
    assert ft.pearson([1, 2, 3, 4], [2, 4, 6, 8]) == pytest.approx(1.0)
    assert ft.pearson([1, 2, 3], [3, 1, 2]) == pytest.approx(-0.5)
    assert ft.pearson([1, 2, None, 4], [1, 2, 3, None]) is None  # fewer than 3 pairs
    assert ft.pearson([1, 1, 1], [1, 2, 3]) is None  # no spread

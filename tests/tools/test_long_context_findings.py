"""tools/long_context_findings.py over a small hand-made study output: the accuracy table, where accuracy reaches
full attention's, the protocol comparison (interpolated in recall) and the entropy correlations."""
import json
import os
import subprocess
import sys

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import long_context_findings as lcf  # noqa: E402


def metrics(**values):
    return {name: {"mean": v, "min": v, "p5": v, "p50": v, "p95": v, "count": 1} for name, v in values.items()}


def write_study(directory):
    """One context of 4096, k 64 and 256; the indexer answers from k = 256 (full attention answers)."""
    rows = []
    for k, exact_bpb in ((64, 1.1), (256, 1.0)):
        rows.append({"selector": "exact", "k": k, "metrics": metrics(recall=1.0, bpb=exact_bpb, exact_match=1.0)})
        rows.append({"selector": "indexer", "k": k,
                     "metrics": metrics(recall=0.7, bpb=2.0 if k == 64 else 1.05, exact_match=float(k == 256))})
        for drop, bpb_half, bpb_most, em in (("random", 3.0, 2.0, 0.0), ("lowest", 1.2, 1.1, 1.0)):
            for p, bpb in (("0.5", bpb_half), ("0.9", bpb_most)):
                rows.append({"selector": f"fidelity[drop={drop},precision={p}]", "k": k,
                             "metrics": metrics(recall=float(p), bpb=bpb, exact_match=em)})
    study = {"workload": "tiny-lm(retrieval) context 4096",
             "full_attention": {"bpb": metrics(x=1.0)["x"], "exact_match": {**metrics(x=1.0)["x"], "count": 2}},
             "rows": rows}
    (directory / "results.json").write_text(json.dumps({"selectors": [], "studies": [study]}))
    # by_row: three layers; entropy falls as the exact mass rises (r = -1 over the cells).
    lines = ["workload,selector,k,token,position,group,recall,mass,mass_ratio,kl,top1,out_err,entropy,"
             "entropy_normalized"]
    for layer, (entropy, mass, recall) in enumerate(((1.0, 0.9, 0.3), (2.0, 0.8, 0.5), (3.0, 0.7, 0.4))):
        for k in (64, 256):
            for token in range(2):
                w = f"tiny-lm(retrieval) context 4096 layer {layer}"
                lines.append(f"{w},exact,{k},{token},{token},0,1,{mass},1,0,1,0,{entropy},0.5")
                lines.append(f"{w},indexer,{k},{token},{token},0,{recall},{mass},1,0,1,0,{entropy},0.5")
    (directory / "by_row.csv").write_text("\n".join(lines) + "\n")


def test_findings_tables(tmp_path):
    write_study(tmp_path)
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "long_context_findings.py"), "--study", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert "Examples per context: 4096: 2." in out
    assert "| indexer | 0.00 | 1.00 |" in out
    # The indexer answers from k = 256 on, with recall 0.7 there.
    assert "| indexer | 256 (recall 0.700) |" in out
    # At recall 0.7 the protocols interpolate halfway between p = 0.5 and 0.9: random (3.0 + 2.0) / 2 at k = 64,
    # lowest (1.2 + 1.1) / 2; the indexer's 2.0 is nearer random by bpb, and by accuracy (0) too.
    assert "| indexer | 4096 | 64 | 0.700 | 2.000 | 2.500 | 1.150 | random | 0.00 | 0.00 | 1.00 | random |" in out
    assert "| indexer | 4096 | 256 | 0.700 | 1.050 | 2.500 | 1.150 | lowest | 1.00 | 0.00 | 1.00 | lowest |" in out
    # Entropy against exact mass: r = -1 over the three cells and over the rows.
    assert "| 64 | 3 | -1.000 |" in out
    assert "| 64 | 3 | -1.000 | 0.500 | 6 | -1.000 | 0.500 |" in out


def test_helpers():
    assert lcf.interpolate([(0.5, 3.0), (1.0, 1.0)], 0.75) == 2.0
    assert lcf.interpolate([(0.5, 3.0), (1.0, 1.0)], 0.2) == 3.0  # clamped
    assert abs(lcf.pearson([1, 2, 3], [2, 4, 6]) - 1.0) < 1e-12
    assert lcf.pearson([1, 1, 1], [1, 2, 3]) != lcf.pearson([1, 1, 1], [1, 2, 3])  # NaN without spread


def test_rejects_a_study_without_a_task(tmp_path):
    (tmp_path / "results.json").write_text(json.dumps({"selectors": [], "studies": []}))
    run = subprocess.run([sys.executable, os.path.join(TOOLS, "long_context_findings.py"), "--study", str(tmp_path)],
                         capture_output=True, text=True)
    assert run.returncode != 0
    assert "expected a retrieval task study" in run.stderr

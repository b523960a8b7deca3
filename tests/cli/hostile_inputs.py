#!/usr/bin/env python3
"""Hostile command lines and input files against the keysel command line (docs/reliability.md).

Every case is something a user could type or feed: an overflowing count, a file nested 100 000 deep, a number
no double holds, a destination that cannot be written. Each must end the way docs/reliability.md promises:
exit status 2, one error line on stderr naming the argument, and no output written (files that were there keep
their bytes). A few cases must instead succeed (huge but meaningful parameters), and one (a tune meeting no
target) exits 1 and writes nothing.

    hostile_inputs.py <keysel binary> <scratch directory> [case-name-substring]
"""
import json
import os
import shutil
import struct
import subprocess
import sys

KEYSEL, WORK = sys.argv[1], sys.argv[2]
ONLY = sys.argv[3] if len(sys.argv) > 3 else ""
INT64_MAX = 9223372036854775807

SMALL = {"type": "synthetic", "keys": 256, "tokens": 2, "query_heads": 4, "kv_heads": 2, "head_dim": 16, "seed": 3}


def study_file(name, text_or_doc):
    """Writes a study file into WORK and returns its path."""
    path = os.path.join(WORK, name)
    with open(path, "w") as f:
        f.write(text_or_doc if isinstance(text_or_doc, str) else json.dumps(text_or_doc))
    return path


def safetensors(name, tensors, header_text=None):
    """A safetensors file: tensors {name: (dtype, shape, bytes)}; header_text replaces the header when given."""
    header, blobs, offset = {}, b"", 0
    for key, (dtype, shape, data) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        blobs += data
        offset += len(data)
    header["__metadata__"] = {"format": "keysel-dump/1"}
    text = (header_text if header_text is not None else json.dumps(header)).encode()
    path = os.path.join(WORK, name)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blobs)
    return path


def f32(values):
    return struct.pack("<%df" % len(values), *values)


def dump_tensors(T=2, N=8, Hq=2, Hkv=1, D=4, positions=None, k_values=None):
    """One valid layer of a dump (docs/dumps.md), as safetensors tensors."""
    q = [0.1 * (i % 7) for i in range(T * Hq * D)]
    k = k_values if k_values is not None else [0.05 * (i % 5) for i in range(N * Hkv * D)]
    v = [0.02 * (i % 3) for i in range(N * Hkv * D)]
    pos = positions if positions is not None else [N - T + t for t in range(T)]
    return {
        "layer0.q": ("F32", [T, Hq, D], f32(q)),
        "layer0.k": ("F32", [N, Hkv, D], f32(k)),
        "layer0.v": ("F32", [N, Hkv, D], f32(v)),
        "layer0.positions": ("I32", [T], struct.pack("<%di" % T, *pos)),
    }


def dump_study(name, path):
    return study_file(name, {"workloads": [{"type": "dump", "path": path, "layer": 0}],
                             "selectors": [{"type": "exact"}], "k": [2]})


def nested_hybrid(depth):
    """JSON text of `depth` hybrid specs, each the candidates of the one above (built as text: Python's own
    encoder recurses)."""
    return '{"type": "hybrid", "candidate_k": 4, "candidates": ' * depth + '{"type": "exact"}' + "}" * depth


def with_selector(selector_text):
    """A study file's text over SMALL with one selector given as JSON text."""
    return '{"workloads": [%s], "selectors": [%s], "k": [4]}' % (json.dumps(SMALL), selector_text)


failures = []


def case(name, args, needles=(), status=2, absent=(), unchanged=(), timeout=120):
    """Runs `keysel args`; checks the exit status, the error line, absent outputs and unchanged files."""
    if ONLY and ONLY not in name:
        return
    before = {}
    for path in unchanged:
        with open(path, "rb") as f:
            before[path] = f.read()
    try:
        run = subprocess.run([KEYSEL] + args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        failures.append(f"{name}: still running after {timeout} s")
        return
    problems = []
    if run.returncode != status:
        problems.append(f"exit status {run.returncode}, expected {status}")
    if status == 2:
        errors = [line for line in run.stderr.splitlines() if line.startswith("keysel: error:")]
        if len(errors) != 1 or not run.stderr.rstrip("\n").splitlines()[-1].startswith("keysel: error:"):
            problems.append("expected exactly one 'keysel: error:' line, last on stderr")
        for needle in needles:
            if needle not in run.stderr:
                problems.append(f"the error does not mention {needle!r}")
    for path in absent:
        if os.path.exists(path):
            problems.append(f"{path} exists after the run")
    for path, data in before.items():
        with open(path, "rb") as f:
            if f.read() != data:
                problems.append(f"{path} changed")
    leftovers = [n for n in os.listdir(WORK) if ".tmp-" in n]
    if leftovers:
        problems.append(f"temporary files left behind: {leftovers}")
    if problems:
        failures.append(f"{name}: " + "; ".join(problems) + f"\n    stderr: {run.stderr.strip()[-600:]}")
    else:
        print(f"ok   {name}: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else 'exit ' + str(run.returncode)}")


shutil.rmtree(WORK, ignore_errors=True)
os.makedirs(WORK)
out = os.path.join(WORK, "out")  # a study --out directory that must never appear
kept = os.path.join(WORK, "kept.json")
with open(kept, "w") as f:
    f.write('{"previous": "results"}\n')

# 1. Kept-key counts that overflow int64 when added.
case("sinks overflow", ["study", "--sinks", str(INT64_MAX), "--window", "2"], ["n_sink"])
case("study file n_sink overflow",
     ["study", "--config", study_file("sinks.json", {"workloads": [SMALL], "selectors": [{"type": "random"}],
                                                     "k": [4], "n_sink": INT64_MAX, "n_local": 2}), "--out", out],
     ["n_sink"], absent=[out])
# 2. FAISS factory strings that crashed FAISS or grew without bound: refused when the study file is read.
for factory in ["IVF4,PQ0", "IVF0,Flat", "HNSW0", "IVF4_HNSW0,Flat", "IVF4,PQ4x0", "IVF1000000000,Flat", "HNSW1",
                "HNSW2000000000"]:
    case(f"faiss factory {factory}",
         ["study", "--config", study_file("faiss.json", {"workloads": [SMALL], "k": [4],
                                                         "selectors": [{"type": "faiss", "factory": factory}]}),
          "--out", out],
         ["factory", factory], absent=[out])
# 3. A tiny-lm byte range whose end overflows.
case("tiny-lm offset overflow",
     ["study", "--config", study_file("tiny.json", {"workloads": [{"type": "tiny-lm", "tokens": 16,
                                                                   "offset": INT64_MAX - 4}],
                                                    "selectors": [{"type": "exact"}], "k": [4]}), "--out", out],
     ["offset"], absent=[out])
# 5. Nesting: a study file, a selector spec, a safetensors header.
case("study file nested 100000 deep", ["study", "--config", study_file("deep.json", "[" * 100000), "--out", out],
     ["nested"], absent=[out])
hybrid_file = study_file("hybrid.json", with_selector(nested_hybrid(20000)))
case("hybrid spec nested 20000 deep (a 600 KB file)", ["study", "--config", hybrid_file, "--out", out], ["nested"],
     absent=[out])
case("hybrid spec nested 12 deep",
     ["study", "--config", study_file("hybrid12.json", with_selector(nested_hybrid(12))), "--out", out],
     ["candidates", "nested at most 8"], absent=[out])
deep_header = safetensors("deep.safetensors", {}, header_text="[" * 100000 + "]" * 100000)
case("safetensors header nested 100000 deep",
     ["study", "--config", dump_study("deep_dump.json", deep_header), "--out", out], ["nested"], absent=[out])
# 6. Thread counts an OpenMP runtime cannot give.
case("threads 50000", ["study", "--threads", "50000"], ["--threads"])
case("threads 65536", ["tune", "--threads", "65536"], ["--threads"])
# 7. k beyond the keys there are.
case("study k 1e8 of 512 keys", ["study", "--keys", "512", "--k", "100000000"], ["'k'", "N = 512"])
case("tune k 1e8 of 512 keys", ["tune", "--keys", "512", "--tokens", "2", "--k", "100000000", "--no-faiss"],
     ["'k'", "N = 512"])
# 8. A study that cannot fit in memory is refused up front, naming the estimate and what the machine has.
case("study of 0.5 TB", ["study", "--keys", "1000000", "--tokens", "1000", "--heads", "64", "--kv-heads", "1"],
     ["memory", "available"])
# 9. Numbers JSON allows but no double holds.
number_file = study_file("number.json", '{"workloads": [{"type": "synthetic", "focus": 1e309}], '
                                        '"selectors": [{"type": "exact"}], "k": [4]}')
case("1e309 in a study file", ["study", "--config", number_file, "--out", out], ["not valid JSON", "number.json"],
     absent=[out])
# 10, 11. Destinations: checked before any work, written whole or not at all.
case("study --out is a file", ["study", "--out", kept], ["--out", "not a directory"], unchanged=[kept])
case("study --out empty", ["study", "--out", ""], ["--out"])
case("study --json empty", ["study", "--json", ""], ["--json"])
case("study --json in a missing directory", ["study", "--json", os.path.join(WORK, "no", "such", "f.json")],
     ["--json", "does not exist"])
case("study --json kept when the study is refused", ["study", "--keys", "512", "--k", "100000000", "--json", kept],
     ["'k'"], unchanged=[kept])
partial = study_file("partial.json", {"workloads": [SMALL, {"type": "dump", "path": os.path.join(WORK, "none"),
                                                            "layer": 0}],
                                      "selectors": [{"type": "exact"}], "k": [4]})
case("study failing after its first workload writes nothing", ["study", "--config", partial, "--out", out],
     ["none"], absent=[out])
kept_spec = os.path.join(WORK, "kept_spec.json")
shutil.copy(kept, kept_spec)
case("tune meeting no target keeps --out and --json",
     ["tune", "--keys", "256", "--tokens", "2", "--heads", "4", "--kv-heads", "2", "--dim", "16", "--k", "8",
      "--formats", "int4", "--no-faiss", "--overfetch", "", "--no-rotation", "--group-size", "0",
      "--target", "recall:mean>=1.5", "--out", kept_spec, "--json", kept],
     status=1, unchanged=[kept, kept_spec])
case("tune --out is a directory", ["tune", "--out", WORK], ["--out", "directory"])
# 12. Smaller gaps.
case("study --config a directory", ["study", "--config", WORK], ["directory"])
case("tune --group-size -1", ["tune", "--group-size", "-1"], ["--group-size"])
case("dump position >= N",
     ["study", "--config", dump_study("pos.json", safetensors("pos.safetensors", dump_tensors(positions=[6, 8]))),
      "--out", out], ["positions", "< N = 8"], absent=[out])
nan_k = [0.0] * 32
nan_k[5] = float("nan")
case("NaN in a dump's keys",
     ["study", "--config", dump_study("nan.json", safetensors("nan.safetensors", dump_tensors(k_values=nan_k))),
      "--out", out], ["layer0.k", "finite"], absent=[out])
lonely = dump_tensors()
lonely["layer0.index_k"] = ("F32", [8, 4], f32([0.1] * 32))
case("index_k without index_q",
     ["study", "--config", dump_study("lonely.json", safetensors("lonely.safetensors", lonely)), "--out", out],
     ["layer0.index_k", "index_q"], absent=[out])

# Huge but meaningful parameters run: one block of every key; an oversample past every key.
huge = study_file("huge.json", {"workloads": [SMALL], "k": [8],
                                "selectors": [{"type": "block_topk", "block_size": INT64_MAX},
                                              {"type": "block_topk", "oversample": 1e308},
                                              {"type": "hybrid", "candidate_k": 100000000,
                                               "candidates": {"type": "random"}}]})
case("block_size 2^63-1, oversample 1e308, candidate_k 1e8 run", ["study", "--config", huge, "--out", out], status=0)

if failures:
    print("\n".join("FAIL " + f for f in failures))
    sys.exit(1)
print("all hostile inputs ended as documented")

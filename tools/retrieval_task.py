#!/usr/bin/env python3
"""keysel's long-context key-value retrieval task: definitions planted in source code, one of them asked at the end.

An example of context length C is C bytes (docs/tiny-lm.md, "The 32K model and the retrieval task"):

    <held-out code, with K definition lines inserted at line boundaries>
    assert TOKEN_4821 == "9f3a07c1

Each definition line is `TOKEN_<id> = "<value>"` followed by a newline (<id> 4 random digits 1000..9999, distinct
within an example; <value> 8 random lowercase hex digits). The last line asks one of the K keys; the example ends with
that key's value, the answer (ANSWER_LENGTH bytes). The other K - 1 definitions (distractors) sit at random line
boundaries; the asked one at the boundary that brings its line closest to the requested depth, where

    depth = (byte offset of the asked definition line in the example) / (C - ANSWER_LENGTH - len(query) - len(line))

is 0 for the first line of the example and 1 for the line right before the query. The code around the definitions is
a slice of the source text starting at a line start, its last byte replaced by a newline. Everything is determined by
the seed.

A model solves an example when its argmax next-byte prediction at each of the ANSWER_LENGTH answer positions
(teacher-forced: the prompt and the answer bytes before it are the input) equals the answer byte; with argmax
decoding this is the same as greedy generation of the answer.

Files (write_retrieval): a directory gets retrieval.bin, the bytes of every example one after the other (prompt then
answer), and retrieval.json:
    {"format": "keysel-retrieval/1", "data": "retrieval.bin", "examples": [
        {"offset": <byte offset in retrieval.bin>, "length": <C>, "answer_length": 8, "keys": <K>,
         "depth": <depth of the asked line>, "context": <C>}, ...]}
with offsets increasing and no gaps; the answer is the last answer_length bytes of each example.

Usage:
  python3 tools/retrieval_task.py --source <.py file or directory> --out DIR \\
      [--contexts 8192,16384,32768] [--keys 1,4] [--depths 0,0.25,0.5,0.75,1] [--per-cell 3] [--seed 1]
Needs only the Python standard library (numpy is used when present to find line starts faster).
"""
import argparse
import bisect
import json
import math
import os
import random
import sys

FORMAT = "keysel-retrieval/1"
ANSWER_LENGTH = 8
HEX = "0123456789abcdef"
ID_LOW, ID_HIGH = 1000, 9999  # 4-digit ids
LINE_LENGTH = len(b'TOKEN_1000 = "00000000"\n')  # every definition line has this length (24)
QUERY_LENGTH = len(b'assert TOKEN_1000 == "')  # and every query (22)
OVERHEAD = ANSWER_LENGTH + QUERY_LENGTH  # bytes of an example besides the code and the definitions


def definition_line(key_id, value):
    return b'TOKEN_%d = "%s"\n' % (key_id, value.encode())


def query_line(key_id):
    return b'assert TOKEN_%d == "' % key_id


def min_context(keys):
    """The shortest example with `keys` definitions (one byte of code: the newline the query line starts after)."""
    return OVERHEAD + keys * LINE_LENGTH + 1


def line_starts(code):
    """Offsets s in [0, len(code)] where a line starts: 0 and every offset after a newline."""
    try:
        import numpy as np
        return [0] + (np.flatnonzero(np.frombuffer(code, dtype=np.uint8) == 10) + 1).tolist()
    except ImportError:
        out, i = [0], code.find(b"\n")
        while i >= 0:
            out.append(i + 1)
            i = code.find(b"\n", i + 1)
        return out


class Example:
    """One example: `data` (prompt then answer, `length` bytes) and its record in retrieval.json."""

    def __init__(self, data, keys, depth, key_id, value):
        self.data = data
        self.keys = keys
        self.depth = depth
        self.key_id = key_id
        self.value = value

    @property
    def length(self):
        return len(self.data)

    @property
    def answer(self):
        return self.data[-ANSWER_LENGTH:]

    def record(self, offset):
        return {"offset": offset, "length": self.length, "answer_length": ANSWER_LENGTH, "keys": self.keys,
                "depth": round(self.depth, 6), "context": self.length}


def code_slice(text, size, rng):
    """`size` bytes of `text` starting at a line start chosen at random, the last byte a newline."""
    if size < 1:
        raise ValueError(f"code_slice: size must be >= 1, got {size}")
    if len(text) < size + 1:
        raise ValueError(f"code_slice: the source text has {len(text)} bytes, fewer than the {size + 1} an example "
                         f"needs")
    for _ in range(8):
        start = rng.randrange(0, len(text) - size)
        nl = text.find(b"\n", start, len(text) - size)
        if nl >= 0 and nl + 1 + size <= len(text):
            start = nl + 1
            break
    return text[start:start + size - 1] + b"\n"


def make_example(text, context, keys, depth, rng, used_ids=None):
    """An example of exactly `context` bytes from `text` with `keys` definitions, the asked one at `depth` (a
    fraction in [0, 1]; None: uniform at random). `used_ids`: a set of ids not to use, updated (keeps ids distinct
    across the examples of a packed training row)."""
    if keys < 1:
        raise ValueError(f"make_example: keys must be >= 1, got {keys}")
    if context < min_context(keys):
        raise ValueError(f"make_example: context must be >= {min_context(keys)} for {keys} keys, got {context}")
    if depth is None:
        depth = rng.random()
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"make_example: depth must be in [0, 1], got {depth}")
    used = used_ids if used_ids is not None else set()
    ids = []
    while len(ids) < keys:
        key_id = rng.randint(ID_LOW, ID_HIGH)
        if key_id not in used:
            used.add(key_id)
            ids.append(key_id)
    values = ["".join(rng.choice(HEX) for _ in range(ANSWER_LENGTH)) for _ in range(keys)]
    asked = rng.randrange(keys)
    size = context - OVERHEAD - keys * LINE_LENGTH
    code = code_slice(text, size, rng)
    for _ in range(8):  # the asked name must not occur in the code by chance
        if b"TOKEN_%d" % ids[asked] not in code:
            break
        code = code_slice(text, size, rng)
    starts = line_starts(code)  # ends with len(code): the code ends with a newline
    inner = starts[1:-1] or [0]  # distractors never at the very start or end, so depths 0 and 1 are reachable
    distractors = sorted(rng.choice(inner) for _ in range(keys - 1))
    # the asked line at boundary b goes before any distractor at b: its offset is b + LINE_LENGTH * #(p < b)
    span = context - OVERHEAD - LINE_LENGTH  # the offset of the last possible line: depth 1
    target = depth * span
    best, best_err = 0, None
    lo = bisect.bisect_left(starts, target - LINE_LENGTH * keys)
    hi = bisect.bisect_right(starts, target + LINE_LENGTH) + 1
    for b in starts[max(0, lo - 1):min(len(starts), hi + 1)]:
        err = abs(b + LINE_LENGTH * bisect.bisect_left(distractors, b) - target)
        if best_err is None or err < best_err:
            best, best_err = b, err
    # assemble: boundaries in order; at one boundary the asked line first
    inserts = [(best, 0, asked)] + [(p, 1, j) for p, j in zip(distractors, [j for j in range(keys) if j != asked])]
    inserts.sort()
    parts, prev, asked_offset, written = [], 0, None, 0
    for p, _, j in inserts:
        parts.append(code[prev:p])
        written += p - prev
        if j == asked:
            asked_offset = written
        line = definition_line(ids[j], values[j])
        parts.append(line)
        written += len(line)
        prev = p
    parts.append(code[prev:])
    parts.append(query_line(ids[asked]))
    parts.append(values[asked].encode())
    data = b"".join(parts)
    assert len(data) == context, (len(data), context)
    return Example(data, keys, asked_offset / span, ids[asked], values[asked])


def generate_suite(text, contexts, key_counts, depths, per_cell, seed):
    """Examples for every (context, keys, depth) in that order, `per_cell` of each, deterministic in `seed`."""
    rng = random.Random(seed)
    out = []
    for context in contexts:
        for keys in key_counts:
            for depth in depths:
                for _ in range(per_cell):
                    out.append(make_example(text, context, keys, depth, rng))
    return out


def pack_row(text, length, rng, min_context_bytes, max_context_bytes, max_keys):
    """A training row of exactly `length` bytes made of examples one after the other, each of a context drawn
    log-uniformly in [min_context_bytes, max_context_bytes] (both capped at `length`; the last example takes what
    is left), 1..max_keys keys, a uniform depth, ids distinct within the row. Returns (row bytes, [offset of each
    answer's first byte in the row])."""
    if length < min_context(max_keys):
        raise ValueError(f"pack_row: length must be >= {min_context(max_keys)} for {max_keys} keys, got {length}")
    lo = min(length, max(min_context_bytes, min_context(max_keys)))
    hi = max(lo, min(max_context_bytes, length))
    parts, answers, used, pos = [], [], set(), 0
    while pos < length:
        left = length - pos
        size = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) if hi > lo else lo
        if left - size < lo:
            size = left
        ex = make_example(text, size, rng.randint(1, max_keys), None, rng, used)
        parts.append(ex.data)
        answers.append(pos + size - ANSWER_LENGTH)
        pos += size
    return b"".join(parts), answers


def write_retrieval(directory, examples):
    """retrieval.bin and retrieval.json (module docstring) in `directory`, each written to a temporary name and
    renamed."""
    os.makedirs(directory, exist_ok=True)
    records, offset = [], 0
    for ex in examples:
        records.append(ex.record(offset))
        offset += ex.length
    bin_path = os.path.join(directory, "retrieval.bin")
    json_path = os.path.join(directory, "retrieval.json")
    with open(bin_path + ".tmp", "wb") as f:
        for ex in examples:
            f.write(ex.data)
    os.replace(bin_path + ".tmp", bin_path)
    with open(json_path + ".tmp", "w") as f:
        json.dump({"format": FORMAT, "data": "retrieval.bin", "examples": records}, f, indent=1)
        f.write("\n")
    os.replace(json_path + ".tmp", json_path)


def read_retrieval(directory):
    """[(example bytes, record)] of a directory written by write_retrieval, checking the format."""
    with open(os.path.join(directory, "retrieval.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"read_retrieval: format must be {FORMAT!r}, got {meta.get('format')!r}")
    with open(os.path.join(directory, meta["data"]), "rb") as f:
        data = f.read()
    out, expect = [], 0
    for rec in meta["examples"]:
        if rec["offset"] != expect or rec["offset"] + rec["length"] > len(data):
            raise ValueError(f"read_retrieval: example at offset {rec['offset']} (expected {expect}) of length "
                             f"{rec['length']} does not fit {len(data)} bytes without gaps")
        out.append((data[rec["offset"]:rec["offset"] + rec["length"]], rec))
        expect += rec["length"]
    if expect != len(data):
        raise ValueError(f"read_retrieval: the examples cover {expect} bytes of {len(data)}")
    return out


def exact_match(predicted, example):
    """Whether `predicted` (the argmax next-byte prediction at every position of the example: predicted[i] is the
    prediction for byte i + 1) gives every answer byte."""
    n = len(example)
    return all(int(predicted[i - 1]) == example[i] for i in range(n - ANSWER_LENGTH, n))


def source_text(path):
    """The bytes of a file, or of every .py file under a directory (sorted paths, each followed by two newlines,
    as tools/train_tiny_lm.py reads its held-out package)."""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            return f.read()
    parts = []
    for base, dirs, names in os.walk(path):
        dirs.sort()
        for n in sorted(names):
            if n.endswith(".py"):
                with open(os.path.join(base, n), "rb") as f:
                    parts.append(f.read() + b"\n\n")
    return b"".join(parts)


def _numbers(text, kind):
    return [kind(x) for x in text.split(",") if x.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", required=True, help="a text file, or a directory whose .py files are read")
    ap.add_argument("--out", required=True, help="directory for retrieval.json and retrieval.bin")
    ap.add_argument("--contexts", default="8192,16384,32768")
    ap.add_argument("--keys", default="1,4")
    ap.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    ap.add_argument("--per-cell", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    text = source_text(args.source)
    examples = generate_suite(text, _numbers(args.contexts, int), _numbers(args.keys, int),
                              _numbers(args.depths, float), args.per_cell, args.seed)
    write_retrieval(args.out, examples)
    print(f"{len(examples)} examples, {sum(e.length for e in examples)} bytes in {args.out}")


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""keysel's long-context key-value retrieval task: definitions planted in source code, one of them asked at the end.

An example of context length C is C bytes (docs/tiny-lm.md, "The 32K model and the retrieval task"):

    <held-out code, with K definition lines inserted at line boundaries>
    TOKEN_4821 = "9f3a07c1

Each definition line is `TOKEN_<id> = "<value>"` followed by a newline (<id> 4 random digits 1000..9999, distinct
within an example; <value> 8 random lowercase hex digits). The last line asks one of the K keys, in one of two
question forms: `definition` (the default), the definition's own prefix `TOKEN_<id> = "`, or `assert`, the harder
`assert TOKEN_<id> == "`; the example ends with that key's value, the answer (ANSWER_LENGTH bytes). The other K - 1 definitions (distractors) sit at random line
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
    {"format": "keysel-retrieval/1", "data": "retrieval.bin", "question": "definition", "examples": [
        {"offset": <byte offset in retrieval.bin>, "length": <C>, "answer_length": 8, "keys": <K>,
         "depth": <depth of the asked line>, "context": <C>}, ...]}
with offsets increasing and no gaps; the answer is the last answer_length bytes of each example. "question" (the
question form) may be absent in older files: it then means "assert".

Usage:
  python3 tools/retrieval_task.py --source <.py file or directory> --out DIR \\
      [--contexts 8192,16384,32768] [--keys 1,4] [--depths 0,0.25,0.5,0.75,1] [--per-cell 3] [--seed 1] \\
      [--question definition|assert]
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
# the question forms: the last line of an example, asking for key <id>
QUESTIONS = {"definition": b'TOKEN_%d = "', "assert": b'assert TOKEN_%d == "'}
DEFAULT_QUESTION = "definition"
LEGACY_QUESTION = "assert"  # what a retrieval.json without "question" holds


def check_question(question):
    if question not in QUESTIONS:
        raise ValueError(f"question must be one of {sorted(QUESTIONS)}, got {question!r}")
    return question


def query_length(question=DEFAULT_QUESTION):
    """Bytes of the query line (14 for definition, 22 for assert)."""
    return len(QUESTIONS[check_question(question)] % 1000)


def overhead(question=DEFAULT_QUESTION):
    """Bytes of an example besides the code and the definitions: the query and the answer."""
    return ANSWER_LENGTH + query_length(question)


QUERY_LENGTH = query_length()  # of the default question form
OVERHEAD = overhead()


def definition_line(key_id, value):
    return b'TOKEN_%d = "%s"\n' % (key_id, value.encode())


def query_line(key_id, question=DEFAULT_QUESTION):
    return QUESTIONS[check_question(question)] % key_id


def min_context(keys, question=DEFAULT_QUESTION):
    """The shortest example with `keys` definitions (one byte of code: the newline the query line starts after)."""
    return overhead(question) + keys * LINE_LENGTH + 1


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

    def __init__(self, data, keys, depth, key_id, value, question=DEFAULT_QUESTION):
        self.data = data
        self.question = question
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


def make_example(text, context, keys, depth, rng, used_ids=None, question=DEFAULT_QUESTION):
    """An example of exactly `context` bytes from `text` with `keys` definitions, the asked one at `depth` (a
    fraction in [0, 1]; None: uniform at random), asked in the `question` form. `used_ids`: a set of ids not to use,
    updated (keeps ids distinct across the examples of a packed training row)."""
    if keys < 1:
        raise ValueError(f"make_example: keys must be >= 1, got {keys}")
    check_question(question)
    if context < min_context(keys, question):
        raise ValueError(f"make_example: context must be >= {min_context(keys, question)} for {keys} keys, got "
                         f"{context}")
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
    size = context - overhead(question) - keys * LINE_LENGTH
    code = code_slice(text, size, rng)
    for _ in range(8):  # the asked name must not occur in the code by chance
        if b"TOKEN_%d" % ids[asked] not in code:
            break
        code = code_slice(text, size, rng)
    starts = line_starts(code)  # ends with len(code): the code ends with a newline
    inner = starts[1:-1] or [0]  # distractors never at the very start or end, so depths 0 and 1 are reachable
    distractors = sorted(rng.choice(inner) for _ in range(keys - 1))
    # the asked line at boundary b goes before any distractor at b: its offset is b + LINE_LENGTH * #(p < b)
    span = context - overhead(question) - LINE_LENGTH  # the offset of the last possible line: depth 1
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
    parts.append(query_line(ids[asked], question))
    parts.append(values[asked].encode())
    data = b"".join(parts)
    assert len(data) == context, (len(data), context)
    return Example(data, keys, asked_offset / span, ids[asked], values[asked], question)


def generate_suite(text, contexts, key_counts, depths, per_cell, seed, question=DEFAULT_QUESTION):
    """Examples for every (context, keys, depth) in that order, `per_cell` of each, deterministic in `seed`."""
    rng = random.Random(seed)
    out = []
    for context in contexts:
        for keys in key_counts:
            for depth in depths:
                for _ in range(per_cell):
                    out.append(make_example(text, context, keys, depth, rng, question=question))
    return out


def pack_row(text, length, rng, min_context_bytes, max_context_bytes, max_keys, question=DEFAULT_QUESTION):
    """A training row of exactly `length` bytes made of examples one after the other, each of a context drawn
    log-uniformly in [min_context_bytes, max_context_bytes] (both capped at `length`; the last example takes what
    is left), 1..max_keys keys, a uniform depth, ids distinct within the row. Returns (row bytes, [offset of each
    answer's first byte in the row])."""
    if length < min_context(max_keys, question):
        raise ValueError(f"pack_row: length must be >= {min_context(max_keys, question)} for {max_keys} keys, got "
                         f"{length}")
    lo = min(length, max(min_context_bytes, min_context(max_keys, question)))
    hi = max(lo, min(max_context_bytes, length))
    parts, answers, used, pos = [], [], set(), 0
    while pos < length:
        left = length - pos
        size = int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) if hi > lo else lo
        if left - size < lo:
            size = left
        ex = make_example(text, size, rng.randint(1, max_keys), None, rng, used, question)
        parts.append(ex.data)
        answers.append(pos + size - ANSWER_LENGTH)
        pos += size
    return b"".join(parts), answers


DRILL_ALPHABET = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def drill_row(length, rng, min_run=16, max_run=64, cue=ANSWER_LENGTH, alphabet=DRILL_ALPHABET):
    """An induction drill row of exactly `length` bytes: segments of a random run of `alphabet` characters
    (min_run..max_run of them), a newline, then the run's first `cue` + ANSWER_LENGTH characters again, and a
    newline; the last ANSWER_LENGTH of the repeat are to be completed by copying (an answer), the `cue` before them
    find the run. What is left at the end of the row is random characters without an answer. Returns (row bytes,
    [offset of each answer's first byte]). With 62 letters and digits one character mostly identifies its place in
    the run, which is what lets the copying circuit form in a few hundred steps; with hex it would not."""
    if not cue + ANSWER_LENGTH <= min_run <= max_run:
        raise ValueError(f"drill_row: need {cue + ANSWER_LENGTH} <= min_run <= max_run, got {min_run}, {max_run}")
    parts, answers, pos = [], [], 0
    while True:
        run = "".join(rng.choices(alphabet, k=rng.randint(min_run, max_run))).encode()
        seg = run + b"\n" + run[:cue + ANSWER_LENGTH] + b"\n"
        if pos + len(seg) > length:
            break
        parts.append(seg)
        answers.append(pos + len(run) + 1 + cue)
        pos += len(seg)
    parts.append("".join(rng.choices(alphabet, k=length - pos)).encode())
    return b"".join(parts), answers


def write_retrieval(directory, examples):
    """retrieval.bin and retrieval.json (module docstring) in `directory`, each written to a temporary name and
    renamed. The examples share one question form."""
    forms = {getattr(ex, "question", DEFAULT_QUESTION) for ex in examples}
    if len(forms) > 1:
        raise ValueError(f"write_retrieval: the examples mix question forms {sorted(forms)}")
    question = forms.pop() if forms else DEFAULT_QUESTION
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
        json.dump({"format": FORMAT, "data": "retrieval.bin", "question": question, "examples": records}, f, indent=1)
        f.write("\n")
    os.replace(json_path + ".tmp", json_path)


def read_retrieval(directory):
    """[(example bytes, record)] of a directory written by write_retrieval, checking the format. Each record gets
    "question": the file's question form ("assert" when the file has none)."""
    with open(os.path.join(directory, "retrieval.json")) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"read_retrieval: format must be {FORMAT!r}, got {meta.get('format')!r}")
    question = meta.get("question", LEGACY_QUESTION)
    if question not in QUESTIONS:
        raise ValueError(f"read_retrieval: question must be one of {sorted(QUESTIONS)}, got {question!r}")
    with open(os.path.join(directory, meta["data"]), "rb") as f:
        data = f.read()
    out, expect = [], 0
    for rec in meta["examples"]:
        if rec["offset"] != expect or rec["offset"] + rec["length"] > len(data):
            raise ValueError(f"read_retrieval: example at offset {rec['offset']} (expected {expect}) of length "
                             f"{rec['length']} does not fit {len(data)} bytes without gaps")
        out.append((data[rec["offset"]:rec["offset"] + rec["length"]], dict(rec, question=question)))
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
    ap.add_argument("--question", choices=sorted(QUESTIONS), default=DEFAULT_QUESTION,
                    help="the question form: the definition's own prefix, or an assert")
    args = ap.parse_args(argv)
    text = source_text(args.source)
    examples = generate_suite(text, _numbers(args.contexts, int), _numbers(args.keys, int),
                              _numbers(args.depths, float), args.per_cell, args.seed, args.question)
    write_retrieval(args.out, examples)
    print(f"{len(examples)} examples, {sum(e.length for e in examples)} bytes in {args.out}")


if __name__ == "__main__":
    sys.exit(main())

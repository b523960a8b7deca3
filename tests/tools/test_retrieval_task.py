"""tools/retrieval_task.py: the retrieval examples and their files (docs/tiny-lm.md, "The 32K model and the
retrieval task")."""
import json
import os
import random
import re
import subprocess
import sys

import pytest

TOOLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tools")
sys.path.insert(0, TOOLS)
import retrieval_task as rt  # noqa: E402

DEFINITION = re.compile(rb'^TOKEN_(\d{4}) = "([0-9a-f]{8})"\n', re.M)


def source(seed=0, lines=4000):
    """Code-like text with lines of awkward, varied lengths (some empty), none of them a definition."""
    rng = random.Random(seed)
    out = []
    for i in range(lines):
        width = rng.choice([0, 1, 3, 17, 40, 79, 120])
        out.append(("    " * rng.randrange(3) + "".join(rng.choice("abcdefxyz_(),. =") for _ in range(width))).encode())
    return b"\n".join(out) + b"\n"


def parse(data):
    """(definitions [(offset, id, value)], asked id, answer) of an example, from its bytes alone."""
    query = re.search(rb'\n(?:assert )?TOKEN_(\d{4}) ==? "([0-9a-f]{8})$', data)
    assert query, data[-60:]
    defs = [(m.start(), int(m.group(1)), m.group(2).decode()) for m in DEFINITION.finditer(data, 0, query.start() + 1)]
    return defs, int(query.group(1)), query.group(2).decode()


@pytest.mark.parametrize("context", [rt.min_context(1), 97, 1000, 4097, 8192])
@pytest.mark.parametrize("keys", [1, 2, 4])
def test_exact_length_answer_at_the_end_and_keys(context, keys):
    if context < rt.min_context(keys):
        with pytest.raises(ValueError, match="context must be"):
            rt.make_example(source(), context, keys, 0.5, random.Random(1))
        return
    rng = random.Random(context * 10 + keys)
    for depth in (0.0, 0.3, 1.0, None):
        ex = rt.make_example(source(context), context, keys, depth, rng)
        assert len(ex.data) == ex.length == context
        defs, asked, answer = parse(ex.data)
        assert len(defs) == keys and len({d[1] for d in defs}) == keys
        assert all(rt.ID_LOW <= d[1] <= rt.ID_HIGH for d in defs)
        values = {d[1]: d[2] for d in defs}
        assert asked == ex.key_id and values[asked] == answer == ex.value
        assert ex.answer == answer.encode() and len(ex.answer) == rt.ANSWER_LENGTH
        # every definition line starts a line, and the query starts a line
        assert all(o == 0 or ex.data[o - 1:o] == b"\n" for o, _, _ in defs)
        assert ex.data[context - rt.OVERHEAD - 1:context - rt.OVERHEAD] == b"\n"


def test_definitions_are_whole_lines_inserted_into_the_code():
    """Removing the definition lines leaves a contiguous slice of the source (its last byte a newline)."""
    text = source(3)
    rng = random.Random(5)
    for keys in (1, 3, 4):
        ex = rt.make_example(text, 3000, keys, None, rng)
        body = ex.data[:-rt.OVERHEAD]
        code = DEFINITION.sub(b"", body)
        assert len(code) == len(body) - keys * rt.LINE_LENGTH
        assert code[-1:] == b"\n"
        assert code[:-1] in text
        assert text.find(code[:-1]) == 0 or text[text.find(code[:-1]) - 1:text.find(code[:-1])] == b"\n"


@pytest.mark.parametrize("keys", [1, 4])
def test_depth_placement(keys):
    """The asked line lands at the line start nearest the requested depth; depth 0 is the first line and 1 the line
    before the query; the recorded depth is the line's offset over that span."""
    text = source(7, lines=20000)
    rng = random.Random(11)
    context = 6000
    span = context - rt.OVERHEAD - rt.LINE_LENGTH
    longest_line = max(len(line) + 1 for line in text.split(b"\n"))
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        ex = rt.make_example(text, context, keys, depth, rng)
        defs, asked, _ = parse(ex.data)
        offset = [o for o, i, _ in defs if i == asked][0]
        assert ex.depth == pytest.approx(offset / span, abs=1e-12)
        # the chosen line start is within one line (plus the definitions before it) of the target
        assert abs(offset - depth * span) <= longest_line + keys * rt.LINE_LENGTH
        if depth == 0.0:
            assert offset == 0
        if depth == 1.0:
            assert offset == span
            assert ex.data[offset + rt.LINE_LENGTH:] == rt.query_line(asked) + ex.value.encode()


def test_distractors_spread_at_random_depths():
    text = source(9, lines=20000)
    rng = random.Random(2)
    positions = []
    for _ in range(40):
        ex = rt.make_example(text, 4000, 4, 0.5, rng)
        defs, asked, _ = parse(ex.data)
        positions += [o / 4000 for o, i, _ in defs if i != asked]
    assert len(positions) == 120
    # uniform over line starts: both halves of the context hold distractors, and they are not piled up
    assert 0.3 < sum(p < 0.5 for p in positions) / len(positions) < 0.7
    assert len({round(p, 3) for p in positions}) > 100


def test_determinism():
    text = source(1)
    a = rt.generate_suite(text, [500, 900], [1, 4], [0, 0.5, 1], 2, seed=3)
    b = rt.generate_suite(text, [500, 900], [1, 4], [0, 0.5, 1], 2, seed=3)
    c = rt.generate_suite(text, [500, 900], [1, 4], [0, 0.5, 1], 2, seed=4)
    assert [e.data for e in a] == [e.data for e in b]
    assert [e.data for e in a] != [e.data for e in c]
    assert len(a) == 2 * 2 * 3 * 2
    assert [(e.length, e.keys) for e in a[:12]] == [(500, 1)] * 6 + [(500, 4)] * 6


def test_files_agree(tmp_path):
    text = source(4)
    examples = rt.generate_suite(text, [300, 1024, 777], [1, 4], [0, 0.25, 1], 2, seed=8)
    rt.write_retrieval(str(tmp_path), examples)
    assert sorted(os.listdir(tmp_path)) == ["retrieval.bin", "retrieval.json"]  # no temporary files left
    meta = json.loads((tmp_path / "retrieval.json").read_text())
    assert set(meta) == {"format", "data", "question", "examples"}
    assert meta["format"] == "keysel-retrieval/1" and meta["data"] == "retrieval.bin"
    assert meta["question"] == "definition"
    data = (tmp_path / "retrieval.bin").read_bytes()
    assert len(data) == sum(e.length for e in examples)
    offset = 0
    for rec, ex in zip(meta["examples"], examples, strict=True):
        assert set(rec) == {"offset", "length", "answer_length", "keys", "depth", "context"}
        assert rec["offset"] == offset and rec["length"] == rec["context"] == ex.length
        assert rec["answer_length"] == 8 and rec["keys"] == ex.keys
        assert rec["depth"] == pytest.approx(ex.depth, abs=1e-6)
        chunk = data[offset:offset + rec["length"]]
        assert chunk == ex.data
        assert chunk[-8:] == parse(chunk)[2].encode()
        offset += rec["length"]
    back = rt.read_retrieval(str(tmp_path))
    assert [d for d, _ in back] == [e.data for e in examples]


def test_read_rejects_gaps(tmp_path):
    rt.write_retrieval(str(tmp_path), rt.generate_suite(source(), [200], [1], [0.5], 2, seed=1))
    meta = json.loads((tmp_path / "retrieval.json").read_text())
    meta["examples"][1]["offset"] += 1
    (tmp_path / "retrieval.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="without gaps"):
        rt.read_retrieval(str(tmp_path))


def test_exact_match():
    ex = rt.make_example(source(), 400, 2, 0.5, random.Random(0))
    perfect = list(ex.data[1:]) + [0]  # predicted[i] = byte i + 1
    assert rt.exact_match(perfect, ex.data)
    for pos in range(len(ex.data) - 8, len(ex.data)):
        wrong = list(perfect)
        wrong[pos - 1] = (wrong[pos - 1] + 1) % 256
        assert not rt.exact_match(wrong, ex.data)
    wrong = list(perfect)
    wrong[len(ex.data) - 10] ^= 1  # a prompt byte does not count
    assert rt.exact_match(wrong, ex.data)


@pytest.mark.parametrize("length", [127 + 1, 300, 4097])
def test_pack_row(length):
    rng = random.Random(length)
    text = source(2)
    row, answers = rt.pack_row(text, length, rng, 64, 1000, 4)
    assert len(row) == length
    ids = []
    starts = [0] + [a + 8 for a in answers[:-1]]
    assert answers[-1] == length - 8
    for s, a in zip(starts, answers):
        defs, asked, answer = parse(row[s:a + 8])
        assert row[a:a + 8] == answer.encode()
        ids += [d[1] for d in defs]
    assert len(ids) == len(set(ids))  # ids distinct within a row
    with pytest.raises(ValueError, match="length must be"):
        rt.pack_row(text, 100, rng, 64, 1000, 4)


def test_command_line(tmp_path):
    src = tmp_path / "src.py"
    src.write_bytes(source(6))
    out = tmp_path / "out"
    subprocess.run([sys.executable, os.path.join(TOOLS, "retrieval_task.py"), "--source", str(src), "--out", str(out),
                    "--contexts", "256,512", "--keys", "1,3", "--depths", "0,1", "--per-cell", "2", "--seed", "5"],
                   check=True, capture_output=True)
    back = rt.read_retrieval(str(out))
    assert len(back) == 2 * 2 * 2 * 2
    again = rt.generate_suite(src.read_bytes(), [256, 512], [1, 3], [0.0, 1.0], 2, seed=5)
    assert [d for d, _ in back] == [e.data for e in again]
    assert [r["depth"] for _, r in back[:4]] == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("question", ["definition", "assert"])
def test_question_forms(question, tmp_path):
    """The last line asks in the definition's own form or as an assert; lengths, depths and files follow the form."""
    text = source(12, lines=8000)
    rng = random.Random(13)
    prefix = {"definition": b'TOKEN_%d = "', "assert": b'assert TOKEN_%d == "'}[question]
    assert rt.query_length(question) == len(prefix % 1000)
    assert rt.min_context(2, question) == rt.ANSWER_LENGTH + len(prefix % 1000) + 2 * rt.LINE_LENGTH + 1
    examples = []
    for depth in (0.0, 0.5, 1.0):
        ex = rt.make_example(text, 2000, 3, depth, rng, question=question)
        assert len(ex.data) == 2000 and ex.question == question
        assert ex.data.endswith(b"\n" + prefix % ex.key_id + ex.value.encode())
        defs, asked, answer = parse(ex.data)
        assert asked == ex.key_id and answer == ex.value and len(defs) == 3
        if depth == 1.0:  # the asked line is right before the query
            assert ex.data[-rt.overhead(question) - rt.LINE_LENGTH:].startswith(b"TOKEN_%d" % ex.key_id)
        examples.append(ex)
    rt.write_retrieval(str(tmp_path), examples)
    back = rt.read_retrieval(str(tmp_path))
    assert all(rec["question"] == question for _, rec in back)
    with pytest.raises(ValueError, match="question must be"):
        rt.make_example(text, 2000, 1, 0.5, rng, question="ask")


def test_files_without_question_are_the_assert_form(tmp_path):
    rt.write_retrieval(str(tmp_path), rt.generate_suite(source(), [300], [1], [0.5], 2, seed=1, question="assert"))
    meta = json.loads((tmp_path / "retrieval.json").read_text())
    del meta["question"]
    (tmp_path / "retrieval.json").write_text(json.dumps(meta))
    assert [rec["question"] for _, rec in rt.read_retrieval(str(tmp_path))] == ["assert", "assert"]
    with pytest.raises(ValueError, match="mix question forms"):
        rt.write_retrieval(str(tmp_path), rt.generate_suite(source(), [300], [1], [0.5], 1, seed=1) +
                           rt.generate_suite(source(), [300], [1], [0.5], 1, seed=1, question="assert"))


@pytest.mark.parametrize("length", [24, 129, 1000])
def test_drill_row(length):
    rng = random.Random(length)
    row, answers = rt.drill_row(length, rng)
    assert len(row) == length
    assert set(row.decode()) <= set(rt.DRILL_ALPHABET + "\n")
    pos = 0
    for a in answers:
        # each segment: run, newline, the run's first 16 characters, newline; the answer is the last 8 of those
        end = row.index(b"\n", pos)
        run = row[pos:end]
        assert 16 <= len(run) <= 64
        assert row[end + 1:end + 17] == run[:16] and row[end + 17:end + 18] == b"\n"
        assert a == end + 1 + 8
        pos = end + 18
    assert b"\n" not in row[pos:]
    assert len(answers) == 0 if length < 16 + 18 else len(answers) >= 1
    with pytest.raises(ValueError, match="min_run"):
        rt.drill_row(100, rng, min_run=8)

"""Data layer: arithmetic task, local JSONL/Parquet loading, the prompt stream (no JAX)."""

import ast
import gzip
import hashlib
import json
import operator
import os
import re
import subprocess
import sys
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amrsd_jax.data import (
    PROMPT_SUFFIX,
    ArithmeticTask,
    DataFormatError,
    FieldMap,
    PromptStream,
    extract_final_answer,
    load_local,
    render_prompt,
    split_of,
)

# ----------------------------------------------------------------------------- helpers

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv}


def _eval(expr: str) -> Fraction:
    """Independent evaluator: integers, + - * / and parentheses only, exact arithmetic."""

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return Fraction(node.value)
        raise AssertionError(f"unexpected syntax in {expr!r}: {ast.dump(node)}")

    return ev(ast.parse(expr, mode="eval"))


_STEP = re.compile(r"(\d+) ([-+×÷]) (\d+) = (\d+)\.$")
_STEP_OPS = {"+": operator.add, "-": operator.sub, "×": operator.mul,
             "÷": operator.truediv}


def _steps(solution: str):
    lines = solution.split("\n")
    assert lines[-1].startswith("#### ")
    out = []
    for line in lines[:-1]:
        m = _STEP.search(line)
        assert m, f"not a step line: {line!r}"
        a, op, b, c = m.groups()
        out.append((int(a), op, int(b), int(c)))
    return out


def _numbers(text: str):
    return [int(x) for x in re.findall(r"\d+", text)]


# ----------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("level", [1, 2, 3, 4, (1, 2, 3, 4)])
def test_arithmetic_deterministic(level):
    a = list(ArithmeticTask(level=level, seed=7, size=200))
    b = list(ArithmeticTask(level=level, seed=7, size=200))
    assert a == b
    assert a != list(ArithmeticTask(level=level, seed=8, size=200))
    # item i does not depend on size
    assert list(ArithmeticTask(level=level, seed=7, size=50)) == a[:50]


def test_arithmetic_deterministic_across_processes():
    code = ("import hashlib, json; from amrsd_jax.data import ArithmeticTask; "
            "t = ArithmeticTask(level=[1, 2, 3, 4], seed=3, split='test', size=100); "
            "print(hashlib.sha256(json.dumps(list(t), sort_keys=True).encode()).hexdigest())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed,
                   PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True, timeout=60)
        digests.add(out.stdout.strip())
    local = ArithmeticTask(level=[1, 2, 3, 4], seed=3, split="test", size=100)
    digests.add(hashlib.sha256(json.dumps(list(local), sort_keys=True).encode()).hexdigest())
    assert len(digests) == 1


@pytest.mark.parametrize("level", [1, 2, 3, 4])
def test_train_test_disjoint(level):
    train = ArithmeticTask(level=level, seed=0, split="train", size=1500)
    train_q = {e["question"] for e in train}
    assert len(train_q) == len(train)  # no duplicates within a split
    for seed in (0, 1):  # disjoint whatever the seeds
        test = ArithmeticTask(level=level, seed=seed, split="test", size=200)
        test_q = {e["question"] for e in test}
        assert len(test_q) == len(test)
        assert not train_q & test_q
        assert all(split_of(q) == "test" for q in test_q)
    assert all(split_of(q) == "train" for q in train_q)


@pytest.mark.parametrize("level", [1, 2, 3, 4])
@pytest.mark.parametrize("split", ["train", "test"])
def test_answers_are_correct(level, split):
    task = ArithmeticTask(level=level, seed=11, split=split, size=300)
    ids = set()
    for ex in task:
        assert set(ex) == {"id", "question", "answer", "solution", "level", "expression"}
        assert ex["level"] == level
        ids.add(ex["id"])
        # canonical integer string, equal to the independently evaluated expression
        assert re.fullmatch(r"0|[1-9]\d*", ex["answer"]), ex
        value = _eval(ex["expression"])
        assert value.denominator == 1 and value >= 0, ex
        assert ex["answer"] == str(value.numerator), ex
        # the expression uses exactly the question's numbers, in the question's order
        assert _numbers(ex["question"]) == _numbers(ex["expression"]), ex
        if ex["question"].startswith("What is "):
            shown = ex["question"][len("What is "):-1].replace("×", "*").replace("÷", "/")
            assert shown == ex["expression"], ex
        # the solution: correct steps, chained, on the question's numbers, ending in ####
        assert ex["solution"].endswith(f"\n#### {ex['answer']}"), ex
        steps = _steps(ex["solution"])
        prev = None
        for a, op, b, c in steps:
            r = _STEP_OPS[op](Fraction(a), Fraction(b))
            assert r == c and r >= 0, ex
            if prev is not None:
                assert a == prev, ex
            prev = c
        assert str(prev) == ex["answer"]
        assert _numbers(ex["question"]) == [steps[0][0]] + [s[2] for s in steps], ex
    assert len(ids) == len(task)


def test_levels_increase_step_count():
    counts = {lv: [len(_steps(e["solution"])) for e in ArithmeticTask(level=lv, size=400)]
              for lv in (1, 2, 3, 4)}
    assert set(counts[1]) == {1} and set(counts[2]) == {1}
    assert set(counts[3]) == {1, 2}
    assert set(counts[4]) == {3}
    mean = {lv: sum(c) / len(c) for lv, c in counts.items()}
    assert mean[1] <= mean[2] < mean[3] < mean[4]
    # level 3 has multiplication, level 4 exact division
    assert any("×" in e["solution"] for e in ArithmeticTask(level=3, size=100))
    assert all("÷" in e["solution"] for e in ArithmeticTask(level=4, size=100))
    # level 2 has both operations and word problems
    l2 = list(ArithmeticTask(level=2, size=200))
    assert any(" - " in e["expression"] for e in l2) and any(" + " in e["expression"] for e in l2)
    assert any(not e["question"].startswith("What is") for e in l2)


def test_mixed_levels_and_word_forms():
    task = ArithmeticTask(level=[1, 4], seed=2, size=200)
    assert {e["level"] for e in task} == {1, 4}
    l1 = list(ArithmeticTask(level=1, size=200))
    assert any(q.startswith("What is") for q in (e["question"] for e in l1))
    assert any("How many" in e["question"] for e in l1)


def test_sequence_api_and_prompt():
    task = ArithmeticTask(level=2, seed=5, split="test", size=20)
    assert len(task) == 20 and len(list(task)) == 20
    assert task[-1] == list(task)[-1]
    assert task[2:5] == list(task)[2:5]
    ex = task[0]
    ex["answer"] = "tampered"
    assert task[0]["answer"] != "tampered"  # items are copies
    assert task.prompt(0) == f"{task[0]['question']}\n{PROMPT_SUFFIX}"
    assert render_prompt(task[0]) == task.prompt(0)
    assert render_prompt("Q?", suffix=None) == "Q?"
    custom = ArithmeticTask(level=2, seed=5, split="test", size=20, prompt_suffix="Be brief.")
    assert custom.prompt(3) == f"{task[3]['question']}\nBe brief."
    assert len(ArithmeticTask(size=0)) == 0


@pytest.mark.parametrize("kwargs", [dict(level=5), dict(level=[]), dict(level=True),
                                    dict(split="validation"), dict(size=-1),
                                    dict(test_fraction=0.0)])
def test_arithmetic_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        ArithmeticTask(**kwargs)


# ----------------------------------------------------------------------------- load_local


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_jsonl_basic(tmp_path):
    p = tmp_path / "train.jsonl"
    p.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n\n"
                 + json.dumps({"question": "2*3?", "answer": 6, "extra": [1]}) + "\n"
                 + json.dumps({"question": "Half?", "answer": 4.0}) + "\n", encoding="utf-8")
    res = load_local(p)
    assert res.skipped == 0 and res.problems == []
    assert res.examples == [
        {"id": "train:1", "question": "1+1?", "answer": "2", "solution": None},
        {"id": "train:3", "question": "2*3?", "answer": "6", "solution": None},
        {"id": "train:4", "question": "Half?", "answer": "4", "solution": None},
    ]


def test_load_field_map_and_ids(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [
        {"uid": 10, "problem": "P1", "final": " 3 ", "worked": "1+2=3"},
        {"uid": "b", "problem": "P2", "final": "x", "worked": "so x"},
    ])
    fm = FieldMap(question="problem", answer="final", solution="worked", id="uid")
    ex = load_local(str(p), fm).examples
    assert ex == [{"id": "10", "question": "P1", "answer": "3", "solution": "1+2=3"},
                  {"id": "b", "question": "P2", "answer": "x", "solution": "so x"}]


def test_load_gsm8k_style_answer_from_solution(tmp_path):
    sol = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72"
    p = _write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "How many clips?", "answer": sol},
        {"question": "Big?", "answer": "lots\n#### 1,234"},
    ])
    ex = load_local(p, FieldMap(answer_from_solution=True)).examples
    assert ex[0] == {"id": "gsm8k:1", "question": "How many clips?", "answer": "72",
                     "solution": sol}
    assert ex[1]["answer"] == "1234"
    # separate solution field
    p2 = _write_jsonl(tmp_path / "s.jsonl", [{"q": "Q", "sol": "2+2=4\n#### 4"}])
    ex2 = load_local(p2, FieldMap(question="q", solution="sol", answer_from_solution=True))
    assert ex2.examples[0]["answer"] == "4" and ex2.examples[0]["solution"] == "2+2=4\n#### 4"
    # no #### -> bad row
    p3 = _write_jsonl(tmp_path / "n.jsonl", [{"question": "Q", "answer": "just 4"}])
    with pytest.raises(DataFormatError, match=r"n\.jsonl:1: .*'####'"):
        load_local(p3, FieldMap(answer_from_solution=True))
    assert extract_final_answer("x\n####   \n") is None
    assert extract_final_answer("#### 5.") == "5"


GOOD = json.dumps({"question": "Q", "answer": "1"}).encode()

BAD_LINES = [
    pytest.param(json.dumps({"answer": "1"}).encode(), r"missing field 'question'",
                 id="missing-question"),
    pytest.param(json.dumps({"question": "Q"}).encode(), r"missing field 'answer'",
                 id="missing-answer"),
    pytest.param(json.dumps({"question": "  ", "answer": "1"}).encode(),
                 r"field 'question' is an empty string", id="empty-question"),
    pytest.param(json.dumps({"question": "Q", "answer": ""}).encode(),
                 r"field 'answer' is an empty string", id="empty-answer"),
    pytest.param(json.dumps({"question": "Q", "answer": None}).encode(),
                 r"field 'answer' is null", id="null-answer"),
    pytest.param(json.dumps({"question": ["Q"], "answer": "1"}).encode(),
                 r"field 'question' must be a string", id="non-string"),
    pytest.param(b'{"question": "caf\xe9", "answer": "1"}', r"invalid UTF-8 bytes",
                 id="invalid-utf8"),
    pytest.param(b'{"question": "Q", "answer": "1"', r"invalid JSON", id="invalid-json"),
    pytest.param(b'["Q", "1"]', r"expected a JSON object", id="not-object"),
]


@pytest.mark.parametrize("bad, problem", BAD_LINES)
def test_bad_row_errors_name_file_and_line(tmp_path, bad, problem):
    p = tmp_path / "rows.jsonl"
    p.write_bytes(GOOD + b"\n" + GOOD + b"\n\n" + bad + b"\n" + GOOD + b"\n")
    with pytest.raises(DataFormatError) as info:
        load_local(p)
    err = info.value
    assert str(err).startswith(f"{p}:4: ")
    assert re.search(problem, str(err)), str(err)
    assert err.line == 4 and err.path == str(p)
    # skip mode: the bad row is dropped and counted, the good ones kept
    res = load_local(p, on_bad_row="skip")
    assert res.skipped == 1 and len(res.examples) == 3
    assert [e["id"] for e in res.examples] == ["rows:1", "rows:2", "rows:5"]
    assert res.problems == [str(err)]


def test_skip_mode_counts_many(tmp_path):
    p = tmp_path / "mixed.jsonl"
    p.write_bytes(b"\n".join([GOOD, b"{bad", b'{"question": "\xff\xfe", "answer": "1"}',
                              json.dumps({"question": "Q2"}).encode(), GOOD,
                              json.dumps({"question": "", "answer": "1"}).encode()]) + b"\n")
    res = load_local(p, on_bad_row="skip")
    assert res.skipped == 4 and len(res.examples) == 2
    assert [m.split(": ")[0] for m in res.problems] == [f"{p}:{i}" for i in (2, 3, 4, 6)]
    with pytest.raises(DataFormatError, match=re.escape(f"{p}:2: invalid JSON")):
        load_local(p)


def test_duplicate_ids_and_options(tmp_path):
    p = _write_jsonl(tmp_path / "dup.jsonl", [{"id": 1, "question": "a", "answer": "1"},
                                              {"id": 1, "question": "b", "answer": "2"}])
    with pytest.raises(DataFormatError, match=r"dup\.jsonl:2: duplicate id '1'"):
        load_local(p, FieldMap(id="id"))
    with pytest.raises(ValueError, match="on_bad_row"):
        load_local(p, on_bad_row="ignore")
    odd = tmp_path / "rows.txt"
    odd.write_bytes(GOOD + b"\n")
    with pytest.raises(ValueError, match="format"):
        load_local(odd)
    assert len(load_local(odd, format="jsonl").examples) == 1
    with pytest.raises(FileNotFoundError):
        load_local(tmp_path / "missing.jsonl")


def test_load_gzip_and_bom(tmp_path):
    p = tmp_path / "z.jsonl.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\xef\xbb\xbf" + GOOD + b"\n" + GOOD)  # BOM, no trailing newline
    res = load_local(p)
    assert [e["id"] for e in res.examples] == ["z:1", "z:2"]


def test_parquet(tmp_path):
    p = tmp_path / "d.parquet"
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        p.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            load_local(p)
        return
    pq.write_table(pa.table({"question": ["Q1", "", "Q3"], "answer": ["1", "2", "3"]}), p)
    with pytest.raises(DataFormatError, match=r"row 2: field 'question' is an empty"):
        load_local(p)
    res = load_local(p, on_bad_row="skip")
    assert res.skipped == 1 and [e["question"] for e in res.examples] == ["Q1", "Q3"]


# ----------------------------------------------------------------------------- PromptStream


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 23), batch=st.integers(1, 9), shards=st.integers(1, 4),
       seed=st.integers(0, 2**31), before=st.integers(0, 12), after=st.integers(1, 8),
       data=st.data())
def test_stream_resume_equals_uninterrupted(n, batch, shards, seed, before, after, data):
    shards = min(shards, n)
    shard = data.draw(st.integers(0, shards - 1))
    examples = [{"id": i} for i in range(n)]
    ref = PromptStream(examples, batch, seed, shard_index=shard, shard_count=shards)
    expected = [ref.next_batch() for _ in range(before + after)]

    s = PromptStream(examples, batch, seed, shard_index=shard, shard_count=shards)
    for _ in range(before):
        s.next_batch()
    state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
    assert set(state) == {"epoch", "index", "seed"}
    restored = PromptStream(examples, batch, seed, shard_index=shard, shard_count=shards)
    restored.load_state_dict(state)
    assert [restored.next_batch() for _ in range(after)] == expected[before:]
    assert all(len(b) == batch for b in expected)


@pytest.mark.parametrize("n", [1, 7, 12, 13, 50])
@pytest.mark.parametrize("shards", [1, 2, 3, 4])
def test_sharding_partitions_each_epoch(n, shards):
    if shards > n:
        with pytest.raises(ValueError):
            PromptStream(list(range(n)), 1, 0, shard_index=0, shard_count=shards)
        return
    for epoch in range(3):
        parts = []
        for i in range(shards):
            s = PromptStream(list(range(n)), 1, seed=5, shard_index=i, shard_count=shards)
            s.load_state_dict({"epoch": epoch, "index": 0, "seed": 5})
            # what the host actually yields over one epoch of its shard
            got = [s.next_batch()[0] for _ in range(s.examples_per_epoch)]
            assert got == [int(j) for j in s.epoch_order(epoch)]
            assert s.epoch == epoch + 1
            parts.append(got)
        flat = [x for p in parts for x in p]
        assert len(flat) == n and set(flat) == set(range(n))  # no overlap, union == epoch
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_stream_shuffles_per_epoch_and_crosses_epochs():
    s = PromptStream(list(range(10)), batch_size=4, seed=1)
    batches = [s.next_batch() for _ in range(5)]  # 20 items = exactly 2 epochs
    flat = [x for b in batches for x in b]
    e0, e1 = flat[:10], flat[10:]
    assert sorted(e0) == sorted(e1) == list(range(10))
    assert e0 != e1 and e0 != list(range(10))
    assert s.state_dict() == {"epoch": 2, "index": 0, "seed": 1}
    again = PromptStream(list(range(10)), batch_size=4, seed=1)
    assert [again.next_batch() for _ in range(5)] == batches
    assert PromptStream(list(range(10)), 4, seed=2).next_batch() != batches[0]
    it = iter(PromptStream(list(range(3)), 2, seed=0))
    assert len(next(it)) == 2 and len(next(it)) == 2


def test_stream_over_arithmetic_task_and_state_validation():
    task = ArithmeticTask(level=1, size=30)
    s = PromptStream(task, batch_size=8, seed=0, shard_index=1, shard_count=2)
    batch = s.next_batch()
    assert len(batch) == 8 and all("question" in e for e in batch)
    with pytest.raises(ValueError, match="seed"):
        s.load_state_dict({"epoch": 0, "index": 0, "seed": 1})
    with pytest.raises(ValueError, match="position"):
        s.load_state_dict({"epoch": 0, "index": 16, "seed": 0})
    with pytest.raises(KeyError):
        s.load_state_dict({"epoch": 0, "seed": 0})
    s.load_state_dict({"epoch": 3, "index": 15, "seed": 0})  # end of epoch == next epoch start
    assert s.state_dict() == {"epoch": 4, "index": 0, "seed": 0}
    for bad in (dict(batch_size=0), dict(shard_index=2, shard_count=2), dict(seed=-1)):
        kw = dict(batch_size=2, seed=0, shard_index=0, shard_count=1) | bad
        with pytest.raises(ValueError):
            PromptStream(task, **kw)

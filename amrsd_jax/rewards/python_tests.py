"""``reward.name=python_tests``: run the model's Python code against tests in the sandbox.

``safe_reward("python_tests", response, tests)``: ``response`` is the model's text (the
last fenced Python block, the last one defining the entry point when one is named; bare
code when there is no fence); ``tests`` is test code (top-level ``assert`` s and/or a
``check(candidate)`` function), or a :class:`CodeTests` (tests + entry point + prelude),
or a gold string made by :meth:`CodeTests.to_gold` (what the data sources put in an
example's ``answer``, so it flows through the trainer like any gold).

The program runs in a :class:`~amrsd_jax.rewards.sandbox.Sandbox` child, never in this
process. Each top-level ``assert`` or call statement of the tests is one test; the other
statements (imports, helpers, ``def check``) are set-up; with an entry point and a
``check`` function that nothing calls, ``check(<entry_point>)`` is the test. Every
``assert a == b`` in the tests is rewritten to compare built-in values only, so an object
whose ``__eq__`` always says yes does not pass.

Reward 1.0 iff every test passed (binary, as in HumanEval pass@1), else 0.0. The
feedback (``VerifierResult.feedback``, for SDPO's reprompt and AMR-SD's reflection
request) gives the verdict per test and, for the first failure, what happened: the
exception type and message and the line of the candidate's code it came from, the value
the code returned in a failed ``==``, or the reason the run stopped ("timed out after
2 s", "memory limit", "exited before the tests ran"). The tests' expected values are
hidden in it (the literal sides of the failing test's comparison are shown as
``[redacted]``, and :func:`expected_values` are redacted from exception messages);
``python_tests_verbose`` keeps them, for recipes that show the failing test as the
environment reports it.
The candidate's failures are not verification errors (``error`` stays ``None``); an
unusable gold (no tests, test code that does not parse) is a ``ValueError``.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from typing import Any

from .math_verifier import VerifierResult, register_reward
from .sandbox import ExecutionResult, Program, SandboxConfig, default_sandbox

__all__ = [
    "CODE_GOLD_KEY",
    "CodeTests",
    "build_program",
    "expected_values",
    "extract_code",
    "feedback_for",
    "is_code_gold",
    "python_tests",
    "python_tests_verbose",
    "redact_expected",
]

CODE_GOLD_KEY = "python_tests"  # the key that marks a serialised CodeTests gold
MAX_CODE_CHARS = 20000
REDACTED = "[redacted]"
_EQ_HELPER = "__sandbox_eq__"
_SPECIAL_TOKEN_RE = re.compile(r"<\|[a-z_]{2,24}\|>")
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_LANGS = {"", "python", "py", "python3", "py3"}


@dataclasses.dataclass(frozen=True)
class CodeTests:
    """The gold of a code task.

    Attributes:
      tests: test code (asserts, or a ``check(candidate)`` function, plus set-up).
      entry_point: the name of the function under test, or ``None``.
      prelude: code put before the candidate's (e.g. HumanEval's ``from typing import
        List`` that its signatures need).
    """

    tests: str
    entry_point: str | None = None
    prelude: str = ""

    def to_gold(self) -> str:
        """A JSON string: what an example's ``answer`` holds for a code task."""
        return json.dumps({CODE_GOLD_KEY: self.tests, "entry_point": self.entry_point,
                           "prelude": self.prelude})

    @classmethod
    def from_gold(cls, gold: Any) -> "CodeTests":
        """A :class:`CodeTests`, its :meth:`to_gold` string, or plain test code."""
        if isinstance(gold, CodeTests):
            return gold
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"python_tests needs test code as the gold, got {gold!r:.80}")
        if is_code_gold(gold):
            d = json.loads(gold)
            return cls(d[CODE_GOLD_KEY], d.get("entry_point"), d.get("prelude") or "")
        return cls(gold)


def is_code_gold(gold: Any) -> bool:
    """Whether ``gold`` is a serialised :class:`CodeTests` (:meth:`CodeTests.to_gold`)."""
    if not isinstance(gold, str) or not gold.lstrip().startswith("{"):
        return False
    try:
        d = json.loads(gold)
    except ValueError:
        return False
    return isinstance(d, dict) and isinstance(d.get(CODE_GOLD_KEY), str)


# ----------------------------------------------------------------------------- code


def extract_code(response: str | None, entry_point: str | None = None) -> str | None:
    """The candidate's code in ``response``: the last fenced Python block (the last one
    that defines ``entry_point`` if any does; an unclosed last fence counts), else the
    whole response as bare code; ``None`` if that is empty. The text ends at the first
    chat special token (``<|im_end|>``)."""
    text = "" if response is None else str(response)
    m = _SPECIAL_TOKEN_RE.search(text)
    text = text[:m.start()] if m else text
    blocks = [b for lang, b in _FENCE_RE.findall(text) if lang.lower() in _CODE_LANGS]
    if blocks:
        defining = [b for b in blocks if entry_point and re.search(
            rf"^\s*def\s+{re.escape(entry_point)}\s*\(", b, re.MULTILINE)]
        code = (defining or blocks)[-1]
    elif "```" in text:
        return None  # fenced, but not Python
    else:
        code = text
    code = code.strip("\n")
    return code[:MAX_CODE_CHARS] if code.strip() else None


class _StrictEquality(ast.NodeTransformer):
    """``assert a == b`` -> ``assert __sandbox_eq__(a, b)`` (see the child program)."""

    def visit_Assert(self, node: ast.Assert) -> ast.Assert:
        test = node.test
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0],
                                                                               ast.Eq):
            node.test = ast.Call(ast.Name(_EQ_HELPER, ast.Load()),
                                 [test.left, test.comparators[0]], [])
        return node


class _PlainEquality(ast.NodeTransformer):
    """The inverse, to show a test line as it was written."""

    def visit_Call(self, node: ast.Call) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.func, ast.Name) and node.func.id == _EQ_HELPER and len(node.args) == 2:
            return ast.Compare(node.args[0], [ast.Eq()], [node.args[1]])
        return node


def _parse_tests(tests: str) -> ast.Module:
    try:
        return ast.parse(tests)
    except SyntaxError as exc:
        raise ValueError(f"the tests do not parse: {exc.msg} (line {exc.lineno})") from None


def build_program(code: str, gold: CodeTests | str) -> Program:
    """The sandbox :class:`Program` of ``code`` against ``gold`` (see the module
    docstring for how tests are split and rewritten)."""
    gold = CodeTests.from_gold(gold)
    module = _StrictEquality().visit(_parse_tests(gold.tests))
    setup, tests = [], []
    for stmt in module.body:
        is_test = isinstance(stmt, ast.Assert) or (isinstance(stmt, ast.Expr)
                                                   and isinstance(stmt.value, ast.Call))
        (tests if is_test else setup).append(ast.unparse(stmt))
    defines_check = any(isinstance(s, ast.FunctionDef) and s.name == "check"
                        for s in module.body)
    if not tests and defines_check and gold.entry_point:
        tests.append(f"check({gold.entry_point})")
    if not tests:
        raise ValueError("the tests contain no test: need top-level asserts or calls, or a "
                         "check(candidate) function and an entry point")
    prelude = gold.prelude.strip("\n")
    return Program(f"{prelude}\n{code}\n" if prelude else code + "\n", "\n".join(setup),
                   tuple(tests))


def prelude_lines(gold: CodeTests) -> int:
    """How many lines :func:`build_program` puts before the candidate's code."""
    prelude = gold.prelude.strip("\n")
    return prelude.count("\n") + 1 if prelude else 0


# ----------------------------------------------------------------------------- leak guard


_NOT_A_LITERAL = object()


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NOT_A_LITERAL


def _is_expected_literal(node: ast.AST) -> bool:
    value = _literal(node)
    # "True" / "None" say little and are everywhere
    return value is not _NOT_A_LITERAL and value is not None and not isinstance(value, bool)


def _literal_texts(node: ast.AST, source: str) -> list[str]:
    if not _is_expected_literal(node):
        return []
    value = _literal(node)
    texts = {ast.get_source_segment(source, node) or "", repr(value)}
    if isinstance(value, str):
        texts.add(value)
    return [t for t in texts if t.strip()]


def expected_values(gold: CodeTests | str) -> list[str]:
    """The expected values the tests compare against, as they may appear in text
    (the literal as written, its ``repr``, a string's content), longest first.

    From every comparison (``==``, ``!=``, ``is``, ``in`` ...) in an ``assert``: each side
    that is a literal (``5``, ``"abc"``, ``[1, 2]``, ``-3.5``); ``True``/``False``/``None``
    are left out.
    """
    gold = CodeTests.from_gold(gold)
    try:
        module = ast.parse(gold.tests)
    except SyntaxError:
        return []
    found: set[str] = set()
    for node in ast.walk(module):
        if isinstance(node, ast.Assert):
            for cmp in ast.walk(node.test):
                if isinstance(cmp, ast.Compare):
                    for side in (cmp.left, *cmp.comparators):
                        found.update(_literal_texts(side, gold.tests))
    return sorted(found, key=lambda t: (-len(t), t))


def redact_expected(text: str, values: list[str]) -> tuple[str, int]:
    """``text`` with every token-delimited occurrence of ``values`` replaced by
    ``[redacted]``; returns ``(text, count)``."""
    total = 0
    for value in values:
        pattern = re.compile(rf"(?<![\w.]){re.escape(value)}(?![\w]|\.\d)")
        text, n = pattern.subn(REDACTED, text)
        total += n
    return text, total


# ----------------------------------------------------------------------------- feedback


class _HideExpected(ast.NodeTransformer):
    """Literal sides of a comparison -> ``[redacted]`` (the call's arguments stay)."""

    def visit_Compare(self, node: ast.Compare) -> ast.Compare:
        hide = (lambda side: ast.Name(REDACTED, ast.Load()) if _is_expected_literal(side)
                else side)
        return ast.Compare(hide(node.left), node.ops, [hide(c) for c in node.comparators])


def _as_written(line: str | None, reveal_expected: bool) -> str | None:
    """A failing test line as the tests wrote it, its expected values hidden unless
    ``reveal_expected``."""
    if not line:
        return None
    try:
        tree = _PlainEquality().visit(ast.parse(line.strip()))
    except SyntaxError:  # one line of a multi-line statement: shown only when revealing
        return line.replace(_EQ_HELPER, "equal") if reveal_expected else None
    return ast.unparse(tree if reveal_expected else _HideExpected().visit(tree))


def _compared_call(line: str | None) -> str | None:
    """The left side of ``assert <left> == <right>`` in a shown test line."""
    try:
        stmt = ast.parse(line or "").body[0]
    except (SyntaxError, IndexError):
        return None
    if (isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Compare)
            and isinstance(stmt.test.ops[0], ast.Eq)):
        return ast.unparse(stmt.test.left)
    return None


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _where(f, offset: int) -> str:
    if not f.code_line:
        return ""
    line = (f.code_lineno or 0) - offset  # the prelude's lines come first
    return (f" at line {line} of your code: `{f.code_line}`" if line > 0
            else f" in the given code: `{f.code_line}`")


def feedback_for(result: ExecutionResult, *, timeout_s: float, memory_mb: int,
                 expected: list[str], reveal_expected: bool = False,
                 prelude_lines: int = 0, entry_point: str | None = None) -> str:
    """The feedback text of a run. Unless ``reveal_expected``, the test line shown has its
    literal comparison sides replaced by ``[redacted]``, and ``expected`` (the tests'
    :func:`expected_values`) are redacted from exception messages. ``prelude_lines``:
    lines put before the candidate's code (line numbers are given in its own code).
    ``entry_point``: the function the tests call (a NameError for it says so)."""
    f, n = result.failure, result.num_tests

    def _where_(failure) -> str:
        return _where(failure, prelude_lines)

    verdicts = " ".join("pass" if ok else "FAIL" for ok in result.tests)

    def message(text: str) -> str:
        return text if reveal_expected else redact_expected(text, expected)[0]

    if result.status == "passed":
        return f"all {_plural(n, 'test')} passed"
    if result.status == "timeout":
        done = len(result.tests)
        where = ("while loading your code" if not result.loaded else
                 f"in test {done + 1} of {n}" if done < n else "after the tests")
        return (f"timed out after {timeout_s:g} s {where}"
                + (f"; before that: {verdicts}" if verdicts else ""))
    if result.status == "cpu_limit":
        return f"CPU time limit exceeded ({_plural(n, 'test')}, {verdicts or 'none run'})"
    if result.status == "crashed":
        return f"the program stopped before the tests finished ({result.error})"
    if result.status == "load_error" and f is not None:
        if f.kind == "SystemExit":
            return f"your code exited (SystemExit: {f.message}) before the tests ran"
        if f.kind == "MemoryError":
            return f"memory limit ({memory_mb} MB) exceeded while loading your code{_where_(f)}"
        if f.kind in ("SyntaxError", "IndentationError", "TabError"):
            return f"your code does not parse: {f.kind}: {f.message}{_where_(f)}"
        return f"loading your code raised {f.kind}: {message(f.message)}{_where_(f)}"
    if result.status == "failed" and f is not None:
        head = f"{sum(result.tests)} of {_plural(n, 'test')} passed ({verdicts})"
        test = _as_written(f.test_line, reveal_expected)
        what = f"test {result.failed_test + 1}" + (f" `{test}`" if test else "")
        if f.kind == "MemoryError":
            return f"{head}; {what}: memory limit ({memory_mb} MB) exceeded{_where_(f)}"
        if f.kind == "AssertionError" and not f.code_line:
            call = _compared_call(_as_written(f.test_line, True))
            got = f": `{call}` returned {f.actual}" if call and f.actual is not None else ""
            return f"{head}; {what} failed{got}" + (f" ({message(f.message)})"
                                                     if f.message else "")
        if (f.kind == "NameError" and entry_point and not f.code_line
                and f.message == f"name '{entry_point}' is not defined"):
            return f"{head}: your code does not define `{entry_point}`, which the tests call"
        detail = f": {message(f.message)}" if f.message else ""
        return f"{head}; {what} raised {f.kind}{detail}{_where_(f)}"
    return f"the run did not finish ({result.status}: {result.error})"


def _score(response: Any, gold: Any, timeout_s: float | None, reveal_expected: bool,
           config: SandboxConfig | None) -> VerifierResult:
    gold = CodeTests.from_gold(gold)
    code = extract_code(response, gold.entry_point)
    if code is None:
        return VerifierResult(0.0, False, None, None, "no Python code in the response",
                              method="no_code")
    program = build_program(code, gold)
    base = config or SandboxConfig()
    if timeout_s is not None:
        base = dataclasses.replace(base, timeout_s=float(timeout_s))
    result = default_sandbox(base).run(program)
    if result.status == "setup_error":
        raise RuntimeError(result.error)
    feedback = feedback_for(result, timeout_s=base.timeout_s, memory_mb=base.memory_mb,
                            expected=expected_values(gold), reveal_expected=reveal_expected,
                            prelude_lines=prelude_lines(gold), entry_point=gold.entry_point)
    ok = result.passed
    return VerifierResult(float(ok), ok, code, None, feedback, method=result.status)


@register_reward("python_tests")
def python_tests(response: str | None, gold: Any, *, timeout_s: float | None = 2.0,
                 config: SandboxConfig | None = None) -> VerifierResult:
    """Run the response's code against the tests in the sandbox (module docstring).

    ``timeout_s``: the run's wall-clock limit (``reward.timeout_s``); ``config``: the
    other limits (:class:`~amrsd_jax.rewards.sandbox.SandboxConfig`). ``extracted`` is
    the code that ran; ``method`` the run's status (``passed``, ``failed``, ``timeout``,
    ``load_error``, ``cpu_limit``, ``crashed``, ``no_code``).
    """
    return _score(response, gold, timeout_s, False, config)


@register_reward("python_tests_verbose")
def python_tests_verbose(response: str | None, gold: Any, *, timeout_s: float | None = 2.0,
                         config: SandboxConfig | None = None) -> VerifierResult:
    """:func:`python_tests` with the tests' expected values left in the feedback."""
    return _score(response, gold, timeout_s, True, config)


# score_batch keeps this many calls in flight: one per sandbox worker
python_tests.parallel_calls = python_tests_verbose.parallel_calls = SandboxConfig().workers

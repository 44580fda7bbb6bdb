r"""Symbolic answer equivalence through Hugging Face's ``math-verify`` (what TRL and verl use).

:func:`symbolic_equal` decides whether two final answers (LaTeX or plain text, already
extracted from the response by :mod:`~amrsd_jax.rewards.math_verifier`) are the same
mathematical object: numbers, expressions, equations, sets, intervals, tuples, matrices.
Both sides are wrapped in ``\boxed{...}`` before ``math_verify.parse`` (as verl does for
the gold: a bare gold such as ``2\sqrt{2}`` parsed with math-verify's defaults keeps only
``2``), and only math-verify's LaTeX extraction is used (its plain-expression extraction
runs ``sympy.parse_expr`` on text, which we do not do on model output).

Timeouts: math-verify's own timeouts use ``signal.alarm`` and work only in the main thread,
so they are disabled (``parsing_timeout=None``, ``timeout_seconds=None``). Instead each
comparison runs in a daemon worker thread that the caller waits for at most ``timeout_s``
seconds (any thread may call). Comparisons are serialised by a lock (the GIL allows no
parallelism here anyway, and math-verify's parser caches are not documented as
thread-safe). On a timeout the worker is sent an asynchronous exception (it stops at its
next Python bytecode; sympy is pure Python) and the caller gets :class:`SymbolicTimeout`;
a worker that does not stop (stuck in C code, or swallowing the exception) keeps the lock
it holds and later comparisons take a fresh one; once :data:`MAX_STUCK` such workers are
alive, new comparisons fail fast instead of piling up more. Inputs that could make sympy build huge numbers (nested or
large exponents, large factorials, very long strings) are refused (``False``) before
parsing.

``math_verify`` (and sympy) are imported on first use, outside any deadline:
:func:`load` (or :func:`amrsd_jax.rewards.warm_up`) does it ahead of time.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
import time
from typing import Any, Callable

__all__ = [
    "MAX_STUCK",
    "MAX_SYMBOLIC_CHARS",
    "SymbolicTimeout",
    "clear_caches",
    "load",
    "math_verify_alone",
    "symbolic_equal",
    "sympy_safe",
]

MAX_SYMBOLIC_CHARS = 400  # longer answers / golds are not handed to sympy
MAX_STUCK = 2  # abandoned (timed-out) workers still running before new calls fail fast
MAX_EXPONENT = 400  # a literal exponent above this is refused (x^{10^9} would not finish)
MAX_FACTORIAL = 200


class SymbolicTimeout(Exception):
    """A symbolic comparison did not finish within its time budget."""


class _Interrupted(BaseException):
    """Raised asynchronously in a timed-out worker (a BaseException: math-verify catches
    ``Exception`` internally and must not swallow it)."""


_load_lock = threading.Lock()
_work_lock = threading.Lock()
_stuck_lock = threading.Lock()
_stuck: list[threading.Thread] = []
_mv: dict[str, Any] = {}


class _DropTimeoutWarning(logging.Filter):
    """math-verify warns once that its own timeouts are off; ours are on, so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


def load() -> float:
    """Import math-verify (and sympy) and run one comparison to warm its parser up.

    Idempotent and thread-safe; returns the seconds it took (0 once loaded). Raises
    ``ImportError`` if math-verify is not installed.
    """
    if _mv:
        return 0.0
    with _load_lock:
        if _mv:
            return 0.0
        t0 = time.perf_counter()
        import math_verify
        from math_verify import LatexExtractionConfig

        for name in ("math_verify.parser", "math_verify.grader"):
            logging.getLogger(name).addFilter(_DropTimeoutWarning())
        config = [LatexExtractionConfig(boxed_match_priority=0)]
        parse, verify = math_verify.parse, math_verify.verify
        verify(parse(r"\boxed{\frac{1}{2}}", config, parsing_timeout=None),
               parse(r"\boxed{0.5}", config, parsing_timeout=None), timeout_seconds=None)
        _mv.update(parse=parse, verify=verify, config=config,
                   default_configs=None)  # None: math-verify's own default extraction
        return time.perf_counter() - t0


# ----------------------------------------------------------------------------- safety

_EXP_RE = re.compile(r"\^\s*(\{|\(|[-+]?\s*[0-9]+)")
_FACT_RE = re.compile(r"([0-9]+)\s*!")
_DIGITS_RE = re.compile(r"[0-9]{60,}")


def _brace_content(text: str, open_pos: int) -> str:
    depth, i = 0, open_pos
    pairs = {"{": "}", "(": ")"}
    opener, closer = text[open_pos], pairs[text[open_pos]]
    while i < len(text):
        c = text[i]
        if c == opener:
            depth += 1
        elif c == closer:
            depth -= 1
            if depth == 0:
                return text[open_pos + 1:i]
        i += 1
    return text[open_pos + 1:]


def _balanced(text: str) -> bool:
    """Braces balance (``\\{``/``\\}`` included): a fragment such as ``0}^{n-1}`` would be
    parsed up to its stray brace only, and two different fragments could compare equal."""
    depth = 0
    for c in text:
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def sympy_safe(text: str) -> bool:
    """Whether ``text`` can be handed to sympy without risking a runaway computation:
    at most :data:`MAX_SYMBOLIC_CHARS` characters, balanced braces, no 60-digit literals, no exponent that
    is itself a power or exceeds :data:`MAX_EXPONENT`, no factorial above
    :data:`MAX_FACTORIAL` (nor ``\\binom``, ``\\sum``, ``\\prod``, ``\\int``, ``\\lim`` with a
    number above it)."""
    if len(text) > MAX_SYMBOLIC_CHARS or _DIGITS_RE.search(text) or not _balanced(text):
        return False
    if re.search(r"[)}\]]\s*!", text):
        return False  # factorials of expressions
    if re.search(r"\\(?:binom|choose|dbinom|tbinom|int|iint|oint|sum|prod|lim)(?![A-Za-z])",
                 text) and any(int(n) > MAX_FACTORIAL for n in re.findall(r"[0-9]+", text)):
        return False  # binomials, sums, products, integrals, limits: small numbers only
    for m in _FACT_RE.finditer(text):
        if int(m.group(1)) > MAX_FACTORIAL:
            return False
    for m in _EXP_RE.finditer(text):
        tok = m.group(1)
        if tok in "{(":
            inner = _brace_content(text, m.start(1))
            if "^" in inner or "!" in inner or "**" in inner:
                return False
            nums = re.findall(r"[0-9]+", inner)
            if any(int(n) > MAX_EXPONENT for n in nums):
                return False
        elif abs(int(tok.replace(" ", ""))) > MAX_EXPONENT:
            return False
    return "**" not in text


# ----------------------------------------------------------------------------- bounded runs


def _alive_stuck() -> int:
    with _stuck_lock:
        _stuck[:] = [t for t in _stuck if t.is_alive()]
        return len(_stuck)


def _interrupt(thread: threading.Thread) -> None:
    ident = thread.ident
    if ident is not None:
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                                   ctypes.py_object(_Interrupted))


def _replace_work_lock() -> None:
    """Later comparisons use a fresh lock: the stuck worker keeps (and some day releases)
    the one it holds, so one runaway input does not fail every later symbolic answer."""
    global _work_lock
    _work_lock = threading.Lock()


def _run_bounded(fn: Callable[[], bool], timeout_s: float | None) -> bool:
    """``fn()`` under the comparison lock, in a worker thread waited for ``timeout_s``."""
    if timeout_s is None:
        with _work_lock:
            return fn()
    if timeout_s <= 0 or _alive_stuck() >= MAX_STUCK:
        raise SymbolicTimeout("no time left" if timeout_s <= 0 else
                              f"{MAX_STUCK} timed-out symbolic comparisons still running")
    end = time.monotonic() + timeout_s
    box: list[tuple[bool, Any]] = []

    lock = _work_lock  # the lock this call uses, even if a stuck worker gets it replaced

    def work() -> None:
        try:
            try:
                if not lock.acquire(timeout=max(0.0, end - time.monotonic())):
                    return
                try:
                    box.append((True, fn()))
                finally:
                    lock.release()
            except _Interrupted:
                pass
            except BaseException as exc:  # handed to the caller
                box.append((False, exc))
        except _Interrupted:  # arrived while unwinding
            pass

    worker = threading.Thread(target=work, daemon=True, name="amrsd-symbolic")
    worker.start()
    worker.join(timeout_s)
    if box:
        ok, value = box[0]
        if ok:
            return bool(value)
        raise value
    if worker.is_alive():
        _interrupt(worker)
        worker.join(0.05)  # it stops at its next bytecode, unless stuck in C code
        if worker.is_alive():
            with _stuck_lock:
                _stuck.append(worker)
            _replace_work_lock()  # a worker stuck in C code would hold it for good
    raise SymbolicTimeout(f"symbolic comparison exceeded {timeout_s:.3g} s")


# ----------------------------------------------------------------------------- comparisons


@functools.lru_cache(maxsize=4096)
def _parse_boxed(text: str) -> tuple:
    return tuple(_mv["parse"]("\\boxed{" + text + "}", _mv["config"], parsing_timeout=None))


def clear_caches() -> None:
    """Forget parsed answers (ours and math-verify's own small caches): for timing cold
    calls. Training keeps them (a gold repeats across the rollouts of its group)."""
    _parse_boxed.cache_clear()
    if _mv:
        import math_verify.parser as mv_parser

        for name in ("parse_latex_cached", "parse_expr_cached", "extract_latex"):
            fn = getattr(mv_parser, name, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()


def _equal(gold: str, answer: str) -> bool:
    g, a = _parse_boxed(gold), _parse_boxed(answer)
    return bool(g and a and _mv["verify"](list(g), list(a), timeout_seconds=None))


def symbolic_equal(gold: str, answer: str, *, timeout_s: float | None) -> bool:
    """Whether the final answers ``gold`` and ``answer`` are equivalent (math-verify).

    ``False`` for inputs refused by :func:`sympy_safe` or that math-verify cannot parse;
    raises :class:`SymbolicTimeout` past ``timeout_s`` (``None``: unbounded, inline).
    """
    if not (gold.strip() and answer.strip() and sympy_safe(gold) and sympy_safe(answer)):
        return False
    load()
    return _run_bounded(lambda: _equal(gold, answer), timeout_s)


def math_verify_alone(gold: str, response: str, *, wrap_gold: bool = True,
                      timeout_s: float | None = None) -> bool:
    """math-verify by itself, as the field calls it: ``verify(parse(gold), parse(response))``
    with math-verify's default extraction on the whole response; ``wrap_gold`` wraps the
    gold in ``\\boxed{}`` first (verl), otherwise the gold is parsed as is (TRL's
    defaults). For the benchmark's comparison; same thread-based timeout as above."""
    load()
    parse, verify = _mv["parse"], _mv["verify"]

    def work() -> bool:
        g = parse("\\boxed{" + gold + "}" if wrap_gold else gold, parsing_timeout=None)
        p = parse(response, parsing_timeout=None)
        return bool(verify(g, p, timeout_seconds=None))

    return _run_bounded(work, timeout_s)

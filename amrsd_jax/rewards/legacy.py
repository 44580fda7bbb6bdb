r"""The rule-based math verifier as it was before the combined verifier (issue #16), frozen.

Kept only so that ``python run.py bench verifier`` can measure the old behaviour next to
the new one on the same cases; nothing in the library calls it and it is not registered as
a reward. Its known false positives (the reasons it was replaced) are listed in
:mod:`amrsd_jax.rewards.math_verifier`: the "last number in the text" fallback reads ``2``
out of ``\frac{1+\sqrt{5}}{2}`` and ``18`` out of ``18x``, a gold equation ``2x + z = 1``
is reduced to ``1``, ``1 million`` is read as ``1``, and symbolic answers are compared as
strings.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .math_verifier import VerifierResult

__all__ = ["verify_math_legacy"]

MAX_RESPONSE_CHARS = 4000
MAX_NUMBER_CHARS = 200
MAX_DIGITS = 100
FEEDBACK_MAX_CHARS = 60

FEEDBACK_CORRECT = "correct"
FEEDBACK_NO_ANSWER = "no final answer found"
FEEDBACK_TIMEOUT = "verification timed out"


# ----------------------------------------------------------------------------- deadline


class _VerifierTimeout(Exception):
    pass


class _Deadline:
    __slots__ = ("end",)

    def __init__(self, timeout_s: float | None):
        if timeout_s is None:
            self.end = None
        else:
            t = float(timeout_s)
            if not t >= 0.0:  # also rejects NaN
                raise ValueError(f"timeout_s must be >= 0 or None, got {timeout_s!r}")
            self.end = time.monotonic() + t

    def check(self) -> None:
        if self.end is not None and time.monotonic() >= self.end:
            raise _VerifierTimeout


# ----------------------------------------------------------------------------- patterns

# a number as written: 1,234 (groups of three) or 1234, optional decimals, or .5
_NUM = r"(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]*)?|\.[0-9]+"
_EXP = (r"[eE](?P<e1>[-+]?[0-9]{1,3})"
        r"|\ ?(?:\\times|\\cdot|\*)\ ?10\ ?\^\ ?(?P<e2>[-+]?[0-9]{1,3})")

# applied (fullmatch) to a cleaned, whitespace-collapsed string of <= MAX_NUMBER_CHARS
_NUMBER_FULL_RE = re.compile(
    r"(?P<sign>[-+])?\ ?[€£¥]?\ ?(?P<num>" + _NUM + r")(?:" + _EXP + r")?"
    r"(?:\ ?/\ ?(?P<dsign>[-+])?(?P<den>" + _NUM + r"))?"
    r"(?:\ ?(?P<pct>%))?"
    r"(?:(?P<usp>\ ?)(?P<unit>[A-Za-z][A-Za-z .²³/]*))?"
)

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
_ANSWER_RE = re.compile(r"(?<![A-Za-z])answer(?:\s{0,10}is\b\s{0,10}:?|\s{0,10}:)", re.IGNORECASE)
_SKIP_RE = re.compile(r"[\s*]*")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")

_LAST_NUM_RE = re.compile(
    r"(?<![0-9A-Za-z_.\\])(?:"
    r"[-+]?\\[dt]?frac\{[^{}]{1,50}\}\{[^{}]{1,50}\}"
    r"|[-+]?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"(?:\s?/\s?[0-9]+(?:\.[0-9]+)?)?(?:\s?\\?%)?"
    r")"
)

# a number at the start of a prose segment, followed by words or punctuation
_LEAD_NUM_RE = re.compile(
    r"(?P<tok>[-+]?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"(?:\s?/\s?[0-9]+(?:\.[0-9]+)?)?(?:\s?\\?%)?\$?)"
    r"(?:\s*[,;:!?)]\s*|\s+)(?P<word>[A-Za-z]+)"
)
_VAR_LHS_RE = re.compile(r"\s*[A-Za-z](?:_\{?[A-Za-z0-9]{1,4}\}?)?\s*")

# LaTeX clean-up
_DFRAC_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
_LEFTRIGHT_RE = re.compile(r"\\(?:left|right|displaystyle|textstyle|big|Big|bigl|bigr|Bigl|Bigr)(?![A-Za-z])")
_DELIM_RE = re.compile(r"\\[()\[\]]")
_SPACING_RE = re.compile(r"\\[!,;: ]|~")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mathit|mbox|operatorname)\s*\{([^{}]*)\}")
_DEGREE_RE = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°)\s*(?:[CF](?![A-Za-z]))?")
_UNIT_POWER_RE = re.compile(r"(?<=[A-Za-z])\s*\^\s*\{?\s*[23]\s*\}?")
_FRAC_RE = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*([0-9])\s*([0-9])")
_PAREN_NUM_RE = re.compile(r"\(\s*([-+]?\s?(?:" + _NUM + r"))\s*\)")
_WS_RE = re.compile(r"\s+")
_CHOICE_RE = re.compile(r"\(([a-z])\)")

_UNIT_STOPWORDS = frozenset({
    "and", "or", "to", "plus", "minus", "times", "over", "divided", "by", "not", "nor",
    "versus", "vs", "but", "than", "sqrt", "pi", "i", "x", "y", "n", "k", "e", "of",
})
_SINGLE_LETTER_UNITS = frozenset({"m", "g", "s", "l", "h"})
_COMPACT_UNITS = frozenset({
    "mm", "cm", "dm", "m", "km", "in", "ft", "yd", "mi", "mg", "g", "kg", "lb", "lbs", "oz",
    "ml", "l", "s", "sec", "secs", "min", "mins", "h", "hr", "hrs", "mph", "kph", "kmh",
    "st", "nd", "rd", "th", "am", "pm", "kb", "mb", "gb", "tb", "w", "kw", "v", "hz", "khz",
})
_PERCENT_WORDS = frozenset({"percent", "pct", "per cent"})


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Num:
    value: Fraction
    pct: bool


@dataclass(frozen=True)
class _Answer:
    number: _Num | None
    norm: str
    start: int
    end: int


def _clean_latex(s: str) -> str:
    s = s.replace("\u2212", "-")
    s = _DFRAC_RE.sub(r"\\frac", s)
    s = _LEFTRIGHT_RE.sub("", s)
    s = s.replace("\\%", "%").replace("\\$", "").replace("$", "")
    s = _DELIM_RE.sub(" ", s)
    s = _SPACING_RE.sub("", s)
    for _ in range(8):
        new = _TEXT_RE.sub(r" \1 ", s)
        if new == s:
            break
        s = new
    s = _DEGREE_RE.sub(" ", s)
    for _ in range(8):
        new = _FRAC_SHORT_RE.sub(r" (\1)/(\2) ", _FRAC_RE.sub(r" (\1)/(\2) ", s))
        if new == s:
            break
        s = new
    return s


def _normalise_string(raw: str) -> str:
    s = _clean_latex(raw).replace("{", "").replace("}", "")
    s = _WS_RE.sub("", s).lower().rstrip(".")
    m = _CHOICE_RE.fullmatch(s)
    return m.group(1) if m else s


def _valid_unit(unit: str, spaced: bool) -> bool:
    unit = unit.strip()
    words = re.findall(r"[A-Za-z]+", unit)
    if not words or len(words) > 4 or len(unit) > 40:
        return False
    lowered = [w.lower() for w in words]
    if any(w in _UNIT_STOPWORDS for w in lowered):
        return False
    if len(words) == 1 and len(words[0]) == 1 and lowered[0] not in _SINGLE_LETTER_UNITS:
        return False
    if not spaced:
        glued = re.match(r"[A-Za-z/]+", unit).group(0).lower()
        if glued not in _COMPACT_UNITS and lowered[0] not in _COMPACT_UNITS:
            return False
    return True


def _to_fraction(num: str) -> Fraction | None:
    digits = num.replace(",", "").rstrip(".")
    if not digits or len(digits) > MAX_DIGITS:
        return None
    return Fraction(digits)


def _parse_number(raw: str) -> _Num | None:
    """Parse ``raw`` as one number (with optional %, unit words); ``None`` if it is not."""
    if len(raw) > 4 * MAX_NUMBER_CHARS:
        return None
    s = _UNIT_POWER_RE.sub("", _clean_latex(raw)).replace("{", "").replace("}", "")
    for _ in range(4):
        new = _PAREN_NUM_RE.sub(r"\1", s)
        if new == s:
            break
        s = new
    s = _WS_RE.sub(" ", s).strip().rstrip(".").strip()
    if not s or len(s) > MAX_NUMBER_CHARS:
        return None
    m = _NUMBER_FULL_RE.fullmatch(s)
    if m is None:
        return None
    pct = m.group("pct") is not None
    unit = m.group("unit")
    if unit is not None:
        u = unit.strip().lower()
        if u in _PERCENT_WORDS and not pct:
            pct = True
        elif not _valid_unit(unit, spaced=bool(m.group("usp"))):
            return None
    value = _to_fraction(m.group("num"))
    if value is None:
        return None
    exp = m.group("e1") or m.group("e2")
    if exp is not None:
        value *= Fraction(10) ** int(exp)
    if m.group("sign") == "-":
        value = -value
    if m.group("den") is not None:
        den = _to_fraction(m.group("den"))
        if den is None or den == 0:
            return None
        value /= -den if m.group("dsign") == "-" else den
    return _Num(value, pct)


def _numbers_equal(a: _Num, b: _Num) -> bool:
    if a.pct == b.pct:
        return a.value == b.value
    p, x = (a, b) if a.pct else (b, a)
    return x.value == p.value or x.value == p.value / 100


def _answers_equal(gold: _Answer, ans: _Answer) -> bool:
    if gold.norm == ans.norm and gold.norm:
        return True
    if gold.number is not None and ans.number is not None:
        return _numbers_equal(gold.number, ans.number)
    return False


# ----------------------------------------------------------------------------- extraction


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    while s < e and (text[s].isspace() or text[s] == "*"):
        s += 1
    while e > s and (text[e - 1].isspace() or text[e - 1] in "*.!,;:"):
        e -= 1
    return s, e


def _match_braces(text: str) -> dict[int, int]:
    stack: list[int] = []
    pairs: dict[int, int] = {}
    for m in _BRACE_RE.finditer(text):
        i = m.start()
        if text[i] == "{":
            stack.append(i)
        elif stack:
            pairs[stack.pop()] = i
    return pairs


def _find_boxed(text: str) -> tuple[str, int, int] | None:
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return None
    pairs = _match_braces(text)
    for m in reversed(matches):
        close = pairs.get(m.end() - 1)
        if close is None:
            continue
        s, e = _trim(text, m.end(), close)
        if s < e:
            return ("boxed", s, e)
    return None


def _segment_after(text: str, pos: int, method: str) -> tuple[str, int, int] | None:
    s = _SKIP_RE.match(text, pos).end()
    e = text.find("\n", s)
    if e == -1:
        e = len(text)
    cut = _SENTENCE_END_RE.search(text, s, e)
    if cut is not None:
        e = cut.start()
    s, e = _trim(text, s, e)
    return (method, s, e) if s < e else None


def _find_hash(text: str) -> tuple[str, int, int] | None:
    i = text.rfind("####")
    return None if i == -1 else _segment_after(text, i + 4, "hash")


def _find_answer_marker(text: str) -> tuple[str, int, int] | None:
    last = None
    for last in _ANSWER_RE.finditer(text):
        pass
    return None if last is None else _segment_after(text, last.end(), "answer")


def _find_last_number(text: str) -> tuple[str, int, int] | None:
    last = None
    for last in _LAST_NUM_RE.finditer(text):
        pass
    return None if last is None else ("last_number", last.start(), last.end())


_FINDERS = (_find_boxed, _find_hash, _find_answer_marker, _find_last_number)


def _locate(text: str, deadline: _Deadline) -> tuple[str, int, int] | None:
    for finder in _FINDERS:
        deadline.check()
        found = finder(text)
        if found is not None:
            return found
    return None


def _make_answer(text: str, s: int, e: int, number: _Num | None) -> _Answer:
    return _Answer(number, _normalise_string(text[s:e]), s, e)


def _interpret(text: str, s: int, e: int, *, prose: bool, deadline: _Deadline) -> _Answer:
    """Turn the located segment ``text[s:e]`` into an answer (number or string) and its span."""
    seg = text[s:e]
    num = _parse_number(seg)
    if num is not None:
        return _make_answer(text, s, e, num)
    deadline.check()
    if prose:
        m = _LEAD_NUM_RE.match(seg)
        if m is not None and m.group("word").lower() not in _UNIT_STOPWORDS:
            num = _parse_number(m.group("tok"))
            if num is not None:
                ts, te = _trim(text, s + m.start("tok"), s + m.end("tok"))
                return _make_answer(text, ts, te, num)
    eq = seg.rfind("=")
    if eq > 0 and seg[eq - 1] not in "<>!\\":
        rs, re_ = _trim(text, s + eq + 1, e)
        if rs < re_:
            num = _parse_number(text[rs:re_])
            if num is not None or _VAR_LHS_RE.fullmatch(seg[:eq]):
                return _make_answer(text, rs, re_, num)
    return _make_answer(text, s, e, None)


def _window(text: str) -> tuple[str, int]:
    offset = max(0, len(text) - MAX_RESPONSE_CHARS)
    return text[offset:], offset


def _coerce_response(response: Any) -> str:
    if response is None:
        return ""
    if isinstance(response, str):
        return response
    if isinstance(response, (bytes, bytearray)):
        return bytes(response).decode("utf-8", errors="replace")
    raise TypeError(f"response must be a str, got {type(response).__name__}")


def _gold_answer(gold: Any, deadline: _Deadline) -> _Answer:
    if gold is None:
        raise ValueError("gold answer is None")
    if isinstance(gold, (int, float, Fraction)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str or a number, got {type(gold).__name__}")
    text, _ = _window(gold)
    has_box = "\\boxed" in text or "\\fbox" in text
    if has_box or "####" in text:
        found = (_find_boxed(text) if has_box else None) or _find_hash(text)
        if found is None:
            raise ValueError("gold answer has a \\boxed{} / #### marker but no answer in it")
        _, s, e = found
    else:
        s, e = _trim(text, 0, len(text))
    if s >= e:
        raise ValueError("gold answer is empty")
    ans = _interpret(text, s, e, prose=False, deadline=deadline)
    if ans.number is None and not ans.norm:
        raise ValueError("gold answer is empty after normalisation")
    return ans


def _short(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > FEEDBACK_MAX_CHARS:
        text = text[: FEEDBACK_MAX_CHARS - 1] + "…"
    return text


def _timeout_result(timeout_s: float | None) -> VerifierResult:
    return VerifierResult(0.0, False, None, None, FEEDBACK_TIMEOUT,
                          error=f"timeout: verification exceeded {timeout_s} s")

def verify_math_legacy(response: str | None, gold: Any, *,
                       timeout_s: float | None = 1.0) -> VerifierResult:
    """The old ``reward.name=math`` verifier (see the module docstring).

    Never raises because of the response content; raises ``ValueError``/``TypeError`` for
    an empty/None/ill-typed gold or a negative ``timeout_s``. ``timeout_s=None`` disables
    the deadline.
    """
    deadline = _Deadline(timeout_s)
    text = _coerce_response(response)
    try:
        gold_ans = _gold_answer(gold, deadline)
        deadline.check()
        window, offset = _window(text)
        found = _locate(window, deadline)
        if found is None:
            return VerifierResult(0.0, False, None, None, FEEDBACK_NO_ANSWER)
        method, s, e = found
        ans = _interpret(window, s, e, prose=method in ("hash", "answer"), deadline=deadline)
        deadline.check()
    except _VerifierTimeout:
        return _timeout_result(timeout_s)

    extracted = window[ans.start:ans.end]
    span = (offset + ans.start, offset + ans.end)
    if _answers_equal(gold_ans, ans):
        return VerifierResult(1.0, True, extracted, span, FEEDBACK_CORRECT, method=method)
    if gold_ans.number is not None and ans.number is None:
        feedback = f"expected a number, got '{_short(extracted)}'"
    elif gold_ans.number is not None:
        feedback = f"wrong value: got {_short(extracted)}"
    else:
        feedback = f"wrong answer: got '{_short(extracted)}'"
    return VerifierResult(0.0, False, extracted, span, feedback, method=method)


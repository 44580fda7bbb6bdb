r"""Rule-based verifier for math answers (GSM8K / MATH style) and the reward-function registry.

Pure Python (``re`` + ``fractions.Fraction``); model output is never evaluated: there is no
``eval``/``exec``/``sympify`` anywhere, numbers are parsed by regular expressions and
``Fraction``.

Extraction (on the last :data:`MAX_RESPONSE_CHARS` characters of the response; spans are
reported in coordinates of the *full* response), first form found wins:

1. the last balanced ``\boxed{...}`` (or ``\fbox{...}``) with non-empty content;
2. the last ``#### <answer>`` (rest of that line, or of the next line if empty);
3. the last ``Answer: ...`` / ``answer is ...`` (case-insensitive; rest of the line, cut at
   the first sentence end ``". "``);
4. the last number in the text (``-1,234.5``, ``3/4``, ``50%``, ``\frac{3}{4}``).

Inside forms 2-3 the answer may be followed by prose: ``"42 because 6*7=42"`` yields ``42``,
``"x = 5"`` and ``"3 + 4 = 7"`` yield the right-hand side of the last ``=``. Inside
``\boxed{}`` only the ``=`` rule applies (``\boxed{2, 3}`` is *not* read as ``2``).
``answer_span`` covers the answer proper (e.g. ``"12 apples"``, ``"42"``, ``"\frac{3}{4}"``).

Numeric normalisation (both the gold and the extracted answer):

* ``$``, ``\$``, ``\(``, ``\)``, ``\[``, ``\]``, ``\left``/``\right``, ``\!``, ``\,``, ``\;``,
  ``~``, ``\displaystyle`` and braces are dropped; ``\text{..}``/``\mathrm{..}``/``\mbox{..}``
  etc. are replaced by their content; ``\dfrac``/``\tfrac`` are ``\frac``;
  ``\frac{a}{b}``/``\frac12`` become ``a/b``; ``(3)`` becomes ``3``; U+2212 is ``-``.
* thousands separators ``1,234`` (groups of exactly three digits), leading ``+``/``-``,
  trailing ``.``, trailing zeros (``12.0 == 12``), ``.5``, ``1.5e3``,
  ``1.5 \times 10^{3}`` are understood; values are exact ``Fraction`` s, so
  ``0.75 == 3/4 == \frac{6}{8}`` but ``0.33 != 1/3`` (no tolerance).
* units / words after the number are ignored (``"12 apples"``, ``"5 dollars"``,
  ``"3 cm"``, ``"3cm"``, ``"90^\circ"``, ``"12\text{ m}^2"``), with guards against reading
  an expression as a unit: a unit is at most 4 words and 40 characters, contains none of
  ``and/or/to/plus/minus/times/...``, a one-letter unit must be one of ``m g s l h``
  (so ``"4i"``, ``"2x"``, ``"5k"`` are *not* numbers), and a unit glued to the number
  (``"3cm"``) must be a known abbreviation.
* percentages: ``"50%"``, ``"50\%"``, ``"50 percent"`` have value 50 *and* are marked as
  percentages. A percentage equals a plain number ``x`` when ``x == p`` or ``x == p/100``
  (so ``"50%"`` matches gold ``"50"`` and gold ``"0.5"``); two percentages must be equal
  (``"0.5%" != "50%"``).
* only ASCII digits are digits; other Unicode digits (``"٣"``, ``"３"``) are compared as
  strings.
* numbers longer than 100 digits (or candidates longer than 200 characters) are compared as
  strings.

Non-numeric ("symbolic") fallback: when the gold or the answer is not a single number, the
two are compared as normalised strings -- the LaTeX clean-up above, then all whitespace
and braces removed, lower-cased, trailing ``.`` removed, ``"(B)"`` -> ``"b"``. This is
string identity, not algebra: ``x+1`` vs ``1+x``, ``\sqrt{8}`` vs ``2\sqrt{2}``, ``{1,2}``
vs ``{2,1}``, ``0.5x`` vs ``x/2``, ``1\frac{1}{2}`` vs ``3/2`` all compare unequal, and
case is ignored (``A`` == ``a``). Units are ignored, not converted (``12 m`` == ``12 cm``).

A gold containing ``\boxed{}`` or ``####`` (e.g. a full GSM8K solution) is reduced to its
boxed / ``####`` answer first.

Time bound: the work is linear in the (capped) input, and ``timeout_s`` is a cooperative
deadline checked between stages; past it, the verifier returns reward 0 with
``error="timeout: ..."``. (CPython's ``re`` holds the GIL, so a thread watchdog could not
interrupt a regex anyway; the patterns here avoid nested/overlapping quantifiers.)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable

__all__ = [
    "MAX_RESPONSE_CHARS",
    "REWARD_FUNCTIONS",
    "VerifierResult",
    "extract_answer",
    "format_reward",
    "get_reward_fn",
    "register_reward",
    "safe_reward",
    "score_batch",
    "verify_math",
]

MAX_RESPONSE_CHARS = 4000  # extraction looks at the last this-many characters
MAX_NUMBER_CHARS = 200  # longer candidates are compared as strings
MAX_DIGITS = 100  # longer digit strings are compared as strings
FEEDBACK_MAX_CHARS = 60
ERROR_MAX_CHARS = 300

FEEDBACK_CORRECT = "correct"
FEEDBACK_NO_ANSWER = "no final answer found"
FEEDBACK_TIMEOUT = "verification timed out"
FEEDBACK_ERROR = "verification error"
FEEDBACK_FORMAT_OK = "format ok"
FEEDBACK_FORMAT_MISSING = (
    "no final-answer marker (\\boxed{...}, '#### ...' or 'Answer: ...') at the end of the response"
)


@dataclass(frozen=True)
class VerifierResult:
    """Outcome of one verification.

    Attributes:
      reward: 1.0 or 0.0 (any float in [0, 1] for custom reward functions).
      correct: whether the answer was judged correct.
      extracted: the answer text as written in the response, or ``None``.
      answer_span: ``(start, end)`` character span of ``extracted`` in the response
        (``response[start:end] == extracted``), or ``None``.
      feedback: short text for self-distillation prompts; never contains the gold answer.
      error: ``None``, or why verification failed (exception, timeout, invalid reward).
      method: which extraction rule fired (``"boxed"``, ``"hash"``, ``"answer"``,
        ``"last_number"``) or ``None``.
    """

    reward: float
    correct: bool
    extracted: str | None
    answer_span: tuple[int, int] | None
    feedback: str
    error: str | None = None
    method: str | None = None


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


def extract_answer(response: str | None) -> tuple[str, tuple[int, int], str] | None:
    """The final answer located in ``response``: ``(text, (start, end), method)`` or ``None``.

    This is the raw located segment (before the prose / ``=`` refinement that
    :func:`verify_math` applies).
    """
    text = _coerce_response(response)
    window, offset = _window(text)
    found = _locate(window, _Deadline(None))
    if found is None:
        return None
    method, s, e = found
    return window[s:e], (offset + s, offset + e), method


def _short(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > FEEDBACK_MAX_CHARS:
        text = text[: FEEDBACK_MAX_CHARS - 1] + "…"
    return text


def _timeout_result(timeout_s: float | None) -> VerifierResult:
    return VerifierResult(0.0, False, None, None, FEEDBACK_TIMEOUT,
                          error=f"timeout: verification exceeded {timeout_s} s")


# ----------------------------------------------------------------------------- registry

RewardFn = Callable[..., Any]
REWARD_FUNCTIONS: dict[str, RewardFn] = {}


def register_reward(name: str, *, overwrite: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering ``fn(response, gold, **kw) -> VerifierResult`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty str, got {name!r}")

    def decorator(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise TypeError(f"reward function {name!r} is not callable")
        existing = REWARD_FUNCTIONS.get(name)
        if existing is not None and existing is not fn and not overwrite:
            raise ValueError(f"reward function {name!r} is already registered "
                             "(pass overwrite=True to replace it)")
        REWARD_FUNCTIONS[name] = fn
        return fn

    return decorator


def get_reward_fn(name: str) -> RewardFn:
    """The registered reward function ``name``; ``ValueError`` naming the nearest otherwise."""
    fn = REWARD_FUNCTIONS.get(name) if isinstance(name, str) else None
    if fn is not None:
        return fn
    registered = sorted(REWARD_FUNCTIONS)
    nearest = difflib.get_close_matches(str(name), registered, n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    raise ValueError(f"unknown reward function {name!r}{hint} "
                     f"(registered: {', '.join(registered) or 'none'})")


# ----------------------------------------------------------------------------- rewards


@register_reward("math")
def verify_math(response: str | None, gold: Any, *, timeout_s: float | None = 1.0) -> VerifierResult:
    """Check the final answer in ``response`` against ``gold`` (see the module docstring).

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


@register_reward("format")
def format_reward(response: str | None, gold: Any = None, *,
                  timeout_s: float | None = 1.0) -> VerifierResult:
    """1.0 if the response ends with a final-answer marker, else 0.0 (``gold`` is ignored).

    "Ends with": the answer of a ``\\boxed{...}``, ``#### ...`` or ``Answer: ...`` /
    ``answer is ...`` marker ends on the last non-empty line of the response.
    """
    deadline = _Deadline(timeout_s)
    text = _coerce_response(response)
    try:
        window, offset = _window(text)
        stripped = window.rstrip()
        last_line = stripped.rfind("\n") + 1
        best = None
        for finder in _FINDERS[:3]:  # priority order, as in verify_math
            deadline.check()
            found = finder(window)
            if found is not None and found[2] > last_line:
                best = found
                break
    except _VerifierTimeout:
        return _timeout_result(timeout_s)
    if best is None:
        return VerifierResult(0.0, False, None, None, FEEDBACK_FORMAT_MISSING)
    method, s, e = best
    return VerifierResult(1.0, True, window[s:e], (offset + s, offset + e), FEEDBACK_FORMAT_OK,
                          method=method)


# ----------------------------------------------------------------------------- safety


def _truncate(msg: str, limit: int = ERROR_MAX_CHARS) -> str:
    return msg if len(msg) <= limit else msg[: limit - 1] + "…"


def _describe(exc: BaseException) -> str:
    try:
        msg = str(exc)
    except Exception:  # a broken __str__ must not escape either
        msg = "<unprintable>"
    return _truncate(f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__)


def _error_result(error: str, base: VerifierResult | None = None) -> VerifierResult:
    return VerifierResult(
        0.0, False,
        base.extracted if base is not None else None,
        base.answer_span if base is not None else None,
        FEEDBACK_ERROR, error=_truncate(error),
        method=base.method if base is not None else None,
    )


def _validate(out: Any) -> VerifierResult:
    if isinstance(out, VerifierResult):
        result = out
    elif isinstance(out, (bool, int, float)) or hasattr(out, "__float__"):
        r = float(out)
        result = VerifierResult(r, r == 1.0, None, None, "")
    else:
        return _error_result(f"invalid return type {type(out).__name__}: expected VerifierResult "
                             "or a float")
    try:
        r = float(result.reward)
    except Exception as exc:
        return _error_result(f"invalid reward {result.reward!r}: {_describe(exc)}", result)
    if not math.isfinite(r) or not 0.0 <= r <= 1.0:
        return _error_result(f"invalid reward {r!r}: must be a finite number in [0, 1]", result)
    if type(result.reward) is not float or type(result.correct) is not bool:
        result = dataclasses.replace(result, reward=r, correct=bool(result.correct))
    return result


def safe_reward(fn: RewardFn | str, response: Any, gold: Any, **kw: Any) -> VerifierResult:
    """Call reward ``fn`` (a callable or a registered name); never raises.

    Any exception, a NaN/inf reward, a reward outside [0, 1] or a wrong return type gives
    reward 0.0 with ``error`` set (exception type + message, truncated).
    """
    try:
        f = get_reward_fn(fn) if isinstance(fn, str) else fn
        return _validate(f(response, gold, **kw))
    except Exception as exc:
        return _error_result(_describe(exc))


def _call_bounded(fn: RewardFn, response: Any, gold: Any, wall_timeout_s: float,
                  kw: dict) -> VerifierResult:
    """:func:`safe_reward` in a daemon thread, abandoned after ``wall_timeout_s``.

    A reward function that hangs (a network call, a runaway loop that never checks the
    cooperative deadline) cannot stall training: its row gets reward 0 with a timeout
    error. The abandoned thread is a daemon, so it never blocks interpreter exit.
    """
    import threading

    box: list[VerifierResult] = []
    worker = threading.Thread(target=lambda: box.append(safe_reward(fn, response, gold, **kw)),
                              daemon=True, name="amrsd-reward")
    worker.start()
    worker.join(wall_timeout_s)
    if not box:
        return _timeout_result(wall_timeout_s)
    return box[0]


def score_batch(name: RewardFn | str, responses: Iterable[Any], golds: Iterable[Any], *,
                wall_timeout_s: float | None = None,
                **kw: Any) -> tuple[list[VerifierResult], int]:
    """Score ``responses[i]`` against ``golds[i]`` with :func:`safe_reward`.

    ``wall_timeout_s`` additionally bounds each call by wall time (for reward functions
    that may hang); ``None`` runs the calls inline (the built-in verifiers are bounded by
    their own cooperative ``timeout_s``).

    Returns ``(results, num_errors)``. Raises ``ValueError`` only for an unknown reward name
    or mismatched lengths (caller bugs), never because of a response.
    """
    fn = name if callable(name) else get_reward_fn(name)
    responses, golds = list(responses), list(golds)
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} gold answers")
    if wall_timeout_s is None:
        results = [safe_reward(fn, r, g, **kw) for r, g in zip(responses, golds)]
    else:
        results = [_call_bounded(fn, r, g, wall_timeout_s, kw)
                   for r, g in zip(responses, golds)]
    return results, sum(r.error is not None for r in results)

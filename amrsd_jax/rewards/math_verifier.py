r"""Math answer verifier (GSM8K / MATH style) and the reward-function registry.

``reward.name=math`` (:func:`verify_math`) is a combined verifier: a fast rule-based path
for numeric golds (regular expressions and ``fractions.Fraction``, no sympy) and
Hugging Face's ``math-verify`` (:mod:`~amrsd_jax.rewards.symbolic`) for everything else.
Model output is never evaluated with ``eval``/``exec``/``sympify``; math-verify parses
LaTeX with its ANTLR grammar.

**Extraction** (on the last :data:`MAX_RESPONSE_CHARS` characters of the response, which
ends at its first chat special token such as ``<|im_end|>``; spans are reported in
coordinates of the *full* response), first form found wins:

1. the last balanced ``\boxed{...}`` (or ``\fbox{...}``) with non-empty content;
2. the last ``#### <answer>`` (rest of that line, or of the next line if empty);
3. the last ``Answer: ...`` / ``answer is ...`` (case-insensitive; rest of the line, cut at
   the first sentence end ``". "``);
4. lenient mode only: the last number of the text (``-1,234.5``, ``3/4``, ``50%``,
   ``\frac{3}{4}``, ``2.5 million``) if it is *standalone*, or the last math environment
   (``$...$``, ``\(...\)``, ``\[...\]``) if it ends at or after that number. A number is
   standalone when it is not glued to letters (``18x``), not inside braces or an exponent
   (``\frac{1+\sqrt{5}}{2}``, ``10^{6}``) and not an operand (``5-3``, ``2 \times 3``,
   ``3 times 4``; markdown ``**12**`` is fine); an earlier number is never used instead.
   A response whose unmarked answer is followed by an unfinished sentence (see strict
   mode) has no final answer.

Inside forms 2-3 the answer may be followed by prose: ``"42 because 6*7=42"`` yields
``42``; a prose answer with exactly one number and no negation or bound word
(``not``, ``at least``, ``between``...) yields that number ("The volume is 120"). An
equation ``lhs = rhs`` (or a chain ``z = 1 + 1 = 2``; ``=`` inside brackets, as in
``\sum_{k=0}``, does not count, nor does a list ``x = 1, y = 2``) is reduced to its last
right-hand side when ``lhs`` is a single variable (``x``, ``f(x)``, ``\theta_1``) or a
tuple of them (``(p,q)``); in a response it also is when that side is a number and the
rest are short expressions without variables (``3 + 4 = 7``). A *gold* equation with any
other left side (``2x + z = 1``) is kept whole and only an equation can match it.
``a \approx b`` is read as ``a`` (the exact value), or as ``b`` when ``a`` is just the
variable (``x \approx 11``). ``answer_span`` covers the answer proper (e.g. ``"12
apples"``, ``"42"``, ``"\frac{3}{4}"``).

**Hedges** are rejected (reward 0, feedback "more than one final answer"), unless the
gold itself has several values (a top-level comma, ``or``, ``\pm``): an answer containing
``or``/``either``/``maybe``/``possibly``/``perhaps``/``alternatively``/``\pm``
(``"5 or 6"``), an alternative right after it on its line (``\boxed{5}, or possibly 6``),
a hedge word right before it (``5 or \boxed{6}``), and two adjacent boxed answers that
differ (``\boxed{5} or \boxed{6}``, ``\boxed{5}, \boxed{6}``). A later answer after other
text is a correction, not a hedge: the last one counts.

**Strict mode** (``strict=True``, reward names ``math_strict``, ``gsm8k``, ``math500``)
requires a final-answer marker (no fallback 4) and rejects truncated responses: an open
``\boxed{`` after the answer, or text after the answer that ends mid-sentence (not with
``. ! ? ) ] } $ *`` or a closing quote; up to three trailing words without digits such as
``\boxed{12} apples`` are allowed). :func:`resolve_reward_name` maps ``reward.name`` and
``reward.strict`` (``None``: strict iff the prompt asks for a marked answer) to a
registered name.

**Comparison.** Numeric golds (``72``, ``-3.5``, ``1,234``, ``3/4``, ``\frac{3}{4}``,
``50%``, ``1.5 million``) use the fast path when the answer is a number too:

* ``$``, ``\$``, ``\(``, ``\)``, ``\[``, ``\]``, ``\left``/``\right``, ``\!``, ``\,``, ``\;``,
  ``~``, ``\displaystyle`` and braces are dropped; ``\text{..}``/``\mathrm{..}``/``\mbox{..}``
  etc. are replaced by their content; ``\dfrac``/``\tfrac``/``\cfrac`` are ``\frac``;
  ``\frac{a}{b}``/``\frac12``/``\frac3{4}`` become ``a/b``; ``(3)`` becomes ``3``;
  ``32,\! 349`` is ``32,349``; ``\pmod{n}`` is dropped; U+2212 is ``-``.
* thousands separators ``1,234`` (groups of exactly three digits), leading ``+``/``-``,
  trailing ``.``, trailing zeros (``12.0 == 12``), ``.5``, ``1.5e3``,
  ``1.5 \times 10^{3}`` are understood; values are exact ``Fraction`` s, so
  ``0.75 == 3/4 == \frac{6}{8}`` but ``0.33 != 1/3``.
* ``hundred``/``thousand``/``million``/``billion``/``trillion``/``dozen`` after a number
  multiply it (``1 million == 1000000``).
* units / words after the number are ignored (``"12 apples"``, ``"5 dollars"``, ``"3cm"``,
  ``"90^\circ"``, ``"12\text{ m}^2"``) unless both sides carry a known unit and the
  units differ (``12 m != 12 cm``; no conversion). Guards against reading an expression as
  a unit: a unit is at most 4 words and 40 characters, contains none of
  ``and/or/to/plus/minus/times/...``, a one-letter unit must be one of ``m g s l h``
  (so ``"4i"``, ``"2x"``, ``"5k"`` are *not* numbers), and a unit glued to the number
  (``"3cm"``) must be a known abbreviation.
* percentages: ``"50%"`` equals a plain ``x`` when ``x == 50`` or ``x == 0.5``; two
  percentages must be equal.
* a decimal with at least 4 places matches a gold without a finite decimal expansion that
  it rounds or truncates (``0.6667`` or ``0.6666`` for ``2/3``; not ``0.67``); an exact
  decimal gold needs its exact value.
* spelled-out integers (``forty-two``, ``one hundred and five``) are numbers.
* only ASCII digits are digits; numbers longer than 100 digits are compared as strings.

A numeric gold with an answer (marked, or the last math environment) that is a closed
numeric expression (digits, operators, ``\frac``, ``\sqrt``, ``\times``, ``^``; e.g.
``\boxed{2+40}``, ``\boxed{1\frac{1}{2}}``, ``\boxed{10^6}``) goes to math-verify; any
other non-number answer is wrong ("expected a number"). Every other gold is compared by normalised-string
identity first (the clean-up above, whitespace and braces removed, lower-cased,
``"(B)"`` -> ``"b"``) and then by math-verify (expressions, equations, sets, intervals,
tuples, matrices; see :mod:`~amrsd_jax.rewards.symbolic`), with the gold wrapped in
``\boxed{}`` as verl does.

A gold containing ``\boxed{}`` or ``####`` (e.g. a full GSM8K solution) is reduced to its
boxed / ``####`` answer first (adjacent boxes, ``\boxed{1}, \boxed{2}``, make a list); a
long gold without them (a whole solution) to its last ``Answer:`` / ``answer is``. A gold
listing labelled values (``AB = 4, CD = 5``) is matched by label, or in order by an
unlabelled list (math-verify alone compares such lists as sets: ``5, 4`` would pass).

**Time bound.** The rule-based work is linear in the (capped) input and ``timeout_s`` is a
cooperative deadline checked between stages; a math-verify comparison runs in a worker
thread waited for the remaining time (works from any thread; math-verify's
``signal.alarm`` timeouts are off). Past the deadline the verifier returns reward 0 with
``error="timeout: ..."``. Importing math-verify (first symbolic call, ~0.5 s) is not
charged to the deadline; :func:`warm_up` does it ahead of time.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
from concurrent.futures import ThreadPoolExecutor
import math
import re
import time
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Callable, Iterable

from . import symbolic

__all__ = [
    "MAX_RESPONSE_CHARS",
    "REWARD_FUNCTIONS",
    "STRICT_REWARDS",
    "VerifierResult",
    "asks_for_marker",
    "extract_answer",
    "format_reward",
    "get_reward_fn",
    "is_numeric_gold",
    "register_reward",
    "resolve_reward_name",
    "safe_reward",
    "score_batch",
    "verify_gsm8k",
    "verify_math",
    "verify_math500",
    "verify_math_strict",
    "verify_math_verify",
    "warm_up",
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
FEEDBACK_TRUNCATED = "truncated response: it stops mid-sentence after the final answer"
FEEDBACK_OPEN_BOX = "truncated response: an unfinished \\boxed{ after the final answer"
_MARKER_TEXT = {"boxed": "\\boxed{...}", "hash": "'#### ...'", "answer": "'Answer: ...'"}


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
        ``"last_number"``, ``"last_math"``) or ``None``.
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

    def extend(self, seconds: float) -> None:
        if self.end is not None:
            self.end += seconds

    def remaining(self) -> float | None:
        return None if self.end is None else self.end - time.monotonic()


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
_ANSWER_RE = re.compile(r"(?<![A-Za-z])answer\**(?:\s{0,10}is\b\s{0,10}:?|\s{0,10}:)", re.IGNORECASE)
_SKIP_RE = re.compile(r"[\s*]*")
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)")

_LAST_NUM_RE = re.compile(
    r"(?<![0-9A-Za-z_.\\])(?:"
    r"[-+]?\\[dt]?frac\{[^{}]{1,50}\}\{[^{}]{1,50}\}"
    r"|[-+]?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+|(?=\.[0-9]))(?:\.[0-9]+)?"
    r"(?:\s?/\s?[0-9]+(?:\.[0-9]+)?)?(?:\s?\\?%)?"
    r")"
)
# what may follow a standalone number glued to it: a LaTeX command that is not an operator
_GLUED_CMD_RE = re.compile(r"\\(?:text|mathrm|mbox|textbf|operatorname|[,;:! )\]$%]|q?quad)")
_WORD_BEFORE_RE = re.compile(r"(?:([A-Za-z]+)\s+)?([A-Za-z]+)\s*$")
_WORD_OPERATORS = frozenset({"times", "plus", "minus", "over", "x", "dividedby", "multipliedby"})
_OPERATOR_CMD_RE = re.compile(r"\\(?:times|cdot|div|pm|mp|frac|dfrac|tfrac|sqrt)(?![A-Za-z])")
_SPECIAL_TOKEN_RE = re.compile(r"<\|[a-z_]{2,24}\|>")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$\$?")

# a number at the start of a prose segment, followed by words or punctuation
_LEAD_NUM_RE = re.compile(
    r"(?P<tok>[-+]?\$?(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?"
    r"(?:\s?/\s?[0-9]+(?:\.[0-9]+)?)?(?:\s?\\?%)?\$?)"
    r"(?:(?:\s*[,;:!?)]\s*|\s+)(?P<word>[A-Za-z]+)|\s*(?P<paren>\())"
)
_VAR = (r"(?:[A-Za-z]|\\(?:alpha|beta|gamma|delta|epsilon|theta|lambda|mu|phi|varphi|psi|"
        r"omega|sigma|rho|tau|eta|xi|zeta|kappa|nu|chi)(?![A-Za-z]))"
        r"(?:_\{?[A-Za-z0-9]{1,4}\}?)?(?:\s*\(\s*[A-Za-z]\s*\))?")
_VAR_LHS_RE = re.compile(r"\s*(?:" + _VAR + r"|\(\s*" + _VAR + r"(?:\s*,\s*" + _VAR
                         + r")+\s*\))\s*")
# the left side of "lhs = <number>" in a response that may be dropped: a short expression
_EXPR_LHS_RE = re.compile(r"[^=$]{1,60}")
_APPROX_RE = re.compile(r"\\approx(?![A-Za-z])|≈")
_DIGIT_RUN_RE = re.compile(r"[0-9](?:[0-9,.]*[0-9])?")
_BOUND_RE = re.compile(r"(?i)(?<![A-Za-z])(?:not|no|never|neither|nor|except|without|cannot|"
                       r"isn't|aren't|wasn't|can't|least|most|more|less|fewer|greater|up to|"
                       r"approximately|about|around|roughly|nearly|almost|over|under|between)"
                       r"(?![A-Za-z])")
_QUAD_RE = re.compile(r"\\q?quad(?![A-Za-z])")
_LIST_AND_RE = re.compile(r"\\text\s*\{\s*and\s*\}|(?<![A-Za-z\\])and(?![A-Za-z])")
_SUBSCRIPT_RE = re.compile(r"_\{[^{}]*\}|_[A-Za-z0-9]")
_ALGEBRA_LHS_RE = re.compile(r"[+\-^]|[0-9]\s*[A-Za-z]|\\(?:frac|sqrt|cdot|times)(?![A-Za-z])"
                             r"(?=.*[a-z])")
_SINGLE_LETTER_RE = re.compile(r"(?<![A-Za-z\\])[A-Za-z](?![A-Za-z])")
_ALGEBRA_CHARS = "0123456789+-*/^()=_{}"

# LaTeX clean-up
_DFRAC_RE = re.compile(r"\\[dtc]frac(?![A-Za-z])")
_LEFTRIGHT_RE = re.compile(r"\\(?:left|right|displaystyle|textstyle|big|Big|bigl|bigr|Bigl|Bigr)(?![A-Za-z])")
_DELIM_RE = re.compile(r"\\[()\[\]]")
_SPACING_RE = re.compile(r"\\[!,;: ]|~")
_TEXT_RE = re.compile(r"\\(?:text|textbf|textit|textrm|textsf|textup|textnormal|mathrm|mathbf|mathit"
                      r"|mathsf|mbox|operatorname)\s*\{([^{}]*)\}")
_MOD_RE = re.compile(r"\\pmod\s*\{[^{}]*\}|\\pmod\s*[0-9]+|\(\s*\\?mod\s*[0-9]+\s*\)")
_DEGREE_RE = re.compile(r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|\\circ|\\degree|°)\s*(?:[CF](?![A-Za-z]))?")
_UNIT_POWER_RE = re.compile(r"(?<=[A-Za-z])\s*\^\s*\{?\s*[23]\s*\}?")
_FRAC_RE = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\frac\s*(?:([0-9])\s*([0-9])|([0-9])\s*\{([^{}]*)\}|\{([^{}]*)\}\s*([0-9]))")
_THOUSANDS_LATEX_RE = re.compile(r"(?<=[0-9]),\\!\s*(?=[0-9]{3})")
_PAREN_NUM_RE = re.compile(r"\(\s*([-+]?\s?(?:" + _NUM + r"))\s*\)")
_WS_RE = re.compile(r"\s+")
_CHOICE_RE = re.compile(r"\(([a-z])\)")

# hedges
_HEDGE_WORDS = r"or|either|maybe|possibly|perhaps|alternatively"
_HEDGE_RE = re.compile(r"(?i)(?<![A-Za-z\\])(?:" + _HEDGE_WORDS + r")(?![A-Za-z])"
                       r"|\\(?:lor|vee|pm|mp)(?![A-Za-z])|[±∓]")
_HEDGE_AFTER_RE = re.compile(r"(?i)(?<![A-Za-z\\])(?:" + _HEDGE_WORDS + r"|could\s+(?:also\s+)?be"
                             r"|might\s+(?:also\s+)?be)(?![A-Za-z])(?=.*?(?:[0-9]|\\boxed|\$))")
_HEDGE_BEFORE_RE = re.compile(r"(?i)(?<![A-Za-z\\])(?:" + _HEDGE_WORDS + r")"
                              r"[\s$*:(]*(?:\\[(\[])?[\s$]*(?:\\(?:boxed|fbox)\s*\{)?\s*$")
# what may separate two boxed answers that are one final answer list
_CONNECTOR_RE = re.compile(r"(?i)(?:\s|[$,;&/*()]|\\[()\[\],;!: ]|\\\\|\\q?quad(?![A-Za-z])"
                           r"|\\text\s*\{\s*(?:and|or|,)?\s*\}|(?<![A-Za-z])(?:and|or|either)"
                           r"(?![A-Za-z]))*")
_MULTI_GOLD_RE = re.compile(r"(?i)(?<![A-Za-z\\])(?:or|and)(?![A-Za-z])|\\(?:pm|mp)(?![A-Za-z])|[±∓]")

# numeric expressions a numeric gold may be compared with through math-verify
_CLOSED_CMD_RE = re.compile(r"\\(?:[dt]?frac|sqrt|times|cdot|div|left|right|pi)(?![A-Za-z])"
                            r"|\\[!,;: %]")
_CLOSED_CHARS_RE = re.compile(r"[0-9\s+\-*/^(){}.!%×÷·−]*")

_MULTIPLIER_AFTER_RE = re.compile(r"[ \t]+(?:hundred|thousand|million|billion|trillion|dozen)s?"
                                  r"(?![A-Za-z])", re.IGNORECASE)
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
_MULTIPLIERS = {"hundred": 100, "hundreds": 100, "thousand": 10**3, "thousands": 10**3,
                "million": 10**6, "millions": 10**6, "billion": 10**9, "billions": 10**9,
                "trillion": 10**12, "trillions": 10**12, "dozen": 12, "dozens": 12}


def _unit_table() -> dict[str, str]:
    groups = {
        "mm": "mm millimeter millimeters millimetre millimetres",
        "cm": "cm centimeter centimeters centimetre centimetres",
        "m": "m meter meters metre metres",
        "km": "km kilometer kilometers kilometre kilometres",
        "in": "in inch inches",
        "ft": "ft foot feet",
        "yd": "yd yard yards",
        "mi": "mi mile miles",
        "mg": "mg milligram milligrams",
        "g": "g gram grams",
        "kg": "kg kilogram kilograms",
        "lb": "lb lbs pound pounds",
        "oz": "oz ounce ounces",
        "ml": "ml milliliter milliliters millilitre millilitres",
        "l": "l liter liters litre litres",
        "s": "s sec secs second seconds",
        "min": "min mins minute minutes",
        "h": "h hr hrs hour hours",
        "day": "day days",
        "week": "week weeks",
        "month": "month months",
        "year": "year years",
        "cent": "cent cents",
        "dollar": "dollar dollars",
        "mph": "mph",
    }
    return {w: canon for canon, words in groups.items() for w in words.split()}


_UNITS = _unit_table()


# ----------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class _Num:
    value: Fraction
    pct: bool
    unit: str | None = None  # canonical unit when known (``"cm"``, ``"h"``), else None
    decimals: int = 0  # digits after the decimal point as written (0: not a plain decimal)


@dataclass(frozen=True)
class _Answer:
    number: _Num | None
    norm: str
    start: int
    end: int
    lhs: str | None = None  # normalised left side of a dropped ``var = `` prefix


@dataclass(frozen=True)
class _Gold:
    answer: _Answer
    text: str  # the gold answer as compared symbolically (the `=`-reduced part)
    multi: bool  # several values (top-level comma, "or", \pm): hedge rules do not apply


def _short_frac(m: re.Match) -> str:
    num, den = [g for g in m.groups() if g is not None]
    return f" ({num})/({den}) "


def _clean_latex(s: str) -> str:
    s = s.replace("\u2212", "-")
    s = _THOUSANDS_LATEX_RE.sub(",", s)  # 32,\! 349
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
    s = _MOD_RE.sub(" ", s)
    for _ in range(8):
        new = _FRAC_SHORT_RE.sub(_short_frac, _FRAC_RE.sub(r" (\1)/(\2) ", s))
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


_SMALL_NUMBERS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate(
    "twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_NUMBER_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z -]{0,79}")


def _words_to_int(s: str) -> int | None:
    """``"forty-two"`` -> 42, ``"one hundred and five"`` -> 105; ``None`` if ``s`` is not
    only number words."""
    total = current = 0
    seen = False
    for w in re.split(r"[\s-]+", s.lower().strip()):
        if w in _SMALL_NUMBERS:
            current += _SMALL_NUMBERS[w]
        elif w in _TENS:
            current += _TENS[w]
        elif w == "hundred" and seen:
            current *= 100
        elif w in ("thousand", "million", "billion") and seen:
            total += current * _MULTIPLIERS[w]
            current = 0
        elif w == "and" and seen:
            continue
        else:
            return None
        seen = True
    return total + current if seen else None


def _to_fraction(num: str) -> Fraction | None:
    digits = num.replace(",", "").rstrip(".")
    if not digits or len(digits) > MAX_DIGITS:
        return None
    return Fraction(digits)


def _parse_number(raw: str) -> _Num | None:
    """Parse ``raw`` as one number (with optional %, multiplier and unit words); ``None``
    if it is not."""
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
        words = _words_to_int(s) if _NUMBER_WORDS_RE.fullmatch(s) else None
        return None if words is None else _Num(Fraction(words), False)
    pct = m.group("pct") is not None
    scale, unit_key = 1, None
    unit = m.group("unit")
    if unit is not None:
        words = unit.split()
        if words and words[0].lower() in _MULTIPLIERS and m.group("usp"):
            scale = _MULTIPLIERS[words[0].lower()]
            unit = " ".join(words[1:]) or None
    if unit is not None:
        u = unit.strip().lower()
        if u in _PERCENT_WORDS and not pct:
            pct = True
        elif not _valid_unit(unit, spaced=bool(m.group("usp")) or scale != 1):
            return None
        else:
            unit_key = _UNITS.get(u.rstrip(". "))
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
    num = m.group("num")
    decimals = len(num.split(".")[1]) if "." in num and exp is None and \
        m.group("den") is None and scale == 1 else 0
    return _Num(value * scale, pct, unit_key, decimals)


def _numbers_equal(a: _Num, b: _Num) -> bool:
    if a.unit is not None and b.unit is not None and a.unit != b.unit:
        return False
    if a.pct == b.pct:
        return a.value == b.value
    p, x = (a, b) if a.pct else (b, a)
    return x.value == p.value or x.value == p.value / 100


def _approximates(gold: _Num, ans: _Num) -> bool:
    """``ans`` is a decimal with at least 4 places that rounds or truncates a gold with no
    finite decimal expansion (``0.0833`` for ``1/12``, ``0.6667`` for ``2/3``)."""
    if ans.decimals < 4 or gold.pct or ans.pct or (
            gold.unit is not None and ans.unit is not None and gold.unit != ans.unit):
        return False
    den = gold.value.denominator
    for p in (2, 5):
        while den % p == 0:
            den //= p
    return den != 1 and abs(gold.value - ans.value) < Fraction(1, 10 ** ans.decimals)


def _fast_equal(gold: _Answer, ans: _Answer) -> bool | None:
    """``True``/``False`` when decided without sympy, ``None`` when undecided."""
    if gold.lhs is not None and ans.lhs is not None and gold.lhs != ans.lhs:
        return False
    if gold.number is not None and ans.number is not None:
        return _numbers_equal(gold.number, ans.number) or _approximates(gold.number, ans.number)
    if gold.norm and gold.norm == ans.norm:
        return True
    return None


def _top_level_separator(text: str) -> bool:
    """A ``,`` or ``;`` outside any bracket (``1, 2`` but not ``(1, 2)`` or ``[1, 2)``)."""
    depth = 0
    for c in text:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif c in ",;" and depth == 0:
            return True
    return False


def _closed_numeric(text: str) -> bool:
    """A numeric expression without variables (``2+40``, ``1\\frac{1}{2}``, ``10^6``)."""
    if len(text) > MAX_NUMBER_CHARS or not re.search(r"[0-9]", text):
        return False
    s = _DELIM_RE.sub(" ", text.replace("$", " "))
    s = _CLOSED_CMD_RE.sub(" ", s)
    return _CLOSED_CHARS_RE.fullmatch(s) is not None


def _math_text(text: str) -> str:
    """The mathematical part of an answer segment for math-verify: the contents of its math
    environments if it has any (joined by commas), else the segment itself."""
    contents = [text[s:e].strip() for s, e in _math_envs(text)]
    contents = [c for c in contents if c]
    return ", ".join(contents) if contents else text.strip()


# ----------------------------------------------------------------------------- extraction


def _trim(text: str, s: int, e: int, punct: str = "*.!,;:") -> tuple[int, int]:
    while s < e and (text[s].isspace() or text[s] == "*"):
        s += 1
    while e > s and (text[e - 1].isspace() or text[e - 1] in punct):
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


def _boxes(text: str) -> list[tuple[int, int, int, int]]:
    """Complete boxes with non-empty content: ``(command_start, content_start, content_end,
    closing_brace)`` in order of their command's position."""
    matches = list(_BOXED_RE.finditer(text))
    if not matches:
        return []
    pairs = _match_braces(text)
    out = []
    for m in matches:
        close = pairs.get(m.end() - 1)
        if close is None:
            continue
        s, e = _trim(text, m.end(), close, "*.,;:")  # "!" in a box is a factorial
        if s < e:
            out.append((m.start(), s, e, close))
    return out


def _find_boxed(text: str) -> tuple[str, int, int] | None:
    boxes = _boxes(text)
    if not boxes:
        return None
    _, s, e, _ = boxes[-1]
    return ("boxed", s, e)


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


def _is_operand(text: str, j: int) -> bool:
    """Whether ``text[:j]`` ends with an operand (digit, closing bracket, one-letter
    variable), so that a ``-``/``+`` at ``j`` is a binary operator."""
    c = text[j - 1]
    if c.isdigit() or c in ")}]":
        return True
    if c.isalpha():
        k = j - 1
        while k > 0 and text[k - 1].isalpha():
            k -= 1
        return j - k == 1 and c not in "aAI"
    return False


def _is_bullet(text: str, i: int) -> bool:
    """Whether the ``-``/``+`` at ``i`` starts its line (a list bullet)."""
    k = i
    while k > 0 and text[k - 1] in " \t":
        k -= 1
    return k == 0 or text[k - 1] == "\n"


def _standalone(text: str, s: int, e: int) -> bool:
    """Whether the number ``text[s:e]`` stands on its own: not glued to letters, not inside
    braces or an exponent, not an operand of an arithmetic operator."""
    j = s
    while j > 0 and text[j - 1] in " \t":
        j -= 1
    before = text[j - 1] if j > 0 else ""
    if before and text[s] in "+-" and _is_operand(text, j):
        return False  # "5 -3": a binary minus, not a sign
    if before == "*" and text[j - 2:j - 1] == "*":
        before = "**"  # markdown bold, not a product
    if before and before in "{^_*/×÷·":
        return False
    words = _WORD_BEFORE_RE.search(text[max(0, j - 30):j])
    if words is not None and (words.group(2).lower() in _WORD_OPERATORS or (
            (words.group(1) or "") + words.group(2)).lower() in _WORD_OPERATORS):
        return False  # "3 times 4", "12 divided by 4"
    if before and before in "+-" and not _is_bullet(text, j - 1):
        return False
    if text.endswith(("\\times", "\\cdot", "\\div"), 0, j):
        return False
    if e < len(text):
        nxt = text[e]
        if nxt.isdigit() or nxt in "{}^_":
            return False
        if nxt.isalpha():
            m = re.match(r"[A-Za-z]+", text[e:e + 12])
            if m.group(0).lower() not in _COMPACT_UNITS:
                return False
        if nxt == "\\" and not _GLUED_CMD_RE.match(text, e):
            return False
        rest = text[e:e + 12].lstrip(" \t")
        if rest.startswith("**"):
            rest = ""
        if rest[:1] in ("+", "*", "/", "×", "÷", "·", "^", "=") or (
                rest[:1] == "-" and rest[1:].lstrip()[:1].isdigit()) or _OPERATOR_CMD_RE.match(rest):
            return False
    return True


def _find_last_number(text: str) -> tuple[str, int, int] | None:
    """The last number of the text if it stands on its own; an earlier number is never
    used instead (the text went on after it)."""
    last = None
    for last in _LAST_NUM_RE.finditer(text):
        pass
    if last is None:
        return None
    s, e = last.start(), last.end()
    mult = _MULTIPLIER_AFTER_RE.match(text, e)
    if mult is not None:  # "2.5 million" is one number
        if _standalone(text, s, mult.start()):
            return ("last_number", s, mult.end())
        s += text[s] in "+-"
        return ("last_number", s, mult.end()) if _standalone(text, s, mult.start()) else None
    if _standalone(text, s, e):
        return ("last_number", s, e)
    if text[s] in "+-" and _standalone(text, s + 1, e):
        return ("last_number", s + 1, e)
    return None


def _math_envs(text: str) -> list[tuple[int, int]]:
    """Content spans of the math environments ``$$..$$``, ``$..$``, ``\\(..\\)``,
    ``\\[..\\]`` (``$`` paired left to right; an unpaired last ``$`` opens nothing)."""
    spans = []
    opened: tuple[int, str] | None = None
    for m in _UNESCAPED_DOLLAR_RE.finditer(text):
        if opened is None:
            opened = (m.end(), m.group(0))
        elif m.group(0) == opened[1] or len(m.group(0)) > len(opened[1]):
            spans.append((opened[0], m.start()))
            opened = None
    for left, right in (("\\(", "\\)"), ("\\[", "\\]")):
        pos = 0
        while True:
            i = text.find(left, pos)
            if i == -1:
                break
            j = text.find(right, i + 2)
            if j == -1:
                break
            spans.append((i + 2, j))
            pos = j + 2
    return sorted(spans)


def _find_last(text: str) -> tuple[str, int, int] | None:
    """Lenient fallback: the last standalone number, or the last math environment if it
    ends later (``$x = \\frac{1+\\sqrt{5}}{2}$``)."""
    number = _find_last_number(text)
    envs = [(s, e) for s, e in _math_envs(text) if text[s:e].strip()]
    if envs:
        s, e = _trim(text, *envs[-1])
        if s < e and (number is None or e >= number[2]):
            return ("last_math", s, e)
    return number


_MARKER_FINDERS = {"boxed": _find_boxed, "hash": _find_hash, "answer": _find_answer_marker}
_FINDERS = (_find_boxed, _find_hash, _find_answer_marker, _find_last)
ALL_MARKERS = ("boxed", "hash", "answer")


def _locate(text: str, deadline: _Deadline, finders=_FINDERS) -> tuple[str, int, int] | None:
    for finder in finders:
        deadline.check()
        found = finder(text)
        if found is not None:
            return found
    return None


def _make_answer(text: str, s: int, e: int, number: _Num | None,
                 lhs: str | None = None) -> _Answer:
    return _Answer(number, _normalise_string(text[s:e]), s, e, lhs)


def _interpret(text: str, s: int, e: int, *, prose: bool, gold: bool,
               deadline: _Deadline, depth: int = 0) -> _Answer:
    """Turn the located segment ``text[s:e]`` into an answer (number or string) and its span."""
    seg = text[s:e]
    num = _parse_number(seg)
    if num is not None:
        return _make_answer(text, s, e, num)
    deadline.check()
    if prose:
        m = _LEAD_NUM_RE.match(seg)
        if m is not None:
            word = (m.group("word") or "").lower()
            if m.group("paren"):  # "9 (not 6 as I said)"
                num = _parse_number(m.group("tok"))
                if num is not None:
                    ts, te = _trim(text, s + m.start("tok"), s + m.end("tok"))
                    return _make_answer(text, ts, te, num)
            elif word in _MULTIPLIERS:
                num = _parse_number(m.group("tok") + " " + word)
                if num is not None:
                    ts, te = _trim(text, s + m.start("tok"), s + m.end("word"))
                    return _make_answer(text, ts, te, num)
            elif word not in _UNIT_STOPWORDS:
                num = _parse_number(m.group("tok"))
                if num is not None:
                    ts, te = _trim(text, s + m.start("tok"), s + m.end("tok"))
                    return _make_answer(text, ts, te, num)
    approx = _APPROX_RE.search(seg) if depth < 4 else None
    if approx is not None:  # "x \approx 11" -> 11; "1/3 \approx 0.33" -> 1/3 (the exact value)
        left = _strip_delims(seg[:approx.start()])
        if not left.strip() or _VAR_LHS_RE.fullmatch(left):
            ts, te = _trim(text, s + approx.end(), e)
        else:
            ts, te = _trim(text, s, s + approx.start())
        if ts < te:
            return _interpret(text, ts, te, prose=prose, gold=gold, deadline=deadline,
                              depth=depth + 1)
    eqs = _equals_signs(seg)
    if eqs and not _top_level_separator(_strip_delims(seg)) \
            and not _MULTI_GOLD_RE.search(seg):  # "x = 5", "z = 1 + 1 = 2"; not lists
        rs, re_ = _trim(text, s + eqs[-1] + 1, e)
        while rs < re_ and text[re_ - 1] == "$" and text.count("$", rs, re_) % 2:
            re_ -= 1  # "$x = 5$": the closing $ belongs to the left side's opening one
        if rs < re_:
            first = _strip_delims(seg[:eqs[0]])
            num = _parse_number(text[rs:re_])
            if _VAR_LHS_RE.fullmatch(first):
                return _make_answer(text, rs, re_, num, _normalise_string(first))
            sides = [_strip_delims(seg[a + 1:b]) for a, b in zip([-1, *eqs[:-1]], eqs)]
            if not gold and num is not None and all(
                    _EXPR_LHS_RE.fullmatch(p) and not _HEDGE_RE.search(p) and "," not in p
                    and not _has_variable(p) for p in sides):
                return _make_answer(text, rs, re_, num)
    if prose and not _BOUND_RE.search(seg) and len(_DIGIT_RUN_RE.findall(seg)) == 1:
        found = _find_last_number(seg)  # "The volume of $ABCD$ is 120": its one number
        if found is not None:
            num = _parse_number(seg[found[1]:found[2]])
            if num is not None:
                return _make_answer(text, s + found[1], s + found[2], num)
    return _make_answer(text, s, e, None)


def _strip_delims(text: str) -> str:
    return _DELIM_RE.sub("", text).replace("$", "")


def _equals_signs(text: str) -> list[int]:
    """Positions of the ``=`` outside brackets and not part of ``<=``, ``>=``, ``!=``, ``\\=``
    (``\\sum_{k=0}`` has none)."""
    out, depth = [], 0
    for i, c in enumerate(text):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth = max(0, depth - 1)
        elif c == "=" and depth == 0 and i > 0 and text[i - 1] not in "<>!\\":
            out.append(i)
    return out


def _split_top_level(text: str) -> list[str]:
    """``text`` split at its top-level ``,``/``;`` and ``and``/``\\text{ and }``."""
    text = _SPACING_RE.sub(" ", _QUAD_RE.sub(" ", _LIST_AND_RE.sub(",", text)))
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c in "{([":
            depth += 1
        elif c in "})]":
            depth = max(0, depth - 1)
        elif c in ",;" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _assignments(text: str) -> list[tuple[str, str]] | None:
    """``AB = 4, CD = 5`` -> ``[("ab", "4"), ("cd", "5")]``: two or more assignments to
    distinct labels; ``None`` otherwise."""
    parts = _split_top_level(_strip_delims(text))
    if len(parts) < 2:
        return None
    out = []
    for part in parts:
        eqs = _equals_signs(part)
        if len(eqs) != 1:
            return None
        lhs, rhs = part[:eqs[0]].strip(), part[eqs[0] + 1:].strip()
        if not lhs or not rhs or _ALGEBRA_LHS_RE.search(_SUBSCRIPT_RE.sub("", lhs)):
            return None
        out.append((_normalise_string(lhs), rhs))
    return out if len({k for k, _ in out}) == len(out) else None


def _algebraic_equation(text: str) -> bool:
    """An equation whose left side is algebra (``2x + z = 1``, ``x^2+y^2=25``), not a
    label (``AB = 4``, ``V_1:V_2 = 11:21``) or a variable (``x = 5``)."""
    eqs = _equals_signs(text)
    if not eqs:
        return False
    lhs = _SUBSCRIPT_RE.sub("", _strip_delims(text[:eqs[0]]))
    return _ALGEBRA_LHS_RE.search(lhs) is not None


def _has_variable(expr: str) -> bool:
    """Whether ``expr`` has a one-letter variable next to a digit, an operator or its end
    (``2x + z``; not the article in ``cost for a week``)."""
    for m in _SINGLE_LETTER_RE.finditer(expr):
        before = expr[:m.start()].rstrip()[-1:]
        after = expr[m.end():].lstrip()[:1]
        if not before or not after or before in _ALGEBRA_CHARS or after in _ALGEBRA_CHARS:
            return True
    return False


def _is_equation(text: str) -> bool:
    """A top-level ``=`` (see :func:`_equals_signs`)."""
    return bool(_equals_signs(text))


def _window(text: str) -> tuple[str, int]:
    offset = max(0, len(text) - MAX_RESPONSE_CHARS)
    return text[offset:], offset


def _coerce_response(response: Any) -> str:
    """The response as text, cut at the first chat special token (``<|im_end|>``,
    ``<|im_start|>``, ``<|endoftext|>``...): what follows is not the response."""
    if response is None:
        return ""
    if isinstance(response, str):
        special = _SPECIAL_TOKEN_RE.search(response)
        return response if special is None else response[:special.start()]
    if isinstance(response, (bytes, bytearray)):
        return _coerce_response(bytes(response).decode("utf-8", errors="replace"))
    raise TypeError(f"response must be a str, got {type(response).__name__}")


def _gold_answer(gold: Any, deadline: _Deadline) -> _Gold:
    if gold is None:
        raise ValueError("gold answer is None")
    if isinstance(gold, (int, float, Fraction)) and not isinstance(gold, bool):
        gold = str(gold)
    if not isinstance(gold, str):
        raise TypeError(f"gold must be a str or a number, got {type(gold).__name__}")
    text, _ = _window(gold)
    has_box = "\\boxed" in text or "\\fbox" in text
    if has_box or "####" in text:
        group = _box_group(text) if has_box else []
        if len(group) > 1:  # "\boxed{1}\boxed{2}": one list of answers
            text = ", ".join(text[a:b] for a, b in group)
            s, e = 0, len(text)
        else:
            found = (_find_boxed(text) if has_box else None) or _find_hash(text)
            if found is None:
                raise ValueError("gold answer has a \\boxed{} / #### marker but no answer in it")
            _, s, e = found
    else:
        s, e = _trim(text, 0, len(text))
        if e - s > 80 or "\n" in text[s:e]:  # a whole solution: its "answer is" / "Answer:"
            found = _find_answer_marker(text)
            if found is not None:
                _, s, e = found
    if s >= e:
        raise ValueError("gold answer is empty")
    ans = _interpret(text, s, e, prose=False, gold=True, deadline=deadline)
    if ans.number is None and not ans.norm:
        raise ValueError("gold answer is empty after normalisation")
    reduced = text[ans.start:ans.end]
    grouped = _clean_latex(reduced).replace("\\{", "(").replace("\\}", ")")
    multi = ans.number is None and (
        _top_level_separator(grouped.replace("{", "").replace("}", ""))
        or _MULTI_GOLD_RE.search(reduced) is not None)
    return _Gold(ans, _math_text(reduced), multi)


# ----------------------------------------------------------------------------- checks


def _box_group(text: str) -> list[tuple[int, int]]:
    """Content spans of the last boxed answer and of the boxed answers right before it that
    are joined to it only by connectors (``,``, ``and``, ``or``, ``$``...): one list of
    final answers. A box enclosing the last one is not part of it."""
    boxes = _boxes(text)
    if len(boxes) < 2:
        return [boxes[-1][1:3]] if boxes else []
    cmd, s, e, close = boxes[-1]
    group = [(s, e)]
    for _ in range(8):
        prev = [b for b in boxes if b[3] < cmd]
        if not prev:
            break
        pcmd, ps, pe, pclose = max(prev, key=lambda b: b[3])
        between = text[pclose + 1:cmd]
        if len(between) > 60 or _CONNECTOR_RE.fullmatch(between) is None:
            break
        group.insert(0, (ps, pe))
        cmd = pcmd
    return group


def _answer_end(text: str, method: str, e: int) -> int:
    """Where the answer's marker ends: after the closing brace of a box, else ``e``."""
    if method == "boxed":
        close = text.find("}", e)
        return len(text) if close == -1 else close + 1
    return e


def _hedged(text: str, method: str, s: int, e: int) -> bool:
    """An alternative answer inside the segment, right after it on its line, or a hedge
    word right before it."""
    if _HEDGE_RE.search(text, s, e):
        return True
    end = _answer_end(text, method, e)
    line_end = text.find("\n", end)
    tail = text[end:min(len(text) if line_end == -1 else line_end, end + 120)]
    if _HEDGE_AFTER_RE.search(tail):
        return True
    if method != "boxed":
        return False
    line_start = text.rfind("\n", 0, s) + 1
    return _HEDGE_BEFORE_RE.search(text[max(line_start, s - 60):s]) is not None


_TERMINAL = ".!?)]}$*\"'`”’"


def _truncated(text: str, method: str, e: int) -> str | None:
    """Why the response looks cut off after its marked answer (feedback), or ``None``."""
    end = _answer_end(text, method, e)
    tail = text[end:]
    if _BOXED_RE.search(tail) or tail.count("\\[") > tail.count("\\]") \
            or tail.count("\\(") > tail.count("\\)"):
        return FEEDBACK_OPEN_BOX if _BOXED_RE.search(tail) else FEEDBACK_TRUNCATED
    stripped = tail.strip()
    if not stripped or stripped[-1] in _TERMINAL:
        return None
    if "\n" not in stripped and len(stripped.split()) <= 3 and not re.search(r"[0-9=]", stripped):
        return None  # "\boxed{12} apples"
    return FEEDBACK_TRUNCATED


def is_numeric_gold(gold: Any) -> bool:
    """Whether ``gold`` (after ``\\boxed{}`` / ``####`` reduction) is a single number, i.e.
    goes to the fast numeric path; raises like :func:`verify_math` for a bad gold."""
    return _gold_answer(gold, _Deadline(None)).answer.number is not None


def extract_answer(response: str | None) -> tuple[str, tuple[int, int], str] | None:
    """The final answer located in ``response``: ``(text, (start, end), method)`` or ``None``.

    This is the raw located segment (before the prose / ``=`` refinement that
    :func:`verify_math` applies), found as in lenient mode.
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


def _timeout_result(timeout_s: float | None, extracted: str | None = None,
                    span: tuple[int, int] | None = None,
                    method: str | None = None) -> VerifierResult:
    return VerifierResult(0.0, False, extracted, span, FEEDBACK_TIMEOUT,
                          error=f"timeout: verification exceeded {timeout_s} s", method=method)


def warm_up() -> float:
    """Import math-verify (and sympy) now instead of on the first symbolic answer; returns
    the seconds it took. Optional: the import is never charged to a verifier's deadline."""
    return symbolic.load()


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
    """The registered reward function ``name``, or a user's ``module:function`` (imported,
    then registered under that name); ``ValueError`` naming the nearest otherwise."""
    fn = REWARD_FUNCTIONS.get(name) if isinstance(name, str) else None
    if fn is not None:
        return fn
    if isinstance(name, str) and ":" in name:
        return _import_reward(name)
    registered = sorted(REWARD_FUNCTIONS)
    nearest = difflib.get_close_matches(str(name), registered, n=1, cutoff=0.0)
    hint = f"; did you mean {nearest[0]!r}?" if nearest else ""
    raise ValueError(f"unknown reward function {name!r}{hint} "
                     f"(registered: {', '.join(registered) or 'none'})")


def _import_reward(spec: str) -> RewardFn:
    """``reward.name=module:function``: ``fn(response, gold, **kw)`` returning a float in
    [0, 1] or a :class:`VerifierResult`, from an importable module (e.g. a file on
    ``PYTHONPATH``). Looked up by name, so every process of a run imports the same one."""
    module_name, _, attr = spec.partition(":")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward {spec!r}: cannot import {attr!r} from module "
                         f"{module_name!r} ({_describe(exc)})") from None
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not a function")
    REWARD_FUNCTIONS[spec] = fn
    return fn


# ----------------------------------------------------------------------------- rewards


def _values_equal(gold: str, answer: str, deadline: _Deadline) -> bool:
    """One value of a list: the fast path, else math-verify (may raise SymbolicTimeout)."""
    g = _interpret(gold, 0, len(gold), prose=False, gold=True, deadline=deadline)
    a = _interpret(answer, 0, len(answer), prose=False, gold=False, deadline=deadline)
    verdict = _fast_equal(g, a)
    if verdict is not None:
        return verdict
    return symbolic.symbolic_equal(gold, answer, timeout_s=deadline.remaining())


def _wrong_feedback(gold: _Gold, ans: _Answer, extracted: str, evaluated: bool = False) -> str:
    if gold.answer.number is not None and ans.number is None and not evaluated:
        return f"expected a number, got '{_short(extracted)}'"
    if gold.answer.number is not None:
        return f"wrong value: got {_short(extracted)}"
    return f"wrong answer: got '{_short(extracted)}'"


def _verify(response: Any, gold: Any, *, timeout_s: float | None, strict: bool,
            markers: tuple[str, ...] = ALL_MARKERS,
            numeric_gold: bool = False) -> VerifierResult:
    deadline = _Deadline(timeout_s)
    text = _coerce_response(response)
    try:
        g = _gold_answer(gold, deadline)
        if numeric_gold and g.answer.number is None:
            raise ValueError("gold answer is not a number (this reward expects numeric golds)")
        deadline.check()
        window, offset = _window(text)
        finders = tuple(_MARKER_FINDERS[m] for m in markers) if strict else _FINDERS
        found = _locate(window, deadline, finders)
        if found is None:
            if strict:
                wanted = " or ".join(_MARKER_TEXT[m] for m in markers)
                return VerifierResult(0.0, False, None, None, f"no final-answer marker ({wanted})")
            return VerifierResult(0.0, False, None, None, FEEDBACK_NO_ANSWER)
        method, s, e = found
        group = _box_group(window) if method == "boxed" else []
        if len(group) > 1 and len({_normalise_string(window[a:b]) for a, b in group}) > 1:
            s, e = group[0][0], group[-1][1]
            ans = _make_answer(window, s, e, None)
        else:
            group = []
            ans = _interpret(window, s, e, prose=method in ("hash", "answer"), gold=False,
                             deadline=deadline)
        deadline.check()
    except _VerifierTimeout:
        return _timeout_result(timeout_s)

    extracted = window[ans.start:ans.end]
    span = (offset + ans.start, offset + ans.end)

    def result(ok: bool, feedback: str) -> VerifierResult:
        return VerifierResult(float(ok), ok, extracted, span, feedback, method=method)

    if strict or method in ("last_number", "last_math"):
        # strict: no truncated response; lenient: an unmarked number followed by an
        # unfinished sentence is not a final answer either
        why = _truncated(window, method, group[-1][1] if group else
                         e if method == "boxed" else ans.end)
        if why is not None:
            return result(False, why)
    if not g.multi and (group or _hedged(window, method, s, e)):
        return result(False, f"more than one final answer: '{_short(window[s:e])}'")

    equation_gold = g.answer.lhs is None and _algebraic_equation(g.text)
    verdict = None if group else _fast_equal(g.answer, ans)
    if verdict is None and equation_gold and not _is_equation(window[s:e]):
        verdict = False  # "2x + z = 1" is not answered by "1"
    if verdict is not None:
        return result(verdict, FEEDBACK_CORRECT if verdict else _wrong_feedback(g, ans, extracted))
    if g.answer.number is not None and (method == "last_number"
                                        or not _closed_numeric(extracted)):
        return result(False, _wrong_feedback(g, ans, extracted))

    try:  # math-verify, bounded by what is left of the deadline (its import is free)
        deadline.extend(symbolic.load())
        gold_pairs = _assignments(g.text)
        if gold_pairs is not None:  # "AB = 4, CD = 5": by label, or in order if unlabelled
            located = ", ".join(window[a:b] for a, b in group) if group \
                else _math_text(window[s:e])
            ans_pairs = _assignments(located)
            if ans_pairs is not None:
                ans_values = dict(ans_pairs)
                pairs = [(v, ans_values.get(k)) for k, v in gold_pairs]
            else:
                values = _split_top_level(located)
                ok_shape = len(values) == len(gold_pairs) and not any(map(_is_equation, values))
                pairs = list(zip([v for _, v in gold_pairs], values)) if ok_shape else [("", None)]
            ok = all(a is not None and _values_equal(gv, a, deadline) for gv, a in pairs)
        else:
            answer_text = (", ".join(window[a:b] for a, b in group) if group
                           else _math_text(window[s:e] if equation_gold else extracted))
            ok = symbolic.symbolic_equal(g.text, answer_text, timeout_s=deadline.remaining())
    except (symbolic.SymbolicTimeout, _VerifierTimeout):
        return _timeout_result(timeout_s, extracted, span, method)
    except ImportError as exc:
        return VerifierResult(0.0, False, extracted, span, FEEDBACK_ERROR,
                              error=_truncate(f"math-verify is not installed: {exc}"),
                              method=method)
    except Exception as exc:  # math-verify catches its own; anything else is reported
        return VerifierResult(0.0, False, extracted, span, FEEDBACK_ERROR,
                              error=_describe(exc), method=method)
    return result(ok, FEEDBACK_CORRECT if ok else _wrong_feedback(g, ans, extracted, True))


@register_reward("math")
def verify_math(response: str | None, gold: Any, *, timeout_s: float | None = 1.0,
                strict: bool = False) -> VerifierResult:
    """Check the final answer in ``response`` against ``gold`` (see the module docstring):
    the combined verifier, lenient unless ``strict``.

    Never raises because of the response content; raises ``ValueError``/``TypeError`` for
    an empty/None/ill-typed gold or a negative ``timeout_s``. ``timeout_s=None`` disables
    the deadline.
    """
    return _verify(response, gold, timeout_s=timeout_s, strict=strict)


@register_reward("math_strict")
def verify_math_strict(response: str | None, gold: Any, *,
                       timeout_s: float | None = 1.0) -> VerifierResult:
    """:func:`verify_math` in strict mode: a ``\\boxed{}``, ``####`` or ``Answer:`` marker
    is required and truncated responses get 0."""
    return _verify(response, gold, timeout_s=timeout_s, strict=True)


@register_reward("gsm8k")
def verify_gsm8k(response: str | None, gold: Any, *,
                 timeout_s: float | None = 1.0) -> VerifierResult:
    """GSM8K: strict mode (``####``, ``Answer:`` or ``\\boxed{}``), and the gold (a number
    or a full solution ending in ``#### <number>``) must be numeric (``ValueError``
    otherwise: a misconfigured answer field shows up as reward errors, not as zeros)."""
    return _verify(response, gold, timeout_s=timeout_s, strict=True, numeric_gold=True)


@register_reward("math500")
def verify_math500(response: str | None, gold: Any, *,
                   timeout_s: float | None = 1.0) -> VerifierResult:
    """MATH / MATH-500 (and AIME, AMC, Minerva, OlympiadBench prompted the same way): strict
    mode with the answer in ``\\boxed{}``; other markers do not count."""
    return _verify(response, gold, timeout_s=timeout_s, strict=True, markers=("boxed",))


@register_reward("math_verify")
def verify_math_verify(response: str | None, gold: Any, *,
                       timeout_s: float | None = 1.0) -> VerifierResult:
    """math-verify alone, as verl calls it: ``verify(parse("\\boxed{gold}"),
    parse(response))`` on the whole response (no span, no hedge or truncation rules).
    For comparisons; ``math`` is the recommended reward."""
    deadline = _Deadline(timeout_s)
    text = _coerce_response(response)
    g = _gold_answer(gold, deadline)
    _, offset = _window(text)
    try:
        deadline.extend(symbolic.load())
        ok = symbolic.math_verify_alone(g.text, text[offset:], timeout_s=deadline.remaining())
    except symbolic.SymbolicTimeout:
        return _timeout_result(timeout_s)
    return VerifierResult(float(ok), ok, None, None, FEEDBACK_CORRECT if ok else "wrong answer")


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


# ----------------------------------------------------------------------------- strict mode

# reward names that are strict by default -> the lenient verifier they fall back to
STRICT_REWARDS = {"math_strict": "math", "gsm8k": "math", "math500": "math"}
_MARKER_ASK_RE = re.compile(r"(?i)\\boxed|####|(?<![A-Za-z])answer\s*:")


def asks_for_marker(prompt_suffix: str | None) -> bool:
    """Whether a prompt instruction asks for a marked final answer (``\\boxed{}``,
    ``####`` or ``Answer:``), e.g. the built-in "Give the final answer after 'Answer:'."."""
    return bool(prompt_suffix) and _MARKER_ASK_RE.search(prompt_suffix) is not None


def resolve_reward_name(name: str, strict: bool | None = None,
                        prompt_suffix: str | None = None) -> str:
    """The registered reward to call for ``reward.name=name`` and ``reward.strict=strict``.

    ``strict=None`` (the default): ``math`` becomes ``math_strict`` when ``prompt_suffix``
    asks for a marked answer (:func:`asks_for_marker`); every other name is used as is
    (``gsm8k``, ``math500`` and ``math_strict`` are strict). ``strict=True``: ``math`` ->
    ``math_strict``; the strict names stay; a custom reward is a ``ValueError`` (strictness
    is a property of the built-in verifiers). ``strict=False``: ``math`` stays lenient and
    every other name is used as is (a strict name asked for explicitly stays strict).
    """
    if strict is None:
        if name == "math" and asks_for_marker(prompt_suffix):
            return "math_strict"
        return name
    if strict:
        if name == "math":
            return "math_strict"
        if name in STRICT_REWARDS:
            return name
        raise ValueError(f"reward.strict=true applies to the built-in math verifiers "
                         f"(math, {', '.join(STRICT_REWARDS)}), not to {name!r}")
    return name


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
    A reward function with a ``parallel_calls`` attribute > 1 (``python_tests``) has that
    many calls in flight at once, in threads; results keep the input order.

    Returns ``(results, num_errors)``. Raises ``ValueError`` only for an unknown reward name
    or mismatched lengths (caller bugs), never because of a response.
    """
    fn = name if callable(name) else get_reward_fn(name)
    responses, golds = list(responses), list(golds)
    if len(responses) != len(golds):
        raise ValueError(f"got {len(responses)} responses but {len(golds)} gold answers")
    if wall_timeout_s is None:
        call = lambda r, g: safe_reward(fn, r, g, **kw)  # noqa: E731
    else:
        call = lambda r, g: _call_bounded(fn, r, g, wall_timeout_s, kw)  # noqa: E731
    # a reward that waits on other processes (python_tests: the sandbox's workers) says
    # how many calls may wait at once
    workers = int(getattr(fn, "parallel_calls", 1))
    if workers > 1 and len(responses) > 1:
        with ThreadPoolExecutor(min(workers, len(responses))) as pool:
            results = list(pool.map(call, responses, golds))
    else:
        results = [call(r, g) for r, g in zip(responses, golds)]
    return results, sum(r.error is not None for r in results)

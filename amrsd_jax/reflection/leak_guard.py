"""Answer-leak guard (docs/methods.md, "AMR-SD", step 3; ours, on by default).

A reflection must nudge, not tell: if it contains the gold final answer as a
token-delimited string, that span is redacted before the teacher sees it, and the
number of redactions is counted for the step's metrics. For a code task (the gold is a
serialised :class:`~amrsd_jax.rewards.python_tests.CodeTests`) every expected value of
its tests is redacted instead (:func:`~amrsd_jax.rewards.python_tests.expected_values`).
"""

from __future__ import annotations

import re

from ..rewards.python_tests import expected_values, is_code_gold, redact_expected

REDACTION = "[redacted]"


def _answer_pattern(answer: str) -> re.Pattern:
    text = answer.strip()
    variants = {text}
    # numbers also leak with thousands separators or a trailing ".0"
    if re.fullmatch(r"-?\d+", text):
        n = int(text)
        variants |= {f"{n:,}", f"{n}.0"}
    alternatives = "|".join(re.escape(v) for v in sorted(variants, key=len, reverse=True))
    # token-delimited: not glued to a letter/digit on either side (so "42" is not found
    # inside "142" or "4.2", but is found in "=42.", "(42)" or "$42")
    return re.compile(rf"(?<![\w.])(?:{alternatives})(?![\w]|\.\d)")


def redact_answer(reflection: str, gold_answer: str) -> tuple[str, int]:
    """Replace every token-delimited occurrence of ``gold_answer``; return (text, count)."""
    if not gold_answer or not gold_answer.strip():
        return reflection, 0
    if is_code_gold(gold_answer):
        return redact_expected(reflection, expected_values(gold_answer))
    return _answer_pattern(gold_answer).subn(REDACTION, reflection)

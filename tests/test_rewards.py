"""Tests for the math verifier, the reward registry and safe scoring.

The new properties of issue #16 (math-verify routing, closed false positives, hedges, strict
mode, thread-safe timeouts) are tested in tests/test_verifier_properties.py and on the
labelled case files in tests/test_verifier_cases.py."""

from __future__ import annotations

import math
import pathlib
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from amrsd_jax.rewards import (
    MAX_RESPONSE_CHARS,
    REWARD_FUNCTIONS,
    VerifierResult,
    extract_answer,
    format_reward,
    get_reward_fn,
    register_reward,
    safe_reward,
    score_batch,
    verify_math,
)


def check_span(response, res):
    """The span must point at exactly the extracted text."""
    if res.extracted is None:
        assert res.answer_span is None
        return
    s, e = res.answer_span
    assert 0 <= s <= e <= len(response)
    assert response[s:e] == res.extracted


# --------------------------------------------------------------------------- correct answers

# (response, gold, expected extracted text, expected method)
CORRECT = [
    # \boxed{}
    (r"So the total is \boxed{42}.", "42", "42", "boxed"),
    (r"\boxed{ 42 }", "42", "42", "boxed"),
    (r"$\boxed{-7}$", "-7", "-7", "boxed"),
    (r"\boxed{\frac{3}{4}}", "3/4", r"\frac{3}{4}", "boxed"),
    (r"\boxed{\dfrac{3}{4}}", "0.75", r"\dfrac{3}{4}", "boxed"),
    (r"\boxed{\tfrac{6}{8}}", "3/4", r"\tfrac{6}{8}", "boxed"),
    (r"\boxed{\frac12}", "0.5", r"\frac12", "boxed"),
    (r"\boxed{-\frac{1}{2}}", "-0.5", r"-\frac{1}{2}", "boxed"),
    (r"\boxed{\frac{-1}{2}}", "-1/2", r"\frac{-1}{2}", "boxed"),
    (r"\boxed{\left( 3 \right)}", "3", r"\left( 3 \right)", "boxed"),
    (r"\boxed{\$1,234.50}", "1234.5", r"\$1,234.50", "boxed"),
    (r"\boxed{12\text{ apples}}", "12", r"12\text{ apples}", "boxed"),
    (r"\boxed{12 \text{cm}^2}", "12", r"12 \text{cm}^2", "boxed"),
    (r"\boxed{3cm}", "3", "3cm", "boxed"),
    (r"\boxed{90^\circ}", "90", r"90^\circ", "boxed"),
    (r"\boxed{50\%}", "50", r"50\%", "boxed"),
    (r"\boxed{50\%}", "0.5", r"50\%", "boxed"),
    (r"\boxed{0.5}", "50%", "0.5", "boxed"),
    (r"\boxed{50 percent}", "50%", "50 percent", "boxed"),
    (r"\boxed{1.5e3}", "1500", "1.5e3", "boxed"),
    (r"\boxed{1.5 \times 10^{3}}", "1500", r"1.5 \times 10^{3}", "boxed"),
    (r"\boxed{x = 5}", "5", "5", "boxed"),
    (r"\boxed{x = \sqrt{2}}", r"\sqrt2", r"\sqrt{2}", "boxed"),
    (r"\boxed{\text{(B)}}", "B", r"\text{(B)}", "boxed"),
    (r"\boxed{(B)}", "b", "(B)", "boxed"),
    (r"\boxed{\sqrt{2}}", r"\sqrt{2}", r"\sqrt{2}", "boxed"),
    (r"\boxed{\text{Monday}}", "monday", r"\text{Monday}", "boxed"),
    (r"\boxed{x^2 + 1}", "x^{2}+1", "x^2 + 1", "boxed"),
    (r"\boxed{12 m^2}", "12", "12 m^2", "boxed"),
    (r"first \boxed{3} then \boxed{5}", "5", "5", "boxed"),
    (r"\boxed{\boxed{8}}", "8", "8", "boxed"),
    (r"\fbox{8}", "8", "8", "boxed"),
    (r"\boxed{+4}", "4", "+4", "boxed"),
    (r"\boxed{12.0}", "12", "12.0", "boxed"),
    (r"\boxed{12.500}", "12.5", "12.500", "boxed"),
    (r"\boxed{.5}", "1/2", ".5", "boxed"),
    (r"\boxed{5.}", "5", "5", "boxed"),
    (r"\boxed{−3}", "-3", "−3", "boxed"),  # U+2212 minus
    (r"\boxed{1{,}000}", "1000", "1{,}000", "boxed"),
    (r"\boxed{1\,000}", "1000", r"1\,000", "boxed"),
    # ####
    ("Natalia sold 48 clips.\n#### 72", "72", "72", "hash"),
    ("#### 1,234", "1234", "1,234", "hash"),
    ("#### $1,234.00", "1234", "$1,234.00", "hash"),
    ("#### -5", "-5", "-5", "hash"),
    ("#### 12 apples", "12", "12 apples", "hash"),
    ("####\n 9", "9", "9", "hash"),
    ("#### 72 because 8*9 = 72", "72", "72", "hash"),
    # Answer: / answer is
    ("Answer: 12", "12", "12", "answer"),
    ("answer: 12.", "12", "12", "answer"),
    ("ANSWER: 12", "12", "12", "answer"),
    ("Thus, the answer is 5 dollars.", "5", "5 dollars", "answer"),
    ("The answer is 42 because 6*7=42.", "42", "42", "answer"),
    ("The answer is 5 since 2+2=4", "5", "5", "answer"),
    ("The answer is 18, which is even.", "18", "18", "answer"),
    ("Answer: x = 5", "5", "5", "answer"),
    ("Answer: 3 + 4 = 7", "7", "7", "answer"),
    ("**Answer:** **42**", "42", "42", "answer"),
    ("The answer is: $\\frac{3}{4}$", "0.75", "$\\frac{3}{4}$", "answer"),
    ("Final Answer: The final answer is $7$. I hope it is correct.", "7", "$7$", "answer"),
    ("answer is 3/4", "0.75", "3/4", "answer"),
    ("Answer: 50%", "0.5", "50%", "answer"),
    ("The answer is:\n\\[ 9 \\]", "9", "\\[ 9 \\]", "answer"),
    ("My answer is Answer: 1 then the answer is 2", "2", "2", "answer"),
    ("Answer: (C)", "C", "(C)", "answer"),
    # last number
    ("She has 12 apples", "12", "12", "last_number"),
    ("It costs $1,234 in total", "1234", "$1,234", "last_number"),
    ("First 3, then 4, finally 5", "5", "5", "last_number"),
    ("x = -3", "-3", "-3", "last_number"),
    ("the ratio is 3/4", "0.75", "3/4", "last_number"),
    ("the ratio is \\frac{3}{4}", "3/4", "\\frac{3}{4}", "last_number"),
    ("it grew by 50%", "50", "50%", "last_number"),
    ("it grew by 50\\%", "0.5", "50\\%", "last_number"),
    ("result: +7.0", "7", "+7.0", "last_number"),
    ("ends with 12.", "12", "12", "last_number"),
    # gold forms
    (r"\boxed{72}", "Natalia sold 48/2 = 24 clips.\n#### 72", "72", "boxed"),
    (r"\boxed{72}", r"The answer is $\boxed{72}$", "72", "boxed"),
    (r"\boxed{72}", 72, "72", "boxed"),
    (r"\boxed{0.25}", 0.25, "0.25", "boxed"),
    (r"\boxed{1234}", "1,234", "1234", "boxed"),
    (r"\boxed{3/4}", r"\frac{3}{4}", "3/4", "boxed"),
    # equal but not written as a number / not the same string: math-verify decides
    (r"\boxed{3+4}", "7", "3+4", "boxed"),
    (r"\boxed{1\frac{1}{2}}", "3/2", r"1\frac{1}{2}", "boxed"),
    (r"\boxed{\text{seven}}", "7", r"\text{seven}", "boxed"),
    (r"\boxed{1+x}", "x+1", "1+x", "boxed"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}", r"2\sqrt{2}", "boxed"),
]


@pytest.mark.parametrize("response,gold,extracted,method", CORRECT)
def test_correct(response, gold, extracted, method):
    res = verify_math(response, gold, timeout_s=None)  # the deadline has its own tests
    assert isinstance(res, VerifierResult)
    assert res.correct is True and res.reward == 1.0, res
    assert res.extracted == extracted
    assert res.method == method
    assert res.feedback == "correct"
    assert res.error is None
    check_span(response, res)


# --------------------------------------------------------------------------- wrong answers

# (response, gold, expected feedback)
WRONG = [
    (r"\boxed{43}", "42", "wrong value: got 43"),
    (r"\boxed{-42}", "42", "wrong value: got -42"),
    (r"\boxed{\frac{3}{5}}", "0.75", r"wrong value: got \frac{3}{5}"),
    (r"\boxed{0.33}", "1/3", "wrong value: got 0.33"),  # exact, no tolerance
    (r"\boxed{0.5\%}", "50%", r"wrong value: got 0.5\%"),  # percent vs percent: equal values only
    (r"\boxed{5\%}", "0.5", r"wrong value: got 5\%"),
    (r"\boxed{12.01}", "12", "wrong value: got 12.01"),
    (r"\boxed{1,235}", "1234", "wrong value: got 1,235"),
    (r"\boxed{13 apples}", "12", "wrong value: got 13 apples"),
    ("#### 71", "72", "wrong value: got 71"),
    ("Answer: 11", "12", "wrong value: got 11"),
    ("The answer is 6 because 2*3 = 6", "5", "wrong value: got 6"),
    ("She has 13 apples", "12", "wrong value: got 13"),
    ("the ratio is 3/5", "3/4", "wrong value: got 3/5"),
    # earlier priority forms win even if a later form has the gold
    ("\\boxed{7}\nAnswer: 8\n#### 8", "8", "wrong value: got 7"),
    ("#### 7\nAnswer: 8", "8", "wrong value: got 7"),
    ("Answer: 7. Check: 8", "8", "wrong value: got 7"),
    # not a single number
    (r"\boxed{2, 3}", "2", "expected a number, got '2, 3'"),
    (r"\boxed{3 or 4}", "3", "more than one final answer: '3 or 4'"),
    (r"\boxed{4i}", "4", "expected a number, got '4i'"),
    (r"\boxed{2x}", "2", "expected a number, got '2x'"),
    (r"\boxed{5k}", "5", "expected a number, got '5k'"),
    (r"\boxed{1\frac{1}{3}}", "3/2", r"wrong value: got 1\frac{1}{3}"),
    (r"\boxed{\text{eight}}", "7", r"wrong value: got \text{eight}"),
    ("Answer: I don't know", "7", "expected a number, got 'I don't know'"),
    (r"\boxed{٣}", "3", "expected a number, got '٣'"),  # non-ASCII digits are not numbers
    (r"\boxed{１２}", "12", "expected a number, got '１２'"),
    # symbolic (string) fallback
    (r"\boxed{C}", "B", "wrong answer: got 'C'"),
    (r"\boxed{1-x}", "x+1", "wrong answer: got '1-x'"),
    (r"\boxed{x^3+1}", "x^2+1", "wrong answer: got 'x^3+1'"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}", r"wrong answer: got '2\sqrt{3}'"),
    (r"\boxed{5}", r"\sqrt{2}", "wrong answer: got '5'"),
]


@pytest.mark.parametrize("response,gold,feedback", WRONG)
def test_wrong(response, gold, feedback):
    res = verify_math(response, gold, timeout_s=None)  # the deadline has its own tests
    assert res.correct is False and res.reward == 0.0, res
    assert res.feedback == feedback
    assert res.error is None
    check_span(response, res)


@pytest.mark.parametrize("response", ["", "   \n\t ", "no numbers here", "None", "null",
                                      r"\boxed{}", r"\boxed{", "Answer:", "####", None])
def test_no_answer(response):
    res = verify_math(response, "3")
    assert res == VerifierResult(0.0, False, None, None, "no final answer found")


def test_bytes_response_is_decoded():
    assert verify_math(b"\\boxed{3}", "3").correct


def test_span_with_prefix_and_unicode():
    response = "Résumé 🙂 ✓ ünïcödé — " * 3 + "so the answer is \\boxed{1,024}."
    res = verify_math(response, "1024")
    assert res.correct and res.extracted == "1,024"
    check_span(response, res)
    assert res.answer_span == (response.index("1,024"), response.index("1,024") + 5)


def test_span_offset_beyond_window():
    response = "x" * 100_000 + r" \boxed{7} tail"
    res = verify_math(response, "7")
    assert res.correct
    assert res.answer_span == (100_000 + 8, 100_000 + 9)
    check_span(response, res)


def test_answer_outside_window_is_ignored():
    response = r"\boxed{7}" + " filler" * (MAX_RESPONSE_CHARS // 7 + 10)
    res = verify_math(response, "7")
    assert not res.correct and res.feedback == "no final answer found"


def test_unbalanced_last_box_uses_previous_complete_one():
    response = r"\boxed{5} and then \boxed{6"
    res = verify_math(response, "5")
    assert res.correct and res.answer_span == (7, 8)


def test_nested_braces_in_box():
    response = r"\boxed{\frac{\frac{1}{2}}{2}}"
    # a nested fraction is a closed numeric expression: math-verify evaluates it
    # (no deadline: this states what is accepted; under a loaded suite sympy can take > 1 s)
    res = verify_math(response, "1/4", timeout_s=None)
    assert res.correct and res.extracted == r"\frac{\frac{1}{2}}{2}"
    check_span(response, res)
    assert not verify_math(response, "1/2", timeout_s=None).correct
    # the normalised strings match without math-verify
    assert verify_math(response, r"\dfrac{\frac12}{2}").correct
    deep = r"\boxed{" + "{" * 500 + "7" + "}" * 500 + "}"
    res = verify_math(deep, "7")
    assert res.correct and res.extracted == "{" * 500 + "7" + "}" * 500


def test_extract_answer():
    assert extract_answer("so #### 12 apples") == ("12 apples", (8, 17), "hash")
    assert extract_answer("nothing") is None
    assert extract_answer(None) is None


# --------------------------------------------------------------------------- gold handling


@pytest.mark.parametrize("gold", [None, "", "   ", "\\boxed{}", "#### ", "\\boxed{ } ####"])
def test_bad_gold_raises_value_error(gold):
    with pytest.raises(ValueError):
        verify_math(r"\boxed{1}", gold)


def test_bad_types_raise_type_error():
    with pytest.raises(TypeError):
        verify_math(123, "1")
    with pytest.raises(TypeError):
        verify_math("1", object())


# --------------------------------------------------------------------------- feedback never leaks gold

LEAK_CASES = [
    (r"\boxed{17}", "987654"),
    (r"\boxed{banana}", "987654"),
    ("nothing useful", "987654"),
    ("#### 12 apples", r"\frac{987}{654}"),
    ("Answer: x + y", "zebra-987"),
    (r"\boxed{3/4}", "987654%"),
    ("", "987654"),
]


@pytest.mark.parametrize("response,gold", LEAK_CASES)
def test_feedback_never_contains_gold(response, gold):
    res = verify_math(response, gold, timeout_s=None)  # the deadline has its own tests
    assert not res.correct
    for piece in (gold, "987", "654", "zebra"):
        assert piece not in res.feedback
    assert "987" not in repr(res)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(gold=st.integers(-10**6, 10**6), got=st.integers(-10**6, 10**6),
       fmt=st.sampled_from(["\\boxed{{{}}}", "#### {}", "Answer: {}", "I get {} apples"]))
def test_feedback_property_no_gold(gold, got, fmt):
    response = fmt.format(got)
    if str(gold) in response:
        return
    res = verify_math(response, str(gold))
    assert str(gold) not in res.feedback


# --------------------------------------------------------------------------- property: integers

FORMATS = ["\\boxed{{{}}}", "$\\boxed{{{}}}$.", "#### {}", "Answer: {}", "The answer is {}.",
           "{} apples", "Step 1: 3 + 4 = 7.\nSo she has {} apples"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(-10**9, 10**9), fmt=st.sampled_from(FORMATS), commas=st.booleans())
def test_integer_property(n, fmt, commas):
    written = f"{n:,}" if commas else str(n)
    response = fmt.format(written)
    res = verify_math(response, str(n))
    assert res.correct, (response, res)
    check_span(response, res)
    assert res.extracted.replace(",", "").startswith(str(n))
    wrong = verify_math(response, str(n + 1))
    assert not wrong.correct and wrong.reward == 0.0
    assert str(n + 1) not in wrong.feedback or str(n + 1) in response


# --------------------------------------------------------------------------- pathological input

PATHOLOGICAL = {
    "open_braces": "{" * 100_000,
    "close_braces": "}" * 100_000,
    "nested_boxed": "\\boxed{" * 20_000 + "1" + "}" * 20_000,
    "unclosed_boxed": "\\boxed{" * 20_000,
    "digits": "9" * 100_000,
    "commas": "1," * 50_000,
    "answer_markers": "answer is " * 10_000,
    "answer_colons": "Answer:" * 15_000,
    "hashes": "#" * 100_000,
    "spaces": " " * 100_000 + "x",
    "frac": "\\frac{" * 20_000,
    "text": "\\text{" * 20_000,
    "dollars": "$" * 100_000,
    "equals": "=" * 100_000,
    "signs": "-+" * 50_000 + "1",
    "parens": "(" * 50_000 + "1" + ")" * 50_000,
    "unicode_digits": "٣" * 100_000,
    "mixed_unicode": "🙂٣３½" * 25_000,
    "long_unit": "\\boxed{1 " + "a " * 1_900 + "!}",
    "long_unit_dots": "\\boxed{1 " + "a." * 1_900 + "!}",
    "long_number_box": "\\boxed{" + "1" * 3_900 + "}",
    "times": "\\boxed{1" + " \\times" * 500 + "}",
    "null_bytes": "\x00" * 100_000,
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_inputs_are_fast_and_safe(name):
    response = PATHOLOGICAL[name]
    t0 = time.perf_counter()
    res = verify_math(response, "5", timeout_s=1.0)
    fmt = format_reward(response)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0, f"{name}: {elapsed:.3f}s"
    assert res.reward in (0.0, 1.0) and fmt.reward in (0.0, 1.0)
    assert res.error is None
    check_span(response, res)
    check_span(response, fmt)


def test_pathological_gold_is_bounded():
    t0 = time.perf_counter()
    res = verify_math(r"\boxed{1}", "{" * 100_000 + "1")
    assert time.perf_counter() - t0 < 1.0
    assert res.correct  # gold is windowed too, and braces are dropped: "{{{...{1" is the number 1


def test_timeout_gives_error_not_exception():
    res = verify_math(r"\boxed{5}", "5", timeout_s=0.0)
    assert res.reward == 0.0 and not res.correct
    assert res.error.startswith("timeout")
    assert res.feedback == "verification timed out"
    fmt = format_reward(r"\boxed{5}", timeout_s=0.0)
    assert fmt.reward == 0.0 and fmt.error.startswith("timeout")
    assert verify_math(r"\boxed{5}", "5", timeout_s=None).correct


def test_negative_timeout_rejected():
    with pytest.raises(ValueError):
        verify_math("1", "1", timeout_s=-1.0)
    with pytest.raises(ValueError):
        verify_math("1", "1", timeout_s=float("nan"))


# --------------------------------------------------------------------------- format reward

FORMAT_CASES = [
    (r"Work... so \boxed{5}", 1.0, "boxed"),
    ("Work...\nThe final answer is $\\boxed{5}$. I hope it is correct.\n\n", 1.0, "boxed"),
    ("Work...\n#### 72", 1.0, "hash"),
    ("Work...\nAnswer: 72", 1.0, "answer"),
    ("Work...\nSo the answer is 72.", 1.0, "answer"),
    ("\\boxed{5}\nand then more words afterwards", 0.0, None),
    ("Answer: 5\nmore", 0.0, None),
    ("The total is 72.", 0.0, None),
    (r"\boxed{}", 0.0, None),
    ("", 0.0, None),
    (None, 0.0, None),
]


@pytest.mark.parametrize("response,reward,method", FORMAT_CASES)
def test_format_reward(response, reward, method):
    res = format_reward(response)
    assert res.reward == reward and res.correct is (reward == 1.0)
    assert res.method == method
    if response is not None:
        check_span(response, res)
    if reward == 0.0:
        assert res.extracted is None and "marker" in res.feedback


def test_format_reward_ignores_gold():
    assert format_reward(r"\boxed{5}", "7").reward == 1.0


# --------------------------------------------------------------------------- registry


@pytest.fixture
def clean_registry():
    before = dict(REWARD_FUNCTIONS)
    yield
    REWARD_FUNCTIONS.clear()
    REWARD_FUNCTIONS.update(before)


def test_builtin_registrations():
    assert get_reward_fn("math") is verify_math
    assert get_reward_fn("format") is format_reward
    assert REWARD_FUNCTIONS["math"] is verify_math


@pytest.mark.parametrize("name,nearest", [("maths", "math"), ("fromat", "format"),
                                          ("Math", "math"), ("formats", "format")])
def test_unknown_name_suggests_nearest(name, nearest):
    with pytest.raises(ValueError, match=f"did you mean '{nearest}'"):
        get_reward_fn(name)


def test_register_reward(clean_registry):
    @register_reward("const_half")
    def half(response, gold, **kw):
        return VerifierResult(0.5, False, None, None, "half")

    assert get_reward_fn("const_half") is half
    with pytest.raises(ValueError, match="already registered"):
        register_reward("const_half")(lambda r, g: 1.0)
    register_reward("const_half", overwrite=True)(verify_math)
    assert get_reward_fn("const_half") is verify_math
    with pytest.raises(ValueError):
        register_reward("")


# --------------------------------------------------------------------------- safe_reward


def _raises(response, gold, **kw):
    raise RuntimeError("boom " + "x" * 10_000)


def _nan(response, gold, **kw):
    return VerifierResult(float("nan"), True, None, None, "")


def _inf(response, gold, **kw):
    return VerifierResult(math.inf, True, None, None, "")


def _two(response, gold, **kw):
    return VerifierResult(2.0, True, "a", (0, 1), "")


def _negative(response, gold, **kw):
    return -0.5


def _float_nan(response, gold, **kw):
    return float("nan")


def _bad_type(response, gold, **kw):
    return "1.0"


class _Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no str for you")


def _unprintable(response, gold, **kw):
    raise _Unprintable()


@pytest.mark.parametrize("fn,error_start", [
    (_raises, "RuntimeError: boom"),
    (_nan, "invalid reward nan"),
    (_inf, "invalid reward inf"),
    (_two, "invalid reward 2.0"),
    (_negative, "invalid reward -0.5"),
    (_float_nan, "invalid reward nan"),
    (_bad_type, "invalid return type str"),
    (_unprintable, "_Unprintable"),
    ("no_such_reward", "ValueError: unknown reward function"),
])
def test_safe_reward_never_raises(fn, error_start):
    res = safe_reward(fn, "resp", "gold")
    assert isinstance(res, VerifierResult)
    assert res.reward == 0.0 and res.correct is False
    assert res.error is not None and res.error.startswith(error_start), res.error
    assert len(res.error) <= 300
    assert res.feedback == "verification error"


def test_safe_reward_passes_valid_results_through():
    assert safe_reward(verify_math, r"\boxed{3}", "3") == verify_math(r"\boxed{3}", "3")
    assert safe_reward("math", r"\boxed{3}", "3", timeout_s=2.0).correct
    res = safe_reward(lambda r, g: 1, "x", "y")
    assert res.reward == 1.0 and type(res.reward) is float and res.correct is True
    res = safe_reward(lambda r, g: VerifierResult(True, 1, None, None, ""), "x", "y")
    assert type(res.reward) is float and res.correct is True


def test_safe_reward_handles_bad_gold_and_types():
    for gold in (None, ""):
        res = safe_reward("math", r"\boxed{3}", gold)
        assert res.reward == 0.0 and res.error.startswith("ValueError")
    res = safe_reward("math", 12345, "3")
    assert res.reward == 0.0 and res.error.startswith("TypeError")


# --------------------------------------------------------------------------- score_batch


def test_score_batch():
    responses = [r"\boxed{3}", "#### 4", "nothing", None, 17]
    golds = ["3", "5", "1", "1", "17"]
    results, num_errors = score_batch("math", responses, golds)
    assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert num_errors == 1 and results[4].error.startswith("TypeError")
    results, num_errors = score_batch(_raises, ["a", "b"], ["a", "b"])
    assert num_errors == 2 and all(r.reward == 0.0 for r in results)
    results, num_errors = score_batch("format", ["Answer: 1"], [None])
    assert results[0].reward == 1.0 and num_errors == 0
    assert score_batch("math", [], []) == ([], 0)


def test_score_batch_caller_errors():
    with pytest.raises(ValueError, match="did you mean 'math'"):
        score_batch("mth", ["1"], ["1"])
    with pytest.raises(ValueError, match="2 responses but 1 gold"):
        score_batch("math", ["1", "2"], ["1"])


# --------------------------------------------------------------------------- no eval/exec


def test_sources_contain_no_eval_or_exec():
    import amrsd_jax.rewards as pkg

    root = pathlib.Path(pkg.__file__).parent
    files = sorted(root.glob("*.py"))
    assert any(f.name == "math_verifier.py" for f in files)
    pattern = re.compile(r"\b(eval|exec|sympify|parse_expr|compile)\s*\(|__import__")
    for f in files:
        src = f.read_text(encoding="utf-8")
        hits = [m.group(0) for m in pattern.finditer(src) if not src[:m.start()].endswith("re.")]
        assert not hits, f"{f.name}: {hits}"

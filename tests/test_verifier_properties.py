"""The properties issue #16 asks of ``reward.name=math``: symbolic answers through math-verify
(gold wrapped as verl does), the old false-positive sources closed, hedges rejected, strict
mode, dataset reward names, and a timeout that works from any thread."""

from __future__ import annotations

import threading
import time

import pytest

from amrsd_jax.rewards import (
    asks_for_marker,
    get_reward_fn,
    is_numeric_gold,
    resolve_reward_name,
    safe_reward,
    score_batch,
    verify_gsm8k,
    warm_up,
)
from amrsd_jax.rewards import math_verifier, symbolic
from amrsd_jax.train.config import RewardConfig, load_train_config


def _without_deadline(fn):
    """``fn`` with ``timeout_s=None`` unless a test passes one: these tests state which
    answers are accepted, and under a loaded full suite a sympy comparison can outlast the
    1 s default (CI failed once on ``{2, 1}`` vs ``{1,2}``). The deadline's own tests below
    pass ``timeout_s``."""
    def call(response, gold, **kw):
        kw.setdefault("timeout_s", None)
        return fn(response, gold, **kw)
    return call


verify_math = _without_deadline(math_verifier.verify_math)
verify_math500 = _without_deadline(math_verifier.verify_math500)
verify_math_strict = _without_deadline(math_verifier.verify_math_strict)
verify_math_verify = _without_deadline(math_verifier.verify_math_verify)


@pytest.fixture(scope="module", autouse=True)
def _math_verify_loaded():
    warm_up()


def check_span(response, res):
    if res.extracted is None:
        assert res.answer_span is None
        return
    s, e = res.answer_span
    assert response[s:e] == res.extracted


# --------------------------------------------------------------------------- symbolic answers

SYMBOLIC_RIGHT = [  # (response, gold): the examples and their kind
    (r"\boxed{(p,q)=(3,2)}", "(3,2)"),
    (r"\boxed{1\frac{1}{2}}", r"\frac{3}{2}"),
    (r"\boxed{2+40}", "42"),
    (r"\boxed{10^6}", "1000000"),
    (r"\boxed{1000000}", "10^6"),
    (r"\boxed{(x+1)^2}", "x^2+2x+1"),
    (r"\boxed{\{2, 1\}}", r"\{1,2\}"),
    (r"\boxed{[1,2)}", "[1,2)"),
    (r"\boxed{\begin{pmatrix}1\\2\end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}"),
    (r"\boxed{y=2x+3}", "2x+3"),
    (r"\boxed{z + 2x = 1}", "2x + z = 1"),
    (r"Final Answer: The final answer is $\frac{5}{12}$. I hope it is correct.", r"\dfrac{5}{12}"),
    (r"\boxed{5!}", "120"),
]
SYMBOLIC_WRONG = [
    (r"\boxed{(2,3)}", "(3,2)"),
    (r"\boxed{2}", r"2\sqrt{2}"),  # math-verify's default gold parse keeps only "2"
    (r"\boxed{[1,2]}", "[1,2)"),
    (r"\boxed{x^2+1}", "x^2+2x+1"),
    (r"\boxed{\frac{1-\sqrt{5}}{2}}", r"\frac{1+\sqrt{5}}{2}"),
    (r"\boxed{5!}", "5"),
]


@pytest.mark.parametrize("response,gold", SYMBOLIC_RIGHT)
def test_symbolic_answers_accepted(response, gold):
    res = verify_math(response, gold)
    assert res.correct and res.reward == 1.0 and res.error is None, res
    check_span(response, res)


@pytest.mark.parametrize("response,gold", SYMBOLIC_WRONG)
def test_symbolic_answers_rejected(response, gold):
    res = verify_math(response, gold)
    assert not res.correct and res.error is None, res
    assert res.feedback.startswith(("wrong answer", "wrong value")), res.feedback
    check_span(response, res)
    assert gold not in res.feedback or gold in response


NUMERIC_FORMATS = ["\\boxed{{{}}}", "#### {}", "Answer: {}", "The answer is {}.",
                   "She has {} apples.", "$\\boxed{{{}}}$ dollars", "**Answer:** {}"]


def test_numeric_golds_never_reach_math_verify(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("math-verify called on a numeric answer")

    monkeypatch.setattr(symbolic, "symbolic_equal", boom)
    for fmt in NUMERIC_FORMATS:
        for gold, written in [("72", "72"), ("1234", "1,234"), ("0.5", "1/2"), ("-3", "-3"),
                              ("1000000", "1 million"), ("25", "25%")]:
            assert verify_math(fmt.format(written), gold).correct, (fmt, gold)
            assert not verify_math(fmt.format(written), "7").correct


def test_is_numeric_gold():
    assert is_numeric_gold("72") and is_numeric_gold("Work...\n#### 1,234")
    assert is_numeric_gold(r"\frac{3}{4}") and is_numeric_gold("x = 5")
    assert not is_numeric_gold(r"2\sqrt{2}") and not is_numeric_gold("2x + z = 1")


# --------------------------------------------------------------------------- closed false positives

FALLBACK_TRAPS = [  # (response, gold): no answer may be read out of these
    (r"So the golden ratio is $\frac{1+\sqrt{5}}{2}$", "2"),
    (r"So the golden ratio is $\frac{1+\sqrt{5}}{2}$", "5"),
    ("Combining like terms we get 18x", "18"),
    ("Combining like terms gives 18x + 4", "4"),
    ("so 5-3", "3"),
    ("we subtract: 5 - 3", "3"),
    ("The product is 2 \\times 3", "3"),
    ("so 3 times 4", "4"),
    ("the root is \\sqrt{3}", "3"),
    ("so the value is x^2", "2"),
    ("Let a_{10} be the term", "10"),
    ("The result is 2^{4}", "4"),
    ("Janet makes $18 a day... Therefore, she makes **$9**", "18"),
    ("There are 4 cases to consider: first, when", "4"),
]


@pytest.mark.parametrize("response,gold", FALLBACK_TRAPS)
def test_fallback_reads_no_number_from_expressions(response, gold):
    res = verify_math(response, gold)
    assert not res.correct, res
    check_span(response, res)


@pytest.mark.parametrize("response,gold", [("She has 12 apples", "12"), ("It is -5.", "-5"),
                                           ("3 + 4 = 7", "7"), ("It costs $1,234.", "1234"),
                                           ("It grew by 50%.", "50"), ("Total: **12**", "12")])
def test_fallback_still_reads_standalone_numbers(response, gold):
    assert verify_math(response, gold).method == "last_number"
    assert verify_math(response, gold).correct


@pytest.mark.parametrize("response,gold,correct", [
    ("Answer: 1 million", "1000000", True), ("Answer: 1 million", "1", False),
    (r"\boxed{1\text{ million}}", "1", False), ("#### 2.5 million", "2500000", True),
    ("Answer: 3 thousand dollars", "3000", True), ("Answer: 3 thousand dollars", "3", False),
    (r"\boxed{4 \text{ billion}}", "4000000000", True), ("Answer: 2 dozen eggs", "24", True),
    ("Answer: $1.5 million", "1.5", False),
])
def test_multiplier_words_multiply(response, gold, correct):
    assert verify_math(response, gold).correct is correct


@pytest.mark.parametrize("response,gold,correct", [
    (r"\boxed{1}", "2x + z = 1", False),
    (r"\boxed{7}", "x+y=7", False),
    (r"\boxed{12}", "3x - 4y = 12", False),
    (r"\boxed{2x + z = 1}", "2x + z = 1", True),
    (r"\boxed{5}", "x = 5", True),
    (r"\boxed{2x+3}", "y = 2x + 3", True),
    (r"\boxed{x^2}", "f(x) = x^2", True),
    (r"\boxed{(3,2)}", "(p, q) = (3, 2)", True),
    (r"\boxed{y = 5}", "x = 5", False),
])
def test_gold_equation_reduced_only_for_a_variable_lhs(response, gold, correct):
    assert verify_math(response, gold).correct is correct


@pytest.mark.parametrize("response,gold,correct", [
    (r"\boxed{12 \text{ cm}}", "12 m", False), (r"\boxed{12 \text{ meters}}", r"12\text{ m}", True),
    (r"\boxed{5 ft}", r"5\text{ inches}", False), ("Answer: 12 cm", "12", True),
])
def test_different_units_are_not_equal(response, gold, correct):
    assert verify_math(response, gold).correct is correct


@pytest.mark.parametrize("response,gold,correct", [
    ("Answer: forty-two", "42", True), (r"\boxed{\text{seven}}", "7", True),
    ("Answer: one hundred and five", "105", True), ("Answer: twelve", "13", False),
])
def test_number_words(response, gold, correct):
    assert verify_math(response, gold).correct is correct


@pytest.mark.parametrize("response,gold,correct", [
    (r"Therefore $n \approx 7$.", "7", True),
    (r"So $p = \frac{2}{3} \approx 0.67$.", r"\frac{2}{3}", True),
    (r"So $p = \frac{3}{4} \approx 0.67$.", r"\frac{2}{3}", False),
    (r"$y = 4 + 5 = 9$", "9", True),
    (r"$y = 4 + 5 = 10$", "9", False),
    (r"\boxed{x = -5, p = 3}", "3", False),  # a list of assignments, not a chain
])
def test_approximations_and_chained_equalities(response, gold, correct):
    assert verify_math(response, gold).correct is correct


@pytest.mark.parametrize("response,gold,correct", [
    (r"\boxed{0.142857}", r"\frac{1}{7}", True), (r"\boxed{0.1428}", r"\frac{1}{7}", True),
    (r"\boxed{0.14}", r"\frac{1}{7}", False), (r"\boxed{0.1434}", r"\frac{1}{7}", False),
    (r"\boxed{0.1234}", "0.12345", False),  # an exact decimal gold needs its exact value
    ("Answer: 0.6667", "2/3", True), (r"\boxed{66.67\%}", "2/3", False),
])
def test_decimals_of_non_terminating_golds(response, gold, correct):
    assert verify_math(response, gold).correct is correct


@pytest.mark.parametrize("response,gold,correct", [
    ("Final Answer: The total cost of the books is 15 dollars. I hope it is correct.", "15", True),
    ("Final Answer: The total cost of the books is 51 dollars.", "15", False),
    ("Final Answer: The cost is not 15 dollars.", "15", False),
    ("Final Answer: at least 15 of them", "15", False),
    ("Final Answer: between 15 and 20", "15", False),
])
def test_one_number_in_a_prose_answer(response, gold, correct):
    assert verify_math(response, gold).correct is correct


def test_chat_special_tokens_end_the_response():
    response = "Answer: 12<|im_end|>\n<|im_start|>user\nWhat is 7 + 7? Answer: 14"
    assert verify_math(response, "12").correct and not verify_math(response, "14").correct
    assert verify_math_strict("It is \\boxed{12}.<|im_end|>user", "12").correct


@pytest.mark.parametrize("response,gold,correct", [
    (r"\boxed{4, 5}", "AB = 4, CD = 5", True),
    (r"\boxed{5, 4}", "AB = 4, CD = 5", False),  # math-verify alone accepts (sets)
    (r"\boxed{CD = 5, AB = 4}", "AB = 4, CD = 5", True),
    (r"\boxed{-1}", "x = 2, y = -1", False),
    (r"$q = 3, q = -2$", r"q = 3 \text{ and } q = -2", True),
    (r"\boxed{1, 3}", r"\boxed{1}, \boxed{3}", True),  # a gold with two boxes is a list
    (r"\boxed{3}", r"\boxed{1}, \boxed{3}", False),
    (r"\boxed{2}, \boxed{4}, \boxed{6}", "{2,4,6}", True),
    (r"So the solution set is $x \geq 4$.", r"x \ge 4", True),
    (r"Hence $-x > -2$.", "x < 2", True),
    (r"Hence $x < -2$.", "x < 2", False),
])
def test_lists_labels_and_relations(response, gold, correct):
    assert verify_math(response, gold).correct is correct


def test_fragments_with_stray_braces_are_not_compared():
    assert not symbolic.sympy_safe("0}^{n-1} F_k") and not symbolic.sympy_safe("{x")
    assert not verify_math(r"$F_n = \sum_{k=0}^{n-2} F_k F_{n-k-2}$",
                           r"F_n = \sum_{k=0}^{n-1} F_k F_{n-k-1}").correct


# --------------------------------------------------------------------------- hedges

HEDGES = [
    ("The answer is 5 or 6.", "5"),
    ("The answer is either 5 or 6.", "6"),
    (r"\boxed{5 \text{ or } 6}", "5"),
    (r"\boxed{5} or \boxed{6}", "5"),
    (r"\boxed{5} or \boxed{6}", "6"),
    (r"\boxed{5}, \boxed{6}", "5"),
    ("\\boxed{20}\n\\boxed{21}", "21"),
    (r"The answer is $\boxed{5}$ and $\boxed{6}$.", "6"),
    (r"\boxed{5}, or possibly 6 if we count the last day.", "5"),
    (r"It is 6 or \boxed{5}.", "5"),
    ("Answer: 5, maybe 6", "5"),
    ("The answer is 20 (or possibly 21).", "20"),
    (r"$x = \boxed{\pm 3}$", "3"),
    ("#### 5 or 6", "5"),
    (r"\boxed{\sqrt{2}} \text{ or } \boxed{-\sqrt{2}}", r"\sqrt{2}"),
]


@pytest.mark.parametrize("response,gold", HEDGES)
def test_hedged_answers_rejected(response, gold):
    res = verify_math(response, gold)
    assert not res.correct, res
    assert res.feedback.startswith("more than one final answer"), res.feedback
    check_span(response, res)


@pytest.mark.parametrize("response,gold", [
    (r"$x = \boxed{\pm 3}$", r"\pm 3"),
    (r"$x = \boxed{\pm 3}$", "-3, 3"),
    (r"The solutions are $\boxed{1}$ and $\boxed{2}$.", "1, 2"),
    (r"\boxed{\sqrt{2}} \text{ or } \boxed{-\sqrt{2}}", r"\pm\sqrt{2}"),
    (r"\boxed{5} and \boxed{5}", "5"),  # the same answer twice
    (r"\boxed{5}. I hope it is correct.", "5"),
    ("Either way, the answer is 7.", "7"),
    ("Hence x = 4 or x = -4. Since x must be positive, the answer is \\boxed{4}.", "4"),
])
def test_not_hedges(response, gold):
    assert verify_math(response, gold).correct


@pytest.mark.parametrize("response,gold,correct", [
    ("So the answer is 7.\nWait, I forgot one: 7 + 1 = 8.\nThe answer is 8.", "8", True),
    ("So the answer is 7.\nWait, I forgot one: 7 + 1 = 8.\nThe answer is 8.", "7", False),
    (r"That gives \boxed{20}. Hmm, I missed 4: 20 + 4 = 24, so \boxed{24}.", "24", True),
    (r"That gives \boxed{20}. Hmm, I missed 4: 20 + 4 = 24, so \boxed{24}.", "20", False),
])
def test_corrections_count_the_last_answer(response, gold, correct):
    assert verify_math(response, gold).correct is correct


# --------------------------------------------------------------------------- strict mode

TRUNCATED = [
    ("3 * 4 = 12. So he has 12 pencils and then he gives", "12"),
    (r"The total is \boxed{12", "12"),
    (r"First \boxed{10}. Then adding 2 more gives \boxed{12", "10"),
    ("Answer: 12\nLet me verify: 3 × 4 =", "12"),
    (r"\boxed{12}. To double-check, we compute 4 \times 3 = 12 and then", "12"),
    ("The answer is 12 because 3 × 4 = 12 and then we", "12"),
    ("#### 72\n\nExplanation: In April she sold 48, and in May", "72"),
]
COMPLETE = [("#### 72", "72"), ("48 + 24 = 72.\nAnswer: 72.", "72"),
            (r"The total is $\boxed{72}$ clips", "72"),
            ("\\boxed{72}\n\nThis counts both months.", "72"),
            (r"Final Answer: The final answer is $\sqrt{2}$. I hope it is correct.", r"\sqrt{2}")]


@pytest.mark.parametrize("response,gold", TRUNCATED)
def test_strict_rejects_truncated(response, gold):
    res = verify_math_strict(response, gold)
    assert not res.correct, res
    check_span(response, res)


@pytest.mark.parametrize("response,gold", COMPLETE)
def test_strict_accepts_complete_marked_answers(response, gold):
    assert verify_math_strict(response, gold).correct
    assert verify_math(response, gold, strict=True).correct


@pytest.mark.parametrize("response", ["She has 12 apples.", "3 * 4 = 12", r"So it is $12$."])
def test_strict_requires_a_marker(response):
    assert verify_math(response, "12").correct  # lenient: the last number
    res = verify_math_strict(response, "12")
    assert not res.correct and res.extracted is None and "marker" in res.feedback


def test_dataset_reward_names():
    for name, fn in [("math_strict", math_verifier.verify_math_strict),
                     ("gsm8k", verify_gsm8k), ("math500", math_verifier.verify_math500),
                     ("math_verify", math_verifier.verify_math_verify)]:
        assert get_reward_fn(name) is fn
    gsm = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    assert verify_gsm8k("48 + 24 = 72\n#### 72", gsm).correct
    assert verify_gsm8k(r"so $\boxed{72}$.", "72").correct
    assert not verify_gsm8k("She sold 72 clips.", "72").correct  # strict
    with pytest.raises(ValueError, match="not a number"):
        verify_gsm8k("#### 72", r"\frac{\sqrt{3}}{2}")
    assert safe_reward("gsm8k", "#### 1", "x+1").error.startswith("ValueError")
    assert verify_math500(r"The answer is $\boxed{\frac{\sqrt{3}}{2}}$.", r"\frac{\sqrt3}{2}").correct
    res = verify_math500("Answer: 7", "7")
    assert not res.correct and "boxed" in res.feedback  # only \boxed counts for MATH
    assert verify_math_verify(r"so \boxed{2+40}", "42").correct


def test_resolve_reward_name_and_config():
    suffix = "Give the final answer after 'Answer:'."
    assert asks_for_marker(suffix) and asks_for_marker(r"Put it in \boxed{}.")
    assert asks_for_marker("End with '#### <number>'.")
    assert not asks_for_marker(None) and not asks_for_marker("Think step by step.")
    assert resolve_reward_name("math", None, suffix) == "math_strict"
    assert resolve_reward_name("math", None, None) == "math"
    assert resolve_reward_name("math", False, suffix) == "math"
    assert resolve_reward_name("math", True, None) == "math_strict"
    assert resolve_reward_name("gsm8k", None, None) == "gsm8k"
    assert resolve_reward_name("gsm8k", False, suffix) == "gsm8k"  # asked for by name
    assert resolve_reward_name("math500", True) == "math500"
    assert resolve_reward_name("format", None, suffix) == "format"
    assert resolve_reward_name("my_reward", False) == "my_reward"
    with pytest.raises(ValueError, match="built-in math verifiers"):
        resolve_reward_name("my_reward", True)
    assert RewardConfig().strict is None
    assert load_train_config(None, ["reward.strict=false"]).reward.strict is False
    cfg = load_train_config(None, [])
    assert resolve_reward_name(cfg.reward.name, cfg.reward.strict,
                               cfg.data.prompt_suffix) == "math_strict"
    assert cfg.reward_name() == "math_strict"
    # the marker may be asked for in the system prompt instead (the TPU GSM8K config)
    boxed = load_train_config(None, ["data.prompt_suffix=null",
                                     r"model.system_prompt=Put the answer in \boxed{}."])
    assert boxed.reward_name() == "math_strict"
    assert load_train_config(None, ["data.prompt_suffix=null"]).reward_name() == "math"


# --------------------------------------------------------------------------- timeouts and threads


def test_symbolic_comparison_works_off_the_main_thread():
    """math-verify's own signal.alarm timeouts raise outside the main thread; ours work."""
    out = {}

    def run():
        out["res"] = verify_math(r"\boxed{\frac{\sqrt{8}}{2}}", r"\sqrt{2}", timeout_s=5.0)
        out["batch"] = score_batch("math", [r"\boxed{(x+1)^2}"] * 2, ["x^2+2x+1"] * 2,
                                   wall_timeout_s=5.0)

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out["res"].correct and out["res"].error is None
    results, errors = out["batch"]
    assert errors == 0 and all(r.correct for r in results)


def _wait_for_no_stuck(limit_s=5.0):
    end = time.monotonic() + limit_s
    while symbolic._alive_stuck() and time.monotonic() < end:
        time.sleep(0.01)
    return symbolic._alive_stuck()


def test_hanging_symbolic_comparison_times_out_and_is_stopped(monkeypatch):
    def spin(gold, answer):  # a runaway pure-Python computation
        while True:
            time.sleep(0.001)

    monkeypatch.setattr(symbolic, "_equal", spin)
    response = r"So $x = \boxed{\sqrt{7}}$."
    t0 = time.perf_counter()
    res = verify_math(response, r"\sqrt{7} + 0", timeout_s=0.3)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0
    assert not res.correct and res.error.startswith("timeout") and res.reward == 0.0
    assert res.feedback == "verification timed out"
    assert res.extracted == r"\sqrt{7}" and res.method == "boxed"  # span kept for OAR
    check_span(response, res)
    assert _wait_for_no_stuck() == 0  # the worker got the asynchronous exception


def _stubborn(release: threading.Event):
    """A comparison that swallows the interrupt and runs until ``release`` is set."""
    def stubborn(gold, answer):
        while not release.is_set():
            try:
                time.sleep(0.005)
            except BaseException:
                pass
        return True
    return stubborn


def test_stuck_workers_make_new_calls_fail_fast(monkeypatch):
    release = threading.Event()
    monkeypatch.setattr(symbolic, "_equal", _stubborn(release))
    try:
        for _ in range(symbolic.MAX_STUCK):
            assert verify_math(r"\boxed{\sqrt{7}}", r"\sqrt{7}+0", timeout_s=0.05).error
        t0 = time.perf_counter()
        res = verify_math(r"\boxed{\sqrt{7}}", r"\sqrt{7}+0", timeout_s=5.0)
        assert time.perf_counter() - t0 < 0.5 and res.error.startswith("timeout")
    finally:
        release.set()
    assert _wait_for_no_stuck() == 0
    monkeypatch.undo()
    assert verify_math(r"\boxed{\sqrt{7}}", r"\sqrt{7}+0", timeout_s=5.0).correct


def test_a_stuck_worker_does_not_block_later_comparisons(monkeypatch):
    """A worker stuck past its deadline keeps the lock it holds; later comparisons get a
    fresh one and are judged, instead of timing out for the rest of the run."""
    release = threading.Event()
    real = symbolic._equal
    monkeypatch.setattr(symbolic, "_equal", _stubborn(release))
    try:
        assert verify_math(r"\boxed{\sqrt{7}}", r"\sqrt{7}+0", timeout_s=0.05).error
        assert symbolic._alive_stuck() == 1
        monkeypatch.setattr(symbolic, "_equal", real)
        res = verify_math(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", timeout_s=5.0)
        assert res.correct and res.error is None
    finally:
        release.set()
    assert _wait_for_no_stuck() == 0


def test_math_verify_import_is_not_charged_to_the_deadline(monkeypatch):
    monkeypatch.setattr(symbolic, "load", lambda: (time.sleep(0.3), 0.3)[1])
    assert verify_math(r"\boxed{\sqrt{8}}", r"2\sqrt{2}", timeout_s=0.25).correct


@pytest.mark.parametrize("response", [r"\boxed{9^{9^{9}}}", r"\boxed{10^{100000}}",
                                      r"\boxed{(10^{5})!}", r"\boxed{10000000!}",
                                      r"\boxed{\binom{1000000}{500000}}",
                                      r"\boxed{" + "1+" * 300 + "1}"])
def test_runaway_expressions_are_refused_quickly(response):
    t0 = time.perf_counter()
    for gold in ("5", "x+1"):
        res = verify_math(response, gold, timeout_s=5.0)
        assert not res.correct and res.error is None
    assert time.perf_counter() - t0 < 1.0


def test_symbolic_feedback_never_contains_gold():
    for response in (r"\boxed{x^{17}}", "nothing here", r"\boxed{(1, 5)}", r"\boxed{3 or 4}"):
        res = verify_math(response, r"\frac{987}{654}x")
        assert not res.correct and "987" not in res.feedback and "654" not in res.feedback

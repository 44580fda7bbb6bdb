"""Reflection prompts, the answer-leak guard and teacher contexts."""

import pytest

from amrsd_jax.reflection import (REDACTION, ReflectionInputs, amr_sd_teacher_prompt,
                                  redact_answer, reflection_prompt, rlsd_teacher_prompt,
                                  sdpo_teacher_prompt, select_peer)


@pytest.mark.parametrize("text, gold, expected, count", [
    ("The answer is 42.", "42", f"The answer is {REDACTION}.", 1),
    ("Check 142 and 4.2 and 42x", "42", "Check 142 and 4.2 and 42x", 0),
    ("so =42, (42) and $42", "42", f"so ={REDACTION}, ({REDACTION}) and ${REDACTION}", 3),
    ("total 1,234 or 1234.0", "1234", f"total {REDACTION} or {REDACTION}", 2),
    ("is it -7?", "-7", f"is it {REDACTION}?", 1),
    ("Think about Paris.", "Paris", f"Think about {REDACTION}.", 1),
    ("no answer here", "", "no answer here", 0),
])
def test_redact_answer(text, gold, expected, count):
    assert redact_answer(text, gold) == (expected, count)


def test_reflection_prompt_privileged_inputs():
    wrong = reflection_prompt(ReflectionInputs("What is 2+3?", "2+3=6. Answer: 6", False,
                                               feedback="wrong value: got 6",
                                               peer_solution="2+3=5. Answer: 5"))
    assert "incorrect" in wrong and "wrong value: got 6" in wrong and "critique" in wrong
    assert "another student" in wrong and "Reference solution" not in wrong
    right = reflection_prompt(ReflectionInputs("What is 2+3?", "Answer: 5", True,
                                               reference_solution="2+3=5"))
    assert "Socratic hint" in right and "Reference solution" in right


def test_teacher_contexts():
    assert select_peer(0, ["a", "b", "c"], [True, False, True]) == "c"
    assert select_peer(1, ["a", "b"], [False, True]) is None  # never the rollout itself
    assert "Hint:" in amr_sd_teacher_prompt("Q", "why add?", True)
    assert "Critique of an earlier attempt:" in amr_sd_teacher_prompt("Q", "check", False)
    assert "solve the problem in your own way" in rlsd_teacher_prompt("Q", "sol")
    assert sdpo_teacher_prompt("Q", None, None) is None
    p = sdpo_teacher_prompt("Q", "peer", "fb")
    assert p.index("Correct solution:") < p.index("feedback") < p.index("Correctly solve")

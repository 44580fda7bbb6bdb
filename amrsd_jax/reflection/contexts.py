"""Teacher contexts of every method (docs/methods.md), as user messages.

The teacher re-scores the *same* response tokens after a prompt that carries extra
context; these functions build that prompt's user message. Tokenisation, left padding to
the bucketed prompt length and the response-alignment check happen in the trainer
(:func:`amrsd_jax.scoring.check_aligned_responses`).
"""

from __future__ import annotations

from typing import Sequence


def select_peer(index: int, responses: Sequence[str], correct: Sequence[bool]) -> str | None:
    """First verifier-approved rollout of the group other than ``index`` (or ``None``)."""
    for j, (text, ok) in enumerate(zip(responses, correct)):
        if ok and j != index:
            return text
    return None


def amr_sd_teacher_prompt(question: str, reflection: str, correct: bool) -> str:
    """AMR-SD: the question, then the (leak-guarded) reflection in a labelled block."""
    label = "Hint:" if correct else "Critique of an earlier attempt:"
    return f"{question.strip()}\n\n{label}\n{reflection.strip()}"


def raw_peer_teacher_prompt(question: str, peer_solution: str) -> str:
    """AMR-SD ablation "no reflection": the teacher sees a verifier-approved peer rollout
    verbatim where the self-written reflection would be."""
    return f"{question.strip()}\n\nA correct solution:\n{peer_solution.strip()}"


def rlsd_teacher_prompt(question: str, reference_solution: str) -> str:
    """RLSD: the raw reference solution before the request to solve in one's own way."""
    return (f"{question.strip()}\n\nHere is a reference solution:\n{reference_solution.strip()}"
            "\n\nAfter understanding the reference solution, solve the problem in your own way.")


def sdpo_teacher_prompt(question: str, peer_solution: str | None,
                        feedback: str | None) -> str | None:
    """SDPO reprompt; ``None`` when there is neither a peer solution nor feedback (the
    rollout then gets no distillation signal)."""
    if not peer_solution and not feedback:
        return None
    parts = [question.strip()]
    if peer_solution:
        parts.append(f"Correct solution:\n{peer_solution.strip()}")
    if feedback:
        parts.append("The following is feedback from your unsuccessful earlier attempt:\n"
                     f"{feedback.strip()}")
    parts.append("Correctly solve the original question.")
    return "\n\n".join(parts)

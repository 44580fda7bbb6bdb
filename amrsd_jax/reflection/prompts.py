"""Prompt templates for meta-reflection (docs/methods.md, "AMR-SD", step 2).

Correct rollout -> a Socratic *hint*: a question-shaped nudge toward the key step.
Incorrect rollout -> a targeted *critique*: where the attempt went wrong, what to check.
Neither may state the final answer. The prompt sees the question, the rollout, the
verifier outcome (and its feedback when the task gives one) and, when one exists, a
verifier-approved peer rollout from the same group (never the rollout itself); a
reference solution only when the config enables that source.

The request is either a new conversation that quotes the question and the attempt
(:func:`reflection_prompt`) or a follow-up turn in the attempt's own conversation
(:func:`follow_up_reflection_prompt`), whose prefill can reuse the rollout's KV cache.
"""

from __future__ import annotations

import dataclasses

HINT_INSTRUCTION = (
    "Write one short Socratic hint (at most two sentences) for a student solving this "
    "problem: ask a question that points toward the key step of the attempt above. "
    "Do not state the final answer or any intermediate result.")
CRITIQUE_INSTRUCTION = (
    "Write a short critique (at most two sentences) of the attempt above: say where it went "
    "wrong and what the student should check. Do not state the correct final answer.")


@dataclasses.dataclass(frozen=True)
class ReflectionInputs:
    """Privileged inputs of one reflection."""

    question: str
    rollout: str
    correct: bool
    feedback: str | None = None
    peer_solution: str | None = None  # a verifier-approved rollout of the same group
    reference_solution: str | None = None  # only when enabled in reflection_sources


def reflection_prompt(inputs: ReflectionInputs) -> str:
    """The user message asking the policy for its hint or critique."""
    return "\n\n".join([f"Problem:\n{inputs.question.strip()}",
                        f"Attempt:\n{inputs.rollout.strip()}", *_review(inputs)])


def follow_up_reflection_prompt(inputs: ReflectionInputs) -> str:
    """The same request as a follow-up user turn after the attempt itself (the question
    and the attempt are the conversation so far, so they are not repeated)."""
    return "\n\n".join(_review(inputs))


def _review(inputs: ReflectionInputs) -> list[str]:
    parts = ["Verifier: the attempt's final answer is "
             + ("correct." if inputs.correct else "incorrect.")]
    if inputs.feedback and not inputs.correct:
        parts.append(f"Verifier feedback: {inputs.feedback.strip()}")
    if inputs.peer_solution:
        parts.append(f"A correct solution by another student:\n{inputs.peer_solution.strip()}")
    if inputs.reference_solution:
        parts.append(f"Reference solution:\n{inputs.reference_solution.strip()}")
    parts.append(HINT_INSTRUCTION if inputs.correct else CRITIQUE_INSTRUCTION)
    return parts

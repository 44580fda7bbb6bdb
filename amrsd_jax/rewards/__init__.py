"""Verifiable rewards: rule-based answer checking, a reward registry and exception-safe scoring.

Pure Python (no JAX): ``verify_math`` extracts and checks a final answer, ``format_reward``
checks for a final-answer marker, and ``safe_reward`` / ``score_batch`` call any registered
reward function without ever raising on model output.
"""

from .math_verifier import (
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

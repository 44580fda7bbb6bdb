"""Verifiable rewards: answer checking, a reward registry and exception-safe scoring.

``verify_math`` (``reward.name=math``) extracts a final answer and checks it: a fast
rule-based path for numeric golds and Hugging Face's math-verify for symbolic ones, with
hedged answers rejected; ``math_strict``, ``gsm8k`` and ``math500`` also require a marked
answer and reject truncated responses (:func:`resolve_reward_name` applies
``reward.strict``). ``format_reward`` checks for a final-answer marker, and
``safe_reward`` / ``score_batch`` call any registered reward function without ever raising
on model output. ``python_tests`` (:mod:`.python_tests`) runs a response's Python code
against test code in a confined child process (:mod:`.sandbox`).
"""

from .math_verifier import (
    MAX_RESPONSE_CHARS,
    REWARD_FUNCTIONS,
    STRICT_REWARDS,
    VerifierResult,
    asks_for_marker,
    extract_answer,
    format_reward,
    get_reward_fn,
    is_numeric_gold,
    register_reward,
    resolve_reward_name,
    safe_reward,
    score_batch,
    verify_gsm8k,
    verify_math,
    verify_math500,
    verify_math_strict,
    verify_math_verify,
    warm_up,
)
from .python_tests import CodeTests, python_tests, python_tests_verbose
from .sandbox import Sandbox, SandboxConfig, SandboxSetupError

__all__ = [
    "CodeTests",
    "MAX_RESPONSE_CHARS",
    "REWARD_FUNCTIONS",
    "STRICT_REWARDS",
    "Sandbox",
    "SandboxConfig",
    "SandboxSetupError",
    "VerifierResult",
    "asks_for_marker",
    "extract_answer",
    "format_reward",
    "get_reward_fn",
    "is_numeric_gold",
    "python_tests",
    "python_tests_verbose",
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

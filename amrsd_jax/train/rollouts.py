"""Host-side steps of a training iteration between the jitted programs.

rollout tokens -> response texts -> verifier results -> (answer-span token masks for OAR)
-> reflection prompts -> leak-guarded reflections -> teacher user messages.
Everything here is plain Python/numpy over one step's ``B = prompts x G`` rows.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..reflection.contexts import (amr_sd_teacher_prompt, rlsd_teacher_prompt,
                                   sdpo_teacher_prompt, select_peer)
from ..reflection.leak_guard import redact_answer
from ..reflection.prompts import ReflectionInputs, follow_up_reflection_prompt, reflection_prompt
from ..rewards import VerifierResult, score_batch


def decode_responses(tokenizer, tokens: np.ndarray, lengths: np.ndarray) -> list[str]:
    """Texts of ``tokens [B, N]`` up to ``lengths [B]`` (special tokens dropped)."""
    return [tokenizer.decode(tokens[i, :int(lengths[i])].tolist(), skip_special_tokens=True)
            for i in range(tokens.shape[0])]


@dataclasses.dataclass(frozen=True)
class Verified:
    """Verifier outcome of one step's rollouts (``[B]`` arrays)."""

    results: list[VerifierResult]
    rewards: np.ndarray  # float32
    correct: np.ndarray  # bool
    errors: int


def verify(texts: Sequence[str], golds: Sequence[str], *, reward: str = "math",
           format_weight: float = 0.0, success_threshold: float = 1.0,
           timeout_s: float = 1.0, wall_timeout_s: float | None = None) -> Verified:
    """Score every rollout; a failing, hanging or garbage-returning reward call gives
    reward 0 and is counted (``errors``)."""
    results, errors = score_batch(reward, texts, golds, timeout_s=timeout_s,
                                  wall_timeout_s=wall_timeout_s)
    rewards = np.array([r.reward for r in results], np.float32)
    if format_weight:
        fmt, fmt_errors = score_batch("format", texts, golds)
        errors += fmt_errors
        rewards = (rewards + format_weight * np.array([r.reward for r in fmt], np.float32)) \
            / (1.0 + format_weight)
    correct = np.array([r.reward >= success_threshold and r.error is None for r in results])
    return Verified(results, rewards, correct, errors)


def drop_failed_groups(verified: Verified, response_mask: np.ndarray,
                       group_size: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``reward.on_error=drop_group``: a group with any failed reward call leaves the step.

    Its rewards become equal (advantage exactly 0) and its response mask 0 (no tokens in
    the loss or its normaliser). Returns ``(rewards, response_mask, groups_dropped)``.
    """
    failed = np.array([r.error is not None for r in verified.results])
    groups = failed.reshape(-1, group_size).any(axis=1)
    if not groups.any():
        return verified.rewards, response_mask, 0
    rows = np.repeat(groups, group_size)
    rewards = np.where(rows, 0.0, verified.rewards).astype(np.float32)
    mask = np.where(rows[:, None], 0, response_mask).astype(response_mask.dtype)
    return rewards, mask, int(groups.sum())


def answer_token_mask(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                      results: Sequence[VerifierResult]) -> np.ndarray:
    """``[B, N]`` 1 on the response tokens that overlap the verifier's answer span (OAR).

    Character offsets come from decoding growing prefixes of the sampled tokens, so they
    refer to exactly the text the verifier saw.
    """
    out = np.zeros(tokens.shape, np.int32)
    for i, res in enumerate(results):
        if res.answer_span is None:
            continue
        start, end = res.answer_span
        prev = 0
        for t in range(int(lengths[i])):
            cur = len(tokenizer.decode(tokens[i, :t + 1].tolist(), skip_special_tokens=True))
            if cur > start and prev < end:  # token t covers characters [prev, cur)
                out[i, t] = 1
            if prev >= end:
                break
            prev = cur
    return out


def group_peer(index: int, texts: Sequence[str], verified: Verified,
                group_size: int) -> str | None:
    """The first verifier-approved rollout of row ``index``'s group other than itself."""
    g0 = index - index % group_size
    return select_peer(index - g0, texts[g0:g0 + group_size],
                       verified.correct[g0:g0 + group_size].tolist())


def reflection_messages(questions: Sequence[str], texts: Sequence[str], verified: Verified,
                        group_size: int, *, use_peer: bool = True,
                        reference_solutions: Sequence[str | None] | None = None,
                        follow_up: bool = False) -> list[str]:
    """One reflection request per rollout (hint if correct, critique if not), with the
    privileged inputs of SPEC.md; the peer is another verifier-approved rollout of the group.
    ``follow_up``: the request as a next user turn after the rollout (question and attempt
    not repeated)."""
    render = follow_up_reflection_prompt if follow_up else reflection_prompt
    out = []
    for i, (question, text) in enumerate(zip(questions, texts)):
        peer = group_peer(i, texts, verified, group_size) if use_peer else None
        res = verified.results[i]
        out.append(render(ReflectionInputs(
            question=question, rollout=text, correct=bool(verified.correct[i]),
            feedback=res.feedback or None, peer_solution=peer,
            reference_solution=reference_solutions[i] if reference_solutions else None)))
    return out


def guard_reflections(reflections: Sequence[str], golds: Sequence[str],
                      enabled: bool = True) -> tuple[list[str], int]:
    """Redact the gold answer from every reflection; returns (texts, redactions)."""
    if not enabled:
        return list(reflections), 0
    out, total = [], 0
    for text, gold in zip(reflections, golds):
        text, n = redact_answer(text, str(gold))
        out.append(text)
        total += n
    return out, total


def teacher_messages(context: str, questions: Sequence[str], texts: Sequence[str],
                     verified: Verified, group_size: int, *,
                     reflections: Sequence[str] | None = None,
                     solutions: Sequence[str | None] | None = None) -> list[str | None]:
    """The teacher's user message per rollout for a method's ``teacher_context``.

    ``None`` means the rollout has no teacher signal (SDPO without peer or feedback).
    """
    if context == "reflection":
        return [amr_sd_teacher_prompt(q, r, bool(c))
                for q, r, c in zip(questions, reflections, verified.correct)]
    if context == "reference_solution":
        return [rlsd_teacher_prompt(q, s or "") for q, s in zip(questions, solutions)]
    if context == "reprompt":
        out = []
        for i, q in enumerate(questions):
            peer = group_peer(i, texts, verified, group_size)
            feedback = None if verified.correct[i] else (verified.results[i].feedback or None)
            out.append(sdpo_teacher_prompt(q, peer, feedback))
        return out
    raise ValueError(f"unknown teacher context {context!r}")

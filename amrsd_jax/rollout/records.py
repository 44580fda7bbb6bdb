"""One step's rollouts on the host: texts, verifier outcomes, the group structure.

rollout tokens -> response texts -> verifier results -> :class:`Rollouts`, the record the
training loop hands to a method's host hooks. Everything here is plain Python/numpy over
one step's ``B = prompts x G`` rows (rows of a group are contiguous).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..distributed import map_rows
from ..reflection.contexts import select_peer
from ..rewards import VerifierResult, score_batch
from .sampler import KVState, SampleOutput


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


def _to_json(result: VerifierResult | None) -> list | None:
    return None if result is None else list(dataclasses.astuple(result))


def _from_json(row: list | None) -> VerifierResult | None:
    if row is None:
        return None
    result = VerifierResult(*row)
    span = result.answer_span
    return result if span is None else dataclasses.replace(result, answer_span=tuple(span))


def verify(texts: Sequence[str], golds: Sequence[str], *, reward: str = "math",
           format_weight: float = 0.0, success_threshold: float = 1.0,
           timeout_s: float = 1.0, wall_timeout_s: float | None = None) -> Verified:
    """Score every rollout; a failing, hanging or garbage-returning reward call gives
    reward 0 and is counted (``errors``). On a pod each process verifies its share of the
    rows and every process receives all verdicts (:func:`~amrsd_jax.distributed.map_rows`).
    """
    if len(texts) != len(golds):
        raise ValueError(f"got {len(texts)} responses but {len(golds)} gold answers")

    def score_rows(rows: Sequence[int]) -> list[tuple]:  # (reward result, format result)
        mine, gold = [texts[i] for i in rows], [golds[i] for i in rows]
        results, _ = score_batch(reward, mine, gold, timeout_s=timeout_s,
                                 wall_timeout_s=wall_timeout_s)
        fmt = score_batch("format", mine, gold)[0] if format_weight else [None] * len(rows)
        return list(zip(results, fmt))

    pairs = map_rows(score_rows, range(len(texts)),
                     to_json=lambda pair: [_to_json(r) for r in pair],
                     from_json=lambda row: tuple(_from_json(r) for r in row))
    results = [r for r, _ in pairs]
    errors = sum(r.error is not None for r in results)
    rewards = np.array([r.reward for r in results], np.float32)
    if format_weight:
        fmt = [f for _, f in pairs]
        errors += sum(f.error is not None for f in fmt)
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


def group_peer(index: int, texts: Sequence[str], verified: Verified,
                group_size: int) -> str | None:
    """The first verifier-approved rollout of row ``index``'s group other than itself."""
    g0 = index - index % group_size
    return select_peer(index - g0, texts[g0:g0 + group_size],
                       verified.correct[g0:g0 + group_size].tolist())


@dataclasses.dataclass
class Rollouts:
    """The ``B = prompts x G`` rollouts of one step and their verifier outcome (host).

    examples: ``[B]`` the data rows (``prompt`` is the user message, ``answer`` the gold).
    prompt_ids, prompt_mask: ``[B, P]`` left-padded student prompts.
    sample: the sampler's :class:`SampleOutput` (``tokens``, ``mask``, ``logprobs``
      ``[B, N]``, ``lengths [B]``) as numpy arrays.
    texts: ``[B]`` decoded responses; verified: their :class:`Verified` outcome.
    rewards, response_mask: ``[B]``, ``[B, N]`` what the update step uses (a dropped
      group has equal rewards and an empty mask).
    kv_state: the sampler's device-side KV cache, kept only for a method that continues
      it (``Method.uses_rollout_cache``), else ``None``.
    """

    examples: list[dict]
    prompt_ids: np.ndarray
    prompt_mask: np.ndarray
    sample: SampleOutput
    texts: list[str]
    verified: Verified
    rewards: np.ndarray
    response_mask: np.ndarray
    group_size: int
    kv_state: KVState | None = None

    @property
    def questions(self) -> list[str]:
        return [ex["prompt"] for ex in self.examples]

    @property
    def golds(self) -> list[str]:
        return [str(ex["answer"]) for ex in self.examples]

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    def peer(self, index: int) -> str | None:
        """A verifier-approved rollout of row ``index``'s group other than itself."""
        return group_peer(index, self.texts, self.verified, self.group_size)

    def mixed_group_rows(self) -> np.ndarray:
        """Rows of groups whose rewards are not all equal (``A != 0`` somewhere)."""
        grouped = np.asarray(self.rewards, np.float32).reshape(-1, self.group_size)
        return np.flatnonzero(np.repeat(grouped.max(1) > grouped.min(1), self.group_size))

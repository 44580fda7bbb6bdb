"""User messages -> left-padded, bucketed token batches, with a sequence budget.

Prompts longer than the budget are never silently mangled: ``on_long="skip"`` drops them
and ``"truncate"`` keeps their last ``max_tokens`` tokens (so the assistant header that
starts the answer survives); either way the count is returned for the logs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from .sampler import DEFAULT_BUCKETS, bucket_length


@dataclasses.dataclass(frozen=True)
class EncodedPrompts:
    """``ids``/``mask`` ``[len(kept), width]`` int32, left-padded; ``kept`` indexes the inputs."""

    ids: np.ndarray
    mask: np.ndarray
    kept: tuple[int, ...]
    skipped: int
    truncated: int


def encode_chat(tokenizer, messages: Sequence[str], *, max_tokens: int,
                system_prompt: str | None = None, on_long: str = "skip",
                buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> EncodedPrompts:
    """Render user ``messages`` with the chat template and tokenize them.

    The width is the longest kept prompt rounded up to a bucket, so a run compiles a
    handful of shapes.
    """
    from ..models.tokenizer import apply_chat_template

    if on_long not in ("skip", "truncate"):
        raise ValueError(f"on_long must be 'skip' or 'truncate', got {on_long!r}")
    texts = apply_chat_template(tokenizer, list(messages), system_prompt=system_prompt)
    rows = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    kept, out_rows, skipped, truncated = [], [], 0, 0
    for i, row in enumerate(rows):
        if len(row) > max_tokens:
            if on_long == "skip":
                skipped += 1
                continue
            row = row[-max_tokens:]
            truncated += 1
        kept.append(i)
        out_rows.append(row)
    ids, mask = _left_pad_bucketed(tokenizer, out_rows, buckets)
    return EncodedPrompts(ids, mask, tuple(kept), skipped, truncated)


def _left_pad_bucketed(tokenizer, rows: Sequence[Sequence[int]], buckets):
    """:func:`left_padded` to the longest row rounded up to a bucket, with the tokenizer's
    pad id."""
    longest = max((len(r) for r in rows), default=1)
    width = bucket_length(longest, buckets) if buckets else longest
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return left_padded(rows, width, pad)


def left_padded(rows: Sequence[Sequence[int]], width: int, pad_id: int) -> tuple[np.ndarray,
                                                                                 np.ndarray]:
    """``[len(rows), width]`` int32 ids and mask, each row right-aligned."""
    ids = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, row in enumerate(rows):
        if len(row):
            ids[b, width - len(row):] = row
            mask[b, width - len(row):] = 1
    return ids, mask


_TURN_MARK = "\x00AMRSD_TURN\x00"


def encode_follow_up(tokenizer, messages: Sequence[str], ended_with_stop: Sequence[bool],
                     stop_ids: Sequence[int], *, max_tokens: int,
                     system_prompt: str | None = None,
                     buckets: Sequence[int] | None = DEFAULT_BUCKETS) -> EncodedPrompts:
    """Tokens that continue an assistant turn with a new user ``messages[i]`` and the next
    assistant header, as the chat template renders them (``[batch, width]`` left-padded).

    They are appended to a generated response (see
    :func:`amrsd_jax.rollout.sampler.continue_generation`). The template's end-of-turn token
    is dropped for rows whose response already ended with a stop token
    (``ended_with_stop[i]``), and kept to close the turn of a response cut at the length
    limit. Longer than ``max_tokens``: the last ``max_tokens`` are kept (``truncated``).
    """
    from ..models.tokenizer import apply_chat_template

    # the text after the assistant turn does not depend on the turns before it
    convs = [[{"role": "user", "content": "?"}, {"role": "assistant", "content": _TURN_MARK},
              {"role": "user", "content": m}] for m in messages]
    texts = apply_chat_template(tokenizer, convs, system_prompt=system_prompt)
    tails = [t.split(_TURN_MARK, 1)[1] for t in texts]
    rows = tokenizer(tails, add_special_tokens=False)["input_ids"] if tails else []
    stops, out_rows, truncated = set(int(s) for s in stop_ids), [], 0
    for row, ended in zip(rows, ended_with_stop):
        if ended and row and row[0] in stops:
            row = row[1:]
        if len(row) > max_tokens:
            row, truncated = row[-max_tokens:], truncated + 1
        out_rows.append(row)
    ids, mask = _left_pad_bucketed(tokenizer, out_rows, buckets)
    return EncodedPrompts(ids, mask, tuple(range(len(out_rows))), 0, truncated)

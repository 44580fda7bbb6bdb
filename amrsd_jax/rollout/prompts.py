"""User messages -> left-padded, bucketed token batches, with a sequence budget.

Prompts longer than the budget are never silently mangled: ``on_long="skip"`` drops them
and ``"truncate"`` keeps their last ``max_tokens`` tokens (so the assistant header that
starts the answer survives); either way the count is returned for the logs.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from ..models.tokenizer import apply_chat_template
from .sampler import DEFAULT_BUCKETS, bucket_length, resolve_pad_id


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
                buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                min_width: int = 0) -> EncodedPrompts:
    """Render user ``messages`` with the chat template and tokenize them.

    The width is the longest kept prompt (at least ``min_width``) rounded up to a bucket,
    so a run compiles a handful of shapes.
    """
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
    ids, mask = _left_pad_bucketed(tokenizer, out_rows, buckets, min_width)
    return EncodedPrompts(ids, mask, tuple(kept), skipped, truncated)


def _left_pad_bucketed(tokenizer, rows: Sequence[Sequence[int]], buckets, min_width: int = 0):
    """:func:`left_padded` to the longest row (at least ``min_width``) rounded up to a
    bucket."""
    longest = max(max((len(r) for r in rows), default=1), min_width)
    width = bucket_length(longest, buckets) if buckets else longest
    return left_padded(rows, width, resolve_pad_id(tokenizer))


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
                     buckets: Sequence[int] | None = DEFAULT_BUCKETS,
                     min_width: int = 0) -> EncodedPrompts:
    """Tokens that continue an assistant turn with a new user ``messages[i]`` and the next
    assistant header, as the chat template renders them (``[batch, width]`` left-padded).

    They are appended to a generated response (see
    :func:`amrsd_jax.rollout.sampler.continue_generation`). The template's end-of-turn token
    is dropped for rows whose response already ended with a stop token
    (``ended_with_stop[i]``), and kept to close the turn of a response cut at the length
    limit. Longer than ``max_tokens``: the last ``max_tokens`` are kept (``truncated``).
    The width is at least ``min_width`` (then bucketed), as in :func:`encode_chat`.
    """
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
    ids, mask = _left_pad_bucketed(tokenizer, out_rows, buckets, min_width)
    return EncodedPrompts(ids, mask, tuple(range(len(out_rows))), 0, truncated)


def encode_teacher_prompts(tokenizer, messages: Sequence[str | None], fallback_ids: np.ndarray,
                           fallback_mask: np.ndarray, *, max_tokens: int,
                           system_prompt: str | None, min_width: int = 0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Left-padded teacher prompts ``(ids, mask, valid, truncated)``, ``[batch, width]``.

    ``messages[i] is None`` means row ``i`` has no teacher context: it reuses its student
    prompt (``fallback_ids/mask [batch, time]``) and is marked ``valid[i] = False``. The
    width is at least the student prompt's and ``min_width``; prompts over ``max_tokens``
    keep their last ``max_tokens`` tokens (``truncated`` counts them).
    """
    valid = np.array([m is not None for m in messages])
    if not valid.any():
        return fallback_ids, fallback_mask, valid, 0
    enc = encode_chat(tokenizer, [m if m is not None else "" for m in messages],
                      max_tokens=max_tokens, system_prompt=system_prompt, on_long="truncate")
    width = max(enc.ids.shape[1], fallback_ids.shape[1], min_width)
    rows = [enc.ids[i][enc.mask[i].astype(bool)] if valid[i]
            else fallback_ids[i][fallback_mask[i].astype(bool)] for i in range(len(messages))]
    ids, mask = left_padded(rows, width, resolve_pad_id(tokenizer))
    return ids, mask, valid, enc.truncated


def fit_privileged(tokenizer, render: Callable[[str], str], privileged: str, *,
                   max_tokens: int, system_prompt: str | None = None) -> tuple[str, bool]:
    """The user message ``render(privileged)``, with ``privileged`` (a peer solution, a
    reference solution, a reflection) cut from its end until the chat-encoded prompt fits
    ``max_tokens``; the rest of the message, the question first, is never cut. Returns
    ``(message, whether privileged was cut)``."""

    def length(text: str) -> int:
        rendered = apply_chat_template(tokenizer, [render(text)], system_prompt=system_prompt)
        return len(tokenizer(rendered, add_special_tokens=False)["input_ids"][0])

    over = length(privileged) - max_tokens
    if over <= 0:
        return render(privileged), False
    ids = tokenizer(privileged, add_special_tokens=False)["input_ids"]
    keep = max(len(ids) - over, 0)
    text = tokenizer.decode(ids[:keep])
    while keep > 0 and length(text) > max_tokens:  # re-tokenising may add a token or two
        keep -= 1
        text = tokenizer.decode(ids[:keep])
    return render(text), True

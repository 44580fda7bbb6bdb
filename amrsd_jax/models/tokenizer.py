"""Tokenizers: build from GGUF metadata, load from a checkpoint dir, chat templates, batching.

Batches are left padded (prompts end where generation starts, so every row's next token sits
in the last column) and returned as int32 numpy arrays ready for ``jnp.asarray``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

from .gguf_metadata import metadata_from_reader, read_gguf_metadata

# ``transformers`` is imported lazily, inside the functions that build tokenizers: it costs
# about a second, and ``amrsd_jax.models`` imports this module at package level.
if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

__all__ = ["apply_chat_template", "encode_prompts", "load_tokenizer", "tokenizer_from_gguf"]

Conversation = list[dict[str, str]]

# llama.cpp ``tokenizer.ggml.pre`` values (see llama-vocab.cpp) whose split is exactly the GPT-2
# regex (= ByteLevel(use_regex=True)), or "\p{N}" (one digit per piece) followed by it, which
# is what the original SmolLM / StarCoder tokenizer.json encode as Digits + ByteLevel.
_GPT2_PRE = {"gpt-2", "mpt", "olmo", "jais"}
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}


def tokenizer_from_gguf(
    source: gguf.GGUFReader | str | os.PathLike[str] | Mapping[str, Any],
) -> PreTrainedTokenizerFast:
    """Byte-level BPE fast tokenizer from a GGUF's ``tokenizer.ggml.*`` metadata.

    Args:
      source: a GGUF path (only the metadata is read), an open ``GGUFReader``, or a metadata
        dict as returned by :func:`~amrsd_jax.models.gguf_metadata.read_gguf_metadata`.

    The result mirrors the original ``tokenizer.json`` of llama.cpp ``gpt2``-model files:
    BPE over the GGUF vocab and merges, ByteLevel pre-tokenizer without prefix space
    (preceded by per-digit splitting for ``pre == "smollm"``), ByteLevel decoder, control
    tokens (``token_type == 3``) as special added tokens, user-defined ones (4) as plain added
    tokens, special tokens and ``chat_template`` taken from the metadata.
    """
    from transformers import PreTrainedTokenizerFast

    if isinstance(source, gguf.GGUFReader):
        meta = metadata_from_reader(source)
    elif isinstance(source, Mapping):
        meta = source
    else:
        meta = read_gguf_metadata(source)

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(
            f"only byte-level BPE GGUF tokenizers (tokenizer.ggml.model == 'gpt2') are supported, "
            f"got {kind!r}")
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    token_types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("GGUF vocabulary contains duplicate tokens")
    # merges are "left right"; byte-level symbols never contain a literal space
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=False,
                               byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        if pre not in _GPT2_PRE:
            warnings.warn(f"GGUF pre-tokenizer {pre!r} is approximated by the GPT-2 ByteLevel "
                          f"regex; token ids may differ from the original tokenizer", stacklevel=2)
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    def token_of(key: str) -> str | None:
        idx = meta.get(key)
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token_of("tokenizer.ggml.bos_token_id"), token_of("tokenizer.ggml.eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        # the file asks for BOS/EOS around every encoded sequence (SmolLM2 asks for neither)
        prefix, suffix = ([bos] if add_bos else []), ([eos] if add_eos else [])
        single = [*prefix, "$A", *suffix]
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join(single),
            pair=" ".join(single + [*prefix, "$B", *suffix]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(prefix + suffix)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    def added(i: int, special: bool) -> AddedToken:
        return AddedToken(tokens[i], special=special, normalized=False, lstrip=False,
                          rstrip=False, single_word=False)

    tok.add_special_tokens([added(i, True) for i, t in enumerate(token_types)
                            if t == gguf.TokenType.CONTROL])
    tok.add_tokens([added(i, False) for i, t in enumerate(token_types)
                    if t == gguf.TokenType.USER_DEFINED])

    arch = meta.get("general.architecture")
    max_len = meta.get(f"{arch}.context_length") if arch else None
    kwargs: dict[str, Any] = {
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token_of("tokenizer.ggml.unknown_token_id"),
        "pad_token": token_of("tokenizer.ggml.padding_token_id"),
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    # like the original tokenizer_config: every control token counts as special
    named = set(kwargs.values())
    kwargs["additional_special_tokens"] = [
        tokens[i] for i, t in enumerate(token_types)
        if t == gguf.TokenType.CONTROL and tokens[i] not in named]
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,  # keeps decode(encode(s)) == s
        model_max_length=int(max_len) if max_len else int(1e30),
        padding_side="left",
        **kwargs,
    )


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerFast:
    """Fast tokenizer of a local checkpoint directory, left padded, with a pad token.

    Never downloads and never runs remote code; the pad token defaults to the eos token.
    """
    from transformers import AutoTokenizer  # lazy: importing the auto classes costs seconds

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist (local paths only)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=False, use_fast=True)
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{path} did not yield a fast (tokenizers-backed) tokenizer")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_chat_template(
    tokenizer: PreTrainedTokenizerFast,
    prompts: Sequence[str] | Sequence[Conversation],
    system_prompt: str | None = None,
) -> list[str]:
    """Render prompts with the tokenizer's chat template, ending in the assistant header.

    Args:
      tokenizer: tokenizer with a ``chat_template``.
      prompts: user messages (each becomes a one-turn conversation) or conversations
        (lists of ``{"role", "content"}`` dicts).
      system_prompt: prepended as a system message; an error if a conversation already
        starts with one. ``None`` keeps the template's default (SmolLM2 inserts its own).

    Returns:
      One rendered string per prompt (special tokens included as text).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "this tokenizer has no chat_template; use a chat/instruct checkpoint or set "
            "tokenizer.chat_template before rendering conversations")
    rendered = []
    for prompt in prompts:
        conv: Conversation = ([{"role": "user", "content": prompt}] if isinstance(prompt, str)
                              else [dict(m) for m in prompt])
        if system_prompt is not None:
            if conv and conv[0].get("role") == "system":
                raise ValueError(
                    "system_prompt given but the conversation already has a system message")
            conv = [{"role": "system", "content": system_prompt}, *conv]
        text = tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        rendered.append(str(text))
    return rendered


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast,
    texts: Sequence[str],
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Tokenize rendered prompts into a left-padded batch.

    No special tokens are added (rendered chat templates already contain them).

    Args:
      tokenizer: tokenizer with a pad token (see :func:`load_tokenizer`).
      texts: ``batch`` strings.
      max_length: if given, the batch has exactly this width (a fixed shape avoids
        recompiling jitted code) and longer prompts keep their last ``max_length`` tokens,
        i.e. are truncated on the left so the generation prompt survives. Otherwise the
        width is the longest prompt.

    Returns:
      ``input_ids`` int32 ``[batch, time]`` (pad id on the left) and ``attention_mask``
      int32 ``[batch, time]`` (1 for real tokens).
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token; load it with load_tokenizer()")
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not a single string")
    ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        ids = [row[-max_length:] for row in ids]
        width = max_length
    else:
        width = max((len(row) for row in ids), default=0)
    input_ids = np.full((len(ids), width), tokenizer.pad_token_id, dtype=np.int32)
    attention_mask = np.zeros((len(ids), width), dtype=np.int32)
    for b, row in enumerate(ids):
        if row:
            input_ids[b, width - len(row):] = row
            attention_mask[b, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}

"""Data for a run: examples from the configured source, tokenised once under the budget.

Every prompt is rendered with the chat template and tokenised at start-up, so prompts
over ``data.max_prompt_tokens`` are skipped or truncated (and counted) before any compute
is spent, and the student prompt width is fixed for the whole run (one compiled
rollout and update program).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from ..data import (ArithmeticTask, CodeTask, FieldMap, PromptStream, load_code_jsonl,
                    load_humaneval, load_local, load_tfds, render_prompt)
from ..rollout.prompts import encode_chat
from .config import DataConfig


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """Examples with their prompt tokens. ``examples[i]["prompt"]`` is the user message."""

    examples: list[dict[str, Any]]
    prompt_tokens: list[np.ndarray]  # one int32 row per example, unpadded
    width: int  # the width every prompt of this split fits (a multiple of 8)
    skipped_long: int
    truncated_long: int
    skipped_rows: int  # bad rows of the source (missing/empty fields, bad encoding)
    problems: list[str]


def _field_map(cfg: DataConfig) -> FieldMap:
    return FieldMap(question=cfg.question_field, answer=cfg.answer_field,
                    solution=cfg.solution_field, answer_from_solution=cfg.answer_from_solution)


def load_examples(cfg: DataConfig, split: str, *, seed: int = 0) -> tuple[list[dict], int,
                                                                        list[str]]:
    """Raw examples of ``split`` ("train" or "eval"): ``(examples, skipped_rows, problems)``."""
    if split == "eval" and cfg.eval_source == "humaneval":
        result = load_humaneval()
        return result.examples[:cfg.eval_size or None], 0, []
    if cfg.source == "code":
        size = cfg.train_size if split == "train" else cfg.eval_size
        task = CodeTask(list(cfg.level), seed=cfg.seed,
                        split="train" if split == "train" else "test", size=size,
                        prompt_suffix=None)
        return list(task), 0, []
    if cfg.source == "arithmetic":
        size = cfg.train_size if split == "train" else cfg.eval_size
        levels = cfg.level if len(cfg.level) > 1 else cfg.level[0]
        task = ArithmeticTask(levels, seed=cfg.seed, split="train" if split == "train" else "test",
                              size=size, prompt_suffix=None)
        return list(task), 0, []
    if cfg.source == "local":
        path = cfg.path if split == "train" else cfg.eval_path
        if path is None:
            return [], 0, []
        result = load_local(path, _field_map(cfg), on_bad_row=cfg.on_bad_row)
    elif cfg.source == "code_jsonl":
        path = cfg.path if split == "train" else cfg.eval_path
        if path is None:
            return [], 0, []
        result = load_code_jsonl(path, on_bad_row=cfg.on_bad_row)
    else:
        name_split = cfg.train_split if split == "train" else cfg.eval_split
        result = load_tfds(cfg.tfds_name, name_split, _field_map(cfg),
                           data_dir=cfg.tfds_data_dir, on_bad_row=cfg.on_bad_row)
    examples = list(result.examples)
    if split == "eval" and cfg.eval_size and len(examples) > cfg.eval_size:
        examples = examples[:cfg.eval_size]  # the first rows: the same set every run
    return examples, result.skipped, list(result.problems)


def prepare(tokenizer, examples: Sequence[dict], cfg: DataConfig, *,
            system_prompt: str | None = None) -> PreparedData:
    """Render and tokenise every example's prompt under ``cfg.max_prompt_tokens``."""
    messages = [render_prompt(ex, cfg.prompt_suffix) for ex in examples]
    enc = encode_chat(tokenizer, messages, max_tokens=cfg.max_prompt_tokens,
                      system_prompt=system_prompt, on_long=cfg.on_long_prompt, buckets=None)
    kept = []
    tokens = []
    for row, i in enumerate(enc.kept):
        kept.append(dict(examples[i], prompt=messages[i]))
        tokens.append(enc.ids[row][enc.mask[row].astype(bool)])
    # one width for the whole split (one compiled program), so no bucket is needed: round
    # up to a multiple of 8 only, instead of wasting up to a third of every row on padding
    longest = max((len(t) for t in tokens), default=1)
    return PreparedData(kept, tokens, -(-longest // 8) * 8, enc.skipped, enc.truncated, 0, [])


def prepare_split(tokenizer, run, split: str, examples=None, log=print) -> PreparedData:
    """:func:`prepare` the run's ``split`` ("train" / "eval"), loading the examples from
    ``run.data`` unless given; bad rows and over-long prompts are counted and reported."""
    skipped_rows, problems = 0, []
    if examples is None:
        examples, skipped_rows, problems = load_examples(run.data, split)
        for p in problems[:5]:
            log(f"skipped bad {split} row: {p}")
    data = prepare(tokenizer, examples, run.data, system_prompt=run.model.system_prompt)
    if data.skipped_long or data.truncated_long or skipped_rows:
        log(f"{split}: {len(data.examples)} prompts; {skipped_rows} bad rows skipped, "
            f"{data.skipped_long} over {run.data.max_prompt_tokens} tokens skipped, "
            f"{data.truncated_long} truncated")
    return dataclasses.replace(data, skipped_rows=skipped_rows, problems=problems)


def prompt_stream(data: PreparedData, run) -> PromptStream:
    """The step's ``rollout.prompts_per_step`` prompts, shuffled by the run seed, epoch after
    epoch. Every process draws the same global batch (the control plane is replicated, see
    :mod:`amrsd_jax.distributed`); the mesh splits its rows over the devices."""
    if not data.examples:
        raise ValueError("no training examples left after loading and the prompt budget "
                         f"(skipped {data.skipped_long} long prompts)")
    return PromptStream(list(range(len(data.examples))), run.rollout.prompts_per_step,
                        seed=run.seed)

"""The phases of one training iteration, each a function returning a typed record:

    rollout_phase          -> Rollouts       (prompts -> G samples -> verifier)
    method.teacher_inputs  -> TeacherInputs  (the method's privileged context, tokenised)
    score_phase            -> UpdateBatch    (old / reference log-probs + the method's passes)
    update_phase           -> UpdateResult   (the one jitted update step)

They hold no state: the trainer passes in what they read and keeps what they return.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np

from ..batch import UpdateBatch, make_batch
from ..distributed import check_agreement, global_arrays
from ..methods.base import Method, MethodContext, TeacherInputs
from ..programs import Programs
from ..rollout.prompts import left_padded
from ..rollout.records import Rollouts, decode_responses, drop_failed_groups, verify
from ..rollout.sampler import SamplingConfig
from ..update import TrainState


@dataclasses.dataclass
class Counters:
    """Run totals, logged as ``total/<name>`` and saved in checkpoints: the loop's own, and
    whatever a method reports (``TeacherInputs.counts``, declared in ``Method.counters``)."""

    skipped_long_prompts: int = 0
    truncated_long_prompts: int = 0
    reward_errors: int = 0
    dropped_groups: int = 0
    consecutive_skips: int = 0
    skipped_steps: int = 0
    method: dict[str, int] = dataclasses.field(default_factory=dict)

    def add(self, counts: dict[str, int]) -> None:
        for name, n in counts.items():
            if name in self.method or not hasattr(self, name) or name == "method":
                self.method[name] = self.method.get(name, 0) + int(n)
            else:
                setattr(self, name, getattr(self, name) + int(n))

    def as_dict(self) -> dict[str, int]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "method"}
        return {**out, **self.method}

    def load(self, saved: dict) -> None:
        """Take the totals of a checkpoint (``as_dict``); names it lacks keep their value."""
        for name, value in saved.items():
            if name != "method" and hasattr(self, name):
                setattr(self, name, int(value))
            else:
                self.method[name] = int(value)


@dataclasses.dataclass
class UpdateResult:
    state: TrainState
    teacher_params: Any
    metrics: dict[str, float]
    skipped: bool


@dataclasses.dataclass
class StepRecord:
    """Everything one iteration produced: its metrics and the inputs of its update step."""

    step: int
    metrics: dict[str, float]
    rollouts: Rollouts
    teacher: TeacherInputs | None
    batch: UpdateBatch

    @property
    def reflections(self) -> list | None:
        return None if self.teacher is None else self.teacher.reflections

    def completions(self) -> list[dict]:
        """One record per rollout: its group, prompt, completion, gold answer, reward,
        correctness and the verifier's feedback (``logging.completions_every``)."""
        r = self.rollouts
        return [{"group": i // r.group_size, "prompt": ex["prompt"], "completion": text,
                 "gold": str(ex["answer"]), "reward": float(reward), "correct": bool(ok),
                 "feedback": result.feedback}
                for i, (ex, text, reward, ok, result) in enumerate(zip(
                    r.examples, r.texts, r.rewards, r.verified.correct, r.verified.results))]


def bucket_rows(rows: np.ndarray, quantum: int, limit: int) -> np.ndarray:
    """``rows`` padded (repeating its first entry) to ``min(quantum * 2**k, limit)``
    entries, so row-subset programs compile for a few batch sizes only. ``quantum``
    divides ``limit`` (the step's rows) and is a multiple of the mesh's batch axes, so
    every bucket shards evenly."""
    n = max(len(rows), 1)
    size = quantum
    while size < n:
        size *= 2
    size = max(min(size, limit), n)
    fill = rows[0] if len(rows) else 0
    return np.concatenate([rows, np.full(size - len(rows), fill, np.asarray(rows).dtype
                                         if len(rows) else np.int64)])


def row_quantum(group_size: int, mesh) -> int:
    """Row-subset batches come in multiples of this (a group, and the batch axes)."""
    return math.lcm(group_size, mesh.shape["data"] * mesh.shape["fsdp"])


def rollout_phase(run, programs: Programs, tokenizer, params, data, indices, key,
                  keep_cache: bool) -> Rollouts:
    """Sample ``G`` rollouts of each prompt ``data.examples[i], i in indices`` and verify."""
    G = run.rollout.group_size
    examples = [data.examples[i] for i in indices for _ in range(G)]
    prompt_ids, prompt_mask = left_padded(
        [data.prompt_tokens[i] for i in indices for _ in range(G)], data.width, programs.pad_id)
    r = run.rollout
    sampling = SamplingConfig(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                              top_p=r.top_p, top_k=r.top_k)
    out = programs.sample(params, prompt_ids, prompt_mask, key, sampling, keep_cache=keep_cache)
    sample, kv_state = out if keep_cache else (out, None)
    texts = decode_responses(tokenizer, sample.tokens, sample.lengths)
    rw = run.reward
    verified = verify(texts, [str(ex["answer"]) for ex in examples], reward=run.reward_name(),
                      format_weight=rw.format_weight, success_threshold=rw.success_threshold,
                      timeout_s=rw.timeout_s, wall_timeout_s=rw.wall_timeout_s)
    return Rollouts(examples, prompt_ids, prompt_mask, sample, texts, verified,
                    verified.rewards, sample.mask, G, kv_state)


def drop_groups(run, rollouts: Rollouts) -> int:
    """``reward.on_error=drop_group``: groups with a failed reward call leave the step."""
    if run.reward.on_error != "drop_group" or not rollouts.verified.errors:
        return 0
    rollouts.rewards, rollouts.response_mask, dropped = drop_failed_groups(
        rollouts.verified, rollouts.sample.mask, rollouts.group_size)
    return dropped


def score_phase(method: Method, ctx: MethodContext, rollouts: Rollouts,
                teacher: TeacherInputs | None, ref_params) -> tuple[UpdateBatch, dict]:
    """The update batch: old-policy (and reference) log-probs, then the method's passes."""
    programs = ctx.programs
    args = (rollouts.prompt_ids, rollouts.prompt_mask, rollouts.sample.tokens,
            rollouts.response_mask)
    lp_old, entropy = programs.score_old(ctx.params, *args)
    lp_ref = None if ref_params is None else programs.score(ref_params, *args)[0]
    batch = make_batch(prompt_ids=rollouts.prompt_ids, prompt_mask=rollouts.prompt_mask,
                       response_ids=rollouts.sample.tokens,
                       response_mask=rollouts.response_mask, rewards=rollouts.rewards,
                       sampler_logprobs=rollouts.sample.logprobs, old_logprobs=lp_old,
                       ref_logprobs=lp_ref, entropy=entropy)
    batch, metrics = method.score(ctx, rollouts, teacher, batch)
    jax.block_until_ready(batch.old_logprobs)
    return batch, metrics


def update_phase(programs: Programs, state: TrainState, teacher_params,
                 batch: UpdateBatch) -> UpdateResult:
    """One optimizer step; the model reads the new weights afterwards."""
    if batch.present != programs.batch.present:
        raise ValueError(f"the update step takes the fields {list(programs.batch.present)}; "
                         f"this batch has {list(batch.present)} (a method's score hook must "
                         "fill exactly the fields it declares)")
    batch = make_batch(**{k: getattr(batch, k) for k in batch.present})
    check_agreement("the update batch's shapes",
                    {k: np.shape(getattr(batch, k)) for k in batch.present})
    batch = global_arrays(batch, batch.shardings(programs.mesh))
    state, teacher_params, device_metrics = programs.update(state, batch, teacher_params)
    metrics = {k: float(v) for k, v in jax.device_get(device_metrics).items()}
    return UpdateResult(state, teacher_params, metrics, bool(metrics["update_skipped"]))

"""RLSD: the reference solution as teacher context, a frozen teacher, and the clipped
sign-aware likelihood ratio as per-token weight.

Math: :func:`amrsd_jax.credit.rlsd.rlsd_token_advantages`. Teacher: the initial policy,
frozen (a weight copy made at start-up), scoring each rollout after a prompt that shows
the reference solution.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ..credit.rlsd import RLSDConfig, rlsd_token_advantages
from ..reflection.contexts import rlsd_teacher_prompt
from ..rollout.prompts import encode_teacher_prompts
from .base import Method, TeacherInputs, register


@register
class RLSD(Method):
    name = "rlsd"
    config_type = RLSDConfig
    fields = ("teacher_logprobs",)
    counters = ("truncated_teacher_prompts",)
    description = "reference solution as teacher context; clipped sign-aware likelihood ratio"

    @classmethod
    def check_run(cls, run) -> None:
        if not run.data.has_reference_solutions:
            raise ValueError(
                f"method {cls.name!r} needs a reference solution per example, but data source "
                f"{run.data.source!r} has none configured; set data.solution_field (or "
                "data.answer_from_solution=true for GSM8K-style answers)")

    def scoring_passes(self, run) -> dict[str, int]:
        return {"teacher": run.reflection.max_teacher_prompt_tokens}

    def init_teacher(self, params):
        return jax.tree.map(jnp.copy, params)  # frozen: the initial policy

    def teacher_inputs(self, ctx, rollouts):
        messages = [rlsd_teacher_prompt(ex["prompt"], ex.get("solution") or "")
                    for ex in rollouts.examples]
        ids, mask, valid, truncated = encode_teacher_prompts(
            ctx.tokenizer, messages, rollouts.prompt_ids, rollouts.prompt_mask,
            max_tokens=ctx.config.reflection.max_teacher_prompt_tokens,
            system_prompt=ctx.config.model.system_prompt)
        rows = np.arange(rollouts.num_rows)
        return TeacherInputs(ids, mask, valid, rows, rows,
                             metrics={"teacher_valid_frac": float(valid.mean())},
                             counts={"truncated_teacher_prompts": truncated})

    def score(self, ctx, rollouts, teacher, batch):
        lp_teacher, _ = ctx.programs.score(ctx.teacher_params, teacher.ids, teacher.mask,
                                           rollouts.sample.tokens, rollouts.response_mask)
        return batch.replace(teacher_logprobs=lp_teacher), {}

    def token_advantages(self, advantages, batch, mask, step):
        return rlsd_token_advantages(advantages, batch.teacher_logprobs, batch.old_logprobs,
                                     mask, self.config)

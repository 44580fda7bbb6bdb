"""RLSD: the reference solution as teacher context, a frozen teacher, and the clipped
sign-aware likelihood ratio as per-token weight.

The recipe is the authors' (iie-ycx/RLSD ``rlsd_train.sh``), which the library follows
(docs/methods.md, "RLSD"):
``lam`` 0.5 decaying linearly to 0 over ``decay_steps = 60`` optimizer steps (pure GRPO
after), token weights clipped to ``[0.8, 1.2]``, and a frozen teacher (the initial
policy) re-copied from the policy after every 20th step (``teacher.refresh_every``).
Math: :func:`amrsd_jax.credit.rlsd.rlsd_token_advantages`. The teacher scores each
rollout after a prompt showing the reference solution. Difference: the authors' ``d`` uses
the current policy's log-probs from the training forward; here it is ``lp_old``, the same
number when (as in their recipe) each batch takes one optimizer step.
"""

from __future__ import annotations

import numpy as np

from ..credit.rlsd import RLSDConfig, rlsd_token_advantages
from ..reflection.contexts import rlsd_teacher_prompt
from ..rollout.prompts import fit_privileged
from .base import Method, TeacherPolicy, every_row_teacher_inputs, register


@register
class RLSD(Method):
    name = "rlsd"
    config_type = RLSDConfig
    fields = ("teacher_logprobs",)
    counters = ("truncated_teacher_prompts",)
    teacher = TeacherPolicy("frozen", refresh_every=20)
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

    def teacher_inputs(self, ctx, rollouts):
        run, messages, cut = ctx.config, [], 0
        for ex in rollouts.examples:  # the solution is cut to fit, never the question
            message, was_cut = fit_privileged(
                ctx.tokenizer, lambda p, q=ex["prompt"]: rlsd_teacher_prompt(q, p),
                ex.get("solution") or "", max_tokens=run.reflection.max_teacher_prompt_tokens,
                system_prompt=run.model.system_prompt)
            messages.append(message)
            cut += was_cut
        return every_row_teacher_inputs(ctx, rollouts, messages, cut=cut,
                                        rows=np.arange(rollouts.num_rows))

    def score(self, ctx, rollouts, teacher, batch):
        lp_teacher, _ = ctx.programs.score(ctx.teacher_weights, teacher.ids, teacher.mask,
                                           rollouts.sample.tokens, rollouts.response_mask)
        return batch.replace(teacher_logprobs=lp_teacher), {}

    def token_advantages(self, advantages, batch, mask, step):
        return rlsd_token_advantages(advantages, batch.teacher_logprobs, batch.old_logprobs,
                                     mask, self.config, step)

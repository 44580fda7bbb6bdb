"""SDPO: GRPO's policy loss plus distillation toward a reprompted EMA teacher.

Each rollout's teacher is the same model after a prompt that adds a successful peer
rollout of its group and, for a failed rollout, the verifier's feedback; rows with neither
have no teacher signal (``teacher_valid = 0``). The teacher weights are an exponential
moving average of the policy (``ema_rate``; ``None`` keeps them frozen), refreshed inside
the update step after every applied step. The distillation loss is
:func:`amrsd_jax.losses.sdpo.sdpo_distillation_loss`, computed inside the step on the
teacher prompts, and mixed by :func:`amrsd_jax.losses.sdpo.sdpo_total_loss`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..losses.policy import loss_normalizer
from ..losses.sdpo import SDPOConfig, sdpo_distillation_loss, sdpo_total_loss
from ..reflection.contexts import sdpo_teacher_prompt
from ..rollout.prompts import encode_teacher_prompts
from ..scoring import response_logits
from .base import Method, TeacherInputs, register


@register
class SDPO(Method):
    name = "sdpo"
    config_type = SDPOConfig
    fields = ("teacher_prompt_ids", "teacher_prompt_mask", "teacher_valid")
    counters = ("truncated_teacher_prompts",)
    description = "GRPO policy loss plus distillation toward the reprompted EMA teacher"

    def __init__(self, config=None, *, ema_rate: float | None = 0.05):
        super().__init__(config)
        self.ema_rate = ema_rate

    @classmethod
    def from_run(cls, run):
        return cls(run.method_settings(), ema_rate=run.ema_rate)

    def init_teacher(self, params):
        return jax.tree.map(jnp.copy, params)

    def teacher_inputs(self, ctx, rollouts):
        messages = []
        for i, question in enumerate(rollouts.questions):
            failed = not rollouts.verified.correct[i]
            feedback = (rollouts.verified.results[i].feedback or None) if failed else None
            messages.append(sdpo_teacher_prompt(question, rollouts.peer(i), feedback))
        ids, mask, valid, truncated = encode_teacher_prompts(
            ctx.tokenizer, messages, rollouts.prompt_ids, rollouts.prompt_mask,
            max_tokens=ctx.config.reflection.max_teacher_prompt_tokens,
            system_prompt=ctx.config.model.system_prompt)
        rows = np.arange(0)  # scored inside the update step, not here
        return TeacherInputs(ids, mask, valid, rows, rows,
                             metrics={"teacher_valid_frac": float(valid.mean())},
                             counts={"truncated_teacher_prompts": truncated})

    def score(self, ctx, rollouts, teacher, batch):
        return batch.replace(teacher_prompt_ids=teacher.ids, teacher_prompt_mask=teacher.mask,
                             teacher_valid=teacher.valid.astype("int32")), {}

    def extra_loss_normalizer(self, batch, aggregation):
        valid = batch.response_mask.astype(bool) & batch.teacher_valid.astype(bool)[:, None]
        return loss_normalizer(valid, aggregation)

    def extra_loss(self, model, teacher, micro, policy_loss, aggregation, normalizer):
        student_logits = response_logits(model, micro.prompt_ids, micro.prompt_mask,
                                         micro.response_ids, micro.response_mask)
        teacher_logits = jax.lax.stop_gradient(response_logits(
            teacher, micro.teacher_prompt_ids, micro.teacher_prompt_mask, micro.response_ids,
            micro.response_mask))
        distill, _ = sdpo_distillation_loss(
            student_logits, teacher_logits, micro.response_ids, micro.old_logprobs,
            micro.response_mask, micro.teacher_valid, self.config, aggregation, normalizer)
        # summed over micro-batches: each term is already divided by the global normaliser
        return sdpo_total_loss(policy_loss, distill, self.config), {"distill_loss_mean": distill}

    def refresh_teacher(self, teacher, params, finite):
        if self.ema_rate is None:
            return teacher
        updated = optax.incremental_update(params, teacher, self.ema_rate)
        return jax.tree.map(lambda new, old: jnp.where(finite, new, old), updated, teacher)

"""SDPO: distillation toward the same model reprompted with a peer's solution or the
verifier's feedback, with an EMA teacher.

The recipe is the authors' (lasgroup/SDPO), which the library follows where it differs from
the original specification (docs/methods.md, "SDPO"):

- reprompt: the question, then the first other successful rollout of the group ("Correct
  solution:") and, only when there is none, the failed rollout's verifier feedback
  (``feedback_only_without_solution``); "Correctly solve the original question." A row
  with neither has no teacher signal (``teacher_valid = 0``);
- loss: the student's top-100 logits plus a tail bucket, generalised JSD ``alpha = 0.5``,
  each token weighted by ``min(exp(lp_S - lp_old), 2)`` and by the rollout correction
  ``min(exp(lp_old - lp_sampler), 2)``; no policy-gradient term (``distill_weight = 1``);
  logits at the sampling temperature (:class:`~amrsd_jax.losses.sdpo.SDPOConfig`);
- teacher: an exponential moving average of the policy, rate 0.05, refreshed inside the
  update step after every applied step (``teacher.weights`` / ``teacher.ema_rate``).

Differences: the authors cut an over-long teacher prompt from its end (their limit is
10,240 tokens); here the question is always kept and the privileged part is cut
(``reflection.max_teacher_prompt_tokens``). Their success threshold is reward >= 0.5; here
a peer is a rollout the verifier marked correct (``reward.success_threshold``).
"""

from __future__ import annotations

import jax
import numpy as np

from ..losses.policy import loss_normalizer
from ..losses.sdpo import SDPOConfig, sdpo_distillation_loss, sdpo_total_loss
from ..reflection.contexts import sdpo_teacher_prompt
from ..rollout.prompts import fit_privileged
from ..scoring import response_logits
from .base import Method, TeacherPolicy, every_row_teacher_inputs, register


@register
class SDPO(Method):
    name = "sdpo"
    config_type = SDPOConfig
    fields = ("teacher_prompt_ids", "teacher_prompt_mask", "teacher_valid")
    counters = ("truncated_teacher_prompts",)
    teacher = TeacherPolicy("ema", ema_rate=0.05)
    description = "distillation toward the reprompted model (peer solution / feedback), EMA teacher"

    def teacher_inputs(self, ctx, rollouts):
        run, messages, cut = ctx.config, [], 0
        for i, question in enumerate(rollouts.questions):
            peer = rollouts.peer(i)
            failed = not rollouts.verified.correct[i]
            feedback = (rollouts.verified.results[i].feedback or None) if failed else None
            if peer and self.config.feedback_only_without_solution:
                feedback = None
            if not peer and not feedback:
                messages.append(None)  # no teacher signal for this row
                continue
            # the privileged part (the peer's solution, else the feedback) is cut to fit
            render = ((lambda p, q=question, f=feedback: sdpo_teacher_prompt(q, p, f)) if peer
                      else (lambda p, q=question: sdpo_teacher_prompt(q, None, p)))
            message, was_cut = fit_privileged(
                ctx.tokenizer, render, peer or feedback,
                max_tokens=run.reflection.max_teacher_prompt_tokens,
                system_prompt=run.model.system_prompt)
            messages.append(message)
            cut += was_cut
        # no rows of its own to score: the teacher scores inside the update step
        return every_row_teacher_inputs(ctx, rollouts, messages, cut=cut, rows=np.arange(0))

    def score(self, ctx, rollouts, teacher, batch):
        return batch.replace(teacher_prompt_ids=teacher.ids, teacher_prompt_mask=teacher.mask,
                             teacher_valid=teacher.valid.astype("int32")), {}

    def extra_loss_normalizer(self, batch, aggregation):
        valid = batch.response_mask.astype(bool) & batch.teacher_valid.astype(bool)[:, None]
        return loss_normalizer(valid, aggregation)

    def extra_loss(self, model, teacher, micro, policy_loss, aggregation, normalizer, *,
                   temperature=1.0):
        teacher = model if teacher is None else teacher  # teacher.weights=live
        student_logits = response_logits(model, micro.prompt_ids, micro.prompt_mask,
                                         micro.response_ids, micro.response_mask,
                                         temperature=temperature)
        teacher_logits = jax.lax.stop_gradient(response_logits(
            teacher, micro.teacher_prompt_ids, micro.teacher_prompt_mask, micro.response_ids,
            micro.response_mask, temperature=temperature))
        distill, _ = sdpo_distillation_loss(
            student_logits, teacher_logits, micro.response_ids, micro.old_logprobs,
            micro.response_mask, micro.teacher_valid, self.config, aggregation, normalizer,
            lp_sampler=micro.sampler_logprobs)
        # summed over micro-batches: each term is already divided by the global normaliser
        return sdpo_total_loss(policy_loss, distill, self.config), {"distill_loss_mean": distill}

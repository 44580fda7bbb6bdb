"""AMR-SD: the policy writes itself a hint (correct rollout) or critique (incorrect one),
re-scores the rollout with it as teacher context, and the clipped log-likelihood ratio
gates an amplification of GRPO's advantage, annealed to plain GRPO.

Per step (docs/methods.md, "AMR-SD"), on the host:

1. which rows to reflect on: with ``reflection.skip_uninformative`` only rows of groups
   with unequal rewards (elsewhere ``A = 0`` and the gate cannot change the update), and
   none once the gate is annealed to 0 -- exact, the loss is unchanged;
2. a reflection request per row (question, attempt, verifier outcome and feedback, a
   verifier-approved peer, optionally the reference solution), sampled by the live policy:
   a new conversation, or (``reflection.request=follow_up``) a next user turn that
   continues the rollout's own KV cache;
3. the leak guard redacts the gold answer from each reflection;
4. the teacher prompt (question + reflection) re-scores the rollout with the live
   weights: ``teacher_logprobs``; rows not reflected on keep ``lp_T = lp_old`` (CIG 0).

Traced: :func:`amrsd_jax.credit.amr_sd.amr_sd_token_advantages`. Ablation
``reflection.source=raw_peer``: the teacher sees a verifier-approved peer verbatim.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..credit.amr_sd import AMRSDConfig, amr_sd_token_advantages, annealing_factor, ihat_quantiles
from ..distributed import to_host
from ..reflection.contexts import amr_sd_teacher_prompt, raw_peer_teacher_prompt
from ..reflection.leak_guard import redact_answer
from ..reflection.prompts import ReflectionInputs, follow_up_reflection_prompt, reflection_prompt
from ..rollout.prompts import encode_chat, encode_follow_up, fit_privileged
from ..rollout.records import Rollouts, decode_responses
from ..rollout.sampler import SamplingConfig
from .base import Method, MethodContext, TeacherInputs, TeacherPolicy, register


def reflection_request(rollouts: Rollouts, row: int, *, use_peer: bool = True,
                       reference_solution: str | None = None, follow_up: bool = False) -> str:
    """Row ``row``'s reflection request (hint if correct, critique if not) with the
    privileged inputs of docs/methods.md, "AMR-SD". ``follow_up``: a next user turn after the
    rollout
    (question and attempt not repeated)."""
    render = follow_up_reflection_prompt if follow_up else reflection_prompt
    verified = rollouts.verified
    return render(ReflectionInputs(
        question=rollouts.questions[row], rollout=rollouts.texts[row],
        correct=bool(verified.correct[row]), feedback=verified.results[row].feedback or None,
        peer_solution=rollouts.peer(row) if use_peer else None,
        reference_solution=reference_solution))


def guard_reflections(reflections: Sequence[str], golds: Sequence[str],
                      enabled: bool = True) -> tuple[list[str], int]:
    """Redact the gold answer from every reflection; returns (texts, redactions)."""
    if not enabled:
        return list(reflections), 0
    out, total = [], 0
    for text, gold in zip(reflections, golds):
        text, n = redact_answer(text, str(gold))
        out.append(text)
        total += n
    return out, total


def reflection_gain(lp_teacher, lp_old, mask, correct, rows) -> dict[str, float]:
    """Hint-quality diagnostic: mean per-token gain ``lp_T - lp_old`` (nats, unclipped) of
    the reflected rows, split by outcome. A useful hint raises the likelihood of a correct
    rollout (> 0); a useful critique lowers that of an incorrect one (< 0)."""
    out = {}
    gain = (lp_teacher - lp_old)[rows]
    mask = np.asarray(mask)[rows].astype(bool)
    ok = np.asarray(correct)[rows].astype(bool)
    for name, sel in (("correct", ok), ("incorrect", ~ok)):
        m = mask & sel[:, None]
        if m.any():
            out[f"reflection_gain_{name}"] = float(gain[m].mean())
    return out


@register
class AMRSD(Method):
    name = "amr_sd"
    config_type = AMRSDConfig
    fields = ("teacher_logprobs",)
    counters = ("redactions", "truncated_teacher_prompts")
    teacher = TeacherPolicy("live")  # the same model re-scores with the reflection
    description = ("self-written hint/critique as teacher context; asymmetric ReLU gate on the "
                   "clipped causal information gain, annealed to GRPO")

    def sampling_passes(self, run) -> dict:
        r = run.reflection
        return {"reflection": (r.max_prompt_tokens, SamplingConfig(
            max_new_tokens=r.max_tokens, temperature=r.temperature, top_p=r.top_p))}

    def scoring_passes(self, run) -> dict[str, int]:
        return {"teacher": run.reflection.max_teacher_prompt_tokens}

    def uses_rollout_cache(self, run) -> bool:
        return run.reflection.request == "follow_up" and run.reflection.source == "self"

    def gate_active(self, step: int) -> bool:
        """Whether the gate can be non-zero at optimizer step ``step``."""
        cfg = self.config
        return (cfg.lam > 0 or cfg.gam > 0) and float(annealing_factor(cfg, step)) > 0

    def _rows(self, ctx: MethodContext, rollouts: Rollouts) -> np.ndarray:
        if not ctx.config.reflection.skip_uninformative:
            return np.arange(rollouts.num_rows)
        if not self.gate_active(ctx.step):
            return np.zeros(0, np.int64)
        return rollouts.mixed_group_rows()

    def teacher_inputs(self, ctx, rollouts):
        run, rows = ctx.config, self._rows(ctx, rollouts)
        reflections, metrics, counts = [None] * rollouts.num_rows, {}, {}
        if run.reflection.source == "raw_peer":  # ablation: the peer where the reflection was
            peers = {int(i): rollouts.peer(int(i)) for i in rows}
            rows = np.array([i for i in rows if peers[int(i)] is not None], np.int64)
            texts = [peers[int(i)] for i in rows]
        metrics["reflected_frac"] = len(rows) / rollouts.num_rows
        if not len(rows):
            return TeacherInputs(None, None, None, rows, rows, reflections, metrics, counts)
        padded = ctx.bucket_rows(rows)
        if run.reflection.source != "raw_peer":
            texts, reflect_metrics, counts = self._reflect(ctx, rollouts, rows, padded)
            metrics.update(reflect_metrics)
            for i, r in zip(rows, texts):
                reflections[i] = r
        messages, cut = [], 0
        for i, text in zip(rows, texts):  # the privileged text is cut to fit, never the question
            q, ok = rollouts.questions[i], bool(rollouts.verified.correct[i])
            render = ((lambda t, q=q: raw_peer_teacher_prompt(q, t))
                      if run.reflection.source == "raw_peer"
                      else (lambda t, q=q, ok=ok: amr_sd_teacher_prompt(q, t, ok)))
            message, was_cut = fit_privileged(
                ctx.tokenizer, render, text, max_tokens=run.reflection.max_teacher_prompt_tokens,
                system_prompt=run.model.system_prompt)
            messages.append(message)
            cut += was_cut
        enc = encode_chat(ctx.tokenizer, messages + [messages[0]] * (len(padded) - len(rows)),
                          max_tokens=run.reflection.max_teacher_prompt_tokens,
                          system_prompt=run.model.system_prompt, on_long="truncate",
                          min_width=ctx.min_width(run.reflection.max_teacher_prompt_tokens))
        counts["truncated_teacher_prompts"] = cut
        return TeacherInputs(enc.ids, enc.mask, np.ones(len(padded), bool), rows, padded,
                             reflections, metrics, counts)

    def _reflect(self, ctx: MethodContext, rollouts: Rollouts, rows: np.ndarray,
                 padded: np.ndarray):
        """The policy's leak-guarded reflections on ``rows`` (sampled for ``padded``, the rows
        padded to a compiled bucket); ``(texts, metrics, counts)``."""
        run, cfg = ctx.config, ctx.config.reflection
        follow_up = cfg.request == "follow_up"
        if follow_up and rollouts.kv_state is None:
            raise ValueError("reflection.request=follow_up needs the rollouts' KV cache")
        solutions = [ex.get("solution") if cfg.use_reference_solution else None
                     for ex in rollouts.examples]
        requests = [reflection_request(rollouts, int(i), use_peer=cfg.use_peer,
                                       reference_solution=solutions[i], follow_up=follow_up)
                    for i in padded]
        sampling = SamplingConfig(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                  top_p=cfg.top_p)
        programs = ctx.programs
        if follow_up:  # only the new turn is prefilled, on the rollout's cache
            sample = rollouts.sample
            last = sample.tokens[padded, np.maximum(sample.lengths[padded] - 1, 0)]
            ended = (sample.lengths[padded] > 0) & np.isin(last, programs.stop_ids)
            enc = encode_follow_up(ctx.tokenizer, requests, ended, programs.stop_ids,
                                   max_tokens=cfg.max_prompt_tokens,
                                   system_prompt=run.model.system_prompt,
                                   min_width=ctx.min_width(cfg.max_prompt_tokens))
            out = programs.continue_(ctx.params, rollouts.kv_state, padded, enc.ids, enc.mask,
                                     ctx.teacher_key, sampling)
        else:
            enc = encode_chat(ctx.tokenizer, requests, max_tokens=cfg.max_prompt_tokens,
                              system_prompt=run.model.system_prompt, on_long="truncate",
                              min_width=ctx.min_width(cfg.max_prompt_tokens))
            out = programs.sample(ctx.params, enc.ids, enc.mask, ctx.teacher_key, sampling)
        n = len(rows)
        raw = decode_responses(ctx.tokenizer, out.tokens[:n], out.lengths[:n])
        written, redactions = guard_reflections(raw, [rollouts.golds[i] for i in rows],
                                                cfg.leak_guard)
        metrics = {"reflection_length_mean": float(np.mean(out.lengths[:n])),
                   "redactions": redactions}
        return written, metrics, {"redactions": redactions}

    def score(self, ctx, rollouts, teacher, batch):
        """``teacher_logprobs``: the reflected rows re-scored after their teacher prompt;
        every other row keeps ``lp_T = lp_old`` (CIG 0)."""
        lp_old = to_host(batch.old_logprobs)
        lp_teacher, metrics = lp_old.copy(), {}
        if len(teacher.rows):
            padded = teacher.padded_rows
            scored, _ = ctx.programs.score(ctx.teacher_weights, teacher.ids, teacher.mask,
                                           rollouts.sample.tokens[padded],
                                           rollouts.response_mask[padded])
            lp_teacher[teacher.rows] = to_host(scored)[:len(teacher.rows)]
            metrics = reflection_gain(lp_teacher, lp_old, rollouts.response_mask,
                                      rollouts.verified.correct, teacher.rows)
        quantiles = ihat_quantiles(lp_teacher, lp_old, to_host(batch.response_mask),
                                   self.config.kappa)
        metrics.update({f"{self.name}/{k}": v for k, v in quantiles.items()})
        return batch.replace(teacher_logprobs=lp_teacher), metrics

    def token_advantages(self, advantages, batch, mask, step):
        return amr_sd_token_advantages(advantages, batch.teacher_logprobs, batch.old_logprobs,
                                       mask, self.config, step)

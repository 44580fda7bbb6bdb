"""OAR-G / OAR-P: outcome-grounded reshaping of the sequence advantage.

Each reasoning token's importance for the response's own final answer (the log-prob of
the verifier's answer span) reshapes ``A_i`` into bi-level per-token weights of mean 1 over
the reasoning tokens; the answer-span tokens keep ``A_i``
(:func:`amrsd_jax.credit.oar.oar_token_advantages`). OAR-G takes the importance from one
gradient with respect to the input embeddings, OAR-P from pad-substitution forwards. The
importance pass is this method's own program, built once with the run's others.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ..credit.oar import (OARConfig, oar_gradient_importance, oar_perturbation_importance,
                          oar_token_advantages)
from ..models.decoder import Decoder
from ..rewards import VerifierResult
from ..scoring import token_logprobs_from_hidden
from ..sharding import batch_sharding
from .base import Method, register


def answer_token_mask(tokenizer, tokens: np.ndarray, lengths: np.ndarray,
                      results: Sequence[VerifierResult]) -> np.ndarray:
    """``[B, N]`` 1 on the response tokens that overlap the verifier's answer span (OAR).

    Character offsets come from decoding growing prefixes of the sampled tokens, so they
    refer to exactly the text the verifier saw.
    """
    out = np.zeros(tokens.shape, np.int32)
    for i, res in enumerate(results):
        if res.answer_span is None:
            continue
        start, end = res.answer_span
        prev = 0
        for t in range(int(lengths[i])):
            cur = len(tokenizer.decode(tokens[i, :t + 1].tolist(), skip_special_tokens=True))
            if cur > start and prev < end:  # token t covers characters [prev, cur)
                out[i, t] = 1
            if prev >= end:
                break
            prev = cur
    return out


def outcome_importance(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                       response_ids: jax.Array, response_mask: jax.Array,
                       answer_mask: jax.Array, *, mode: str = "gradient",
                       oar_config: OARConfig | None = None, pad_id: int = 0,
                       chunk_size: int = 8, rng: jax.Array | None = None):
    """OAR importance ``[batch, N]`` of each reasoning token for the response's own answer.

    The outcome is the log-probability of the final-answer span (``answer_mask [batch, N]``,
    located by the verifier) given everything before it. Reasoning tokens are the response
    tokens outside that span.

    Args:
      mode: ``"gradient"`` (OAR-G: one backward pass w.r.t. the input embeddings) or
        ``"perturbation"`` (OAR-P: every position replaced by ``pad_id`` in turn).
    """
    cfg = oar_config or OARConfig()
    p = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    answer = answer_mask.astype(jnp.float32) * response_mask
    reasoning = jnp.concatenate(
        [jnp.zeros_like(prompt_mask, bool),
         response_mask.astype(bool) & ~answer_mask.astype(bool)], axis=1)
    unembedding = model.output_embedding()

    def outcome_from_embeddings(embeddings):  # [batch, P + N, hidden] -> [batch]
        hidden, _ = model.hidden_states(embeddings, mask)
        lp, _ = token_logprobs_from_hidden(hidden[:, p - 1:-1], unembedding, response_ids,
                                           compute_dtype=model.config.dtype)
        return jnp.sum(lp * answer, axis=-1)

    if mode == "gradient":
        scores = oar_gradient_importance(outcome_from_embeddings, model.embed(ids), reasoning,
                                         cfg, rng)
    elif mode == "perturbation":
        scores = oar_perturbation_importance(
            lambda x: outcome_from_embeddings(model.embed(x)), ids, reasoning, pad_id,
            chunk_size)
    else:
        raise ValueError(f"mode must be 'gradient' or 'perturbation', got {mode!r}")
    return scores[:, p:]


class _OAR(Method):
    config_type = OARConfig
    fields = ("importance", "answer_mask")
    mode = "gradient"

    def extra_programs(self, build):
        graphdef, other, mode, cfg, pad = build.graphdef, build.other, self.mode, \
            self.config, build.pad_id

        def importance(params, prompt_ids, prompt_mask, response_ids, response_mask, answer,
                       rng):
            model = nnx.merge(graphdef, params, other)
            return outcome_importance(model, prompt_ids, prompt_mask, response_ids,
                                      response_mask, answer, mode=mode, oar_config=cfg,
                                      pad_id=pad, rng=rng)

        return {"importance": jax.jit(importance, out_shardings=batch_sharding(build.mesh, 2))}

    def score(self, ctx, rollouts, teacher, batch):
        sample = rollouts.sample
        answer = answer_token_mask(ctx.tokenizer, sample.tokens, sample.lengths,
                                   rollouts.verified.results)
        importance = ctx.programs.extra["importance"](
            ctx.params, rollouts.prompt_ids, rollouts.prompt_mask, sample.tokens,
            rollouts.response_mask, answer, ctx.score_key)
        return batch.replace(importance=importance, answer_mask=answer), {}

    def token_advantages(self, advantages, batch, mask, step):
        return oar_token_advantages(advantages, batch.importance, mask, self.config,
                                    answer_mask=batch.answer_mask)


@register
class OARG(_OAR):
    name = "oar_g"
    mode = "gradient"
    description = "outcome-grounded reshaping, importance from one gradient w.r.t. embeddings"


@register
class OARP(_OAR):
    name = "oar_p"
    mode = "perturbation"
    description = "outcome-grounded reshaping, importance from pad-substitution forwards"

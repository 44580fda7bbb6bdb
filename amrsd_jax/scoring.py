"""Scoring: log-probs (and entropies) of response tokens under a model.

One function serves the old policy, the teacher (same response after a longer prompt) and
the frozen reference, inside and outside the update step's gradient. Sequences are
``[left-padded prompt | right-padded response]``, so every row's response starts in the
same column and the response positions line up across student and teacher batches.

The vocabulary projection can be chunked: the log-normaliser (and entropy) are accumulated
over vocabulary chunks with an online log-sum-exp under ``jax.checkpoint``, so a 150k
vocabulary at long sequence lengths never materialises ``[batch, time, vocab]`` fp32 logits,
in the forward or the backward pass.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .arrays import token_entropy
from .models.decoder import Decoder
from .sharding import DEFAULT_RULES, activation_layout, batch_sharding, constrain, token_names


def token_logprobs_from_hidden(hidden: jax.Array, unembedding: jax.Array, targets: jax.Array,
                               *, vocab_chunk: int | None = None, with_entropy: bool = False,
                               compute_dtype=jnp.float32, temperature: float = 1.0):
    """Log-probs of ``targets`` and (optionally) the entropy, from final hidden states.

    Args:
      hidden: ``[batch, time, hidden]`` final normed hidden states (position t predicts
        ``targets[:, t]``).
      unembedding: ``[hidden, vocab]`` output projection.
      targets: ``[batch, time]`` token ids.
      vocab_chunk: vocabulary chunk size; ``None`` computes full logits at once.
      with_entropy: also return ``H = logZ - E_p[logit]`` ``[batch, time]``.
      temperature: the distribution is ``softmax(logits / temperature)``, the one the
        sampler drew from (TRL, verl and the SDPO / RLSD code score this way); ``<= 0``
        (greedy sampling) means 1.

    Returns:
      ``logprobs [batch, time]`` float32, and ``entropy [batch, time]`` or ``None``.
    """
    # the float32 logits are divided by T, as the sampler divides them
    scale_t = temperature if temperature > 0 and temperature != 1.0 else None
    h = hidden.astype(compute_dtype)
    w = unembedding.astype(compute_dtype)
    # target logit from the gathered columns: [batch, time, hidden] . [batch, time, hidden];
    # looked up in the lookup_batch layout like the input embeddings (Decoder.embed)
    rows = token_names(targets.ndim, "lookup_batch")
    columns = constrain(jnp.take(w, constrain(targets, rows), axis=1), ("embed",) + rows)
    # ... then moved to the batch layout of h, not h to theirs
    columns = constrain(jnp.moveaxis(columns, 0, -1),
                        token_names(targets.ndim + 1, "batch", "activation_embed"))
    target_logit = jnp.sum(h.astype(jnp.float32) * columns.astype(jnp.float32), axis=-1)
    if scale_t is not None:
        target_logit = target_logit / scale_t
    vocab = w.shape[1]
    if vocab_chunk is None or vocab_chunk >= vocab:
        logits = jnp.dot(h, w, preferred_element_type=jnp.float32)
        if scale_t is not None:
            logits = logits / scale_t
        log_z = jax.nn.logsumexp(logits, axis=-1)
        return target_logit - log_z, token_entropy(logits) if with_entropy else None

    num_chunks = -(-vocab // vocab_chunk)
    pad = num_chunks * vocab_chunk - vocab
    w_chunks = jnp.pad(w, ((0, 0), (0, pad))).reshape(w.shape[0], num_chunks, vocab_chunk)
    w_chunks = w_chunks.transpose(1, 0, 2)  # [chunks, hidden, chunk]
    valid = (jnp.arange(num_chunks * vocab_chunk) < vocab).reshape(num_chunks, vocab_chunk)
    neg = jnp.finfo(jnp.float32).min

    @jax.checkpoint
    def step(carry, xs):
        running_max, sum_exp, sum_exp_logit = carry
        w_c, valid_c = xs
        logits = jnp.dot(h, w_c, preferred_element_type=jnp.float32)
        # a vocabulary chunk is split over `tensor` like the whole vocabulary
        logits = constrain(logits, token_names(logits.ndim, "batch", "vocab"))
        if scale_t is not None:
            logits = logits / scale_t
        logits = jnp.where(valid_c, logits, neg)
        new_max = jnp.maximum(running_max, jnp.max(logits, axis=-1))
        scale = jnp.exp(running_max - new_max)
        e = jnp.where(valid_c, jnp.exp(logits - new_max[..., None]), 0.0)
        sum_exp = sum_exp * scale + jnp.sum(e, axis=-1)
        if with_entropy:
            sum_exp_logit = sum_exp_logit * scale + jnp.sum(e * jnp.where(valid_c, logits, 0.0),
                                                            axis=-1)
        return (new_max, sum_exp, sum_exp_logit), None

    shape = targets.shape
    init = (jnp.full(shape, neg, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(shape, jnp.float32))
    (running_max, sum_exp, sum_exp_logit), _ = jax.lax.scan(step, init, (w_chunks, valid))
    log_z = running_max + jnp.log(sum_exp)
    entropy = (log_z - sum_exp_logit / sum_exp) if with_entropy else None
    return target_logit - log_z, entropy


def _response_hidden(model: Decoder, prompt_ids, prompt_mask, response_ids, response_mask):
    """Final hidden states ``[batch, N, hidden]`` at the positions that predict the
    response: position t predicts token t + 1, so columns ``P-1 .. P+N-2``."""
    p = prompt_ids.shape[1]
    ids = jnp.concatenate([prompt_ids, response_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1)
    hidden, _ = model.hidden_states(model.embed(ids), mask)
    return hidden[:, p - 1:-1]


def response_logits(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                    response_ids: jax.Array, response_mask: jax.Array, *,
                    temperature: float = 1.0) -> jax.Array:
    """Full logits ``[batch, N, vocab]`` at the response positions, divided by the sampling
    ``temperature`` (``<= 0``: 1) like :func:`token_logprobs_from_hidden` (SDPO)."""
    hidden = _response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
    logits = model.logits(hidden).astype(jnp.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    return logits


def response_logprobs(model: Decoder, prompt_ids: jax.Array, prompt_mask: jax.Array,
                      response_ids: jax.Array, response_mask: jax.Array, *,
                      vocab_chunk: int | None = None, with_entropy: bool = False,
                      temperature: float = 1.0):
    """Log-probs ``[batch, N]`` of the response tokens given the prompt.

    Args:
      prompt_ids, prompt_mask: ``[batch, P]`` left-padded prompts (a student prompt, or a
        teacher prompt with its extra context: only ``P`` differs).
      response_ids, response_mask: ``[batch, N]`` right-padded responses.

    Returns:
      ``(logprobs [batch, N], entropy [batch, N] or None)``, zero where ``response_mask``
      is 0. Only the ``N`` response positions go through the vocabulary projection.
    """
    hidden = _response_hidden(model, prompt_ids, prompt_mask, response_ids, response_mask)
    lp, entropy = token_logprobs_from_hidden(hidden, model.output_embedding(), response_ids,
                                             vocab_chunk=vocab_chunk, with_entropy=with_entropy,
                                             compute_dtype=model.config.dtype,
                                             temperature=temperature)
    keep = response_mask.astype(bool)
    lp = jnp.where(keep, lp, 0.0)
    if entropy is not None:
        entropy = jnp.where(keep, entropy, 0.0)
    return lp, entropy


def make_scorer(model: Decoder, mesh=None, *, vocab_chunk: int | None = None,
                with_entropy: bool = False, temperature: float = 1.0, rules=None):
    """One jitted scoring function for old-policy, teacher and reference passes.

    Returns ``score(params, prompt_ids, prompt_mask, response_ids, response_mask) ->
    (logprobs [batch, N], entropy [batch, N] or None)``; pass the live, EMA or frozen
    parameters as ``params`` (an ``nnx.State`` of the model's ``Param``s). With ``mesh``,
    the batch is split over ``data`` x ``fsdp`` and parameters keep their sharding. Each
    (prompt length, response length) bucket compiles once.
    """
    graphdef, _, other = nnx.split(model, nnx.Param, ...)
    rules = rules or DEFAULT_RULES

    def score(params, prompt_ids, prompt_mask, response_ids, response_mask):
        m = nnx.merge(graphdef, params, other)
        # activations are pinned to the mesh while this program is traced
        with activation_layout(mesh, rules):
            return response_logprobs(m, prompt_ids, prompt_mask, response_ids, response_mask,
                                     vocab_chunk=vocab_chunk, with_entropy=with_entropy,
                                     temperature=temperature)

    if mesh is None:
        return jax.jit(score)
    rows = batch_sharding(mesh, 2, rules)
    return jax.jit(score, in_shardings=(None, rows, rows, rows, rows),
                   out_shardings=(rows, rows if with_entropy else None))


def check_aligned_responses(student_response_ids, teacher_response_ids) -> None:
    """Host-side guard: teacher and student must score the same response tokens.

    Raises ``ValueError`` naming the first differing row; both inputs ``[batch, N]``.
    """
    a, b = np.asarray(student_response_ids), np.asarray(teacher_response_ids)
    if a.shape != b.shape:
        raise ValueError(f"teacher responses {b.shape} and student responses {a.shape} differ "
                         "in shape: the teacher must re-score exactly the student's tokens")
    bad = np.nonzero((a != b).any(axis=1))[0]
    if bad.size:
        raise ValueError(f"teacher and student response tokens differ in rows {bad[:8].tolist()}"
                         ": the context must be inserted into the prompt, not the response")

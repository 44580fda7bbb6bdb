"""OAR: Outcome-grounded Advantage Reshaping (docs/methods.md, "OAR").

Two parts:

1. Token importance ``s[i,t]`` of each reasoning token for the outcome, the
   log-probability of the response's own final-answer span given everything before
   it. Both estimators are written against a generic outcome function so they do not
   depend on any model class:

   - :func:`oar_gradient_importance` (OAR-G, one backward pass):
     ``s_t = |<grad_{e_t} J, e_t>|``.
   - :func:`oar_perturbation_importance` (OAR-P, one forward per position, batched):
     ``s_t = outcome(original) - outcome(y_t -> pad)``.

2. Bi-level reshaping of the sequence advantage that preserves its mass
   (:func:`oar_reshape_weights`)::

       u_t = log(1 + s_t);  n_t = (u_t - min u) / (max u - min u)   (n = 1 if flat)
       q0  = quantile(n, q)
       w_t = max(n_t / q0, min_weight)            if n_t <  q0
       w_t = 1 + beta * (n_t - q0) / (1 - q0)     if n_t >= q0
       w_t = w_t * L / sum_t w_t                  (mean weight 1 over the L tokens)
       Ahat[i,t] = A_i * w_t

   ``min``, ``max``, the quantile and ``L`` are per response, over its masked tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float, masked_mean, safe_divide

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class OARConfig:
    """Hyper-parameters of OAR (hashable).

    Attributes:
      q: quantile of the normalised importance that splits the two levels. Not
        published: 0.5 is OUR default.
      beta: slope of the upper level (weights rise from 1 to ``1 + beta``). Not
        published: 1.0 is OUR default.
      min_weight: floor of the lower level BEFORE the mass-preserving renormalisation
        (default 0.1). After renormalisation every weight is still
        ``>= min_weight / (1 + beta)``.
      gradient_noise: OAR-G objective. ``False`` (our default): ``J`` is the outcome
        log-probability itself and its gradient is taken at the clean embeddings.
        ``True``: ``J = outcome(e + sigma * z) - sg(outcome(e))`` with ``z ~ N(0, I)``
        on the reasoning embeddings only; its gradient is the outcome gradient at the
        perturbed point (still one backward pass).
      noise_sigma: ``sigma`` of the noise variant (default 1e-3).
    """

    q: float = 0.5
    beta: float = 1.0
    min_weight: float = 0.1
    gradient_noise: bool = False
    noise_sigma: float = 1e-3

    def __post_init__(self) -> None:
        if not 0.0 <= self.q <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {self.q}")
        if self.beta < 0:
            raise ValueError(f"beta must be >= 0, got {self.beta}")
        if not 0.0 < self.min_weight <= 1.0:
            raise ValueError(f"min_weight must be in (0, 1], got {self.min_weight}")
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")


def _normalised_importance(importance: Array, mask: Array) -> Array:
    """Per-row min-max normalised ``log(1 + max(s, 0))``; 1 on flat rows; NaN outside mask."""
    importance = jnp.maximum(as_float(importance), 0.0)
    log_importance = jnp.log1p(importance)
    row_min = jnp.min(jnp.where(mask, log_importance, jnp.inf), axis=-1, keepdims=True)
    row_max = jnp.max(jnp.where(mask, log_importance, -jnp.inf), axis=-1, keepdims=True)
    spread = row_max - row_min
    flat = ~(spread > 0)  # also true for rows without masked tokens (spread = -inf)
    normalised = jnp.where(flat, 1.0, (log_importance - row_min) / jnp.where(flat, 1.0, spread))
    return jnp.where(mask, normalised, jnp.nan)


def _bilevel_weights(importance: Array, mask: Array, cfg: OARConfig) -> Array:
    """Bi-level weights BEFORE the mass-preserving renormalisation; 0 outside the mask.

    Shapes: ``importance, mask: [B, T] -> [B, T]``.
    """
    mask = as_bool_mask(mask)
    normalised = _normalised_importance(importance, mask)
    split = jnp.nanquantile(normalised, cfg.q, axis=-1, keepdims=True)
    split = jnp.where(jnp.isnan(split), 1.0, split)  # rows without masked tokens
    lower = jnp.maximum(normalised / jnp.where(split > 0, split, 1.0), cfg.min_weight)
    upper = 1.0 + cfg.beta * (normalised - split) / jnp.where(split < 1, 1.0 - split, 1.0)
    weights = jnp.where(normalised < split, lower, upper)
    return jnp.where(mask, weights, 0.0)


def oar_reshape_weights(importance: Array, mask: Array, cfg: OARConfig) -> Array:
    """Mass-preserving bi-level OAR token weights.

    Args:
      importance: ``[B, T]`` token importance ``s`` (any real values; negative values,
        e.g. OAR-P tokens whose removal RAISES the outcome log-prob, are clamped to 0
        -- our choice, since ``log(1 + s)`` needs ``s > -1``). Values outside
        the mask are ignored.
      mask: ``[B, T]`` mask of the tokens to reshape (e.g. the reasoning tokens).
      cfg: :class:`OARConfig` (static).

    Returns:
      ``[B, T]`` weights, 0 outside the mask. On each row with ``L > 0`` masked tokens
      they sum to ``L`` (mean 1); a row whose importance is flat gets exactly 1 on all
      its tokens; a row without masked tokens gets all zeros (no NaN). The per-row
      quantile uses linear interpolation (numpy's default), computed with
      ``jnp.nanquantile`` on a masked-as-NaN array. Wrapped in ``stop_gradient``.
    """
    mask = as_bool_mask(mask)
    weights = _bilevel_weights(jax.lax.stop_gradient(as_float(importance)), mask, cfg)
    count = jnp.sum(mask, axis=-1, keepdims=True).astype(weights.dtype)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    weights = jnp.where(mask, weights * safe_divide(count, total), 0.0)
    return jax.lax.stop_gradient(weights)


def oar_token_advantages(
    advantages: Array,
    importance: Array,
    mask: Array,
    cfg: OARConfig,
    answer_mask: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """OAR per-token advantages ``Ahat = A_i * w_t``.

    The bi-level reshaping (docs/methods.md, "OAR") runs over the REASONING tokens only: the
    response
    tokens outside the verifier's answer span. Their weights average 1 per row; the answer
    tokens, whose importance is 0 by construction (they are the outcome, not evidence for
    it), keep the plain sequence advantage ``A_i`` (weight 1) and do not enter the
    normalisation or the quantile of the reasoning tokens.

    Args:
      advantages: ``[B]`` GRPO sequence advantages.
      importance: ``[B, T]`` token importance from OAR-G or OAR-P.
      mask: ``[B, T]`` mask of the tokens that receive credit (the response).
      cfg: :class:`OARConfig` (static).
      answer_mask: ``[B, T]`` 1 on the final-answer span (``None``: no answer span, every
        masked token is reshaped).

    Returns:
      ``(Ahat [B, T], diagnostics)``; ``Ahat`` is 0 outside the mask. Diagnostics
      (float32 scalars): ``weight_max`` and ``weight_min`` (row means of the per-row
      extremes of the reasoning weights over rows with reasoning tokens),
      ``flat_row_frac`` (fraction of those rows whose importance was flat).
    """
    advantages = jax.lax.stop_gradient(as_float(advantages))
    response = as_bool_mask(mask)
    answer = jnp.zeros_like(response) if answer_mask is None else \
        as_bool_mask(answer_mask) & response
    mask = response & ~answer  # the reasoning tokens: the ones reshaped
    weights = jnp.where(answer, 1.0, oar_reshape_weights(importance, mask, cfg))
    token_advantages = jnp.where(response, advantages[:, None] * weights, 0.0)
    has_tokens = jnp.any(mask, axis=-1)
    row_max = jnp.max(jnp.where(mask, weights, -jnp.inf), axis=-1)
    row_min = jnp.min(jnp.where(mask, weights, jnp.inf), axis=-1)
    flat = jnp.all(jnp.where(mask, weights == 1.0, True), axis=-1)
    diagnostics = {
        "weight_max": masked_mean(row_max, has_tokens),
        "weight_min": masked_mean(row_min, has_tokens),
        "flat_row_frac": masked_mean(flat.astype(jnp.float32), has_tokens),
    }
    return jax.lax.stop_gradient(token_advantages), diagnostics


def oar_gradient_importance(
    outcome_logprob_fn: Callable[[Array], Array],
    embeddings: Array,
    reasoning_mask: Array,
    cfg: OARConfig = OARConfig(),
    rng: Array | None = None,
) -> Array:
    """OAR-G importance ``s_t = |<grad_{e_t} J, e_t>|`` with one ``jax.grad``.

    Args:
      outcome_logprob_fn: maps input embeddings ``[B, T, D]`` to the outcome
        log-probability ``[B]`` of each row (log-prob of that response's final-answer
        span given everything before it). Rows must be independent (true for a
        transformer with per-row attention masks): the gradient of the row sum then
        gives every row's own gradient.
      embeddings: ``[B, T, D]`` input embeddings ``e`` (prompt + response).
      reasoning_mask: ``[B, T]`` mask of the reasoning tokens to score.
      cfg: :class:`OARConfig`; ``cfg.gradient_noise`` selects the objective ``J``
        (default: the outcome log-probability itself -- our documented choice).
      rng: PRNG key, required when ``cfg.gradient_noise`` is set.

    Returns:
      ``[B, T]`` non-negative importance, 0 outside ``reasoning_mask`` (stop-gradient).
    """
    embeddings = jax.lax.stop_gradient(as_float(embeddings))
    reasoning_mask = as_bool_mask(reasoning_mask)
    if cfg.gradient_noise:
        if rng is None:
            raise ValueError("oar_gradient_importance: cfg.gradient_noise needs an rng key")
        noise = cfg.noise_sigma * jax.random.normal(rng, embeddings.shape, embeddings.dtype)
        noise = jnp.where(reasoning_mask[..., None], noise, 0.0)
    else:
        noise = jnp.zeros_like(embeddings)

    def objective(e: Array) -> Array:
        return jnp.sum(outcome_logprob_fn(e + noise))

    gradient = jax.grad(objective)(embeddings)
    importance = jnp.abs(jnp.sum(gradient * embeddings, axis=-1))
    return jax.lax.stop_gradient(jnp.where(reasoning_mask, importance, 0.0))


def oar_perturbation_importance(
    outcome_logprob_from_ids_fn: Callable[[Array], Array],
    input_ids: Array,
    reasoning_mask: Array,
    pad_id: int,
    chunk_size: int = 8,
) -> Array:
    """OAR-P importance: drop of the outcome log-prob when a token is replaced by pad.

    For every position ``t`` (all ``T`` of them, so shapes stay static) the ids with
    column ``t`` set to ``pad_id`` on rows where ``reasoning_mask[:, t]`` is set are
    scored; ``s[:, t] = outcome(input_ids) - outcome(perturbed_t)``. Positions are
    processed by ``jax.lax.map(..., batch_size=chunk_size)``: ``chunk_size`` positions
    are vmapped together (an effective batch of ``chunk_size * B`` rows per forward),
    chunks run sequentially. Cost: ``T`` forwards of ``B`` rows in total.

    Args:
      outcome_logprob_from_ids_fn: maps token ids ``[B, T]`` to the outcome
        log-probability ``[B]`` of each row.
      input_ids: ``[B, T]`` int token ids (prompt + response).
      reasoning_mask: ``[B, T]`` mask of the reasoning tokens to score.
      pad_id: token id substituted at the scored position.
      chunk_size: number of positions evaluated per vmapped chunk (memory knob).

    Returns:
      ``[B, T]`` signed drops (may be negative when removing a token helps the
      outcome), 0 outside ``reasoning_mask`` (stop-gradient).
    """
    input_ids = jnp.asarray(input_ids)
    reasoning_mask = as_bool_mask(reasoning_mask)
    num_positions = input_ids.shape[-1]
    positions = jnp.arange(num_positions)
    baseline = outcome_logprob_from_ids_fn(input_ids)

    def drop_at(position: Array) -> Array:
        replace = (positions == position)[None, :] & reasoning_mask
        perturbed = jnp.where(replace, jnp.asarray(pad_id, input_ids.dtype), input_ids)
        return baseline - outcome_logprob_from_ids_fn(perturbed)

    drops = jax.lax.map(drop_at, positions, batch_size=max(1, min(chunk_size, num_positions)))
    return jax.lax.stop_gradient(jnp.where(reasoning_mask, drops.T, 0.0))

"""Shared jit-friendly array helpers of :mod:`amrsd_jax.credit` and :mod:`amrsd_jax.losses`.

A low-level module: it depends on ``jax`` only, never on other ``amrsd_jax`` modules, so both
the credit-assignment and the loss packages can import it without importing each other.

Masks may be given as booleans or as 0/1 numbers; every helper treats any non-zero
entry as "inside the mask".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["Array", "as_bool_mask", "as_float", "masked_mean", "masked_sum", "safe_divide",
           "token_entropy"]

Array = jax.Array


def as_bool_mask(mask: Array) -> Array:
    """Return ``mask != 0`` as a boolean array of the same shape."""
    mask = jnp.asarray(mask)
    if mask.dtype == jnp.bool_:
        return mask
    return mask != 0


def as_float(x: Array) -> Array:
    """Return ``x`` as a floating array (float32 unless it already is floating)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x
    return x.astype(jnp.float32)


def safe_divide(numerator: Array, denominator: Array) -> Array:
    """``numerator / denominator`` where the denominator is non-zero, else 0 (no NaN, no inf).

    Safe under ``jax.grad``: the divided branch never sees a zero denominator.
    """
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    """Sum of ``x`` over entries where ``mask`` is set (entries outside the mask may be NaN/inf)."""
    return jnp.sum(jnp.where(as_bool_mask(mask), x, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
    """Mean of ``x`` over entries where ``mask`` is set; 0 when the mask is empty."""
    mask = as_bool_mask(mask)
    count = jnp.sum(mask, axis=axis).astype(as_float(x).dtype)
    return safe_divide(masked_sum(as_float(x), mask, axis=axis), count)


def token_entropy(logits: Array) -> Array:
    """Entropy (nats) of ``softmax(logits)`` over the last axis.

    Numerically stable (``log_softmax``); ``-inf`` logits (masked vocabulary entries)
    contribute 0 and give finite gradients.

    Args:
      logits: ``[..., V]`` logits (or log-probs), e.g. ``[B, T, V]``.

    Returns:
      ``[...]`` entropies, e.g. ``[B, T]``.
    """
    log_probs = jax.nn.log_softmax(as_float(logits), axis=-1)
    probs = jnp.exp(log_probs)
    positive = probs > 0
    safe_log_probs = jnp.where(positive, log_probs, 0.0)
    return -jnp.sum(jnp.where(positive, probs * safe_log_probs, 0.0), axis=-1)

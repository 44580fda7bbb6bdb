"""Causal Information Gain (docs/methods.md, "CIG").

Per response token, how much more (or less) likely the teacher -- the same model
conditioned on an extra reflection context ``c_i`` -- finds the token than the policy
that sampled it::

    I[i,t]    = lp_T[i,t] - lp_old[i,t]
    Ihat[i,t] = clip(I[i,t], -kappa, kappa)        kappa = 5 (default)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float

Array = jax.Array


def causal_information_gain(
    lp_teacher: Array,
    lp_old: Array,
    mask: Array,
    kappa: float = 5.0,
) -> Array:
    """Clipped causal information gain ``Ihat = clip(lp_T - lp_old, -kappa, kappa)``.

    Args:
      lp_teacher: ``[B, T]`` teacher log-probs of the response tokens (stop-gradient).
      lp_old: ``[B, T]`` log-probs of the same tokens under the sampling policy.
      mask: ``[B, T]`` response mask (bool or 0/1).
      kappa: clip bound in nats (default 5).

    Returns:
      ``[B, T]`` clipped gain, exactly 0 outside the mask (padding may hold NaN/inf
      log-probs: they never reach the output). Wrapped in ``stop_gradient``.
    """
    gain = jax.lax.stop_gradient(as_float(lp_teacher)) - jax.lax.stop_gradient(as_float(lp_old))
    clipped = jnp.clip(gain, -kappa, kappa)
    return jnp.where(as_bool_mask(mask), clipped, 0.0)

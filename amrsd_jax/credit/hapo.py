"""HAPO-style entropy-capacity, sign-preserving advantage reallocation (SPEC.md, "HAPO").

The HAPO paper's exact term is not fully public. We implement its stated principle --
token entropy bounds the credit a token can carry, and the update keeps the reward's
sign -- in OUR form (fixed by SPEC.md)::

    Ahat[i,t] = A_i + sign(A_i) * min(alpha * H[i,t], |A_i| / phi)
    alpha = 0.2, phi = 2, H detached

``H[i,t]`` is the entropy of the sampling policy at that position; since ``H >= 0``
the bonus never flips the sign and ``|Ahat| >= |A|``, with the bonus capped at
``|A_i| / phi``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float, masked_mean
from amrsd_jax.arrays import token_entropy  # noqa: F401 - public here since the start

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class HAPOConfig:
    """Hyper-parameters of our HAPO form (hashable).

    Attributes:
      alpha: entropy-to-credit rate (nats^-1 x advantage units); default 0.2 (SPEC).
      phi: the bonus is capped at ``|A_i| / phi``; default 2 (SPEC).
    """

    alpha: float = 0.2
    phi: float = 2.0

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.phi <= 0:
            raise ValueError(f"phi must be > 0, got {self.phi}")


def hapo_token_advantages(
    advantages: Array,
    entropy: Array,
    mask: Array,
    cfg: HAPOConfig,
) -> tuple[Array, dict[str, Array]]:
    """HAPO per-token advantages ``A + sign(A) * min(alpha * H, |A| / phi)``.

    Args:
      advantages: ``[B]`` GRPO sequence advantages ``A_i``.
      entropy: ``[B, T]`` sampling-policy token entropies ``H`` (detached here).
      mask: ``[B, T]`` response mask.
      cfg: :class:`HAPOConfig` (static).

    Returns:
      ``(Ahat [B, T], diagnostics)``; ``Ahat`` is 0 outside the mask. Diagnostics
      (float32 scalars over masked tokens): ``bonus_mean`` (mean ``|Ahat| - |A|``),
      ``cap_frac`` (fraction of tokens of rollouts with ``A != 0`` whose bonus hit the
      ``|A| / phi`` cap).
    """
    advantages = jax.lax.stop_gradient(as_float(advantages))[:, None]
    mask = as_bool_mask(mask)
    entropy = jnp.where(mask, jax.lax.stop_gradient(as_float(entropy)), 0.0)
    uncapped = jnp.maximum(cfg.alpha * entropy, 0.0)  # H >= 0; guards rounding
    cap = jnp.abs(advantages) / cfg.phi
    bonus = jnp.minimum(uncapped, cap)
    token_advantages = jnp.where(mask, advantages + jnp.sign(advantages) * bonus, 0.0)
    nonzero = mask & (advantages != 0)
    diagnostics = {
        "bonus_mean": masked_mean(jnp.where(advantages != 0, bonus, 0.0), mask),
        "cap_frac": masked_mean((uncapped >= cap).astype(jnp.float32), nonzero),
    }
    return jax.lax.stop_gradient(token_advantages), diagnostics

"""HAPO-style entropy-capacity, sign-preserving advantage reallocation (docs/methods.md, "HAPO").

The HAPO paper's exact term is not fully public. We implement its stated principle --
token entropy bounds the credit a token can carry, and the update keeps the reward's
sign -- in OUR form. Per response token, with ``H`` detached::

    bonus[i,t] = min(alpha * H[i,t], |A_i| / phi)          alpha = 0.2, phi = 2
    reallocate (default): Ahat[i,t] = A_i * w[i,t] / mean_t(w[i,.]),  w = 1 + bonus / |A_i|
    bonus (original spec):      Ahat[i,t] = A_i + sign(A_i) * bonus[i,t]

``reallocate`` moves a sequence's credit toward its high-entropy tokens and away from its
confident ones while keeping the sequence's credit mass (``sum_t Ahat = A_i * L_i``): a
reallocation, as the method is described. ``bonus`` (the original specification's form) only
ever adds credit
(``|Ahat| >= |A|``). Both keep the sign of ``A_i`` on every token.

Diagnostics include the paper's Four-Quadrant decomposition: tokens split by the sign of
``A_i`` and by entropy above / below the batch median, with each quadrant's token share and
mean ``|Ahat|``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float, masked_mean, safe_divide
from amrsd_jax.arrays import token_entropy  # noqa: F401 - public here since the start

Array = jax.Array
HAPO_FORMS = ("reallocate", "bonus")


@dataclasses.dataclass(frozen=True)
class HAPOConfig:
    """Hyper-parameters of our HAPO form (hashable).

    Attributes:
      alpha: entropy-to-credit rate (nats^-1 x advantage units); default 0.2.
      phi: the bonus is capped at ``|A_i| / phi``; default 2.
      form: ``"reallocate"`` (default: per-sequence credit mass preserved) or ``"bonus"``
        (the original specification's additive form).
    """

    alpha: float = 0.2
    phi: float = 2.0
    form: str = "reallocate"

    def __post_init__(self) -> None:
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.phi <= 0:
            raise ValueError(f"phi must be > 0, got {self.phi}")
        if self.form not in HAPO_FORMS:
            raise ValueError(f"form must be one of {HAPO_FORMS}, got {self.form!r}")


def four_quadrants(token_advantages: Array, advantages: Array, entropy: Array,
                   mask: Array) -> dict[str, Array]:
    """HAPO's Four-Quadrant decomposition of an update: tokens of rollouts with ``A != 0``
    split by reward sign (``pos`` / ``neg``) and entropy above / below the median over those
    tokens (``high`` / ``low``). Returns ``q_<sign>_<level>_share`` (fraction of the tokens)
    and ``q_<sign>_<level>_update`` (mean ``|Ahat|`` there) as float32 scalars.

    Shapes: ``token_advantages, entropy, mask [B, T]``, ``advantages [B]``.
    """
    mask = as_bool_mask(mask) & (advantages[:, None] != 0)
    entropy = as_float(entropy)
    median = jnp.nanquantile(jnp.where(mask, entropy, jnp.nan), 0.5)
    high = entropy > jnp.where(jnp.isnan(median), 0.0, median)
    out = {}
    for sign_name, sign in (("pos", advantages[:, None] > 0), ("neg", advantages[:, None] < 0)):
        for level_name, level in (("high", high), ("low", ~high)):
            sel = mask & sign & level
            name = f"q_{sign_name}_{level_name}"
            out[f"{name}_share"] = masked_mean(sel.astype(jnp.float32), mask)
            out[f"{name}_update"] = masked_mean(jnp.abs(as_float(token_advantages)), sel)
    return out


def hapo_token_advantages(
    advantages: Array,
    entropy: Array,
    mask: Array,
    cfg: HAPOConfig,
) -> tuple[Array, dict[str, Array]]:
    """HAPO per-token advantages (see the module docstring for both forms).

    Args:
      advantages: ``[B]`` GRPO sequence advantages ``A_i``.
      entropy: ``[B, T]`` sampling-policy token entropies ``H`` (detached here).
      mask: ``[B, T]`` response mask.
      cfg: :class:`HAPOConfig` (static).

    Returns:
      ``(Ahat [B, T], diagnostics)``; ``Ahat`` is 0 outside the mask. Diagnostics
      (float32 scalars over masked tokens): ``bonus_mean`` (mean bonus before any
      renormalisation), ``cap_frac`` (fraction of tokens of rollouts with ``A != 0`` whose
      bonus hit the ``|A| / phi`` cap), and :func:`four_quadrants`.
    """
    advantages = jax.lax.stop_gradient(as_float(advantages))[:, None]
    mask = as_bool_mask(mask)
    entropy = jnp.where(mask, jax.lax.stop_gradient(as_float(entropy)), 0.0)
    uncapped = jnp.maximum(cfg.alpha * entropy, 0.0)  # H >= 0; guards rounding
    cap = jnp.abs(advantages) / cfg.phi
    bonus = jnp.minimum(uncapped, cap)
    if cfg.form == "bonus":
        token_advantages = jnp.where(mask, advantages + jnp.sign(advantages) * bonus, 0.0)
    else:  # the same relative weights, renormalised to the row's credit mass
        weight = jnp.where(mask, 1.0 + safe_divide(bonus, jnp.abs(advantages)), 0.0)
        count = jnp.sum(mask, axis=-1, keepdims=True).astype(weight.dtype)
        mean_weight = safe_divide(jnp.sum(weight, axis=-1, keepdims=True), count)
        token_advantages = jnp.where(mask, advantages * safe_divide(weight, mean_weight), 0.0)
    nonzero = mask & (advantages != 0)
    diagnostics = {
        "bonus_mean": masked_mean(jnp.where(advantages != 0, bonus, 0.0), mask),
        "cap_frac": masked_mean((uncapped >= cap).astype(jnp.float32), nonzero),
        **four_quadrants(token_advantages, advantages[:, 0], entropy, mask),
    }
    return jax.lax.stop_gradient(token_advantages), diagnostics

"""RLSD (Self-Distilled RLVR) token advantages (docs/methods.md, "RLSD").

With a frozen teacher that sees a reference solution::

    d[i,t]    = lp_T[i,t] - lp_old[i,t]                    (stop-gradient)
    w[i,t]    = exp(sign(A_i) * d[i,t])
    Ahat[i,t] = A_i * ((1 - lam) + lam * clip(w[i,t], 1 - eps_w, 1 + eps_w))

Implementation note: we evaluate the algebraically identical
``A_i * (1 + lam * (clip(w) - 1))`` and select ``A_i`` itself where that factor is 1,
so ``lam == 0`` and ``clip(w) == 1`` both give exactly ``A_i`` (bit for bit).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float, masked_mean

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RLSDConfig:
    """Hyper-parameters of RLSD (hashable).

    Attributes:
      lam: mixing weight between the plain advantage and the teacher-reweighted one,
        in ``[0, 1]``; the original specification's and the authors' default 0.5.
        ``lam = 0`` is exactly GRPO.
      eps_w: the token weight is clipped to ``[1 - eps_w, 1 + eps_w]``; default 0.2.
      decay_steps: ``lam`` decays linearly to 0 over this many optimizer steps, as the
        authors' recipe does (``rlsd_lambda_decay_steps=60``): at 0-based step ``s``,
        ``lam_eff = lam * max(0, 1 - (s + 1) / decay_steps)`` (their step counter starts at
        1). ``None`` keeps ``lam`` constant (the original specification's form).
    """

    lam: float = 0.5
    eps_w: float = 0.2
    decay_steps: int | None = 60

    def __post_init__(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if not 0.0 <= self.eps_w < 1.0:
            raise ValueError(f"eps_w must be in [0, 1), got {self.eps_w}")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise ValueError(f"decay_steps must be >= 1 or None, got {self.decay_steps}")


def rlsd_lambda(cfg: RLSDConfig, step: Array | int | None) -> Array:
    """``lam`` at 0-based optimizer step ``step`` (the authors' linear decay; constant when
    ``cfg.decay_steps`` or ``step`` is ``None``). Float32 scalar."""
    lam = jnp.float32(cfg.lam)
    if cfg.decay_steps is None or step is None:
        return lam
    progress = (jnp.asarray(step, jnp.float32) + 1.0) / cfg.decay_steps
    return lam * jnp.maximum(0.0, 1.0 - progress)


def rlsd_token_weights(
    advantages: Array,
    lp_teacher: Array,
    lp_old: Array,
    mask: Array,
    eps_w: float,
) -> Array:
    """Clipped RLSD token weight ``clip(exp(sign(A_i) * (lp_T - lp_old)), 1-eps_w, 1+eps_w)``.

    Args:
      advantages: ``[B]`` sequence advantages ``A_i`` (only their sign is used).
      lp_teacher, lp_old: ``[B, T]`` teacher / sampling-policy log-probs.
      mask: ``[B, T]`` response mask.
      eps_w: clip half-width.

    Returns:
      ``[B, T]`` weights (stop-gradient); exactly 1 outside the mask, where
      ``A_i == 0``, and wherever ``lp_T == lp_old``.
    """
    mask = as_bool_mask(mask)
    gain = jax.lax.stop_gradient(as_float(lp_teacher)) - jax.lax.stop_gradient(as_float(lp_old))
    gain = jnp.where(mask, gain, 0.0)
    sign = jnp.sign(jax.lax.stop_gradient(as_float(advantages)))[:, None]
    weights = jnp.exp(sign * gain)
    return jnp.clip(weights, 1.0 - eps_w, 1.0 + eps_w)


def rlsd_token_advantages(
    advantages: Array,
    lp_teacher: Array,
    lp_old: Array,
    mask: Array,
    cfg: RLSDConfig,
    step: Array | int | None = None,
) -> tuple[Array, dict[str, Array]]:
    """RLSD per-token advantages and diagnostics.

    Args:
      advantages: ``[B]`` GRPO sequence advantages ``A_i``.
      lp_teacher: ``[B, T]`` log-probs of the response tokens under the frozen teacher
        with the reference-solution context.
      lp_old: ``[B, T]`` sampling-policy log-probs.
      mask: ``[B, T]`` response mask.
      cfg: :class:`RLSDConfig` (static).
      step: the 0-based optimizer step (``lam`` decays with it, :func:`rlsd_lambda`);
        ``None`` uses ``cfg.lam`` as it is.

    Returns:
      ``(Ahat [B, T], diagnostics)``; ``Ahat`` is 0 outside the mask. Diagnostics
      (float32 scalars over masked tokens): ``weight_mean`` (clipped weight),
      ``weight_clip_frac`` (fraction of tokens whose weight hit a clip bound, among
      rollouts with ``A != 0``), ``lam_eff``.
    """
    advantages = jax.lax.stop_gradient(as_float(advantages))
    mask = as_bool_mask(mask)
    weights = rlsd_token_weights(advantages, lp_teacher, lp_old, mask, cfg.eps_w)
    lam = rlsd_lambda(cfg, step)
    scale = 1.0 + lam * (weights - 1.0)
    broadcast = jnp.broadcast_to(advantages[:, None], scale.shape)
    token_advantages = jnp.where(scale == 1.0, broadcast, broadcast * scale)
    token_advantages = jnp.where(mask, token_advantages, 0.0)
    nonzero = mask & (advantages[:, None] != 0)
    at_bound = (weights <= 1.0 - cfg.eps_w) | (weights >= 1.0 + cfg.eps_w)
    diagnostics = {
        "weight_mean": masked_mean(weights, mask),
        "weight_clip_frac": masked_mean(at_bound.astype(jnp.float32), nonzero),
        "lam_eff": lam,
    }
    return jax.lax.stop_gradient(token_advantages), diagnostics

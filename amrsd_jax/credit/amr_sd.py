"""AMR-SD token advantages: GRPO modulated by an asymmetric, annealed gate on the
causal information gain of a self-written reflection (docs/methods.md, "AMR-SD").

Per response token::

    Ihat[i,t] = clip(lp_T[i,t] - lp_old[i,t], -kappa, kappa)
    D[i,t]    = 1[A_i > 0] * lam_eff * relu( Ihat[i,t] - tau)
              + 1[A_i < 0] * gam_eff * relu(-Ihat[i,t] - tau)
    lam_eff   = lam * max(0, 1 - s / T_decay),   gam_eff likewise
    Ahat[i,t] = A_i * (1 + D[i,t])

Because ``D >= 0`` the gate never flips the sign of ``A_i`` and never shrinks it, and
``D == 0`` wherever ``|Ihat| <= tau``. Once ``s >= T_decay`` the gate is forced to
exactly 0, so ``Ahat`` is bit-for-bit GRPO's per-token advantage.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from amrsd_jax.arrays import as_bool_mask, as_float, masked_mean, safe_divide
from amrsd_jax.credit.cig import causal_information_gain

Array = jax.Array

#: Quantiles of ``Ihat`` over masked tokens reported by :func:`ihat_quantiles`
#: (diagnostic keys ``ihat_q05`` ... ``ihat_q95``).
IHAT_QUANTILES: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclasses.dataclass(frozen=True)
class AMRSDConfig:
    """Hyper-parameters of AMR-SD credit assignment (hashable, usable as a static arg).

    Attributes:
      lam: gate strength on correct rollouts (``A_i > 0``); default 0.2.
      gam: gate strength on incorrect rollouts (``A_i < 0``); default 0.1
        (deliberately 2:1 with ``lam``).
      tau: dead-zone threshold on ``|Ihat|`` in nats. Not published: 0.5 is OUR default
        and must be swept in the benchmark.
      kappa: clip bound on the causal information gain, nats; default 5.
      decay_steps: ``T_decay`` of docs/methods.md ("AMR-SD"), the number of optimizer
        steps over which
        ``lam`` and ``gam`` anneal linearly to 0 (default 50). From step
        ``decay_steps`` on, AMR-SD is exactly GRPO. ``None`` disables annealing (our
        extension, for ablations).
    """

    lam: float = 0.2
    gam: float = 0.1
    tau: float = 0.5
    kappa: float = 5.0
    decay_steps: int | None = 50

    def __post_init__(self) -> None:
        if self.lam < 0 or self.gam < 0:
            raise ValueError(f"lam and gam must be >= 0, got {self.lam}, {self.gam}")
        if self.tau < 0:
            raise ValueError(f"tau must be >= 0, got {self.tau}")
        if self.kappa <= 0:
            raise ValueError(f"kappa must be > 0, got {self.kappa}")
        if self.decay_steps is not None and self.decay_steps <= 0:
            raise ValueError(f"decay_steps must be > 0 or None, got {self.decay_steps}")


def annealing_factor(cfg: AMRSDConfig, step: Array | int) -> Array:
    """Linear annealing factor ``max(0, 1 - step / decay_steps)`` (1 if annealing is off).

    Args:
      cfg: AMR-SD config.
      step: scalar global optimizer step ``s`` (Python int or traced int/float).

    Returns:
      float32 scalar in ``[0, 1]``; exactly 0.0 for ``step >= decay_steps``.
    """
    step = jnp.asarray(step, dtype=jnp.float32)
    if cfg.decay_steps is None:
        return jnp.ones_like(step)
    # (decay_steps - step) / decay_steps rather than 1 - step / decay_steps: XLA may
    # turn the division into a multiplication by 1/decay_steps, and then
    # 1 - step * (1/decay_steps) is not exactly 0 at step == decay_steps. The explicit
    # comparison makes "exactly 0 from decay_steps on" independent of rounding.
    remaining = (cfg.decay_steps - step) / cfg.decay_steps
    return jnp.where(step >= cfg.decay_steps, 0.0, jnp.clip(remaining, 0.0, 1.0))


def annealed_coefficients(cfg: AMRSDConfig, step: Array | int) -> tuple[Array, Array]:
    """Annealed gate strengths ``(lam_eff, gam_eff)`` at global optimizer step ``step``.

    Returns:
      two float32 scalars, ``lam * f`` and ``gam * f`` with ``f = annealing_factor``.
    """
    factor = annealing_factor(cfg, step)
    return cfg.lam * factor, cfg.gam * factor


def asymmetric_gate(
    cig: Array,
    advantages: Array,
    lam_eff: Array | float,
    gam_eff: Array | float,
    tau: float,
    mask: Array | None = None,
) -> Array:
    """Asymmetric ReLU gate ``D`` (docs/methods.md, "AMR-SD", step 6).

    ``D = lam_eff * relu(Ihat - tau)`` on rollouts with ``A > 0``,
    ``D = gam_eff * relu(-Ihat - tau)`` on rollouts with ``A < 0``, 0 when ``A == 0``.

    Args:
      cig: ``[B, T]`` clipped causal information gain ``Ihat`` (finite on masked tokens).
      advantages: ``[B]`` sequence advantages ``A_i``.
      lam_eff, gam_eff: non-negative scalar gate strengths (already annealed).
      tau: dead-zone threshold (``>= 0``).
      mask: optional ``[B, T]`` response mask; ``D`` is 0 outside it.

    Returns:
      ``[B, T]`` non-negative gate ``D``.
    """
    cig = as_float(cig)
    advantages = jax.lax.stop_gradient(as_float(advantages))[:, None]
    positive_branch = lam_eff * jax.nn.relu(cig - tau)
    negative_branch = gam_eff * jax.nn.relu(-cig - tau)
    gate = jnp.where(advantages > 0, positive_branch, jnp.where(advantages < 0, negative_branch, 0.0))
    if mask is not None:
        gate = jnp.where(as_bool_mask(mask), gate, 0.0)
    return gate


def amr_sd_token_advantages(
    advantages: Array,
    lp_teacher: Array,
    lp_old: Array,
    mask: Array,
    cfg: AMRSDConfig,
    step: Array | int,
) -> tuple[Array, dict[str, Array]]:
    """AMR-SD per-token advantages ``Ahat = A * (1 + D)`` and step diagnostics.

    Args:
      advantages: ``[B]`` GRPO sequence advantages ``A_i``.
      lp_teacher: ``[B, T]`` teacher (reflection-conditioned) log-probs of the response
        tokens.
      lp_old: ``[B, T]`` sampling-policy log-probs of the same tokens.
      mask: ``[B, T]`` response mask (bool or 0/1).
      cfg: :class:`AMRSDConfig` (static).
      step: scalar global optimizer step.

    Returns:
      ``(Ahat, diagnostics)``. ``Ahat`` is ``[B, T]``, 0 outside the mask and
      bit-for-bit ``grpo_token_advantages(advantages, mask)`` once
      ``step >= cfg.decay_steps``. ``diagnostics`` holds float32 scalars:

      - ``lam_eff``, ``gam_eff``: annealed gate strengths;
      - ``gated_frac``: fraction of masked tokens with ``D > 0``;
      - ``gated_frac_correct`` / ``gated_frac_incorrect``: the same fraction among
        masked tokens of rollouts with ``A > 0`` / ``A < 0`` (0 if there are none);
      - ``gate_mean``: mean of ``D`` over masked tokens;
      - ``ihat_mean``: mean of ``Ihat`` over masked tokens.

      The quantiles of ``Ihat`` are :func:`ihat_quantiles`, computed on the host.
    """
    advantages = jax.lax.stop_gradient(as_float(advantages))
    mask = as_bool_mask(mask)
    cig = causal_information_gain(lp_teacher, lp_old, mask, cfg.kappa)
    factor = annealing_factor(cfg, step)
    lam_eff, gam_eff = cfg.lam * factor, cfg.gam * factor
    gate = asymmetric_gate(cig, advantages, lam_eff, gam_eff, cfg.tau, mask)
    # Belt and braces for the "exactly GRPO after T_decay" guarantee: even a NaN gain
    # on a masked token cannot survive a zero annealing factor.
    gate = jnp.where(factor > 0, gate, 0.0)
    # Select (not multiply) where the gate is closed, so those tokens carry A_i bit for
    # bit (a multiply by 1.0 would still flush subnormal advantages to 0 on XLA CPU).
    broadcast = jnp.broadcast_to(advantages[:, None], gate.shape)
    token_advantages = jnp.where(gate > 0, broadcast * (1.0 + gate), broadcast)
    token_advantages = jnp.where(mask, token_advantages, 0.0)

    gated = mask & (gate > 0)
    correct = mask & (advantages[:, None] > 0)
    incorrect = mask & (advantages[:, None] < 0)
    num_masked = jnp.sum(mask)
    diagnostics = {
        "lam_eff": lam_eff,
        "gam_eff": gam_eff,
        "gated_frac": safe_divide(jnp.sum(gated), num_masked).astype(jnp.float32),
        "gated_frac_correct": safe_divide(jnp.sum(gated & correct), jnp.sum(correct)).astype(jnp.float32),
        "gated_frac_incorrect": safe_divide(jnp.sum(gated & incorrect), jnp.sum(incorrect)).astype(
            jnp.float32
        ),
        "gate_mean": masked_mean(gate, mask),
        "ihat_mean": masked_mean(cig, mask),
    }
    return jax.lax.stop_gradient(token_advantages), diagnostics


def ihat_quantiles(lp_teacher, lp_old, mask, kappa: float) -> dict[str, float]:
    """``ihat_qXX``: quantiles (linear interpolation) of ``Ihat`` over the masked tokens of
    ``[B, T]`` host arrays, for each of :data:`IHAT_QUANTILES`; 0 when the mask is empty.

    A diagnostic computed on the host, beside the teacher scores: inside the compiled update
    step a quantile is a sort of every token of the batch, gathered onto every device (on the
    TPU compiler it added ~20% to the 1.5B update step's compile time).
    """
    mask = np.asarray(mask).astype(bool)
    # causal_information_gain on the masked tokens, in NumPy (no device program to compile)
    gain = np.asarray(lp_teacher, np.float32)[mask] - np.asarray(lp_old, np.float32)[mask]
    masked = np.clip(gain, -kappa, kappa)
    values = np.quantile(masked, IHAT_QUANTILES) if masked.size else np.zeros(len(IHAT_QUANTILES))
    return {f"ihat_q{round(q * 100):02d}": float(v) for q, v in zip(IHAT_QUANTILES, values)}

"""GRPO group-relative advantages (docs/methods.md, "GRPO").

For a prompt with ``G`` sampled responses and rewards ``r_1..r_G``::

    A_i = (r_i - mean_g(r)) / (std_g(r) + eps)       scale = "group" (default)
    A_i = (r_i - mean_g(r)) / (std_batch(r) + eps)   scale = "batch"
    A_i =  r_i - mean_g(r)                           scale = "none"  (Dr.GRPO)

A group whose rewards are all equal gets ``A_i = 0`` exactly (checked with
``max == min``, so floating-point error in the mean can never leak a tiny non-zero
advantage into such a group).

``std_ddof`` picks the estimator (the original specification did not fix it): 0 is the
population standard
deviation (numpy's default, this function's default), 1 the unbiased one that TRL and verl
use (``torch.std``). A training run uses TRL's recipe, ``std_ddof=1`` and ``eps=1e-4``
(``TrainConfig.advantage_std_ddof`` / ``advantage_eps``, passed by the update step).

Every function here is pure and jit-compatible; ``scale``, ``eps``, ``std_ddof`` and
``num_groups`` are static (close over them or mark them ``static_argnames``). The
returned advantages are wrapped in ``stop_gradient``: credit is a constant for the
policy loss.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float

Array = jax.Array
AdvantageScale = Literal["group", "batch", "none"]
ADVANTAGE_SCALES: tuple[str, ...] = ("group", "batch", "none")
DEFAULT_STD_EPS = 1e-6


def _check_scale(scale: str) -> None:
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")


def _check_ddof(std_ddof: int) -> None:
    if std_ddof not in (0, 1):
        raise ValueError(f"std_ddof must be 0 or 1, got {std_ddof!r}")


def _batch_std(rewards: Array, std_ddof: int) -> Array:
    """Standard deviation over every reward of the batch (scale="batch")."""
    centered = rewards - jnp.mean(rewards)
    return jnp.sqrt(jnp.sum(centered**2) / max(rewards.size - std_ddof, 1))


def grpo_advantages(
    rewards: Array,
    scale: AdvantageScale = "group",
    eps: float = DEFAULT_STD_EPS,
    std_ddof: int = 0,
) -> Array:
    """Group-relative advantages for a dense ``[num_prompts, G]`` reward matrix.

    Args:
      rewards: ``[num_prompts, G]`` rewards, row ``p`` holding the G responses to prompt p.
      scale: ``"group"`` divides by each group's std, ``"batch"`` by the std of all
        ``num_prompts * G`` rewards, ``"none"`` only centres (Dr.GRPO).
      eps: added to the std before dividing (default 1e-6; a training run passes
        ``advantage_eps``, 1e-4).
      std_ddof: 0 = population std (our default), 1 = unbiased std (TRL/verl).

    Returns:
      ``[num_prompts, G]`` advantages (float), exactly 0 for all-equal groups.
    """
    _check_scale(scale)
    _check_ddof(std_ddof)
    rewards = as_float(rewards)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be [num_prompts, G], got shape {rewards.shape}")
    group_size = rewards.shape[-1]
    centered = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    all_equal = jnp.max(rewards, axis=-1, keepdims=True) == jnp.min(rewards, axis=-1, keepdims=True)
    if scale == "group":
        var = jnp.sum(centered**2, axis=-1, keepdims=True) / max(group_size - std_ddof, 1)
        advantages = centered / (jnp.sqrt(var) + eps)
    elif scale == "batch":
        advantages = centered / (_batch_std(rewards, std_ddof) + eps)
    else:
        advantages = centered
    return jax.lax.stop_gradient(jnp.where(all_equal, 0.0, advantages))


def grpo_advantages_from_group_ids(
    rewards: Array,
    group_ids: Array,
    num_groups: int,
    scale: AdvantageScale = "group",
    eps: float = DEFAULT_STD_EPS,
    std_ddof: int = 0,
) -> Array:
    """Group-relative advantages for a flat batch, with groups given by id (segment ops).

    Same formulas as :func:`grpo_advantages`; groups may have different sizes and may
    appear in any order.

    Args:
      rewards: ``[B]`` rewards.
      group_ids: ``[B]`` int ids in ``[0, num_groups)`` (ids outside this range are
        dropped by the segment ops and give undefined results).
      num_groups: static number of groups.
      scale, eps, std_ddof: as in :func:`grpo_advantages`.

    Returns:
      ``[B]`` advantages, exactly 0 for members of all-equal groups (including groups
      of one).
    """
    _check_scale(scale)
    _check_ddof(std_ddof)
    rewards = as_float(rewards)
    group_ids = jnp.asarray(group_ids, dtype=jnp.int32)
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(
            f"rewards and group_ids must both be [B], got {rewards.shape} and {group_ids.shape}"
        )
    seg = dict(segment_ids=group_ids, num_segments=num_groups)
    counts = jax.ops.segment_sum(jnp.ones_like(rewards), **seg)
    group_mean = jax.ops.segment_sum(rewards, **seg) / jnp.maximum(counts, 1)
    centered = rewards - group_mean[group_ids]
    all_equal = (jax.ops.segment_max(rewards, **seg) == jax.ops.segment_min(rewards, **seg))[group_ids]
    if scale == "group":
        group_var = jax.ops.segment_sum(centered**2, **seg) / jnp.maximum(counts - std_ddof, 1)
        advantages = centered / (jnp.sqrt(group_var)[group_ids] + eps)
    elif scale == "batch":
        advantages = centered / (_batch_std(rewards, std_ddof) + eps)
    else:
        advantages = centered
    return jax.lax.stop_gradient(jnp.where(all_equal, 0.0, advantages))


def grpo_token_advantages(advantages: Array, mask: Array) -> Array:
    """Broadcast sequence advantages to tokens: GRPO's per-token advantage.

    Args:
      advantages: ``[B]`` sequence advantages ``A_i``.
      mask: ``[B, T]`` response mask (bool or 0/1).

    Returns:
      ``[B, T]`` with ``A_i`` on masked tokens and 0 elsewhere.
    """
    advantages = jax.lax.stop_gradient(as_float(advantages))
    return jnp.where(as_bool_mask(mask), advantages[:, None], 0.0)

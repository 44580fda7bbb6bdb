"""Clipped policy-gradient loss with exact micro-batch aggregation (docs/methods.md, "Policy loss").

Per token, with ``rho = exp(lp_new - lp_old)`` and the method's per-token advantage
``Ahat``::

    pg  = -min(rho * Ahat, clip(rho, 1 - eps_low, 1 + eps_high) * Ahat)
    pg  = min(pg, -c * Ahat)              where Ahat < 0   (optional dual clip, c = 3)
    pg  = pg * min(exp(lp_old - lp_sampler), tis_cap)      (optional TIS, detached)
    kl  = exp(lp_ref - lp_new) - (lp_ref - lp_new) - 1     (k3)
    loss_token = pg + kl_beta * kl

Aggregation is split into "sum of per-token losses" and "normaliser" so that a caller
splitting the global batch into micro-batches gets EXACTLY the big-batch loss and
gradient by summing micro-batch losses computed with the GLOBAL normaliser
(:func:`loss_normalizer` on the global mask)::

    normalizer = loss_normalizer(global_mask, cfg.aggregation)
    loss = sum(policy_gradient_loss(..., micro_batch_k..., normalizer=normalizer)[0] for k)

Modes (``N`` = number of sequences with at least one masked token in the global batch):

- ``token-mean``: ``sum_{i,t} m * l / sum_{i,t} m`` (global token count);
- ``seq-mean-token-mean``: ``sum_i (sum_t m * l / L_i) / N``, ``L_i`` the token count
  of sequence i (a per-sequence quantity, so micro-batching by whole sequences is
  exact);
- ``seq-mean-token-sum-norm`` (Dr.GRPO): ``sum_{i,t} m * l / (T_max * N)`` with
  ``T_max`` the maximum response length, by default the static padded time dimension
  ``T`` of the mask (pass ``max_response_length`` when micro-batches are padded to
  different lengths).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float, safe_divide

Array = jax.Array
Aggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
AGGREGATION_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def pairwise_sum(x: Array, axis: int = -1) -> Array:
    """Sum over ``axis`` as a fixed binary tree of element-wise adds (zero-padded to a
    power of two).

    Unlike ``jnp.sum`` (an XLA ``reduce``, whose summation order the CPU backend was
    seen to pick differently depending on what got fused into it), the order here is
    written into the program and XLA does not reassociate explicit floating-point adds,
    so bit-identical inputs give a bit-identical sum whatever is fused around it. This
    is what lets "AMR-SD after T_decay" reproduce GRPO's loss bit for bit although the
    two training steps are different XLA programs. Cost: ``log2(n)`` rounds of adds.

    Shapes: ``[..., n, ...] -> [...]`` (``axis`` removed).
    """
    x = jnp.moveaxis(x, axis, -1)
    size = x.shape[-1]
    if size == 0:
        return jnp.zeros(x.shape[:-1], x.dtype)
    padded = 1 << (size - 1).bit_length()
    if padded != size:
        x = jnp.concatenate([x, jnp.zeros(x.shape[:-1] + (padded - size,), x.dtype)], axis=-1)
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def _check_aggregation(mode: str) -> None:
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"aggregation must be one of {AGGREGATION_MODES}, got {mode!r}")


@dataclasses.dataclass(frozen=True)
class PolicyLossConfig:
    """Hyper-parameters of the clipped policy-gradient loss (hashable).

    Attributes:
      eps_low: lower clip, ratio floor ``1 - eps_low``; default 0.2.
      eps_high: upper clip, ratio ceiling ``1 + eps_high`` (clip-higher); default 0.28.
      dual_clip: ``c`` of the dual clip for negative advantages, ``None`` = off (our
        default; 3.0 when on). Must be > 1.
      kl_beta: weight of the k3 KL to a frozen reference; default 0.
      aggregation: one of :data:`AGGREGATION_MODES`; default ``"token-mean"``.
      tis_cap: truncated importance sampling cap, ``None`` = off. When set, each
        token's policy-gradient term is multiplied by the detached
        ``min(exp(lp_old - lp_sampler), tis_cap)`` (the KL term is not reweighted).
    """

    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: float | None = None
    kl_beta: float = 0.0
    aggregation: Aggregation = "token-mean"
    tis_cap: float | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.eps_low < 1.0:
            raise ValueError(f"eps_low must be in [0, 1), got {self.eps_low}")
        if self.eps_high < 0:
            raise ValueError(f"eps_high must be >= 0, got {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.kl_beta < 0:
            raise ValueError(f"kl_beta must be >= 0, got {self.kl_beta}")
        _check_aggregation(self.aggregation)
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or None, got {self.tis_cap}")


def per_token_policy_loss(
    lp_new: Array,
    lp_old: Array,
    token_advantages: Array,
    mask: Array,
    cfg: PolicyLossConfig,
    lp_ref: Array | None = None,
    lp_sampler: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Per-token clipped surrogate loss (+ k3 KL) and per-token statistics.

    Args:
      lp_new: ``[B, T]`` log-probs of the response tokens under the current policy
        (the only differentiated input).
      lp_old: ``[B, T]`` log-probs under the policy that sampled them (detached).
      token_advantages: ``[B, T]`` per-token advantages ``Ahat`` (detached).
      mask: ``[B, T]`` response mask.
      cfg: :class:`PolicyLossConfig` (static).
      lp_ref: optional ``[B, T]`` frozen-reference log-probs (detached); required when
        ``cfg.kl_beta > 0``.
      lp_sampler: optional ``[B, T]`` log-probs reported by the inference engine
        (detached); required when ``cfg.tis_cap`` is set.

    Returns:
      ``(loss [B, T], stats)``: loss is exactly 0 outside the mask (NaN/inf padding
      never leaks, in value or gradient). ``stats`` holds ``[B, T]`` float arrays:
      ``ratio``, ``clipped`` (1 where the clipped branch is active, i.e. the token
      gets no gradient from the surrogate), ``dual_clipped``, ``pg``; plus ``kl`` when
      ``lp_ref`` is given; ``sampler_abs_diff`` (``|lp_old - lp_sampler|``) when
      ``lp_sampler`` is given; ``tis_weight`` when ``cfg.tis_cap`` is set.
    """
    if cfg.kl_beta > 0 and lp_ref is None:
        raise ValueError("per_token_policy_loss: kl_beta > 0 needs lp_ref")
    if cfg.tis_cap is not None and lp_sampler is None:
        raise ValueError("per_token_policy_loss: tis_cap is set but lp_sampler is None")
    mask = as_bool_mask(mask)
    sg = jax.lax.stop_gradient
    lp_new = as_float(lp_new)
    lp_old = sg(as_float(lp_old))
    advantages = jnp.where(mask, sg(as_float(token_advantages)), 0.0)

    log_ratio = jnp.where(mask, lp_new - lp_old, 0.0)
    ratio = jnp.exp(log_ratio)
    clipped_ratio = jnp.clip(ratio, 1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = -jnp.minimum(ratio * advantages, clipped_ratio * advantages)
    clipped = ((advantages > 0) & (ratio > 1.0 + cfg.eps_high)) | (
        (advantages < 0) & (ratio < 1.0 - cfg.eps_low)
    )
    dual_clipped = jnp.zeros_like(clipped)
    if cfg.dual_clip is not None:
        dual_bound = -cfg.dual_clip * advantages
        dual_clipped = (advantages < 0) & (pg > dual_bound)
        pg = jnp.where(advantages < 0, jnp.minimum(pg, dual_bound), pg)

    stats: dict[str, Array] = {
        "ratio": ratio,
        "clipped": clipped.astype(ratio.dtype),
        "dual_clipped": dual_clipped.astype(ratio.dtype),
    }
    if lp_sampler is not None:
        sampler_gap = jnp.where(mask, lp_old - sg(as_float(lp_sampler)), 0.0)
        stats["sampler_abs_diff"] = jnp.abs(sampler_gap)
        if cfg.tis_cap is not None:
            tis_weight = jnp.minimum(jnp.exp(sampler_gap), cfg.tis_cap)
            stats["tis_weight"] = tis_weight
            pg = pg * tis_weight
    stats["pg"] = pg

    loss = pg
    if lp_ref is not None:
        ref_gap = jnp.where(mask, sg(as_float(lp_ref)) - lp_new, 0.0)
        kl = jnp.exp(ref_gap) - ref_gap - 1.0
        stats["kl"] = kl
        if cfg.kl_beta > 0:
            loss = loss + cfg.kl_beta * kl
    return jnp.where(mask, loss, 0.0), stats


def loss_normalizer(
    mask: Array,
    mode: Aggregation,
    max_response_length: int | None = None,
) -> Array:
    """Normaliser of an aggregation mode, computed on the GLOBAL batch's mask.

    Args:
      mask: ``[B, T]`` response mask of the whole (global) batch.
      mode: one of :data:`AGGREGATION_MODES`.
      max_response_length: ``T_max`` for ``seq-mean-token-sum-norm``; defaults to the
        static padded time dimension ``T`` of ``mask``.

    Returns:
      float32 scalar: the masked-token count (``token-mean``), the number ``N`` of
      sequences with at least one masked token (``seq-mean-token-mean``), or
      ``T_max * N`` (``seq-mean-token-sum-norm``).
    """
    _check_aggregation(mode)
    mask = as_bool_mask(mask)
    if mode == "token-mean":
        return jnp.sum(mask).astype(jnp.float32)
    num_sequences = jnp.sum(jnp.any(mask, axis=-1)).astype(jnp.float32)
    if mode == "seq-mean-token-mean":
        return num_sequences
    length = mask.shape[-1] if max_response_length is None else max_response_length
    return num_sequences * float(length)


def aggregate_token_losses(
    per_token: Array,
    mask: Array,
    mode: Aggregation,
    normalizer: Array | float,
) -> Array:
    """Aggregate ``[B, T]`` per-token losses to a scalar: (weighted sum) / normaliser.

    Summing this over micro-batches (split along ``B``, whole sequences each) with the
    same global ``normalizer`` equals the value on the concatenated batch.

    Args:
      per_token: ``[B, T]`` per-token losses (entries outside the mask are ignored).
      mask: ``[B, T]`` response mask of THIS (micro-)batch.
      mode: one of :data:`AGGREGATION_MODES`.
      normalizer: scalar from :func:`loss_normalizer` on the GLOBAL mask. A zero
        normaliser gives 0.

    Sums use :func:`pairwise_sum` (fixed order), so identical per-token losses give an
    identical aggregate in any compiled program.

    Returns:
      float scalar.
    """
    _check_aggregation(mode)
    mask = as_bool_mask(mask)
    per_token = jnp.where(mask, as_float(per_token), 0.0)
    row_sums = pairwise_sum(per_token, axis=-1)
    if mode == "seq-mean-token-mean":
        lengths = jnp.sum(mask, axis=-1).astype(per_token.dtype)
        row_sums = safe_divide(row_sums, lengths)
    total = pairwise_sum(row_sums, axis=-1)
    return safe_divide(total, jnp.asarray(normalizer, per_token.dtype))


def policy_gradient_loss(
    lp_new: Array,
    lp_old: Array,
    token_advantages: Array,
    mask: Array,
    cfg: PolicyLossConfig,
    lp_ref: Array | None = None,
    lp_sampler: Array | None = None,
    normalizer: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Aggregated clipped policy-gradient loss and summed per-token statistics.

    This is the loss the update step uses, one micro-batch at a time.

    Args:
      lp_new, lp_old, token_advantages, mask, lp_ref, lp_sampler: as in
        :func:`per_token_policy_loss` (all ``[B, T]``).
      cfg: :class:`PolicyLossConfig` (static).
      normalizer: global normaliser from :func:`loss_normalizer` (needed for exact
        micro-batching); ``None`` computes it from this batch's ``mask``.

    Returns:
      ``(loss, sums)``: the scalar loss, and float32 sums over THIS batch's masked tokens
      of each per-token statistic of :func:`per_token_policy_loss` but ``pg``:
      ``ratio_sum``, ``clipped_sum``, ``dual_clipped_sum``; ``kl_sum`` with ``lp_ref``;
      ``sampler_abs_diff_sum`` with ``lp_sampler``; ``tis_weight_sum`` with
      ``cfg.tis_cap``. Sums add up exactly over micro-batches; divide by the global
      token count for means (the update step logs them as ``<name>_mean``).
    """
    mask = as_bool_mask(mask)
    if normalizer is None:
        normalizer = loss_normalizer(mask, cfg.aggregation)
    per_token, stats = per_token_policy_loss(
        lp_new, lp_old, token_advantages, mask, cfg, lp_ref=lp_ref, lp_sampler=lp_sampler
    )
    loss = aggregate_token_losses(per_token, mask, cfg.aggregation, normalizer)
    sums = {f"{k}_sum": jax.lax.stop_gradient(jnp.sum(jnp.where(mask, v, 0.0),
                                                       dtype=jnp.float32))
            for k, v in stats.items() if k != "pg"}
    return loss, sums

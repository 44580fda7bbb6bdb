"""SDPO self-distillation loss (docs/methods.md, "SDPO").

Per response token, between the student ``p_S = pi_theta(. | x, y_<t)`` and the
teacher ``p_T`` (the same model with a "reprompt" context; stop-gradient):

- ``full``: ``alpha = 0 -> KL(p_T || p_S)``; ``alpha = 1 -> KL(p_S || p_T)``; otherwise,
  with ``M = (1 - alpha) p_S + alpha p_T``::

      (1 - alpha) KL(p_S || M) + alpha KL(p_T || M)       (alpha = 0.5: JSD)

- ``topk``: the same divergence on the student's top-k tokens plus one tail bucket
  holding each distribution's remaining mass (both distributions on that same
  ``k + 1`` support). ``k >= V`` falls back to ``full``.
- ``sampled`` (``alpha`` must be 1): ``loss_t = sg(lp_S - lp_T) * lp_S`` on the
  sampled token, whose gradient is the REINFORCE estimate of ``grad KL(p_S || p_T)``.

Every token is multiplied by the detached importance weight
``min(exp(lp_S - lp_old), is_clip)`` (``lp_S`` the student's log-prob of the sampled
token) and, given the sampler's log-probs, by the rollout correction
``min(exp(lp_old - lp_sampler), tis_cap)``; rollouts without a teacher context
(``teacher_mask[i] == 0``) get 0.
Total loss: ``(1 - w_d) * policy_loss + w_d * distill_loss``.

Vocabulary memory: the token-level functions act on any ``[..., V]`` arrays, so a
caller can flatten tokens to ``[N, V]`` and process chunks; :func:`sdpo_per_token_loss`
does this itself with ``jax.lax.map(..., batch_size=chunk_size)`` and a rematerialised
per-chunk body when ``chunk_size`` is given.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from amrsd_jax.arrays import as_bool_mask, as_float, masked_mean
from amrsd_jax.losses.policy import Aggregation, aggregate_token_losses, loss_normalizer

Array = jax.Array
DistillMode = Literal["full", "topk", "sampled"]
DISTILL_MODES: tuple[str, ...] = ("full", "topk", "sampled")


@dataclasses.dataclass(frozen=True)
class SDPOConfig:
    """Hyper-parameters of the SDPO distillation loss (hashable).

    Defaults are the SDPO authors' recipe (lasgroup/SDPO ``actor.yaml`` / ``sdpo.yaml``):
    the student's top-100 logits plus one tail bucket per distribution, generalised JSD
    with ``alpha = 0.5``, both importance weights capped at 2, and no policy-gradient term.
    The original specification's "full vocabulary, forward KL" is ``mode="full", alpha=0``.

    Attributes:
      mode: ``"topk"`` (default), ``"full"`` or ``"sampled"`` (TRL's port: sampled token,
        ``alpha = 1``).
      alpha: divergence interpolation in ``[0, 1]`` (0 = forward KL(p_T||p_S), 1 =
        reverse KL(p_S||p_T), in between the generalised JSD; the authors' convention).
        ``sampled`` needs ``alpha == 1`` (checked here, at construction).
      topk: ``k`` of the ``topk`` mode (authors: 100; their rich-feedback runs use 20).
      is_clip: cap of the detached importance weight ``exp(lp_S - lp_old)`` (authors and
        docs/methods.md: 2). ``None`` disables it.
      tis_cap: cap of the detached rollout-correction weight ``exp(lp_old - lp_sampler)``
        on the distillation term (the trainer's over the sampler's probability of each
        token: the authors' ``rollout_is: token``, threshold 2). ``None`` disables it.
      distill_weight: ``w_d`` in ``(1 - w_d) * policy + w_d * distill``; 1 (the authors'
        SDPO has no policy-gradient term).
      feedback_only_without_solution: the reprompt carries the verifier's feedback only
        when the group has no successful peer solution (authors' default); ``False``
        shows both.
    """

    mode: DistillMode = "topk"
    alpha: float = 0.5
    topk: int = 100
    is_clip: float | None = 2.0
    tis_cap: float | None = 2.0
    distill_weight: float = 1.0
    feedback_only_without_solution: bool = True

    def __post_init__(self) -> None:
        if self.mode not in DISTILL_MODES:
            raise ValueError(f"mode must be one of {DISTILL_MODES}, got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.mode == "sampled" and self.alpha != 1.0:
            raise ValueError(f"mode='sampled' requires alpha == 1 (reverse KL), got {self.alpha}")
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if self.is_clip is not None and self.is_clip <= 0:
            raise ValueError(f"is_clip must be > 0 or None, got {self.is_clip}")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"tis_cap must be > 0 or None, got {self.tis_cap}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")


def kl_from_log_probs(log_p: Array, log_q: Array) -> Array:
    """``KL(p || q) = sum_v p_v (log p_v - log q_v)`` over the last axis.

    Terms with ``p_v == 0`` are exactly 0 (also in the gradient, even for ``-inf``
    log-probs); ``q_v == 0 < p_v`` gives ``+inf`` as it should.

    Args:
      log_p, log_q: ``[..., V]`` normalised log-probabilities.

    Returns:
      ``[...]`` divergences.
    """
    probs = jnp.exp(log_p)
    positive = probs > 0
    safe_log_p = jnp.where(positive, log_p, 0.0)
    safe_log_q = jnp.where(positive, log_q, 0.0)
    return jnp.sum(jnp.where(positive, probs * (safe_log_p - safe_log_q), 0.0), axis=-1)


def generalized_jsd_from_log_probs(log_p_student: Array, log_p_teacher: Array, alpha: float) -> Array:
    """The divergence family (docs/methods.md, "SDPO") on normalised log-probs over the last axis.

    ``alpha == 0``: ``KL(p_T || p_S)``; ``alpha == 1``: ``KL(p_S || p_T)``; otherwise
    ``(1 - alpha) KL(p_S || M) + alpha KL(p_T || M)`` with
    ``M = (1 - alpha) p_S + alpha p_T``. ``alpha`` is a static Python float.

    Shapes: ``[..., V], [..., V] -> [...]``.
    """
    if alpha == 0.0:
        return kl_from_log_probs(log_p_teacher, log_p_student)
    if alpha == 1.0:
        return kl_from_log_probs(log_p_student, log_p_teacher)
    # Tokens where both distributions are 0 would give logaddexp(-inf, -inf), whose
    # gradient is NaN: feed it zeros there and put -inf back afterwards.
    both_zero = (log_p_student == -jnp.inf) & (log_p_teacher == -jnp.inf)
    weighted_student = jnp.where(both_zero, 0.0, jnp.log1p(-alpha) + log_p_student)
    weighted_teacher = jnp.where(both_zero, 0.0, jnp.log(alpha) + log_p_teacher)
    log_mixture = jnp.where(both_zero, -jnp.inf, jnp.logaddexp(weighted_student, weighted_teacher))
    return (1.0 - alpha) * kl_from_log_probs(log_p_student, log_mixture) + alpha * kl_from_log_probs(
        log_p_teacher, log_mixture
    )


def _masked_logsumexp(values: Array, keep: Array) -> Array:
    """``log sum_{keep} exp(values)`` over the last axis; ``-inf`` (with finite
    gradients) when nothing is kept or every kept value is ``-inf``."""
    kept = jnp.where(keep, values, -jnp.inf)
    empty = jnp.all(kept == -jnp.inf, axis=-1, keepdims=True)
    safe = jnp.where(empty, 0.0, kept)
    return jnp.where(empty[..., 0], -jnp.inf, jax.nn.logsumexp(safe, axis=-1))


def topk_support_log_probs(
    log_p_student: Array, log_p_teacher: Array, k: int
) -> tuple[Array, Array]:
    """Restrict both distributions to the student's top-k tokens plus a tail bucket.

    Args:
      log_p_student, log_p_teacher: ``[..., V]`` normalised log-probs.
      k: number of kept tokens (static); ``k >= V`` returns the inputs unchanged.

    Returns:
      two ``[..., k + 1]`` normalised log-prob arrays: entries ``0..k-1`` are the
      student's top-k tokens (ties broken by ``jax.lax.top_k``), entry ``k`` the log of
      the remaining mass of each distribution.
    """
    vocab = log_p_student.shape[-1]
    if k >= vocab:
        return log_p_student, log_p_teacher
    lead_shape = log_p_student.shape[:-1]
    flat_student = log_p_student.reshape(-1, vocab)
    flat_teacher = log_p_teacher.reshape(-1, vocab)
    _, top_ids = jax.lax.top_k(jax.lax.stop_gradient(flat_student), k)  # [N, k]
    rows = jnp.arange(flat_student.shape[0])[:, None]
    in_top = jnp.zeros(flat_student.shape, bool).at[rows, top_ids].set(True)

    def support(flat_log_p: Array) -> Array:
        head = jnp.take_along_axis(flat_log_p, top_ids, axis=-1)
        tail = _masked_logsumexp(flat_log_p, ~in_top)
        return jnp.concatenate([head, tail[:, None]], axis=-1).reshape(lead_shape + (k + 1,))

    return support(flat_student), support(flat_teacher)


def sdpo_token_divergence(student_logits: Array, teacher_logits: Array, cfg: SDPOConfig) -> Array:
    """Per-token ``full`` / ``topk`` distillation divergence (teacher stop-gradient).

    Args:
      student_logits: ``[..., V]`` student logits (or log-probs), e.g. ``[N, V]``.
      teacher_logits: ``[..., V]`` teacher logits (or log-probs).
      cfg: :class:`SDPOConfig` with ``mode`` ``"full"`` or ``"topk"``.

    Returns:
      ``[...]`` per-token divergence (no importance weight, no masking).
    """
    if cfg.mode == "sampled":
        raise ValueError("sdpo_token_divergence: use sdpo_sampled_token_loss for mode='sampled'")
    log_p_student = jax.nn.log_softmax(as_float(student_logits), axis=-1)
    log_p_teacher = jax.nn.log_softmax(as_float(teacher_logits), axis=-1)
    return _divergence_from_log_probs(log_p_student, log_p_teacher, cfg)


def _divergence_from_log_probs(log_p_student: Array, log_p_teacher: Array, cfg: SDPOConfig) -> Array:
    """``full`` / ``topk`` divergence from normalised log-probs ``[..., V] -> [...]``."""
    log_p_teacher = jax.lax.stop_gradient(log_p_teacher)
    if cfg.mode == "topk":
        log_p_student, log_p_teacher = topk_support_log_probs(log_p_student, log_p_teacher, cfg.topk)
    return generalized_jsd_from_log_probs(log_p_student, log_p_teacher, cfg.alpha)


def sdpo_sampled_token_loss(lp_student: Array, lp_teacher: Array) -> Array:
    """``sampled`` mode: ``sg(lp_S - lp_T) * lp_S`` per sampled token.

    Its gradient ``(lp_S - lp_T) * grad lp_S`` is the single-sample REINFORCE estimate
    of ``grad KL(p_S || p_T)`` when the token was sampled from ``p_S``.

    Shapes: ``[...], [...] -> [...]`` (e.g. ``[B, T]``).
    """
    lp_student = as_float(lp_student)
    lp_teacher = jax.lax.stop_gradient(as_float(lp_teacher))
    return jax.lax.stop_gradient(lp_student - lp_teacher) * lp_student


def _flat_token_loss(
    student_logits: Array,
    teacher_logits: Array,
    sampled_ids: Array,
    lp_old: Array,
    cfg: SDPOConfig,
) -> tuple[Array, Array]:
    """Unmasked per-token loss on flat tokens: ``[N, V], [N, V], [N], [N] -> ([N], [N])``.

    Returns the importance-weighted loss and the (detached) importance weight.
    """
    log_p_student = jax.nn.log_softmax(as_float(student_logits), axis=-1)
    log_p_teacher = jax.lax.stop_gradient(jax.nn.log_softmax(as_float(teacher_logits), axis=-1))
    lp_student = jnp.take_along_axis(log_p_student, sampled_ids[..., None], axis=-1)[..., 0]
    if cfg.mode == "sampled":
        lp_teacher = jnp.take_along_axis(log_p_teacher, sampled_ids[..., None], axis=-1)[..., 0]
        loss = sdpo_sampled_token_loss(lp_student, lp_teacher)
    else:
        loss = _divergence_from_log_probs(log_p_student, log_p_teacher, cfg)
    if cfg.is_clip is None:
        weight = jnp.ones_like(lp_student)
    else:
        weight = jnp.minimum(jnp.exp(jax.lax.stop_gradient(lp_student) - lp_old), cfg.is_clip)
    weight = jax.lax.stop_gradient(weight)
    return loss * weight, weight


def sdpo_per_token_loss(
    student_logits: Array,
    teacher_logits: Array,
    response_ids: Array,
    lp_old: Array,
    mask: Array,
    teacher_mask: Array,
    cfg: SDPOConfig,
    chunk_size: int | None = None,
    lp_sampler: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Importance-weighted, masked per-token SDPO distillation loss.

    Args:
      student_logits: ``[B, T, V]`` student logits (or log-probs) at the response
        positions (position t predicts ``response_ids[:, t]``).
      teacher_logits: ``[B, T, V]`` teacher logits at the same response tokens
        (stop-gradient).
      response_ids: ``[B, T]`` sampled token ids.
      lp_old: ``[B, T]`` sampling-policy log-probs of those tokens (for the
        importance weight).
      mask: ``[B, T]`` response mask.
      teacher_mask: ``[B]`` 1 for rollouts with a teacher context, 0 for rollouts with
        neither a successful peer nor feedback (their tokens get 0).
      cfg: :class:`SDPOConfig` (static).
      chunk_size: if given, tokens are flattened to ``[B*T, V]`` and processed
        ``chunk_size`` at a time (``jax.lax.map`` + ``jax.checkpoint``) to bound the
        vocabulary-sized temporaries; the result is the same.
      lp_sampler: ``[B, T]`` the sampler's own log-probs; with ``cfg.tis_cap`` each token
        is also weighted by ``min(exp(lp_old - lp_sampler), tis_cap)`` (detached).

    Returns:
      ``(loss [B, T], metrics)``: loss is 0 outside ``mask & teacher_mask``. Metrics
      (float32 scalars over those valid tokens): ``distill_token_mean`` (weighted
      loss), ``is_weight_mean``, ``is_clip_frac`` (weight at the cap), and
      ``teacher_row_frac`` (fraction of rows with tokens that have a teacher).
    """
    batch, time, vocab = student_logits.shape
    mask = as_bool_mask(mask)
    teacher_rows = as_bool_mask(teacher_mask)
    valid = mask & teacher_rows[:, None]
    flat_ids = jnp.asarray(response_ids).reshape(-1).astype(jnp.int32)
    flat_lp_old = jnp.where(valid, jax.lax.stop_gradient(as_float(lp_old)), 0.0).reshape(-1)
    flat_student = student_logits.reshape(batch * time, vocab)
    flat_teacher = teacher_logits.reshape(batch * time, vocab)
    if chunk_size is None:
        loss, weight = _flat_token_loss(flat_student, flat_teacher, flat_ids, flat_lp_old, cfg)
    else:

        @jax.checkpoint
        def one_token(args):
            return _flat_token_loss(*args, cfg)

        loss, weight = jax.lax.map(
            one_token,
            (flat_student, flat_teacher, flat_ids, flat_lp_old),
            batch_size=max(1, min(chunk_size, batch * time)),
        )
    loss = jnp.where(valid, loss.reshape(batch, time), 0.0)
    if cfg.tis_cap is not None and lp_sampler is not None:
        gap = jnp.where(valid, as_float(lp_old) - as_float(lp_sampler), 0.0)
        loss = loss * jax.lax.stop_gradient(jnp.minimum(jnp.exp(gap), cfg.tis_cap))
    weight = weight.reshape(batch, time)
    at_cap = jnp.zeros_like(valid) if cfg.is_clip is None else weight >= cfg.is_clip
    rows_with_tokens = jnp.any(mask, axis=-1)
    metrics = {
        "distill_token_mean": jax.lax.stop_gradient(masked_mean(loss, valid)),
        "is_weight_mean": masked_mean(weight, valid),
        "is_clip_frac": masked_mean(at_cap.astype(jnp.float32), valid),
        "teacher_row_frac": masked_mean(teacher_rows.astype(jnp.float32), rows_with_tokens),
    }
    return loss, metrics


def sdpo_distillation_loss(
    student_logits: Array,
    teacher_logits: Array,
    response_ids: Array,
    lp_old: Array,
    mask: Array,
    teacher_mask: Array,
    cfg: SDPOConfig,
    aggregation: Aggregation = "token-mean",
    normalizer: Array | float | None = None,
    chunk_size: int | None = None,
    lp_sampler: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Aggregated SDPO distillation loss (scalar) and metrics.

    Same arguments as :func:`sdpo_per_token_loss`, plus ``aggregation`` (a mode of
    :data:`amrsd_jax.losses.policy.AGGREGATION_MODES`) and ``normalizer``. The
    aggregation runs over the distillation-valid tokens ``mask & teacher_mask[:, None]``
    (rollouts without a teacher do not dilute the mean -- our choice); when
    ``normalizer`` is None it is computed from that mask of this batch, so for exact
    micro-batching pass ``loss_normalizer(global_valid_mask, aggregation)``.

    Returns:
      ``(loss, metrics)`` with a scalar loss.
    """
    valid = as_bool_mask(mask) & as_bool_mask(teacher_mask)[:, None]
    per_token, metrics = sdpo_per_token_loss(
        student_logits, teacher_logits, response_ids, lp_old, mask, teacher_mask, cfg, chunk_size,
        lp_sampler
    )
    if normalizer is None:
        normalizer = loss_normalizer(valid, aggregation)
    return aggregate_token_losses(per_token, valid, aggregation, normalizer), metrics


def sdpo_total_loss(policy_loss: Array, distill_loss: Array, cfg: SDPOConfig) -> Array:
    """``(1 - w_d) * policy_loss + w_d * distill_loss`` with ``w_d = cfg.distill_weight``.

    Shapes: scalars (or any matching shapes).
    """
    weight = cfg.distill_weight
    return (1.0 - weight) * policy_loss + weight * distill_loss

"""The one jitted, sharded update step, for every method.

``make_update_step`` returns a ``jax.jit`` function ``step(state, batch, teacher) ->
(state, teacher, metrics)`` with its shardings declared once: parameters and optimizer state
follow the logical-axis rule table, the :class:`~amrsd_jax.batch.UpdateBatch` is split over
``data`` x ``fsdp``, the state and teacher weights are donated. Inside:

1. GRPO advantages ``A [B]`` from ``rewards`` (groups are contiguous rows of ``G``);
2. per-token advantages ``Ahat [B, N]`` from the method (``method.token_advantages``);
3. the loss over ``micro_batches`` strided slices with the global normaliser: the clipped
   policy gradient (:func:`amrsd_jax.losses.policy.policy_gradient_loss`) plus the method's
   ``extra_loss``, gradients summed in a ``lax.scan`` (exactly the big-batch gradient);
   micro-batch ``j`` is rows ``j, j+k, j+2k, ...``, so it stays spread over every
   ``data`` x ``fsdp`` device (a contiguous slice would live on 1/k of them, and XLA would
   move it around or compute it redundantly: ``run.py bench scale``);
4. the optax update, skipped when the gradients are not finite (``optax.apply_if_finite``),
   and the method's teacher refresh (``method.refresh_teacher``, e.g. SDPO's EMA).

The step calls the hooks of the method object in its :class:`StepConfig`; it imports no
method.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .batch import UpdateBatch
from .credit.grpo import grpo_advantages
from .distributed import global_arrays
from .losses.policy import PolicyLossConfig, loss_normalizer, policy_gradient_loss
from .methods.base import Method
from .models.decoder import Decoder
from .scoring import response_logprobs
from .sharding import DEFAULT_RULES, activation_layout, constrain, state_shardings


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warm-up then constant or cosine decay, and grad-norm clipping."""

    learning_rate: float = 1e-6
    schedule: str = "constant"  # "constant" | "cosine"
    warmup_steps: int = 0
    total_steps: int = 1000  # cosine horizon
    min_learning_rate_ratio: float = 0.1
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0

    def __post_init__(self):
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """optax chain; non-finite updates are skipped and counted by ``apply_if_finite``."""
    if cfg.schedule == "cosine":
        schedule = optax.warmup_cosine_decay_schedule(
            0.0, cfg.learning_rate, max(cfg.warmup_steps, 0), max(cfg.total_steps, 1),
            end_value=cfg.learning_rate * cfg.min_learning_rate_ratio)
    elif cfg.warmup_steps > 0:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, cfg.learning_rate, cfg.warmup_steps),
             optax.constant_schedule(cfg.learning_rate)], [cfg.warmup_steps])
    else:
        schedule = optax.constant_schedule(cfg.learning_rate)
    parts = [optax.clip_by_global_norm(cfg.max_grad_norm)] if cfg.max_grad_norm else []
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay))
    # the trainer, not optax, decides when too many consecutive skips end a run
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**30)


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the update step computes (static: part of the compiled program)."""

    method: Method = Method()  # the base Method is plain GRPO
    group_size: int = 8
    advantage_scale: str = "group"
    # group std as TRL / verl compute it (torch.std: unbiased) plus TRL's epsilon
    advantage_std_ddof: int = 1
    advantage_eps: float = 1e-4
    micro_batches: int = 1
    policy: PolicyLossConfig = PolicyLossConfig()
    vocab_chunk: int | None = None
    # the rollout sampling temperature: every log-prob is of softmax(logits / temperature)
    temperature: float = 1.0

    def __post_init__(self):
        if not isinstance(self.method, Method):
            raise TypeError(f"StepConfig.method must be a Method object (e.g. "
                            f"amrsd_jax.methods.make_method(name)), got {self.method!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: group-relative advantages need at "
                             "least 2 rollouts per prompt")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")


class TrainState(NamedTuple):
    """Everything the update step changes. ``params`` holds the model's ``nnx.Param``s."""

    params: nnx.State
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped steps included)


def init_train_state(model: Decoder, optimizer: optax.GradientTransformation) -> TrainState:
    params = nnx.state(model, nnx.Param)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def split_micro_batches(x: jax.Array, k: int) -> jax.Array:
    """``[k * m, ...] -> [k, m, ...]``, micro-batch ``j`` = rows ``j, j + k, j + 2k, ...``.

    Strided, not contiguous: the batch axis is split over the data devices in contiguous
    blocks, so a strided micro-batch has ``m / devices`` rows on every device (reshape to
    ``[m, k]`` and swap: a local transpose, no communication), while a contiguous one would
    sit on ``1 / k`` of them. Any row order gives the same summed gradient.
    """
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    strided = x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1)
    return constrain(strided, (None, "batch") + (None,) * (x.ndim - 1))


def _loss_fn(params, other, graphdef, micro: UpdateBatch, token_adv, normalizers,
             cfg: StepConfig, teacher_params):
    """Loss of one micro-batch (normalised by the GLOBAL normalisers) and summed statistics."""
    model = nnx.merge(graphdef, params, other)
    mask = micro.response_mask
    lp_new, _ = response_logprobs(model, micro.prompt_ids, micro.prompt_mask,
                                  micro.response_ids, mask, vocab_chunk=cfg.vocab_chunk,
                                  temperature=cfg.temperature)
    loss, sums = policy_gradient_loss(lp_new, micro.old_logprobs, token_adv, mask, cfg.policy,
                                      lp_ref=micro.ref_logprobs,
                                      lp_sampler=micro.sampler_logprobs,
                                      normalizer=normalizers[0])
    sums["entropy_proxy_sum"] = jnp.sum(-lp_new * mask.astype(jnp.float32))
    teacher = None if teacher_params is None else nnx.merge(
        graphdef, jax.lax.stop_gradient(teacher_params), other)
    loss, extra = cfg.method.extra_loss(model, teacher, micro, loss, cfg.policy.aggregation,
                                        normalizers[1], temperature=cfg.temperature)
    return loss, {**sums, **extra}


def _accumulate_gradients(state: TrainState, other, graphdef, batch: UpdateBatch, token_adv,
                          cfg: StepConfig, teacher_params):
    """``(grads, loss, sums)`` over ``cfg.micro_batches`` strided slices of the batch (a
    scan; see :func:`split_micro_batches`)."""
    mask = batch.response_mask
    normalizers = (loss_normalizer(mask, cfg.policy.aggregation),
                   cfg.method.extra_loss_normalizer(batch, cfg.policy.aggregation))
    micro = jax.tree.map(lambda x: split_micro_batches(x, cfg.micro_batches),
                         (batch, token_adv))

    def loss_of(params, mb):
        return _loss_fn(params, other, graphdef, mb[0], mb[1], normalizers, cfg, teacher_params)

    def accumulate(carry, mb):
        grads, loss, sums = carry
        (l, s), g = jax.value_and_grad(loss_of, has_aux=True)(state.params, mb)
        return (jax.tree.map(jnp.add, grads, g), loss + l, jax.tree.map(jnp.add, sums, s)), None

    first = jax.tree.map(lambda x: x[0], micro)
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                             jax.eval_shape(lambda: loss_of(state.params, first)[1]))
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.float32(0), zero_sums)
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro)
    return grads, loss, sums


def update_step(graphdef, other, optimizer, cfg: StepConfig, state: TrainState,
                batch: UpdateBatch, teacher_params=None):
    """One optimizer step (pure; see :func:`make_update_step` for the jitted version).

    Returns ``(state, teacher_params, metrics)``.
    """
    method = cfg.method
    rewards = batch.rewards.astype(jnp.float32)
    groups = rewards.reshape(-1, cfg.group_size)
    advantages = grpo_advantages(groups, scale=cfg.advantage_scale, eps=cfg.advantage_eps,
                                 std_ddof=cfg.advantage_std_ddof).reshape(-1)
    mask = batch.response_mask
    token_adv, diagnostics = method.token_advantages(advantages, batch, mask, state.step)
    grads, loss, sums = _accumulate_gradients(state, other, graphdef, batch, token_adv, cfg,
                                              teacher_params)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    teacher_params = method.refresh_teacher(teacher_params, params, finite, state.step)

    tokens = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    metrics = {
        "loss": loss,
        "grad_norm": grad_norm,
        "update_skipped": (~finite).astype(jnp.int32),
        "skipped_total": opt_state.total_notfinite.astype(jnp.int32),
        "reward_mean": jnp.mean(rewards),
        "reward_std": jnp.std(rewards),
        "zero_variance_group_frac": jnp.mean((jnp.max(groups, 1) == jnp.min(groups, 1))
                                             .astype(jnp.float32)),
        "response_length_mean": jnp.mean(jnp.sum(mask, axis=1).astype(jnp.float32)),
        "advantage_abs_mean": jnp.mean(jnp.abs(advantages)),
        "token_advantage_abs_mean": jnp.sum(jnp.abs(token_adv)) / tokens,
        "neg_logprob_mean": sums.pop("entropy_proxy_sum") / tokens,
    }
    # token sums become means over the whole batch; other statistics are already global
    for key, value in sums.items():
        metrics[key[:-4] + "_mean" if key.endswith("_sum") else key] = \
            value / tokens if key.endswith("_sum") else value
    metrics.update({f"{method.name}/{k}": v for k, v in diagnostics.items()})
    return TrainState(params, opt_state, state.step + 1), teacher_params, metrics


def make_update_step(model: Decoder, optimizer: optax.GradientTransformation, cfg: StepConfig,
                     mesh: Mesh, batch: UpdateBatch, rules=DEFAULT_RULES):
    """The jitted update step with shardings declared once.

    ``batch`` fixes which optional fields the step takes (host, device or abstract arrays);
    the method's ``init_teacher`` says whether it takes teacher weights. Returns
    ``(step_fn, state_sharding)`` with ``step_fn(state, batch, teacher=None) -> (state,
    teacher, metrics)``; the state and teacher arguments are donated (their buffers are
    reused for the outputs). ``step_fn.jitted`` is the ``jax.jit`` object (for ``.lower``).
    """
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    param_sh = state_shardings(params, mesh, rules)
    abstract_state = jax.eval_shape(lambda: TrainState(params, optimizer.init(params),
                                                       jnp.zeros((), jnp.int32)))
    replicated = NamedSharding(mesh, P())
    opt_sh = _opt_state_shardings(abstract_state.opt_state, params, param_sh, replicated)
    state_sh = TrainState(param_sh, opt_sh, replicated)
    has_teacher = jax.eval_shape(cfg.method.init_teacher, params) is not None
    teacher_sh = param_sh if has_teacher else None
    other_sh = jax.tree.map(lambda _: replicated, other)

    def fn(state, batch, teacher, other):
        # activations are pinned to the mesh while this program is traced
        with activation_layout(mesh, rules):
            return update_step(graphdef, other, optimizer, cfg, state, batch, teacher)

    jitted = jax.jit(fn, in_shardings=(state_sh, batch.shardings(mesh, rules), teacher_sh,
                                       other_sh),
                     out_shardings=(state_sh, teacher_sh, replicated), donate_argnums=(0, 2))

    def step_fn(state, batch, teacher=None):
        return jitted(state, batch, teacher, other)

    step_fn.jitted = jitted
    step_fn.other = other
    return step_fn, state_sh


def _opt_state_shardings(opt_state, params, param_sh, replicated):
    """Optimizer moments (subtrees shaped like the params) follow the parameter shardings;
    counters and other scalars are replicated."""
    param_def = jax.tree.structure(params)

    def like_params(x):
        try:
            return jax.tree.structure(x) == param_def
        except Exception:  # noqa: BLE001 - not a pytree node we can compare
            return False

    return jax.tree.map(lambda x: param_sh if like_params(x) else replicated, opt_state,
                        is_leaf=like_params)


def place_state(state: TrainState, state_sharding) -> TrainState:
    """Put a (host or single-device) train state onto the mesh (on a pod each process
    transfers only its own devices' slices)."""
    return global_arrays(state, state_sharding)

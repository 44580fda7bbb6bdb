"""The one jitted, sharded update step, for every method of the registry.

``make_update_step`` returns a ``jax.jit`` function ``step(state, batch[, teacher_params])
-> (state, metrics)`` with its shardings declared once: parameters and optimizer state
follow the logical-axis rule table, the batch is split over ``data`` x ``fsdp``, the state is
donated. Inside:

1. GRPO advantages ``A [B]`` from ``rewards`` (groups are contiguous rows of ``G``);
2. per-token advantages ``Ahat [B, N]`` from the method (registry);
3. the loss over ``micro_batches`` slices with the global normaliser, gradients summed in a
   ``lax.scan`` (exactly the big-batch gradient);
4. the optax update, skipped when the gradients are not finite (``optax.apply_if_finite``).

Batch keys (``B = num_prompts * G``, ``P`` prompt and ``N`` response length):
``prompt_ids, prompt_mask [B, P]``, ``response_ids, response_mask [B, N]``,
``rewards [B]``, ``old_logprobs [B, N]`` and, as the method needs, ``teacher_logprobs``,
``ref_logprobs``, ``sampler_logprobs``, ``entropy``, ``importance`` ``[B, N]``; SDPO also
takes ``teacher_prompt_ids, teacher_prompt_mask [B, Pt]`` and ``teacher_valid [B]``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .credit.grpo import grpo_advantages
from .credit.registry import Method, get_method
from .losses.policy import (PolicyLossConfig, aggregate_token_losses, loss_normalizer,
                            per_token_policy_loss)
from .models.decoder import Decoder
from .scoring import response_logprobs
from .sharding import DEFAULT_RULES, state_shardings

OPTIONAL_KEYS = ("teacher_logprobs", "ref_logprobs", "sampler_logprobs", "entropy", "importance",
                 "teacher_prompt_ids", "teacher_prompt_mask", "teacher_valid")


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

    method: str = "grpo"
    group_size: int = 8
    advantage_scale: str = "group"
    micro_batches: int = 1
    policy: PolicyLossConfig = PolicyLossConfig()
    method_config: Any = None  # the method's own dataclass; None = its defaults
    vocab_chunk: int | None = None

    def __post_init__(self):
        method = get_method(self.method)
        if self.method_config is None:
            object.__setattr__(self, "method_config", method.default_config())
        elif method.config_type is not None and not isinstance(self.method_config,
                                                               method.config_type):
            raise TypeError(f"method {self.method!r} takes a {method.config_type.__name__}, "
                            f"got {type(self.method_config).__name__}")
        if self.group_size < 2:
            raise ValueError(f"group_size={self.group_size}: group-relative advantages need at "
                             "least 2 rollouts per prompt")
        if self.micro_batches < 1:
            raise ValueError(f"micro_batches must be >= 1, got {self.micro_batches}")

    @property
    def method_entry(self) -> Method:
        return get_method(self.method)


class TrainState(NamedTuple):
    """Everything the update step changes. ``params`` holds the model's ``nnx.Param``s."""

    params: nnx.State
    opt_state: Any
    step: jax.Array  # int32 scalar: optimizer steps taken (skipped steps included)


def init_train_state(model: Decoder, optimizer: optax.GradientTransformation) -> TrainState:
    params = nnx.state(model, nnx.Param)
    return TrainState(params, optimizer.init(params), jnp.zeros((), jnp.int32))


def ema_update(teacher_params, params, rate: float):
    """``teacher <- (1 - rate) * teacher + rate * params`` (pure)."""
    return optax.incremental_update(params, teacher_params, rate)


def _split_micro(x: jax.Array, k: int) -> jax.Array:
    if x.shape[0] % k:
        raise ValueError(f"batch of {x.shape[0]} rows does not split into {k} micro-batches")
    return x.reshape(k, x.shape[0] // k, *x.shape[1:])


def _loss_fn(params, other, graphdef, micro, normalizer, cfg: StepConfig, teacher_params):
    """Loss of one micro-batch (normalised by the GLOBAL normaliser) and summed statistics."""
    model = nnx.merge(graphdef, params, other)
    mask = micro["response_mask"]
    lp_new, _ = response_logprobs(model, micro["prompt_ids"], micro["prompt_mask"],
                                  micro["response_ids"], mask, vocab_chunk=cfg.vocab_chunk)
    per_token, stats = per_token_policy_loss(
        lp_new, micro["old_logprobs"], micro["token_advantages"], mask, cfg.policy,
        lp_ref=micro.get("ref_logprobs"), lp_sampler=micro.get("sampler_logprobs"))
    loss = aggregate_token_losses(per_token, mask, cfg.policy.aggregation, normalizer)
    m = mask.astype(jnp.float32)
    sums = {f"{k}_sum": jnp.sum(v * m) for k, v in stats.items() if k != "pg"}
    sums["entropy_proxy_sum"] = jnp.sum(-lp_new * m)
    method = cfg.method_entry
    if method.distillation:
        loss, dist = _add_distillation(model, graphdef, teacher_params, other, micro, lp_new,
                                       loss, cfg)
        sums.update(dist)
    return loss, sums


def _add_distillation(model, graphdef, teacher_params, other, micro, lp_new, policy_loss,
                      cfg: StepConfig):
    """SDPO: mix the policy loss with distillation toward the (stop-gradient) teacher."""
    from .losses.sdpo import sdpo_per_token_loss

    sdpo = cfg.method_config
    teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params), other)

    def response_logits(m, prompt_ids, prompt_mask):
        p = prompt_ids.shape[1]
        ids = jnp.concatenate([prompt_ids, micro["response_ids"]], axis=1)
        mask = jnp.concatenate([prompt_mask, micro["response_mask"]], axis=1)
        hidden, _ = m.hidden_states(m.embed(ids), mask)
        return m.logits(hidden[:, p - 1:-1])

    student_logits = response_logits(model, micro["prompt_ids"], micro["prompt_mask"])
    teacher_logits = jax.lax.stop_gradient(
        response_logits(teacher, micro["teacher_prompt_ids"], micro["teacher_prompt_mask"]))
    per_token, metrics = sdpo_per_token_loss(
        student_logits, teacher_logits, micro["response_ids"], micro["old_logprobs"],
        micro["response_mask"], micro["teacher_valid"], sdpo)
    distill = aggregate_token_losses(per_token, micro["distill_valid"], cfg.policy.aggregation,
                                     micro["distill_normalizer"])
    total = (1.0 - sdpo.distill_weight) * policy_loss + sdpo.distill_weight * distill
    return total, {"distill_loss_sum": distill}


def update_step(graphdef, other, optimizer, cfg: StepConfig, state: TrainState,
                batch: Mapping[str, jax.Array], teacher_params=None):
    """One optimizer step (pure; see :func:`make_update_step` for the jitted version)."""
    method = cfg.method_entry
    rewards = batch["rewards"].astype(jnp.float32)
    advantages = grpo_advantages(rewards.reshape(-1, cfg.group_size),
                                 scale=cfg.advantage_scale).reshape(-1)
    mask = batch["response_mask"]
    token_adv, diagnostics = method.token_advantages(advantages, batch, mask, cfg.method_config,
                                                     state.step)
    normalizer = loss_normalizer(mask, cfg.policy.aggregation)
    data = dict(batch, token_advantages=token_adv)
    if method.distillation:
        valid = mask.astype(bool) & batch["teacher_valid"].astype(bool)[:, None]
        data["distill_valid"] = valid
        data["distill_normalizer"] = jnp.broadcast_to(
            loss_normalizer(valid, cfg.policy.aggregation), (mask.shape[0],))
    data.pop("rewards")
    k = cfg.micro_batches
    micro = {key: _split_micro(v, k) for key, v in data.items()}
    if method.distillation:
        micro["distill_normalizer"] = micro["distill_normalizer"][:, 0]

    def accumulate(carry, mb):
        grads, loss, sums = carry
        (l, s), g = jax.value_and_grad(_loss_fn, has_aux=True)(
            state.params, other, graphdef, mb, normalizer, cfg, teacher_params)
        grads = jax.tree.map(jnp.add, grads, g)
        sums = jax.tree.map(jnp.add, sums, s)
        return (grads, loss + l, sums), None

    zero_grads = jax.tree.map(jnp.zeros_like, state.params)
    first_mb = jax.tree.map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: _loss_fn(state.params, other, graphdef, first_mb,
                                                 normalizer, cfg, teacher_params)[1])
    zero_sums = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape)
    (grads, loss, sums), _ = jax.lax.scan(accumulate, (zero_grads, jnp.float32(0), zero_sums),
                                          micro)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(loss)

    tokens = jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)
    groups = rewards.reshape(-1, cfg.group_size)
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
    for key, value in sums.items():
        name = key[:-4] + "_mean" if key.endswith("_sum") else key
        metrics[name] = value / (1.0 if key == "distill_loss_sum" else tokens)
    metrics.update({f"{method.name}/{k}": v for k, v in diagnostics.items()})
    return TrainState(params, opt_state, state.step + 1), metrics


def batch_spec(batch: Mapping[str, Any], mesh: Mesh, rules=DEFAULT_RULES):
    """Shardings of a batch dict: leading (batch) axis over ``data`` x ``fsdp``."""
    axes = dict(rules)["batch"]
    return {k: NamedSharding(mesh, P(axes, *([None] * (jnp.ndim(v) - 1)))) for k, v in
            batch.items()}


def make_update_step(model: Decoder, optimizer: optax.GradientTransformation, cfg: StepConfig,
                     mesh: Mesh, example_batch: Mapping[str, Any], rules=DEFAULT_RULES,
                     with_teacher: bool | None = None):
    """The jitted update step with shardings declared once.

    Returns ``(step_fn, state_sharding)``; ``step_fn(state, batch[, teacher_params])``.
    The state argument is donated: its buffers are reused for the new state.
    """
    graphdef, params, other = nnx.split(model, nnx.Param, ...)
    param_sh = state_shardings(params, mesh, rules)
    abstract_state = jax.eval_shape(lambda: TrainState(params, optimizer.init(params),
                                                       jnp.zeros((), jnp.int32)))
    replicated = NamedSharding(mesh, P())
    opt_sh = _opt_state_shardings(abstract_state.opt_state, params, param_sh, replicated)
    state_sh = TrainState(param_sh, opt_sh, replicated)
    b_sh = batch_spec(example_batch, mesh, rules)
    other_sh = jax.tree.map(lambda _: replicated, other)
    teacher = cfg.method_entry.distillation if with_teacher is None else with_teacher

    def fn(state, batch, other, teacher_params=None):
        return update_step(graphdef, other, optimizer, cfg, state, batch, teacher_params)

    in_sh = (state_sh, b_sh, other_sh) + ((param_sh,) if teacher else ())
    jitted = jax.jit(fn, in_shardings=in_sh, out_shardings=(state_sh, replicated),
                     donate_argnums=(0,))

    def step_fn(state, batch, teacher_params=None):
        args = (state, dict(batch), other) + ((teacher_params,) if teacher else ())
        return jitted(*args)

    step_fn.jitted = jitted
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
    """Put a (host or single-device) train state onto the mesh."""
    return jax.device_put(state, state_sharding)

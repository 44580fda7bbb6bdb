"""The jitted update step: micro-batching, sharding, skipping, compile-once, every method."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

from amrsd_jax.batch import make_batch as typed_batch
from amrsd_jax.credit import AMRSDConfig
from amrsd_jax.losses import PolicyLossConfig
from amrsd_jax.methods import make_method
from amrsd_jax.scoring import check_aligned_responses, response_logprobs
from amrsd_jax.sharding import make_mesh, shard_batch
from amrsd_jax.update import (OptimizerConfig, StepConfig, init_train_state, make_optimizer,
                              make_update_step, place_state)

from conftest import library_methods, tiny_model

G, PROMPTS, P, N = 4, 2, 6, 5
B = G * PROMPTS


def make_batch(model, seed=0, rewards=None, method=None):
    """An update batch with every field ``method`` (a Method object) reads."""
    method = method or make_method("grpo")
    rng = np.random.default_rng(seed)
    prompt_ids = rng.integers(4, 96, (B, P)).astype(np.int32)
    prompt_mask = np.ones((B, P), np.int32)
    prompt_mask[::3, :2] = 0
    response_ids = rng.integers(4, 96, (B, N)).astype(np.int32)
    response_mask = (np.arange(N)[None] < rng.integers(2, N + 1, (B, 1))).astype(np.int32)
    if rewards is None:
        rewards = rng.integers(0, 2, B).astype(np.float32)
        rewards[0], rewards[1] = 1.0, 0.0  # at least one mixed group
    old, ent = response_logprobs(model, jnp.asarray(prompt_ids), jnp.asarray(prompt_mask),
                                 jnp.asarray(response_ids), jnp.asarray(response_mask),
                                 with_entropy=True)
    old = np.asarray(old)
    optional = {
        "teacher_logprobs": old + rng.normal(0, 1.0, (B, N)).astype(np.float32) * response_mask,
        "entropy": np.asarray(ent),
        "importance": rng.random((B, N)).astype(np.float32),
        "answer_mask": (np.arange(N)[None] == response_mask.sum(1, keepdims=True) - 1
                        ).astype(np.int32),
        "teacher_prompt_ids": np.concatenate([rng.integers(4, 96, (B, 3)).astype(np.int32),
                                              prompt_ids], axis=1),
        "teacher_prompt_mask": np.concatenate([np.ones((B, 3), np.int32), prompt_mask], axis=1),
        "teacher_valid": (np.arange(B) % 2).astype(np.int32)}
    return typed_batch(prompt_ids=prompt_ids, prompt_mask=prompt_mask,
                       response_ids=response_ids, response_mask=response_mask,
                       rewards=np.asarray(rewards, np.float32), sampler_logprobs=old,
                       old_logprobs=old, **{k: optional[k] for k in method.fields})


def sgd(lr=0.1):
    """Plain SGD (wrapped like make_optimizer's chain): parameter changes are the gradients,
    so comparing parameters compares gradients without Adam's normalisation amplifying
    float rounding in near-zero components."""
    import optax

    return optax.apply_if_finite(optax.sgd(lr), 2**30)


def run_steps(cfg, mesh_shape=(1, 1, 1), steps=2, seed=0, batch_fn=make_batch, lr=1e-2,
              optimizer=None, start_step=0):
    model = tiny_model(seed=seed)
    devices = jax.devices()[:int(np.prod(mesh_shape))]
    mesh = make_mesh(*mesh_shape, devices=devices)
    optimizer = optimizer or make_optimizer(OptimizerConfig(learning_rate=lr, max_grad_norm=1.0))
    batch = batch_fn(model, method=cfg.method)
    step_fn, state_sh = make_update_step(model, optimizer, cfg, mesh, batch)
    state = init_train_state(model, optimizer)
    state = place_state(state._replace(step=jnp.int32(start_step)), state_sh)
    # a teacher different from the policy (SDPO's distillation then has a gradient)
    teacher = cfg.method.init_teacher(nnx.state(tiny_model(seed=seed + 1), nnx.Param))
    if teacher is not None:
        teacher = jax.device_put(teacher, state_sh.params)
    metrics = []
    for _ in range(steps):
        state, teacher, m = step_fn(state, shard_batch(batch, mesh), teacher)
        metrics.append(jax.device_get(m))
    return state, metrics, step_fn


def flat_params(state):
    return [np.asarray(v[...]) for _, v in nnx.to_flat_state(state.params)]


@pytest.mark.parametrize("method", library_methods())
def test_every_method_takes_steps_and_changes_params(method):
    cfg = StepConfig(method=make_method(method), group_size=G)
    state0 = init_train_state(tiny_model(), make_optimizer(OptimizerConfig()))
    before = flat_params(state0)
    state, metrics, _ = run_steps(cfg)
    assert all(np.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["update_skipped"] == 0
    assert int(state.step) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(before, flat_params(state)))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean",
                                         "seq-mean-token-sum-norm"])
def test_micro_batches_equal_one_big_batch(aggregation):
    policy = PolicyLossConfig(aggregation=aggregation)
    big_state, big, _ = run_steps(StepConfig(group_size=G, policy=policy, micro_batches=1),
                                  optimizer=sgd())
    for k in (2, 4):
        state, small, _ = run_steps(StepConfig(group_size=G, policy=policy, micro_batches=k),
                                    optimizer=sgd())
        np.testing.assert_allclose([m["loss"] for m in small], [m["loss"] for m in big],
                                   rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose([m["grad_norm"] for m in small],
                                   [m["grad_norm"] for m in big], rtol=1e-4)
        for a, b in zip(flat_params(state), flat_params(big_state)):
            np.testing.assert_allclose(a, b, atol=2e-6)


def test_all_equal_groups_give_zero_gradient():
    def equal_rewards(model, method=None):
        return make_batch(model, rewards=np.repeat([1.0, 0.0], G), method=method)

    state0 = init_train_state(tiny_model(), make_optimizer(OptimizerConfig()))
    state, metrics, _ = run_steps(StepConfig(group_size=G), batch_fn=equal_rewards)
    assert metrics[0]["grad_norm"] == 0.0
    assert metrics[0]["zero_variance_group_frac"] == 1.0
    for a, b in zip(flat_params(state0), flat_params(state)):
        np.testing.assert_array_equal(a, b)


def test_non_finite_gradients_skip_the_update_and_are_counted():
    def nan_rewards(model, method=None):
        batch = make_batch(model, method=method)
        rewards = batch.rewards.copy()
        rewards[2] = np.nan
        return batch.replace(rewards=rewards)

    state0 = init_train_state(tiny_model(), make_optimizer(OptimizerConfig()))
    state, metrics, _ = run_steps(StepConfig(group_size=G), batch_fn=nan_rewards, steps=3)
    assert [int(m["update_skipped"]) for m in metrics] == [1, 1, 1]
    assert int(metrics[-1]["skipped_total"]) == 3
    for a, b in zip(flat_params(state0), flat_params(state)):
        np.testing.assert_array_equal(a, b)


def test_repeated_steps_compile_once():
    _, _, step_fn = run_steps(StepConfig(group_size=G), steps=4)
    assert step_fn.jitted._cache_size() == 1


def test_amr_sd_is_grpo_bit_for_bit_once_step_reaches_decay():
    amr = StepConfig(method=make_method("amr_sd", AMRSDConfig(decay_steps=3)), group_size=G)
    grpo = StepConfig(method=make_method("grpo"), group_size=G)
    # before T_decay the gate is active and the runs differ
    _, m_a, _ = run_steps(amr, steps=1)
    _, m_g, _ = run_steps(grpo, steps=1)
    assert float(m_a[0]["amr_sd/gated_frac"]) > 0 and m_a[0]["loss"] != m_g[0]["loss"]
    # from step >= T_decay on, the loss is identical bit for bit
    s_a, m_a, _ = run_steps(amr, steps=2, start_step=3)
    s_g, m_g, _ = run_steps(grpo, steps=2, start_step=3)
    assert float(m_a[0]["amr_sd/lam_eff"]) == 0.0 and float(m_a[0]["amr_sd/gated_frac"]) == 0.0
    assert [m["loss"] for m in m_a] == [m["loss"] for m in m_g]
    # ... and the parameters to float32 rounding: the two steps are different XLA programs,
    # and XLA:CPU may fuse (so order) the backward pass's reductions differently in each.
    # Under the tests' fast-compile flags it does: gradients ~1e-7 apart, which Adam turns
    # into up to 6e-6 where a gradient is near 0 (0.03% of the two steps' largest change).
    # With the gate on (decay_steps=30, checked by hand) they are 0.033 apart.
    before = flat_params(init_train_state(tiny_model(), make_optimizer(OptimizerConfig())))
    for a, g, b in zip(flat_params(s_a), flat_params(s_g), before):
        np.testing.assert_allclose(a, g, rtol=0, atol=1e-2 * np.abs(g - b).max())


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
@pytest.mark.parametrize("shape", [(2, 2, 2), (8, 1, 1)], ids=["data2-fsdp2-tensor2", "data8"])
@pytest.mark.parametrize("method", ["grpo", "amr_sd"])
def test_sharded_step_equals_single_device(shape, method):
    cfg = StepConfig(method=make_method(method), group_size=G, micro_batches=1)
    ref_state, ref, _ = run_steps(cfg, optimizer=sgd())
    state, out, _ = run_steps(cfg, mesh_shape=shape, optimizer=sgd())
    np.testing.assert_allclose([m["loss"] for m in out], [m["loss"] for m in ref], rtol=1e-5,
                               atol=1e-7)
    for a, b in zip(flat_params(state), flat_params(ref_state)):
        np.testing.assert_allclose(a, b, atol=5e-6)
    if shape == (2, 2, 2):
        # stacked layers: a leading, unsplit layer axis
        q = state.params["layers"]["self_attn"]["q_proj"]["kernel"][...]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
        per_device = max(s.data.nbytes for s in q.addressable_shards)
        assert per_device == q.nbytes // 4


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_adam_moments_follow_parameter_sharding():
    state, _, _ = run_steps(StepConfig(group_size=G), mesh_shape=(2, 2, 2), steps=1)
    param_specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
    assert PartitionSpec(None, "fsdp", "tensor") in param_specs
    moments = [t for t in jax.tree.leaves(state.opt_state,
                                          is_leaf=lambda x: isinstance(x, nnx.State))
               if isinstance(t, nnx.State)]
    assert len(moments) == 2  # Adam's mu and nu
    for tree in moments:
        assert [x.sharding.spec for x in jax.tree.leaves(tree)] == param_specs


def test_teacher_equal_to_student_context_gives_no_modulation():
    model = tiny_model()
    batch = make_batch(model, method=make_method("amr_sd"))
    check_aligned_responses(batch.response_ids, batch.response_ids.copy())
    with pytest.raises(ValueError, match="differ in rows"):
        bad = batch.response_ids.copy()
        bad[3, 0] += 1
        check_aligned_responses(batch.response_ids, bad)
    # through the methods' own traced hooks, as the update step calls them
    batch = batch.replace(teacher_logprobs=batch.old_logprobs.copy())
    A = jnp.asarray(np.linspace(-1, 1, B), jnp.float32)
    expected = np.asarray(A)[:, None] * batch.response_mask
    ahat, _ = make_method("amr_sd").token_advantages(A, batch, batch.response_mask, 0)
    np.testing.assert_array_equal(np.asarray(ahat), expected)
    ahat_r, _ = make_method("rlsd").token_advantages(A, batch, batch.response_mask, 0)
    np.testing.assert_allclose(np.asarray(ahat_r), expected, rtol=1e-6)


def test_step_config_rejects_bad_values():
    with pytest.raises(ValueError, match="did you mean 'amr_sd'"):
        make_method("amrsd")
    with pytest.raises(TypeError, match="must be a Method object"):
        StepConfig(method="amr_sd")
    with pytest.raises(ValueError, match="at least 2"):
        StepConfig(group_size=1)
    with pytest.raises(TypeError, match="AMRSDConfig"):
        make_method("amr_sd", PolicyLossConfig())


def test_remat_inside_the_step_and_the_sampler():
    """Per-layer remat works where the model is merged inside an outer trace (the
    micro-batch scan, the decode loop) and changes nothing numerically."""
    from amrsd_jax.rollout import SamplingConfig, generate

    results = []
    for policy in ("none", "save_dots"):
        model = tiny_model(seed=0, remat_policy=policy)
        mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
        optimizer = sgd()
        cfg = StepConfig(method=make_method("grpo"), group_size=G, micro_batches=2)
        batch = make_batch(model)
        step_fn, state_sh = make_update_step(model, optimizer, cfg, mesh, batch)
        state = place_state(init_train_state(model, optimizer), state_sh)
        state, _, m = step_fn(state, batch)
        nnx.update(model, state.params)  # the step donated the arrays the model held
        out = generate(model, batch.prompt_ids, batch.prompt_mask, jax.random.key(0),
                       SamplingConfig(max_new_tokens=4, greedy=True))
        results.append((float(m["loss"]), flat_params(state), np.asarray(out.tokens)))
    (loss_a, params_a, tokens_a), (loss_b, params_b, tokens_b) = results
    assert loss_a == pytest.approx(loss_b, abs=1e-6)
    for a, b in zip(params_a, params_b):
        np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_array_equal(tokens_a, tokens_b)

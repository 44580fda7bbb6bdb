"""GRPO advantages: hand-computed cases against docs/methods.md and invariants."""

import functools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from amrsd_jax.credit import grpo_advantages, grpo_advantages_from_group_ids, grpo_token_advantages

EPS = 1e-6
dense_fn = jax.jit(grpo_advantages, static_argnames=("scale", "eps", "std_ddof"))
flat_fn = jax.jit(grpo_advantages_from_group_ids, static_argnames=("num_groups", "scale", "eps", "std_ddof"))


def test_group_scale_hand_computed():
    rewards = np.array([[0.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]], np.float32)
    got = np.asarray(dense_fn(rewards))
    # group 0: mean 0.5, population std 0.5
    a0 = 0.5 / (0.5 + EPS)
    # group 1: mean 0.25, var = (0.75^2 + 3 * 0.25^2) / 4 = 0.1875
    s1 = np.sqrt(0.1875) + EPS
    expected = np.array([[-a0, a0, a0, -a0], [0.75 / s1, -0.25 / s1, -0.25 / s1, -0.25 / s1]])
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_group_scale_unbiased_std_option():
    got = np.asarray(dense_fn(np.array([[0.0, 1.0]], np.float32), std_ddof=1))
    std = np.sqrt(0.5)  # sum of squares 0.5, / (2 - 1)
    np.testing.assert_allclose(got, [[-0.5 / (std + EPS), 0.5 / (std + EPS)]], rtol=1e-6)


def test_batch_scale_hand_computed():
    rewards = np.array([[0.0, 1.0], [1.0, 1.0]], np.float32)
    # batch mean 0.75, batch var (0.5625 + 3 * 0.0625) / 4 = 0.1875
    batch_std = np.sqrt(0.1875)
    got = np.asarray(dense_fn(rewards, scale="batch"))
    np.testing.assert_allclose(got, [[-0.5 / (batch_std + EPS), 0.5 / (batch_std + EPS)], [0.0, 0.0]], rtol=1e-6)


def test_none_scale_is_centering_only():
    got = np.asarray(dense_fn(np.array([[0.0, 0.5, 1.0]], np.float32), scale="none"))
    np.testing.assert_allclose(got, [[-0.5, 0.0, 0.5]], atol=1e-7)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError):
        grpo_advantages(np.zeros((2, 3)), scale="prompt")
    with pytest.raises(ValueError):
        grpo_advantages(np.zeros((2, 3)), std_ddof=2)
    with pytest.raises(ValueError):
        grpo_advantages(np.zeros(6))


@settings(max_examples=50, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 1.0, width=32, allow_subnormal=False), min_size=3, max_size=3),
    scale=st.sampled_from(["group", "batch", "none"]),
)
def test_all_equal_groups_give_exactly_zero(values, scale):
    # each row holds G copies of one value (e.g. 0.1, whose mean is not exact in fp32)
    rewards = np.repeat(np.asarray(values, np.float32)[:, None], 5, axis=1)
    rewards[0, 0] = 1.0 - rewards[0, 1] if rewards[0, 1] != 0.5 else 0.0  # one mixed group
    got = np.asarray(_jit_dense(scale)(rewards))
    assert np.all(got[1:] == 0.0)
    ids = np.repeat(np.arange(3), 5)
    got_flat = np.asarray(_jit_flat(scale)(rewards.reshape(-1), ids))
    assert np.all(got_flat[5:] == 0.0)


@functools.lru_cache(maxsize=None)
def _jit_dense(scale):
    return jax.jit(functools.partial(grpo_advantages, scale=scale))


@functools.lru_cache(maxsize=None)
def _jit_flat(scale):
    return jax.jit(functools.partial(grpo_advantages_from_group_ids, num_groups=3, scale=scale))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("std_ddof", [0, 1])
def test_group_ids_match_dense_under_permutation(scale, std_ddof):
    rng = np.random.default_rng(0)
    rewards = rng.integers(0, 3, size=(4, 5)).astype(np.float32) / 2.0
    dense = np.asarray(dense_fn(rewards, scale=scale, std_ddof=std_ddof))
    ids = np.repeat(np.arange(4), 5)
    perm = rng.permutation(20)
    flat = jax.jit(
        functools.partial(grpo_advantages_from_group_ids, num_groups=4, scale=scale, std_ddof=std_ddof)
    )(rewards.reshape(-1)[perm], ids[perm])
    np.testing.assert_allclose(np.asarray(flat), dense.reshape(-1)[perm], rtol=1e-5, atol=1e-6)


def test_group_ids_uneven_groups_hand_computed():
    rewards = np.array([1.0, 0.0, 0.0, 1.0, 0.7], np.float32)
    ids = np.array([0, 0, 1, 1, 2])  # group 2 has a single member -> 0
    got = np.asarray(flat_fn(rewards, ids, num_groups=3))
    a = 0.5 / (0.5 + EPS)  # groups 0 and 1: centred +-0.5, population std 0.5
    np.testing.assert_allclose(got, [a, -a, -a, a, 0.0], rtol=1e-6)
    assert got[4] == 0.0


def test_token_advantages_broadcast_and_mask():
    mask = np.array([[1, 1, 0], [0, 1, 1]])
    got = jax.jit(grpo_token_advantages)(np.array([2.0, -1.0], np.float32), mask)
    np.testing.assert_array_equal(np.asarray(got), [[2.0, 2.0, 0.0], [0.0, -1.0, -1.0]])


def test_dense_jit_matches_eager():
    rewards = np.array([[0.0, 1.0, 0.5], [0.2, 0.2, 0.2]], np.float32)
    for scale in ("group", "batch", "none"):
        np.testing.assert_array_equal(
            np.asarray(_jit_dense(scale)(rewards)), np.asarray(grpo_advantages(rewards, scale=scale))
        )

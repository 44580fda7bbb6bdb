"""RLSD token advantages: hand case against docs/methods.md and invariants."""


import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amrsd_jax.credit import RLSDConfig, grpo_token_advantages, rlsd_token_advantages, rlsd_token_weights

B, T = 4, 6
# Realistic advantages: 0 or 2^-10 <= |A| <= 3 (XLA CPU flushes subnormal results to 0).
ADVANTAGE_VALUES = st.one_of(
    st.just(0.0), st.floats(0.0009765625, 3.0, width=32), st.floats(-3.0, -0.0009765625, width=32)
)


def test_config_defaults_and_validation():
    cfg = RLSDConfig()
    assert (cfg.lam, cfg.eps_w) == (0.5, 0.2)
    hash(cfg)
    with pytest.raises(ValueError):
        RLSDConfig(lam=1.5)
    with pytest.raises(ValueError):
        RLSDConfig(eps_w=1.0)


def test_hand_computed():
    advantages = np.array([1.0, -1.0, 0.0], np.float32)
    gain = np.array([[0.1, -0.5, 0.0], [0.1, -0.5, 1.0], [2.0, 2.0, 2.0]], np.float32)
    lp_old = np.full_like(gain, -1.0)
    lp_teacher = lp_old + gain
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    fn = jax.jit(rlsd_token_advantages, static_argnums=4)
    token_adv, diag = fn(advantages, lp_teacher, lp_old, mask, RLSDConfig())
    # row 0 (A=+1): w = exp(d) = [1.105171, 0.606531, 1] -> clip [1.105171, 0.8, 1]
    #   Ahat = 0.5 + 0.5 * w
    # row 1 (A=-1): w = exp(-d) = [0.904837, 1.648721, 0.367879] -> clip [0.904837, 1.2, 0.8]
    #   Ahat = -(0.5 + 0.5 * w)
    expected = np.array(
        [
            [0.5 + 0.5 * 1.1051709, 0.9, 1.0],
            [-(0.5 + 0.5 * 0.9048374), -1.1, -0.9],
            [0.0, 0.0, 0.0],
        ]
    )
    np.testing.assert_allclose(np.asarray(token_adv), expected, rtol=1e-6)
    # clipped weights over the 8 masked tokens (row 2 weights are 1: A = 0)
    weights = [1.1051709, 0.8, 1.0, 0.9048374, 1.2, 0.8, 1.0, 1.0]
    np.testing.assert_allclose(float(diag["weight_mean"]), np.mean(weights), rtol=1e-6)
    # at a bound among A != 0 tokens: 0.8, 1.2, 0.8 -> 3 of 6
    np.testing.assert_allclose(float(diag["weight_clip_frac"]), 0.5)


_jitted = jax.jit(rlsd_token_advantages, static_argnums=4)
lp_arrays = hnp.arrays(np.float32, (B, T), elements=st.floats(-30.0, 0.0, width=32, allow_subnormal=False))
advantage_arrays = hnp.arrays(
    np.float32, (B,), elements=ADVANTAGE_VALUES
)
mask_arrays = hnp.arrays(np.bool_, (B, T))


@settings(max_examples=50, deadline=None)
@given(advantages=advantage_arrays, lp_teacher=lp_arrays, lp_old=lp_arrays, mask=mask_arrays)
def test_lam_zero_is_exactly_grpo(advantages, lp_teacher, lp_old, mask):
    token_adv, _ = _jitted(advantages, lp_teacher, lp_old, mask, RLSDConfig(lam=0.0))
    np.testing.assert_array_equal(np.asarray(token_adv), np.asarray(grpo_token_advantages(advantages, mask)))


@settings(max_examples=50, deadline=None)
@given(
    advantages=advantage_arrays,
    lp_old=lp_arrays,
    mask=mask_arrays,
    lam=st.sampled_from([0.0, 0.3, 0.5, 1.0]),
)
def test_teacher_equal_to_old_policy_gives_unit_weight(advantages, lp_old, mask, lam):
    weights = jax.jit(rlsd_token_weights, static_argnums=4)(advantages, lp_old, lp_old, mask, 0.2)
    assert np.all(np.asarray(weights) == 1.0)
    token_adv, _ = _jitted(advantages, lp_old, lp_old, mask, RLSDConfig(lam=lam))
    np.testing.assert_array_equal(np.asarray(token_adv), np.asarray(grpo_token_advantages(advantages, mask)))


@settings(max_examples=50, deadline=None)
@given(advantages=advantage_arrays, lp_teacher=lp_arrays, lp_old=lp_arrays, mask=mask_arrays)
def test_weights_bounded_and_sign_preserved(advantages, lp_teacher, lp_old, mask):
    cfg = RLSDConfig()
    token_adv, _ = _jitted(advantages, lp_teacher, lp_old, mask, cfg)
    token_adv = np.asarray(token_adv)
    broadcast = np.where(mask, advantages[:, None], 0.0)
    np.testing.assert_array_equal(np.sign(token_adv), np.sign(broadcast))
    low = 1.0 - cfg.lam * cfg.eps_w - 1e-6
    high = 1.0 + cfg.lam * cfg.eps_w + 1e-6
    ratio = np.abs(token_adv[broadcast != 0]) / np.abs(broadcast[broadcast != 0])
    assert np.all((ratio >= low) & (ratio <= high))

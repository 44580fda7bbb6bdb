"""HAPO (the reallocation and the original specification's bonus form) and token entropy:
hand cases and
invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amrsd_jax.credit import HAPOConfig, hapo_token_advantages, token_entropy

B, T = 4, 6
# Realistic advantages: 0 or 2^-10 <= |A| <= 3 (XLA CPU flushes subnormal results to 0).
ADVANTAGE_VALUES = st.one_of(
    st.just(0.0), st.floats(0.0009765625, 3.0, width=32), st.floats(-3.0, -0.0009765625, width=32)
)
entropy_fn = jax.jit(token_entropy)


def test_config_defaults_and_validation():
    cfg = HAPOConfig()
    assert (cfg.alpha, cfg.phi, cfg.form) == (0.2, 2.0, "reallocate")
    with pytest.raises(ValueError, match="form"):
        HAPOConfig(form="add")
    hash(cfg)
    with pytest.raises(ValueError):
        HAPOConfig(phi=0.0)
    with pytest.raises(ValueError):
        HAPOConfig(alpha=-0.1)


def test_token_entropy_matches_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 7)).astype(np.float32) * 3
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = -(probs * np.log(probs)).sum(-1)
    got = entropy_fn(logits)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
    np.testing.assert_allclose(float(entropy_fn(np.zeros(4, np.float32))), np.log(4.0), rtol=1e-6)


def test_token_entropy_stable_for_extreme_and_masked_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, -np.inf, -np.inf], [0.0, 0.0, -np.inf]], np.float32)
    got = np.asarray(entropy_fn(logits))
    np.testing.assert_allclose(got, [0.0, 0.0, np.log(2.0)], atol=1e-6)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(token_entropy(x))))(logits)
    assert np.all(np.isfinite(np.asarray(grad)))


def test_hand_computed():
    advantages = np.array([1.0, -0.5, 0.0], np.float32)
    entropy = np.array([[0.0, 1.0, 5.0], [0.0, 1.0, 5.0], [3.0, 3.0, 3.0]], np.float32)
    mask = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    fn = jax.jit(hapo_token_advantages, static_argnums=3)
    token_adv, diag = fn(advantages, entropy, mask, HAPOConfig(form="bonus"))
    # bonus = min(0.2 * H, |A| / 2): row 0 cap 0.5 -> [0, 0.2, 0.5]; row 1 cap 0.25 -> [0, 0.2, 0.25]
    expected = np.array([[1.0, 1.2, 1.5], [-0.5, -0.7, -0.75], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(np.asarray(token_adv), expected, rtol=1e-6)
    np.testing.assert_allclose(float(diag["bonus_mean"]), (0.2 + 0.5 + 0.2 + 0.25) / 8, rtol=1e-6)
    np.testing.assert_allclose(float(diag["cap_frac"]), 2 / 6)


_jitted = jax.jit(hapo_token_advantages, static_argnums=3)


@settings(max_examples=50, deadline=None)
@given(
    advantages=hnp.arrays(
        np.float32, (B,), elements=ADVANTAGE_VALUES
    ),
    entropy=hnp.arrays(np.float32, (B, T), elements=st.floats(0.0, 12.0, width=32, allow_subnormal=False)),
    mask=hnp.arrays(np.bool_, (B, T)),
)
def test_sign_preserved_and_magnitude_bounded(advantages, entropy, mask):
    cfg = HAPOConfig(form="bonus")
    token_adv = np.asarray(_jitted(advantages, entropy, mask, cfg)[0])
    broadcast = np.where(mask, advantages[:, None], 0.0)
    np.testing.assert_array_equal(np.sign(token_adv), np.sign(broadcast))
    assert np.all(np.abs(token_adv) >= np.abs(broadcast))
    assert np.all(np.abs(token_adv) <= np.abs(broadcast) * (1.0 + 1.0 / cfg.phi) + 1e-6)


def test_entropy_is_detached():
    advantages = np.array([1.0, -1.0], np.float32)
    entropy = np.ones((2, 3), np.float32)
    grad = jax.jit(jax.grad(lambda h: jnp.sum(_jitted(advantages, h, np.ones((2, 3)), HAPOConfig())[0])))(entropy)
    assert np.all(np.asarray(grad) == 0.0)


@settings(max_examples=50, deadline=None)
@given(
    advantages=hnp.arrays(np.float32, (B,), elements=ADVANTAGE_VALUES),
    entropy=hnp.arrays(np.float32, (B, T), elements=st.floats(0.0, 12.0, width=32, allow_subnormal=False)),
    mask=hnp.arrays(np.bool_, (B, T)),
)
def test_reallocation_keeps_sign_and_credit_mass(advantages, entropy, mask):
    """The default form moves credit between a sequence's tokens: same sign on every
    token, the row's credit mass sum_t Ahat = A_i * L_i kept, more credit to the
    higher-entropy token of a row."""
    token_adv = np.asarray(_jitted(advantages, entropy, mask, HAPOConfig())[0])
    broadcast = np.where(mask, advantages[:, None], 0.0)
    np.testing.assert_array_equal(np.sign(token_adv), np.sign(broadcast))
    np.testing.assert_allclose(token_adv.sum(1), broadcast.sum(1), rtol=1e-5, atol=1e-6)
    for i in range(B):
        if advantages[i] == 0 or mask[i].sum() < 2:
            continue
        h, a = entropy[i][mask[i]], np.abs(token_adv[i][mask[i]])
        assert np.all(np.diff(a[np.argsort(h, kind="stable")]) >= -1e-6)


def test_four_quadrant_diagnostics():
    advantages = np.array([1.0, -1.0], np.float32)
    entropy = np.array([[0.1, 2.0, 3.0, 0.0], [0.2, 0.3, 4.0, 0.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]])
    ahat, diag = _jitted(advantages, entropy, mask, HAPOConfig())
    # median of the 6 tokens' entropies is 1.15: high = {2.0, 3.0, 4.0}
    shares = {k: float(v) for k, v in diag.items() if k.endswith("_share")}
    assert shares == pytest.approx({"q_pos_high_share": 2 / 6, "q_pos_low_share": 1 / 6,
                                    "q_neg_high_share": 1 / 6, "q_neg_low_share": 2 / 6})
    a = np.abs(np.asarray(ahat))
    assert float(diag["q_pos_high_update"]) == pytest.approx(a[0, 1:3].mean(), rel=1e-6)
    assert float(diag["q_neg_low_update"]) == pytest.approx(a[1, :2].mean(), rel=1e-6)
    assert float(diag["q_pos_high_update"]) > float(diag["q_pos_low_update"])

"""OAR: bi-level mass-preserving reshaping and the two importance estimators."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amrsd_jax.credit import (
    OARConfig,
    oar_gradient_importance,
    oar_perturbation_importance,
    oar_reshape_weights,
    oar_token_advantages,
)
from amrsd_jax.credit.oar import _bilevel_weights

B, T = 4, 6
CFG = OARConfig()
reshape = jax.jit(oar_reshape_weights, static_argnums=2)
token_advantages = jax.jit(oar_token_advantages, static_argnums=3)
raw_weights = jax.jit(_bilevel_weights, static_argnums=2)


def test_config_defaults_and_validation():
    assert (CFG.q, CFG.beta, CFG.min_weight, CFG.noise_sigma, CFG.gradient_noise) == (0.5, 1.0, 0.1, 1e-3, False)
    hash(CFG)
    for bad in (dict(q=1.5), dict(beta=-1.0), dict(min_weight=0.0), dict(noise_sigma=-1.0)):
        with pytest.raises(ValueError):
            OARConfig(**bad)


def _hand_rows():
    e = np.e
    importance = np.array(
        [
            [0.0, e - 1, e**2 - 1, e**3 - 1, np.nan],  # u = [0, 1, 2, 3], last token masked out
            [3.0, 3.0, 3.0, 3.0, 3.0],  # flat -> all ones
            [1.0, 2.0, 3.0, 4.0, 5.0],  # no masked tokens -> zeros, no NaN
            [-5.0, 0.0, e - 1, 7.0, 7.0],  # negative importance clamps to 0; mask [1,1,1,0,0]
        ],
        np.float32,
    )
    mask = np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], bool)
    return importance, mask


def test_reshape_hand_computed():
    importance, mask = _hand_rows()
    got = np.asarray(reshape(importance, mask, CFG))
    # row 0: n = [0, 1/3, 2/3, 1]; q0 = median = 0.5 (linear interpolation)
    #   below: max(0 / 0.5, 0.1) = 0.1, (1/3) / 0.5 = 2/3
    #   above: 1 + (2/3 - 0.5) / 0.5 = 4/3, 1 + (1 - 0.5) / 0.5 = 2
    #   sum = 4.1, L = 4 -> scale by 4 / 4.1
    row0 = np.array([0.1, 2 / 3, 4 / 3, 2.0]) * 4 / 4.1
    np.testing.assert_allclose(got[0, :4], row0, rtol=1e-5)
    assert got[0, 4] == 0.0
    np.testing.assert_array_equal(got[1], np.ones(5))
    np.testing.assert_array_equal(got[2], np.zeros(5))
    # row 3: s -> [0, 0, e-1] -> u = [0, 0, 1] -> n = [0, 0, 1]; q0 = 0 -> nothing below;
    #   w = 1 + (n - 0) / 1 = [1, 1, 2]; sum 4, L = 3 -> [0.75, 0.75, 1.5]
    np.testing.assert_allclose(got[3], [0.75, 0.75, 1.5, 0.0, 0.0], rtol=1e-6)


def test_reshape_other_quantile_and_beta():
    cfg = OARConfig(q=0.25, beta=2.0, min_weight=0.2)
    importance = np.array([[0.0, np.e - 1, np.e**2 - 1, np.e**3 - 1, np.e**4 - 1]], np.float32)
    got = np.asarray(reshape(importance, np.ones((1, 5), bool), cfg))
    # n = [0, .25, .5, .75, 1]; q0 = quantile(n, .25) = 0.25
    # below: [max(0, 0.2)] = 0.2; above: 1 + 2 (n - .25) / .75 = [1, 5/3, 7/3, 3]
    raw = np.array([0.2, 1.0, 5 / 3, 7 / 3, 3.0])
    np.testing.assert_allclose(got[0], raw * 5 / raw.sum(), rtol=1e-5)


def test_token_advantages_hand_computed():
    importance, mask = _hand_rows()
    advantages = np.array([2.0, -1.0, 5.0, 0.0], np.float32)
    got, diag = token_advantages(advantages, importance, mask, CFG)
    row0 = 2.0 * np.array([0.1, 2 / 3, 4 / 3, 2.0]) * 4 / 4.1
    np.testing.assert_allclose(np.asarray(got)[0, :4], row0, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got)[1], -np.ones(5))
    np.testing.assert_array_equal(np.asarray(got)[2:], np.zeros((2, 5)))
    # rows with tokens: 0, 1, 3 -> flat only row 1
    np.testing.assert_allclose(float(diag["flat_row_frac"]), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(float(diag["weight_max"]), (2 * 4 / 4.1 + 1.0 + 1.5) / 3, rtol=1e-5)


importance_arrays = hnp.arrays(
    np.float32,
    (B, T),
    elements=st.one_of(st.just(0.0), st.just(1.0), st.floats(0.0, 1e3, width=32, allow_subnormal=False)),
)


@settings(max_examples=50, deadline=None)
@given(importance=importance_arrays, mask=hnp.arrays(np.bool_, (B, T)))
def test_weights_preserve_mass_and_respect_floor(importance, mask):
    weights = np.asarray(reshape(importance, mask, CFG))
    assert np.all(np.isfinite(weights))
    assert np.all(weights[~mask] == 0.0)
    for row in range(B):
        count = mask[row].sum()
        if count:
            np.testing.assert_allclose(weights[row][mask[row]].mean(), 1.0, rtol=1e-5)
    # the floor applies BEFORE renormalising; renormalising divides by the mean raw weight,
    # which is at most 1 + beta.
    assert np.all(weights[mask] >= CFG.min_weight / (1.0 + CFG.beta) - 1e-6)
    raw = np.asarray(raw_weights(importance, mask, CFG))
    assert np.all(raw[mask] >= CFG.min_weight)
    assert np.all(raw[mask] <= 1.0 + CFG.beta + 1e-6)


@settings(max_examples=25, deadline=None)
@given(value=st.floats(0.0, 1e3, width=32, allow_subnormal=False), mask=hnp.arrays(np.bool_, (B, T)))
def test_flat_rows_get_unit_weight(value, mask):
    weights = np.asarray(reshape(np.full((B, T), value, np.float32), mask, CFG))
    np.testing.assert_array_equal(weights, mask.astype(np.float32))


# --- importance estimators ----------------------------------------------------------


def _toy_embeddings():
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(2, 5, 3)).astype(np.float32)
    coefficients = rng.normal(size=(5, 3)).astype(np.float32)
    reasoning_mask = np.array([[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]], bool)
    return embeddings, coefficients, reasoning_mask


def test_gradient_importance_linear_outcome():
    embeddings, coefficients, reasoning_mask = _toy_embeddings()

    def outcome(e):  # J(e) = sum_t <a_t, e_t> per row -> grad_{e_t} = a_t
        return jnp.sum(e * coefficients, axis=(1, 2))

    fn = jax.jit(functools.partial(oar_gradient_importance, outcome), static_argnums=2)
    got = np.asarray(fn(embeddings, reasoning_mask, CFG))
    expected = np.abs((embeddings * coefficients).sum(-1)) * reasoning_mask
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # the gradient of a linear outcome is constant: the noise variant gives the same
    noisy_cfg = OARConfig(gradient_noise=True, noise_sigma=0.1)
    noisy = np.asarray(fn(embeddings, reasoning_mask, noisy_cfg, jax.random.key(1)))
    np.testing.assert_allclose(noisy, expected, rtol=1e-5, atol=1e-6)


def test_gradient_importance_quadratic_outcome():
    embeddings, coefficients, reasoning_mask = _toy_embeddings()
    c = coefficients[:, 0]

    def outcome(e):  # J(e) = sum_t c_t ||e_t||^2 -> <grad_{e_t} J, e_t> = 2 c_t ||e_t||^2
        return jnp.sum(c[None, :] * jnp.sum(e**2, axis=-1), axis=-1)

    fn = jax.jit(functools.partial(oar_gradient_importance, outcome), static_argnums=2)
    got = np.asarray(fn(embeddings, reasoning_mask, CFG))
    expected = np.abs(2 * c[None, :] * (embeddings**2).sum(-1)) * reasoning_mask
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # with tiny noise the value moves by O(sigma): |2 c_t <noise_t, e_t>|
    noisy = np.asarray(fn(embeddings, reasoning_mask, OARConfig(gradient_noise=True), jax.random.key(0)))
    np.testing.assert_allclose(noisy, expected, atol=0.05)
    assert not np.array_equal(noisy, expected)
    with pytest.raises(ValueError):
        oar_gradient_importance(outcome, embeddings, reasoning_mask, OARConfig(gradient_noise=True))


@pytest.mark.parametrize("chunk_size", [1, 3, 7])
def test_perturbation_importance_toy_outcome(chunk_size):
    pad_id = 0
    table = np.array([0.0, 1.0, -2.0, 0.5, 3.0], np.float32)  # per-token value
    position_weight = np.array([1.0, 2.0, 3.0, 4.0, 5.0], np.float32)
    input_ids = np.array([[1, 2, 3, 4, 1], [4, 4, 0, 2, 3]], np.int32)
    reasoning_mask = np.array([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], bool)

    def outcome(ids):  # sum_t w_t * table[ids_t] plus a cross term to make it non-additive
        values = jnp.asarray(table)[ids]
        return jnp.sum(values * position_weight, axis=-1) + 0.1 * values[:, 0] * values[:, 1]

    fn = jax.jit(
        functools.partial(oar_perturbation_importance, outcome, pad_id=pad_id, chunk_size=chunk_size)
    )
    got = np.asarray(fn(input_ids, reasoning_mask))

    def np_outcome(ids):
        values = table[ids]
        return (values * position_weight).sum(-1) + 0.1 * values[:, 0] * values[:, 1]

    expected = np.zeros((2, 5), np.float32)
    base = np_outcome(input_ids)
    for t in range(5):
        perturbed = input_ids.copy()
        perturbed[:, t] = np.where(reasoning_mask[:, t], pad_id, input_ids[:, t])
        expected[:, t] = np.where(reasoning_mask[:, t], base - np_outcome(perturbed), 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # hand check of one entry: row 0, t = 1: token 2 (value -2, weight 2) -> pad (0);
    # cross term 0.1 * 1 * (-2) disappears: drop = -4 - 0.2 = -4.2
    np.testing.assert_allclose(got[0, 1], -4.2, rtol=1e-5)


def test_answer_tokens_keep_the_sequence_advantage_and_reasoning_weights_average_one():
    """docs/methods.md, "OAR": the reshaping runs over the reasoning tokens. The answer span
    (importance 0 by
    construction) keeps A_i and does not shift the reasoning tokens' normalisation."""
    from amrsd_jax.credit import OARConfig, oar_reshape_weights, oar_token_advantages

    importance = jnp.array([[0.5, 3.0, 1.0, 0.2, 0.0, 0.0, 0.0],
                            [2.0, 0.1, 0.0, 0.0, 9.0, 0.0, 0.0]])
    mask = jnp.array([[1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0, 0]])
    answer = jnp.array([[0, 0, 0, 0, 1, 1, 0], [0, 0, 1, 1, 0, 0, 0]])
    A = jnp.array([1.5, -0.5])
    ahat, _ = oar_token_advantages(A, importance, mask, OARConfig(), answer_mask=answer)
    ahat = np.asarray(ahat)
    reasoning = np.asarray(mask.astype(bool) & ~answer.astype(bool))
    weights = ahat / np.asarray(A)[:, None]
    np.testing.assert_allclose(weights[np.asarray(answer, bool)], 1.0, rtol=1e-6)
    for row in range(2):
        np.testing.assert_allclose(weights[row][reasoning[row]].mean(), 1.0, rtol=1e-6)
    # the reasoning weights are those of reshaping the reasoning tokens alone
    expected = np.asarray(oar_reshape_weights(importance, reasoning, OARConfig()))
    np.testing.assert_allclose(weights[reasoning], expected[reasoning], rtol=1e-6)
    assert np.all(ahat[~np.asarray(mask, bool)] == 0)

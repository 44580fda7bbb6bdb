"""AMR-SD credit assignment (CIG, asymmetric gate, annealing): hand cases + invariants."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from amrsd_jax.credit import (
    IHAT_QUANTILES,
    AMRSDConfig,
    amr_sd_token_advantages,
    annealed_coefficients,
    annealing_factor,
    asymmetric_gate,
    causal_information_gain,
    grpo_token_advantages,
    ihat_quantiles,
)

B, T = 4, 6
# Realistic advantages: 0 or 2^-10 <= |A| <= 3 (XLA CPU flushes subnormal results to 0).
ADVANTAGE_VALUES = st.one_of(
    st.just(0.0), st.floats(0.0009765625, 3.0, width=32), st.floats(-3.0, -0.0009765625, width=32)
)
CFG = AMRSDConfig()
_jitted = jax.jit(amr_sd_token_advantages, static_argnums=4)
_cig = jax.jit(causal_information_gain, static_argnames="kappa")


def test_config_defaults_match_spec_and_validate():
    assert (CFG.lam, CFG.gam, CFG.tau, CFG.kappa, CFG.decay_steps) == (0.2, 0.1, 0.5, 5.0, 50)
    hash(CFG)
    for bad in (dict(lam=-1.0), dict(tau=-0.1), dict(kappa=0.0), dict(decay_steps=0)):
        with pytest.raises(ValueError):
            AMRSDConfig(**bad)


def test_causal_information_gain_hand_computed():
    lp_teacher = np.array([[-1.0, -9.0, -0.2, np.nan]], np.float32)
    lp_old = np.array([[-3.0, -2.0, -0.5, -1.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]])
    got = jax.jit(causal_information_gain, static_argnames="kappa")(lp_teacher, lp_old, mask, kappa=5.0)
    # I = [2, -7, 0.3, masked] -> clip to [-5, 5], 0 outside the mask (NaN never leaks)
    np.testing.assert_allclose(np.asarray(got), [[2.0, -5.0, 0.3, 0.0]], atol=1e-6)


def test_annealed_coefficients_hand_computed():
    jitted = jax.jit(annealed_coefficients, static_argnums=0)
    for step, (lam, gam) in [(0, (0.2, 0.1)), (25, (0.1, 0.05)), (50, (0.0, 0.0)), (80, (0.0, 0.0))]:
        got = jitted(CFG, jnp.asarray(step))
        np.testing.assert_allclose([float(got[0]), float(got[1])], [lam, gam], atol=1e-7)
    assert float(jax.jit(annealing_factor, static_argnums=0)(CFG, 50)) == 0.0
    no_anneal = AMRSDConfig(decay_steps=None)
    assert float(annealing_factor(no_anneal, 10_000)) == 1.0


def _hand_inputs():
    advantages = np.array([1.0, -2.0, 0.0], np.float32)
    gain = np.array(
        [
            [1.5, -1.5, 0.4, 6.0],  # A > 0: gate on Ihat - tau
            [1.5, -1.5, -0.5, -9.0],  # A < 0: gate on -Ihat - tau
            [0.2, 3.0, 0.0, 0.0],  # A = 0: never gated
        ],
        np.float32,
    )
    lp_old = np.full_like(gain, -2.0)
    lp_teacher = lp_old + gain
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    return advantages, lp_teacher, lp_old, mask, gain


def test_amr_sd_hand_computed_step0():
    advantages, lp_teacher, lp_old, mask, gain = _hand_inputs()
    fn = jax.jit(amr_sd_token_advantages, static_argnums=4)
    token_adv, diag = fn(advantages, lp_teacher, lp_old, mask, CFG, 0)
    # row 0: Ihat = [1.5, -1.5, 0.4, 5]; D = 0.2 * relu(Ihat - 0.5) = [0.2, 0, 0, 0.9]
    # row 1: Ihat = [1.5, -1.5, -0.5, -5]; D = 0.1 * relu(-Ihat - 0.5) = [0, 0.1, 0, 0.45]
    expected = np.array(
        [[1.2, 1.0, 1.0, 1.9], [-2.0, -2.2, -2.0, -2.9], [0.0, 0.0, 0.0, 0.0]], np.float32
    )
    np.testing.assert_allclose(np.asarray(token_adv), expected, rtol=1e-6)
    # gated tokens: 2 of 4 correct-rollout tokens, 2 of 4 incorrect, 0 of 2 zero-adv
    np.testing.assert_allclose(float(diag["gated_frac"]), 4 / 10)
    np.testing.assert_allclose(float(diag["gated_frac_correct"]), 0.5)
    np.testing.assert_allclose(float(diag["gated_frac_incorrect"]), 0.5)
    np.testing.assert_allclose(float(diag["gate_mean"]), (0.2 + 0.9 + 0.1 + 0.45) / 10, rtol=1e-6)
    masked_ihat = [1.5, -1.5, 0.4, 5.0, 1.5, -1.5, -0.5, -5.0, 0.2, 3.0]
    np.testing.assert_allclose(float(diag["ihat_mean"]), 3.1 / 10, rtol=1e-5)
    # the quantiles are a host diagnostic (no sort in the compiled step)
    assert not any(k.startswith("ihat_q") for k in diag)
    quantiles = ihat_quantiles(lp_teacher, lp_old, mask, CFG.kappa)
    for q in IHAT_QUANTILES:
        np.testing.assert_allclose(
            quantiles[f"ihat_q{round(q * 100):02d}"], np.quantile(masked_ihat, q), rtol=1e-5, atol=1e-6
        )
    assert ihat_quantiles(lp_teacher, lp_old, np.zeros_like(mask), CFG.kappa) == {
        f"ihat_q{round(q * 100):02d}": 0.0 for q in IHAT_QUANTILES}
    np.testing.assert_allclose([float(diag["lam_eff"]), float(diag["gam_eff"])], [0.2, 0.1])


def test_amr_sd_hand_computed_half_annealed():
    advantages, lp_teacher, lp_old, mask, _ = _hand_inputs()
    token_adv, _ = _jitted(advantages, lp_teacher, lp_old, mask, CFG, 25)
    # lam_eff = 0.1, gam_eff = 0.05
    expected = np.array(
        [[1.1, 1.0, 1.0, 1.45], [-2.0, -2.1, -2.0, -2.45], [0.0, 0.0, 0.0, 0.0]], np.float32
    )
    np.testing.assert_allclose(np.asarray(token_adv), expected, rtol=1e-6)


def test_asymmetric_gate_hand_computed_and_jit():
    cig = np.array([[0.9, -0.9], [0.9, -0.9], [0.9, -0.9]], np.float32)
    advantages = np.array([1.0, -1.0, 0.0], np.float32)
    gate = jax.jit(asymmetric_gate, static_argnames="tau")(cig, advantages, 0.2, 0.1, tau=0.5)
    np.testing.assert_allclose(np.asarray(gate), [[0.08, 0.0], [0.0, 0.04], [0.0, 0.0]], rtol=1e-5)
    masked = asymmetric_gate(cig, advantages, 0.2, 0.1, 0.5, mask=np.array([[0, 1], [1, 1], [1, 1]]))
    assert float(masked[0, 0]) == 0.0


def test_empty_mask_diagnostics_are_finite():
    advantages, lp_teacher, lp_old, _, _ = _hand_inputs()
    token_adv, diag = _jitted(advantages, lp_teacher, lp_old, np.zeros((3, 4), bool), CFG, 0)
    assert np.all(np.asarray(token_adv) == 0.0)
    assert all(np.isfinite(float(v)) for v in diag.values())


lp_arrays = hnp.arrays(np.float32, (B, T), elements=st.floats(-30.0, 0.0, width=32, allow_subnormal=False))
advantage_arrays = hnp.arrays(
    np.float32, (B,), elements=ADVANTAGE_VALUES
)
mask_arrays = hnp.arrays(np.bool_, (B, T))


@settings(max_examples=50, deadline=None)
@given(
    advantages=advantage_arrays,
    lp_teacher=lp_arrays,
    lp_old=lp_arrays,
    mask=mask_arrays,
    step=st.integers(0, 49),
)
def test_invariants_before_decay(advantages, lp_teacher, lp_old, mask, step):
    token_adv, diag = _jitted(advantages, lp_teacher, lp_old, mask, CFG, step)
    token_adv = np.asarray(token_adv)
    broadcast = np.where(mask, advantages[:, None], 0.0)
    # sign preserved and magnitude never shrinks
    np.testing.assert_array_equal(np.sign(token_adv), np.sign(broadcast))
    assert np.all(np.abs(token_adv) >= np.abs(broadcast))
    # D == 0 (so Ahat == A exactly) wherever |Ihat| <= tau
    ihat = np.asarray(_cig(lp_teacher, lp_old, mask, kappa=CFG.kappa))
    dead_zone = mask & (np.abs(ihat) <= CFG.tau)
    np.testing.assert_array_equal(token_adv[dead_zone], broadcast[dead_zone])
    # gate upper bound: D <= max(lam, gam) * (kappa - tau)
    bound = 1.0 + max(CFG.lam, CFG.gam) * (CFG.kappa - CFG.tau) + 1e-6
    assert np.all(np.abs(token_adv) <= np.abs(broadcast) * bound + 1e-6)
    assert all(np.isfinite(float(v)) for v in diag.values())


@settings(max_examples=50, deadline=None)
@given(
    advantages=advantage_arrays,
    lp_teacher=lp_arrays,
    lp_old=lp_arrays,
    mask=mask_arrays,
    step=st.integers(50, 10_000),
)
def test_exactly_grpo_after_decay(advantages, lp_teacher, lp_old, mask, step):
    token_adv, diag = _jitted(advantages, lp_teacher, lp_old, mask, CFG, step)
    grpo = grpo_token_advantages(advantages, mask)
    np.testing.assert_array_equal(np.asarray(token_adv), np.asarray(grpo))
    assert float(diag["gated_frac"]) == 0.0


def test_exactly_grpo_after_decay_even_with_nan_gain():
    advantages, lp_teacher, lp_old, mask, _ = _hand_inputs()
    lp_teacher = lp_teacher.copy()
    lp_teacher[0, 0] = np.nan
    token_adv, _ = _jitted(advantages, lp_teacher, lp_old, mask, CFG, 50)
    np.testing.assert_array_equal(np.asarray(token_adv), np.asarray(grpo_token_advantages(advantages, mask)))


@settings(max_examples=50, deadline=None)
@given(advantages=advantage_arrays, lp_old=lp_arrays, mask=mask_arrays, step=st.integers(0, 100))
def test_teacher_equal_to_old_policy_gives_no_gate(advantages, lp_old, mask, step):
    token_adv, diag = _jitted(advantages, lp_old, lp_old, mask, CFG, step)
    np.testing.assert_array_equal(np.asarray(token_adv), np.asarray(grpo_token_advantages(advantages, mask)))
    assert float(diag["gated_frac"]) == 0.0


def test_outputs_carry_no_gradient():
    advantages, lp_teacher, lp_old, mask, _ = _hand_inputs()

    def total(lp_t, lp_o):
        return jnp.sum(amr_sd_token_advantages(advantages, lp_t, lp_o, mask, CFG, 0)[0])

    grads = jax.jit(jax.grad(total, argnums=(0, 1)))(lp_teacher, lp_old)
    assert all(np.all(np.asarray(g) == 0.0) for g in grads)

"""SDPO distillation loss: divergences against numpy, top-k, sampled REINFORCE, masks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amrsd_jax.losses import (
    SDPOConfig,
    generalized_jsd_from_log_probs,
    kl_from_log_probs,
    sdpo_distillation_loss,
    sdpo_per_token_loss,
    sdpo_sampled_token_loss,
    sdpo_token_divergence,
    sdpo_total_loss,
    topk_support_log_probs,
)

V = 6
RNG = np.random.default_rng(0)
STUDENT = (RNG.normal(size=(5, V)) * 2).astype(np.float32)
TEACHER = (RNG.normal(size=(5, V)) * 2).astype(np.float32)

divergence = jax.jit(sdpo_token_divergence, static_argnums=2)
per_token = jax.jit(sdpo_per_token_loss, static_argnums=(6, 7))


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=-1)


def test_config_validation():
    cfg = SDPOConfig()
    # the authors' recipe (lasgroup/SDPO), tested against a table in tests/test_recipes.py
    assert (cfg.mode, cfg.alpha, cfg.topk, cfg.is_clip, cfg.tis_cap, cfg.distill_weight) == \
        ("topk", 0.5, 100, 2.0, 2.0, 1.0)
    hash(cfg)
    with pytest.raises(ValueError):
        SDPOConfig(mode="sampled", alpha=0.5)
    with pytest.raises(ValueError):
        SDPOConfig(mode="sampled")  # default alpha 0 is not allowed for sampled
    SDPOConfig(mode="sampled", alpha=1.0)
    for bad in (dict(alpha=1.5), dict(mode="kl"), dict(topk=0), dict(is_clip=0.0), dict(distill_weight=2.0)):
        with pytest.raises(ValueError):
            SDPOConfig(**bad)


def test_full_forward_and_reverse_kl_match_numpy():
    p_s, p_t = np_softmax(STUDENT), np_softmax(TEACHER)
    got0 = divergence(STUDENT, TEACHER, SDPOConfig(alpha=0.0))
    np.testing.assert_allclose(np.asarray(got0), np_kl(p_t, p_s), rtol=1e-5)
    got1 = divergence(STUDENT, TEACHER, SDPOConfig(alpha=1.0))
    np.testing.assert_allclose(np.asarray(got1), np_kl(p_s, p_t), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.5, 0.3])
def test_full_generalized_jsd_matches_numpy(alpha):
    p_s, p_t = np_softmax(STUDENT), np_softmax(TEACHER)
    m = (1 - alpha) * p_s + alpha * p_t
    expected = (1 - alpha) * np_kl(p_s, m) + alpha * np_kl(p_t, m)
    got = divergence(STUDENT, TEACHER, SDPOConfig(alpha=alpha))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)


def test_jsd_half_is_symmetric_and_bounded():
    cfg = SDPOConfig(alpha=0.5)
    forward = np.asarray(divergence(STUDENT, TEACHER, cfg))
    swapped = np.asarray(divergence(TEACHER, STUDENT, cfg))
    np.testing.assert_allclose(forward, swapped, rtol=1e-5)
    assert np.all(forward <= np.log(2) + 1e-6) and np.all(forward >= 0)


def test_hand_computed_two_token_kl():
    # p_S = [0.5, 0.5], p_T = [0.25, 0.75]: KL(p_T||p_S) = 0.25 ln 0.5 + 0.75 ln 1.5
    student = np.log(np.array([[0.5, 0.5]], np.float32))
    teacher = np.log(np.array([[0.25, 0.75]], np.float32))
    got = float(divergence(student, teacher, SDPOConfig(alpha=0.0))[0])
    np.testing.assert_allclose(got, 0.25 * np.log(0.5) + 0.75 * np.log(1.5), rtol=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [V, V - 1, 1000])
def test_topk_with_full_support_equals_full(alpha, k):
    # k = V - 1 leaves exactly one token in the tail bucket: still the full distribution
    full = divergence(STUDENT, TEACHER, SDPOConfig(alpha=alpha))
    topk = divergence(STUDENT, TEACHER, SDPOConfig(mode="topk", alpha=alpha, topk=k))
    np.testing.assert_allclose(np.asarray(topk), np.asarray(full), rtol=1e-5, atol=1e-6)


def test_topk_hand_computed():
    p_s = np.array([0.6, 0.3, 0.1])
    p_t = np.array([0.2, 0.5, 0.3])
    # student top-1 = token 0; buckets: [p[0], 1 - p[0]]
    s2, t2 = np.array([0.6, 0.4]), np.array([0.2, 0.8])
    for alpha, expected in [(0.0, np_kl(t2, s2)), (1.0, np_kl(s2, t2))]:
        cfg = SDPOConfig(mode="topk", alpha=alpha, topk=1)
        got = divergence(np.log(p_s)[None].astype(np.float32), np.log(p_t)[None].astype(np.float32), cfg)
        np.testing.assert_allclose(float(got[0]), expected, rtol=1e-5)
    # a single token ([V], no leading dims, as inside the chunked lax.map): top-2 + tail
    support_s, support_t = jax.jit(topk_support_log_probs, static_argnums=2)(
        np.log(p_s).astype(np.float32), np.log(p_t).astype(np.float32), 2
    )
    np.testing.assert_allclose(np.exp(np.asarray(support_s)), [0.6, 0.3, 0.1], rtol=1e-5)
    np.testing.assert_allclose(np.exp(np.asarray(support_t)), [0.2, 0.5, 0.3], rtol=1e-5)


def test_masked_vocab_gives_finite_values_and_gradients():
    student = STUDENT.copy()
    student[:, -2:] = -np.inf  # zero-probability tokens (e.g. a masked vocabulary)
    teacher = TEACHER.copy()
    teacher[:, -1:] = -np.inf  # teacher zeros only where the student has none: KLs finite
    # (alpha = 0.5 also exercises the generalised JSD's log-mixture of two zeros)
    for cfg in (SDPOConfig(alpha=1.0), SDPOConfig(mode="topk", alpha=0.5, topk=3)):
        value, grad = jax.jit(jax.value_and_grad(lambda s: jnp.sum(sdpo_token_divergence(s, teacher, cfg))))(student)
        assert np.isfinite(float(value)), cfg
        assert np.all(np.isfinite(np.asarray(grad))), cfg


def test_teacher_receives_no_gradient():
    grad = jax.jit(jax.grad(lambda t: jnp.sum(sdpo_token_divergence(STUDENT, t, SDPOConfig(alpha=0.5)))))(TEACHER)
    assert np.all(np.asarray(grad) == 0.0)


def test_sampled_gradient_is_reinforce_on_reverse_kl():
    student = STUDENT[0]
    log_q = jax.nn.log_softmax(TEACHER[0])

    def expected_sampled_loss(logits):
        # E_{y ~ p_S}[loss(y)] with the sampling distribution held fixed (REINFORCE)
        log_p = jax.nn.log_softmax(logits)
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(log_p)) * sdpo_sampled_token_loss(log_p, log_q))

    grad = np.asarray(jax.jit(jax.grad(expected_sampled_loss))(student))
    p, q = np_softmax(STUDENT[0].astype(np.float64)), np_softmax(TEACHER[0].astype(np.float64))
    kl = np_kl(p, q)
    analytic = p * (np.log(p) - np.log(q) - kl)  # d KL(p_S || p_T) / d logits
    np.testing.assert_allclose(grad, analytic, rtol=1e-4, atol=1e-6)
    # single-sample value: sg(lp_S - lp_T) * lp_S
    got = float(sdpo_sampled_token_loss(jnp.float32(-1.0), jnp.float32(-3.0)))
    assert got == pytest.approx(2.0 * -1.0)


def _batch():
    rng = np.random.default_rng(1)
    student = rng.normal(size=(3, 4, V)).astype(np.float32)
    teacher = rng.normal(size=(3, 4, V)).astype(np.float32)
    ids = rng.integers(0, V, size=(3, 4)).astype(np.int32)
    lp_student = np.take_along_axis(np.log(np_softmax(student)), ids[..., None], -1)[..., 0]
    lp_old = lp_student.copy()  # on-policy: importance weight 1
    mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], bool)
    teacher_mask = np.array([1, 0, 1], bool)
    return student, teacher, ids, lp_old, mask, teacher_mask


@pytest.mark.parametrize(
    "cfg", [SDPOConfig(), SDPOConfig(mode="topk", alpha=0.5, topk=2), SDPOConfig(mode="sampled", alpha=1.0)]
)
def test_per_token_loss_masks_and_modes(cfg):
    student, teacher, ids, lp_old, mask, teacher_mask = _batch()
    loss, metrics = per_token(student, teacher, ids, lp_old, mask, teacher_mask, cfg, None)
    loss = np.asarray(loss)
    valid = mask & teacher_mask[:, None]
    assert np.all(loss[~valid] == 0.0)
    assert np.all(loss[1] == 0.0)  # rollout without teacher context
    if cfg.mode == "sampled":
        lp_s = np.take_along_axis(np.log(np_softmax(student)), ids[..., None], -1)[..., 0]
        lp_t = np.take_along_axis(np.log(np_softmax(teacher)), ids[..., None], -1)[..., 0]
        expected = (lp_s - lp_t) * lp_s
    else:
        expected = np.asarray(divergence(student, teacher, cfg))
    np.testing.assert_allclose(loss[valid], expected[valid], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["is_weight_mean"]), 1.0, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["teacher_row_frac"]), 2 / 3, rtol=1e-6)


def test_chunked_matches_unchunked_values_and_gradients():
    student, teacher, ids, lp_old, mask, teacher_mask = _batch()
    cfg = SDPOConfig(alpha=0.5)  # chunking is mode-independent; topk compiles slowly

    def total(s, chunk):
        return jnp.sum(sdpo_per_token_loss(s, teacher, ids, lp_old, mask, teacher_mask, cfg, chunk)[0])

    value_full, grad_full = jax.jit(jax.value_and_grad(functools.partial(total, chunk=None)))(student)
    value_chunk, grad_chunk = jax.jit(jax.value_and_grad(functools.partial(total, chunk=5)))(student)
    np.testing.assert_allclose(float(value_chunk), float(value_full), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad_chunk), np.asarray(grad_full), rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(grad_full)[1] == 0.0)  # no teacher for rollout 1
    assert np.all(np.asarray(grad_full)[0, 3] == 0.0)  # padding token


def test_importance_weight_is_clipped_and_detached():
    student, teacher, ids, lp_old, mask, teacher_mask = _batch()
    cfg = SDPOConfig(alpha=1.0)
    # exp(lp_S - lp_old) = 3 on row 0 (clipped to 2), 0.5 on row 2
    lp_old = lp_old.copy()
    lp_old[0] -= np.log(3.0)
    lp_old[2] += np.log(2.0)
    loss, metrics = per_token(student, teacher, ids, lp_old, mask, teacher_mask, cfg, None)
    raw = np.asarray(divergence(student, teacher, cfg))
    np.testing.assert_allclose(np.asarray(loss)[0, :3], 2.0 * raw[0, :3], rtol=1e-5)
    np.testing.assert_allclose(np.asarray(loss)[2], 0.5 * raw[2], rtol=1e-5)
    np.testing.assert_allclose(float(metrics["is_clip_frac"]), 3 / 7, rtol=1e-6)
    # detached: the gradient is weight * grad(divergence)
    def weighted_total(s):
        return jnp.sum(sdpo_per_token_loss(s, teacher, ids, lp_old, mask, teacher_mask, cfg)[0])

    grad = jax.jit(jax.grad(weighted_total))(student)
    raw_grad = jax.jit(jax.grad(lambda s: jnp.sum(sdpo_token_divergence(s, teacher, cfg)[0, :3])))(student)
    np.testing.assert_allclose(np.asarray(grad)[0], 2.0 * np.asarray(raw_grad)[0], rtol=1e-5, atol=1e-7)


def test_distillation_loss_aggregation_and_total():
    student, teacher, ids, lp_old, mask, teacher_mask = _batch()
    cfg = SDPOConfig()
    fn = jax.jit(sdpo_distillation_loss, static_argnums=(6, 7, 9))
    loss, _ = fn(student, teacher, ids, lp_old, mask, teacher_mask, cfg, "token-mean", None, None)
    tokens = np.asarray(per_token(student, teacher, ids, lp_old, mask, teacher_mask, cfg, None)[0])
    valid = mask & teacher_mask[:, None]
    np.testing.assert_allclose(float(loss), tokens[valid].mean(), rtol=1e-5)
    total = jax.jit(sdpo_total_loss, static_argnums=2)
    assert float(total(jnp.float32(3.0), jnp.float32(5.0), SDPOConfig())) == 5.0
    np.testing.assert_allclose(float(total(jnp.float32(3.0), jnp.float32(5.0), SDPOConfig(distill_weight=0.25))), 3.5)


def test_divergence_helpers_jit():
    log_p = jax.nn.log_softmax(STUDENT)
    log_q = jax.nn.log_softmax(TEACHER)
    np.testing.assert_allclose(
        np.asarray(jax.jit(kl_from_log_probs)(log_p, log_q)), np_kl(np_softmax(STUDENT), np_softmax(TEACHER)), rtol=1e-5
    )
    jsd = jax.jit(generalized_jsd_from_log_probs, static_argnums=2)(log_p, log_q, 0.5)
    expected = np.asarray(divergence(STUDENT, TEACHER, SDPOConfig(alpha=0.5)))
    np.testing.assert_allclose(np.asarray(jsd), expected, rtol=1e-5)
    assert float(jax.jit(sdpo_sampled_token_loss)(jnp.float32(-1.0), jnp.float32(-1.0))) == 0.0

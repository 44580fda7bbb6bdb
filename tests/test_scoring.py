"""Scoring: vocab-chunked log-probs, response alignment, OAR importance, EMA teacher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from amrsd_jax.methods.oar import outcome_importance
from amrsd_jax.methods.sdpo import SDPO
from amrsd_jax.scoring import response_logprobs, token_logprobs_from_hidden

from conftest import tiny_model

RNG = np.random.default_rng(0)
PROMPT = RNG.integers(4, 96, (3, 5)).astype(np.int32)
PROMPT_MASK = np.array([[0, 1, 1, 1, 1], [1] * 5, [0, 0, 0, 1, 1]], np.int32)
RESP = RNG.integers(4, 96, (3, 6)).astype(np.int32)
RESP_MASK = np.array([[1] * 6, [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], np.int32)


@pytest.mark.parametrize("chunk", [32, 40, 95])  # divides 96, does not, one short of V
def test_vocab_chunked_logprobs_entropy_and_grads_equal_full(chunk):
    h = jnp.asarray(RNG.normal(size=(2, 4, 16)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(16, 96)), jnp.float32)
    t = jnp.asarray(RNG.integers(0, 96, (2, 4)))
    full_lp, full_h = token_logprobs_from_hidden(h, w, t, with_entropy=True)
    lp, ent = token_logprobs_from_hidden(h, w, t, vocab_chunk=chunk, with_entropy=True)
    logits = np.asarray(h) @ np.asarray(w)
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(full_lp),
                               np.take_along_axis(ref, np.asarray(t)[..., None], -1)[..., 0],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(full_lp), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(full_h), rtol=1e-5, atol=1e-5)

    def loss(h, w, chunk):
        lp, ent = token_logprobs_from_hidden(h, w, t, vocab_chunk=chunk, with_entropy=True)
        return jnp.sum(lp) + 0.3 * jnp.sum(ent)

    g_full = jax.grad(loss, argnums=(0, 1))(h, w, None)
    g_chunk = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(h, w, chunk)
    for a, b in zip(g_full, g_chunk):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_response_logprobs_equal_full_forward_log_softmax():
    model = tiny_model()
    lp, ent = response_logprobs(model, jnp.asarray(PROMPT), jnp.asarray(PROMPT_MASK),
                                jnp.asarray(RESP), jnp.asarray(RESP_MASK), with_entropy=True)
    ids = np.concatenate([PROMPT, RESP], 1)
    mask = np.concatenate([PROMPT_MASK, RESP_MASK], 1)
    logp = np.asarray(jax.nn.log_softmax(model(jnp.asarray(ids), jnp.asarray(mask))))
    expected = np.take_along_axis(logp[:, 4:-1], RESP[..., None], -1)[..., 0] * RESP_MASK
    np.testing.assert_allclose(np.asarray(lp), expected, atol=1e-5)
    assert np.all(np.asarray(ent)[RESP_MASK == 1] > 0)
    assert np.all(np.asarray(ent)[RESP_MASK == 0] == 0)


def test_masked_teacher_context_leaves_response_scores_unchanged():
    """A teacher prompt whose inserted context is masked out scores like the student:
    response positions stay aligned after the context insertion."""
    model = tiny_model()
    args = (jnp.asarray(RESP), jnp.asarray(RESP_MASK))
    student, _ = response_logprobs(model, jnp.asarray(PROMPT), jnp.asarray(PROMPT_MASK), *args)
    context = RNG.integers(4, 96, (3, 7)).astype(np.int32)
    teacher_ids = np.concatenate([context, PROMPT], 1)
    teacher_mask = np.concatenate([np.zeros((3, 7), np.int32), PROMPT_MASK], 1)
    teacher, _ = response_logprobs(model, jnp.asarray(teacher_ids), jnp.asarray(teacher_mask),
                                   *args)
    np.testing.assert_allclose(np.asarray(teacher), np.asarray(student), atol=1e-5)
    visible, _ = response_logprobs(model, jnp.asarray(teacher_ids),
                                   jnp.asarray(np.ones_like(teacher_mask)), *args)
    assert not np.allclose(np.asarray(visible), np.asarray(student), atol=1e-3)


def test_oar_importance_from_the_model():
    model = tiny_model()
    answer = np.zeros_like(RESP_MASK)
    answer[0, 4:6] = answer[1, 2] = answer[2, 3:5] = 1
    args = [jnp.asarray(a) for a in (PROMPT, PROMPT_MASK, RESP, RESP_MASK, answer)]
    s_g = np.asarray(outcome_importance(model, *args, mode="gradient"))
    s_p = np.asarray(outcome_importance(model, *args, mode="perturbation", pad_id=0,
                                        chunk_size=4))
    reasoning = (RESP_MASK == 1) & (answer == 0)
    for s in (s_g, s_p):
        assert s.shape == RESP.shape
        assert np.all(s[~reasoning] == 0) and np.any(s[reasoning] != 0)
    assert np.all(s_g >= 0)

    # OAR-P at one position equals the outcome drop computed by hand
    def outcome(resp):
        lp, _ = response_logprobs(model, args[0], args[1], jnp.asarray(resp), args[3])
        return np.sum(np.asarray(lp) * answer, axis=-1)

    perturbed = RESP.copy()
    perturbed[0, 1] = 0
    np.testing.assert_allclose(s_p[0, 1], (outcome(RESP) - outcome(perturbed))[0], atol=1e-5)


def _flat(state):
    return [np.asarray(v[...]) for _, v in nnx.to_flat_state(state)]


def test_teacher_refresh_policies():
    """The teacher refresh, traced as in the update step: EMA toward the policy after an
    applied (finite) step and unchanged after a skipped one; frozen stays put, except a
    refresh_every copy after every N-th step (RLSD: 20); live keeps no copy."""
    from amrsd_jax.methods.base import TeacherPolicy

    teacher = nnx.state(tiny_model(seed=1), nnx.Param)
    params = nnx.state(tiny_model(seed=2), nnx.Param)
    ema = jax.jit(SDPO(teacher=TeacherPolicy("ema", ema_rate=0.05)).refresh_teacher)
    new = ema(teacher, params, jnp.asarray(True), jnp.int32(0))
    skipped = ema(teacher, params, jnp.asarray(False), jnp.int32(0))
    frozen = jax.jit(SDPO(teacher=TeacherPolicy("frozen")).refresh_teacher)
    kept = [frozen(teacher, params, jnp.asarray(f), jnp.int32(s))
            for f, s in ((True, 0), (False, 19), (True, 39))]
    every = jax.jit(SDPO(teacher=TeacherPolicy("frozen", refresh_every=20)).refresh_teacher)
    before, at = (every(teacher, params, jnp.asarray(True), jnp.int32(s)) for s in (18, 19))
    assert jax.tree.structure(new) == jax.tree.structure(teacher)
    t_flat, p_flat = _flat(teacher), _flat(params)
    assert len(t_flat) == len(_flat(new)) > 0
    # the two models differ, so "unchanged" below is not vacuous (norm scales are all ones)
    assert any(not np.allclose(t, p) for t, p in zip(t_flat, p_flat))
    for t, p, n, s in zip(t_flat, p_flat, _flat(new), _flat(skipped)):
        np.testing.assert_allclose(n, 0.95 * t + 0.05 * p, rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(s, t)
    for f in [*kept, before]:
        for t, x in zip(t_flat, _flat(f)):
            np.testing.assert_array_equal(x, t)
    for p, x in zip(p_flat, _flat(at)):  # after the 20th step (0-based 19): the policy
        np.testing.assert_array_equal(x, p)
    assert SDPO(teacher=TeacherPolicy("live")).init_teacher(params) is None


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (fake) devices")
def test_jitted_scorer_sharded_equals_eager_and_compiles_once():
    from amrsd_jax.scoring import make_scorer
    from amrsd_jax.sharding import make_mesh, shard_batch, shard_model

    model = tiny_model()
    ids = np.tile(PROMPT, (8, 1))[:8]
    masks = np.tile(PROMPT_MASK, (8, 1))[:8]
    resp, resp_mask = np.tile(RESP, (8, 1))[:8], np.tile(RESP_MASK, (8, 1))[:8]
    ref, ref_h = response_logprobs(model, jnp.asarray(ids), jnp.asarray(masks),
                                   jnp.asarray(resp), jnp.asarray(resp_mask), with_entropy=True)
    mesh = make_mesh(2, 2, 2)
    shard_model(model, mesh)
    scorer = make_scorer(model, mesh, vocab_chunk=32, with_entropy=True)
    params = nnx.state(model, nnx.Param)
    for _ in range(2):
        lp, ent = scorer(params, *shard_batch((ids, masks, resp, resp_mask), mesh))
    np.testing.assert_allclose(np.asarray(lp), np.asarray(ref), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), np.asarray(ref_h), atol=1e-5)
    assert scorer._cache_size() == 1

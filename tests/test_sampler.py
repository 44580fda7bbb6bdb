"""Sampler: determinism, greedy == argmax of the full forward, stop tokens, filters, buckets,
continuing earlier generations from their KV cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amrsd_jax.rollout import SamplingConfig, bucket_length, continue_generation, generate
from amrsd_jax.rollout import sampler as sampler_module

from conftest import tiny_model

IDS = np.random.default_rng(1).integers(4, 96, (3, 6)).astype(np.int32)
MASK = np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], np.int32)


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


def _full_logprobs(model, out, temperature=1.0):
    """Teacher-forced log-probs of the sampled tokens from one full forward."""
    ids = np.concatenate([IDS, np.asarray(out.tokens)], 1)
    mask = np.concatenate([MASK, np.asarray(out.mask)], 1)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))[:, IDS.shape[1] - 1:-1]
    logp = jax.nn.log_softmax(logits / temperature, axis=-1)
    return np.take_along_axis(np.asarray(logp), np.asarray(out.tokens)[..., None], -1)[..., 0]


def test_same_key_same_tokens_other_key_other_tokens(model):
    cfg = SamplingConfig(max_new_tokens=12)
    a = generate(model, IDS, MASK, jax.random.key(0), cfg, stop_tokens=[])
    b = generate(model, IDS, MASK, jax.random.key(0), cfg, stop_tokens=[])
    c = generate(model, IDS, MASK, jax.random.key(1), cfg, stop_tokens=[])
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_full_forward(model, temperature):
    out = generate(model, IDS, MASK, jax.random.key(2),
                   SamplingConfig(max_new_tokens=10, temperature=temperature), stop_tokens=[])
    expected = _full_logprobs(model, out, temperature)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected * np.asarray(out.mask),
                               atol=2e-5)


def test_greedy_is_argmax_of_full_forward(model):
    out = generate(model, IDS, MASK, jax.random.key(0), SamplingConfig(max_new_tokens=8,
                                                                       greedy=True),
                   stop_tokens=[])
    ids = np.concatenate([IDS, np.asarray(out.tokens)], 1)
    mask = np.concatenate([MASK, np.ones_like(out.tokens)], 1)
    logits = model(jnp.asarray(ids), jnp.asarray(mask))[:, IDS.shape[1] - 1:-1]
    np.testing.assert_array_equal(np.asarray(out.tokens), np.argmax(np.asarray(logits), -1))
    # temperature 0 means greedy, and top_k=1 at any temperature is greedy too
    t0 = generate(model, IDS, MASK, jax.random.key(5), SamplingConfig(max_new_tokens=8,
                                                                      temperature=0.0),
                  stop_tokens=[])
    k1 = generate(model, IDS, MASK, jax.random.key(5), SamplingConfig(max_new_tokens=8, top_k=1),
                  stop_tokens=[])
    np.testing.assert_array_equal(t0.tokens, out.tokens)
    np.testing.assert_array_equal(k1.tokens, out.tokens)


def test_tiny_top_p_is_greedy(model):
    greedy = generate(model, IDS, MASK, jax.random.key(0),
                      SamplingConfig(max_new_tokens=6, greedy=True), stop_tokens=[])
    nucleus = generate(model, IDS, MASK, jax.random.key(9),
                       SamplingConfig(max_new_tokens=6, top_p=1e-6), stop_tokens=[])
    np.testing.assert_array_equal(nucleus.tokens, greedy.tokens)


def test_top_k_restricts_support(model):
    out = generate(model, IDS, MASK, jax.random.key(4), SamplingConfig(max_new_tokens=6, top_k=3),
                   stop_tokens=[])
    ids = np.concatenate([IDS, np.asarray(out.tokens)], 1)
    mask = np.concatenate([MASK, np.ones_like(out.tokens)], 1)
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))[:, IDS.shape[1] - 1:-1])
    top3 = np.argsort(-logits, -1)[..., :3]
    assert np.all((top3 == np.asarray(out.tokens)[..., None]).any(-1))


def test_per_row_stop_tokens_end_rows_and_mask_after(model):
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    free = np.asarray(generate(model, IDS, MASK, jax.random.key(0), greedy, stop_tokens=[]).tokens)
    # row 0 stops at the token it emits at step 2, row 1 at step 4, row 2 never
    stops = [[int(free[0, 2])], [int(free[1, 4])], [-5]]
    first0 = int(np.argmax(free[0] == free[0, 2]))
    first1 = int(np.argmax(free[1] == free[1, 4]))
    out = generate(model, IDS, MASK, jax.random.key(0), greedy, stop_tokens=stops, pad_id=0)
    lengths = np.asarray(out.lengths)
    assert lengths.tolist() == [first0 + 1, first1 + 1, 8]
    mask = np.asarray(out.mask)
    for row, n in enumerate(lengths):
        assert mask[row, :n].all() and not mask[row, n:].any()
        np.testing.assert_array_equal(np.asarray(out.tokens)[row, :n], free[row, :n])
        assert (np.asarray(out.tokens)[row, n:] == 0).all()
        assert (np.asarray(out.logprobs)[row, n:] == 0).all()


def test_loop_stops_early_when_all_rows_done(model):
    greedy = SamplingConfig(max_new_tokens=16, greedy=True)
    full = generate(model, IDS, MASK, jax.random.key(0), greedy, stop_tokens=[])
    assert int(full.num_steps) == 16
    free = np.asarray(full.tokens)
    out = generate(model, IDS, MASK, jax.random.key(0), greedy,
                   stop_tokens=[[int(r[0])] for r in free])
    assert np.asarray(out.lengths).tolist() == [1, 1, 1]
    assert int(out.num_steps) == 1  # the loop itself ended, not just the masks


def test_continuing_from_the_cache_equals_generating_from_the_whole_text(model):
    """A follow-up turn prefilled on top of the rollout's KV cache gives the same tokens and
    log-probs as generating from prompt + response + follow-up written out in full."""
    greedy = SamplingConfig(max_new_tokens=8, greedy=True)
    free = np.asarray(generate(model, IDS, MASK, jax.random.key(0), greedy, stop_tokens=[]).tokens)
    # rows stop at different steps (row 2 runs to the limit): holes of different widths
    stops = [[int(free[0, 1])], [int(free[1, 5])], [-5]]
    first, state = generate(model, IDS, MASK, jax.random.key(0), greedy, stop_tokens=stops,
                            return_state=True)
    lengths = np.asarray(first.lengths)
    assert len(set(lengths.tolist())) == 3
    rows = np.array([2, 0, 0, 1])  # a subset, in any order, with repeats
    rng = np.random.default_rng(5)
    suffixes = [rng.integers(4, 96, n).astype(np.int32) for n in (3, 5, 1, 4)]
    width = max(len(x) for x in suffixes)
    suffix_ids = np.zeros((4, width), np.int32)
    suffix_mask = np.zeros((4, width), np.int32)
    for b, x in enumerate(suffixes):
        suffix_ids[b, width - len(x):], suffix_mask[b, width - len(x):] = x, 1
    cont = SamplingConfig(max_new_tokens=6, greedy=True)
    out = continue_generation(model, state, rows, suffix_ids, suffix_mask, jax.random.key(1),
                              cont, stop_tokens=[])

    full = [np.concatenate([IDS[r][MASK[r] == 1], np.asarray(first.tokens)[r, :lengths[r]], x])
            for r, x in zip(rows, suffixes)]
    long = max(len(x) for x in full)
    ids = np.zeros((4, long), np.int32)
    mask = np.zeros((4, long), np.int32)
    for b, x in enumerate(full):
        ids[b, long - len(x):], mask[b, long - len(x):] = x, 1
    ref = generate(model, ids, mask, jax.random.key(1), cont, stop_tokens=[])
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(ref.logprobs), atol=1e-4)


def test_buckets_share_one_compiled_program(model):
    sampler_module._generate.clear_cache()
    cfg = SamplingConfig(max_new_tokens=5)
    for length in (3, 7, 12, 16):  # all round up to the 16-token prompt bucket
        ids = np.full((3, length), 7, np.int32)
        generate(model, ids, np.ones_like(ids), jax.random.key(0), cfg, stop_tokens=[])
    assert sampler_module._generate._cache_size() == 1
    ids = np.full((3, 17), 7, np.int32)
    generate(model, ids, np.ones_like(ids), jax.random.key(0), cfg, stop_tokens=[])
    assert sampler_module._generate._cache_size() == 2


def test_bucket_length():
    assert bucket_length(1) == 16 and bucket_length(16) == 16 and bucket_length(17) == 32
    assert bucket_length(45) == 48 and bucket_length(64) == 64 and bucket_length(65) == 96
    assert bucket_length(9000) == 16384


def test_bad_config_and_shapes():
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingConfig(max_new_tokens=0)
    with pytest.raises(ValueError, match=r"\[batch, time\]"):
        generate(tiny_model(), IDS[0], MASK[0], jax.random.key(0))


@pytest.mark.parametrize("vocab_chunk", [None, 32])
def test_scorer_and_update_step_score_at_the_sampling_temperature(model, vocab_chunk):
    """TRL / verl / SDPO / RLSD score softmax(logits / T): the scorer the trainer builds
    (and the update step's log-probs) equal the sampler's own at T = 0.7."""
    from flax import nnx

    from amrsd_jax.scoring import make_scorer, response_logprobs

    out = generate(model, IDS, MASK, jax.random.key(2),
                   SamplingConfig(max_new_tokens=10, temperature=0.7), stop_tokens=[])
    score = make_scorer(model, vocab_chunk=vocab_chunk, temperature=0.7)
    lp, _ = score(nnx.state(model, nnx.Param), IDS, MASK, out.tokens, out.mask)
    np.testing.assert_allclose(np.asarray(lp), np.asarray(out.logprobs), atol=3e-5)
    untempered, _ = response_logprobs(model, IDS, MASK, out.tokens, out.mask)
    assert np.abs(np.asarray(untempered) - np.asarray(out.logprobs)).max() > 1e-2


def test_update_step_scores_at_the_sampling_temperature():
    """At the first step the policy is the sampler: with old log-probs from the sampler at
    T = 0.7 the update step's ratio exp(lp_new - lp_old) is 1 on every token."""
    from amrsd_jax.batch import abstract_batch, make_batch
    from amrsd_jax.methods import make_method
    from amrsd_jax.programs import build_programs
    from amrsd_jax.sharding import single_device_mesh
    from amrsd_jax.update import OptimizerConfig, StepConfig, make_optimizer

    model = tiny_model(seed=3)
    ids, mask = np.repeat(IDS[:2], 2, 0), np.repeat(MASK[:2], 2, 0)
    out = generate(model, ids, mask, jax.random.key(2),
                   SamplingConfig(max_new_tokens=6, temperature=0.7), stop_tokens=[])
    ratios = {}
    for temperature in (0.7, 1.0):
        programs = build_programs(  # a fresh copy of the same weights: the step donates them
            tiny_model(seed=3), single_device_mesh(), step=StepConfig(method=make_method("grpo"),
                                                         group_size=2, temperature=temperature),
            optimizer=make_optimizer(OptimizerConfig()),
            batch=abstract_batch((), rows=4, prompt=6, response=6), pad_id=0, stop_ids=[])
        batch = make_batch(prompt_ids=ids, prompt_mask=mask, response_ids=out.tokens,
                           response_mask=out.mask, rewards=np.array([1, 0, 0, 1], np.float32),
                           sampler_logprobs=out.logprobs, old_logprobs=out.logprobs)
        _, _, metrics = programs.update(programs.init_state(), batch, None)
        ratios[temperature] = float(metrics["ratio_mean"])
    assert ratios[0.7] == pytest.approx(1.0, abs=1e-4)
    assert abs(ratios[1.0] - 1.0) > 1e-3

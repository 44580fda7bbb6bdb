"""Held-out evaluation: unbiased pass@k, batching/padding, determinism, known-correctness runs."""

import dataclasses
import itertools
import math

import jax
import numpy as np
import pytest

from amrsd_jax import evaluation
from amrsd_jax.data.arithmetic import ArithmeticTask, render_prompt
from amrsd_jax.evaluation import EvalReport, EvalSettings, evaluate, pass_at_k
from amrsd_jax.rewards import math_verifier
from amrsd_jax.rollout.prompts import encode_chat
from amrsd_jax.rollout.sampler import SampleOutput

from conftest import tiny_chat_tokenizer, tiny_model

# one shape for every test that runs the real sampler: 4 rows, prompts bucketed to 192
SETTINGS = EvalSettings(num_samples=2, max_new_tokens=8, batch_size=4, max_prompt_tokens=192)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_chat_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(seed=5, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


@pytest.fixture(scope="module")
def examples():
    return list(ArithmeticTask(level=1, split="test", size=6))


@pytest.fixture(scope="module")
def report5(model, tokenizer, examples):
    return evaluate(model, tokenizer, examples[:5], jax.random.key(0), SETTINGS)


# ----------------------------------------------------------------------------- pass@k


def _brute_pass_at_k(n, c, k):
    outcomes = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_subset_enumeration():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(n, c, k), abs=1e-12), \
                    (n, c, k)


def test_pass_at_k_edge_cases():
    assert pass_at_k(5, 0, 1) == 0.0
    assert pass_at_k(5, 0, 5) == 0.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the fraction correct
    # large n: the product form stays exact where the binomials are astronomically large
    n, c, k = 1000, 7, 100
    exact = 1 - math.comb(n - c, k) / math.comb(n, k)
    assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-12)
    for bad in [(0, 0, 1), (4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_settings_validation():
    with pytest.raises(ValueError):
        EvalSettings(greedy=False, num_samples=0)
    with pytest.raises(ValueError):
        EvalSettings(on_long_prompt="drop")
    with pytest.raises(ValueError):
        EvalSettings(success_threshold=0.0)
    with pytest.raises(ValueError):
        EvalSettings(top_p=0.0)
    with pytest.raises(ValueError):
        EvalSettings(batch_size=0)


# ----------------------------------------------------------------------------- real sampler


def test_report_is_well_formed(report5, examples):
    assert isinstance(report5, EvalReport)
    m = report5.metrics
    for name in ("pass@1_greedy", "pass@1_sampled", "pass@2", "no_answer_frac", "clipped_frac"):
        assert 0.0 <= m[name] <= 1.0, name
    assert m["num_questions"] == 5
    assert m["skipped_long_prompts"] == 0
    assert m["reward_errors"] == 0
    assert 0 < m["response_length_mean"] <= SETTINGS.max_new_tokens
    assert len(report5.records) == 5
    assert [r["id"] for r in report5.records] == [e["id"] for e in examples[:5]]
    for rec, ex in zip(report5.records, examples):
        assert rec["gold"] == ex["answer"] and rec["question"] == ex["question"]
        assert isinstance(rec["greedy_response"], str)
        assert len(rec["sampled_responses"]) == rec["num_samples"] == 2
        assert 0 <= rec["n_correct"] <= 2
        assert rec["n_correct"] == sum(rec["sampled_correct"])


def test_deterministic_for_same_key(report5, model, tokenizer, examples):
    again = evaluate(model, tokenizer, examples[:5], jax.random.key(0), SETTINGS)
    assert again.records == report5.records
    assert again.metrics == report5.metrics
    other = evaluate(model, tokenizer, examples[:5], jax.random.key(1), SETTINGS)
    assert [r["greedy_response"] for r in other.records] == \
        [r["greedy_response"] for r in report5.records]  # greedy ignores the key
    assert [r["sampled_responses"] for r in other.records] != \
        [r["sampled_responses"] for r in report5.records]


def test_padding_rows_do_not_leak(report5, model, tokenizer, examples):
    """Question 4 sits alone in the padded last batch of a 5-question run, and next to a real
    question 5 in a 6-question run: same per-batch key, same row slots, same results."""
    widths = {encode_chat(tokenizer, [render_prompt(e) for e in exs], max_tokens=192).ids.shape
              [1] for exs in (examples[:5], examples[:6])}
    assert len(widths) == 1  # same compiled shapes in both runs
    six = evaluate(model, tokenizer, examples[:6], jax.random.key(0), SETTINGS)
    assert len(six.records) == 6
    assert six.records[:5] == report5.records


def test_progress_bar_and_greedy_only(model, tokenizer, examples, capsys):
    settings = EvalSettings(num_samples=0, max_new_tokens=8, batch_size=4)
    rep = evaluate(model, tokenizer, examples[:2], jax.random.key(0), settings, progress=True)
    assert "pass@1_greedy" in rep.metrics and "pass@1_sampled" not in rep.metrics
    assert "sampled_responses" not in rep.records[0]
    err = capsys.readouterr().err
    # the bar counts questions (2 of them, in one batch of 4 rows), per decoding mode
    assert "eval greedy" in err and "2/2" in err and "question" in err


def test_long_prompts_skipped_or_truncated(model, tokenizer, examples):
    long = {"id": "long", "question": "count " * 400 + "What is 1 + 1?", "answer": "2"}
    exs = [examples[0], long, examples[1]]
    rep = evaluate(model, tokenizer, exs, jax.random.key(0), SETTINGS)
    assert rep.metrics["skipped_long_prompts"] == 1
    assert rep.metrics["num_questions"] == 2
    assert [r["id"] for r in rep.records] == [examples[0]["id"], examples[1]["id"]]
    assert rep.skipped_ids == ["long"]

    trunc = dataclasses.replace(SETTINGS, on_long_prompt="truncate")
    rep = evaluate(model, tokenizer, exs, jax.random.key(0), trunc)
    assert rep.metrics["skipped_long_prompts"] == 0
    assert rep.metrics["truncated_long_prompts"] == 1
    assert rep.metrics["num_questions"] == 3
    assert [r["prompt_truncated"] for r in rep.records] == [False, True, False]


# ----------------------------------------------------------------------------- injected rewards


@pytest.mark.parametrize("reward, expected", [(lambda r, g, **kw: 1.0, 1.0),
                                              (lambda r, g, **kw: 0.0, 0.0)])
def test_all_or_nothing_rewards(model, tokenizer, examples, monkeypatch, reward, expected):
    monkeypatch.setitem(math_verifier.REWARD_FUNCTIONS, "test_fixed", reward)
    rep = evaluate(model, tokenizer, examples[:5], jax.random.key(0),
                   dataclasses.replace(SETTINGS, reward="test_fixed"))
    for name in ("pass@1_greedy", "pass@1_sampled", "pass@2"):
        assert rep.metrics[name] == expected
    assert all(r["greedy_correct"] == bool(expected) for r in rep.records)
    assert all(r["n_correct"] == 2 * expected for r in rep.records)


def test_reward_by_gold_threshold_and_errors(model, tokenizer, examples):
    first = examples[0]["answer"]
    assert len({e["answer"] for e in examples[:5]}) == 5

    def half_for_first(response, gold, **kw):
        return 0.5 if gold == first else 0.0

    def boom(response, gold, **kw):
        raise RuntimeError("verifier crashed")

    settings = dataclasses.replace(SETTINGS, reward=half_for_first, success_threshold=0.5)
    rep = evaluate(model, tokenizer, examples[:5], jax.random.key(0), settings)
    assert rep.metrics["pass@1_greedy"] == pytest.approx(0.2)
    assert rep.metrics["pass@1_sampled"] == pytest.approx(0.2)
    assert rep.metrics["pass@2"] == pytest.approx(0.2)
    assert rep.records[0]["greedy_reward"] == 0.5

    strict = evaluate(model, tokenizer, examples[:5], jax.random.key(0),
                      dataclasses.replace(settings, success_threshold=1.0))
    assert strict.metrics["pass@1_greedy"] == 0.0

    crashed = evaluate(model, tokenizer, examples[:5], jax.random.key(0),
                       dataclasses.replace(SETTINGS, reward=boom))
    assert crashed.metrics["reward_errors"] == 5 * 3  # 5 greedy + 10 sampled responses
    assert crashed.metrics["pass@1_greedy"] == 0.0


def test_math_verifier_end_to_end_with_scripted_generate(tokenizer, model, examples,
                                                         monkeypatch):
    """Replace the sampler: greedy answers correctly, the first sample of each question is
    correct, the second has no answer. Checks decoding (stop token dropped), the real math
    verifier, pass@k aggregation, padding and the length/no-answer metrics."""
    by_question = {e["question"]: e["answer"] for e in examples}
    eos = tokenizer.eos_token_id
    calls = []

    def fake_generate(model, ids, mask, key, config, *, stop_tokens=None, pad_id=None,
                      mesh=None):
        calls.append(ids.shape[0])
        n = config.max_new_tokens
        tokens = np.full((ids.shape[0], n), pad_id, np.int32)
        lengths = np.zeros(ids.shape[0], np.int32)
        for i in range(ids.shape[0]):
            prompt = tokenizer.decode(ids[i][mask[i] == 1].tolist())
            answer = next(a for q, a in by_question.items() if q in prompt)
            first_of_pair = i % 2 == 0
            text = (f"It is {answer}." if config.is_greedy else
                    f"Answer: {answer}" if first_of_pair else "no idea")
            row = tokenizer.encode(text, add_special_tokens=False)[:n - 1] + [eos]
            tokens[i, :len(row)] = row
            lengths[i] = len(row)
        mask_out = (np.arange(n)[None] < lengths[:, None]).astype(np.int32)
        return SampleOutput(tokens, mask_out, np.zeros((ids.shape[0], n), np.float32), lengths,
                            np.int32(n))

    monkeypatch.setattr(evaluation, "generate", fake_generate)
    settings = EvalSettings(num_samples=2, max_new_tokens=32, batch_size=4)
    rep = evaluate(model, tokenizer, examples[:5], jax.random.key(0), settings)
    assert set(calls) == {4}  # every call padded to the same row count
    assert rep.metrics["pass@1_greedy"] == 1.0
    assert rep.metrics["pass@1_sampled"] == 0.5
    assert rep.metrics["pass@2"] == 1.0
    assert rep.metrics["no_answer_frac"] == pytest.approx(5 / 15)
    assert rep.metrics["clipped_frac"] == 0.0
    assert rep.metrics["reward_errors"] == 0
    for rec, ex in zip(rep.records, examples):
        assert rec["greedy_response"] == f"It is {ex['answer']}."  # eos stripped
        assert rec["sampled_responses"] == [f"Answer: {ex['answer']}", "no idea"]
        assert rec["sampled_correct"] == [True, False]
        assert rec["greedy_finished"] and all(rec["sampled_finished"])
    lengths = [len(tokenizer.encode(t, add_special_tokens=False)) + 1
               for rec in rep.records
               for t in [rec["greedy_response"], *rec["sampled_responses"]]]
    assert rep.metrics["response_length_mean"] == pytest.approx(np.mean(lengths))


def test_empty_input(model, tokenizer):
    rep = evaluate(model, tokenizer, [], jax.random.key(0), SETTINGS)
    assert rep.records == [] and rep.metrics["num_questions"] == 0
    assert math.isnan(rep.metrics["pass@1_greedy"])


def test_batch_rows_fixed_and_mesh_divisible():
    from types import SimpleNamespace

    assert evaluation._batch_rows(64, 1, None) == (64, 64)
    assert evaluation._batch_rows(64, 4, None) == (16, 64)
    assert evaluation._batch_rows(10, 4, None) == (2, 8)
    assert evaluation._batch_rows(2, 4, None) == (1, 4)  # never fewer rows than one question
    mesh = SimpleNamespace(shape={"data": 4, "fsdp": 2, "tensor": 1})
    assert evaluation._batch_rows(10, 3, mesh) == (3, 16)  # rows padded to a multiple of 8

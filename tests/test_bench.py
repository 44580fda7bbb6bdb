"""AMR-SD's reflection levers in the trainer, the comparison / overhead benchmarks run end
to end on a tiny random model, the benchmarks' shared harness and the CLI's dispatch."""

import json
import sys
import types

import jax
import numpy as np
import pytest
from conftest import write_tiny_checkpoint  # also registers reward test_even_length

from amrsd_jax.bench import compare, harness
from amrsd_jax.cli import build_parser
from amrsd_jax.train.config import load_train_config
from amrsd_jax.train.phases import bucket_rows
from amrsd_jax.train.trainer import Trainer



@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt")))


TINY = ["rollout.prompts_per_step=4", "rollout.group_size=2", "rollout.max_new_tokens=6",
        "reflection.max_tokens=5", "data.train_size=16", "data.eval_size=3",
        "eval.num_samples=2", "eval.max_new_tokens=4", "eval.batch_size=8",
        "checkpoint.every=0", "checkpoint.save_at_end=false", "reward.name=test_even_length",
        "optimizer.learning_rate=1e-2", "progress=false", "tensorboard=false",
        "method_config.amr_sd.tau=0.0"]


def _trainer(checkpoint_dir, out, *extra):
    config = load_train_config(None, [*TINY, f"model.name={checkpoint_dir}",
                                      f"output_dir={out}", "method=amr_sd", *extra])
    return Trainer(config, log=lambda m: None)


def test_bucket_rows_sizes():
    for n in range(1, 17):
        rows = np.arange(n) * 3
        padded = bucket_rows(rows, 4, 16)
        assert len(padded) % 4 == 0 and n <= len(padded) <= 16
        assert len(padded) in (4, 8, 16)
        np.testing.assert_array_equal(padded[:n], rows)
        assert set(padded[n:]) <= {rows[0]}
    assert len(bucket_rows(np.arange(5), 4, 12)) == 8
    assert len(bucket_rows(np.arange(9), 4, 12)) == 12  # capped at the step's rows


def test_only_mixed_groups_are_reflected_and_scored(checkpoint_dir, tmp_path):
    """Rows of all-equal groups get no reflection and lp_T = lp_old (their advantage is 0,
    so the gate cannot change the update); rows of mixed groups get both."""
    trainer = _trainer(checkpoint_dir, tmp_path / "skip")
    seen_mixed = seen_equal = False
    for step in range(3):
        record = trainer.train_step(step)
        metrics, batch = record.metrics, record.batch
        rewards = np.asarray(batch.rewards).reshape(-1, 2)
        mixed = np.repeat(rewards.max(1) > rewards.min(1), 2)
        reflected = np.array([r is not None for r in record.reflections])
        np.testing.assert_array_equal(reflected, mixed)
        assert metrics["reflected_frac"] == pytest.approx(mixed.mean())
        lp_t = np.asarray(batch.teacher_logprobs)
        lp_old = np.asarray(batch.old_logprobs)
        np.testing.assert_array_equal(lp_t[~mixed], lp_old[~mixed])
        mask = np.asarray(batch.response_mask).astype(bool)
        if mixed.any():  # a different context changes the scores of reflected rows
            assert np.abs(lp_t - lp_old)[mixed & mask.any(1)].max() > 0
            correct = np.asarray(record.rollouts.verified.correct).astype(bool)
            sel = mask & (mixed & correct)[:, None]
            if sel.any():  # the hint-quality diagnostic is the mean gain of those tokens
                assert metrics["reflection_gain_correct"] == pytest.approx(
                    float((lp_t - lp_old)[sel].mean()), rel=1e-5)
        seen_mixed |= mixed.any()
        seen_equal |= (~mixed).any()
    trainer.close()
    assert seen_mixed and seen_equal  # both branches exercised


def test_follow_up_reflections_equal_generating_from_the_whole_conversation(checkpoint_dir,
                                                                            tmp_path):
    """reflection.request=follow_up prefills only the new user turn on the rollout's KV
    cache; the (greedy) reflections are those the policy writes when given the rollout's
    conversation plus that turn in full."""
    from flax import nnx

    from amrsd_jax.methods.amr_sd import reflection_request
    from amrsd_jax.rollout import SamplingConfig, generate
    from amrsd_jax.rollout.prompts import encode_follow_up
    from amrsd_jax.rollout.records import decode_responses

    trainer = _trainer(checkpoint_dir, tmp_path / "follow", "reflection.request=follow_up",
                       "reflection.temperature=0", "reflection.skip_uninformative=false",
                       "reflection.leak_guard=false")
    before = jax.tree.map(lambda x: x.copy(), trainer.state.params)
    record = trainer.train_step(0)
    tok, stop_ids = trainer.tokenizer, trainer.programs.stop_ids
    nnx.update(trainer.model, before)  # the policy that wrote the reflections
    batch = record.batch
    lengths = batch.response_mask.sum(1)
    requests = [reflection_request(record.rollouts, i, follow_up=True)
                for i in range(record.rollouts.num_rows)]
    ended = np.array([n > 0 and r[n - 1] in stop_ids
                      for r, n in zip(batch.response_ids, lengths)])
    tail = encode_follow_up(tok, requests, ended, stop_ids, max_tokens=10_000)
    rows = [np.concatenate([p[m == 1], r[:n], t[tm == 1]]) for p, m, r, n, t, tm in zip(
        batch.prompt_ids, batch.prompt_mask, batch.response_ids, lengths,
        tail.ids, tail.mask)]
    width = max(map(len, rows))
    ids = np.zeros((len(rows), width), np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for b, r in enumerate(rows):
        ids[b, width - len(r):], mask[b, width - len(r):] = r, 1
    ref = generate(trainer.model, ids, mask, jax.random.key(0),
                   SamplingConfig(max_new_tokens=5, greedy=True), stop_tokens=stop_ids,
                   pad_id=trainer.programs.pad_id)
    expected = decode_responses(tok, np.asarray(ref.tokens), np.asarray(ref.lengths))
    assert record.reflections == expected
    assert any(expected)
    trainer.close()


def test_all_rows_when_the_lever_is_off_and_none_once_annealed(checkpoint_dir, tmp_path):
    trainer = _trainer(checkpoint_dir, tmp_path / "all", "reflection.skip_uninformative=false")
    record = trainer.train_step(0)
    assert record.metrics["reflected_frac"] == 1.0
    assert all(r is not None for r in record.reflections)
    trainer.close()
    # T_decay = 1: from optimizer step 1 on the gate is exactly 0, so nothing is reflected
    trainer = _trainer(checkpoint_dir, tmp_path / "annealed",
                       "method_config.amr_sd.decay_steps=1")
    trainer.train_step(0)
    record = trainer.train_step(1)
    metrics = record.metrics
    assert metrics["reflected_frac"] == 0.0 and "reflection_length_mean" not in metrics
    np.testing.assert_array_equal(np.asarray(record.batch.teacher_logprobs),
                                  np.asarray(record.batch.old_logprobs))
    trainer.close()


def test_raw_peer_ablation_uses_the_peer_verbatim(checkpoint_dir, tmp_path):
    trainer = _trainer(checkpoint_dir, tmp_path / "peer", "reflection.source=raw_peer",
                       "reflection.skip_uninformative=false")
    seen = False
    for step in range(3):
        record = trainer.train_step(step)
        metrics = record.metrics
        correct = np.asarray(record.rollouts.verified.correct).reshape(-1, 2)
        # with G=2, a row has a peer exactly when the other rollout of its group is correct
        has_peer = correct[:, ::-1].reshape(-1)
        assert metrics["reflected_frac"] == pytest.approx(has_peer.mean())
        assert "reflection_length_mean" not in metrics  # no reflection is generated
        seen |= has_peer.any()
    trainer.close()
    assert seen


def _args(argv):
    return build_parser().parse_args(argv)


def test_compare_runs_reports_and_reuses(checkpoint_dir, tmp_path, monkeypatch):
    out = tmp_path / "cmp"
    argv = ["bench", "compare", "--config", "", "--variants", "grpo,amr_sd/symmetric",
            "--seeds", "0,1", "--out", str(out), *TINY, f"model.name={checkpoint_dir}",
            "steps=1", "eval.every=1"]
    assert compare.main(_args(argv)) == 0
    result = json.loads((out / "compare.json").read_text())
    assert set(result["summary"]) == {"grpo", "amr_sd/symmetric"} and not result["missing"]
    for variant, row in result["summary"].items():
        assert row["seeds"] == [0, 1]
        assert 0.0 <= row["final_pass@1_mean"] <= 1.0
        for seed in ("0", "1"):
            run = result["runs"][variant][seed]
            assert [r["step"] for r in run["train"]] == [1]
            assert [r["step"] for r in run["eval"]] == [0, 1]
    # step 0 is evaluated once per seed (its first variant) and shared
    cfg = json.loads((out / "runs" / "amr_sd-symmetric-seed0" / "done.json").read_text())
    assert cfg["config"]["eval"]["at_start"] is False
    assert cfg["config"]["method_config"]["amr_sd"]["gam"] == 0.2  # gam = lam
    for seed in ("0", "1"):
        assert result["runs"]["grpo"][seed]["eval"][0] == \
            result["runs"]["amr_sd/symmetric"][seed]["eval"][0]
    assert "gated_frac_mean" in result["summary"]["amr_sd/symmetric"]
    assert (out / "compare.png").stat().st_size > 10_000
    assert (out / "compare_diagnostics.png").stat().st_size > 10_000  # the AMR-SD variant's
    # the paired difference against GRPO is taken question by question on the same held-out
    # questions, so its mean is the difference of the two runs' final pass@1
    paired = result["summary"]["amr_sd/symmetric"]["paired"]
    for kind, key in (("sampled", "pass@1_sampled"), ("greedy", "pass@1_greedy")):
        assert [r["seed"] for r in paired[kind]["per_seed"]] == [0, 1]
        for r in paired[kind]["per_seed"]:
            runs = result["runs"]
            expected = (runs["amr_sd/symmetric"][str(r["seed"])]["eval"][-1][key]
                        - runs["grpo"][str(r["seed"])]["eval"][-1][key])
            assert r["diff"] == pytest.approx(expected, abs=1e-9)
            assert r["questions"] == runs["grpo"][str(r["seed"])]["eval"][-1]["num_questions"]
    assert "paired" not in result["summary"]["grpo"]
    table, paired_md = (out / "compare.md").read_text().split("\n\n")
    assert table.count("\n") == 3 and "amr_sd/symmetric" in table
    assert "amr_sd/symmetric" in paired_md and "grpo |" not in paired_md

    # finished runs are reused: a second call trains nothing
    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare, "train", fail)
    assert compare.main(_args(argv)) == 0


def test_paired_differences_and_their_standard_errors():
    """Per seed: mean and SE over questions of the per-question difference (only questions
    both runs evaluated); over seeds: mean and SE of the per-seed differences."""
    def run(n_correct, greedy, ids=None):
        ids = ids or [f"q{i}" for i in range(len(n_correct))]
        return {"final_outcomes": {"id": ids, "n_correct": n_correct, "greedy_correct": greedy,
                                   "num_samples": [2] * len(n_correct)}}

    runs = {"grpo": {0: run([0, 1, 2, 0], [0, 1, 1, 0]), 1: run([0, 0, 0, 0], [0, 0, 0, 0])},
            "x": {0: run([2, 1, 0, 2], [1, 1, 1, 0]),
                  1: run([2, 2, 0, 1, 9], [1, 0, 0, 0, 1], ["q0", "q1", "q2", "q3", "extra"])}}
    paired = compare.paired_against(runs, "x")
    d0 = np.array([1.0, 0.0, -1.0, 1.0])  # (n_x - n_grpo) / 2 per question, seed 0
    d1 = np.array([1.0, 1.0, 0.0, 0.5])  # seed 1; "extra" was not evaluated by grpo
    s0, s1 = paired["sampled"]["per_seed"]
    assert (s0["questions"], s1["questions"]) == (4, 4)
    assert s0["diff"] == pytest.approx(d0.mean()) and s1["diff"] == pytest.approx(d1.mean())
    assert s0["se"] == pytest.approx(d0.std(ddof=1) / 2)
    assert paired["sampled"]["mean"] == pytest.approx((d0.mean() + d1.mean()) / 2)
    assert paired["sampled"]["se"] == pytest.approx(
        np.std([d0.mean(), d1.mean()], ddof=1) / np.sqrt(2))
    assert paired["greedy"]["per_seed"][0]["diff"] == pytest.approx(0.25)
    assert compare.paired_against({"x": runs["x"]}, "x") is None  # no baseline runs


def test_expand_variants():
    assert compare.expand_variants("main") == list(compare.MAIN)
    assert compare.expand_variants("grpo,ablations")[:2] == ["grpo", "amr_sd/tau=0.25"]
    with pytest.raises(SystemExit, match="unknown variant"):
        compare.expand_variants("grpo2")


def test_overhead_bench_runs(checkpoint_dir, tmp_path):
    from amrsd_jax.bench import overhead

    out = tmp_path / "overhead.json"
    argv = ["bench", "overhead", "--config", "", "--steps", "2", "--warmup", "1",
            "--out", str(out), *TINY, f"model.name={checkpoint_dir}"]
    assert overhead.main(_args(argv)) == 0
    rows = json.loads(out.read_text())["variants"]
    assert set(rows) == {"grpo", "amr_sd/all_rows", "amr_sd/skip", "amr_sd/skip+short",
                         "amr_sd/skip+short+follow_up"}
    assert rows["grpo"]["reflect"] < 0.01  # GRPO's teacher phase does nothing
    assert rows["amr_sd/all_rows"]["reflected_frac"] == 1.0
    assert rows["amr_sd/all_rows"]["reflect"] > 0
    for row in rows.values():
        assert len(row["per_step"]) == 2 and row["step"] > 0
        # the ratio is this variant's median step over GRPO's, from the same run
        assert row["ratio_vs_grpo"] == pytest.approx(row["step"] / rows["grpo"]["step"])


def test_compare_skips_a_run_another_live_process_holds(tmp_path, monkeypatch):
    import os

    def fail(*a, **k):
        raise AssertionError("trained a run another process holds")

    monkeypatch.setattr(compare, "train", fail)
    directory = compare.run_dir(tmp_path, "grpo", 0)
    directory.mkdir(parents=True)
    (directory / "running.pid").write_text(str(os.getppid()))  # a live process, not us
    assert compare.run_one("", "grpo", 0, tmp_path, []) is None
    assert (directory / "running.pid").exists()


# ----------------------------------------------------------------------------- harness
def test_time_runs_warms_up_then_times_each_run():
    calls = []
    timing = harness.time_runs(lambda: calls.append(1), 3)
    assert len(calls) == 4 and len(timing.runs_s) == 3  # one warm-up + 3 timed
    assert timing.first_s >= 0 and all(t >= 0 for t in timing.runs_s)
    fixed = harness.Timing(5.0, [3.0, 1.0, 2.0])
    assert fixed.median_s == 2.0
    assert fixed.to_dict() == {"first_run_s": 5.0, "runs_s": [3.0, 1.0, 2.0], "median_s": 2.0}


def test_format_table_pads_columns():
    text = harness.format_table([("phase", "s"), ("a long phase", "1.25"), ("b", "")])
    assert text.splitlines() == ["phase         s", "a long phase  1.25", "b"]


def test_write_results_records_the_machine(tmp_path, capsys):
    path = harness.write_results({"x": 1}, tmp_path / "new_dir" / "r.json")
    data = json.loads(path.read_text())
    assert data["x"] == 1
    assert set(data["machine"]) == {"cpus", "platform", "jax", "flax", "backend"}
    assert f"wrote {path}" in capsys.readouterr().out


def test_matmul_peak_is_positive():
    assert harness.measure_matmul_gflops(32, 32, 32, repeats=2) > 0


@pytest.mark.parametrize("argv, module", [
    (["bench", "generate"], "amrsd_jax.bench.generate"),
    (["bench", "step"], "amrsd_jax.bench.step"),
    (["bench", "compare"], "amrsd_jax.bench.compare"),
    (["bench", "overhead"], "amrsd_jax.bench.overhead"),
    (["bench", "scale"], "amrsd_jax.bench.scale"),
    (["bench", "ttsd"], "amrsd_jax.bench.ttsd"),
    (["bench", "verifier"], "amrsd_jax.bench.verifier"),
    (["ttsd", "--question", "q", "--answer", "1"], "amrsd_jax.ttsd"),
])
def test_cli_dispatches_to_the_module_main(argv, module, monkeypatch):
    """Each of these subcommands runs ``<module>.main(args)``, importing it only then."""
    fake = types.SimpleNamespace(main=lambda args: (module, args))
    monkeypatch.setitem(sys.modules, module, fake)
    args = _args(argv)
    assert args.func(args) == (module, args)

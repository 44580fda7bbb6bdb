"""End to end: every method trains on a tiny random checkpoint, checkpoints, and resumes to
exactly the metrics of an uninterrupted run."""

import json
import shutil

import jax
import numpy as np
import pytest

from conftest import library_methods, write_tiny_checkpoint  # also registers reward test_even_length

from amrsd_jax.train.config import load_train_config
from amrsd_jax.train.metrics import read_metrics
from amrsd_jax.train.trainer import Trainer





@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_ckpt")))


def _config(checkpoint_dir, out, method, steps, **extra):
    overrides = [f"method={method}", f"model.name={checkpoint_dir}", f"steps={steps}",
                 "rollout.prompts_per_step=2", "rollout.group_size=4",
                 "rollout.max_new_tokens=6", "reflection.max_tokens=6",
                 "data.train_size=16", "data.eval_size=3", "eval.at_start=false",
                 "eval.at_end=false", "eval.num_samples=2", "eval.max_new_tokens=4",
                 "eval.batch_size=8", "checkpoint.every=2", "checkpoint.async_save=true",
                 "reward.name=test_even_length", f"output_dir={out}",
                 "optimizer.learning_rate=1e-2", "progress=false", "tensorboard=true"]
    if method == "amr_sd":  # a live gate: tiny model, tiny CIG
        overrides.append("method_config.amr_sd.tau=0.0")
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_train_config(None, overrides)


def _comparable(record):
    # a resumed process compiles its programs again: compile counts are not run state
    return {k: v for k, v in record.items() if not k.startswith("time/")
            and k not in ("tokens_per_second", "compiles")}


@pytest.mark.parametrize("method", library_methods())
def test_train_checkpoint_resume_identical(method, checkpoint_dir, tmp_path):
    # uninterrupted: 3 steps, checkpoints after steps 2 and 3
    full = Trainer(_config(checkpoint_dir, tmp_path / "full", method, 3))
    summary = full.run()
    full.close()
    assert full.checkpointer.all_steps() == [2, 3]
    history = read_metrics(tmp_path / "full" / "metrics.jsonl")
    assert [r["step"] for r in history] == [1, 2, 3]
    assert summary["history"][-1]["step"] == 3
    for key in ("reward_mean", "accuracy", "grad_norm", "loss", "zero_variance_group_frac",
                "clipped_mean", "time/generate", "time/score", "time/update"):
        assert all(np.isfinite(r[key]) for r in history), key
    if method == "amr_sd":
        assert "time/reflect" in history[0] and "reflection_length_mean" in history[0]
        assert "amr_sd/gated_frac" in history[0]
        # the host's quantiles of Ihat: -kappa <= q05 <= ... <= q95 <= kappa on every step
        for r in history:
            q = [r[f"amr_sd/ihat_q{p:02d}"] for p in (5, 25, 50, 75, 95)]
            assert -5.0 <= q[0] and q == sorted(q) and q[-1] <= 5.0, q
    assert (tmp_path / "full" / "tensorboard").is_dir()
    assert json.loads((tmp_path / "full" / "config.json").read_text())["method"] == method

    # the same run killed after step 2's checkpoint: its directory without checkpoint 3
    # (and with the step-3 log line the killed run had written), resumed to step 3
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoints" / "3")
    resumed = Trainer(_config(checkpoint_dir, part, method, 3), resume=True)
    assert resumed.start_step == 2
    resumed.run()
    resumed.close()
    records = read_metrics(part / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert _comparable(records[2]) == _comparable(history[2])
    for a, b in zip(jax.tree.leaves(full.state.params), jax.tree.leaves(resumed.state.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    if resumed.teacher_params is not None:
        for a, b in zip(jax.tree.leaves(full.teacher_params),
                        jax.tree.leaves(resumed.teacher_params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_resume_drops_log_lines_after_the_checkpoint(checkpoint_dir, tmp_path):
    """A run killed after logging step 3 but before its next checkpoint: the resumed log
    reads like one uninterrupted run."""
    logged = {"logging.completions_every": 1}  # the rollouts' text follows the same rule
    run = Trainer(_config(checkpoint_dir, tmp_path, "grpo", 2, **logged))
    run.run()
    run.close()
    with pytest.raises(FileExistsError, match="pass --resume to continue it"):
        Trainer(_config(checkpoint_dir, tmp_path, "grpo", 3))  # a new run would mix logs
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "kind": "train", "reward_mean": 0.5}) + "\n")
        f.write('{"step": 4, "kind": "tra')  # a line cut by the kill
    with open(tmp_path / "completions.jsonl", "a") as f:
        f.write(json.dumps({"step": 3, "kind": "completion", "completion": "killed"}) + "\n")
    resumed = Trainer(_config(checkpoint_dir, tmp_path, "grpo", 3, **logged), resume=True)
    resumed.run()
    resumed.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    assert "grad_norm" in records[2]  # the re-run step 3, not the killed run's line
    # logging.completions_every=1: every rollout of every step, once, with its verdict
    rows = read_metrics(tmp_path / "completions.jsonl", kind="completion")
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8 + [3] * 8
    assert all(r["completion"] != "killed" for r in rows)
    assert [r["group"] for r in rows[:8]] == [0] * 4 + [1] * 4
    for r in rows:
        assert r["prompt"] and r["gold"] and r["feedback"] in ("correct", "wrong value")
        assert r["reward"] == float(r["correct"]) == float(len(r["completion"]) % 2 == 0)


def test_eval_and_summary(checkpoint_dir, tmp_path, monkeypatch, capsys):
    """Evaluations with per-question outcomes and a progress bar of their own; the profiler
    window and the compilation cache directory of the config reach JAX."""
    import amrsd_jax.train.trainer as trainer_module

    cache_dirs = []
    monkeypatch.setattr(trainer_module, "use_compilation_cache", cache_dirs.append)
    cfg = _config(checkpoint_dir, tmp_path, "grpo", 2, **{
        "eval.at_start": "true", "eval.at_end": "true", "logging.profile_steps": "[2,2]",
        "compile_cache_dir": str(tmp_path / "xla"), "progress": "true"})
    trainer = Trainer(cfg)
    summary = trainer.run()
    trainer.close()
    bars = capsys.readouterr().err
    assert "train grpo" in bars
    # each evaluation (at the start and at the end) shows its own bar over the questions
    assert bars.count("eval greedy") >= 2 and bars.count("eval sampled") >= 2, bars
    assert cache_dirs == [str(tmp_path / "xla")]
    traces = list((tmp_path / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 1000  # one window, one trace
    evals = read_metrics(tmp_path / "metrics.jsonl", kind="eval")
    assert [r["step"] for r in evals] == [0, 2]
    outcomes = read_metrics(tmp_path / "eval_outcomes.jsonl", kind="eval_outcomes")
    assert [r["step"] for r in outcomes] == [0, 2]
    for r, o in zip(evals, outcomes):
        assert 0.0 <= r["pass@1_greedy"] <= 1.0 and 0.0 <= r["pass@2"] <= 1.0
        assert r["num_questions"] == 3 and len(o["id"]) == len(set(o["id"])) == 3
        # the per-question outcomes are what the aggregate metrics were computed from
        assert np.mean(o["greedy_correct"]) == pytest.approx(r["pass@1_greedy"])
        assert np.mean(np.divide(o["n_correct"], o["num_samples"])) == \
            pytest.approx(r["pass@1_sampled"])
    assert summary["eval"]["num_questions"] == 3

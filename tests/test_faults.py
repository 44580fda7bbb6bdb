"""Fault injection: rewards that raise/hang/return garbage, non-finite steps, SIGTERM and
SIGKILL at random points, long prompts. Tiny random checkpoints; a few minutes in all."""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import write_tiny_checkpoint, xla_flags

from amrsd_jax.rewards import VerifierResult, register_reward
from amrsd_jax.rollout import records as rollouts
from amrsd_jax.train import phases
from amrsd_jax.train.checkpoint import RunCheckpointer, abstract_like
from amrsd_jax.train.config import load_train_config
from amrsd_jax.train.metrics import read_metrics
from amrsd_jax.train.trainer import Trainer, TrainingStopped

ROOT = Path(__file__).resolve().parents[1]


def _even(response, gold, **kw):
    ok = len(response) % 2 == 0
    return VerifierResult(float(ok), ok, None, None, "correct" if ok else "wrong value")


register_reward("fault_even", overwrite=True)(_even)


@register_reward("fault_flaky", overwrite=True)
def flaky(response, gold, **kw):
    """Row-dependent faults: raise, hang, NaN, out of range, wrong type, or a real reward."""
    kind = len(response) % 6
    if kind == 0:
        raise RuntimeError("verifier crashed")
    if kind == 1:
        time.sleep(3.0)  # hangs past the wall timeout
    if kind == 2:
        return float("nan")
    if kind == 3:
        return 7.5
    if kind == 4:
        return "garbage"
    return _even(response, gold)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(write_tiny_checkpoint(tmp_path_factory.mktemp("fault_ckpt")))


def _overrides(ckpt, out, steps, method="grpo", reward="fault_even"):
    return [f"method={method}", f"model.name={ckpt}", f"steps={steps}",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=6",
            "reflection.max_tokens=6", "data.train_size=16", "data.eval_size=2",
            "eval.at_start=false", "eval.at_end=false", "checkpoint.every=1",
            f"reward.name={reward}", f"output_dir={out}", "optimizer.learning_rate=1e-2",
            "progress=false", "tensorboard=false"]


def _config(ckpt, out, steps, *extra, **kw):
    return load_train_config(None, _overrides(ckpt, out, steps, **kw) + list(extra))


# ----------------------------------------------------------------------------- rewards
def test_faulty_rewards_give_zero_and_are_counted(ckpt, tmp_path):
    trainer = Trainer(_config(ckpt, tmp_path, 1, "reward.wall_timeout_s=0.5",
                              reward="fault_flaky"))
    t0 = time.perf_counter()
    record = trainer.train_step(0)
    metrics = record.metrics
    trainer.close()
    texts = record.rollouts.texts
    expected_errors = sum(len(t) % 6 in (0, 1, 2, 3, 4) for t in texts)
    assert metrics["reward_errors"] == expected_errors > 0
    assert trainer.counters.reward_errors == expected_errors
    assert np.isfinite(metrics["loss"]) and metrics["update_skipped"] == 0
    hangs = sum(len(t) % 6 == 1 for t in texts)
    assert time.perf_counter() - t0 < 60 + 0.5 * hangs  # hangs are cut at 0.5 s each


def test_hanging_reward_is_cut_at_the_wall_timeout():
    from amrsd_jax.rewards import score_batch

    def hangs_on_b(response, gold, **kw):
        if response == "b":
            time.sleep(3.0)
        return 1.0

    t0 = time.perf_counter()
    results, errors = score_batch(hangs_on_b, ["a", "b", "c"], ["1", "1", "1"],
                                  wall_timeout_s=0.2)
    assert time.perf_counter() - t0 < 1.5
    assert errors == 1 and "timeout" in results[1].error and results[1].reward == 0.0
    assert [r.reward for r in (results[0], results[2])] == [1.0, 1.0]


def test_drop_group_policy():
    results = [VerifierResult(1.0, True, None, None, ""),
               VerifierResult(0.0, False, None, None, "", error="boom"),
               VerifierResult(1.0, True, None, None, ""),
               VerifierResult(0.0, False, None, None, "")]
    verified = rollouts.Verified(results, np.array([1, 0, 1, 0], np.float32),
                                 np.array([True, False, True, False]), 1)
    mask = np.ones((4, 3), np.int32)
    rewards, new_mask, dropped = rollouts.drop_failed_groups(verified, mask, 2)
    assert dropped == 1
    np.testing.assert_array_equal(rewards, [0, 0, 1, 0])
    np.testing.assert_array_equal(new_mask.sum(1), [0, 0, 3, 3])


# ----------------------------------------------------------------------------- non-finite steps
def test_consecutive_nonfinite_steps_stop_the_run(ckpt, tmp_path, monkeypatch):
    real_verify = rollouts.verify
    calls = []

    def poisoned(*args, **kwargs):
        out = real_verify(*args, **kwargs)
        calls.append(1)
        if len(calls) >= 2:  # from step 2 on the rewards are NaN -> non-finite gradients
            out = rollouts.Verified(out.results, np.full_like(out.rewards, np.nan),
                                    out.correct, out.errors)
        return out

    monkeypatch.setattr(phases, "verify", poisoned)
    trainer = Trainer(_config(ckpt, tmp_path, 6, "max_consecutive_skips=2"))
    with pytest.raises(TrainingStopped, match="2 consecutive steps had non-finite"):
        trainer.run()
    good = jax.tree.map(np.asarray, trainer.state.params)  # skipped steps leave params alone
    trainer.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["update_skipped"] for r in records] == [0, 1, 1]
    # the checkpoints hold finite, last-good parameters; the stopping step wrote none
    with RunCheckpointer(tmp_path / "checkpoints", read_only=True) as ck:
        assert ck.all_steps()[-1] == 2
        restored = ck.restore(2, abstract_train_state=abstract_like(
            trainer.state, trainer.programs.state_sharding))
    for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(restored.train_state.params)):
        assert np.all(np.isfinite(np.asarray(b)))
        np.testing.assert_array_equal(a, np.asarray(b))


# ----------------------------------------------------------------------------- long prompts
@pytest.mark.parametrize("policy", ["skip", "truncate"])
def test_long_prompts_skipped_or_truncated_and_counted(ckpt, tmp_path, policy):
    examples = [{"id": str(i), "question": q, "answer": "1", "solution": None}
                for i, q in enumerate(["1 + 0?", "word " * 200, "0 + 1?"])]
    trainer = Trainer(_config(ckpt, tmp_path, 1, "data.max_prompt_tokens=64",
                              f"data.on_long_prompt={policy}"),
                      train_examples=examples, eval_examples=[])
    data = trainer.train_data
    if policy == "skip":
        assert data.skipped_long == 1 and [e["id"] for e in data.examples] == ["0", "2"]
    else:
        assert data.truncated_long == 1 and len(data.examples) == 3
        assert max(len(t) for t in data.prompt_tokens) == 64
        # the generation prompt survives truncation (the last tokens are kept)
        tail = trainer.tokenizer.decode(data.prompt_tokens[1][-8:].tolist())
        assert "assistant" in tail
    assert getattr(trainer.counters,
                   f"{'skipped' if policy == 'skip' else 'truncated'}_long_prompts") == 1
    trainer.close()


# ----------------------------------------------------------------------------- processes
_SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {tests!r})
    import test_faults  # registers the test rewards
    from amrsd_jax.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def _launch(tmp_path, args):
    script = tmp_path / "train_script.py"
    script.write_text(_SCRIPT.format(tests=str(ROOT / "tests")))
    env = dict(os.environ, XLA_FLAGS=xla_flags(8),
               JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    empty = tmp_path / "defaults.yaml"  # TrainConfig defaults, like the in-process runs
    empty.write_text("{}\n")
    return subprocess.Popen([sys.executable, str(script), "train", "--config", str(empty),
                             *args], cwd=str(ROOT),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _logged_steps(path: Path) -> list[int]:
    """Steps in the run's metrics file; [] while there is none. A resumed run that finds
    no finished checkpoint (killed before its first save completed) starts over and moves
    the old file aside, so the file can vanish between two looks."""
    try:
        return [r["step"] for r in read_metrics(path)]
    except FileNotFoundError:
        return []


def _wait_for_step(path: Path, step: int, proc, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in _logged_steps(path)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited early:\n{proc.stdout.read()}")
        time.sleep(0.2)
    raise AssertionError("timed out waiting for the run")


def test_sigterm_writes_a_final_checkpoint_and_exits_143(ckpt, tmp_path):
    """A scheduler can tell "stopped" (128 + SIGTERM) from "done" (0)."""
    out = tmp_path / "run"
    proc = _launch(tmp_path, _overrides(ckpt, out, 50) + ["checkpoint.every=100"])
    _wait_for_step(out / "metrics.jsonl", 1, proc)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, log
    last = read_metrics(out / "metrics.jsonl")[-1]["step"]
    assert f"stopped at step {last} of 50 on SIGTERM" in log and "--resume" in log, log
    assert "reward mean" not in log  # no "complete" summary
    with RunCheckpointer(out / "checkpoints", read_only=True) as ck:
        assert ck.latest_step() == last < 50


def test_ctrl_c_saves_exits_130_and_resume_loses_no_logged_step(ckpt, tmp_path):
    """SIGINT mid-run: the step finishes, is logged and checkpointed, exit 130 without a
    traceback; --resume continues after the last logged step, keeping every line."""
    out = tmp_path / "run"
    proc = _launch(tmp_path, _overrides(ckpt, out, 50) + ["checkpoint.every=100"])
    _wait_for_step(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGINT)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    before = read_metrics(out / "metrics.jsonl")
    last = before[-1]["step"]
    assert f"stopped at step {last} of 50 on SIGINT" in log, log
    with RunCheckpointer(out / "checkpoints", read_only=True) as ck:
        assert ck.latest_step() == last  # the checkpoint is at the last logged step

    lines = []
    resumed = Trainer(_config(ckpt, out, 50, "checkpoint.every=100"), resume=True,
                      log=lines.append)
    resumed.close()
    assert resumed.start_step == last, lines  # continues right after the last logged step
    assert not [line for line in lines if "changed" in line], lines  # same config, by value
    assert read_metrics(out / "metrics.jsonl") == before  # every logged line kept
    assert [r["step"] for r in before] == list(range(1, last + 1))


def test_a_second_stop_signal_exits_at_once():
    """The first Ctrl-C asks for a save; the second one interrupts right away (the CLI
    prints one line and exits 130); a second SIGTERM exits 143."""
    for signum, raised in ((signal.SIGINT, KeyboardInterrupt), (signal.SIGTERM, SystemExit)):
        lines = []
        trainer = types.SimpleNamespace(stop_signal=None, log=lines.append)
        Trainer._on_stop_signal(trainer, signum, None)
        assert trainer.stop_signal == signum and "writing a checkpoint" in lines[0]
        with pytest.raises(raised) as info:
            Trainer._on_stop_signal(trainer, signum, None)
        assert "exiting now" in lines[1]
        if raised is SystemExit:
            assert info.value.code == 143


# ----------------------------------------------------------------------------- damaged runs
def _damage(step_dir: Path) -> None:
    """Cut every array data file of a committed step to a few bytes (a disk that filled up
    after the commit, a bad copy)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        with open(p, "r+b") as f:
            f.truncate(8)


def test_damaged_latest_checkpoint_resumes_from_the_previous_step(ckpt, tmp_path):
    trainer = Trainer(_config(ckpt, tmp_path, 2))  # checkpoints of the initial state: no compile
    trainer.save(1)
    trainer.save(2)
    trainer.close()
    _damage(tmp_path / "checkpoints" / "2")
    lines = []
    trainer = Trainer(_config(ckpt, tmp_path, 2), resume=True, log=lines.append)
    assert trainer.start_step == 1
    said = [line for line in lines if line.startswith("checkpoint step")]
    assert len(said) == 1 and "step 2 damaged" in said[0] \
        and "step 1 is intact, resuming from 1" in said[0], lines
    assert all("\n" not in line and len(line) < 400 for line in lines)
    # moved aside, not deleted, so the run can save step 2 again
    assert [p.name.split("-")[0] for p in (tmp_path / "checkpoints").iterdir()
            if p.name.startswith("2.")] == ["2.damaged"]
    trainer.save(2)
    trainer.close()
    with RunCheckpointer(tmp_path / "checkpoints", read_only=True) as ck:
        assert ck.all_steps() == [1, 2]


def test_resume_without_checkpoint_keeps_the_earlier_metrics(ckpt, tmp_path):
    earlier = '{"step": 1, "kind": "train", "reward_mean": 0.5}\n'
    (tmp_path / "metrics.jsonl").write_text(earlier)
    lines = []
    trainer = Trainer(_config(ckpt, tmp_path, 1), resume=True, log=lines.append)
    trainer.close()
    kept = [p for p in tmp_path.glob("metrics.*.jsonl")]
    assert len(kept) == 1 and kept[0].read_text() == earlier
    assert any(str(kept[0]) in line for line in lines), lines


def test_resuming_a_finished_run_adds_no_eval_line(ckpt, tmp_path, monkeypatch):
    cfg = _config(ckpt, tmp_path, 2, "eval.at_end=true")
    trainer = Trainer(cfg)
    trainer.save(2)  # the final checkpoint comes after the final eval
    trainer.close()
    evaluated = []
    monkeypatch.setattr(Trainer, "evaluate", lambda self, step, **kw: evaluated.append(step))
    trainer = Trainer(cfg, resume=True)
    summary = trainer.run()
    trainer.close()
    assert summary["history"] == [] and evaluated == []


def test_sigkill_at_random_points_resumes_identically(ckpt, tmp_path):
    """Kill -9 during generation, update or an async save; resume; the metrics of every
    step equal an uninterrupted run's."""
    steps = 4
    reference = Trainer(_config(ckpt, tmp_path / "ref", steps))
    reference.run()
    reference.close()
    expected = {r["step"]: r for r in read_metrics(tmp_path / "ref" / "metrics.jsonl")}
    # how long one compiled step takes on this machine: a kill lands within the next step or
    # its save, whatever the machine's speed (a fixed 1.5 s let a fast machine log two more
    # steps before the kill, and the run ended with one kill instead of two)
    step_s = float(np.median([expected[s]["time/step"] for s in range(2, steps + 1)]))

    rng = random.Random(int(os.environ.get("AMRSD_FAULT_SEED", "0")))
    out = tmp_path / "killed"
    kills = 0
    while True:
        proc = _launch(tmp_path, _overrides(ckpt, out, steps) + ["--resume"])
        done = _logged_steps(out / "metrics.jsonl")
        target = (done[-1] if done else 0) + 1
        if kills < 2 and target < steps:
            _wait_for_step(out / "metrics.jsonl", target, proc)
            time.sleep(rng.uniform(0.0, step_s))  # somewhere in the next step or its save
            proc.kill()
            proc.communicate()
            kills += 1
            continue
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, log
        break
    assert kills == 2
    got = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, steps + 1))
    for r in got:
        want = expected[r["step"]]
        # a resumed process compiles again: compile counts are not run state
        same = {k: v for k, v in r.items() if not k.startswith("time/")
                and k not in ("tokens_per_second", "compiles")}
        assert same == {k: want[k] for k in same}, r["step"]
    with RunCheckpointer(out / "checkpoints", read_only=True) as ck:
        assert ck.latest_step() == steps

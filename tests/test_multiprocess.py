"""A pod without a pod: real multi-process JAX jobs (2 processes x 4 CPU devices, joined
through ``jax.distributed``) run ``run.py train`` and must log what one process with 8
devices logs over the same ``data=2 x fsdp=4`` mesh, for every method family that takes a
different path through the loop (GRPO; AMR-SD with its reflection pass forced on; SDPO's
teacher context and EMA teacher weights), resume a stopped run as if it never stopped, and
evaluate to the same pass@1.

Each launch runs all its jobs in one interpreter per process (start-up and the
persistent compilation cache are shared), so the whole module takes a few minutes.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import write_tiny_checkpoint, xla_flags

ROOT = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, {tests!r})
    import conftest  # registers the test rewards
    import jax
    from amrsd_jax.cli import main
    from amrsd_jax.distributed import maybe_initialize_distributed

    maybe_initialize_distributed()
    jax.config.update("jax_compilation_cache_dir", {cache!r})
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    for argv in json.loads(sys.argv[1]):
        rc = main(argv)
        if rc:
            sys.exit(rc)
    if jax.process_count() > 1:
        jax.distributed.shutdown()
""")

COMMON = ["steps=2", "rollout.prompts_per_step=4", "rollout.group_size=4",
          "rollout.max_new_tokens=6", "reflection.max_tokens=6", "data.train_size=16",
          "data.eval_size=8", "eval.at_start=false", "eval.num_samples=2",
          "reward.name=test_even_length",
          "optimizer.learning_rate=1e-2", "progress=false", "tensorboard=false",
          "mesh.data=2", "mesh.fsdp=4"]
# Evaluation and checkpoints (multi-process saves and the resume) are checked on the GRPO
# run only: the same code for every method. RLSD's path (a teacher context scored by the
# teacher scorer, teacher weights in the state) is the union of AMR-SD's and SDPO's.
NO_EVAL_OR_CHECKPOINTS = ["eval.at_end=false", "checkpoint.every=0",
                          "checkpoint.save_at_end=false"]
METHODS = {"grpo": ["eval.at_end=true", "checkpoint.every=1"],
           "amr_sd": ["reflection.skip_uninformative=false", *NO_EVAL_OR_CHECKPOINTS],
           "sdpo": NO_EVAL_OR_CHECKPOINTS}
COMPARED = ("loss", "reward_mean", "grad_norm")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, jobs: list[list[str]], tmp: Path) -> None:
    """Run ``jobs`` (argument lists of ``run.py``) in order as one JAX job of
    ``processes`` processes x ``8 / processes`` CPU devices."""
    script = tmp / "child.py"
    script.write_text(CHILD.format(tests=str(ROOT / "tests"), cache=str(tmp / "xla_cache")))
    port, procs = _free_port(), []
    for pid in range(processes):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                   XLA_FLAGS=xla_flags(8 // processes))
        if processes > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                       JAX_NUM_PROCESSES=str(processes), JAX_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(jobs)],
                                      cwd=str(ROOT), env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    try:
        logs = [p.communicate(timeout=900)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for pid, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {pid} of {processes}:\n{log[-4000:]}"


def _metrics(run: Path, kind: str = "train") -> dict[int, dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("kind", "train") == kind}


def _assert_close(got: dict, want: dict, keys, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for step in want:
        for key in keys:
            a, b = got[step][key], want[step][key]
            assert abs(a - b) <= 1e-4 * max(1.0, abs(b)), (what, step, key, a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every job at 1 process and at 2 processes; the 2-process launch also stops a GRPO
    run after its first checkpoint (``steps=1``) and resumes it to step 2."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    ckpt = write_tiny_checkpoint(tmp / "ckpt")
    empty = tmp / "defaults.yaml"
    empty.write_text("{}\n")

    def job(method, out, *extra):
        return ["train", "--config", str(empty), f"method={method}", f"model.name={ckpt}",
                *COMMON, *METHODS[method], f"output_dir={out}", *extra]

    for processes in (1, 2):
        jobs = [job(m, tmp / f"p{processes}" / m) for m in METHODS]
        if processes == 2:
            stopped = tmp / "p2" / "grpo_resumed"
            jobs += [job("grpo", stopped, "steps=1", "eval.at_end=false"),
                     job("grpo", stopped, "--resume")]
        _launch(processes, jobs, tmp)
    return tmp


@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_log_what_one_process_logs(runs, method):
    one, two = _metrics(runs / "p1" / method), _metrics(runs / "p2" / method)
    assert sorted(one) == [1, 2]
    _assert_close(two, one, COMPARED, method)
    if method == "amr_sd":  # the reflection pass really ran, on the same rows
        assert all(r["reflected_frac"] > 0 for r in one.values())
        _assert_close(two, one, ["reflected_frac"], method)


def test_evaluation_is_the_same_at_one_and_two_processes(runs):
    one, two = _metrics(runs / "p1" / "grpo", "eval"), _metrics(runs / "p2" / "grpo", "eval")
    assert sorted(one) == [2]
    _assert_close(two, one, ("pass@1_greedy", "pass@1_sampled", "num_questions"), "eval")
    assert one[2]["num_questions"] == 8


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    resumed = _metrics(runs / "p2" / "grpo_resumed")
    uninterrupted = _metrics(runs / "p2" / "grpo")
    _assert_close(resumed, uninterrupted, COMPARED, "resume")
    _assert_close(_metrics(runs / "p2" / "grpo_resumed", "eval"),
                  _metrics(runs / "p2" / "grpo", "eval"), ("pass@1_sampled",), "resume eval")

"""The sandbox contains hostile candidates and reports them as reward 0 with a named reason.

Every hostile program runs through ``safe_reward("python_tests", ...)`` (or the sandbox
directly when its output is inspected) with small limits: 1 s wall clock, 256 MB, 8
processes. After each run no process of the sandbox's uids may be left, and the caller
(this pytest process) must be unharmed. Hostile programs are bounded on their own (the
fork test starts at most 40 sleepers), so a containment failure cannot take the machine
down.
"""

from __future__ import annotations

import os
import secrets
import socket
import time

import pytest

from amrsd_jax.rewards import safe_reward, score_batch
from amrsd_jax.rewards.sandbox import (Program, Sandbox, SandboxConfig, SandboxSetupError,
                                       default_sandbox)

CONFIG = SandboxConfig(timeout_s=1.0, memory_mb=256, nproc=8, workers=2, output_limit=4096)
TESTS = "assert add3(1) == 4\nassert add3(5) == 8\n"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    try:
        return default_sandbox(CONFIG)
    except SandboxSetupError as e:  # a machine that allows no isolation at all: say so
        pytest.skip(f"no sandbox can be set up on this machine: {e}")


def _leftovers(sandbox: Sandbox) -> list[int]:
    """Live processes (not zombies: those are dead, awaiting their reaper) running as a
    sandbox uid."""
    uids = range(CONFIG.uid_base, CONFIG.uid_base + CONFIG.workers)
    left = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if os.stat(f"/proc/{entry}").st_uid in uids and state not in "ZX":
                    left.append(int(entry))
            except (OSError, IndexError):
                pass
    return left


def score(code: str, tests: str = TESTS):
    result = safe_reward("python_tests", f"```python\n{code}\n```", tests,
                         timeout_s=CONFIG.timeout_s, config=CONFIG)
    assert result.error is None, result.error  # the candidate's failure is not an error
    return result


def assert_contained(sandbox: Sandbox, result, reason: str) -> None:
    assert result.reward == 0.0 and not result.correct
    assert reason in result.feedback, result.feedback
    if sandbox.isolation == "strict":
        assert not _leftovers(sandbox), "processes left behind"


def test_the_probe_reports_what_holds(sandbox):
    if os.geteuid() == 0:
        assert sandbox.isolation == "strict", sandbox.isolation_note
        assert "namespace" in sandbox.isolation_note


def test_correct_passes_and_wrong_fails_with_its_assertion(sandbox):
    ok = score("def add3(x):\n    return x + 3")
    assert ok.reward == 1.0 and ok.feedback == "all 2 tests passed"
    bad = score("def add3(x):\n    return x + 2")
    assert bad.reward == 0.0
    assert "test 1 `assert add3(1) == [redacted]` failed: `add3(1)` returned 3" in bad.feedback
    assert "4" not in bad.feedback  # the expected value stays out of the teacher's context
    crash = score("def add3(x):\n    return x + y")
    assert "NameError: name 'y' is not defined at line 2 of your code: `return x + y`" \
        in crash.feedback


def test_infinite_loop_times_out(sandbox):
    start = time.monotonic()
    result = score("def add3(x):\n    while True:\n        pass")
    assert time.monotonic() - start < CONFIG.timeout_s + 2.0
    assert_contained(sandbox, result, "timed out after 1 s in test 1 of 2")


def test_allocating_8_gb_hits_the_memory_limit(sandbox):
    result = score("big = bytearray(8 * 1024 ** 3)\ndef add3(x):\n    return x + 3")
    assert_contained(sandbox, result, "memory limit (256 MB) exceeded")


FORK = """
import os, time
started = 0
for i in range(40):  # bounded: at most 40 sleepers even without any limit
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        os.setsid()  # leave the process group: the uid sweep must still find it
        time.sleep(60)
        os._exit(0)
    started += 1
print("STARTED", started, flush=True)
def add3(x):
    return x + 3
assert False, "never a pass"
"""


def test_fork_bomb_is_capped_and_leaves_nothing_behind(sandbox):
    result = sandbox.run(Program(FORK, tests=("assert add3(1) == 4",)))
    assert not result.passed
    started = int(result.output.split("STARTED")[1].split()[0])
    if sandbox.isolation == "strict":
        assert started < CONFIG.nproc  # RLIMIT_NPROC holds for the sandbox uid
        assert not _leftovers(sandbox)
    verdict = score(FORK)
    assert_contained(sandbox, verdict, "loading your code raised AssertionError")


def test_writing_outside_the_sandbox_leaves_no_file(sandbox, tmp_path):
    name = f"amrsd-escape-{secrets.token_hex(4)}"
    targets = [tmp_path / name, f"/tmp/{name}", f"/var/tmp/{name}", f"/dev/shm/{name}"]
    code = "\n".join(
        [f"try:\n    open({str(t)!r}, 'w').write('x')\nexcept OSError:\n    pass"
         for t in targets] + ["def add3(x):\n    return 0"])
    result = score(code)
    for t in targets:
        assert not os.path.exists(t), t
    assert_contained(sandbox, result, "failed")


def test_no_connection_reaches_a_listening_socket(sandbox):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.3)
        port = server.getsockname()[1]
        result = score(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), "
                       "timeout=0.5)\ndef add3(x):\n    return x + 3")
        with pytest.raises(socket.timeout):
            server.accept()
    assert_contained(sandbox, result, "loading your code raised")
    assert any(word in result.feedback for word in ("unreachable", "disabled", "refused"))


def test_parent_environment_does_not_reach_the_candidate(sandbox, monkeypatch):
    sentinel = f"sentinel-{secrets.token_hex(8)}"
    monkeypatch.setenv("AMRSD_SANDBOX_SENTINEL", sentinel)
    code = ("import os\nprint(dict(os.environ))\n"
            "try:\n    print(open(f'/proc/{os.getppid()}/environ').read())\n"  # the parent's
            "except OSError as e:\n    print(e)\n"
            "raise RuntimeError(str(dict(os.environ)) + open('/proc/self/environ').read())")
    direct = sandbox.run(Program(code, tests=("assert True",)))
    assert sentinel not in direct.output and "AMRSD_SANDBOX_SENTINEL" not in direct.output
    result = score(code)
    assert sentinel not in result.feedback
    assert_contained(sandbox, result, "RuntimeError")


def test_killing_the_parent_fails_and_the_caller_survives(sandbox):
    me = os.getpid()
    result = score("import os\nos.kill(os.getppid(), 9)\nos.kill(1, 9)\n"
                   "def add3(x):\n    return x + 3")
    assert os.getpid() == me  # still here
    assert_contained(sandbox, result, "PermissionError")


def test_printing_100_mb_is_capped(sandbox):
    start = time.monotonic()
    result = sandbox.run(Program("import sys\nfor _ in range(100):\n"
                                 "    sys.stdout.write('x' * (1 << 20))\n"
                                 "def add3(x):\n    return x + 3",
                                 tests=("assert add3(1) == 4",)))
    assert len(result.output) <= CONFIG.output_limit
    assert result.passed or result.status == "timeout"  # read and dropped, or cut off
    assert time.monotonic() - start < CONFIG.timeout_s + 2.0
    assert not _leftovers(sandbox)


def test_exiting_before_the_tests_is_not_a_pass(sandbox):
    result = score("import sys\ndef add3(x):\n    return x + 3\nsys.exit(0)")
    assert_contained(sandbox, result, "your code exited (SystemExit: 0) before the tests ran")
    result = score("import os\ndef add3(x):\n    return x + 3\nos._exit(0)")
    assert_contained(sandbox, result, "stopped before the tests finished")


CHEATS = {
    # an object that equals everything
    "always_equal": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                     "def add3(x):\n    return Yes()", TESTS),
    # the builtins the tests use, patched
    "patched_builtins": ("import builtins\nbuiltins.abs = lambda x: 0\n"
                         "def add3(x):\n    return 0", "assert abs(add3(0) - 3) < 1e-9\n"),
    # the test runner's internals, patched so that no test runs
    "skipped_tests": ("import runpy\nrunpy._run_module_code = lambda *a, **k: {}\n"
                      "def add3(x):\n    return 0", TESTS),
    # a forged verdict on every descriptor, then a quiet exit
    "forged_verdict": ("import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, "
                       "b'x PASS 0\\nx PASS 1\\nx END\\n')\n    except OSError:\n        pass\n"
                       "print('PASS')\nos._exit(0)", TESTS),
}


@pytest.mark.parametrize("cheat", sorted(CHEATS))
def test_faking_a_pass_fails(sandbox, cheat):
    code, tests = CHEATS[cheat]
    result = score(code, tests)
    assert result.reward == 0.0, result.feedback
    assert not _leftovers(sandbox)


def test_basic_isolation_contains_too():
    """Without namespaces: sockets refused in-process, the environment scrubbed, and as
    root the same unprivileged uid (the parent cannot be killed, forks are capped)."""
    try:
        basic = default_sandbox(SandboxConfig(timeout_s=1.0, memory_mb=256, nproc=8,
                                              isolation="basic"))
    except SandboxSetupError as e:  # e.g. root whose Python lives under /root (0700)
        pytest.skip(f"basic isolation cannot be set up here: {e}")
    me = os.getpid()
    net = basic.run(Program("import socket\nsocket.create_connection(('127.0.0.1', 9))",
                            tests=("assert True",)))
    assert net.status == "load_error" and "disabled in the sandbox" in net.failure.message
    if os.geteuid() == 0:
        kill = basic.run(Program("import os\nos.kill(os.getppid(), 9)", tests=("assert True",)))
        assert kill.failure.kind == "PermissionError" and os.getpid() == me
        fork = basic.run(Program(FORK, tests=("assert True",)))
        assert int(fork.output.split("STARTED")[1].split()[0]) < 8
        assert not _leftovers(basic)


def test_pool_keeps_the_order():
    programs = [Program(f"def add3(x):\n    return x + {k}", tests=("assert add3(0) == 3",))
                for k in (3, 2, 3, 1)]
    results = default_sandbox(CONFIG).run_many(programs)
    assert [r.passed for r in results] == [True, False, True, False]


def test_score_batch_runs_python_tests_on_the_pool():
    """The trainer's scoring path (score_batch) keeps one call per worker in flight."""
    codes = [f"import time\ntime.sleep(0.8)\ndef add3(x):\n    return x + {k}" for k in (3, 2, 3, 1)]
    start = time.monotonic()
    results, errors = score_batch("python_tests", [f"```python\n{c}\n```" for c in codes],
                                  [TESTS] * 4, timeout_s=CONFIG.timeout_s + 1.0)
    assert [r.reward for r in results] == [1.0, 0.0, 1.0, 0.0] and errors == 0
    assert time.monotonic() - start < 4 * 0.8 - 0.4  # serial calls would take 3.2 s + start-up


def test_a_sandbox_that_cannot_be_set_up_is_an_error_at_start_up():
    with pytest.raises(SandboxSetupError, match="cannot start /nonexistent/python"):
        Sandbox(SandboxConfig(isolation="basic", python="/nonexistent/python"))
    if os.geteuid() != 0:
        with pytest.raises(SandboxSetupError, match="isolation='strict'"):
            Sandbox(SandboxConfig(isolation="strict"))

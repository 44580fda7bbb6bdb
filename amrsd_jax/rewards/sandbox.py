"""Run untrusted Python (a model's code and its tests) in confined child processes.

The trainer's process never runs model code: each program runs in its own child,
``python -I -S`` on :mod:`amrsd_jax.rewards.sandbox_child` (which confines itself
before loading the candidate; its docstring lists the steps), started with

* ``start_new_session=True``: the child leads its own process group, killed whole
  (``os.killpg(SIGKILL)``) at the wall-clock timeout and after every run;
* an empty environment: none of the parent's variables reach the candidate;
* the job on stdin and a private pipe for the verdict (nonce-tagged lines), so the
  candidate's output, exit status or ``sys.exit(0)`` cannot pass a test;
* stdout and stderr captured to ``output_limit`` bytes; the rest is read and dropped.

Isolation (:class:`SandboxConfig` ``isolation``):

* ``strict``: network and mount namespaces, a fresh tmpfs as the only writable place, the
  rlimits, and a sandbox-only uid per worker (``uid_base + worker``; needs root or
  CAP_SYS_ADMIN + CAP_SETUID). The uid makes RLIMIT_NPROC hold (it never applies to
  root) and lets the parent kill every process the run left behind, even one that left
  the process group with ``setsid``: after each run all processes of that uid are
  killed (``/proc`` scan).
* ``basic``: a fresh temporary directory (removed afterwards) as the working directory,
  the same rlimits, sockets refused inside the interpreter. As root (a container without
  CAP_SYS_ADMIN) the child still drops to the worker's uid and is swept by it; as another
  user RLIMIT_NPROC is the user's current process count + ``nproc`` (it counts them
  all), other files of the user stay writable, and a ``setsid`` escapee is not found
  (only the process group is killed).
* ``auto``: ``strict`` when the start-up probe succeeds, else ``basic``.

:class:`Sandbox` probes the configured isolation once at construction (a trivial program
that must report the containment asked for) and raises :class:`SandboxSetupError` with
the reason when it cannot be set up. :meth:`Sandbox.run_many` runs programs on a pool of
``workers`` threads, each driving one child at a time.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

__all__ = [
    "CHILD_PROGRAM",
    "ExecutionResult",
    "Failure",
    "Program",
    "Sandbox",
    "SandboxConfig",
    "SandboxSetupError",
    "default_sandbox",
]

CHILD_PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")
ISOLATIONS = ("auto", "strict", "basic")


class SandboxSetupError(RuntimeError):
    """The sandbox cannot be set up as configured (raised at start-up, by the probe)."""


@dataclasses.dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of every run.

    Attributes:
      timeout_s: wall-clock limit of one run, start-up included; the process group is
        killed when it passes.
      cpu_s: RLIMIT_CPU (seconds of CPU); ``None``: ``ceil(timeout_s) + 1``.
      memory_mb: RLIMIT_AS, the address space of each process.
      fsize_mb: RLIMIT_FSIZE, the largest file a process may write.
      disk_mb: size of the tmpfs working directory (``strict``).
      nproc: RLIMIT_NPROC: processes of the sandbox uid (``strict``), or processes on top
        of the user's current count (``basic``).
      nofile: RLIMIT_NOFILE.
      output_limit: bytes of stdout + stderr kept (the rest is read and dropped).
      isolation: ``strict``, ``basic`` or ``auto`` (see the module docstring).
      uid_base: ``strict``: worker ``k`` runs as uid/gid ``uid_base + k``; pick ids no
        user or service of the machine has.
      workers: child processes running at once in :meth:`Sandbox.run_many`.
      python: the interpreter of the children.
    """

    timeout_s: float = 2.0
    cpu_s: int | None = None
    memory_mb: int = 1024
    fsize_mb: int = 16
    disk_mb: int = 32
    nproc: int = 32
    nofile: int = 64
    output_limit: int = 16384
    isolation: str = "auto"
    uid_base: int = 61000
    workers: int = 2
    python: str = sys.executable

    def __post_init__(self):
        if self.isolation not in ISOLATIONS:
            raise ValueError(f"isolation must be one of {ISOLATIONS}, got {self.isolation!r}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        for name in ("memory_mb", "fsize_mb", "disk_mb", "nproc", "nofile", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def cpu_limit_s(self) -> int:
        return self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1


@dataclasses.dataclass(frozen=True)
class Program:
    """What one run executes: the candidate's code, then the tests in its namespace.

    ``setup`` (imports, helper definitions, a ``check`` function) runs once after the
    code; each of ``tests`` runs after it, in a copy of that namespace, and is one verdict.
    """

    code: str
    setup: str = ""
    tests: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Failure:
    """The first failure of a run, as the child reported it.

    ``kind`` is the exception type name (``AssertionError``, ``NameError``, ``SyntaxError``,
    ``SystemExit``, ``MemoryError`` ...); ``code_line``/``code_lineno`` the last line of the
    candidate's code in the traceback; ``test_line`` the test's line that failed;
    ``actual`` the value the candidate's code returned in a failed ``==`` assertion.
    """

    kind: str
    message: str
    code_line: str | None = None
    code_lineno: int | None = None
    test_line: str | None = None
    actual: str | None = None


@dataclasses.dataclass(frozen=True)
class ExecutionResult:
    """One run's outcome.

    ``status``: ``passed`` (every test reported a pass, then the end marker), ``failed``
    (a test failed), ``load_error`` (the code raised, exited or did not parse before the
    tests ran: ``failure`` says how), ``timeout`` (wall clock), ``cpu_limit`` (RLIMIT_CPU),
    ``crashed`` (the child ended without the end marker: killed, ``os._exit``, out of
    memory in the harness), ``setup_error`` (confinement failed).
    ``tests``: the verdicts reported, in test order (shorter than the program's tests when
    the run stopped early). ``output``: the first ``output_limit`` bytes of stdout+stderr.
    """

    status: str
    tests: tuple[bool, ...]
    num_tests: int
    failure: Failure | None = None
    failed_test: int | None = None
    output: str = ""
    output_bytes: int = 0
    returncode: int | None = None
    wall_s: float = 0.0
    facts: dict | None = None
    error: str | None = None
    loaded: bool = False  # the code and the tests' set-up ran; the tests started

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# ----------------------------------------------------------------------------- processes


def _kill_uid(uid: int) -> int:
    """SIGKILL every live process whose real uid is ``uid``; returns how many were
    signalled (zombies are dead already and are not counted)."""
    killed = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                status = f.read()
        except OSError:
            continue  # gone meanwhile
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        try:
            if int(fields["Uid"].split()[0]) == uid and not fields["State"].strip().startswith(
                    ("Z", "X")):
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
        except (KeyError, ValueError, IndexError, OSError):
            continue
    return killed


def _sweep_uid(uid: int, timeout_s: float = 2.0) -> None:
    """Kill every process of ``uid`` until none is left alive (forks racing the sweep
    are caught by the next round)."""
    deadline = time.monotonic() + timeout_s
    while _kill_uid(uid) and time.monotonic() < deadline:
        time.sleep(0.002)


def _processes_of(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _drain(fd: int, limit: int) -> bytes:
    """Up to ``limit`` bytes already waiting in pipe ``fd``, without blocking."""
    os.set_blocking(fd, False)
    data = bytearray()
    try:
        while len(data) < limit:
            chunk = os.read(fd, min(65536, limit - len(data)))
            if not chunk:
                break
            data += chunk
    except (BlockingIOError, OSError):
        pass
    return bytes(data)


def _parse_lines(data: bytes, nonce: str) -> list[tuple[str, str]]:
    """The child's verdict lines tagged with ``nonce``: ``[(kind, rest of the line)]``."""
    out = []
    for raw in data.split(b"\n"):
        parts = raw.decode("utf-8", "replace").split(" ", 2)
        if len(parts) >= 2 and parts[0] == nonce:
            out.append((parts[1], parts[2] if len(parts) > 2 else ""))
    return out


def _failure(payload: str) -> Failure:
    d = json.loads(payload)
    return Failure(kind=str(d.get("type")), message=str(d.get("message") or ""),
                   code_line=d.get("code_line"), code_lineno=d.get("code_lineno"),
                   test_line=d.get("test_line"), actual=d.get("actual"))


class Sandbox:
    """Confined execution of :class:`Program` s (see the module docstring).

    Construction probes the isolation: ``isolation="strict"`` that cannot be set up raises
    :class:`SandboxSetupError`; ``auto`` falls back to ``basic`` and says so in
    :attr:`isolation_note`.
    """

    def __init__(self, config: SandboxConfig | None = None):
        self.config = config or SandboxConfig()
        if not os.path.isfile(CHILD_PROGRAM):
            raise SandboxSetupError(f"the sandbox child program is missing: {CHILD_PROGRAM}")
        self._slots = list(range(self.config.workers))
        self._slot_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(self.config.workers, thread_name_prefix="sandbox")
        self.isolation, self.isolation_note = self._probe()

    # -- start-up

    def _probe(self) -> tuple[str, str]:
        wanted = self.config.isolation
        tried = ["strict", "basic"] if wanted == "auto" else [wanted]
        reasons = []
        for isolation in tried:
            # a stdlib import the child has not made: the library must be readable as uid
            result = self._run(Program("import fractions\nx = 1", tests=("assert x == 1",)),
                               isolation, slot=0)
            if result.passed:
                note = f"{isolation}: {result.facts}"
                if reasons:  # auto fell back: weaker containment, say so where it shows
                    note += f" (strict unavailable: {reasons[0]})"
                    warnings.warn(f"sandbox isolation=auto runs as {note}", RuntimeWarning,
                                  stacklevel=3)
                return isolation, note
            if result.failure is not None and result.failure.kind == "ModuleNotFoundError":
                reasons.append(f"{isolation}: the standard library of {self.config.python} is "
                               f"not readable as the sandbox uid ({result.failure.message}); "
                               "install Python where every user can read it")
            else:
                reasons.append(result.error or f"{isolation}: {result.status}: "
                               f"{result.failure} {result.output[-300:]!r}")
        raise SandboxSetupError(f"the sandbox cannot be set up with isolation={wanted!r}: "
                                + "; ".join(reasons))

    # -- running

    def run(self, program: Program) -> ExecutionResult:
        """Run one program (blocks; thread-safe, at most ``workers`` at once)."""
        return self._pool.submit(self._run_in_slot, program).result()

    def run_many(self, programs: Sequence[Program]) -> list[ExecutionResult]:
        """Run programs on the pool of ``workers``; results in input order."""
        return list(self._pool.map(self._run_in_slot, programs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _run_in_slot(self, program: Program) -> ExecutionResult:
        with self._slot_lock:
            slot = self._slots.pop()
        try:
            return self._run(program, self.isolation, slot)
        finally:
            with self._slot_lock:
                self._slots.append(slot)

    def _job(self, program: Program, isolation: str, slot: int, nonce: str,
             workdir: str | None) -> bytes:
        cfg = self.config
        nproc = cfg.nproc
        if isolation == "basic" and os.geteuid() != 0:  # counts all the user's processes
            nproc += _processes_of(os.getuid())
        tests = [f"{t}\n__sandbox_done__({i})\n" for i, t in enumerate(program.tests)]
        return json.dumps({
            "nonce": nonce, "solution": program.code, "setup": program.setup, "tests": tests,
            "isolation": isolation, "uid": cfg.uid_base + slot, "workdir": workdir,
            "limits": {"cpu_s": cfg.cpu_limit_s, "memory_mb": cfg.memory_mb,
                       "fsize_mb": cfg.fsize_mb, "disk_mb": cfg.disk_mb, "nproc": nproc,
                       "nofile": cfg.nofile},
        }).encode("utf-8")

    def _run(self, program: Program, isolation: str, slot: int) -> ExecutionResult:
        cfg = self.config
        nonce = secrets.token_hex(16)
        workdir = tempfile.mkdtemp(prefix="amrsd-sandbox-") if isolation == "basic" else None
        uid = cfg.uid_base + slot
        drops_uid = isolation == "strict" or os.geteuid() == 0
        if workdir and os.geteuid() == 0:
            os.chown(workdir, uid, uid)  # the child runs as uid (see sandbox_child)
        read_fd, write_fd = os.pipe()
        start = time.monotonic()
        try:
            proc = subprocess.Popen(
                [cfg.python, "-I", "-S", CHILD_PROGRAM, str(write_fd)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                env={}, cwd="/", pass_fds=(write_fd,), start_new_session=True,
                close_fds=True)
        except OSError as exc:
            os.close(read_fd)
            os.close(write_fd)
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            return ExecutionResult("setup_error", (), len(program.tests),
                                   error=f"cannot start {cfg.python}: {exc}")
        os.close(write_fd)
        try:
            try:
                proc.stdin.write(self._job(program, isolation, slot, nonce, workdir))
                proc.stdin.close()
            except OSError:
                pass  # the child died at once; its status says why
            verdict, output, total, timed_out = self._collect(proc, read_fd, start)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, always
            except OSError:
                pass
            if drops_uid:  # also those that left the group (setsid)
                _sweep_uid(uid)
            returncode = proc.wait()
            os.close(read_fd)
            proc.stdout.close()
            if workdir:
                shutil.rmtree(workdir, ignore_errors=True)
        return self._result(program, verdict, nonce, output, total, returncode, timed_out,
                            time.monotonic() - start)

    def _collect(self, proc: subprocess.Popen, read_fd: int, start: float):
        """Read the verdict pipe and the capped output until the end marker and the
        child's exit, or the deadline. Returns ``(verdict, output, total, timed_out)``."""
        cfg = self.config
        deadline = start + cfg.timeout_s
        out_fd = proc.stdout.fileno()
        open_fds = {read_fd, out_fd}
        verdict, output, total = bytearray(), bytearray(), 0
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(verdict), bytes(output), total, True
            if not open_fds:  # both pipes closed: every holder has exited
                if proc.poll() is not None:
                    break
                time.sleep(min(0.005, remaining))
                continue
            ready, _, _ = select.select(list(open_fds), [], [], min(remaining, 0.05))
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                elif fd == read_fd:
                    if len(verdict) < 1 << 20:  # the child's lines are short
                        verdict += chunk
                else:
                    total += len(chunk)
                    if len(output) < cfg.output_limit:
                        output += chunk[:cfg.output_limit - len(output)]
            if proc.poll() is not None:
                # the main child is gone: take what is already in the pipes; what the
                # processes it left behind may still write does not count
                verdict += _drain(read_fd, (1 << 20) - len(verdict))
                rest = _drain(out_fd, cfg.output_limit - len(output))
                output += rest
                total += len(rest)
                break
        return bytes(verdict), bytes(output), total, False

    def _result(self, program, verdict, nonce, output, total, returncode, timed_out,
                wall_s) -> ExecutionResult:
        n = len(program.tests)
        tests: list[bool] = []
        failure = failed_test = facts = error = None
        ended = loaded = False
        for kind, rest in _parse_lines(verdict, nonce):
            try:
                if kind == "READY":
                    facts = json.loads(rest)
                elif kind == "PASS":
                    tests.append(True)
                elif kind == "FAIL":
                    tests.append(False)
                    index, payload = rest.split(" ", 1)
                    if failure is None:
                        failed_test, failure = int(index), _failure(payload)
                elif kind == "LOAD" and failure is None:
                    failure = _failure(rest)
                elif kind in ("SETUP_FAILED", "HARNESS"):
                    error = json.loads(rest)
                elif kind == "LOADED":
                    loaded = True
                elif kind == "END":
                    ended = True
            except ValueError as exc:  # a malformed line is the harness's bug: say so
                error = f"unreadable verdict line {kind} {rest[:80]!r}: {exc}"
        text = output.decode("utf-8", "replace")
        common = dict(tests=tuple(tests), num_tests=n, failure=failure, failed_test=failed_test,
                      output=text, output_bytes=total, returncode=returncode,
                      wall_s=wall_s, facts=facts, loaded=loaded)
        if error is not None and facts is None:
            return ExecutionResult("setup_error", error=f"sandbox setup failed: {error}",
                                   **common)
        if timed_out:
            status = "timeout"
        elif failure is not None and not tests and not ended:
            status = "load_error"
        elif ended and len(tests) == n:
            status = "passed" if all(tests) else "failed"
        elif returncode == -signal.SIGXCPU:
            status = "cpu_limit"
        else:
            status = "crashed"
            error = error or (f"killed by signal {signal.Signals(-returncode).name}"
                              if returncode is not None and returncode < 0
                              else f"exited with status {returncode} before the tests finished")
        return ExecutionResult(status, error=error, **common)


_DEFAULT: dict[SandboxConfig, Sandbox] = {}
_DEFAULT_LOCK = threading.Lock()


def default_sandbox(config: SandboxConfig | None = None) -> Sandbox:
    """One shared :class:`Sandbox` per config in this process (probed on first use)."""
    config = config or SandboxConfig()
    with _DEFAULT_LOCK:
        if config not in _DEFAULT:
            _DEFAULT[config] = Sandbox(config)
        return _DEFAULT[config]

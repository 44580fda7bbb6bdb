"""The sandbox's child program: confines itself, then runs one candidate and its tests.

Never imported by the trainer: :mod:`amrsd_jax.rewards.sandbox` starts it as
``python -I -S sandbox_child.py <result fd>`` in a new session with an empty environment,
so model code only ever runs in that child. Standard library only (``-S``: no
site-packages), and importing this module does nothing.

Protocol. The parent writes one JSON job to stdin (read whole, then stdin is closed):
``nonce``, ``solution`` (the candidate's code), ``setup`` (the tests' non-test
statements), ``tests`` (one source text per test), ``isolation`` (``"strict"`` or
``"basic"``), ``uid``, ``workdir`` (``basic`` only), ``limits``. This program reports on
the result fd, one line each, every line starting with the nonce:

* ``<nonce> READY {facts}`` once confined (what holds: network namespace, uid, ...);
* ``<nonce> LOAD {failure}`` if the candidate's code did not load (then no tests run),
  else ``<nonce> LOADED``;
* ``<nonce> PASS <i>`` or ``<nonce> FAIL <i> {failure}`` after test ``i``; a test passes
  only if it raised nothing *and* reached its last statement, ``__sandbox_done__(i)``,
  which the parent appends to it (so skipping the tests is not a pass);
* ``<nonce> END`` after the last test, then it exits with ``os._exit(0)``.

The verdict comes from these lines alone: the candidate's exit status and output do not
count, a candidate that exits early (``sys.exit(0)``, ``os._exit(0)``) never wrote END,
and faking the lines needs the nonce, which the parent sends over stdin and the candidate
is never given. (Code in the same interpreter can still dig it out of this program's
memory; the namespaces, the unprivileged uid and the limits are the containment, the
nonce only makes a forged pass take deliberate effort.)

Confinement, in this order (``strict``, needs root / CAP_SYS_ADMIN):

1. new network and mount namespaces (``unshare(CLONE_NEWNET | CLONE_NEWNS)``): no
   interface but a down loopback, mounts private to this process tree;
2. a fresh tmpfs (``disk_mb``) on ``/tmp``, owned by the sandbox uid: the working
   directory and the only writable place; empty read-only tmpfs over ``/var/tmp``,
   ``/dev/shm``, ``/run/lock`` and ``/root`` (the interpreter's own tree is bound back
   read-only when it lives there);
3. rlimits: CPU, AS, FSIZE, NPROC, NOFILE, CORE=0;
4. drop to ``uid``/``gid`` (a sandbox-only id, no supplementary groups): every capability
   goes, RLIMIT_NPROC applies (it does not to root), files of other users are read-only.

``basic`` (no namespaces): the parent's fresh temporary directory as the working
directory, the same rlimits, ``socket`` refusing to create sockets, and, when started
as root, the same drop to ``uid`` (so RLIMIT_NPROC holds and the parent cannot be
signalled); as another user RLIMIT_NPROC counts all of that user's processes, so the
parent sets it above their count.
"""

from __future__ import annotations

import builtins
import ctypes
import json
import os
import pkgutil  # noqa: F401  runpy needs it; imported before the uid may lose the stdlib
import resource
import runpy
import sys
import traceback

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_REMOUNT = 32
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18

SOLUTION_FILE = "solution.py"
SETUP_FILE = "setup_tests.py"
MESSAGE_CHARS = 300  # an exception message is cut to this
VALUE_CHARS = 120  # a returned value's repr is cut to this
_HIDDEN_DIRS = ("/var/tmp", "/dev/shm", "/run/lock", "/root")


class SetupFailed(Exception):
    pass


# ----------------------------------------------------------------------------- confinement


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise SetupFailed(f"{what}: {os.strerror(err)} (errno {err})")


def _mount(libc, source, target, fstype, flags, data=None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _check(libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount {fstype or source} on {target}")


def _confine_strict(job: dict) -> dict:
    libc = _libc()
    uid = int(job["uid"])
    _check(libc.unshare(CLONE_NEWNET | CLONE_NEWNS), "unshare(CLONE_NEWNET | CLONE_NEWNS)")
    _mount(libc, None, "/", None, MS_REC | MS_PRIVATE)
    # the interpreter's tree may live under a hidden directory (e.g. /root/.pyenv)
    prefix = os.path.realpath(sys.base_prefix)
    keep = os.open(prefix, os.O_PATH | os.O_DIRECTORY)
    for d in _HIDDEN_DIRS:
        if os.path.isdir(d):
            _mount(libc, "tmpfs", d, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=755")
            if prefix.startswith(d + "/"):
                os.makedirs(prefix, mode=0o755)
                _mount(libc, f"/proc/self/fd/{keep}", prefix, None, MS_BIND | MS_REC)
                _mount(libc, None, prefix, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
            _mount(libc, None, d, None, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)
    os.close(keep)
    _mount(libc, "tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(job['limits']['disk_mb'])}m,mode=700,uid={uid},gid={uid}")
    os.chdir("/tmp")
    return {"network": "namespace", "filesystem": "tmpfs /tmp, others read-only", "uid": uid}


def _refuse_sockets() -> None:
    import socket

    def refuse(*args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    class NoSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            refuse()

    socket.socket = NoSocket
    for name in ("create_connection", "create_server", "socketpair", "fromfd", "getaddrinfo"):
        setattr(socket, name, refuse)
    sys.modules["_socket"].socket = NoSocket  # the C-level class too


def _limit(which: int, value: int) -> None:
    resource.setrlimit(which, (value, value))


def _apply_limits(limits: dict) -> None:
    mb = 1024 * 1024
    resource.setrlimit(resource.RLIMIT_CPU, (int(limits["cpu_s"]), int(limits["cpu_s"]) + 1))
    _limit(resource.RLIMIT_AS, int(limits["memory_mb"]) * mb)
    _limit(resource.RLIMIT_FSIZE, int(limits["fsize_mb"]) * mb)
    _limit(resource.RLIMIT_NPROC, int(limits["nproc"]))
    _limit(resource.RLIMIT_NOFILE, int(limits["nofile"]))
    _limit(resource.RLIMIT_CORE, 0)


def _drop_privileges(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    if os.getuid() == 0 or os.geteuid() == 0:
        raise SetupFailed("still root after setresuid")


def confine(job: dict) -> dict:
    """Apply the job's isolation (see the module docstring); returns what holds."""
    if job["isolation"] == "strict":
        facts = _confine_strict(job)
        _apply_limits(job["limits"])
        _drop_privileges(int(job["uid"]))
    else:
        os.chdir(job["workdir"])
        _apply_limits(job["limits"])
        _refuse_sockets()
        if os.geteuid() == 0:  # root without namespaces (e.g. a container): still drop
            _drop_privileges(int(job["uid"]))
        facts = {"network": "socket refused in-process", "filesystem": "fresh directory",
                 "uid": os.getuid()}
    # the candidate must find neither the parent's variables nor a way back to the tests
    os.environ.clear()
    facts["nproc_limit"] = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    return facts


# ----------------------------------------------------------------------------- reporting


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _message(exc: BaseException) -> str:
    try:
        return _cut(str(exc), MESSAGE_CHARS)
    except Exception:
        return "<unprintable>"


def describe(exc: BaseException, test_file: str | None) -> dict:
    """The failure of a test (or of loading the code): exception type and message, the
    last line of the candidate's code in the traceback, and the test's own line."""
    out = {"type": type(exc).__name__, "message": _message(exc), "code_line": None,
           "code_lineno": None, "test_line": None}
    if isinstance(exc, SystemExit):
        out["message"] = _cut(repr(exc.code), MESSAGE_CHARS)
    if isinstance(exc, SyntaxError) and exc.filename and exc.filename.endswith(SOLUTION_FILE):
        out["code_lineno"], out["code_line"] = exc.lineno, (exc.text or "").strip() or None
        out["message"] = _cut(exc.msg or "", MESSAGE_CHARS)
        return out
    try:
        frames = traceback.extract_tb(exc.__traceback__)
    except Exception:
        return out
    for frame in frames:
        name = os.path.basename(frame.filename)
        if name == SOLUTION_FILE:
            out["code_lineno"], out["code_line"] = frame.lineno, (frame.line or "").strip()
        elif test_file is not None and name in (test_file, SETUP_FILE):
            out["test_line"] = (frame.line or "").strip()  # a test, or check() inside set-up
    return out


class Reporter:
    """Writes the result lines. Holds the fd, the nonce and its own references to
    ``os.write`` / ``json.dumps``, taken before the candidate runs (patching the modules
    afterwards does not change what it writes)."""

    def __init__(self, fd: int, nonce: str):
        self._fd, self._nonce = fd, nonce
        self._write, self._dumps = os.write, json.dumps

    def send(self, kind: str, *fields) -> None:
        parts = [self._nonce, kind]
        for f in fields:
            parts.append(str(f) if isinstance(f, int) else self._dumps(f))
        data = (" ".join(parts) + "\n").encode("utf-8", "replace")
        while data:
            data = data[self._write(self._fd, data):]


# ----------------------------------------------------------------------------- running

_PLAIN = (int, float, complex, bool, str, bytes, type(None))
_CONTAINERS = (list, tuple, set, frozenset, dict)


def _plain(value, depth: int = 0) -> bool:
    """Only built-in values: an object with its own ``__eq__`` cannot fake an equality."""
    kind = type(value)
    if kind in _PLAIN:
        return True
    if kind not in _CONTAINERS or depth > 20:
        return False
    items = value.items() if kind is dict else value
    if kind is dict:
        return all(_plain(k, depth + 1) and _plain(v, depth + 1) for k, v in items)
    return all(_plain(v, depth + 1) for v in items)


class Equality:
    """The tests' ``assert a == b`` is rewritten to ``assert __sandbox_eq__(a, b)``: equal
    only when both sides are plain built-in values; remembers the last left-hand value
    compared (the candidate's result, for the feedback)."""

    def __init__(self):
        self.last_actual = None

    def __call__(self, actual, expected) -> bool:
        try:
            self.last_actual = _cut(repr(actual), VALUE_CHARS)
        except Exception:
            self.last_actual = f"<{type(actual).__name__} object>"
        if not (_plain(actual) and _plain(expected)):
            self.last_actual += f" (a {type(actual).__name__}, not a built-in value)"
            return False
        return bool(actual == expected) and bool(expected == actual)


def run_job(job: dict, reporter: Reporter, pristine_builtins: dict) -> None:
    with open(SOLUTION_FILE, "w") as f:
        f.write(job["solution"])
    with open(SETUP_FILE, "w") as f:
        f.write(job["setup"])
    names = []
    for i, source in enumerate(job["tests"]):
        names.append(f"test_{i}.py")
        with open(names[-1], "w") as f:
            f.write(source)
    run_path = runpy.run_path
    try:
        namespace = run_path(SOLUTION_FILE, run_name="solution")
    except BaseException as exc:  # SystemExit, MemoryError, SyntaxError, anything
        reporter.send("LOAD", describe(exc, None))
        return
    equality = Equality()
    finished: set[int] = set()
    # the tests see the interpreter's builtins as they were before the candidate ran
    namespace["__builtins__"] = dict(pristine_builtins)
    namespace["__sandbox_eq__"] = equality
    namespace["__sandbox_done__"] = finished.add
    try:
        namespace = run_path(SETUP_FILE, init_globals=namespace, run_name="tests")
    except BaseException as exc:
        reporter.send("LOAD", describe(exc, SETUP_FILE))
        return
    reporter.send("LOADED")
    for i, name in enumerate(names):
        equality.last_actual = None
        try:
            run_path(name, init_globals=namespace, run_name="tests")
        except BaseException as exc:
            failure = describe(exc, name)
            failure["actual"] = equality.last_actual
            reporter.send("FAIL", i, failure)
        else:
            if i in finished:
                reporter.send("PASS", i)
            else:
                reporter.send("FAIL", i, {"type": "NotRun", "message": "the test did not run "
                                          "to its end", "code_line": None, "code_lineno": None,
                                          "test_line": None, "actual": None})
    reporter.send("END")


def main(argv: list[str]) -> None:
    fd = int(argv[1])
    job = json.loads(sys.stdin.buffer.read())
    os.close(0)
    os.open(os.devnull, os.O_RDONLY)  # fd 0 again, so the candidate's input() sees EOF
    reporter = Reporter(fd, job.pop("nonce"))
    try:
        facts = confine(job)
    except Exception as exc:
        reporter.send("SETUP_FAILED", f"{type(exc).__name__}: {exc}")
        os._exit(3)
    reporter.send("READY", facts)
    pristine = dict(vars(builtins))
    sys.setrecursionlimit(3000)
    try:
        run_job(job, reporter, pristine)
    except BaseException as exc:  # the harness itself failed (e.g. memory): no END
        try:
            reporter.send("HARNESS", f"{type(exc).__name__}: {_message(exc)}")
        except BaseException:
            pass
    for stream in (sys.stdout, sys.stderr):  # the candidate's prints, for the parent's log
        try:
            stream.flush()
        except BaseException:
            pass
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv)

"""``python run.py bench sandbox``: sandboxed executions per second, and their overhead.

Three ways to run the same small correct program (a function + 4 asserts):

- ``bare``: ``subprocess.run([python, "-c", program])``, one at a time, and the same with
  ``-I -S`` (no site-packages: the child's own start-up, the floor of any
  one-process-per-candidate design);
- ``sandbox, k workers`` for each ``k`` of ``--workers``: :meth:`Sandbox.run_many` on a
  pool of ``k``; each run is a fresh ``python -I -S`` child that confines itself
  (namespaces, rlimits, dropped uid under ``strict``), runs the code and the tests and
  reports on its private pipe, and the parent then kills the process group and sweeps
  the sandbox uid.

Reported per row: executions per second (``--runs`` runs after one warm-up), median and
p90 latency of one run, and the overhead = median latency / the ``-I -S`` bare median. Writes
JSON (``--out``).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from ..rewards.sandbox import Program, Sandbox, SandboxConfig
from .harness import format_table, progress, write_results

CODE = "def add_7(x):\n    return x + 7\n"
TESTS = ("assert add_7(3) == 10", "assert add_7(-5) == 2", "assert add_7(0) == 7",
         "assert add_7(100) == 107")


def _bare(runs: int, flags: tuple[str, ...]) -> tuple[float, list[float]]:
    program = CODE + "\n".join(TESTS)
    subprocess.run([sys.executable, *flags, "-c", program], check=True, env={})  # warm-up
    latencies = []
    start = time.perf_counter()
    for _ in range(runs):
        t = time.perf_counter()
        subprocess.run([sys.executable, *flags, "-c", program], check=True, env={})
        latencies.append(time.perf_counter() - t)
    return time.perf_counter() - start, latencies


def _sandboxed(sandbox: Sandbox, runs: int) -> tuple[float, list[float]]:
    program = Program(CODE, tests=TESTS)
    sandbox.run(program)  # warm-up (page cache, pool threads)
    start = time.perf_counter()
    results = sandbox.run_many([program] * runs)
    wall = time.perf_counter() - start
    failed = [r for r in results if not r.passed]
    if failed:
        raise RuntimeError(f"{len(failed)} of {runs} sandboxed runs failed: {failed[0]}")
    return wall, [r.wall_s for r in results]


def _row(name: str, runs: int, wall: float, latencies: list[float], bare_median: float):
    median = statistics.median(latencies)
    p90 = sorted(latencies)[int(0.9 * (len(latencies) - 1))]
    return {"name": name, "runs": runs, "wall_s": wall, "executions_per_s": runs / wall,
            "median_ms": 1e3 * median, "p90_ms": 1e3 * p90,
            "overhead_vs_bare": median / bare_median}


def main(args) -> int:
    workers = [int(w) for w in args.workers.split(",")]
    progress("sandbox", f"{args.runs} runs per row; bare `python -c`, then the sandbox "
                        f"({args.isolation}) at {workers} workers")
    site_wall, site_lat = _bare(args.runs, ())
    wall, lat = _bare(args.runs, ("-I", "-S"))
    bare_median = statistics.median(lat)
    rows = [_row("bare python -c (serial)", args.runs, site_wall, site_lat, bare_median),
            _row("bare python -I -S -c (serial)", args.runs, wall, lat, bare_median)]
    isolation = None
    for k in workers:
        with Sandbox(SandboxConfig(workers=k, isolation=args.isolation)) as sandbox:
            isolation = sandbox.isolation_note
            wall, lat = _sandboxed(sandbox, args.runs)
        rows.append(_row(f"sandbox, {k} worker{'s' if k > 1 else ''}", args.runs, wall, lat,
                         bare_median))
    table = [["path", "runs", "exec/s", "median ms", "p90 ms", "x bare -I -S (median)"]]
    for r in rows:
        table.append([r["name"], str(r["runs"]), f"{r['executions_per_s']:.1f}",
                      f"{r['median_ms']:.1f}", f"{r['p90_ms']:.1f}",
                      f"{r['overhead_vs_bare']:.2f}"])
    print(f"isolation: {isolation}")
    print(format_table(table))
    write_results({"bench": "sandbox", "isolation": isolation, "rows": rows}, args.out)
    return 0

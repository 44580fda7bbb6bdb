"""What every benchmark shares: timing a call, the machine's reference rates, progress lines,
the printed table and the results JSON (with the machine it ran on).

Timing convention: a benchmarked call runs once as a warm-up (for jitted code that is
compilation + one run, reported on its own as ``first_run_s``), then ``repeats`` timed
runs whose median is the figure the benchmarks report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np

from .. import programs


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of the warm-up call (``first_s``) and of each timed call."""

    first_s: float
    runs_s: list[float]

    @property
    def median_s(self) -> float:
        return statistics.median(self.runs_s)

    def to_dict(self) -> dict:
        """``first_run_s``, ``runs_s`` and ``median_s``: the fields of a results JSON."""
        return {"first_run_s": self.first_s, "runs_s": list(self.runs_s),
                "median_s": self.median_s}


def time_runs(fn: Callable[[], object], repeats: int) -> Timing:
    """Call ``fn`` once as a warm-up, then ``repeats`` times, timing every call.

    ``fn`` must block until its work is done (``jax.block_until_ready``): asynchronous
    dispatch would otherwise be timed instead of the computation.
    """
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    runs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(first, runs)


def measure_matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    """fp32 GFLOP/s of one jitted ``[m, k] @ [k, n]`` matmul (median of ``repeats``)."""
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    timing = time_runs(lambda: matmul(a, b).block_until_ready(), repeats)
    return 2 * m * k * n / timing.median_s / 1e9


def measure_copy_bandwidth(nbytes: int = 256 * 2**20, repeats: int = 5) -> float:
    """Host memory bandwidth in bytes/s from a large ``np.copyto`` (read + write counted)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    timing = time_runs(lambda: np.copyto(dst, src), repeats)
    return 2 * nbytes / timing.median_s


def use_compilation_cache(directory: str | os.PathLike) -> None:
    """Keep every compiled XLA program in ``directory`` (no minimum compile time): runs that
    build fresh jitted closures of the same programs, in this process or a later one,
    compile each only once."""
    programs.use_compilation_cache(str(directory), min_compile_time_s=0.0)


def progress(bench: str, message: str) -> None:
    """A progress line ``[bench <bench>] <message>`` on stderr (stdout keeps the results)."""
    print(f"[bench {bench}] {message}", file=sys.stderr, flush=True)


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Plain-text table: the first row is the header, columns left-aligned and padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip()
                     for row in rows)


def machine_info() -> dict:
    """What the numbers were measured on: CPU count, OS, JAX/Flax versions, backend."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "jax": jax.__version__, "flax": flax.__version__,
            "backend": jax.default_backend()}


def write_results(results: dict, path: str | os.PathLike) -> Path:
    """Write a benchmark's results JSON (creating its folder), with :func:`machine_info`
    under ``"machine"``, and say where."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**results, "machine": machine_info()}, indent=2))
    print(f"wrote {out}")
    return out

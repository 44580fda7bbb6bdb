"""Run outputs: metrics as JSONL and TensorBoard events, and wall time per phase.

Only process 0 writes (multi-host runs compute the same global metrics everywhere).
Resuming from step ``k`` first drops the JSONL lines after ``k`` that a killed run had
written, so the file reads as one uninterrupted run; lines are never deleted: the file as it
was is kept next to it (``metrics.<time>.jsonl``) first. The directory may be local or a URL
(``gs://...``, through etils.epath); an object store cannot append, so there the file is
rewritten whole at each record.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from typing import Any, Mapping

import jax
from etils import epath

from .config import is_url


def _plain(value: Any):
    """JSON-safe scalar (NaN/inf become strings so the line stays valid JSON)."""
    try:
        value = value.item()
    except AttributeError:
        pass
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per record to ``<dir>/metrics.jsonl`` (and TensorBoard)."""

    def __init__(self, directory: str | os.PathLike, *, tensorboard: bool = True,
                 enabled: bool = True, filename: str = "metrics.jsonl"):
        self.directory = epath.Path(directory)
        self.enabled = enabled
        self.path = self.directory / filename
        self._appendable = not is_url(directory)
        self._lines: list[str] | None = None  # the file's lines, kept where it cannot append
        self._tb = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter  # writes gs:// itself

                self._tb = SummaryWriter(os.fspath(self.directory / "tensorboard"))

    def move_aside(self) -> epath.Path | None:
        """Keep an earlier run's file under a new name; returns that name (None: no file)."""
        if not self.enabled or not self.path.exists():
            return None
        kept = _unused_name(self.path)
        self.path.rename(kept)
        self._lines = None
        return kept

    def truncate_after(self, step: int) -> tuple[int, epath.Path | None]:
        """Drop records with ``step > step`` (left by a run killed after its last checkpoint)
        from the file, after keeping the whole file under a new name; returns how many were
        dropped and that name (None when nothing was dropped)."""
        if not self.enabled or not self.path.exists():
            return 0, None
        text = self.path.read_text()
        kept, dropped = [], 0
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                dropped += 1
                continue
            if int(record.get("step", -1)) > step:
                dropped += 1
            else:
                kept.append(line)
        if not dropped:
            return 0, None
        whole = _unused_name(self.path)
        whole.write_text(text)
        self._rewrite(kept)
        return dropped, whole

    def _rewrite(self, lines: list[str]) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.path)
        self._lines = None if self._appendable else list(lines)

    def log(self, step: int, metrics: Mapping[str, Any], *, kind: str = "train") -> dict:
        record = {"step": int(step), "kind": kind}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self.enabled:
            line = json.dumps(record)
            if self._appendable:
                with self.path.open("a") as f:
                    f.write(line + "\n")
            else:
                if self._lines is None:
                    self._lines = (self.path.read_text().splitlines() if self.path.exists()
                                   else [])
                self._rewrite(self._lines + [line])
            if self._tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) \
                            and k not in ("step",):
                        self._tb.add_scalar(f"{kind}/{k}", v, int(step))
        return record

    def log_text(self, step: int, tag: str, text: str) -> None:
        """A Markdown text record in TensorBoard (nothing without TensorBoard)."""
        if self.enabled and self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _unused_name(path: epath.Path) -> epath.Path:
    """``metrics.<time>.jsonl`` next to ``path``, not yet taken."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    return candidate


def read_metrics(path: str | os.PathLike, kind: str | None = "train") -> list[dict]:
    """The records of a ``metrics.jsonl`` (optionally only one ``kind``)."""
    out = []
    for line in epath.Path(path).read_text().splitlines():
        record = json.loads(line)
        if kind is None or record.get("kind") == kind:
            out.append(record)
    return out


class PhaseTimer:
    """Wall time per named phase of a step: ``with timer("generate"): ...``.

    Call :meth:`block` on the phase's outputs (``jax.block_until_ready``) so asynchronous
    dispatch does not move time into the next phase.
    """

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": v for k, v in self.seconds.items()}
        out["time/step"] = sum(self.seconds.values())
        self.seconds = {}
        return out


# JAX reports every XLA compilation (not a persistent-cache hit) under this event
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = {"count": 0, "seconds": 0.0}


def _on_event_duration(event: str, duration: float, **_) -> None:
    if event == _COMPILE_EVENT:
        _compiles["count"] += 1
        _compiles["seconds"] += duration


jax.monitoring.register_event_duration_secs_listener(_on_event_duration)


class CompileCounter:
    """XLA compilations of this process since the last :meth:`pop`: a step that compiles
    after the first one met a new shape (``compiles``, ``time/compile`` in the metrics)."""

    def __init__(self):
        self._count, self._seconds = _compiles["count"], _compiles["seconds"]

    def pop(self) -> dict[str, float]:
        count, seconds = _compiles["count"], _compiles["seconds"]
        out = {"compiles": count - self._count, "time/compile": seconds - self._seconds}
        self._count, self._seconds = count, seconds
        return out

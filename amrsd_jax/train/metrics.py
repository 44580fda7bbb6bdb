"""Run outputs: metrics as JSONL and TensorBoard events, and wall time per phase.

Only process 0 writes (multi-host runs compute the same global metrics everywhere).
Resuming from step ``k`` first drops the JSONL lines after ``k`` that a killed run had
written, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Mapping


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
        self.directory = Path(directory)
        self.enabled = enabled
        self.path = self.directory / filename
        self._tb = None
        if enabled:
            self.directory.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from tensorboardX import SummaryWriter

                self._tb = SummaryWriter(str(self.directory / "tensorboard"))

    def truncate_after(self, step: int) -> int:
        """Drop records with ``step > step`` (left by a run killed after its last checkpoint);
        returns how many were dropped."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                dropped += 1
                continue
            if int(record.get("step", -1)) > step:
                dropped += 1
            else:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)
        return dropped

    def log(self, step: int, metrics: Mapping[str, Any], *, kind: str = "train") -> dict:
        record = {"step": int(step), "kind": kind}
        record.update({k: _plain(v) for k, v in metrics.items()})
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self._tb is not None:
                for k, v in record.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) \
                            and k not in ("step",):
                        self._tb.add_scalar(f"{kind}/{k}", v, int(step))
        return record

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | os.PathLike, kind: str | None = "train") -> list[dict]:
    """The records of a ``metrics.jsonl`` (optionally only one ``kind``)."""
    out = []
    for line in Path(path).read_text().splitlines():
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

"""Local data sources and the prompt stream.

* :class:`FieldMap` says which row fields hold the question, the final answer, the reference
  solution (and optionally an id).
* :func:`load_local` reads a JSONL file (``.jsonl`` / ``.ndjson`` / line-delimited ``.json``,
  optionally ``.gz``) or a Parquet file (needs ``pyarrow``) into examples
  ``{"id", "question", "answer", "solution"}``. Bad rows raise :class:`DataFormatError`
  naming ``file:line`` and the problem, or are skipped and counted with
  ``on_bad_row="skip"``.
* :class:`PromptStream` turns a list of examples into an endless, deterministically shuffled,
  per-host sharded stream of fixed-size batches with a checkpointable position.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

__all__ = [
    "DataFormatError",
    "FieldMap",
    "LoadResult",
    "PromptStream",
    "extract_final_answer",
    "load_local",
]

_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_PARQUET_SUFFIXES = (".parquet", ".pq")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")


@dataclass(frozen=True)
class FieldMap:
    """Names of the row fields holding each part of an example.

    Attributes:
        question: field with the question / problem text.
        answer: field with the final answer (a string or a number).
        solution: field with a reference solution, or ``None`` (the example's ``solution``
            is then ``None``, unless ``answer_from_solution`` supplies one).
        answer_from_solution: the final answer is the text after the last ``####`` of the
            solution text (GSM8K style, ``"... 48 + 24 = 72\\n#### 72"``). The solution text
            is field ``solution`` if set, otherwise field ``answer`` (GSM8K keeps its worked
            solution in ``"answer"``); that full text becomes the example's ``solution``.
        id: field with a unique row id, or ``None`` to use ``"<file stem>:<line>"``.
    """

    question: str = "question"
    answer: str = "answer"
    solution: str | None = None
    answer_from_solution: bool = False
    id: str | None = None


class DataFormatError(ValueError):
    """A bad row in a data file; ``str(err)`` is ``"<path>:<line>: <problem>"``."""

    def __init__(self, path: str, line: int, problem: str, *, unit: str = "line"):
        self.path, self.line, self.problem = path, line, problem
        where = f"{path}:{line}" if unit == "line" else f"{path}: {unit} {line}"
        super().__init__(f"{where}: {problem}")


class LoadResult(NamedTuple):
    """What :func:`load_local` returns."""

    examples: list[dict[str, Any]]
    skipped: int  # bad rows skipped (always 0 with on_bad_row="error")
    problems: list[str]  # one "<path>:<line>: <problem>" message per skipped row


class _BadRow(Exception):
    pass


def extract_final_answer(text: str) -> str | None:
    """The text after the last ``####`` (first non-empty line, stripped), or ``None``.

    Thousands separators in a plain number are removed (``"1,234"`` -> ``"1234"``) and a
    trailing ``.`` is dropped.
    """
    i = text.rfind("####")
    if i < 0:
        return None
    rest = text[i + 4:].strip()
    if not rest:
        return None
    ans = rest.splitlines()[0].strip().rstrip(".").strip()
    if _THOUSANDS.fullmatch(ans):
        ans = ans.replace(",", "")
    return ans or None


def _text(row: Mapping[str, Any], name: str, *, numbers_ok: bool = False) -> str:
    if name not in row:
        keys = ", ".join(repr(k) for k in list(row)[:20])
        raise _BadRow(f"missing field {name!r} (row has: {keys or 'no fields'})")
    value = row[name]
    if value is None:
        raise _BadRow(f"field {name!r} is null")
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as e:
            raise _BadRow(f"field {name!r} has invalid UTF-8 bytes at byte {e.start}") from None
    if numbers_ok and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        value = str(value)
    if not isinstance(value, str):
        raise _BadRow(f"field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise _BadRow(f"field {name!r} is an empty string")
    return value


def _to_example(row: Any, fields: FieldMap, default_id: str) -> dict[str, Any]:
    if not isinstance(row, Mapping):
        raise _BadRow(f"expected a JSON object, got {type(row).__name__}")
    question = _text(row, fields.question)
    if fields.answer_from_solution:
        src = fields.solution if fields.solution is not None else fields.answer
        solution = _text(row, src)
        answer = extract_final_answer(solution)
        if answer is None:
            raise _BadRow(f"field {src!r} has no final answer after '####'")
    else:
        answer = _text(row, fields.answer, numbers_ok=True).strip()
        solution = _text(row, fields.solution) if fields.solution is not None else None
    ex_id = _text(row, fields.id, numbers_ok=True) if fields.id is not None else default_id
    return {"id": ex_id, "question": question, "answer": answer, "solution": solution}


def _file_stem(path: str) -> str:
    name = os.path.basename(path)
    return name.split(".", 1)[0] or name


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any]]:
    """Yields ``(line_number, parsed_row)``; a ``_BadRow`` instance stands for a bad line."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, _BadRow(f"invalid UTF-8 bytes at byte {e.start} of the line "
                                      f"({raw[e.start:e.end]!r})")
                continue
            if not line.strip():
                continue  # blank lines (e.g. a trailing newline) are not rows
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _BadRow(f"invalid JSON: {e.msg} (column {e.colno})")


def _parquet_rows(path: str) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"reading the Parquet file {path!r} needs pyarrow, which is not "
                          f"installed: `pip install pyarrow` (or convert the file to JSONL)"
                          ) from e
    n = 0
    for batch in pq.ParquetFile(path).iter_batches():
        for row in batch.to_pylist():
            n += 1
            yield n, row


def load_local(path: str | os.PathLike, fields: FieldMap | None = None, *,
               on_bad_row: str = "error", format: str | None = None) -> LoadResult:
    """Read a local JSONL or Parquet file into examples ``{"id","question","answer","solution"}``.

    Args:
        path: the file. ``.jsonl``, ``.ndjson``, ``.json`` (one JSON object per line; blank
            lines are ignored), each optionally ``.gz``; ``.parquet`` / ``.pq`` (needs pyarrow).
        fields: which fields to read (default ``FieldMap()``: ``question`` / ``answer``).
        on_bad_row: ``"error"`` raises :class:`DataFormatError` at the first bad row
            (message ``"<path>:<line>: <problem>"``; Parquet rows are numbered from 1);
            ``"skip"`` drops bad rows and counts them.
        format: ``"jsonl"`` or ``"parquet"`` to override detection from the file name.

    A row is bad when it is not valid UTF-8 or not valid JSON, is not an object, lacks a
    mapped field, has a null / empty / non-string (answers and ids may also be numbers)
    mapped field, has no ``####`` answer when ``answer_from_solution`` is set, or repeats an
    id from the ``id`` field.

    Returns:
        ``LoadResult(examples, skipped, problems)``.
    """
    path = os.fspath(path)
    fields = FieldMap() if fields is None else fields
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if format is None:
        base = path[:-3] if path.endswith(".gz") else path
        if base.endswith(_JSONL_SUFFIXES):
            format = "jsonl"
        elif base.endswith(_PARQUET_SUFFIXES):
            format = "parquet"
        else:
            raise ValueError(f"cannot tell the format of {path!r} from its name; expected "
                             f"{'/'.join(_JSONL_SUFFIXES + _PARQUET_SUFFIXES)} "
                             f"or pass format='jsonl'|'parquet'")
    if format == "jsonl":
        rows, unit = _jsonl_rows(path), "line"
    elif format == "parquet":
        rows, unit = _parquet_rows(path), "row"
    else:
        raise ValueError(f"format must be 'jsonl' or 'parquet', got {format!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such data file: {path!r}")

    stem = _file_stem(path)
    examples: list[dict[str, Any]] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    for lineno, row in rows:
        try:
            if isinstance(row, _BadRow):
                raise row
            ex = _to_example(row, fields, f"{stem}:{lineno}")
            if fields.id is not None:
                if ex["id"] in seen_ids:
                    raise _BadRow(f"duplicate id {ex['id']!r} in field {fields.id!r}")
                seen_ids.add(ex["id"])
        except _BadRow as bad:
            err = DataFormatError(path, lineno, str(bad), unit=unit)
            if on_bad_row == "error":
                raise err from None
            problems.append(str(err))
            continue
        examples.append(ex)
    return LoadResult(examples, len(problems), problems)


class PromptStream:
    """An endless stream of fixed-size batches of examples, shuffled and sharded per host.

    Epoch ``e`` visits the examples in the order ``rng.permutation(n)`` with
    ``rng = np.random.default_rng([seed, e])`` -- the same on every host; host ``i`` of
    ``shard_count`` takes every ``shard_count``-th element of it starting at ``i``, so the
    shards of an epoch partition it exactly. Every :meth:`next_batch` returns exactly
    ``batch_size`` examples (the per-host batch); a batch that reaches the end of the
    host's shard continues with the next epoch, so hosts stay in lock-step even when ``n``
    is not a multiple of ``shard_count`` (their shards then differ in size by one).

    The position is ``state_dict() == {"epoch", "index", "seed"}`` (``index`` counts
    examples already taken from this host's shard of ``epoch``); a stream built with the
    same arguments and given that state yields exactly the batches the original would have.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, seed: int = 0,
                 shard_index: int = 0, shard_count: int = 1):
        for name, v in (("batch_size", batch_size), ("seed", seed),
                        ("shard_index", shard_index), ("shard_count", shard_count)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an int, got {v!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        if shard_count < 1 or not 0 <= shard_index < shard_count:
            raise ValueError(f"need 0 <= shard_index < shard_count, got shard_index="
                             f"{shard_index}, shard_count={shard_count}")
        n = len(examples)
        if n < shard_count:
            raise ValueError(f"{n} examples cannot be sharded over {shard_count} hosts")
        self.examples = examples
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shard_index = int(shard_index)
        self.shard_count = int(shard_count)
        self._n = n
        self._shard_len = len(range(self.shard_index, n, self.shard_count))
        self._epoch = 0
        self._index = 0
        self._order_epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def examples_per_epoch(self) -> int:
        """Examples in this host's shard of one epoch."""
        return self._shard_len

    def epoch_order(self, epoch: int) -> np.ndarray:
        """Indices into ``examples`` this host visits in ``epoch``, in order."""
        perm = np.random.default_rng([self.seed, int(epoch)]).permutation(self._n)
        return perm[self.shard_index::self.shard_count]

    def _current_order(self) -> np.ndarray:
        if self._order_epoch != self._epoch:
            self._order = self.epoch_order(self._epoch)
            self._order_epoch = self._epoch
        return self._order

    def next_batch(self) -> list[Any]:
        """The next ``batch_size`` examples of this host's stream."""
        batch: list[Any] = []
        while len(batch) < self.batch_size:
            order = self._current_order()
            take = min(self.batch_size - len(batch), self._shard_len - self._index)
            batch.extend(self.examples[int(j)] for j in order[self._index:self._index + take])
            self._index += take
            if self._index == self._shard_len:
                self._epoch += 1
                self._index = 0
        return batch

    def __iter__(self) -> Iterator[list[Any]]:
        return self

    def __next__(self) -> list[Any]:
        return self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self._epoch, "index": self._index, "seed": self.seed}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"epoch", "index", "seed"} - set(state)
        if missing:
            raise KeyError(f"PromptStream state lacks {sorted(missing)}")
        epoch, index, seed = (int(state[k]) for k in ("epoch", "index", "seed"))
        if seed != self.seed:
            raise ValueError(f"state was saved with seed={seed} but this stream has "
                             f"seed={self.seed}; build the stream with the saved seed")
        if epoch < 0 or not 0 <= index <= self._shard_len:
            raise ValueError(f"invalid stream position epoch={epoch}, index={index} (this "
                             f"host's shard has {self._shard_len} examples per epoch)")
        if index == self._shard_len:
            epoch, index = epoch + 1, 0
        self._epoch, self._index = epoch, index

    def __repr__(self) -> str:
        return (f"PromptStream(n={self._n}, batch_size={self.batch_size}, seed={self.seed}, "
                f"shard={self.shard_index}/{self.shard_count}, epoch={self._epoch}, "
                f"index={self._index})")

"""Data layer (offline parts): the built-in arithmetic task, local files and the prompt stream.

* :class:`ArithmeticTask` -- deterministic arithmetic word problems in four levels, with
  disjoint train / test splits (the offline default task).
* :func:`load_local` + :class:`FieldMap` -- JSONL / Parquet rows to examples
  ``{"id", "question", "answer", "solution"}`` with file:line errors for bad rows.
* :class:`PromptStream` -- shuffled, per-host sharded, checkpointable batches of examples.

Pure Python + numpy (no JAX).
"""

from .arithmetic import (
    LEVELS,
    PROMPT_SUFFIX,
    TEST_FRACTION,
    ArithmeticTask,
    render_prompt,
    split_of,
)
from .sources import (
    DataFormatError,
    FieldMap,
    LoadResult,
    PromptStream,
    extract_final_answer,
    load_local,
)

__all__ = [
    "LEVELS",
    "PROMPT_SUFFIX",
    "TEST_FRACTION",
    "ArithmeticTask",
    "DataFormatError",
    "FieldMap",
    "LoadResult",
    "PromptStream",
    "extract_final_answer",
    "load_local",
    "render_prompt",
    "split_of",
]

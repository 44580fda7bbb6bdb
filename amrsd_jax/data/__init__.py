"""Data layer (offline parts): the built-in arithmetic task, local files and the prompt stream.

* :class:`ArithmeticTask` -- deterministic arithmetic word problems in four levels, with
  disjoint train / test splits (the offline default task).
* :func:`load_local` + :class:`FieldMap` -- JSONL / Parquet rows to examples
  ``{"id", "question", "answer", "solution"}`` with file:line errors for bad rows.
* :func:`load_tfds` -- a split of a TensorFlow Datasets dataset already prepared on disk,
  to the same examples (no TensorFlow needed; ``tensorflow_datasets`` is imported on the
  first call only).
* :class:`CodeTask` -- small Python functions to write, checked by generated asserts in the
  sandbox (``reward.name=python_tests``); :func:`load_humaneval` and
  :func:`load_code_jsonl` read HumanEval and users' own code problems.
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
from .code_task import (
    CODE_LEVELS,
    CODE_PROMPT_SUFFIX,
    CodeTask,
    load_code_jsonl,
    load_humaneval,
)
from .sources import (
    DataFormatError,
    FieldMap,
    LoadResult,
    PromptStream,
    extract_final_answer,
    load_local,
)
from .tfds_source import DatasetNotPreparedError, load_tfds

__all__ = [
    "CODE_LEVELS",
    "CODE_PROMPT_SUFFIX",
    "CodeTask",
    "LEVELS",
    "PROMPT_SUFFIX",
    "TEST_FRACTION",
    "ArithmeticTask",
    "DataFormatError",
    "DatasetNotPreparedError",
    "FieldMap",
    "LoadResult",
    "PromptStream",
    "extract_final_answer",
    "load_code_jsonl",
    "load_humaneval",
    "load_local",
    "load_tfds",
    "render_prompt",
    "split_of",
]

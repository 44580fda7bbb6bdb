"""Prompts from a TensorFlow Datasets (TFDS) dataset that is already prepared on disk.

:func:`load_tfds` reads one split of a prepared TFDS dataset into the same examples
``{"id", "question", "answer", "solution"}`` as :func:`~amrsd_jax.data.load_local`, with the
same :class:`~amrsd_jax.data.FieldMap` and the same bad-row rules. It never downloads: a
dataset must have been prepared (``tfds build NAME --data_dir DIR``) on a machine with
network, or its prepared directory copied here.

No TensorFlow is needed. Records are read straight from the prepared files in TFDS's read
order (file by file as listed in the dataset info, each file front to back; no shuffling
-- :class:`~amrsd_jax.data.PromptStream` does the seeded shuffling and per-host sharding)
and parsed with TFDS's numpy ``tf.train.Example`` parser. All three common file formats
read this way: ``array_record`` (via the ``array_record`` package TFDS installs on Linux),
``parquet`` (via ``pyarrow``; but TFDS 4.9.10 writes parquet splits of over 100 rows
wrongly, which is detected and raised) and ``tfrecord`` (TFDS's default; read by a small
framing reader here, since TFDS itself reads tfrecord only through TensorFlow).

``tensorflow_datasets`` is imported on the first call, not when ``amrsd_jax`` is imported.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from .sources import DataFormatError, FieldMap, LoadResult, _BadRow, _to_example

__all__ = ["DatasetNotPreparedError", "load_tfds"]

_CHUNK = 512  # records per array_record read / parquet batch


class DatasetNotPreparedError(FileNotFoundError):
    """The TFDS dataset is not prepared in the data_dir (and :func:`load_tfds` never downloads)."""


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # pragma: no cover - it is a core dependency
        raise ImportError(
            "load_tfds needs the tensorflow-datasets package (a dependency of amrsd_jax; "
            "reinstall with `pip install -e .` or run `pip install tensorflow-datasets`). "
            "TensorFlow itself is not needed.") from e
    return tfds


def _fix_hint(name: str, data_dir: str) -> str:
    base = name.split(":", 1)[0]
    return (f"load_tfds never downloads. Fix: on a machine with network run "
            f"`tfds build {base} --data_dir {data_dir} --file_format=array_record` "
            f"(array_record or tfrecord, the default, both read without TensorFlow), then copy "
            f"the prepared directory {os.path.join(data_dir, base.split('/')[0])!r} to this "
            f"machine's data_dir; or pass the data_dir where it is already prepared.")


def _feature_names(features: Any, prefix: str = "") -> list[str]:
    """Flat feature names (nested dicts joined with ``/``) of a ``FeaturesDict``."""
    names = []
    items = features.items() if hasattr(features, "items") else ()
    for key, sub in items:
        full = f"{prefix}{key}"
        if sub.__class__.__name__ == "FeaturesDict":
            names.extend(_feature_names(sub, full + "/"))
        else:
            names.append(full)
    return names


def _plain(value: Any) -> Any:
    """numpy scalars -> Python scalars, other arrays -> lists; bytes / str are kept."""
    if hasattr(value, "ndim") and hasattr(value, "tolist") and not isinstance(
            value, (bytes, str)):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _flatten_row(row: Mapping[str, Any], prefix: str = "", out: dict | None = None) -> dict:
    out = {} if out is None else out
    for key, value in row.items():
        if isinstance(value, Mapping):
            _flatten_row(value, f"{prefix}{key}/", out)
        else:
            out[f"{prefix}{key}"] = _plain(value)
    return out


# ---------------------------------------------------------------- raw record readers
# Each yields the serialized tf.train.Example bytes of rows [skip, skip + take) of one
# file; a read error of the file itself (missing, truncated, fewer records than the dataset
# info says) raises OSError -- it is not a bad row.

def _array_record_records(path: str, skip: int, take: int) -> Iterator[bytes]:
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(path)
    try:
        _check_count(path, reader.num_records(), skip + take)
        for begin in range(skip, skip + take, _CHUNK):
            yield from reader.read(begin, min(begin + _CHUNK, skip + take))
    finally:
        reader.close()


def _parquet_records(path: str, skip: int, take: int) -> Iterator[bytes]:
    import pyarrow.parquet as pq

    pos, end = 0, skip + take
    pf = pq.ParquetFile(path)
    _check_count(path, pf.metadata.num_rows, end,
                 " (TFDS 4.9.10's parquet writer drops rows of splits with over 100 rows; "
                 "rebuild with --file_format=array_record)")
    for batch in pf.iter_batches(batch_size=_CHUNK):
        n = batch.num_rows
        if pos + n > skip:
            col = batch.column(0)  # TFDS stores the serialized example in column "data"
            for i in range(max(skip - pos, 0), min(n, end - pos)):
                yield col[i].as_py()
        pos += n
        if pos >= end:
            return


def _tfrecord_records(path: str, skip: int, take: int) -> Iterator[bytes]:
    """TFRecord framing: ``u64 length, u32 masked crc32c(length), data, u32 crc(data)``.

    The length CRC is checked (catches truncated / misaligned files); the payload CRC is
    not (pure-Python CRC32C is slow) -- a corrupt payload fails to parse and is a bad row.
    """
    with open(path, "rb") as f:
        index = 0
        while index < skip + take:
            header = f.read(12)
            if not header:
                break
            if len(header) < 12:
                raise OSError(f"{path}: truncated TFRecord header of record {index}")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc32c(header[:8]) != length_crc:
                raise OSError(f"{path}: corrupt TFRecord length of record {index} (CRC "
                              f"mismatch); re-copy or rebuild the prepared dataset")
            if index < skip:
                f.seek(length + 4, os.SEEK_CUR)
            else:
                data = f.read(length)
                if len(data) < length or len(f.read(4)) < 4:
                    raise OSError(f"{path}: truncated TFRecord record {index}")
                yield data
            index += 1
    _check_count(path, index, skip + take)


def _check_count(path: str, have: int, need: int, hint: str = "") -> None:
    if have < need:
        raise OSError(f"{path}: has {have} records but the dataset info says at least "
                      f"{need}; the prepared copy is incomplete or was written wrongly{hint}")


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc32c_table()


def _masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C (Castagnoli) of ``data``."""
    c = 0xFFFFFFFF
    for b in data:
        c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    c ^= 0xFFFFFFFF
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


_READERS = {"array_record": _array_record_records, "parquet": _parquet_records,
            "tfrecord": _tfrecord_records}


def _raw_records(builder: Any, split: str, where: str) -> Iterator[bytes]:
    info = builder.info
    fmt = info.file_format
    fmt = "tfrecord" if fmt is None else getattr(fmt, "value", str(fmt))
    reader = _READERS.get(fmt)
    if reader is None:
        raise ValueError(f"{where}: the dataset is prepared in the {fmt!r} file format, "
                         f"which load_tfds cannot read; rebuild it with "
                         f"`--file_format=array_record` (or parquet / tfrecord)")
    try:
        instructions = info.splits[split].file_instructions
    except (KeyError, ValueError) as e:
        raise ValueError(f"TFDS dataset {builder.name!r} in {builder.data_dir!r} has no "
                         f"split {split!r} (splits: {sorted(info.splits)}): {e}") from None
    for fi in instructions:
        if fi.take > 0:
            path = os.path.join(os.fspath(builder.data_dir), os.fspath(fi.filename))
            yield from reader(path, fi.skip, fi.take)  # (join keeps an absolute filename)


def _builder(tfds: Any, name: str, data_dir: str | None) -> Any:
    """A read-only builder made from the prepared files alone (``dataset_info.json`` and
    ``features.json``): no dataset code is imported and nothing is downloaded. (``tfds.builder``
    is avoided: for an unknown name it lists the community catalog, which goes online.)"""
    from tensorflow_datasets.core import read_only_builder, registered

    shown_dir = data_dir if data_dir is not None else tfds.core.constants.DATA_DIR
    try:
        builder = read_only_builder.builder_from_files(name, data_dir=data_dir)
    except registered.DatasetNotFoundError:
        builder = None
    if builder is None or not builder.is_prepared():
        raise DatasetNotPreparedError(
            f"TFDS dataset {name!r} is not prepared in data_dir {shown_dir!r} (no "
            f"prepared copy with dataset_info.json and features.json under "
            f"{os.path.join(shown_dir, name.split(':', 1)[0])!r}). "
            f"{_fix_hint(name, shown_dir)}")
    return builder


def load_tfds(name: str, split: str, fields: FieldMap | None = None, *,
              data_dir: str | os.PathLike | None = None, on_bad_row: str = "skip",
              limit: int | None = None) -> LoadResult:
    """Read a split of a prepared TFDS dataset into ``{"id","question","answer","solution"}``.

    Args:
        name: the TFDS name, optionally with config and version (``"gsm8k"``,
            ``"my_ds/cfg:1.0.0"``). A dataset TFDS has no code for is read from its prepared
            files in ``data_dir`` alone.
        split: a split, with TFDS slicing if wanted (``"train"``, ``"test[:200]"``).
        fields: which features to read (default ``FieldMap()``: ``question`` / ``answer``);
            nested features are named ``"outer/inner"``. For TFDS's ``gsm8k`` (features
            ``question``, ``answer`` = worked solution ending ``#### 72``, ``annotation``,
            ``short_answer``) use ``FieldMap(answer_from_solution=True)`` or
            ``FieldMap(answer="short_answer", solution="answer")``.
        data_dir: the TFDS data directory holding the prepared dataset (default: TFDS's,
            ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
        on_bad_row: ``"skip"`` (default) drops bad rows, counts them and reports each as
            ``"<name>/<split>: row <k>: <problem>"``; ``"error"`` raises
            :class:`~amrsd_jax.data.DataFormatError` with that message at the first one.
        limit: read at most the first ``limit`` rows of the split (bad rows count).

    Rows are numbered from 1 in read order; a row's id is field ``fields.id`` or else
    ``"<name>/<split>:<row>"``. A row is bad when a mapped text is not valid UTF-8, null or
    empty, has no ``####`` answer with ``answer_from_solution``, repeats an id, or its
    record cannot be parsed. A mapped feature the dataset does not have is a
    ``ValueError`` (not a bad row).

    Raises:
        DatasetNotPreparedError: the dataset is not prepared in ``data_dir`` (the message
            names the dataset, the data_dir and the ``tfds build`` command that fixes it).

    Returns:
        ``LoadResult(examples, skipped, problems)``, examples in TFDS read order.
    """
    fields = FieldMap() if fields is None else fields
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise ValueError(f"limit must be None or an int >= 0, got {limit!r}")
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if data_dir is not None:
        data_dir = os.fspath(data_dir)

    tfds = _import_tfds()
    builder = _builder(tfds, name, data_dir)
    features = builder.info.features
    available = _feature_names(features)
    if fields.answer_from_solution:  # the answer comes from the solution text
        used = (fields.question, fields.solution or fields.answer, fields.id)
    else:
        used = (fields.question, fields.answer, fields.solution, fields.id)
    wanted = [f for f in used if f is not None]
    unknown = [f for f in wanted if f not in available]
    if unknown:
        raise ValueError(f"TFDS dataset {name!r} has no feature(s) {unknown} named in "
                         f"{fields}; its features are {available}")

    where = f"{name}/{split}"
    examples: list[dict[str, Any]] = []
    problems: list[str] = []
    seen_ids: set[str] = set()
    row = 0
    records = _raw_records(builder, split, where)
    try:
        for raw in itertools.islice(records, limit):
            row += 1
            try:
                try:
                    decoded = features.deserialize_example_np(raw)
                except Exception as e:  # a corrupt record is a bad row
                    raise _BadRow(f"cannot parse the record: {type(e).__name__}: {e}") from None
                ex = _to_example(_flatten_row(decoded), fields, f"{where}:{row}")
                if fields.id is not None:
                    if ex["id"] in seen_ids:
                        raise _BadRow(f"duplicate id {ex['id']!r} in field {fields.id!r}")
                    seen_ids.add(ex["id"])
            except _BadRow as bad:
                err = DataFormatError(where, row, str(bad), unit="row")
                if on_bad_row == "error":
                    raise err from None
                problems.append(str(err))
                continue
            examples.append(ex)
    finally:
        records.close()
    return LoadResult(examples, len(problems), problems)

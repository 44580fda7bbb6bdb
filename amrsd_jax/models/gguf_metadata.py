"""GGUF key/value metadata, read without touching the tensor data (numpy + ``gguf`` only).

The bottom of the GGUF stack in :mod:`amrsd_jax.models`: :mod:`~amrsd_jax.models.tokenizer`
(tokenizer from ``tokenizer.ggml.*`` keys) and :mod:`~amrsd_jax.models.gguf_import` (checkpoint
conversion) both read metadata through it, and it imports neither.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import gguf
import numpy as np

__all__ = ["metadata_from_reader", "read_gguf_metadata"]

# GGUF value type id -> (struct format, size) for scalars; numpy dtype for array fast paths.
_SCALAR_FMT: dict[int, tuple[str, int]] = {
    0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
    6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8),
}
_SCALAR_NP = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
              10: "<u8", 11: "<i8", 12: "<f8"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Key/value metadata of a GGUF file, without touching the tensor data.

    ``gguf.GGUFReader`` builds a numpy view per array element, which takes seconds for a
    49k-token vocabulary; this reads the header sequentially and takes milliseconds.
    Values are python scalars / strings, arrays are lists (like ``ReaderField.contents()``).
    Falls back to ``GGUFReader`` for files it does not handle (big-endian, GGUF v1).
    """
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        buf = memoryview(mm)
        try:
            magic, version = struct.unpack_from("<II", buf, 0)
            if magic != gguf.GGUF_MAGIC:
                raise ValueError(f"{path} is not a GGUF file (bad magic)")
            if version not in (2, 3):  # v1 has 32-bit counts; byte-swapped files show 0 here
                return metadata_from_reader(gguf.GGUFReader(path))
            _n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
            pos = 24
            meta: dict[str, Any] = {}
            for _ in range(n_kv):
                key, pos = _read_str(buf, pos)
                (vtype,) = struct.unpack_from("<I", buf, pos)
                meta[key], pos = _read_value(buf, pos + 4, vtype)
            return meta
        finally:
            buf.release()


def _read_str(buf: memoryview, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    pos += 8
    return str(buf[pos:pos + n], "utf-8"), pos + n


def _read_value(buf: memoryview, pos: int, vtype: int) -> tuple[Any, int]:
    if vtype == _GGUF_STRING:
        return _read_str(buf, pos)
    if vtype in _SCALAR_FMT:
        fmt, size = _SCALAR_FMT[vtype]
        return struct.unpack_from(fmt, buf, pos)[0], pos + size
    if vtype != _GGUF_ARRAY:
        raise ValueError(f"unknown GGUF value type {vtype}")
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if itype in _SCALAR_NP:
        dt = np.dtype(_SCALAR_NP[itype])
        values = np.frombuffer(buf, dtype=dt, count=count, offset=pos).tolist()
        return values, pos + count * dt.itemsize
    items = []
    for _ in range(count):
        item, pos = _read_value(buf, pos, itype)
        items.append(item)
    return items, pos


def metadata_from_reader(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Key/value metadata of an open ``GGUFReader`` (same layout as :func:`read_gguf_metadata`)."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}

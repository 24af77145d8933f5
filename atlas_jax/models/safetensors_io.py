"""Minimal safetensors reader/writer that never maps a whole file into memory.

Reading goes tensor by tensor with positioned reads, so host memory holds one tensor at a
time (page cache is not charged to the process as a memory map would be); writing streams
tensors from a callback so a sharded on-device model is fetched one piece at a time.
Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape,
data_offsets}}, then the raw little-endian bytes.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

_DTYPES = {
    "F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}


class SafetensorsFile:
    """Random access to the tensors of one .safetensors file."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        self._data_start = 8 + n
        self.entries = header

    def keys(self) -> Iterable[str]:
        return self.entries.keys()

    def read(self, name: str) -> np.ndarray:
        entry = self.entries[name]
        if entry["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        buf = np.empty(end - begin, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(memoryview(buf)) != end - begin:
                raise ValueError(f"{self.path}: tensor {name!r} is truncated")
        return buf.view(_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def write(path: str, specs: dict[str, tuple[tuple[int, ...], np.dtype]],
          fetch: Callable[[str], np.ndarray]) -> None:
    """Writes tensors named in `specs` (shape, dtype), calling fetch(name) for each in turn."""
    header, offset = {}, 0
    for name, (shape, dtype) in specs.items():
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps tensor data 8-byte aligned
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, (shape, dtype) in specs.items():
            array = np.ascontiguousarray(fetch(name), dtype=dtype)
            if array.shape != tuple(shape):
                raise ValueError(f"{path}: tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
            f.write(array.tobytes())
    os.replace(tmp, path)

"""The IDX format of MNIST and Fashion-MNIST: a magic number, the dimensions, then raw uint8 values."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from pipeline.errors import DataError

_UINT8 = 0x08


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file of unsigned bytes (optionally gzip-compressed) into an array of its shape."""
    path = Path(path)
    raw = (gzip.decompress if path.suffix == ".gz" else bytes)(path.read_bytes())
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype, ndim = raw[2], raw[3]
    if dtype != _UINT8:
        raise DataError(f"{path}: IDX element type 0x{dtype:02x} is not supported; only unsigned bytes (0x08)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path}: IDX payload has {len(raw) - header} bytes, its header says {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as IDX (gzip-compressed if `path` ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(f">BBBB{array.ndim}I", 0, 0, _UINT8, array.ndim, *array.shape) + array.tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(payload, mtime=0) if path.suffix == ".gz" else payload)

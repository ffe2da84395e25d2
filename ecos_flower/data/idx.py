"""A strict reader for the MNIST idx format (optionally gzipped), written with numpy + gzip."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np

from .errors import DataError

# Third byte of the magic number -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/).
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (EOFError, OSError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read (truncated or corrupt gzip?): {exc}") from None


def read_idx(path: Path, ndim: int | None = None) -> np.ndarray:
    """Parse one idx file; raise DataError naming the file on a bad magic, dims or length."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    zero0, zero1, code, dims = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES:
        raise DataError(
            f"{path}: bad idx magic number 0x{raw[:4].hex()} (expected 0x0000TTDD with a known "
            "type byte TT, e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    if ndim is not None and dims != ndim:
        raise DataError(f"{path}: idx file has {dims} dimensions, expected {ndim}")
    header = 4 + 4 * dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header ({len(raw)} bytes, need {header})")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=dims, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    actual = len(raw) - header
    if actual != expected:
        kind = "truncated" if actual < expected else "has trailing bytes"
        raise DataError(
            f"{path}: idx file {kind}: header says shape {shape} ({expected} data bytes), "
            f"file holds {actual}"
        )
    return (
        np.frombuffer(raw, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )

"""The IDX file format of MNIST and its kin (Fashion-MNIST, KMNIST, notMNIST): unsigned-byte
data of 1 to 4 dimensions, gzipped or not (told by the content, not the name)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

GZIP_MAGIC = b"\x1f\x8b"
# IDX magic: two zero bytes, a type code, then the number of dimensions.
_UBYTE = 0x08


class IdxError(ValueError):
    """A file or byte string that is not well-formed unsigned-byte IDX data."""


def parse_idx(raw: bytes, name: str = "<idx>") -> np.ndarray:
    """IDX bytes -> a read-only uint8 array of the header's shape. Checks the magic number,
    the type, the dimensions and the exact length; errors name `name`."""
    if len(raw) < 4:
        raise IdxError(f"{name}: {len(raw)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0:
        raise IdxError(f"{name}: bad magic number {raw[:4].hex()} (IDX starts with 0000, then its type)")
    if dtype_code != _UBYTE:
        raise IdxError(f"{name}: IDX type 0x{dtype_code:02x} is not unsigned byte (0x08)")
    if not 1 <= ndim <= 4:
        raise IdxError(f"{name}: IDX with {ndim} dimensions (expected 1 to 4)")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxError(f"{name}: truncated header ({len(raw)} of {header} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise IdxError(f"{name}: {what}: {len(raw)} bytes, but a header of dimensions "
                       f"{dims} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def gunzip_if_gzipped(raw: bytes, name: str) -> bytes:
    """`raw`, decompressed when it is a gzip stream."""
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise IdxError(f"{name}: corrupt gzip stream ({exc})") from None


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read one IDX file, gzipped or not."""
    path = Path(path)
    if not path.is_file():
        raise IdxError(f"{path}: no such file")
    return parse_idx(gunzip_if_gzipped(path.read_bytes(), str(path)), str(path))

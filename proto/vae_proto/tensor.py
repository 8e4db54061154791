"""The one place where numpy arrays become vae.v1 Tensors and back.

Structure only (dtype, shape, byte length); what values are allowed is the server's business.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from vae_proto import vae_pb2

_NUMPY: dict[vae_pb2.DType, np.dtype[Any]] = {
    vae_pb2.FLOAT32: np.dtype("<f4"), vae_pb2.UINT8: np.dtype("u1")}
_PROTO: dict[np.dtype[Any], vae_pb2.DType] = {
    np.dtype("<f4"): vae_pb2.FLOAT32, np.dtype("u1"): vae_pb2.UINT8}


MAX_DIMS = 32  # numpy holds up to 64; no tensor of this API has more than 3


class TensorError(ValueError):
    """A Tensor message whose dtype, shape and byte length do not agree."""


def to_tensor(array: np.ndarray) -> vae_pb2.Tensor:
    """float32 or uint8 ndarray -> Tensor (little-endian, row-major bytes)."""
    arr = np.asarray(array)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.kind == "f" else arr.dtype
    if dtype not in _PROTO:
        raise TensorError(f"dtype {arr.dtype} has no wire form; use float32 or uint8")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    return vae_pb2.Tensor(dtype=_PROTO[dtype], shape=arr.shape, data=arr.tobytes())


def from_tensor(tensor: vae_pb2.Tensor, name: str = "tensor") -> np.ndarray:
    """Tensor -> read-only ndarray viewing the message's bytes (no copy)."""
    dtype = _NUMPY.get(tensor.dtype)
    if dtype is None:
        raise TensorError(f"{name}.dtype: {tensor.dtype} is not FLOAT32 (1) or UINT8 (2)")
    shape = tuple(tensor.shape)
    if len(shape) > MAX_DIMS:
        raise TensorError(f"{name}.shape: {len(shape)} dimensions; at most {MAX_DIMS}")
    if shape and min(shape) < 0:
        raise TensorError(f"{name}.shape: {list(shape)} has a negative dimension")
    data = tensor.data
    count = math.prod(shape)
    if count * dtype.itemsize != len(data):
        raise TensorError(
            f"{name}.data: {len(data)} bytes, but shape {list(shape)} of "
            f"{vae_pb2.DType.Name(tensor.dtype)} needs {count * dtype.itemsize}"
        )
    try:
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    except ValueError:  # e.g. a 0 beside a dimension too large for numpy's index type
        raise TensorError(f"{name}.shape: {list(shape)} is too large a shape") from None


# -- Replies as bytes -------------------------------------------------------------------------
# The server's hot replies are tensors of images. Building them as messages costs a copy of
# the pixels into the message and another into the serialised bytes; these functions write
# the same wire format (the bytes SerializeToString gives, field for field) with one copy.

_VARINT, _LEN = 0, 2


_SMALL_VARINTS = [bytes([i]) for i in range(128)]


def _varint(n: int) -> bytes:
    if n < 128:
        return _SMALL_VARINTS[n]
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def varint_field(number: int, value: int) -> bytes:
    """An unsigned integer (or enum) field; proto3 leaves a 0 out."""
    return _key(number, _VARINT) + _varint(value) if value else b""


# Everything before the pixels depends on the field number, dtype and shape alone: replies of
# the same shape (a server's single-image Decode) reuse it.
_PREFIXES: dict[tuple[int, int, tuple[int, ...]], bytes] = {}
_MAX_PREFIXES = 4096


def tensor_field(number: int, array: np.ndarray) -> list[bytes | np.ndarray]:
    """`array` as the Tensor field `number` of an enclosing message: pieces for b"".join(),
    equal to serialising that field set to to_tensor(array)."""
    arr = np.asarray(array)
    code = _PROTO.get(arr.dtype)
    if code is None or not arr.flags.c_contiguous or arr.ndim == 0:
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.kind == "f" else arr.dtype
        code = _PROTO.get(dtype)
        if code is None:
            raise TensorError(f"dtype {arr.dtype} has no wire form; use float32 or uint8")
        arr = np.ascontiguousarray(arr, dtype=dtype)
    cache_key = (number, code, arr.shape)
    prefix = _PREFIXES.get(cache_key)
    if prefix is None:
        nbytes = arr.nbytes
        head = _key(1, _VARINT) + _varint(code)
        packed = b"".join([_varint(s) for s in arr.shape])
        head += _key(2, _LEN) + _varint(len(packed)) + packed
        if nbytes:
            head += _key(3, _LEN) + _varint(nbytes)
        prefix = _key(number, _LEN) + _varint(len(head) + nbytes) + head
        if len(_PREFIXES) >= _MAX_PREFIXES:
            _PREFIXES.clear()
        _PREFIXES[cache_key] = prefix
    # bytes.join() reads a C-contiguous array through the buffer protocol: the one copy.
    return [prefix, arr]


def message_bytes(*fields: bytes | list[bytes | np.ndarray]) -> bytes:
    """Join encoded fields (in field-number order) into one serialised message."""
    pieces: list[bytes | np.ndarray] = []
    for f in fields:
        if isinstance(f, list):
            pieces.extend(f)
        else:
            pieces.append(f)
    # ndarrays are buffers (numpy's stubs do not say so); tensor_field made them contiguous.
    return b"".join(pieces)  # type: ignore[arg-type]

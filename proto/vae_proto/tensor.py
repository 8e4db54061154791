"""The one place where numpy arrays become vae.v1 Tensors and back.

Structure only (dtype, shape, byte length); what values are allowed is the server's business.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor

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
    # Counted before it is copied: a message of millions of dimensions would hold the server's
    # event loop while they were copied, for a refusal.
    if len(tensor.shape) > MAX_DIMS:
        raise TensorError(f"{name}.shape: {len(tensor.shape)} dimensions; at most {MAX_DIMS}")
    shape = tuple(tensor.shape)
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
# the pixels into the message and another into the serialised bytes; these fields write the
# same wire format (the bytes SerializeToString gives, field for field) with one copy. Field
# numbers and types come from the generated descriptors, checked when a field is declared: a
# field renumbered or retyped in the .proto changes what is written, or fails at import.

_VARINT, _LEN = 0, 2
_SMALL_VARINTS = [bytes([i]) for i in range(128)]
_UNSIGNED = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_UINT32)


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


def _descriptor(message: Any, name: str) -> FieldDescriptor:
    fields = message.DESCRIPTOR.fields_by_name
    if name not in fields:
        raise TypeError(f"{message.DESCRIPTOR.full_name} has no field {name!r}")
    field: FieldDescriptor = fields[name]
    if field.is_repeated:
        raise TypeError(f"{field.full_name} is repeated; only single fields are written here")
    return field


def _tensor_field_keys() -> tuple[bytes, bytes, bytes]:
    fields = vae_pb2.Tensor.DESCRIPTOR.fields_by_name
    if (fields["dtype"].type != FieldDescriptor.TYPE_ENUM
            or fields["shape"].type != FieldDescriptor.TYPE_INT64
            or fields["data"].type != FieldDescriptor.TYPE_BYTES):
        raise TypeError("vae.v1.Tensor is no longer (enum dtype, repeated int64 shape, bytes data)")
    return (_key(fields["dtype"].number, _VARINT), _key(fields["shape"].number, _LEN),
            _key(fields["data"].number, _LEN))


_DTYPE_KEY, _SHAPE_KEY, _DATA_KEY = _tensor_field_keys()


class UIntField:
    """An unsigned integer field (uint64 or uint32) of `message`, named `name`."""

    def __init__(self, message: Any, name: str) -> None:
        field = _descriptor(message, name)
        if field.type not in _UNSIGNED:
            raise TypeError(f"{field.full_name} is not an unsigned integer")
        self._key = _key(field.number, _VARINT)

    def __call__(self, value: int) -> bytes:
        """The field set to `value`; proto3 leaves a 0 out."""
        return self._key + _varint(value) if value else b""


class TensorField:
    """A vae.v1.Tensor field of `message`, named `name`, written from an ndarray."""

    _MAX_PREFIXES = 4096

    def __init__(self, message: Any, name: str) -> None:
        field = _descriptor(message, name)
        if field.message_type is not vae_pb2.Tensor.DESCRIPTOR:
            raise TypeError(f"{field.full_name} is not a {vae_pb2.Tensor.DESCRIPTOR.full_name}")
        self._key = _key(field.number, _LEN)
        # Everything before the pixels depends on the dtype and shape alone: replies of the
        # same shape (a server's single-image Decode) reuse it.
        self._prefixes: dict[tuple[int, tuple[int, ...]], bytes] = {}

    def __call__(self, array: np.ndarray) -> list[bytes | np.ndarray]:
        """Pieces for message_bytes(), equal to serialising this field set to
        to_tensor(array)."""
        arr = np.asarray(array)
        code = _PROTO.get(arr.dtype)
        if code is None or not arr.flags.c_contiguous or arr.ndim == 0:
            dtype = arr.dtype.newbyteorder("<") if arr.dtype.kind == "f" else arr.dtype
            code = _PROTO.get(dtype)
            if code is None:
                raise TensorError(f"dtype {arr.dtype} has no wire form; use float32 or uint8")
            arr = np.ascontiguousarray(arr, dtype=dtype)
        prefix = self._prefixes.get((code, arr.shape))
        if prefix is None:
            nbytes = arr.nbytes
            packed = b"".join([_varint(s) for s in arr.shape])
            head = _DTYPE_KEY + _varint(code) + _SHAPE_KEY + _varint(len(packed)) + packed
            if nbytes:
                head += _DATA_KEY + _varint(nbytes)
            prefix = self._key + _varint(len(head) + nbytes) + head
            if len(self._prefixes) >= self._MAX_PREFIXES:
                self._prefixes.clear()
            self._prefixes[(code, arr.shape)] = prefix
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
    # ndarrays are buffers (numpy's stubs do not say so); TensorField made them contiguous.
    return b"".join(pieces)  # type: ignore[arg-type]


# A message's bytes beyond its arrays (field keys, lengths, shapes, small fields), with room.
MESSAGE_OVERHEAD = 4096


def images_per_message(message_bytes: int, image_bytes: int = 28 * 28 * 4) -> int:
    """The most images of `image_bytes` each (float32 28 x 28 ones by default, with whatever
    rides beside each) that one message of `message_bytes` carries."""
    return max(0, (message_bytes - MESSAGE_OVERHEAD) // image_bytes)

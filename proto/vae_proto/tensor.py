"""The one place where numpy arrays become vae.v1 Tensors and back.

Structure only (dtype, shape, byte length); what values are allowed is the server's business.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vae_proto import vae_pb2

_NUMPY: dict[vae_pb2.DType, np.dtype[Any]] = {
    vae_pb2.FLOAT32: np.dtype("<f4"), vae_pb2.UINT8: np.dtype("u1")}
_PROTO: dict[np.dtype[Any], vae_pb2.DType] = {
    np.dtype("<f4"): vae_pb2.FLOAT32, np.dtype("u1"): vae_pb2.UINT8}


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
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise TensorError(f"{name}.shape: {list(shape)} has a negative dimension")
    count = 1
    for s in shape:
        count *= s
    if count * dtype.itemsize != len(tensor.data):
        raise TensorError(
            f"{name}.data: {len(tensor.data)} bytes, but shape {list(shape)} of "
            f"{vae_pb2.DType.Name(tensor.dtype)} needs {count * dtype.itemsize}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)

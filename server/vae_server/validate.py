"""Request checks: each failure is an InvalidArgument naming the field and the limit."""

from __future__ import annotations

import math

import numpy as np

from vae_proto import vae_pb2
from vae_proto.tensor import TensorError, from_tensor
from vae_server.errors import InvalidArgument

IMAGE_SIDE = 28


def tensor(msg: vae_pb2.Tensor, field: str) -> np.ndarray:
    try:
        return from_tensor(msg, field)
    except TensorError as exc:
        raise InvalidArgument(str(exc)) from None


def count(n: int, field: str, limit: int, low: int = 1) -> int:
    if not low <= n <= limit:
        raise InvalidArgument(f"{field}: {n} is out of range; it must be {low} .. {limit}")
    return n


def output_dtype(value: int, field: str = "output_dtype") -> int:
    if value == vae_pb2.DTYPE_UNSPECIFIED:
        return vae_pb2.FLOAT32
    if value not in (vae_pb2.FLOAT32, vae_pb2.UINT8):
        raise InvalidArgument(f"{field}: {value} is not FLOAT32 (1) or UINT8 (2)")
    return value


def images(msg: vae_pb2.Tensor, field: str, max_n: int, pixels: int) -> np.ndarray:
    """Images [N, 784] or [N, 28, 28], FLOAT32 in [0, 1] or UINT8 -> the raw array as
    [N, pixels] (float32 checked, uint8 untouched)."""
    if not msg.ByteSize():
        raise InvalidArgument(f"{field}: missing; expected a tensor of shape [N, {pixels}]")
    arr = tensor(msg, field)
    shape = list(arr.shape)
    if not (len(shape) == 2 and shape[1] == pixels) and not (
        len(shape) == 3 and shape[1:] == [IMAGE_SIDE, IMAGE_SIDE]
    ):
        raise InvalidArgument(
            f"{field}.shape: {shape}; expected [N, {pixels}] or [N, {IMAGE_SIDE}, {IMAGE_SIDE}]"
        )
    count(shape[0], f"{field}.shape[0] (images)", max_n)
    arr = arr.reshape(shape[0], pixels)
    if arr.dtype == np.float32:
        _finite(arr, field)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidArgument(
                f"{field}: FLOAT32 pixels must lie in [0, 1]; found values in [{lo:g}, {hi:g}]"
            )
    return arr


def latents(msg: vae_pb2.Tensor, field: str, max_n: int, latent_dim: int) -> np.ndarray:
    try:
        arr = from_tensor(msg, field)
    except TensorError as exc:
        if not msg.ByteSize():
            raise InvalidArgument(f"{field}: missing; expected FLOAT32 [N, {latent_dim}]") from None
        raise InvalidArgument(str(exc)) from None
    if arr.dtype != np.float32:
        raise InvalidArgument(f"{field}.dtype: latents must be FLOAT32")
    if arr.ndim != 2 or arr.shape[1] != latent_dim:
        raise InvalidArgument(f"{field}.shape: {list(arr.shape)}; expected [N, {latent_dim}]")
    count(arr.shape[0], f"{field}.shape[0]", max_n)
    _finite(arr, field)
    return arr


def _finite(arr: np.ndarray, field: str) -> None:
    # A float64 sum cannot overflow for float32 inputs, and is NaN or Inf exactly when some
    # value is: one reduction instead of a mask and a test.
    if not math.isfinite(np.add.reduce(arr, axis=None, dtype=np.float64)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InvalidArgument(f"{field}: {bad} values are NaN or Inf; all must be finite")

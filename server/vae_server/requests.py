"""Requests parsed and checked once: each RPC's request bytes become a typed input, or an
InvalidArgument that names the field and the limit. Nothing after this module looks at a
request message."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from google.protobuf.message import DecodeError

from vae_core.prior import MAX_LATENT
from vae_proto import vae_pb2
from vae_proto.tensor import TensorError, from_tensor, images_per_message
from vae_server.errors import InvalidArgument, OtherModel

IMAGE_SIDE = 28


@dataclass(frozen=True)
class Limits:
    """What a request may ask for (the server's settings) and the model's sizes."""

    max_images_per_request: int
    max_sample_n: int
    max_stream_n: int
    max_chunk_size: int
    default_chunk_size: int
    max_k: int
    max_queue_images: int  # LogLikelihood's n x k decoder rows must fit in the queue
    pixels: int
    latent_dim: int
    digits: tuple[int, ...] = ()  # the classes Sample and SampleStream may ask for
    max_message_bytes: int | None = None  # the largest reply that can be sent
    model_version: str = ""  # the model served; a request naming another is refused


class EncodeInput(NamedTuple):
    images: np.ndarray  # float32 [N, D] in [0, 1]; uint8 pixels y read as (y + 0.5) / 256
    sample: bool
    seed: int
    offset: int  # the first image's index within the caller's data set


class DecodeInput(NamedTuple):
    z: np.ndarray  # float32 [N, k], finite
    dtype: int  # vae_pb2.FLOAT32 or UINT8


class SampleInput(NamedTuple):
    n: int
    seed: int
    dtype: int
    return_latents: bool
    digit: int | None  # None: any class


class StreamInput(NamedTuple):
    n: int  # images in the whole stream
    seed: int
    chunk: int
    offset: int  # the first image to send
    dtype: int
    digit: int | None


class ScoreInput(NamedTuple):
    images: np.ndarray  # [N, D]: float32 in [0, 1] (scored as they are) or uint8 (dequantised)
    k: int
    seed: int
    offset: int  # the first image's index within the caller's data set

    @property
    def rows(self) -> int:
        """The decoder rows the call runs: k for each image."""
        return len(self.images) * self.k


# Of a caller's text quoted in an error: a status message is sent as metadata, and one of
# several KB reached the caller as gRPC's RESOURCE_EXHAUSTED (a size limit), not our status.
MAX_ECHOED = 64


def _message(request_type: Any, raw: bytes, limits: Limits | None = None) -> Any:
    """The request message of raw bytes. Parsed here rather than by gRPC's deserializer,
    which would answer bytes that are not the message with UNKNOWN. With `limits`, the
    message's model_version, when set, must be the model served."""
    try:
        request = request_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"request: not a valid {request_type.DESCRIPTOR.full_name} "
                              f"message ({len(raw)} bytes)") from None
    if limits is not None and request.model_version \
            and request.model_version != limits.model_version:
        asked = request.model_version
        if len(asked) > MAX_ECHOED:  # the message stays far below gRPC's metadata limits
            asked = asked[:MAX_ECHOED] + "..."
        raise OtherModel(f"model_version: this server serves model {limits.model_version}, not "
                         f"{asked!r}")
    return request


def encode(raw: bytes, limits: Limits) -> EncodeInput:
    request = _message(vae_pb2.EncodeRequest, raw, limits)
    x = images(request.images, "images", limits.max_images_per_request, limits.pixels)
    if x.dtype == np.uint8:
        # The centre of the pixel's dequantisation interval (vae.proto, EncodeRequest).
        x = (x.astype(np.float32) + np.float32(0.5)) / np.float32(256.0)
    return EncodeInput(x, bool(request.sample), int(request.seed), first_index(request.offset, len(x)))


LAST_INDEX = 2**64 - 1  # the last image index of a data set: offsets are uint64


def first_index(offset: int, n: int) -> int:
    """`offset`, the index of the first of `n` images, unless the last of them would lie past
    LAST_INDEX (an index no call could address)."""
    if offset > LAST_INDEX - (n - 1):
        raise InvalidArgument(f"offset: {offset} + {n} images pass the last image index, "
                              f"2^64 - 1; it must be at most {LAST_INDEX - (n - 1)}")
    return int(offset)


def decode(raw: bytes, limits: Limits) -> DecodeInput:
    request = _message(vae_pb2.DecodeRequest, raw, limits)
    dtype = output_dtype(request.output_dtype)
    return DecodeInput(latents(request.z, "z", limits.max_images_per_request, limits.latent_dim),
                       dtype)


def sample(raw: bytes, limits: Limits) -> SampleInput:
    request = _message(vae_pb2.SampleRequest, raw, limits)
    dtype = output_dtype(request.output_dtype)
    n = count(request.n, "n", limits.max_sample_n)
    if request.return_latents and limits.max_message_bytes is not None:
        # The images alone fit (vae_server.config checks max_sample_n); with the latents
        # beside them they may not, and the reply would fail after the work.
        pixel_bytes = 1 if dtype == vae_pb2.UINT8 else 4
        fit = images_per_message(limits.max_message_bytes,
                                 limits.pixels * pixel_bytes + limits.latent_dim * 4)
        if n > fit:
            raise InvalidArgument(f"n: {n} images with return_latents make a reply over the "
                                  f"{limits.max_message_bytes}-byte message limit; the most "
                                  f"is {fit}")
    return SampleInput(n, int(request.seed), dtype, bool(request.return_latents),
                       digit(request, limits))


def sample_stream(raw: bytes, limits: Limits) -> StreamInput:
    request = _message(vae_pb2.SampleStreamRequest, raw, limits)
    dtype = output_dtype(request.output_dtype)
    n = count(request.n, "n", limits.max_stream_n)
    chunk = request.chunk_size or limits.default_chunk_size
    if chunk > limits.max_chunk_size:
        raise InvalidArgument(f"chunk_size: {chunk} is out of range; it must be 0 (the "
                              f"server's default, {limits.default_chunk_size}) or 1 .. "
                              f"{limits.max_chunk_size}")
    if request.offset >= n:
        raise InvalidArgument(f"offset: {request.offset} is out of range; it must be "
                              f"0 .. n - 1 = {n - 1}")
    return StreamInput(n, int(request.seed), chunk, int(request.offset), dtype,
                       digit(request, limits))


def log_likelihood(raw: bytes, limits: Limits) -> ScoreInput:
    request = _message(vae_pb2.LogLikelihoodRequest, raw, limits)
    k = count(request.k, "k", limits.max_k)
    x = images(request.images, "images", limits.max_images_per_request, limits.pixels)
    if len(x) * k > limits.max_queue_images:
        raise InvalidArgument(
            f"images x k: {len(x)} x {k} = {len(x) * k} decoder rows; the limit is "
            f"{limits.max_queue_images} per call (send fewer images or a smaller k)")
    return ScoreInput(x, k, int(request.seed), first_index(request.offset, len(x)))


def model_info(raw: bytes) -> None:
    _message(vae_pb2.GetModelInfoRequest, raw)


# -- the checks of single fields ------------------------------------------------------------


def count(n: int, field: str, limit: int, low: int = 1) -> int:
    if not low <= n <= limit:
        raise InvalidArgument(f"{field}: {n} is out of range; it must be {low} .. {limit}")
    return n


def digit(request: Any, limits: Limits) -> int | None:
    """The digit class asked for (the optional field `digit`), or None."""
    if not request.HasField("digit"):
        return None
    value = int(request.digit)
    if value not in limits.digits:
        if not limits.digits:
            raise InvalidArgument(f"digit: {value} was asked for, but this model generates no "
                                  "digit classes (ModelInfo.digits is empty)")
        raise InvalidArgument(f"digit: {value} is not a class of this model; it must be one of "
                              f"{_classes(limits.digits)}")
    return value


def _classes(digits: tuple[int, ...]) -> str:
    if list(digits) == list(range(digits[0], digits[-1] + 1)):
        return f"{digits[0]} .. {digits[-1]}"
    return ", ".join(map(str, digits))


def output_dtype(value: int, field: str = "output_dtype") -> int:
    if value == vae_pb2.DTYPE_UNSPECIFIED:
        return vae_pb2.FLOAT32
    if value not in (vae_pb2.FLOAT32, vae_pb2.UINT8):
        raise InvalidArgument(f"{field}: {value} is not FLOAT32 (1) or UINT8 (2)")
    return value


def _no_shape(msg: vae_pb2.Tensor, field: str, missing: str, expected: str) -> InvalidArgument:
    """The refusal of a tensor with no shape: absent altogether ("missing; expected
    `missing`"), or with a dtype or data alone. Asked only of a tensor without a shape, so a
    valid call pays one test, not the message's size and these strings."""
    if not msg.ByteSize():
        return InvalidArgument(f"{field}: missing; expected {missing}")
    return InvalidArgument(f"{field}.shape: missing; expected {expected}")


def images(msg: vae_pb2.Tensor, field: str, max_n: int, pixels: int) -> np.ndarray:
    """Images [N, 784] or [N, 28, 28], FLOAT32 in [0, 1] or UINT8 -> the raw array as
    [N, pixels] (float32 checked, uint8 untouched)."""
    if not msg.shape:
        raise _no_shape(msg, field, f"a tensor of shape [N, {pixels}]",
                        f"[N, {pixels}] or [N, {IMAGE_SIDE}, {IMAGE_SIDE}]")
    try:
        arr = from_tensor(msg, field)
    except TensorError as exc:
        raise InvalidArgument(str(exc)) from None
    shape = list(arr.shape)
    if not (len(shape) == 2 and shape[1] == pixels) and not (
        len(shape) == 3 and shape[1:] == [IMAGE_SIDE, IMAGE_SIDE]
    ):
        raise InvalidArgument(
            f"{field}.shape: {shape}; expected [N, {pixels}] or [N, {IMAGE_SIDE}, {IMAGE_SIDE}]"
        )
    count(shape[0], f"{field}.shape[0]", max_n)
    arr = arr.reshape(shape[0], pixels)
    if arr.dtype == np.float32:
        _finite(arr, field)
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise InvalidArgument(
                f"{field}: FLOAT32 pixels must lie in [0, 1]; found values in [{lo!r}, {hi!r}]"
            )
    return arr


def latents(msg: vae_pb2.Tensor, field: str, max_n: int, latent_dim: int) -> np.ndarray:
    if not msg.shape:
        raise _no_shape(msg, field, f"FLOAT32 [N, {latent_dim}]", f"[N, {latent_dim}]")
    try:
        arr = from_tensor(msg, field)
    except TensorError as exc:
        raise InvalidArgument(str(exc)) from None
    if arr.dtype != np.float32:
        raise InvalidArgument(f"{field}.dtype: latents must be FLOAT32")
    if arr.ndim != 2 or arr.shape[1] != latent_dim:
        raise InvalidArgument(f"{field}.shape: {list(arr.shape)}; expected [N, {latent_dim}]")
    count(arr.shape[0], f"{field}.shape[0]", max_n)
    _finite(arr, field)
    largest = float(np.abs(arr).max()) if arr.size else 0.0
    if largest > MAX_LATENT:
        raise InvalidArgument(f"{field}: a value of magnitude {largest:.3g}; latents must lie "
                              f"within +-{MAX_LATENT:g}")
    return arr


def _finite(arr: np.ndarray, field: str) -> None:
    # A float64 sum cannot overflow for float32 inputs, and is NaN or Inf exactly when some
    # value is: one reduction instead of a mask and a test.
    if not math.isfinite(np.add.reduce(arr, axis=None, dtype=np.float64)):
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise InvalidArgument(f"{field}: {bad} values are NaN or Inf; all must be finite")

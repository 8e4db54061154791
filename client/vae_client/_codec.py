"""Requests from numpy and replies to numpy, shared by the sync and asyncio clients."""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from vae_client.errors import VaeError
from vae_proto import vae_pb2
from vae_proto.tensor import TensorError, from_tensor, to_tensor

DTYPES = {"float32": vae_pb2.FLOAT32, "uint8": vae_pb2.UINT8}
# gRPC takes its message limits in bytes as C ints: 2047 MiB at most, as vae-server's
# --max-message-mb.
MAX_MESSAGE_MB = 2047
UINT32_MAX = 2**32 - 1
UINT64_MAX = 2**64 - 1
# What each integer type of the wire holds: a value outside is refused before it is sent.
_WIRE_RANGE = {
    FieldDescriptor.TYPE_UINT32: (0, UINT32_MAX), FieldDescriptor.TYPE_UINT64: (0, UINT64_MAX),
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1)}
M = TypeVar("M", bound=Message)
# gRPC computes a deadline in 64-bit nanoseconds: one more than about 9e9 s away overflows,
# and the call fails at once with DEADLINE_EXCEEDED, as if its time had run out.
MAX_TIMEOUT_S = 1e9  # about 31 years


def invalid(message: str) -> VaeError:
    """The error of a bad argument of a call, as the server would answer it."""
    return VaeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _whole(value: Any) -> bool:
    """An integer (Python's or numpy's), and not a bool, which is one to Python."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def request(cls: type[M], **fields: Any) -> M:
    """cls(**fields), with every field checked against its wire type first: a value of
    another type (a float, a bool or a string for an integer, None for a field that is not
    optional) or an integer that does not fit raises VaeError INVALID_ARGUMENT naming the
    field and the limit (not protobuf's TypeError or ValueError, which name neither). None
    leaves an optional field (`digit`) unset."""
    for name, value in fields.items():
        field = cls.DESCRIPTOR.fields_by_name[name]
        if value is None:
            if field.has_presence:
                continue
            raise invalid(f"{name}: None; it must be given")
        bounds = _WIRE_RANGE.get(field.type)
        if bounds is not None:
            if not _whole(value):
                raise invalid(f"{name}: {value!r} is not an integer")
            if not bounds[0] <= value <= bounds[1]:
                raise invalid(f"{name}: {value} is out of range; it must be "
                              f"{bounds[0]} .. {bounds[1]}")
        elif field.type == FieldDescriptor.TYPE_BOOL and not (
                isinstance(value, (bool, np.bool_)) or (_whole(value) and value in (0, 1))):
            raise invalid(f"{name}: {value!r} is not a bool")
        elif field.type == FieldDescriptor.TYPE_STRING and not isinstance(value, str):
            raise invalid(f"{name}: {value!r} is not a string")
    return cls(**fields)


def check_timeout(value: Any, name: str = "timeout") -> float | None:
    """A call's timeout in seconds as gRPC takes it: None or infinity is no deadline. Raises
    ValueError for one that is no number, NaN, or too far away for gRPC (which would fail the
    call at once with DEADLINE_EXCEEDED). Zero and less are 0, a time already run out."""
    if value is None:
        return None
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: {value!r} is not a number of seconds")
    seconds = float(value)
    if seconds == math.inf:
        return None
    if math.isnan(seconds) or seconds > MAX_TIMEOUT_S:
        raise ValueError(f"{name}: {seconds:g} s; it must be at most {MAX_TIMEOUT_S:g} (or "
                         "None or inf: no deadline)")
    return max(seconds, 0.0)


def client_timeout(value: Any) -> float | None:
    """A client's timeout for every call (check_timeout), which must be above 0: one of 0 or
    less would fail every call at once."""
    seconds = check_timeout(value)
    if seconds is not None and seconds <= 0:
        raise ValueError(f"timeout: {float(value):g} s; a client's timeout must be above 0 "
                         "(None or inf: no deadline)")
    return seconds


def call_timeout(timeout: Any, default: Any) -> float | None:
    """The deadline of one call: its own `timeout`, else the client's; a bad one is VaeError
    INVALID_ARGUMENT, as every bad argument of a call is."""
    value = default if timeout is None else timeout
    try:
        seconds = check_timeout(value)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if seconds == 0:  # not sent: gRPC would race the deadline against a quick reply
        raise VaeError(grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"timeout: {float(value):g} s; the call's time ran out before it began")
    return seconds


def stream_deadline(timeout: Any, offset: int) -> float | None:
    """The time.monotonic() by which a stream from image `offset` must end (None: never), of
    its `timeout` (call_timeout's rules; one of 0 or less: DEADLINE_EXCEEDED, resumable at
    `offset`, as a stream whose time runs out later is)."""
    try:
        seconds = call_timeout(timeout, None)
    except VaeError as exc:
        if exc.code != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
        raise VaeError(exc.code, exc.details, offset) from None
    return None if seconds is None else time.monotonic() + seconds


def time_left(deadline: float | None, resume: int) -> float | None:
    """The timeout of a stream's next try from image `resume`, which must end by `deadline`
    (stream_deadline); DEADLINE_EXCEEDED, resumable at `resume`, where that time has passed."""
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise VaeError(grpc.StatusCode.DEADLINE_EXCEEDED,
                       f"the stream's time ran out at image {resume}", resume)
    return left


def dtype_enum(dtype: str) -> vae_pb2.DType:
    """The DType of a call's `dtype`; another is VaeError INVALID_ARGUMENT, as every bad
    argument of a call is (`request`)."""
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):  # TypeError: unhashable, a list say
        raise invalid(f"dtype: {dtype!r}; it must be 'float32' or 'uint8'") from None


def _numbers(values: Any, name: str) -> np.ndarray:
    """np.asarray(values), which must hold real numbers (a string, a ragged list, complex
    numbers are VaeError INVALID_ARGUMENT: numpy would refuse them with its own words, or
    drop the imaginary part with a warning)."""
    try:
        arr = np.asarray(values)
    except ValueError as exc:  # a ragged list
        raise invalid(f"{name}: not an array of numbers ({exc})") from None
    if arr.dtype.kind not in "biuf":
        raise invalid(f"{name}: dtype {arr.dtype} holds no real numbers")
    return arr


def pixels(arr: np.ndarray) -> np.ndarray:
    """Pixels as the wire takes them, by the one rule of the library and the CLI: uint8 and
    float32 as they are, other integers in 0 .. 255 as uint8, other floats and bools as
    float32 (whose range, [0, 1], the server checks). `arr` holds images along its first
    axis. Raises ValueError for integers outside 0 .. 255, for an image of integers of 0 and 1
    alone, uint8 among them (a binarised digit, or an 8-bit one all but black?), and for what
    is not a number."""
    if arr.dtype == np.float32:
        return arr
    if arr.dtype.kind in "iu":
        low, high = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
        if low < 0 or high > 255:
            raise ValueError(f"integer pixels must lie in 0 .. 255; found values in "
                             f"{low} .. {high}")
        # Judged image by image, so that a set judged whole is judged alike in any parts.
        highs = arr.reshape(len(arr) if arr.ndim else 1, -1).max(axis=1) if arr.size else arr
        ones = np.flatnonzero(highs == 1)
        if len(ones):
            raise ValueError(f"{arr.dtype} pixels of 0 and 1 alone are ambiguous (image "
                             f"{ones[0]}{' and others' if len(ones) > 1 else ''}): binarised "
                             "digits go as bool or float (1 is full ink), 8-bit ones in "
                             "0 .. 255")
        return arr.astype(np.uint8, copy=False)
    if arr.dtype.kind in "fb":
        return arr.astype(np.float32)
    raise ValueError(f"dtype {arr.dtype} is not a pixel type (uint8 or float)")


def images_tensor(images: np.ndarray) -> vae_pb2.Tensor:
    """[N, 784] or [N, 28, 28] (or one image [784] / [28, 28]), uint8, other integers in
    0 .. 255, or float in [0, 1]."""
    arr = _numbers(images, "images")
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape == (28, 28)):
        arr = arr[None]
    try:
        return to_tensor(pixels(arr))
    except ValueError as exc:
        raise invalid(f"images: {exc}") from None


def encode_request(images: np.ndarray, sample: bool, seed: int, offset: int,
                   model_version: str = "") -> vae_pb2.EncodeRequest:
    return request(vae_pb2.EncodeRequest, images=images_tensor(images), sample=sample,
                   seed=seed, offset=offset, model_version=model_version)


def decode_request(z: np.ndarray, dtype: str, model_version: str = "") -> vae_pb2.DecodeRequest:
    return request(vae_pb2.DecodeRequest, z=latents_tensor(z), output_dtype=dtype_enum(dtype),
                   model_version=model_version)


def sample_request(n: int, seed: int, dtype: str, digit: int | None,
                   model_version: str = "") -> vae_pb2.SampleRequest:
    return request(vae_pb2.SampleRequest, n=n, seed=seed, output_dtype=dtype_enum(dtype),
                   digit=digit, model_version=model_version)


def stream_request(n: int, seed: int, chunk_size: int, dtype: str, offset: int,
                   digit: int | None, model_version: str = "") -> vae_pb2.SampleStreamRequest:
    return request(vae_pb2.SampleStreamRequest, n=n, seed=seed, chunk_size=chunk_size,
                   output_dtype=dtype_enum(dtype), offset=offset, digit=digit,
                   model_version=model_version)


def loglik_request(images: np.ndarray, k: int, seed: int, offset: int,
                   model_version: str = "") -> vae_pb2.LogLikelihoodRequest:
    return request(vae_pb2.LogLikelihoodRequest, images=images_tensor(images), k=k, seed=seed,
                   offset=offset, model_version=model_version)


def latents_tensor(z: np.ndarray) -> vae_pb2.Tensor:
    arr = _numbers(z, "z").astype(np.float32, copy=False)
    return to_tensor(arr[None] if arr.ndim == 1 else arr)


IMAGE_SHAPE = (28, 28)


def malformed(what: str, resume_offset: int | None = None) -> VaeError:
    """The error of a reply that breaks the wire contract (a faulty server, proxy or other
    implementation): INTERNAL, as gRPC's own for a reply it cannot parse."""
    return VaeError(grpc.StatusCode.INTERNAL, f"malformed reply: {what}", resume_offset)


def array(tensor: vae_pb2.Tensor, name: str, shape: tuple[int, ...],
          dtype: str = "float32") -> np.ndarray:
    """A reply's tensor as an array, which must be of `dtype` and `shape` (-1: any size);
    VaeError INTERNAL otherwise, or where its bytes do not fill its shape."""
    try:
        arr = from_tensor(tensor, name)
    except TensorError as exc:
        raise malformed(str(exc)) from None
    if arr.dtype.name != dtype:
        raise malformed(f"{name}: {arr.dtype.name}; {dtype} was asked for")
    if arr.ndim != len(shape) or any(
            want not in (-1, got) for want, got in zip(shape, arr.shape, strict=True)):
        expected = ", ".join("N" if want == -1 else str(want) for want in shape)
        raise malformed(f"{name}.shape: {list(arr.shape)}; expected [{expected}]")
    return arr


def images(tensor: vae_pb2.Tensor, n: int, dtype: str) -> np.ndarray:
    """The n images of a Decode or Sample reply."""
    return array(tensor, "images", (n, *IMAGE_SHAPE), dtype)


def codes(reply: vae_pb2.EncodeResponse, n: int, sample: bool) -> tuple[np.ndarray, ...]:
    """(mu, logvar), and z when `sample` is set, of an Encode reply of n images: [n, k]."""
    mu = array(reply.mu, "mu", (n, -1))
    names = ("logvar", "z") if sample else ("logvar",)
    return (mu, *(array(getattr(reply, name), name, mu.shape) for name in names))


def chunk_images(chunk: vae_pb2.SampleChunk, resume: int, n: int, dtype: str) -> np.ndarray:
    """The images of a SampleStream chunk, which must go on from image `resume` and end at
    image n at most; VaeError INTERNAL otherwise (a gap, a repeat, an empty chunk), with
    `resume` to resume from: every image before it came as asked."""
    try:
        arr = array(chunk.images, "images", (-1, *IMAGE_SHAPE), dtype)
    except VaeError as exc:
        raise VaeError(exc.code, exc.details, resume) from None
    if chunk.offset != resume or not len(arr) or chunk.offset + len(arr) > n:
        raise malformed(f"a chunk of {len(arr)} images at offset {chunk.offset}, where images "
                        f"{resume} .. {n - 1} were awaited", resume)
    return arr


def stream_end(resume: int, n: int) -> None:
    """A SampleStream that ended without error: VaeError INTERNAL unless every image came."""
    if resume < n:
        raise malformed(f"the stream of {n} images ended before image {resume}", resume)


@dataclass(frozen=True)
class Scores:
    """Per-image results of LogLikelihood; log-densities in nats."""

    elbo: np.ndarray
    log_likelihood: np.ndarray
    bits_per_dim: np.ndarray
    percentile: np.ndarray
    anomaly: np.ndarray
    k: int

    @classmethod
    def from_reply(cls, reply: vae_pb2.LogLikelihoodResponse, n: int) -> Scores:
        """The scores of n images; VaeError INTERNAL where a field has not n entries."""
        for field in ("elbo", "log_likelihood", "bits_per_dim", "percentile", "anomaly"):
            if len(getattr(reply, field)) != n:
                raise malformed(f"{field}: {len(getattr(reply, field))} scores of {n} images")
        return cls(
            elbo=np.asarray(reply.elbo, dtype=np.float64),
            log_likelihood=np.asarray(reply.log_likelihood, dtype=np.float64),
            bits_per_dim=np.asarray(reply.bits_per_dim, dtype=np.float64),
            percentile=np.asarray(reply.percentile, dtype=np.float64),
            anomaly=np.asarray(reply.anomaly, dtype=bool),
            k=int(reply.k),
        )

    def records(self) -> list[dict[str, float | bool | int]]:
        return [
            {"index": i, "elbo": float(self.elbo[i]),
             "log_likelihood": float(self.log_likelihood[i]),
             "bits_per_dim": float(self.bits_per_dim[i]), "percentile": float(self.percentile[i]),
             "anomaly": bool(self.anomaly[i])}
            for i in range(len(self.elbo))
        ]


def check_retries(retries: Any) -> int:
    """A client's `retries`: a whole number, 0 or more (0: never); ValueError otherwise, as
    for other bad arguments of the clients' constructors (gRPC would take the client and
    fail every call, unable to parse the retry policy made of it)."""
    if not _whole(retries):
        raise ValueError(f"retries: {retries!r} is not a whole number")
    if retries < 0:
        raise ValueError(f"retries: {retries}; it must be 0 or more (0: never)")
    return int(retries)


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """The message limits of a channel; a size gRPC cannot take is a ValueError, as other
    bad arguments of the clients' constructors are (not gRPC's OverflowError)."""
    if not _whole(max_message_mb):
        raise ValueError(f"max_message_mb: {max_message_mb!r} is not a whole number")
    if not 1 <= max_message_mb <= MAX_MESSAGE_MB:
        raise ValueError(f"max_message_mb: {max_message_mb}; it must be 1 .. {MAX_MESSAGE_MB} "
                         "(gRPC's limit)")
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]

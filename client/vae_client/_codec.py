"""Requests from numpy and replies to numpy, shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from vae_client.errors import VaeError
from vae_proto import vae_pb2
from vae_proto.tensor import from_tensor, to_tensor

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


def request(cls: type[M], **fields: Any) -> M:
    """cls(**fields), with every integer checked against its field's wire type first: one
    that does not fit raises VaeError INVALID_ARGUMENT naming the field and the limit (not
    protobuf's ValueError, which names neither). None leaves an optional field unset."""
    for name, value in fields.items():
        bounds = _WIRE_RANGE.get(cls.DESCRIPTOR.fields_by_name[name].type)
        if bounds is not None and value is not None and not bounds[0] <= value <= bounds[1]:
            raise VaeError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"{name}: {value} is out of range; it must be "
                           f"{bounds[0]} .. {bounds[1]}")
    return cls(**fields)


def dtype_enum(dtype: str) -> vae_pb2.DType:
    """The DType of a call's `dtype`; another is VaeError INVALID_ARGUMENT, as every bad
    argument of a call is (`request`)."""
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):  # TypeError: unhashable, a list say
        raise VaeError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"dtype: {dtype!r}; it must be 'float32' or 'uint8'") from None


def images_tensor(images: np.ndarray) -> vae_pb2.Tensor:
    """[N, 784] or [N, 28, 28] (or one image [784] / [28, 28]), uint8 or float in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape == (28, 28)):
        arr = arr[None]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32, copy=False)
    return to_tensor(arr)


def encode_request(images: np.ndarray, sample: bool, seed: int, offset: int,
                   model_version: str = "") -> vae_pb2.EncodeRequest:
    return request(vae_pb2.EncodeRequest, images=images_tensor(images), sample=sample,
                   seed=seed, offset=offset, model_version=model_version)


def decode_request(z: np.ndarray, dtype: str, model_version: str = "") -> vae_pb2.DecodeRequest:
    return vae_pb2.DecodeRequest(z=latents_tensor(z), output_dtype=dtype_enum(dtype),
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
    arr = np.asarray(z, dtype=np.float32)
    return to_tensor(arr[None] if arr.ndim == 1 else arr)


def array(tensor: vae_pb2.Tensor, name: str) -> np.ndarray:
    return from_tensor(tensor, name)


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
    def from_reply(cls, reply: vae_pb2.LogLikelihoodResponse) -> Scores:
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


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """The message limits of a channel; a size gRPC cannot take is a ValueError, as other
    bad arguments of the clients' constructors are (not gRPC's OverflowError)."""
    if not 1 <= max_message_mb <= MAX_MESSAGE_MB:
        raise ValueError(f"max_message_mb: {max_message_mb}; it must be 1 .. {MAX_MESSAGE_MB} "
                         "(gRPC's limit)")
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]

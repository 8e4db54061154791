"""Requests from numpy and replies to numpy, shared by the sync and asyncio clients."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vae_proto import vae_pb2
from vae_proto.tensor import from_tensor, to_tensor

DTYPES = {"float32": vae_pb2.FLOAT32, "uint8": vae_pb2.UINT8}


def dtype_enum(dtype: str) -> vae_pb2.DType:
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be 'float32' or 'uint8', not {dtype!r}") from None


def images_tensor(images: np.ndarray) -> vae_pb2.Tensor:
    """[N, 784] or [N, 28, 28] (or one image [784] / [28, 28]), uint8 or float in [0, 1]."""
    arr = np.asarray(images)
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape == (28, 28)):
        arr = arr[None]
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float32, copy=False)
    return to_tensor(arr)


def sample_request(n: int, seed: int, dtype: str, digit: int | None) -> vae_pb2.SampleRequest:
    return vae_pb2.SampleRequest(n=n, seed=seed, output_dtype=dtype_enum(dtype), digit=digit)


def stream_request(n: int, seed: int, chunk_size: int, dtype: str, offset: int,
                   digit: int | None) -> vae_pb2.SampleStreamRequest:
    return vae_pb2.SampleStreamRequest(n=n, seed=seed, chunk_size=chunk_size,
                                       output_dtype=dtype_enum(dtype), offset=offset, digit=digit)


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
    size = max_message_mb * 1024 * 1024
    return [("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)]

"""The replies of vae.v1, as the bytes that go on the wire. Image and latent tensors are
written by hand (vae_proto.tensor: one copy of the pixels instead of three), field numbers
taken from the generated descriptors; the rest are messages, serialised here."""

from __future__ import annotations

import numpy as np

from vae_proto import vae_pb2
from vae_proto.tensor import TensorField, UIntField, message_bytes
from vae_server.images import images_out

_MU = TensorField(vae_pb2.EncodeResponse, "mu")
_LOGVAR = TensorField(vae_pb2.EncodeResponse, "logvar")
_Z = TensorField(vae_pb2.EncodeResponse, "z")
_DECODED = TensorField(vae_pb2.DecodeResponse, "images")
_SAMPLED = TensorField(vae_pb2.SampleResponse, "images")
_LATENTS = TensorField(vae_pb2.SampleResponse, "latents")
_CHUNK_OFFSET = UIntField(vae_pb2.SampleChunk, "offset")
_CHUNK_IMAGES = TensorField(vae_pb2.SampleChunk, "images")


def encode(mu: np.ndarray, logvar: np.ndarray, z: np.ndarray | None = None) -> bytes:
    return message_bytes(_MU(mu), _LOGVAR(logvar), _Z(z) if z is not None else b"")


def decode(means: np.ndarray, dtype: int) -> bytes:
    """Decoder means [N, 784] as images [N, 28, 28] of `dtype`."""
    return message_bytes(_DECODED(images_out(means, dtype)))


def sample(means: np.ndarray, dtype: int, latents: np.ndarray | None = None) -> bytes:
    return message_bytes(_SAMPLED(images_out(means, dtype)),
                         _LATENTS(latents) if latents is not None else b"")


def sample_chunk(offset: int, means: np.ndarray, dtype: int) -> bytes:
    return message_bytes(_CHUNK_OFFSET(offset), _CHUNK_IMAGES(images_out(means, dtype)))


def log_likelihood(elbo: np.ndarray, log_likelihood: np.ndarray, bits_per_dim: np.ndarray,
                   percentile: np.ndarray, anomaly: np.ndarray, k: int) -> bytes:
    return vae_pb2.LogLikelihoodResponse(
        elbo=elbo.tolist(), log_likelihood=log_likelihood.tolist(),
        bits_per_dim=bits_per_dim.tolist(), percentile=percentile.tolist(),
        anomaly=anomaly.tolist(), k=k).SerializeToString()

"""vae_server.replies: every reply the server writes by hand is, byte for byte, what the
protobuf library serialises for the same message."""

from __future__ import annotations

import numpy as np
import pytest

from vae_proto import vae_pb2
from vae_proto.tensor import to_tensor
from vae_server import replies
from vae_server.images import images_out

RNG = np.random.default_rng(0)
DTYPES = [vae_pb2.FLOAT32, vae_pb2.UINT8]
SIZES = [1, 3, 1024]


def means(n: int) -> np.ndarray:
    return RNG.random((n, 784), dtype=np.float32)


def latents(n: int, k: int = 16) -> np.ndarray:
    return RNG.standard_normal((n, k), dtype=np.float32)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("with_z", [False, True])
def test_encode(n, with_z):
    mu, logvar, z = latents(n), latents(n), latents(n)
    expected = vae_pb2.EncodeResponse(mu=to_tensor(mu), logvar=to_tensor(logvar),
                                      z=to_tensor(z) if with_z else None)
    assert replies.encode(mu, logvar, z if with_z else None) == expected.SerializeToString()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_decode(n, dtype):
    x = means(n)
    expected = vae_pb2.DecodeResponse(images=to_tensor(images_out(x, dtype)))
    assert replies.decode(x, dtype) == expected.SerializeToString()


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_latents", [False, True])
def test_sample(n, dtype, with_latents):
    x, z = means(n), latents(n)
    expected = vae_pb2.SampleResponse(images=to_tensor(images_out(x, dtype)),
                                      latents=to_tensor(z) if with_latents else None)
    assert (replies.sample(x, dtype, z if with_latents else None)
            == expected.SerializeToString())


@pytest.mark.parametrize("offset", [0, 1, 1024, 9_999_000, 2**40])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sample_chunk(offset, dtype):
    x = means(7)
    expected = vae_pb2.SampleChunk(offset=offset, images=to_tensor(images_out(x, dtype)))
    assert replies.sample_chunk(offset, x, dtype) == expected.SerializeToString()


def test_log_likelihood():
    n = 5
    values = [RNG.standard_normal(n) * 100 for _ in range(4)]
    flags = RNG.random(n) < 0.5
    expected = vae_pb2.LogLikelihoodResponse(
        elbo=values[0], log_likelihood=values[1], bits_per_dim=values[2], percentile=values[3],
        anomaly=flags, k=1000)
    assert (replies.log_likelihood(*values, flags, 1000)
            == expected.SerializeToString())

"""VaeClient: the synchronous client, numpy in and out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from vae_client import _codec
from vae_client._codec import Scores
from vae_client.channel import (
    DEFAULT_RETRIES,
    PemSource,
    Security,
    create_channel,
    resolve_security,
)
from vae_client.errors import VaeError
from vae_proto import vae_pb2, vae_pb2_grpc


class VaeClient:
    """A connection to a vae-server. Use as a context manager, or call close().

    Every call takes `timeout` (seconds; default the client's) and raises VaeError on
    failure, carrying the gRPC status code.

    Security (plaintext without a token by default): `tls_ca` verifies the server against
    this CA (PEM bytes or a file path; `tls=True` alone uses the system's roots), `tls_cert`
    and `tls_key` present a client certificate (mutual TLS), `tls_server_name` is the name
    the server's certificate must carry when it is not the target's host, and `token` is
    sent as `authorization: Bearer TOKEN` with every call. `security` gives them all at once
    (a vae_client.channel.Security), as the load generator takes them.
    """

    def __init__(self, target: str, timeout: float = 30.0, max_message_mb: int = 64,
                 channel: grpc.Channel | None = None, *, tls: bool = False,
                 tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                 tls_key: PemSource | None = None, tls_server_name: str | None = None,
                 token: str | None = None, security: Security | None = None,
                 retries: int = DEFAULT_RETRIES) -> None:
        self.target = target
        self.timeout = timeout
        security = resolve_security(security, channel, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                    tls_key=tls_key, tls_server_name=tls_server_name, token=token)
        self._channel = channel or create_channel(target, security, max_message_mb, retries)
        self._stub = vae_pb2_grpc.VaeServiceStub(self._channel)

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as err:
            raise VaeError.from_rpc_error(err) from None

    def info(self, timeout: float | None = None) -> vae_pb2.ModelInfo:
        """The model's manifest, execution provider, batching settings and limits."""
        return self._call(self._stub.GetModelInfo, vae_pb2.GetModelInfoRequest(), timeout)

    def encode(self, images: np.ndarray, sample: bool = False, seed: int = 0,
               timeout: float | None = None) -> tuple[np.ndarray, ...]:
        """Images [N, 784] or [N, 28, 28] (float in [0, 1] or uint8) -> (mu, logvar), or
        (mu, logvar, z) with z ~ q(z|x) drawn from `seed` when `sample` is set."""
        req = vae_pb2.EncodeRequest(images=_codec.images_tensor(images), sample=sample, seed=seed)
        reply = self._call(self._stub.Encode, req, timeout)
        out = (_codec.array(reply.mu, "mu"), _codec.array(reply.logvar, "logvar"))
        return (*out, _codec.array(reply.z, "z")) if sample else out

    def decode(self, z: np.ndarray, dtype: str = "float32",
               timeout: float | None = None) -> np.ndarray:
        """Latents [N, k] -> mean images [N, 28, 28] (float32 in [0, 1] or uint8)."""
        req = vae_pb2.DecodeRequest(z=_codec.latents_tensor(z),
                                    output_dtype=_codec.dtype_enum(dtype))
        return _codec.array(self._call(self._stub.Decode, req, timeout).images, "images")

    def sample(self, n: int, seed: int = 0, dtype: str = "float32",
               timeout: float | None = None) -> np.ndarray:
        """n images from the prior [n, 28, 28]; the same seed always gives the same images."""
        req = vae_pb2.SampleRequest(n=n, seed=seed, output_dtype=_codec.dtype_enum(dtype))
        return _codec.array(self._call(self._stub.Sample, req, timeout).images, "images")

    def sample_stream(self, n: int, seed: int = 0, chunk_size: int = 0, dtype: str = "float32",
                      offset: int = 0, timeout: float | None = None,
                      ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset, images) chunks of a stream of n prior samples, starting at `offset`.
        `timeout` bounds the whole stream (default: none)."""
        req = vae_pb2.SampleStreamRequest(n=n, seed=seed, chunk_size=chunk_size,
                                          output_dtype=_codec.dtype_enum(dtype), offset=offset)
        resume = offset  # the first image not yet received
        call = self._stub.SampleStream(req, timeout=timeout)
        try:
            for chunk in call:
                images = _codec.array(chunk.images, "images")
                yield int(chunk.offset), images
                resume = int(chunk.offset) + len(images)
        except grpc.RpcError as err:
            raise VaeError.from_rpc_error(err, resume_offset=resume) from None
        finally:
            # A caller that stops iterating (break, an exception, the generator closed)
            # cancels the call: the server stops producing chunks nobody will read.
            call.cancel()

    def log_likelihood(self, images: np.ndarray, k: int = 100, seed: int = 0, offset: int = 0,
                       timeout: float | None = None) -> Scores:
        """Per image: ELBO, importance-sampled log p(x) with k samples, bits/dim, and the
        anomaly percentile and flag. `offset` is the index of images[0] within a larger set
        sent in parts: the parts then score exactly as the whole would."""
        req = vae_pb2.LogLikelihoodRequest(images=_codec.images_tensor(images), k=k, seed=seed,
                                           offset=offset)
        return Scores.from_reply(self._call(self._stub.LogLikelihood, req, timeout))

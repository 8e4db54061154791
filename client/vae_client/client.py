"""VaeClient: the synchronous client, numpy in and out."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np

from vae_client import _codec
from vae_client._codec import Scores
from vae_client.channel import (
    DEFAULT_MAX_MESSAGE_MB,
    DEFAULT_RETRIES,
    PemSource,
    Security,
    create_channel,
    resolve_security,
)
from vae_client.errors import VaeError, stream_error, stream_resumable
from vae_proto import vae_pb2, vae_pb2_grpc


class VaeClient:
    """A connection to a vae-server. Use as a context manager, or call close(), which closes
    the channel, a `channel` given to it included.

    Every call takes `timeout` (seconds; default the client's, except sample_stream's: none;
    None or inf: no deadline) and raises VaeError on failure, carrying the gRPC status code:
    a bad argument is INVALID_ARGUMENT naming it, whether the client or the server finds it;
    a reply that is not what was asked for (another count, dtype or shape of images, a
    stream's chunk out of order) is INTERNAL.
    The arrays returned are read-only views of the reply's bytes (no copy is made):
    np.array(x) gives a writable copy.

    Security (plaintext without a token by default): `tls_ca` verifies the server against
    this CA (PEM bytes or a file path; `tls=True` alone uses the system's roots), `tls_cert`
    and `tls_key` present a client certificate (mutual TLS), `tls_server_name` is the name
    the server's certificate must carry when it is not the target's host, and `token` is
    sent as `authorization: Bearer TOKEN` with every call. `security` gives them all at once
    (a vae_client.channel.Security), as the load generator takes them.

    `model_version` (an attribute too, e.g. set from info().model_version) pins every call to
    that model: a server that serves another answers FAILED_PRECONDITION, so results never
    mix two models, as they could behind a target of several servers during an upgrade.
    """

    def __init__(self, target: str, timeout: float = 30.0, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 channel: grpc.Channel | None = None, *, tls: bool = False,
                 tls_ca: PemSource | None = None, tls_cert: PemSource | None = None,
                 tls_key: PemSource | None = None, tls_server_name: str | None = None,
                 token: str | None = None, security: Security | None = None,
                 retries: int = DEFAULT_RETRIES, model_version: str = "") -> None:
        self.target = target
        self.timeout = _codec.client_timeout(timeout)
        self.model_version = model_version
        security = resolve_security(security, channel, tls=tls, tls_ca=tls_ca, tls_cert=tls_cert,
                                    tls_key=tls_key, tls_server_name=tls_server_name, token=token)
        self.retries = _codec.check_retries(retries)
        self._channel = channel or create_channel(target, security, max_message_mb, self.retries)
        self._stub = vae_pb2_grpc.VaeServiceStub(self._channel)

    def __enter__(self) -> VaeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=_codec.call_timeout(timeout, self.timeout))
        except grpc.RpcError as err:
            raise VaeError.from_rpc_error(err) from None

    def info(self, timeout: float | None = None) -> vae_pb2.ModelInfo:
        """The model's manifest, execution provider, batching settings and limits."""
        return self._call(self._stub.GetModelInfo, vae_pb2.GetModelInfoRequest(), timeout)

    def encode(self, images: np.ndarray, sample: bool = False, seed: int = 0,
               timeout: float | None = None, *, offset: int = 0) -> tuple[np.ndarray, ...]:
        """Images [N, 784] or [N, 28, 28] (float in [0, 1] or uint8) -> (mu, logvar), or
        (mu, logvar, z) with z ~ q(z|x) drawn from `seed` when `sample` is set. `offset` is
        the index of images[0] within a larger set sent in parts: the parts then get the z
        the whole would."""
        req = _codec.encode_request(images, sample, seed, offset, self.model_version)
        reply = self._call(self._stub.Encode, req, timeout)
        return _codec.codes(reply, req.images.shape[0], sample)

    def decode(self, z: np.ndarray, dtype: str = "float32",
               timeout: float | None = None) -> np.ndarray:
        """Latents [N, k] -> mean images [N, 28, 28] (float32 in [0, 1] or uint8)."""
        req = _codec.decode_request(z, dtype, self.model_version)
        return _codec.images(self._call(self._stub.Decode, req, timeout).images,
                             req.z.shape[0], dtype)

    def sample(self, n: int, seed: int = 0, dtype: str = "float32", digit: int | None = None,
               timeout: float | None = None) -> np.ndarray:
        """n images generated by the model [n, 28, 28]: of class `digit` when given (one of
        info().digits), else of any class as the prior draws them. The same seed (and digit)
        always gives the same images."""
        req = _codec.sample_request(n, seed, dtype, digit, self.model_version)
        return _codec.images(self._call(self._stub.Sample, req, timeout).images, n, dtype)

    def sample_stream(self, n: int, seed: int = 0, chunk_size: int = 0, dtype: str = "float32",
                      offset: int = 0, digit: int | None = None, timeout: float | None = None,
                      ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (offset, images) chunks of a stream of n generated images (of class `digit`
        when given), starting at `offset`; image i equals image i of sample() with the same
        seed and digit. `timeout` bounds the whole stream (default: none).

        A stream whose server goes away (UNAVAILABLE) after sending chunks is resumed from
        the first image not received, on whichever server the channel reaches, as long as
        each try brings images and `retries` is not 0; the images are the same as an
        unbroken stream's."""
        deadline = _codec.stream_deadline(timeout, offset)
        resume = offset  # the first image not yet received
        while True:
            req = _codec.stream_request(n, seed, chunk_size, dtype, resume, digit,
                                         self.model_version)
            call = self._stub.SampleStream(req, timeout=_codec.time_left(deadline, resume))
            progressed = False
            try:
                for chunk in call:
                    images = _codec.chunk_images(chunk, resume, n, dtype)
                    yield int(chunk.offset), images
                    resume = int(chunk.offset) + len(images)
                    progressed = True
                _codec.stream_end(resume, n)
                return
            except grpc.RpcError as err:
                if offset < n <= resume:  # every image came: what broke after them loses nothing
                    return
                if not stream_resumable(err, progressed, self.retries):
                    raise stream_error(err, resume) from None
            finally:
                # A caller that stops iterating (break, an exception, the generator closed)
                # cancels the call: the server stops producing chunks nobody will read.
                call.cancel()

    def log_likelihood(self, images: np.ndarray, k: int = 100, seed: int = 0, offset: int = 0,
                       timeout: float | None = None) -> Scores:
        """Per image: ELBO, importance-sampled log p(x) with k samples, bits/dim, and the
        anomaly percentile and flag. `offset` is the index of images[0] within a larger set
        sent in parts: the parts then score exactly as the whole would."""
        req = _codec.loglik_request(images, k, seed, offset, self.model_version)
        return Scores.from_reply(self._call(self._stub.LogLikelihood, req, timeout),
                                 req.images.shape[0])

"""AsyncVaeClient: the asyncio client, the same calls as VaeClient."""

from __future__ import annotations

from collections.abc import AsyncIterator
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
    create_aio_channel,
    resolve_security,
)
from vae_client.errors import VaeError, stream_error, stream_resumable
from vae_proto import vae_pb2, vae_pb2_grpc


class AsyncVaeClient:
    """A connection to a vae-server for asyncio code: `async with AsyncVaeClient(t) as c:`.

    Every call takes `timeout` and raises VaeError, and the arrays returned are read-only,
    as VaeClient's. The TLS, token and model_version options are those of VaeClient. Make it
    in the event loop that uses it (inside `async def`): its channel belongs to that loop.
    """

    def __init__(self, target: str, timeout: float = 30.0, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                 channel: grpc.aio.Channel | None = None, *, tls: bool = False,
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
        self._channel = channel or create_aio_channel(target, security, max_message_mb, self.retries)
        self._stub = vae_pb2_grpc.VaeServiceStub(self._channel)

    async def __aenter__(self) -> AsyncVaeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return await method(request, timeout=_codec.call_timeout(timeout, self.timeout))
        except grpc.RpcError as err:
            raise VaeError.from_rpc_error(err) from None

    async def info(self, timeout: float | None = None) -> vae_pb2.ModelInfo:
        """The model's manifest, execution provider, batching settings and limits."""
        return await self._call(self._stub.GetModelInfo, vae_pb2.GetModelInfoRequest(), timeout)

    async def encode(self, images: np.ndarray, sample: bool = False, seed: int = 0,
                     timeout: float | None = None, *, offset: int = 0,
                     ) -> tuple[np.ndarray, ...]:
        """Images -> (mu, logvar), or (mu, logvar, z) when `sample` is set; `offset` as in
        VaeClient.encode."""
        req = _codec.encode_request(images, sample, seed, offset, self.model_version)
        reply = await self._call(self._stub.Encode, req, timeout)
        return _codec.codes(reply, req.images.shape[0], sample)

    async def decode(self, z: np.ndarray, dtype: str = "float32",
                     timeout: float | None = None) -> np.ndarray:
        """Latents [N, k] -> mean images [N, 28, 28]."""
        req = _codec.decode_request(z, dtype, self.model_version)
        reply = await self._call(self._stub.Decode, req, timeout)
        return _codec.images(reply.images, req.z.shape[0], dtype)

    async def sample(self, n: int, seed: int = 0, dtype: str = "float32",
                     digit: int | None = None, timeout: float | None = None) -> np.ndarray:
        """n generated images [n, 28, 28] (of class `digit` when given), as VaeClient.sample."""
        req = _codec.sample_request(n, seed, dtype, digit, self.model_version)
        reply = await self._call(self._stub.Sample, req, timeout)
        return _codec.images(reply.images, n, dtype)

    async def sample_stream(self, n: int, seed: int = 0, chunk_size: int = 0,
                            dtype: str = "float32", offset: int = 0, digit: int | None = None,
                            timeout: float | None = None,
                            ) -> AsyncIterator[tuple[int, np.ndarray]]:
        """Yield (offset, images) chunks of a stream of n generated images, resumed where
        its server went away, as VaeClient.sample_stream."""
        deadline = _codec.stream_deadline(timeout, offset)
        resume = offset  # the first image not yet received
        while True:
            req = _codec.stream_request(n, seed, chunk_size, dtype, resume, digit,
                                         self.model_version)
            call = self._stub.SampleStream(req, timeout=_codec.time_left(deadline, resume))
            progressed = False
            try:
                async for chunk in call:
                    images = _codec.chunk_images(chunk, resume, n, dtype)
                    yield int(chunk.offset), images
                    resume = int(chunk.offset) + len(images)
                    progressed = True
                _codec.stream_end(resume, n)
                return
            except grpc.RpcError as err:
                if offset < n <= resume:  # every image came (VaeClient.sample_stream)
                    return
                if not stream_resumable(err, progressed, self.retries):
                    raise stream_error(err, resume) from None
            finally:
                # A caller that stops iterating cancels the call (VaeClient.sample_stream).
                call.cancel()

    async def log_likelihood(self, images: np.ndarray, k: int = 100, seed: int = 0,
                             offset: int = 0, timeout: float | None = None) -> Scores:
        """Per image: ELBO, log p(x) with k samples, bits/dim, percentile and flag; `offset`
        as in VaeClient.log_likelihood."""
        req = _codec.loglik_request(images, k, seed, offset, self.model_version)
        reply = await self._call(self._stub.LogLikelihood, req, timeout)
        return Scores.from_reply(reply, req.images.shape[0])

"""vae.v1.VaeService: request checks, batched model runs, replies. Domain errors become gRPC
status codes in one place, `_status_of`."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np

from vae_export import likelihood as lk
from vae_proto import vae_pb2, vae_pb2_grpc
from vae_proto.tensor import to_tensor
from vae_server import validate
from vae_server.batcher import Batcher
from vae_server.config import Settings
from vae_server.errors import (
    BatchFailed,
    DeadlineExpired,
    InvalidArgument,
    QueueFull,
    ServingError,
)
from vae_server.metrics import Metrics
from vae_server.runtime import ModelRuntime
from vae_server.sampling import prior_latents

log = logging.getLogger(__name__)
T = TypeVar("T")

_STATUS: dict[type[ServingError], tuple[grpc.StatusCode, str]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"),
    DeadlineExpired: (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    BatchFailed: (grpc.StatusCode.INTERNAL, "internal"),
}


def _status_of(exc: ServingError) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL, "internal"


def _cancel_reason(context: grpc.aio.ServicerContext) -> str:
    """grpc.aio cancels a handler both when the caller cancels and when its deadline passes;
    only the time left tells the two apart."""
    remaining = context.time_remaining()
    return "deadline" if remaining is not None and remaining <= 0 else "cancelled"


@contextlib.asynccontextmanager
async def _status_on_error(servicer: VaeServicer, context: grpc.aio.ServicerContext,
                           name: str) -> AsyncIterator[None]:
    """The one place where a handler's errors become gRPC status codes, and where calls in
    flight are counted for a graceful stop."""
    servicer._call_started()
    try:
        yield
    except ServingError as exc:
        await servicer._abort(context, exc)
    except asyncio.CancelledError:
        servicer.metrics.rejected.labels(_cancel_reason(context)).inc()
        raise
    except Exception:  # a bug of ours: INTERNAL, with the traceback in the log only
        log.exception("%s failed", name)
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
    finally:
        servicer._call_ended()


def _unary(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    @functools.wraps(handler)
    async def wrapper(self: VaeServicer, request: Any, context: grpc.aio.ServicerContext) -> T:
        async with _status_on_error(self, context, handler.__name__):
            return await handler(self, request, context)
        raise AssertionError("not reached: every error above aborts the call")

    return wrapper


def _streaming(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
    @functools.wraps(handler)
    async def wrapper(self: VaeServicer, request: Any,
                      context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
        async with _status_on_error(self, context, handler.__name__):
            async for item in handler(self, request, context):
                yield item

    return wrapper


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


def _images_out(x: np.ndarray, dtype: int) -> vae_pb2.Tensor:
    x = x.reshape(len(x), 28, 28)
    if dtype == vae_pb2.UINT8:
        return to_tensor(np.rint(x * np.float32(255.0)).astype(np.uint8))
    return to_tensor(x)


class VaeServicer(vae_pb2_grpc.VaeServiceServicer):
    def __init__(self, runtime: ModelRuntime, settings: Settings, metrics: Metrics,
                 executor: concurrent.futures.Executor) -> None:
        self.runtime = runtime
        self.settings = settings
        self.metrics = metrics
        self.executor = executor
        batching: dict[str, Any] = {"max_batch": settings.max_batch_size,
                                    "max_queue": settings.max_queue_images,
                                    "max_delay": settings.max_delay_ms / 1000.0,
                                    "merge": settings.batching}
        self.encoder = Batcher(runtime.run_encoder, executor,
                               observer=metrics.observer("encoder"), **batching)
        self.decoder = Batcher(runtime.run_decoder, executor,
                               observer=metrics.observer("decoder"), **batching)
        self._in_flight = 0  # vae.v1 calls being handled, for a graceful stop
        self._idle: asyncio.Event | None = None

    async def _abort(self, context: grpc.aio.ServicerContext, exc: ServingError) -> None:
        code, reason = _status_of(exc)
        if reason != "internal":
            self.metrics.rejected.labels(reason).inc()
        else:
            log.error("model run failed: %s", exc)
        await context.abort(code, str(exc))

    def _call_started(self) -> None:
        self._in_flight += 1

    def _call_ended(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no vae.v1 call is in flight (True) or `timeout` passes (False)."""
        if self._in_flight == 0:
            return True
        self._idle = asyncio.Event()
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def close(self) -> None:
        await self.encoder.close()
        await self.decoder.close()

    # -- helpers ----------------------------------------------------------------------------

    async def _decode(self, z: np.ndarray, context: grpc.aio.ServicerContext) -> list[np.ndarray]:
        return await self.decoder.submit(z, _deadline(context))

    def _encode_input(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype == np.uint8:
            # The centre of the pixel's dequantisation interval (vae.proto, EncodeRequest).
            return (arr.astype(np.float32) + np.float32(0.5)) / np.float32(256.0)
        return arr

    # -- RPCs -------------------------------------------------------------------------------

    @_unary
    async def Encode(self, request: vae_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.EncodeResponse:
        s = self.settings
        x = self._encode_input(validate.images(request.images, "images",
                                               s.max_images_per_request, self.runtime.pixels))
        mu, logvar = await self.encoder.submit(x, _deadline(context))
        self.metrics.method_images.labels("Encode").inc(len(x))
        reply = vae_pb2.EncodeResponse(mu=to_tensor(mu), logvar=to_tensor(logvar))
        if request.sample:
            eps = np.random.default_rng(request.seed).standard_normal(mu.shape, dtype=np.float32)
            reply.z.CopyFrom(to_tensor(mu + np.exp(np.float32(0.5) * logvar) * eps))
        return reply

    @_unary
    async def Decode(self, request: vae_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.DecodeResponse:
        dtype = validate.output_dtype(request.output_dtype)
        z = validate.latents(request.z, "z", self.settings.max_images_per_request,
                             self.runtime.latent_dim)
        outputs = await self._decode(z, context)
        self.metrics.method_images.labels("Decode").inc(len(z))
        return vae_pb2.DecodeResponse(images=_images_out(outputs[0], dtype))

    @_unary
    async def Sample(self, request: vae_pb2.SampleRequest,
                     context: grpc.aio.ServicerContext) -> vae_pb2.SampleResponse:
        dtype = validate.output_dtype(request.output_dtype)
        n = validate.count(request.n, "n", self.settings.max_sample_n)
        z = prior_latents(request.seed, 0, n, self.runtime.latent_dim)
        outputs = await self._decode(z, context)
        self.metrics.method_images.labels("Sample").inc(n)
        reply = vae_pb2.SampleResponse(images=_images_out(outputs[0], dtype))
        if request.return_latents:
            reply.latents.CopyFrom(to_tensor(z))
        return reply

    @_streaming
    async def SampleStream(self, request: vae_pb2.SampleStreamRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[vae_pb2.SampleChunk]:
        s = self.settings
        dtype = validate.output_dtype(request.output_dtype)
        n = validate.count(request.n, "n", s.max_stream_n)
        chunk = validate.count(request.chunk_size or s.default_chunk_size, "chunk_size",
                               s.max_chunk_size)
        if request.offset >= n:
            raise InvalidArgument(f"offset: {request.offset} is out of range; it must be "
                                  f"0 .. n - 1 = {n - 1}")
        k = self.runtime.latent_dim
        loop = asyncio.get_running_loop()
        counter = self.metrics.method_images.labels("SampleStream")
        # One chunk is computed ahead while the previous one is being sent: memory stays at
        # a few chunks whatever n is (gRPC's flow control holds `yield` when the client lags).
        start = int(request.offset)

        async def produce(first: int) -> vae_pb2.SampleChunk:
            size = min(chunk, n - first)
            z = await loop.run_in_executor(self.executor, prior_latents, request.seed, first,
                                           size, k)
            outputs = await self._decode(z, context)
            return vae_pb2.SampleChunk(offset=first, images=_images_out(outputs[0], dtype))

        pending: asyncio.Task[vae_pb2.SampleChunk] | None = asyncio.ensure_future(produce(start))
        try:
            while pending is not None:
                reply = await pending
                nxt = reply.offset + chunk
                pending = asyncio.ensure_future(produce(nxt)) if nxt < n else None
                counter.inc(reply.images.shape[0])
                yield reply
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    @_unary
    async def LogLikelihood(self, request: vae_pb2.LogLikelihoodRequest,
                            context: grpc.aio.ServicerContext) -> vae_pb2.LogLikelihoodResponse:
        s = self.settings
        rt = self.runtime
        raw = validate.images(request.images, "images", s.max_images_per_request, rt.pixels)
        k_samples = validate.count(request.k, "k", s.max_k)
        n = len(raw)
        if n * k_samples > s.max_queue_images:
            raise InvalidArgument(
                f"images x k: {n} x {k_samples} = {n * k_samples} decoder rows; the limit is "
                f"{s.max_queue_images} per call (send fewer images or a smaller k)"
            )
        seed, offset = int(request.seed), int(request.offset)
        loop = asyncio.get_running_loop()
        deadline = _deadline(context)

        x = raw
        if raw.dtype == np.uint8:  # float images are scored as they are: no hop for them
            x = await loop.run_in_executor(self.executor, lk.dequantize, raw, seed, offset)
        mu, logvar = await self.encoder.submit(x, deadline)

        def noise() -> tuple[np.ndarray, np.ndarray]:
            eps = lk.score_noise(seed, offset, n, k_samples, rt.latent_dim)
            return eps, lk.latents(mu, logvar, eps).reshape(n * k_samples, rt.latent_dim)

        eps, z = await loop.run_in_executor(self.executor, noise)
        outputs = await self.decoder.submit(z, deadline)
        decoded = outputs[rt.likelihood_output].reshape(n, k_samples, rt.pixels)

        def finish() -> lk.Scores:
            w = lk.log_weights(x, mu, logvar, eps, decoded, rt.likelihood, rt.sigma)
            return lk.scores_from_log_weights(w, rt.likelihood, d=rt.pixels)

        scores = await loop.run_in_executor(self.executor, finish)
        pct = rt.percentile(scores.log_likelihood)
        flags = pct < rt.anomaly_percentile
        self.metrics.method_images.labels("LogLikelihood").inc(n)
        self.metrics.anomalies.inc(int(flags.sum()))
        return vae_pb2.LogLikelihoodResponse(
            elbo=scores.elbo.tolist(), log_likelihood=scores.log_likelihood.tolist(),
            bits_per_dim=scores.bits_per_dim.tolist(), percentile=pct.tolist(),
            anomaly=flags.tolist(), k=k_samples,
        )

    @_unary
    async def GetModelInfo(self, request: vae_pb2.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> vae_pb2.ModelInfo:
        s, rt = self.settings, self.runtime
        return vae_pb2.ModelInfo(
            model_version=rt.manifest["model_version"],
            latent_dim=rt.latent_dim,
            likelihood=rt.likelihood,
            sigma=float(rt.sigma or 0.0),
            image_shape=[28, 28],
            execution_provider=rt.provider,
            batching=vae_pb2.BatchingInfo(
                enabled=s.batching, max_batch_size=self.decoder.max_batch,
                max_queue_images=self.decoder.max_queue, max_delay_ms=s.max_delay_ms),
            limits=vae_pb2.Limits(
                max_images_per_request=s.max_images_per_request, max_sample_n=s.max_sample_n,
                max_stream_n=s.max_stream_n, max_chunk_size=s.max_chunk_size,
                default_chunk_size=s.default_chunk_size, max_k=s.max_k,
                max_message_bytes=s.max_message_bytes),
            anomaly_percentile=rt.anomaly_percentile,
            manifest_json=rt.manifest_text,
        )

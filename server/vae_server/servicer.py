"""vae.v1.VaeService: request checks, batched model runs, replies. Domain errors become gRPC
status codes in one place, `_status_of`."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from vae_export import likelihood as lk
from vae_proto import vae_pb2, vae_pb2_grpc
from vae_proto.tensor import message_bytes, tensor_field, varint_field
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
from vae_server.images import images_out
from vae_server.metrics import IMAGE_METHODS, Metrics
from vae_server.runtime import ModelRuntime
from vae_server.sampling import prior_latents

log = logging.getLogger(__name__)
T = TypeVar("T")
# SampleStream chunks computed ahead of the one being sent (BENCHMARKS.md: 2 gave 5 - 10 %
# more images/s than 1; 3 no more than 2).
AHEAD = 2
# LogLikelihood splits a lone image's samples among idle instances in parts of at least this
# many (BENCHMARKS.md: smaller parts cost more in noise drawn and runs than they save).
SPLIT_SAMPLES = 256

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


def _parse(request_type: Any, raw: bytes) -> Any:
    """The request message of raw bytes. Parsed here rather than by gRPC's deserializer,
    which would answer bytes that are not the message with UNKNOWN."""
    try:
        return request_type.FromString(raw)
    except DecodeError:
        raise InvalidArgument(f"request: not a valid {request_type.DESCRIPTOR.full_name} "
                              f"message ({len(raw)} bytes)") from None


def _unary(request_type: Any) -> Callable[[Callable[..., Awaitable[T]]],
                                          Callable[..., Awaitable[T]]]:
    """Parses the request, counts the call in flight for a graceful stop, and sends errors to
    `_failed` (plain try/except: this runs on every call)."""

    def decorate(handler: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
        @functools.wraps(handler)
        async def wrapper(self: VaeServicer, raw: bytes, context: grpc.aio.ServicerContext) -> T:
            self._in_flight += 1
            try:
                return await handler(self, _parse(request_type, raw), context)
            except (Exception, asyncio.CancelledError) as exc:
                await self._failed(context, exc, handler.__name__)
                raise
            finally:
                self._call_ended()

        return wrapper

    return decorate


def _streaming(request_type: Any) -> Callable[[Callable[..., AsyncIterator[T]]],
                                              Callable[..., AsyncIterator[T]]]:
    def decorate(handler: Callable[..., AsyncIterator[T]]) -> Callable[..., AsyncIterator[T]]:
        @functools.wraps(handler)
        async def wrapper(self: VaeServicer, raw: bytes,
                          context: grpc.aio.ServicerContext) -> AsyncIterator[T]:
            self._in_flight += 1
            try:
                async for item in handler(self, _parse(request_type, raw), context):
                    yield item
            except (Exception, asyncio.CancelledError) as exc:
                await self._failed(context, exc, handler.__name__)
                raise
            finally:
                self._call_ended()

        return wrapper

    return decorate


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def _all(calls: Iterable[Awaitable[T]]) -> list[T]:
    """The results of `calls`, run at once; if one fails or the caller is cancelled, the
    others are cancelled too (their queued work never runs)."""
    pending = list(calls)
    if len(pending) == 1:
        return [await pending[0]]
    tasks = [asyncio.ensure_future(c) for c in pending]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()


def _serialize(reply: Any) -> bytes:
    """Replies built as bytes (tensor_field) go out as they are; messages are serialised."""
    return reply if isinstance(reply, bytes) else reply.SerializeToString()


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
                                    "merge": settings.batching,
                                    "inline_rows": settings.inline_rows,
                                    "instances": runtime.instances(settings.instances)}
        self.encoder = Batcher(runtime.run_encoder, executor,
                               observer=metrics.observer("encoder"),
                               run_inline=runtime.run_encoder_small, **batching)
        self.decoder = Batcher(runtime.run_decoder, executor,
                               observer=metrics.observer("decoder"),
                               run_inline=runtime.run_decoder_small, **batching)
        metrics.watch_queue("encoder", lambda: self.encoder.queued_images)
        metrics.watch_queue("decoder", lambda: self.decoder.queued_images)
        self._images = {m: metrics.method_images.labels(m) for m in IMAGE_METHODS}
        self._in_flight = 0  # vae.v1 calls being handled, for a graceful stop
        self._idle: asyncio.Event | None = None

    async def _failed(self, context: grpc.aio.ServicerContext, exc: BaseException,
                      name: str) -> None:
        """The one place where a handler's errors become gRPC status codes: aborts the call
        (raises), except for a cancellation, which is counted and left to propagate."""
        if isinstance(exc, asyncio.CancelledError):
            self.metrics.rejected.labels(_cancel_reason(context)).inc()
            return
        if isinstance(exc, grpc.aio.AbortError):  # already carries its status
            return
        if isinstance(exc, ServingError):
            code, reason = _status_of(exc)
            if reason != "internal":
                self.metrics.rejected.labels(reason).inc()
            else:
                log.error("model run failed: %s", exc)
            await context.abort(code, str(exc))
        # A bug of ours: INTERNAL, with the traceback in the log only.
        log.error("%s failed", name, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal server error")

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

    def _encode_input(self, arr: np.ndarray) -> np.ndarray:
        if arr.dtype == np.uint8:
            # The centre of the pixel's dequantisation interval (vae.proto, EncodeRequest).
            return (arr.astype(np.float32) + np.float32(0.5)) / np.float32(256.0)
        return arr

    def _weights(self, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, seed: int,
                 first: int, k: int, lo: int = 0, hi: int | None = None,
                 ) -> tuple[Callable[[], np.ndarray], Callable[[list[np.ndarray]], np.ndarray]]:
        """A LogLikelihood decoder job's two ends for images `first` .. of a request and their
        importance samples lo .. hi - 1 of k: the latents to decode from its noise, and the
        log-weights [n, hi - lo] from the decodings."""
        rt = self.runtime
        n = len(x)
        hi = k if hi is None else hi
        # Drawn by make_rows, read by weights.
        eps = z = np.empty(0, np.float32)

        def make_rows() -> np.ndarray:
            nonlocal eps, z
            eps = lk.score_noise(seed, first, n, k, rt.latent_dim)
            if hi - lo < k:  # an image's noise is drawn whole (score_noise), whatever part runs
                eps = eps[:, lo:hi]
            z = lk.latents(mu, logvar, eps)
            return z.reshape(n * (hi - lo), rt.latent_dim)

        def weights(outputs: list[np.ndarray]) -> np.ndarray:
            decoded = outputs[rt.likelihood_output].reshape(n, hi - lo, rt.pixels)
            return lk.log_weights(x, mu, logvar, eps, decoded, rt.likelihood, rt.sigma, z)

        return make_rows, weights

    def _scoring(self, x: np.ndarray, mu: np.ndarray, logvar: np.ndarray, seed: int,
                 first: int, k: int) -> tuple[Callable[[], np.ndarray],
                                             Callable[[list[np.ndarray]], lk.Scores]]:
        """The same for all k samples of whole images, the estimator included."""
        make_rows, weights = self._weights(x, mu, logvar, seed, first, k)
        rt = self.runtime

        def estimate(outputs: list[np.ndarray]) -> lk.Scores:
            return lk.scores_from_log_weights(weights(outputs), rt.likelihood, d=rt.pixels)

        return make_rows, estimate

    # -- RPCs -------------------------------------------------------------------------------

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """vae.v1's method handlers. Requests arrive as bytes (the handlers parse them); image
        replies are built as bytes (tensor_field: one copy of the pixels instead of three),
        the rest are messages."""
        unary = functools.partial(grpc.unary_unary_rpc_method_handler,
                                  response_serializer=_serialize)
        return {
            "Encode": unary(self.Encode),
            "Decode": unary(self.Decode),
            "Sample": unary(self.Sample),
            "SampleStream": grpc.unary_stream_rpc_method_handler(
                self.SampleStream, response_serializer=_serialize),
            "LogLikelihood": unary(self.LogLikelihood),
            "GetModelInfo": unary(self.GetModelInfo),
        }

    @_unary(vae_pb2.EncodeRequest)
    async def Encode(self, request: vae_pb2.EncodeRequest,
                     context: grpc.aio.ServicerContext) -> bytes:
        s = self.settings
        x = self._encode_input(validate.images(request.images, "images",
                                               s.max_images_per_request, self.runtime.pixels))
        mu, logvar = await self.encoder.submit(x, _deadline(context))
        self._images["Encode"].inc(len(x))
        z = b""
        if request.sample:
            eps = np.random.default_rng(request.seed).standard_normal(mu.shape, dtype=np.float32)
            z = message_bytes(tensor_field(3, mu + np.exp(np.float32(0.5) * logvar) * eps))
        return message_bytes(tensor_field(1, mu), tensor_field(2, logvar), z)

    @_unary(vae_pb2.DecodeRequest)
    async def Decode(self, request: vae_pb2.DecodeRequest,
                     context: grpc.aio.ServicerContext) -> bytes:
        dtype = validate.output_dtype(request.output_dtype)
        z = validate.latents(request.z, "z", self.settings.max_images_per_request,
                             self.runtime.latent_dim)
        outputs = await self.decoder.submit(z, _deadline(context))
        self._images["Decode"].inc(len(z))
        return message_bytes(tensor_field(1, images_out(outputs[0], dtype)))

    @_unary(vae_pb2.SampleRequest)
    async def Sample(self, request: vae_pb2.SampleRequest,
                     context: grpc.aio.ServicerContext) -> bytes:
        dtype = validate.output_dtype(request.output_dtype)
        n = validate.count(request.n, "n", self.settings.max_sample_n)
        with self.decoder.reserve(n) as room:  # a full queue refuses before the noise is drawn
            z = prior_latents(request.seed, 0, n, self.runtime.latent_dim)
            outputs = await self.decoder.submit(z, _deadline(context), room)
        self._images["Sample"].inc(n)
        return message_bytes(tensor_field(1, images_out(outputs[0], dtype)),
                             tensor_field(2, z) if request.return_latents else b"")

    @_streaming(vae_pb2.SampleStreamRequest)
    async def SampleStream(self, request: vae_pb2.SampleStreamRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        s = self.settings
        dtype = validate.output_dtype(request.output_dtype)
        n = validate.count(request.n, "n", s.max_stream_n)
        chunk = validate.count(request.chunk_size or s.default_chunk_size, "chunk_size",
                               s.max_chunk_size)
        if request.offset >= n:
            raise InvalidArgument(f"offset: {request.offset} is out of range; it must be "
                                  f"0 .. n - 1 = {n - 1}")
        k = self.runtime.latent_dim
        counter = self._images["SampleStream"]
        deadline = _deadline(context)

        def chunk_bytes(first: int, images: np.ndarray) -> bytes:
            return message_bytes(varint_field(1, first), tensor_field(2, images_out(images, dtype)))

        seed = int(request.seed)
        loop = asyncio.get_running_loop()

        async def produce(first: int) -> tuple[int, bytes]:
            size = min(chunk, n - first)
            if size <= self.decoder.max_batch:
                # One decoder job per chunk: its noise, its run and its reply (the uint8
                # conversion, the one copy of the pixels) are all made in the thread that
                # runs the batch, with no hop between threads in between (BENCHMARKS.md: a
                # hop each for the noise and the reply cost float32 streams 7 - 11 %).
                return size, await self.decoder.submit_job(
                    size, lambda: prior_latents(seed, first, size, k),
                    lambda outputs: chunk_bytes(first, outputs[0]), deadline)
            # A chunk larger than one batch is split into batches that the idle instances run
            # at once (a job would run them one after another in one thread); the noise and
            # the reply leave the event loop too.
            z = await loop.run_in_executor(self.executor, prior_latents, seed, first, size, k)
            outputs = await self.decoder.submit(z, deadline)
            return size, await loop.run_in_executor(self.executor, chunk_bytes, first,
                                                    outputs[0])

        # Chunks are computed AHEAD chunks in advance while earlier ones are being sent: a
        # large send holds the event loop for a while, and work that starts only after it
        # would leave the cores idle. Memory stays at a few chunks whatever n is (gRPC's flow
        # control holds `yield` when the client lags).
        pending: collections.deque[asyncio.Task[tuple[int, bytes]]] = collections.deque()
        next_first = int(request.offset)

        def fill() -> None:
            nonlocal next_first
            while len(pending) < AHEAD and next_first < n:
                pending.append(asyncio.ensure_future(produce(next_first)))
                next_first += min(chunk, n - next_first)

        try:
            fill()
            while pending:
                size, reply = await pending.popleft()
                fill()
                counter.inc(size)
                yield reply
        finally:
            for task in pending:
                task.cancel()

    @_unary(vae_pb2.LogLikelihoodRequest)
    async def LogLikelihood(self, request: vae_pb2.LogLikelihoodRequest,
                            context: grpc.aio.ServicerContext) -> vae_pb2.LogLikelihoodResponse:
        s = self.settings
        rt = self.runtime
        k_samples = validate.count(request.k, "k", s.max_k)
        shape = request.images.shape
        if shape and 0 < shape[0] * k_samples <= s.max_queue_images:
            # A full queue refuses before the pixels are checked, which costs more.
            self.decoder.check_room(shape[0] * k_samples)
        raw = validate.images(request.images, "images", s.max_images_per_request, rt.pixels)
        n = len(raw)
        if n * k_samples > s.max_queue_images:
            raise InvalidArgument(
                f"images x k: {n} x {k_samples} = {n * k_samples} decoder rows; the limit is "
                f"{s.max_queue_images} per call (send fewer images or a smaller k)"
            )
        seed, offset = int(request.seed), int(request.offset)
        loop = asyncio.get_running_loop()
        deadline = _deadline(context)

        # Room for the decoder's n x k rows is held from the start: when the queue is full,
        # the call is refused at once, before any work (and a client's retry repeats none).
        with self.decoder.reserve(n * k_samples) as room:
            x = raw
            if raw.dtype == np.uint8:  # float images are scored as they are: no hop for them
                x = await loop.run_in_executor(self.executor, lk.dequantize, raw, seed, offset)
            mu, logvar = await self.encoder.submit(x, deadline)
            # Instances with nothing else to do share the call: a lone image's samples are
            # split among them, several images are (BENCHMARKS.md). Under load, when none is
            # idle, every job is as large as it may be, which costs least in all.
            idle = self.decoder.idle_instances()
            if n == 1 and idle > 1 and k_samples >= 2 * SPLIT_SAMPLES:
                pieces = min(idle, k_samples // SPLIT_SAMPLES)
                bounds = [k_samples * p // pieces for p in range(pieces + 1)]
                weights = await _all(
                    self.decoder.submit_job(
                        hi - lo, *self._weights(x, mu, logvar, seed, offset, k_samples, lo, hi),
                        deadline, room)
                    for lo, hi in zip(bounds, bounds[1:], strict=False))
                parts = [lk.scores_from_log_weights(np.concatenate(weights, axis=1),
                                                    rt.likelihood, d=rt.pixels)]
            else:
                # Decoder jobs of at most max_batch rows (whole images), each drawing its
                # noise and computing its estimator in the thread that runs it.
                per_job = max(1, self.decoder.max_batch // k_samples)
                if idle > 1:
                    per_job = min(per_job, -(-n // idle))
                parts = await _all(
                    self.decoder.submit_job(
                        len(x[i : i + per_job]) * k_samples,
                        *self._scoring(x[i : i + per_job], mu[i : i + per_job],
                                       logvar[i : i + per_job], seed, offset + i, k_samples),
                        deadline, room)
                    for i in range(0, n, per_job))
        scores = parts[0] if len(parts) == 1 else lk.Scores(
            *(np.concatenate([getattr(p, f) for p in parts])
              for f in ("elbo", "log_likelihood", "bits_per_dim")))
        pct = rt.percentile(scores.log_likelihood)
        flags = pct < rt.anomaly_percentile
        self._images["LogLikelihood"].inc(n)
        self.metrics.anomalies.inc(int(flags.sum()))
        return vae_pb2.LogLikelihoodResponse(
            elbo=scores.elbo.tolist(), log_likelihood=scores.log_likelihood.tolist(),
            bits_per_dim=scores.bits_per_dim.tolist(), percentile=pct.tolist(),
            anomaly=flags.tolist(), k=k_samples,
        )

    @_unary(vae_pb2.GetModelInfoRequest)
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

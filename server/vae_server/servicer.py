"""vae.v1.VaeService. Each call reads in one direction: its request bytes are parsed and
checked into a typed input (`requests`), run through the batchers, and answered as reply bytes
(`replies`). Domain errors become gRPC status codes in one place, `_status_of`."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import functools
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from typing import Any, TypeAlias, TypeVar

import grpc
import numpy as np

from vae_core import likelihood as lk
from vae_core.rng import indexed_normals
from vae_proto import vae_pb2
from vae_server import replies, requests
from vae_server.batcher import Batcher, Reservation
from vae_server.config import Settings
from vae_server.errors import (
    BatchFailed,
    DeadlineExpired,
    InvalidArgument,
    OtherModel,
    QueueFull,
    ServingError,
    ShuttingDown,
)
from vae_server.instrument import cancelled, deadline_passed
from vae_server.jobs import ImageScores, ImportanceWeights, SampleReply, StreamChunk
from vae_server.metrics import IMAGE_METHODS, Metrics
from vae_server.runtime import ModelRuntime

log = logging.getLogger(__name__)
T = TypeVar("T")
Context: TypeAlias = grpc.aio.ServicerContext
# SampleStream chunks computed ahead of the one being sent: a large send holds the event loop
# for a while, and chunks already under way keep the cores busy meanwhile (BENCHMARKS.md).
AHEAD = 2
# LogLikelihood splits a lone image's samples among idle instances in parts of at least this
# many: smaller parts cost more in noise drawn and runs than they save (BENCHMARKS.md).
SPLIT_SAMPLES = 256

_STATUS: dict[type[ServingError], tuple[grpc.StatusCode, str]] = {
    InvalidArgument: (grpc.StatusCode.INVALID_ARGUMENT, "invalid"),
    OtherModel: (grpc.StatusCode.FAILED_PRECONDITION, "model_version"),
    QueueFull: (grpc.StatusCode.RESOURCE_EXHAUSTED, "queue_full"),
    DeadlineExpired: (grpc.StatusCode.DEADLINE_EXCEEDED, "deadline"),
    ShuttingDown: (grpc.StatusCode.UNAVAILABLE, "shutting_down"),
    BatchFailed: (grpc.StatusCode.INTERNAL, "internal"),
}


class _Unsent:
    """A stream's images that have run and wait to be sent, held in its batcher's queue
    (Batcher.unsent_images) until sent or until the stream closes this."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self.images = 0
        self.closed = False

    def adopt(self, n: int) -> None:
        """`n` images that the batcher counts as unsent already (a chunk's run, Reservation.
        keeps) are this stream's to release."""
        if self.closed:  # a chunk that ends after its stream holds nothing
            self._batcher.release_unsent(n)
        else:
            self.images += n

    def release(self, n: int) -> None:
        if not self.closed:
            self.images -= n
            self._batcher.release_unsent(n)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._batcher.release_unsent(self.images)
            self.images = 0


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


def _status_of(exc: ServingError) -> tuple[grpc.StatusCode, str]:
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return grpc.StatusCode.INTERNAL, "internal"


UnaryHandler = Callable[["VaeServicer", bytes, Context], Awaitable[bytes]]
StreamHandler = Callable[["VaeServicer", bytes, Context], AsyncGenerator[bytes, None]]


def _unary(handler: UnaryHandler) -> UnaryHandler:
    """Counts the call in flight for a graceful stop, and sends errors to `_failed` (plain
    try/except: this runs on every call)."""

    @functools.wraps(handler)
    async def wrapper(self: VaeServicer, raw: bytes, context: Context) -> bytes:
        self._in_flight += 1
        try:
            if self.refusing:
                raise ShuttingDown("the server is shutting down; retry")
            return await handler(self, raw, context)
        except (Exception, asyncio.CancelledError) as exc:
            await self._failed(context, exc, handler.__name__)
            raise
        finally:
            self._call_ended()

    return wrapper


def _streaming(handler: StreamHandler) -> StreamHandler:
    @functools.wraps(handler)
    async def wrapper(self: VaeServicer, raw: bytes, context: Context
                      ) -> AsyncGenerator[bytes, None]:
        self._in_flight += 1
        ended = False

        def end(_: object = None) -> None:
            nonlocal ended
            if not ended:
                ended = True
                self._call_ended()

        # A reply that gRPC fails to send (the caller went away, or its receive limit is
        # lower) ends the call without closing this generator: it stays suspended until it
        # is collected, perhaps much later. The call's end is counted when gRPC ends it.
        context.add_done_callback(end)
        items = handler(self, raw, context)
        try:
            if self.refusing:
                raise ShuttingDown("the server is shutting down; retry")
            async for item in items:
                yield item
        # GeneratorExit: the call was cancelled while a reply was being sent.
        except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
            await self._failed(context, exc, handler.__name__)
            raise
        finally:
            # Close the handler now, not when it is collected: its own clean-up (the chunks
            # under way) runs while the call ends.
            await items.aclose()
            end()

    return wrapper


def _deadline(context: Context) -> float | None:
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


class VaeServicer:
    """The handlers of vae.v1.VaeService. Each takes the request's bytes (parsed by
    `requests`, so that bytes that are not the message get INVALID_ARGUMENT, not gRPC's
    UNKNOWN) and returns the reply's bytes (`replies`)."""

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
        metrics.watch_queue("encoder", lambda: self.encoder.queued_images,
                            lambda: self.encoder.occupancy)
        metrics.watch_queue("decoder", lambda: self.decoder.queued_images,
                            lambda: self.decoder.occupancy)
        metrics.watch_unsent(lambda: self.decoder.unsent_images)
        self.limits = requests.Limits(
            max_images_per_request=settings.max_images_per_request,
            max_sample_n=settings.max_sample_n, max_stream_n=settings.max_stream_n,
            max_chunk_size=settings.max_chunk_size,
            default_chunk_size=settings.default_chunk_size, max_k=settings.max_k,
            max_queue_images=settings.max_queue_images, pixels=runtime.pixels,
            latent_dim=runtime.latent_dim, digits=tuple(runtime.prior.digits),
            max_message_bytes=settings.max_message_bytes, model_version=runtime.spec.version)
        self._images = {m: metrics.method_images.labels(m) for m in IMAGE_METHODS}
        self._in_flight = 0  # vae.v1 calls being handled, for a graceful stop
        # Set by a stopping server: new vae.v1 calls get UNAVAILABLE at once (clients retry).
        self.refusing = False
        self._idle: asyncio.Event | None = None
        metrics.watch_in_flight(lambda: self._in_flight)

    async def _failed(self, context: Context, exc: BaseException, name: str) -> None:
        """The one place where a handler's errors become gRPC status codes: aborts the call
        (raises), except for a cancellation, which is counted and left to propagate."""
        if cancelled(exc):
            self.metrics.rejected.labels(
                "deadline" if deadline_passed(context) else "cancelled").inc()
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

    # -- RPCs: request bytes -> typed input -> run -> reply bytes ----------------------------

    def handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        """vae.v1's method handlers, bytes in and bytes out (no (de)serializers)."""
        unary = grpc.unary_unary_rpc_method_handler
        return {
            "Encode": unary(self.Encode),
            "Decode": unary(self.Decode),
            "Sample": unary(self.Sample),
            "SampleStream": grpc.unary_stream_rpc_method_handler(self.SampleStream),
            "LogLikelihood": unary(self.LogLikelihood),
            "GetModelInfo": unary(self.GetModelInfo),
        }

    @_unary
    async def Encode(self, raw: bytes, context: Context) -> bytes:
        req = requests.encode(raw, self.limits)
        mu, logvar = await self.encoder.submit(req.images, _deadline(context))
        self._images["Encode"].inc(len(mu))
        z = None
        if req.sample:
            eps = indexed_normals(req.seed, req.offset, *mu.shape)
            z = mu + np.exp(np.float32(0.5) * logvar) * eps
        return replies.encode(mu, logvar, z)

    @_unary
    async def Decode(self, raw: bytes, context: Context) -> bytes:
        req = requests.decode(raw, self.limits)
        outputs = await self.decoder.submit(req.z, _deadline(context))
        self._images["Decode"].inc(len(req.z))
        return replies.decode(outputs[0], req.dtype)

    @_unary
    async def Sample(self, raw: bytes, context: Context) -> bytes:
        req = requests.sample(raw, self.limits)
        job = SampleReply(self.runtime.prior, req.seed, 0, req.n, req.digit, req.dtype,
                          req.return_latents)
        with self.decoder.reserve(req.n) as room:  # a full queue refuses before the noise
            reply = await self._decode_job(job, _deadline(context), room)
        self._images["Sample"].inc(req.n)
        return reply

    async def _decode_job(self, job: StreamChunk, deadline: float | None,
                          room: Reservation) -> bytes:
        """A decoder job's reply, its noise and reply bytes made off the event loop: one job
        in the thread that runs its batch (a small one on the loop's, as any small batch);
        one larger than a batch split into batches that the idle instances run at once (as
        one job they would run one after another in one thread), its noise and reply made in
        a worker thread."""
        if job.rows <= self.decoder.max_batch:
            reply: bytes = await self.decoder.submit_job(job, deadline, room)
            return reply
        loop = asyncio.get_running_loop()
        z = await loop.run_in_executor(self.executor, job.make_rows)
        outputs = await self.decoder.submit(z, deadline, room)
        return await loop.run_in_executor(self.executor, job.finish, outputs)

    @_streaming
    async def SampleStream(self, raw: bytes, context: Context) -> AsyncGenerator[bytes, None]:
        req = requests.sample_stream(raw, self.limits)
        counter = self._images["SampleStream"]
        deadline = _deadline(context)
        prior = self.runtime.prior

        unsent = _Unsent(self.decoder)
        loop = asyncio.get_running_loop()
        stall_s = self.settings.stream_stall_s

        stalls = 0  # the stalls so far: a chunk made for an earlier round holds no room

        async def produce(first: int) -> tuple[int, bytes]:
            round_ = stalls
            chunk = StreamChunk(prior, req.seed, first, min(req.chunk, req.n - first),
                                req.digit, req.dtype)
            # The stream was admitted on its first chunk (below): each chunk waits for room
            # in the queue rather than break off a stream under way, whether other calls
            # fill the queue or the queue holds fewer than AHEAD chunks.
            # From its run until it is sent, the chunk holds room in the queue: a client that
            # stops reading makes the server refuse work (RESOURCE_EXHAUSTED) instead of
            # hoarding replies.
            room = await self.decoder.wait_room(chunk.rows, deadline, keeps=True)
            try:
                with room:
                    reply = await self._decode_job(chunk, deadline, room)
            except BaseException:
                self.decoder.release_unsent(room.kept)  # what ran will never be sent
                raise
            # (A chunk made for the round before a stall holds nothing, should its
            # cancellation not have reached it.)
            if round_ == stalls:
                unsent.adopt(room.kept)
            else:
                self.decoder.release_unsent(room.kept)
            return chunk.rows, reply

        # AHEAD chunks are under way while an earlier one is sent. Memory stays at a few
        # chunks whatever n is (gRPC's flow control holds `yield` when the client lags).
        pending: collections.deque[asyncio.Task[tuple[int, bytes]]] = collections.deque()
        next_first = req.offset

        def fill() -> None:
            nonlocal next_first
            while len(pending) < AHEAD and next_first < req.n:
                pending.append(asyncio.ensure_future(produce(next_first)))
                next_first += min(req.chunk, req.n - next_first)

        def stop_pending() -> None:
            while pending:
                task = pending.popleft()
                task.cancel()
                # One that failed meanwhile (its deadline, say) is not awaited: read its
                # exception, or asyncio logs it as never retrieved.
                task.add_done_callback(_retrieve)

        def clean_up(_: object = None) -> None:
            """Stop the chunks under way and give back the room of those made and not sent:
            when the stream ends, or when gRPC ends the call (see _streaming)."""
            stop_pending()
            unsent.close()

        def on_stall(resume: int, keep: int) -> None:
            """The caller has not taken the chunk at `yield` (`keep` images) for stall_s: the
            chunks made ahead are dropped, their room back to the queue, whose other calls
            they would keep refused for as long as the caller waits (up to a connection's
            age and grace), and they are made again if the caller reads on. The chunk at
            `yield`, in memory until it is sent, keeps its room: replies stay bounded by the
            queue."""
            nonlocal stalls, next_first
            stalls += 1
            self.metrics.stream_stalls.inc()
            stop_pending()
            next_first = resume
            unsent.release(unsent.images - keep)

        context.add_done_callback(clean_up)
        stall: asyncio.TimerHandle | None = None
        try:
            # Admission, as for any call: a full queue refuses the stream before any work.
            self.decoder.check_room(min(req.chunk, req.n - req.offset))
            fill()
            sent = req.offset  # the first image after the chunks gRPC has taken
            while pending:
                # The chunk stays in `pending` while it is awaited, so that clean_up finds it.
                size, reply = await pending[0]
                pending.popleft()
                fill()
                stall = (loop.call_later(stall_s, on_stall, sent + size, size) if stall_s
                         else None)
                stalls_before = stalls
                yield reply
                # Counted once gRPC has taken it, as it stops being unsent: a chunk waiting
                # at `yield` for a caller who stopped reading was never streamed.
                counter.inc(size)
                sent += size
                unsent.release(size)
                if stall is not None:
                    stall.cancel()
                if stalls != stalls_before:  # the chunks after it were dropped: made again
                    fill()
        finally:
            if stall is not None:  # the call ended at `yield`
                stall.cancel()
            clean_up()

    @_unary
    async def LogLikelihood(self, raw: bytes, context: Context) -> bytes:
        req = requests.log_likelihood(raw, self.limits)
        scores = await self._score(req, _deadline(context))
        calibration = self.runtime.calibration
        pct = calibration.percentile(scores.log_likelihood, req.k)
        flags = pct < calibration.anomaly_percentile
        self._images["LogLikelihood"].inc(len(req.images))
        self.metrics.anomalies.inc(int(flags.sum()))
        return replies.log_likelihood(scores.elbo, scores.log_likelihood, scores.bits_per_dim,
                                      pct, flags, req.k)

    async def _score(self, req: requests.ScoreInput, deadline: float | None) -> lk.Scores:
        """The images' scores: the encoder's run, then decoder jobs of whole images (or, for
        a lone image on an idle server, parts of its samples)."""
        n, k = len(req.images), req.k
        # Room for the decoder's n x k rows is held from the start: when the queue is full,
        # the call is refused at once, before any work (and a client's retry repeats none).
        with self.decoder.reserve(req.rows) as room:
            x = req.images
            if x.dtype == np.uint8:  # float images are scored as they are: no hop for them
                x = await asyncio.get_running_loop().run_in_executor(
                    self.executor, lk.scored_inputs, x, self.runtime.likelihood, req.seed,
                    req.offset)
            mu, logvar = await self.encoder.submit(x, deadline)
            # Instances with nothing else to do share the call: a lone image's samples are
            # split among them, several images are spread over them. Under load, when none
            # is idle, every job is as large as it may be, which costs least in all.
            idle = self.decoder.idle_instances()
            if n == 1 and idle > 1 and k >= 2 * SPLIT_SAMPLES:
                pieces = min(idle, k // SPLIT_SAMPLES)
                bounds = [k * p // pieces for p in range(pieces + 1)]
                weights = await _all(
                    self.decoder.submit_job(
                        ImportanceWeights(self.runtime, x, mu, logvar, req.seed, req.offset, k,
                                          lo, hi), deadline, room)
                    for lo, hi in zip(bounds, bounds[1:], strict=False))
                return lk.scores_from_log_weights(np.concatenate(weights, axis=1),
                                                  self.runtime.likelihood, d=self.runtime.pixels)
            per_job = max(1, self.decoder.max_batch // k)  # whole images, <= max_batch rows
            if idle > 1:
                per_job = min(per_job, -(-n // idle))
            parts = await _all(
                self.decoder.submit_job(
                    ImageScores(self.runtime, x[i : i + per_job], mu[i : i + per_job],
                                logvar[i : i + per_job], req.seed, req.offset + i, k),
                    deadline, room)
                for i in range(0, n, per_job))
        if len(parts) == 1:
            return parts[0]
        return lk.Scores(*(np.concatenate([getattr(p, f) for p in parts])
                           for f in ("elbo", "log_likelihood", "bits_per_dim")))

    @_unary
    async def GetModelInfo(self, raw: bytes, context: Context) -> bytes:
        requests.model_info(raw)
        s, rt = self.settings, self.runtime
        return vae_pb2.ModelInfo(
            model_version=rt.spec.version,
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
            anomaly_percentile=rt.calibration.anomaly_percentile,
            manifest_json=rt.manifest_text,
            digits=rt.prior.digits,
        ).SerializeToString()

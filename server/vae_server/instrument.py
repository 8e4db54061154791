"""gRPC-level Prometheus metrics under go-grpc-prometheus's names, for every service the
server offers (vae.v1, health, and reflection, whose one method is a bidirectional stream:
grpc_type bidi_stream).

The metrics wrap each method handler once, when it is registered, rather than coming from a
server interceptor: an interceptor costs every call an extra coroutine and a handler rebuilt
per call, which on a small CPU is a measurable share of a single-image Decode (BENCHMARKS.md).
`InstrumentedServer` stands in for the server when a service registers its handlers (the
generated `add_*_to_server` functions and our own), and registers wrapped handlers instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc

from vae_server.metrics import CODE_LABELS, Metrics

# A cancelled call counts as expired when the server's clock says that it has this little time
# left: the caller's deadline reaches the server as a plain cancellation over the wire (HTTP/2
# has no code for it), which can arrive before the server's own timer for the same deadline
# fires, and the time left is read through a clock conversion that may be off by a little too.
DEADLINE_SLACK_S = 0.05


def deadline_passed(context: grpc.aio.ServicerContext) -> bool:
    """Whether a cancelled call was cancelled by its deadline rather than by its caller: grpc.aio
    cancels a handler the same way in both cases; only the time left tells them apart."""
    remaining = context.time_remaining()
    return remaining is not None and remaining <= DEADLINE_SLACK_S


def cancelled(exc: BaseException) -> bool:
    """Whether a handler ended because its call was cancelled (by the caller or a deadline):
    a coroutine gets CancelledError; a streaming handler whose reply could not be written gets
    GeneratorExit instead, as grpc.aio closes its generator."""
    return isinstance(exc, (asyncio.CancelledError, GeneratorExit))


_OK, _CANCELLED = CODE_LABELS[grpc.StatusCode.OK], CODE_LABELS[grpc.StatusCode.CANCELLED]
_EXPIRED, _UNKNOWN = (CODE_LABELS[grpc.StatusCode.DEADLINE_EXCEEDED],
                      CODE_LABELS[grpc.StatusCode.UNKNOWN])


def code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    """The status code a call ended with, as go-grpc-prometheus's grpc_code label."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return CODE_LABELS[code]
    if exc is None:
        return _OK
    if cancelled(exc):
        return _EXPIRED if deadline_passed(context) else _CANCELLED
    return _UNKNOWN


class _Observer:
    """One method's series, looked up once: a unary call costs four counter increments and one
    histogram observation."""

    def __init__(self, metrics: Metrics, service: str, method: str, kind: str) -> None:
        labels = (service, method, kind)
        self.started = metrics.started.labels(*labels)
        self.handling = metrics.handling.labels(*labels)
        self.received = metrics.msg_received.labels(*labels)
        self.sent = metrics.msg_sent.labels(*labels)
        self.streams_requests = kind in ("client_stream", "bidi_stream")
        self.streams_replies = kind in ("server_stream", "bidi_stream")
        self._handled = metrics.handled
        self._labels = labels
        self._by_code: dict[str, Any] = {_OK: metrics.handled.labels(*labels, _OK)}

    def counted(self, request: Any) -> Any:
        """A call's request, counted as received: its messages as they are read, where the
        method streams them."""
        if self.streams_requests:
            return _counted(request, self.received)
        self.received.inc()
        return request

    def refused(self, t0: float, context: grpc.aio.ServicerContext) -> None:
        """A call ended before its handler ran (one_request's refusal)."""
        self.started.inc()
        self.ended(t0, context, None)

    def ended(self, t0: float, context: grpc.aio.ServicerContext,
              exc: BaseException | None) -> None:
        self.handling.observe(time.perf_counter() - t0)
        code = code_of(context, exc)
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = self._handled.labels(*self._labels, code)
        child.inc()


# grpc_server_msg_received_total and grpc_server_msg_sent_total count messages as
# go-grpc-prometheus does: a unary request or reply is one, a stream's each item; a unary
# reply only when its call succeeds.


async def _counted(requests: AsyncIterator[Any], received: Any) -> AsyncIterator[Any]:
    async for request in requests:
        received.inc()
        yield request


class _CountedContext:
    """A servicer context that counts the messages a handler of a streaming method reads with
    read() and writes with write() (as health's Watch writes its replies); the rest is the
    context's own."""

    def __init__(self, context: grpc.aio.ServicerContext, obs: _Observer) -> None:
        self._context = context
        self._obs = obs

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            self._obs.received.inc()
        return message

    async def write(self, message: Any) -> None:
        await self._context.write(message)
        self._obs.sent.inc()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


def _observed_unary(behavior: Callable[..., Any], obs: _Observer) -> Callable[..., Any]:
    if obs.streams_requests or obs.streams_replies:
        return _observed_writer(behavior, obs)

    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        obs.started.inc()
        obs.received.inc()
        t0 = time.perf_counter()
        try:
            reply = await behavior(request, context)
        except BaseException as exc:
            obs.ended(t0, context, exc)
            raise
        obs.sent.inc()
        obs.ended(t0, context, None)
        return reply

    return observed


def _observed_writer(behavior: Callable[..., Any], obs: _Observer) -> Callable[..., Any]:
    """A coroutine handler of a streaming method: its requests counted as read, its replies
    as written, or as returned where the method's reply is one message."""

    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        obs.started.inc()
        request = obs.counted(request)
        t0 = time.perf_counter()
        try:
            reply = await behavior(request, _CountedContext(context, obs))
        except BaseException as exc:
            obs.ended(t0, context, exc)
            raise
        if not obs.streams_replies:  # a streaming method's return value is not sent
            obs.sent.inc()
        obs.ended(t0, context, None)
        return reply

    return observed


def _observed_stream(behavior: Callable[..., Any], obs: _Observer) -> Callable[..., Any]:
    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        obs.started.inc()
        request = obs.counted(request)
        t0 = time.perf_counter()
        try:
            async for item in behavior(request, context):
                yield item
                obs.sent.inc()
        except BaseException as exc:
            obs.ended(t0, context, exc)
            raise
        obs.ended(t0, context, None)

    return observed


Wrap = Callable[[Callable[..., Any]], Callable[..., Any]]
Refused = Callable[[float, grpc.aio.ServicerContext], None]
Wire = Callable[[grpc.RpcMethodHandler, str, Refused], grpc.RpcMethodHandler]


def wrap_handler(handler: grpc.RpcMethodHandler, unary: Wrap,
                 stream: Wrap) -> grpc.RpcMethodHandler:
    """The same handler with its behaviour wrapped: by `stream` where it yields its replies
    (an async generator), by `unary` where it returns them (a coroutine; also a streaming
    handler that writes with context.write(), such as health's Watch)."""
    h: Any = handler
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behavior = getattr(h, kind)
        if behavior is not None:
            wrap = stream if inspect.isasyncgenfunction(behavior) else unary
            return h._replace(**{kind: wrap(behavior)})  # type: ignore[no-any-return]
    return handler


# go-grpc-prometheus's grpc_type, by (request streaming, response streaming).
_KINDS = {(False, False): "unary", (False, True): "server_stream",
          (True, False): "client_stream", (True, True): "bidi_stream"}


def declared_kind(handler: grpc.RpcMethodHandler) -> str:
    return _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]


def _observed(handler: grpc.RpcMethodHandler, obs: _Observer) -> grpc.RpcMethodHandler:
    return wrap_handler(handler, lambda b: _observed_unary(b, obs),
                        lambda b: _observed_stream(b, obs))


def instrument(handler: grpc.RpcMethodHandler, service: str, method: str,
               metrics: Metrics) -> grpc.RpcMethodHandler:
    """The same handler, counted and timed. A request-streaming handler (reflection's
    ServerReflectionInfo is bidirectional) takes its request iterator where a unary one takes
    its request, so the same wrappers serve it; which one is chosen here, once, so a unary
    call's cost is the same whatever other kinds there are."""
    return _observed(handler, _Observer(metrics, service, method, declared_kind(handler)))


class _InstrumentedGeneric(grpc.GenericRpcHandler):
    """A generic handler's answers, wrapped once per method."""

    def __init__(self, inner: grpc.GenericRpcHandler, metrics: Metrics) -> None:
        self._inner = inner
        self._metrics = metrics
        self._cache: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = self._inner.service(details)
        if handler is None:
            return None
        cached = self._cache.get(details.method)
        if cached is None or cached[0] is not handler:
            _, service, method = details.method.split("/", 2)
            cached = (handler, instrument(handler, service, method, self._metrics))
            self._cache[details.method] = cached
        return cached[1]


class InstrumentedServer:
    """Registers services on `server` with every method handler counted and timed; pass it
    where grpc's generated code expects the server (add_FooServicer_to_server(s, it))."""

    def __init__(self, server: grpc.aio.Server, metrics: Metrics) -> None:
        self._server = server
        self._metrics = metrics

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._server.add_generic_rpc_handlers(
            tuple(_InstrumentedGeneric(h, self._metrics) for h in handlers))

    def add_registered_method_handlers(self, service: str,
                                       handlers: Mapping[str, grpc.RpcMethodHandler]) -> None:
        self._server.add_registered_method_handlers(
            service, {name: instrument(h, service, name, self._metrics)
                      for name, h in handlers.items()})

    def add_service(self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler],
                    wire: Wire | None = None) -> None:
        """Register a service of our own from its method handlers, as its .proto declares
        them (their kind is counted). `wire` (cardinality.one_request) may change how each
        counted handler meets gRPC; it is given the method's path and what counts a call it
        ends before the handler runs."""
        wired = {}
        for name, h in handlers.items():
            obs = _Observer(self._metrics, service, name, declared_kind(h))
            wired[name] = _observed(h, obs)
            if wire is not None:
                wired[name] = wire(wired[name], f"/{service}/{name}", obs.refused)
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wired),))
        self._server.add_registered_method_handlers(service, wired)

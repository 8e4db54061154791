"""gRPC-level Prometheus metrics under go-grpc-prometheus's names, for every service the
server offers (vae.v1, health, reflection)."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from vae_server.metrics import Metrics


def _split(full_method: str) -> tuple[str, str]:
    # "/vae.v1.VaeService/Decode" -> ("vae.v1.VaeService", "Decode")
    _, service, method = full_method.split("/", 2)
    return service, method


def _code_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if exc is None:
        return "OK"
    if isinstance(exc, asyncio.CancelledError):
        # The handler is cancelled both when the caller cancels and when the deadline passes.
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split(details.method)
        if handler.unary_unary is not None:
            labels = (service, method, "unary")
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, labels))
        if handler.unary_stream is not None:
            labels = (service, method, "server_stream")
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, labels))
        return handler

    @contextlib.asynccontextmanager
    async def _observed(self, labels: tuple[str, str, str],
                        context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Count the call as started, then as handled with its status code, and time it."""
        m = self._m
        m.started.labels(*labels).inc()
        t0 = time.perf_counter()
        exc: BaseException | None = None
        try:
            yield
        except BaseException as e:
            exc = e
            raise
        finally:
            m.handling.labels(*labels).observe(time.perf_counter() - t0)
            m.handled.labels(*labels, _code_of(context, exc)).inc()

    def _wrap_unary(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed(labels, context):
                return await behavior(request, context)

        return wrapped

    def _wrap_stream(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        if not inspect.isasyncgenfunction(behavior):
            # A handler that writes with context.write() (health's Watch) is a coroutine.
            return self._wrap_unary(behavior, labels)

        async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async with self._observed(labels, context):
                async for item in behavior(request, context):
                    yield item

        return wrapped

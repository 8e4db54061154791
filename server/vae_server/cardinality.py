"""One request message a call, read by the handler itself.

Every vae.v1 method takes one request message. grpc.aio's server reads a unary request before
the handler runs, and when the caller ends its request side without a message it returns with
no status at all: the caller waits for its deadline (forever without one), holding one of the
connection's streams. gRPC's status codes name such a call a request cardinality violation,
UNIMPLEMENTED.

`one_request` registers such a method as gRPC's request-streaming kind, whose handler reads
its request itself, the same one read of core's as before: a call that sent none is
UNIMPLEMENTED at once. The handler within still sees one request, and is counted from then on
as before: only calls that sent one reach it. A call that sends more than one is served by
the first, as grpc.aio's unary methods serve it: telling it apart would cost every call a
second read, a measurable share of a one-image Decode.

A call that ended before its request was read (its deadline passed while it waited for the
event loop, or its caller cancelled it, or its connection closed) reads as no message too; it
ends as grpc.aio ended it, with no status sent and no handler run, so it still counts as
received and not taken (intake.py). Only the deadline can be read at once: a cancellation
reaches the handler as gRPC cancels its task, so a call is refused only after CANCEL_NEWS_S
without one.

Being where a call's AbortError (every refusal of the servicer and the token check) leaves the
handlers, this is also where the request it would keep alive is let go (`_unary`).
"""

from __future__ import annotations

import asyncio
import time
import traceback
from collections.abc import AsyncIterator, Callable
from typing import Any, NoReturn

import grpc

from vae_server.instrument import Refused, deadline_passed

# How long a call that found no request message waits before it is refused: a call its
# caller cancelled (or whose connection closed) reads the same, and gRPC's word of the
# cancellation, which ends this wait, follows within it.
CANCEL_NEWS_S = 0.05


async def _refuse(context: grpc.aio.ServicerContext, method: str, refused: Refused) -> NoReturn:
    """End a call that sent no request message (see the module's docstring)."""
    t0 = time.perf_counter()
    if deadline_passed(context):
        raise asyncio.CancelledError  # ended in gRPC before it was read
    await asyncio.sleep(CANCEL_NEWS_S)  # cancelled meanwhile: CancelledError, nothing sent
    try:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED,
                            f"{method} takes exactly one request message; the call sent none")
    finally:
        refused(t0, context)
    raise AssertionError("context.abort returned")  # it raises grpc.aio.AbortError


def _forget_frames(exc: BaseException | None) -> None:
    """Drop the locals of the finished frames in an exception's tracebacks (its own and those
    of the exceptions it was raised in): see `_unary`."""
    while exc is not None:
        traceback.clear_frames(exc.__traceback__)
        exc = exc.__context__


def _unary(behavior: Callable[..., Any], method: str, refused: Refused) -> Callable[..., Any]:
    async def one(_: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        request = await context.read()
        if request is grpc.aio.EOF:
            await _refuse(context, method, refused)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError as exc:
            # A refusal (context.abort: the status alone, which clients retry where they
            # may). grpc.aio keeps the AbortError on the call, and its tracebacks hold the
            # handlers' frames, the request among their locals, and the context that keeps
            # it: a cycle that only a garbage collection frees. Bursts of refused 64 MiB
            # requests held gigabytes until one ran.
            del request
            _forget_frames(exc)
            raise

    return one


def _stream(behavior: Callable[..., Any], method: str, refused: Refused) -> Callable[..., Any]:
    async def one(_: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        request = await context.read()
        if request is grpc.aio.EOF:
            await _refuse(context, method, refused)
        items = behavior(request, context)
        try:
            async for item in items:
                yield item
        except grpc.aio.AbortError as exc:  # as in _unary
            del request
            _forget_frames(exc)
            raise
        finally:
            # Close the handler now, not when it is collected, as if gRPC ran it itself.
            await items.aclose()

    return one


def one_request(handler: grpc.RpcMethodHandler, method: str,
                refused: Refused) -> grpc.RpcMethodHandler:
    """`handler` of `method` ("/service/Method") reading its one request itself; `refused`
    counts a call it refuses. A handler that streams its requests reads them already, and is
    returned as it is."""
    if handler.request_streaming:
        return handler
    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(
            _stream(handler.unary_stream, method, refused), handler.request_deserializer,
            handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(
        _unary(handler.unary_unary, method, refused), handler.request_deserializer,
        handler.response_serializer)

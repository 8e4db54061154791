"""The gRPC-level metrics cover every service the server offers: vae.v1, health, and server
reflection, whose one method is a bidirectional stream."""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import server_thread, wait_until

pytestmark = pytest.mark.e2e
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"


def test_reflection_calls_are_counted_as_bidi_streams(model_dir):
    """Before: request-streaming handlers were left unwrapped, so reflection (what grpcurl
    asks first) was never counted, though the module said it was."""
    with server_thread(model_dir) as srv:
        registry = srv.running.metrics.registry
        labels = {"grpc_service": REFLECTION, "grpc_method": "ServerReflectionInfo",
                  "grpc_type": "bidi_stream"}
        with grpc.insecure_channel(srv.target) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            asks = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(
                        file_containing_symbol="vae.v1.VaeService")]
            replies = list(stub.ServerReflectionInfo(iter(asks), timeout=30))
        assert len(replies) == 2
        services = {s.name for s in replies[0].list_services_response.service}
        assert "vae.v1.VaeService" in services
        assert registry.get_sample_value("grpc_server_started_total", labels) == 1
        assert registry.get_sample_value("grpc_server_handled_total",
                                         {**labels, "grpc_code": "OK"}) == 1
        assert registry.get_sample_value("grpc_server_handling_seconds_count", labels) == 1


def test_calls_received_are_counted_before_the_event_loop_takes_them(model_dir):
    """Calls wait in gRPC's core until the event loop takes them, where the handlers' counters
    (and the queue, and every other metric) cannot see them; one whose deadline passes there
    ends without a handler ever running. Before, nothing counted them: a burst that a busy loop
    could not take in time read as a quiet server while its callers timed out. Core's count of
    received calls, against grpc_server_started_total, shows them."""
    from vae_proto import vae_pb2, vae_pb2_grpc

    calls = 6
    with server_thread(model_dir) as srv:
        registry = srv.running.metrics.registry

        def received() -> float:
            return registry.get_sample_value("vae_grpc_received_calls_total")

        def started() -> float:  # by the handlers, of every service
            return sum(s.value for f in srv.running.metrics.started.collect()
                       for s in f.samples if s.name.endswith("_total"))

        with grpc.insecure_channel(srv.target) as channel:
            stub = vae_pb2_grpc.VaeServiceStub(channel)
            stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)
            # Idle: every call received was taken.
            assert received() == started() >= 1
            r0, s0 = received(), started()
            busy, release = threading.Event(), threading.Event()

            def hold_loop() -> None:  # a loop busy with other work: it takes no call
                busy.set()
                release.wait(30)

            srv.loop.call_soon_threadsafe(hold_loop)
            assert busy.wait(10)
            try:
                futures = [stub.GetModelInfo.future(vae_pb2.GetModelInfoRequest(), timeout=1)
                           for _ in range(calls)]
                wait_until(lambda: received() == r0 + calls, timeout=10)
                assert started() == s0  # no handler has seen them
                codes = [f.exception().code() for f in futures]
            finally:
                release.set()
            assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * calls
            # The loop may hold one of them already (it asks gRPC for the next call before it
            # is busy): its handler runs late. The others never reach one.
            stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)
            assert received() == r0 + calls + 1
            assert s0 + 1 <= started() <= s0 + 2


def test_each_server_in_a_process_counts_the_calls_it_received(model_dir):
    """channelz lists every gRPC server of the process: each server's metric must read its
    own (the one made when it was), not another's."""
    from vae_proto import vae_pb2, vae_pb2_grpc

    with server_thread(model_dir) as first, server_thread(model_dir) as second:
        for srv, calls in ((first, 3), (second, 1)):
            with grpc.insecure_channel(srv.target) as channel:
                stub = vae_pb2_grpc.VaeServiceStub(channel)
                for _ in range(calls):
                    stub.GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)
        for srv, calls in ((first, 3), (second, 1)):
            metrics = srv.running.metrics
            started = sum(s.value for f in metrics.started.collect() for s in f.samples
                          if s.name.endswith("_total"))
            assert started == calls
            assert metrics.registry.get_sample_value("vae_grpc_received_calls_total") == calls


def test_messages_are_counted_as_go_grpc_prometheus_counts_them(model_dir):
    """grpc_server_msg_received_total and grpc_server_msg_sent_total, which go-grpc-prometheus
    serves beside the other three and its dashboards plot (before, they were missing): one a
    unary request or reply, one a stream's each message, whether the handler yields its
    replies (SampleStream, reflection) or writes them (health's Watch); no reply for a call
    that fails."""
    import numpy as np
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vae_client import VaeClient, VaeError

    def counts(service: str, method: str, kind: str) -> tuple[float | None, float | None]:
        labels = {"grpc_service": service, "grpc_method": method, "grpc_type": kind}
        return (registry.get_sample_value("grpc_server_msg_received_total", labels),
                registry.get_sample_value("grpc_server_msg_sent_total", labels))

    vae = "vae.v1.VaeService"
    with server_thread(model_dir) as srv:
        registry = srv.running.metrics.registry
        # Every vae.v1 method's series from the start, at 0.
        assert counts(vae, "LogLikelihood", "unary") == (0, 0)
        assert counts(vae, "SampleStream", "server_stream") == (0, 0)
        with VaeClient(srv.target, timeout=30, retries=0) as client:
            k = client.info().latent_dim
            client.decode(np.zeros((3, k), np.float32))
            with pytest.raises(VaeError):
                client.decode(np.zeros((3, k + 1), np.float32))  # INVALID_ARGUMENT
            chunks = list(client.sample_stream(10, seed=1, chunk_size=4))
        assert len(chunks) == 3
        with grpc.insecure_channel(srv.target) as channel:
            asks = [reflection_pb2.ServerReflectionRequest(list_services="")] * 3
            replies = list(reflection_pb2_grpc.ServerReflectionStub(channel)
                           .ServerReflectionInfo(iter(asks), timeout=30))
            assert len(replies) == 3
            watch = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        wait_until(lambda: registry.get_sample_value("grpc_server_handled_total", {
            "grpc_service": "grpc.health.v1.Health", "grpc_method": "Watch",
            "grpc_type": "server_stream", "grpc_code": "Canceled"}) == 1, timeout=10)
        assert counts(vae, "Decode", "unary") == (2, 1)
        assert counts(vae, "SampleStream", "server_stream") == (1, 3)
        assert counts(vae, "GetModelInfo", "unary") == (1, 1)
        assert counts(REFLECTION, "ServerReflectionInfo", "bidi_stream") == (3, 3)
        assert counts("grpc.health.v1.Health", "Watch", "server_stream") == (1, 1)


def test_handlers_that_read_and_write_through_the_context_are_counted_by_message():
    """A coroutine handler of a streaming method may read its requests with context.read() and
    write its replies with context.write(): each message counts, and a value it returns, which
    gRPC does not send, does not (before: a returned value counted as a reply sent, and reads
    through the context counted nothing)."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from vae_core.ports import free_port
    from vae_server.instrument import InstrumentedServer
    from vae_server.metrics import Metrics

    async def writes(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        await context.write(b"a")
        await context.write(b"b")
        return b"not sent"

    async def reads(requests: object, context: grpc.aio.ServicerContext) -> bytes:
        while await context.read() is not grpc.aio.EOF:
            pass
        return b"one reply"

    metrics = Metrics(CollectorRegistry(), gpu=False)

    async def run() -> tuple[list[bytes], bytes]:
        server = grpc.aio.server()
        InstrumentedServer(server, metrics).add_generic_rpc_handlers((
            grpc.method_handlers_generic_handler("t.T", {
                "Writes": grpc.unary_stream_rpc_method_handler(writes),
                "Reads": grpc.stream_unary_rpc_method_handler(reads)}),))
        port = free_port()
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                written = [m async for m in channel.unary_stream("/t.T/Writes")(b"", timeout=10)]
                read = await channel.stream_unary("/t.T/Reads")(iter([b"1", b"2", b"3"]),
                                                                timeout=10)
        finally:
            await server.stop(None)
        return written, read

    assert asyncio.run(run()) == ([b"a", b"b"], b"one reply")

    def count(name: str, method: str, kind: str) -> float | None:
        return metrics.registry.get_sample_value(
            name, {"grpc_service": "t.T", "grpc_method": method, "grpc_type": kind})

    assert count("grpc_server_msg_received_total", "Writes", "server_stream") == 1
    assert count("grpc_server_msg_sent_total", "Writes", "server_stream") == 2
    assert count("grpc_server_msg_received_total", "Reads", "client_stream") == 3
    assert count("grpc_server_msg_sent_total", "Reads", "client_stream") == 1

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

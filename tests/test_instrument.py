"""The gRPC-level metrics cover every service the server offers: vae.v1, health, and server
reflection, whose one method is a bidirectional stream."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving import server_thread

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

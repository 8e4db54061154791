"""The gRPC server: ONNX Runtime sessions, dynamic batching, metrics, and the processes
that serve them."""

from vae_core.host import no_onnxruntime_telemetry

no_onnxruntime_telemetry()  # before runtime and binding import onnxruntime

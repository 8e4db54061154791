"""The gRPC server: ONNX Runtime sessions, dynamic batching, metrics, and the processes
that serve them."""

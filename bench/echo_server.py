"""The transport limit: a trivial grpc.aio server that answers vae.v1 Decode and SampleStream
with pre-built, pre-serialised replies of the same sizes as the real server's, doing no work.
It runs on the same kind of event loop as the server it is measured against (--event-loop).

    python bench/echo_server.py --port P --latent-dim K [--event-loop auto|uvloop|asyncio]
"""

from __future__ import annotations

import argparse

import grpc
import numpy as np

from vae_proto import vae_pb2
from vae_proto.tensor import to_tensor
from vae_server import loops


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--chunk", type=int, default=1024, help="images per stream chunk")
    p.add_argument("--latent-dim", type=int, default=16, help="reported by GetModelInfo")
    p.add_argument("--event-loop", default="auto", choices=loops.CHOICES)
    return p.parse_args()


async def serve(args: argparse.Namespace) -> None:
    one_image = vae_pb2.DecodeResponse(images=to_tensor(np.zeros((1, 28, 28), np.float32)))
    decode_reply = one_image.SerializeToString()
    chunks = {
        dtype: vae_pb2.SampleChunk(images=to_tensor(np.zeros((args.chunk, 28, 28), np_dtype)))
        .SerializeToString()
        for dtype, np_dtype in ((vae_pb2.FLOAT32, np.float32), (vae_pb2.UINT8, np.uint8))
    }

    async def decode(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return decode_reply

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        req = vae_pb2.SampleStreamRequest.FromString(request)
        reply = chunks[req.output_dtype or vae_pb2.FLOAT32]
        for _ in range(0, req.n, args.chunk):
            yield reply

    async def info(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return vae_pb2.ModelInfo(latent_dim=args.latent_dim).SerializeToString()

    handlers = {
        "Decode": grpc.unary_unary_rpc_method_handler(decode),
        "GetModelInfo": grpc.unary_unary_rpc_method_handler(info),
        "SampleStream": grpc.unary_stream_rpc_method_handler(stream),
    }
    size = 64 * 1024 * 1024
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", size),
                                      ("grpc.max_send_message_length", size)])
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("vae.v1.VaeService", handlers),))
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    arguments = parse_args()
    loops.run(serve(arguments), arguments.event_loop)

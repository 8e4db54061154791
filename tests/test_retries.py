"""Client retries through gRPC's own retry policy (vae_client.channel.retry_options): a call
refused because the queue is full is retried after a back-off and succeeds once there is
room, as is one its server cancelled; other errors are not retried; a client with retries=0
sees the refusal."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from serving import held_decoder, server_thread, stub_server
from vae_client import VaeClient, VaeError
from vae_core.onnx_model import OnnxVAE

ROWS = 16


@pytest.fixture(scope="module")
def reference(model_dir):
    return OnnxVAE(model_dir)


def _sample(srv, name: str, labels: dict[str, str]) -> float:
    return srv.running.metrics.registry.get_sample_value(name, labels) or 0.0


def _refused(srv) -> float:
    return _sample(srv, "vae_rejected_total", {"reason": "queue_full"})


def _started(srv, method: str) -> float:
    return _sample(srv, "grpc_server_started_total", {
        "grpc_service": "vae.v1.VaeService", "grpc_method": method, "grpc_type": "unary"})


@pytest.fixture
def full_queue(model_dir):
    """A server whose decoder is held running one call while a second fills the queue: the
    next Decode is refused until the gate is set."""
    with server_thread(model_dir, max_batch_size=ROWS, max_queue_images=ROWS,
                       max_images_per_request=ROWS, max_sample_n=ROWS, max_chunk_size=ROWS,
                       default_chunk_size=ROWS, max_k=ROWS, inline_rows=0, max_delay_ms=0,
                       instances=1) as srv, held_decoder(srv, ROWS) as gate:
        yield srv, gate


def test_a_refused_call_is_retried_and_succeeds_once_there_is_room(full_queue, reference):
    srv, gate = full_queue
    z = np.random.default_rng(0).standard_normal((1, reference.latent_dim), dtype=np.float32)
    result: list[np.ndarray] = []
    with VaeClient(srv.target) as c:  # retries on by default
        caller = threading.Thread(target=lambda: result.append(c.decode(z)))
        caller.start()
        deadline = time.monotonic() + 10
        while _refused(srv) < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert _refused(srv) >= 1  # the first attempt was refused ...
        gate.set()  # ... and room is made
        caller.join(30)
    np.testing.assert_array_equal(result[0].reshape(1, -1), reference.decode(z))
    attempts = _started(srv, "Decode") - 2  # the two calls that held the queue
    assert attempts == _refused(srv) + 1  # refused attempts, then the one that ran
    assert 2 <= attempts <= 5


def test_without_retries_the_refusal_reaches_the_caller_at_once(full_queue, reference):
    srv, _ = full_queue
    z = np.zeros((1, reference.latent_dim), np.float32)
    with VaeClient(srv.target, retries=0) as c:
        t0 = time.perf_counter()
        with pytest.raises(VaeError) as err:
            c.decode(z)
        assert time.perf_counter() - t0 < 5.0  # room only comes when the gate opens
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in err.value.details and _refused(srv) == 1
    assert "this call needs 1;" in err.value.details


def test_an_invalid_request_is_not_retried(model_dir, reference):
    with server_thread(model_dir) as srv, VaeClient(srv.target) as c:
        before = _started(srv, "Decode")
        with pytest.raises(VaeError) as err:
            c.decode(np.full((1, reference.latent_dim), np.nan, np.float32))
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert _started(srv, "Decode") - before == 1


@pytest.fixture
def cancels_once():
    """A vae.v1 server whose GetModelInfo is cancelled on its first call, as a stopping gRPC
    server cancels the calls it has received but not yet handed to a handler; later calls are
    answered. Yields (target, the calls it has seen)."""

    from vae_proto import vae_pb2

    calls: list[int] = []

    def info(raw: bytes, context: grpc.ServicerContext) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            context.abort(grpc.StatusCode.CANCELLED, "CANCELLED")
        return vae_pb2.ModelInfo(latent_dim=4, image_shape=[28, 28]).SerializeToString()

    with stub_server({"GetModelInfo": grpc.unary_unary_rpc_method_handler(info)}) as target:
        yield target, calls


def test_a_call_its_server_cancelled_is_retried(cancels_once):
    target, calls = cancels_once
    with VaeClient(target) as c:
        assert c.info().latent_dim == 4
    assert len(calls) == 2


def test_without_retries_a_call_its_server_cancelled_fails(cancels_once):
    target, calls = cancels_once
    with VaeClient(target, retries=0) as c, pytest.raises(VaeError) as err:
        c.info()
    assert err.value.code == grpc.StatusCode.CANCELLED and len(calls) == 1


@pytest.fixture
def refuses_twice():
    """A vae.v1 server whose Encode refuses the first two attempts of each call with
    RESOURCE_EXHAUSTED, then answers. Yields (target, the attempts it has seen)."""
    from vae_proto import vae_pb2

    attempts: list[int] = []

    def encode(raw: bytes, context: grpc.ServicerContext) -> bytes:
        attempts.append(len(raw))
        if len(attempts) % 3:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        n = vae_pb2.EncodeRequest.FromString(raw).images.shape[0]
        codes = vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=[n, 4],
                               data=np.zeros((n, 4), "<f4").tobytes())
        return vae_pb2.EncodeResponse(mu=codes, logvar=codes).SerializeToString()

    with stub_server({"Encode": grpc.unary_unary_rpc_method_handler(encode)}) as target:
        yield target, attempts


# gRPC keeps a call's request for its retries only up to grpc.per_rpc_retry_buffer_size
# (256 KiB unless set), and past it fails the call at its first refusal: 256 images are 784 KiB,
# as vae-client score sends them; 1,024 are 3.1 MB (within the stand-in server's 4 MB).
@pytest.mark.parametrize("n", [1, 256, 1024])
def test_a_large_request_is_retried_as_a_small_one_is(refuses_twice, n):
    target, attempts = refuses_twice
    images = np.full((n, 784), 0.5, np.float32)
    with VaeClient(target, timeout=60) as c:
        mu, _ = c.encode(images)
    assert mu.shape == (n, 4) and len(attempts) == 3
    assert min(attempts) > 4 * 784 * n


def test_a_large_request_is_retried_by_the_asyncio_client_too(refuses_twice):
    import asyncio

    from vae_client.aio import AsyncVaeClient

    target, attempts = refuses_twice

    async def call() -> np.ndarray:
        async with AsyncVaeClient(target, timeout=60) as c:
            return (await c.encode(np.full((256, 784), 0.5, np.float32)))[0]

    assert asyncio.run(call()).shape == (256, 4) and len(attempts) == 3

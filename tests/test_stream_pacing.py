"""A SampleStream under way is paced by the decoder's queue, never broken off by it: its later
chunks wait for room while other calls fill the queue, and a queue that holds only one chunk
still serves a stream. The stream itself is admitted like any call: refused at once when the
queue is full as it starts. And a stream whose every image arrived is complete, even when
its connection then breaks."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from serving import held_decoder, server_thread, stub_server, wait_until
from vae_client import VaeClient, VaeError
from vae_core.onnx_model import OnnxVAE
from vae_proto import vae_pb2
from vae_proto.tensor import to_tensor

CHUNK = 64


@pytest.fixture(scope="module")
def reference(model_dir):
    return OnnxVAE(model_dir)


def test_a_queue_of_one_chunk_serves_a_stream_on_an_idle_server(model_dir, reference):
    """Before: the chunk computed ahead found the queue full of the stream's own chunk and
    the stream broke off with RESOURCE_EXHAUSTED, on a server with nothing else to do."""
    n = 10 * CHUNK
    with server_thread(model_dir, max_batch_size=CHUNK, max_queue_images=CHUNK,
                       max_images_per_request=CHUNK, max_sample_n=CHUNK,
                       max_chunk_size=CHUNK, default_chunk_size=CHUNK, max_k=CHUNK) as srv, \
            VaeClient(srv.target, retries=0) as c:
        chunks = list(c.sample_stream(n, seed=3, chunk_size=CHUNK))
        registry = srv.running.metrics.registry
        refused = registry.get_sample_value("vae_rejected_total", {"reason": "queue_full"})
        # Each image counted once, the last chunk's too (counted as gRPC takes it).
        assert registry.get_sample_value("vae_method_images_total",
                                         {"grpc_method": "SampleStream"}) == n
    assert [offset for offset, _ in chunks] == list(range(0, n, CHUNK))
    np.testing.assert_allclose(np.concatenate([x for _, x in chunks]).reshape(n, -1),
                               reference.sample(n, 3), rtol=0, atol=1e-5)
    assert not refused


@pytest.fixture
def held(model_dir):
    """A server (queue of two chunks, one run at a time) whose decoder is held running one
    Decode call while a second waits in the queue, until the gate is set."""
    with server_thread(model_dir, max_batch_size=CHUNK, max_queue_images=2 * CHUNK,
                       max_images_per_request=CHUNK, max_sample_n=CHUNK,
                       max_chunk_size=CHUNK, default_chunk_size=CHUNK, max_k=CHUNK, inline_rows=0,
                       max_delay_ms=0, instances=1) as srv, held_decoder(srv, CHUNK) as gate:
        yield srv, gate


def test_a_stream_under_way_waits_for_room_rather_than_break_off(held, reference):
    """The stream is admitted (its first chunk fits beside the queued call); the chunk it
    computes ahead does not fit until the held run ends. Before: that chunk was refused and
    the stream broke off with RESOURCE_EXHAUSTED after its first chunk, which a client does
    not resume."""
    srv, gate = held
    n = 4 * CHUNK
    got: list[tuple[int, np.ndarray]] = []
    errors: list[BaseException] = []

    def stream() -> None:
        try:
            with VaeClient(srv.target, retries=0) as c:
                got.extend(c.sample_stream(n, seed=9, chunk_size=CHUNK))
        except BaseException as exc:  # noqa: BLE001 - the assertion below reports it
            errors.append(exc)

    caller = threading.Thread(target=stream)
    caller.start()
    batcher = srv.running.servicer.decoder
    deadline = time.monotonic() + 10
    while batcher.queued_images < 2 * CHUNK and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batcher.queued_images == 2 * CHUNK  # the queued call and the first chunk: full
    time.sleep(0.2)
    gate.set()
    caller.join(30)
    assert not errors, errors
    assert [offset for offset, _ in got] == list(range(0, n, CHUNK))
    np.testing.assert_allclose(np.concatenate([x for _, x in got]).reshape(n, -1),
                               reference.sample(n, 9), rtol=0, atol=1e-5)


def test_a_stream_that_starts_on_a_full_queue_is_refused_at_once(held):
    srv, gate = held
    batcher = srv.running.servicer.decoder
    # A stream admitted first fills the queue's other half (its first chunk waits there).
    admitted: list[tuple[int, np.ndarray]] = []
    with VaeClient(srv.target, retries=0) as first:
        waiting = threading.Thread(target=lambda: admitted.extend(
            first.sample_stream(2 * CHUNK, seed=1, chunk_size=CHUNK)))
        waiting.start()
        deadline = time.monotonic() + 10
        while batcher.queued_images < 2 * CHUNK and time.monotonic() < deadline:
            time.sleep(0.01)
        with VaeClient(srv.target, retries=0) as c:
            t0 = time.perf_counter()
            with pytest.raises(VaeError) as err:
                list(c.sample_stream(CHUNK, seed=2, chunk_size=CHUNK))
            assert time.perf_counter() - t0 < 5.0  # room only comes when the gate opens
        gate.set()
        waiting.join(30)
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in err.value.details
    assert [offset for offset, _ in admitted] == [0, CHUNK]  # the admitted one was served


def raw_stream(channel: grpc.Channel, **request: Any) -> Iterator[bytes]:
    """A SampleStream on a bare channel, its chunks as bytes: a caller that reads when it
    likes (the client library reads ahead)."""
    return channel.unary_stream("/vae.v1.VaeService/SampleStream")(
        vae_pb2.SampleStreamRequest(**request).SerializeToString(), timeout=60)


def test_callers_that_stop_reading_hold_queue_room_not_memory(model_dir):
    """A stream's chunks that have run wait for their caller to read them while holding room
    in the decoder's queue: callers that stop reading make the server refuse new work, and
    their replies are bounded by the queue. Before: a chunk gave its room back as soon as it
    ran, and replies waited in memory without bound (16 such callers of 8,192-image float32
    chunks held 1.7 GB) while every new call was admitted."""
    chunk = 1024
    queue = 4 * chunk
    # (For --stream-stall-s: past it the room goes back, the test below.)
    with server_thread(model_dir, max_batch_size=chunk, max_queue_images=queue,
                       max_images_per_request=chunk, max_sample_n=chunk, max_chunk_size=chunk,
                       default_chunk_size=chunk, max_k=chunk, stream_stall_s=300) as srv:
        batcher = srv.running.servicer.decoder
        z = np.zeros((chunk, srv.running.servicer.runtime.latent_dim), np.float32)
        decode = vae_pb2.DecodeRequest(z=to_tensor(z)).SerializeToString()
        channels, streams = [], []
        refused = None
        try:
            # Callers that read one chunk and then nothing, on connections of their own,
            # until the server turns a Decode away.
            for i in range(16):
                channel = grpc.insecure_channel(srv.target)
                channels.append(channel)
                stream = raw_stream(channel, n=10**7, chunk_size=chunk, seed=i)
                streams.append(stream)
                next(stream)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # until this stream has filled what it can
                    before = batcher.unsent_images
                    time.sleep(0.3)
                    if batcher.unsent_images == before:
                        break
                try:
                    channels[0].unary_unary("/vae.v1.VaeService/Decode")(decode, timeout=30)
                except grpc.RpcError as err:
                    refused = err
                    break
            assert refused is not None, f"{len(streams)} stalled streams, all admitted"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
            assert "made for streams, not yet sent" in refused.details(), refused.details()
            # Bounded by the queue: a chunk's room stays taken through its run.
            assert 0 < batcher.unsent_images <= queue
            registry = srv.running.metrics.registry
            assert registry.get_sample_value("vae_stream_unsent_images") == batcher.unsent_images
            assert registry.get_sample_value("vae_stream_stalls_total") == 0
        finally:
            for stream in streams:
                stream.cancel()
            for channel in channels:
                channel.close()
        # The callers gone, their room comes back and the server serves again.
        def in_flight() -> float:
            return srv.running.metrics.registry.get_sample_value("vae_in_flight_calls")

        wait_until(lambda: batcher.unsent_images == 0 and in_flight() == 0, timeout=10,
                   what="stream images still held, or calls in flight")
        with VaeClient(srv.target, retries=0) as c:
            assert c.decode(z).shape[0] == chunk


def test_a_stalled_stream_counts_the_images_it_sent_not_those_waiting_to_be(model_dir):
    """vae_method_images_total counts a SampleStream's images once gRPC has taken them, as
    vae_stream_unsent_images stops holding them: every image the decoder made is in exactly
    one of the two. Before: a chunk was counted before `yield`, so the one waiting there for
    a caller that stopped reading was in both, and the dashboard's images/s counted images
    that never left."""
    chunk = 1024
    with server_thread(model_dir, max_batch_size=chunk, max_queue_images=4 * chunk,
                       max_images_per_request=chunk, max_sample_n=chunk, max_chunk_size=chunk,
                       default_chunk_size=chunk, max_k=chunk, stream_stall_s=300) as srv:
        registry = srv.running.metrics.registry

        def figures() -> tuple[float, float, float]:
            return tuple(registry.get_sample_value(name, labels) or 0.0 for name, labels in (
                ("vae_items_total", {"model": "decoder"}),
                ("vae_method_images_total", {"grpc_method": "SampleStream"}),
                ("vae_stream_unsent_images", {})))

        channel = grpc.insecure_channel(srv.target)
        try:
            stream = raw_stream(channel, n=10**6, chunk_size=chunk)
            next(stream)  # one chunk read, then none
            last: list[tuple[float, float, float]] = []

            def settled() -> bool:
                last.append(figures())
                return len(last) > 5 and last[-1] == last[-6] and last[-1][2] > 0

            wait_until(settled, timeout=20, every=0.1, what="the stalled stream never settled")
            made, counted, unsent = last[-1]
            assert counted + unsent == made, last[-1]
            stream.cancel()
        finally:
            channel.close()


def test_callers_that_stop_reading_keep_other_calls_refused_for_the_stall_limit_only(
        model_dir, reference):
    """Before: a stalled stream's chunks held their room until its connection was cut (120 s
    of age and 600 s of grace by default, then the caller connects again): three callers
    that read one chunk each kept every other call refused. Now after --stream-stall-s the
    chunks made ahead are dropped, their room back, and a caller that reads on gets the
    stream it asked for, unbroken. The chunk each waits to send keeps its room: replies
    stay bounded by the queue."""
    chunk = 2048
    # 3 s: the queue fills, and the victim is refused, before the first stall gives room back.
    with server_thread(model_dir, max_batch_size=chunk, max_queue_images=4 * chunk,
                       max_images_per_request=chunk, max_sample_n=chunk, max_chunk_size=chunk,
                       default_chunk_size=chunk, max_k=chunk, stream_stall_s=3) as srv, \
            VaeClient(srv.target, retries=0) as victim:
        batcher = srv.running.servicer.decoder

        def stalls() -> float:
            return srv.running.metrics.registry.get_sample_value("vae_stream_stalls_total")

        channels = [grpc.insecure_channel(srv.target) for _ in range(3)]
        try:
            def open_stream(i: int) -> Iterator[bytes]:
                return raw_stream(channels[i], n=10**7, chunk_size=chunk, seed=i,
                                  output_dtype=vae_pb2.UINT8)

            streams = [open_stream(i) for i in range(3)]
            firsts: list[vae_pb2.SampleChunk] = []

            def admitted(i: int) -> bool:
                """A stream is admitted on its first chunk if the others' chunks, made or
                being made, left room for it (they may not, when its call arrives late):
                once they stall, they do."""
                try:
                    firsts.append(vae_pb2.SampleChunk.FromString(next(streams[i])))
                    return True
                except grpc.RpcError as err:
                    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                streams[i] = open_stream(i)
                return False

            for i in range(3):
                wait_until(functools.partial(admitted, i), timeout=20, every=0.1,
                           what=f"stream {i} was never admitted")
            # The stalled streams fill the queue with what they made ahead ...
            wait_until(lambda: batcher.unsent_images >= 4 * chunk, timeout=10,
                       what="the stalled streams never filled the queue")
            with pytest.raises(VaeError) as refused:
                victim.sample(1, seed=0)
            assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            # ... and once they have stalled, hold only the chunk each waits to send: the
            # victim is served within a few stall limits, not a connection's age. (Not at the
            # first stall: a stream not yet stalled takes the room it gives back. Nor
            # necessarily at the third: a caller's transport may still take a chunk after its
            # caller stopped reading, and the stream then makes the next ones, which hold room
            # until it stalls again.)
            def victim_served() -> bool:
                try:
                    images = victim.sample(1, seed=0)
                except VaeError as err:
                    if err.code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                        raise
                    return False
                assert images.shape == (1, 28, 28)
                return True

            wait_until(victim_served, timeout=20, every=0.1,
                       what="stalled streams still hold what they made ahead")
            wait_until(lambda: stalls() >= 3, timeout=15, what="a stream never stalled")
            # A caller that reads on gets the images it asked for, in order, none missing.
            got = [firsts[0]] + [vae_pb2.SampleChunk.FromString(next(streams[0]))
                                 for _ in range(3)]
            assert [c.offset for c in got] == [0, chunk, 2 * chunk, 3 * chunk]
            images = np.concatenate([np.frombuffer(c.images.data, np.uint8) for c in got])
            want = np.rint(reference.sample(4 * chunk, 0) * 255).astype(np.uint8)
            np.testing.assert_array_equal(images.reshape(4 * chunk, -1), want)
        finally:
            for channel in channels:
                channel.close()
        # Every image held is given back, none twice (a count below 0 would admit more).
        wait_until(lambda: batcher.unsent_images == 0, timeout=10,
                   what="closed streams still hold room")


@pytest.fixture
def breaks_after_the_last_chunk():
    """A vae.v1 server whose SampleStream sends every image asked for, then breaks off with
    UNAVAILABLE (its connection aged out, or it began to stop); a call asking for an offset
    at n or past it gets INVALID_ARGUMENT, as from vae-server. Yields (target, the requests
    it has seen)."""
    seen: list[vae_pb2.SampleStreamRequest] = []

    def stream(raw: bytes, context: grpc.ServicerContext):
        req = vae_pb2.SampleStreamRequest.FromString(raw)
        seen.append(req)
        if req.offset >= req.n:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                          f"offset: {req.offset} is out of range; it must be 0 .. n - 1")
        for first in range(req.offset, req.n, req.chunk_size):
            rows = min(req.chunk_size, req.n - first)
            images = np.full((rows, 28, 28), first, np.float32)
            yield vae_pb2.SampleChunk(offset=first, images=to_tensor(images)).SerializeToString()
        context.abort(grpc.StatusCode.UNAVAILABLE, "the connection went away")

    with stub_server({"SampleStream": grpc.unary_stream_rpc_method_handler(stream)}) as target:
        yield target, seen


def test_a_stream_that_brought_every_image_is_complete_whatever_breaks_after(
        breaks_after_the_last_chunk):
    """Before: the client resumed at offset n and raised the server's INVALID_ARGUMENT,
    though it had every image."""
    target, seen = breaks_after_the_last_chunk
    with VaeClient(target) as c:
        chunks = list(c.sample_stream(20, seed=4, chunk_size=10))
    assert [offset for offset, _ in chunks] == [0, 10]
    assert len(seen) == 1  # nothing left to resume
    # A request past its own end is still the server's error, not an empty stream.
    with VaeClient(target) as c, pytest.raises(VaeError) as err:
        list(c.sample_stream(20, seed=4, chunk_size=10, offset=20))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_async_client_too(breaks_after_the_last_chunk):
    import asyncio

    from vae_client.aio import AsyncVaeClient

    target, seen = breaks_after_the_last_chunk

    async def main() -> list[int]:
        async with AsyncVaeClient(target) as c:
            return [offset async for offset, _ in c.sample_stream(20, seed=4, chunk_size=10)]

    assert asyncio.run(main()) == [0, 10]
    assert len(seen) == 1

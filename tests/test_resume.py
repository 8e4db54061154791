"""A server that dies in the middle of a SampleStream: the client gets a clear error, and the
stream resumed on a new server from the next offset, with the same seed, gives exactly the
bytes the uninterrupted stream gives."""

from __future__ import annotations

import grpc
import numpy as np

from serving import served_process
from vae_client import VaeClient, VaeError

N, CHUNK, SEED = 40_000, 500, 2026


def test_a_stream_cut_by_a_dying_server_resumes_byte_for_byte(model_dir):
    # The reference: the whole stream from one server, untouched.
    with served_process(model_dir) as (target, _), VaeClient(target) as c:
        whole = b"".join(images.tobytes() for _, images in
                         c.sample_stream(N, seed=SEED, chunk_size=CHUNK))
    assert len(whole) == N * 784 * 4

    received: list[bytes] = []
    next_offset = 0
    with served_process(model_dir) as (target, proc), VaeClient(target) as c:
        try:
            for offset, images in c.sample_stream(N, seed=SEED, chunk_size=CHUNK):
                assert offset == next_offset  # chunks arrive in order, none twice
                received.append(images.tobytes())
                next_offset = offset + len(images)
                if next_offset == 10 * CHUNK:
                    proc.kill()  # SIGKILL: no graceful stop, the connection just drops
        except VaeError as err:
            error = err
        else:
            raise AssertionError("the stream outlived its server")
    assert error.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                          grpc.StatusCode.CANCELLED), error
    assert 10 * CHUNK <= next_offset < N
    # The error says where to resume.
    assert error.resume_offset == next_offset
    assert f"offset={next_offset} resumes it" in str(error)

    # A new server; the stream goes on from the first image not received.
    with served_process(model_dir) as (target, _), VaeClient(target) as c:
        for offset, images in c.sample_stream(N, seed=SEED, chunk_size=CHUNK,
                                              offset=next_offset):
            assert offset == next_offset
            received.append(images.tobytes())
            next_offset = offset + len(images)
    assert next_offset == N
    resumed = b"".join(received)
    assert resumed == whole


def test_resuming_at_an_offset_inside_a_chunk_gives_the_same_images(model_dir):
    with served_process(model_dir) as (target, _), VaeClient(target) as c:
        whole = np.concatenate([x for _, x in c.sample_stream(3000, seed=5, chunk_size=256)])
        tail = np.concatenate([x for _, x in c.sample_stream(3000, seed=5, chunk_size=100,
                                                              offset=1337)])
    assert tail.tobytes() == whole[1337:].tobytes()

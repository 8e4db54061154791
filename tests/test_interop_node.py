"""The .proto alone is enough to call every RPC: a Node.js client that loads vae.proto at run
time (tests/interop/call_every_rpc.js, @grpc/grpc-js + @grpc/proto-loader, no generated code)
calls every RPC of a real server, and what it gets must equal, byte for byte, what the Python
client gets from the same server.

Skips where `node` or `npm` is missing; installs tests/interop/node_modules with `npm ci` when
it is absent or stale (skips when the registry cannot be reached, except under CI, where that
is a failure).
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import grpc
import numpy as np
import pytest

from serving import server_thread
from vae_client import VaeClient
from vae_core.onnx_model import OnnxVAE
from vae_proto import vae_pb2, vae_pb2_grpc

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[1]
INTEROP = REPO_ROOT / "tests" / "interop"
SCRIPT = INTEROP / "call_every_rpc.js"
PROTO = REPO_ROOT / "proto" / "vae_proto" / "vae.proto"
MIN_NODE_MAJOR = 18
NPM_TIMEOUT_S = 180
NETWORK_ERRORS = re.compile(
    r"ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|EHOSTUNREACH|"
    r"network|socket hang up|request to https?://\S+ failed", re.IGNORECASE)


def _installed_versions(lock: Path) -> dict[str, str]:
    packages = json.loads(lock.read_text())["packages"]
    return {name: meta.get("version", "") for name, meta in packages.items() if name}


def _node_modules_current() -> bool:
    """node_modules holds exactly what package-lock.json pins (npm writes its own copy of the
    lock file, node_modules/.package-lock.json, on install)."""
    hidden = INTEROP / "node_modules" / ".package-lock.json"
    return hidden.is_file() and (
        _installed_versions(hidden) == _installed_versions(INTEROP / "package-lock.json"))


def _skip_or_fail(reason: str) -> NoReturn:
    """Skip, but fail in CI, which must run these tests (node, npm and the npm registry)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set: these tests must run there)")
    pytest.skip(reason)


# Session-scoped and autouse so that it runs, and skips, before the model fixtures train.
@pytest.fixture(scope="session", autouse=True)
def node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        _skip_or_fail("Node.js interop test: `node` and `npm` must both be on PATH")
    version = subprocess.run([node, "--version"], capture_output=True, text=True,
                             check=True).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < MIN_NODE_MAJOR:
        _skip_or_fail(f"Node.js interop test: node {version} is older than {MIN_NODE_MAJOR}")
    if not _node_modules_current():
        try:
            done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=INTEROP,
                                  capture_output=True, text=True, timeout=NPM_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            _skip_or_fail(f"`npm ci` in {INTEROP} took over {NPM_TIMEOUT_S} s (no network?)")
        output = done.stdout + done.stderr
        if done.returncode != 0:
            if NETWORK_ERRORS.search(output):
                errors = [line for line in output.splitlines() if line.startswith("npm error")]
                _skip_or_fail("`npm ci` could not reach the npm registry: "
                              + " | ".join(errors[:4] or [output[-400:]]))
            pytest.fail(f"`npm ci` failed with {done.returncode}:\n{output}")
    return node


@pytest.fixture(scope="module")
def server(model_dir: Path):
    with server_thread(model_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def js(node: str, server) -> dict[str, Any]:
    """What the Node.js client got from every RPC."""
    done = subprocess.run([node, str(SCRIPT), server.target, str(PROTO)], cwd=INTEROP,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"node exited with {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def client(server):
    with VaeClient(server.target, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> OnnxVAE:
    return OnnxVAE(model_dir)


def tensor(obj: dict[str, Any]) -> np.ndarray:
    """A tensor as the script prints it: dtype, shape and base64 of little-endian bytes."""
    dtype = {"FLOAT32": "<f4", "UINT8": "u1"}[obj["dtype"]]
    return np.frombuffer(base64.b64decode(obj["data_b64"]), dtype=dtype).reshape(obj["shape"])


def ring_pixels(n: int) -> np.ndarray:
    """The script's input images, rebuilt from their documented formula."""
    r, c = np.mgrid[:28, :28]
    d2 = (r - 14) ** 2 + (c - 14) ** 2
    return np.stack([np.maximum(0, 255 - 8 * np.abs(d2 - (5 + i) ** 2)) for i in range(n)]
                    ).astype(np.uint8)


def test_health_and_model_info(js, client):
    assert js["health"] == {"": "SERVING", "vae.v1.VaeService": "SERVING"}
    info, got = client.info(), js["model_info"]
    assert got["model_version"] == got["manifest_model_version"] == info.model_version
    assert got["latent_dim"] == info.latent_dim and got["likelihood"] == info.likelihood
    assert got["execution_provider"] == info.execution_provider
    assert got["image_shape"] == [28, 28]
    # uint64 fields arrive in JS as decimal strings (proto-loader's longs: String).
    assert {name: int(v) for name, v in got["limits"].items()} == {
        f.name: v for f, v in info.limits.ListFields()}
    assert int(got["limits"]["max_message_bytes"]) == 64 * 1024 * 1024


def test_inputs_built_in_js_are_the_documented_bytes(js):
    u8 = ring_pixels(4)
    images_u8, images_f32 = tensor(js["inputs"]["images_u8"]), tensor(js["inputs"]["images_f32"])
    assert images_u8.shape == (4, 28, 28) and images_f32.shape == (4, 784)
    np.testing.assert_array_equal(images_u8, u8)
    np.testing.assert_array_equal(images_f32, (u8.reshape(4, 784) / 255).astype(np.float32))
    k = js["model_info"]["latent_dim"]
    z = tensor(js["inputs"]["z"])
    np.testing.assert_array_equal(z, ((np.arange(3 * k) - 5) / 4).reshape(3, k))


def test_encode_equals_the_python_client(js, client, reference):
    seed = js["seeds"]["encode"]
    for name in ("f32", "u8"):
        images = tensor(js["inputs"][f"images_{name}"])
        mu, logvar, z = client.encode(images, sample=True, seed=seed)
        got = js["encode"][name]
        for key, want in (("mu", mu), ("logvar", logvar), ("z", z)):
            assert tensor(got[key]).tobytes() == want.tobytes(), (name, key)
        assert got["mu"]["shape"] == [4, js["model_info"]["latent_dim"]]
        # The floats JS read back from the bytes are the same numbers.
        np.testing.assert_array_equal(np.asarray(got["mu_values"], np.float32), mu.ravel())
    ref_mu, _ = reference.encode(tensor(js["inputs"]["images_f32"]))
    np.testing.assert_array_equal(tensor(js["encode"]["f32"]["mu"]), ref_mu)


def test_decode_equals_the_python_client(js, client, reference):
    z = tensor(js["inputs"]["z"])
    for dtype, name in (("FLOAT32", "float32"), ("UINT8", "uint8")):
        got = tensor(js["decode"][dtype])
        want = client.decode(z, dtype=name)
        assert got.shape == (3, 28, 28) and got.dtype == want.dtype
        assert got.tobytes() == want.tobytes(), dtype
    np.testing.assert_array_equal(tensor(js["decode"]["FLOAT32"]).reshape(3, 784),
                                  reference.decode(z))


def test_sample_and_stream_equal_the_python_client(js, client, reference):
    seed = int(js["seeds"]["sample"])
    assert seed >= 2**63  # a full uint64, sent from JS as a decimal string
    f32, u8 = client.sample(10, seed=seed), client.sample(10, seed=seed, dtype="uint8")
    assert tensor(js["sample"]["FLOAT32"]["images"]).tobytes() == f32.tobytes()
    assert tensor(js["sample"]["UINT8"]["images"]).tobytes() == u8.tobytes()
    latents = tensor(js["sample"]["FLOAT32"]["latents"])
    np.testing.assert_array_equal(f32.reshape(10, 784), reference.decode(latents))

    whole, resumed = js["stream"]["whole"], js["stream"]["resumed_u8"]
    assert [c["offset"] for c in whole["chunks"]] == [0, 4, 8]
    assert [c["shape"] for c in whole["chunks"]] == [[4, 28, 28], [4, 28, 28], [2, 28, 28]]
    assert tensor(whole["images"]).tobytes() == f32.tobytes()
    assert [c["offset"] for c in resumed["chunks"]] == [6]
    assert tensor(resumed["images"]).tobytes() == u8[6:].tobytes()


def test_log_likelihood_equals_the_python_client(js, client):
    seed = js["seeds"]["log_likelihood"]
    for name in ("u8", "f32"):
        want = client.log_likelihood(tensor(js["inputs"][f"images_{name}"]), k=50, seed=seed)
        got = js["log_likelihood"][name]
        assert got["k"] == want.k == 50
        for key in ("elbo", "log_likelihood", "bits_per_dim", "percentile"):
            assert len(got[key]) == 4
            np.testing.assert_allclose(got[key], getattr(want, key), rtol=1e-9, err_msg=key)
        assert got["anomaly"] == want.anomaly.tolist()


def test_bad_requests_give_invalid_argument_naming_the_field(js, server):
    decode, sample = js["errors"]
    assert (decode["rpc"], decode["code"], decode["code_name"]) == ("Decode", 3, "INVALID_ARGUMENT")
    assert decode["details"].startswith("z.data:"), decode["details"]
    assert (sample["rpc"], sample["code"], sample["code_name"]) == ("Sample", 3, "INVALID_ARGUMENT")
    assert sample["details"].startswith("n:"), sample["details"]
    # A Python stub sending the same malformed bytes gets the same status and message.
    k = js["model_info"]["latent_dim"]
    bad = vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=[2, k], data=bytes(2 * k * 4 - 4))
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        vae_pb2_grpc.VaeServiceStub(channel).Decode(vae_pb2.DecodeRequest(z=bad), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == decode["details"]

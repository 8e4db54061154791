"""`vae-client bench` from the command line: the deadline of its calls, its JSON when no call
succeeds, and the durations it accepts. The CLI runs as a subprocess, against a real
vae-server subprocess or a stand-in vae.v1 server where the test needs to see what the
server was sent."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest

from serving import refusing_server, run_cli, served_process, stub_server
from vae_client.__main__ import DEFAULT_TIMEOUT
from vae_client.bench import run_bench
from vae_core.ports import free_port
from vae_proto import vae_pb2

pytestmark = pytest.mark.e2e

MAX_IMAGES = 8  # the server's max_images_per_request: a bench of --batch 9 is refused


@pytest.fixture(scope="module")
def target(model_dir):
    with served_process(model_dir, "--log-level", "WARNING", "--warmup-rounds", "1",
                        "--max-images-per-request", str(MAX_IMAGES),
                        timeout=30) as (target, _):
        yield target


def bench(target: str, *args: str, expect: int = 0) -> subprocess.CompletedProcess:
    return run_cli(target, "bench", *args, expect=expect, timeout=120)


def strict_json(text: str) -> dict:
    """JSON as the standard has it: Python's json module reads NaN and Infinity, which no
    other parser takes."""
    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_bench_calls_have_the_default_deadline():
    """Before: without --timeout the bench's calls had no deadline at all (the CLI passed
    None over run_bench's 30 s), so against a server that never answers `bench` waited
    forever while `info` gave up after 30 s. The stand-in server notes the deadline of every
    call it is sent."""
    deadlines: dict[str, list[float | None]] = {"GetModelInfo": [], "Decode": [],
                                                "SampleStream": []}

    def info(raw: bytes, context: grpc.ServicerContext) -> bytes:
        deadlines["GetModelInfo"].append(context.time_remaining())
        return vae_pb2.ModelInfo(latent_dim=4, image_shape=[28, 28]).SerializeToString()

    def decode(raw: bytes, context: grpc.ServicerContext) -> bytes:
        deadlines["Decode"].append(context.time_remaining())
        return vae_pb2.DecodeResponse().SerializeToString()

    def stream(raw: bytes, context: grpc.ServicerContext):
        deadlines["SampleStream"].append(context.time_remaining())
        yield vae_pb2.SampleChunk().SerializeToString()

    handlers = {"GetModelInfo": grpc.unary_unary_rpc_method_handler(info),
                "Decode": grpc.unary_unary_rpc_method_handler(decode),
                "SampleStream": grpc.unary_stream_rpc_method_handler(stream)}
    with stub_server(handlers) as stub:
        bench(stub, "--duration", "0.2", "--warmup", "0", "--json")
        bench(stub, "--method", "stream", "--duration", "0.2", "--warmup", "0")
    assert len(deadlines["GetModelInfo"]) == 2 and deadlines["Decode"]
    # (gRPC rounds a deadline up on the wire: the server may see a little more than asked.)
    for method in ("GetModelInfo", "Decode"):
        left = deadlines[method]
        assert all(t is not None and 0 < t <= DEFAULT_TIMEOUT + 1 for t in left), (method, left)
    # A stream has none (grpc reads that as about 2^63 s left): it may last longer than any
    # fixed deadline, as `sample` has it.
    assert deadlines["SampleStream"]
    assert all(t is None or t > 1e9 for t in deadlines["SampleStream"]), deadlines
    # --timeout, when given, is the deadline instead, of streams too.
    deadlines = {"GetModelInfo": [], "Decode": [], "SampleStream": []}
    with stub_server(handlers) as stub:
        bench(stub, "--duration", "0.2", "--warmup", "0", "--timeout", "5")
        bench(stub, "--method", "stream", "--duration", "0.2", "--warmup", "0", "--timeout", "5")
    assert all(deadlines.values()), deadlines
    assert all(t is not None and 0 < t <= 6 for left in deadlines.values() for t in left)


def test_json_with_no_successful_call_is_valid_json():
    """Before: the latency percentiles of a run in which every call was refused came out as
    bare NaN, which is not JSON (jq and JSON.parse refuse the whole document)."""
    # (A load over a real server's limits is refused by bench itself before any call.)
    with refusing_server("LogLikelihood", grpc.StatusCode.INVALID_ARGUMENT) as target:
        # Failed calls make the exit status 1 (before: 0, a run of refusals read as a figure).
        proc = bench(target, "--method", "loglik", "--duration", "0.3", "--warmup", "0",
                     "--json", expect=1)
        text = bench(target, "--method", "loglik", "--duration", "0.3", "--warmup", "0",
                     expect=1).stdout
    result = strict_json(proc.stdout)
    assert result["calls"] == 0 and result["errors"].get("INVALID_ARGUMENT", 0) > 0
    assert set(result["latency_ms"]) == {"p50", "p90", "p99", "max", "mean"}
    assert all(v is None for v in result["latency_ms"].values()), result["latency_ms"]
    # The text says so in words, not "nan ms".
    assert "nan" not in text.lower() and "no call succeeded" in text
    assert "INVALID_ARGUMENT" in text


def test_json_of_a_run_that_succeeds_keeps_its_numbers(target):
    """And --warmup 0 is a warm-up of none, not a refusal."""
    result = strict_json(bench(target, "--duration", "0.3", "--warmup", "0", "--json").stdout)
    assert result["calls"] > 0 and result["errors"] == {}
    lat = result["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


@pytest.mark.parametrize("option,value", [
    ("--duration", "-5"), ("--duration", "0"), ("--duration", "nan"), ("--duration", "inf"),
    ("--warmup", "-3"), ("--warmup", "nan"), ("--warmup", "inf"),
    ("--rate", "inf"), ("--timeout", "inf"),
])
def test_durations_must_be_finite_and_not_negative(option, value):
    """Before: --duration -5, --duration nan and --warmup -3 ran an empty measurement and
    exited 0 (a report of nothing); --rate inf never slept; --timeout inf failed every call
    at once with DEADLINE_EXCEEDED. Refused before anything is sent, as usage errors."""
    proc = bench(f"127.0.0.1:{free_port()}", "--duration", "1", option, value, expect=2)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vae-client bench: error: argument " + option), proc.stderr
    assert proc.stdout == ""


@pytest.mark.parametrize("kw", [{"duration": -1.0}, {"duration": float("nan")},
                                {"warmup": -0.5}, {"warmup": float("inf")}])
def test_run_bench_refuses_such_durations_too(kw):
    with pytest.raises(ValueError, match="duration|warmup"):
        asyncio.run(run_bench(f"127.0.0.1:{free_port()}", "decode", **kw))

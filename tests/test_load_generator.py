"""`vae-client bench`, the load generator, against a real server over loopback."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from serving import refusing_server, server_thread
from vae_client import VaeError
from vae_client.__main__ import main as client_main
from vae_client.bench import run_bench

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def server(model_dir):
    with server_thread(model_dir, max_images_per_request=8, max_sample_n=64) as srv:
        yield srv


def bench(target: str, method: str, **kw):
    return asyncio.run(run_bench(target, method, warmup=0.2, **kw))


@pytest.mark.parametrize("method", ["decode", "encode", "sample", "stream", "loglik"])
def test_closed_loop_counts_calls_images_and_latency_of_every_method(server, method):
    batch = 4
    r = bench(server.target, method, concurrency=3, duration=0.5, batch=batch, k=20,
              stream_n=40)
    assert r.mode == "closed" and r.errors == {}
    assert r.calls > 0
    if method == "stream":  # images counted as chunks arrive, in chunks of `batch`
        assert r.images > 0 and r.images % batch == 0
    else:
        assert r.images == r.calls * batch
    assert r.calls_per_s == pytest.approx(r.calls / r.duration_s, rel=0.01)  # rounded to ms
    lat = r.latency_ms
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["max"]


def test_open_loop_starts_calls_at_the_rate_asked(server):
    r = bench(server.target, "decode", rate=100, duration=1.0, concurrency=8)
    assert r.mode == "open" and r.errors == {}
    # The open loop has no concurrency: a --concurrency given beside --rate was reported as
    # if it had applied ("decode open c=8").
    assert r.concurrency is None and r.to_dict()["concurrency"] is None
    assert r.summary().startswith("decode open rate=100/s batch=1: ")
    # 100 calls/s for about a second: the calls counted are those that ended in that second
    # (a closed loop of 8 would make thousands; the margin is for a stall of the machine).
    assert 50 <= r.calls <= 150


def test_refused_calls_are_counted_by_status_code():
    # (A load over a real server's limits is refused before any call: test_client_outputs.)
    with refusing_server("LogLikelihood", grpc.StatusCode.INVALID_ARGUMENT) as target:
        r = bench(target, "loglik", concurrency=2, duration=0.3)
    assert r.calls == 0 and r.errors.get("INVALID_ARGUMENT", 0) > 0
    assert set(r.errors) == {"INVALID_ARGUMENT"}


def test_no_server_is_one_clear_error(tmp_path):
    from vae_core.ports import free_port

    with pytest.raises(VaeError) as err:
        bench(f"127.0.0.1:{free_port()}", "decode", duration=0.1, timeout=1.0)
    assert err.value.code.name in ("UNAVAILABLE", "DEADLINE_EXCEEDED")


def test_the_command_prints_json_and_a_summary(server, capsys):
    args = ["--target", server.target, "bench", "--method", "sample", "--batch", "2",
            "--concurrency", "2", "--duration", "0.3", "--warmup", "0.1"]
    assert client_main([*args, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "sample" and result["calls"] > 0
    assert result["images"] == 2 * result["calls"] and result["errors"] == {}
    assert client_main(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("sample closed c=2 batch=2:") and "errors: none" in out


def test_connection_options_also_follow_the_subcommand(server, capsys):
    # Users write `vae-client bench --target HOST:PORT ...`; DESIGN.md puts
    # --target before the subcommand. Both orders work, and the later one wins.
    args = ["bench", "--target", server.target, "--timeout", "5", "--method", "decode",
            "--duration", "0.2", "--warmup", "0.1", "--json"]
    assert client_main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "decode" and result["calls"] > 0 and result["errors"] == {}
    assert client_main(["--target", "127.0.0.1:1", *args]) == 0
    assert json.loads(capsys.readouterr().out)["calls"] > 0


def test_help_shows_the_target_that_will_be_used(monkeypatch, capsys):
    monkeypatch.setenv("VAE_TARGET", "envhost:1")
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as done:
            client_main(argv)
        assert done.value.code == 0
        assert "(default: envhost:1)" in " ".join(capsys.readouterr().out.split())


def test_a_stream_counts_only_the_images_that_arrive_in_the_measured_window(server):
    # One stream that outlasts the warm-up, and a window too short to start another: the
    # images received during the warm-up are not the window's.
    # A warm-up long enough that its first chunks arrive within it on a busy machine too.
    n, chunk = 1_000_000, 2000
    r = asyncio.run(run_bench(server.target, "stream", batch=chunk, stream_n=n, warmup=1.0,
                              duration=0.01))
    assert r.calls == 1 and r.errors == {}
    assert r.latency_ms["max"] > 1000  # it did outlast the warm-up
    assert 0 < r.images < n and r.images % chunk == 0

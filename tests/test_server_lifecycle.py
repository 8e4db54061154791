"""vae-server as a program: refusing bad model directories, health around warm-up, SIGTERM."""

from __future__ import annotations

import collections
import json
import shutil
import signal
import subprocess
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import (
    VENV_BIN,
    metric_total,
    rss_mb,
    served_process,
    server_thread,
    start_server_process,
    wait_serving,
    wait_until,
)
from vae_client import VaeClient, VaeError
from vae_core.ports import free_port

pytestmark = pytest.mark.e2e
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _refusal(model_dir) -> str:
    proc = subprocess.run([str(VENV_BIN / "vae-server"), "--model-dir", str(model_dir),
                           "--port", str(free_port()), "--metrics-port", "-1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    return proc.stderr


def test_refuses_a_missing_file(model_dir, tmp_path):
    bad = shutil.copytree(model_dir, tmp_path / "m")
    (bad / "decoder.onnx").unlink()
    msg = _refusal(bad)
    assert "decoder.onnx" in msg and "missing" in msg


def test_refuses_a_missing_manifest(tmp_path):
    assert "manifest.json" in _refusal(tmp_path)


def test_refuses_a_hash_mismatch(model_dir, tmp_path):
    bad = shutil.copytree(model_dir, tmp_path / "m")
    with open(bad / "encoder.onnx", "ab") as f:
        f.write(b"\0")
    msg = _refusal(bad)
    assert "encoder.onnx" in msg and "sha256" in msg


def test_refuses_a_model_whose_inputs_do_not_match_the_manifest(model_dir, tmp_path):
    bad = shutil.copytree(model_dir, tmp_path / "m")
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"]["decoder.onnx"]["inputs"][0]["shape"] = ["N", 99]
    (bad / "manifest.json").write_text(json.dumps(manifest))
    msg = _refusal(bad)
    assert "decoder.onnx" in msg and "'z'" in msg and "99" in msg


def _watch(target: str, seen: list[int], stop: threading.Event) -> None:
    """Record every status the health Watch stream sends, connecting as soon as possible."""
    # A short reconnect back-off: gRPC's default (1 s) could miss the whole warm-up.
    options = [("grpc.initial_reconnect_backoff_ms", 20), ("grpc.min_reconnect_backoff_ms", 20),
               ("grpc.max_reconnect_backoff_ms", 50)]
    with grpc.insecure_channel(target, options=options) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while not stop.is_set():
            try:
                for reply in stub.Watch(health_pb2.HealthCheckRequest(service=""),
                                        wait_for_ready=True, timeout=60):
                    seen.append(reply.status)
            except grpc.RpcError:
                if seen:  # the server went away after we saw it: done
                    return
                time.sleep(0.01)


def test_health_is_not_serving_during_warm_up_then_serving(model_dir):
    port = free_port()
    target = f"127.0.0.1:{port}"
    seen: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(target, seen, stop), daemon=True)
    watcher.start()
    # Many warm-up rounds make warm-up last long enough to be seen.
    proc = start_server_process(model_dir, port, "--warmup-rounds", "200")
    try:
        wait_serving(target, proc, timeout=120)
        deadline = time.monotonic() + 10
        while SERVING not in seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen[0] == NOT_SERVING, seen
        assert seen[-1] == SERVING, seen
    finally:
        stop.set()
        proc.terminate()
        proc.wait(30)


def test_sigterm_finishes_calls_in_flight_and_exits_zero(model_dir):
    port, metrics_port = free_port(), free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server_process(model_dir, port, "--max-batch-size", "32",
                                "--max-queue-images", "2000000", "--grace-seconds", "30",
                                "--metrics-port", str(metrics_port))
    wait_serving(target, proc)
    seen: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(target, seen, stop), daemon=True)
    watcher.start()
    results: list[object] = [None] * 6

    def call(i: int) -> None:
        with VaeClient(target, timeout=60) as c:
            try:
                results[i] = c.log_likelihood(np.full((16, 784), 0.5, np.float32), k=10_000,
                                              seed=i)
            except VaeError as err:
                results[i] = err

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    # SIGTERM once all six are queued or running (a call still connecting would be refused).
    wait_until(lambda: metric_total(metrics_port, "vae_in_flight_calls") >= 6, proc, timeout=30,
               what="the six calls never were in flight together")
    assert all(r is None for r in results), "calls finished before SIGTERM: make them longer"
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    deadline = time.monotonic() + 10
    while NOT_SERVING not in seen and time.monotonic() < deadline:
        time.sleep(0.01)
    assert NOT_SERVING in seen, seen
    # From NOT_SERVING on, the server stops taking calls (the event loop may take a moment to
    # get from the health update to closing the port: a call in that gap is still served).
    refused = None
    with VaeClient(target, timeout=5) as c:
        while refused is None and time.monotonic() < deadline:
            try:
                c.sample(1)
                time.sleep(0.02)
            except VaeError as err:
                refused = err
    assert refused is not None and refused.code == grpc.StatusCode.UNAVAILABLE, refused
    for t in threads:
        t.join(60)
    output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output
    # Once its own calls are done the server exits: an open health Watch stream does not
    # hold it for the whole 30 s grace period.
    assert time.monotonic() - signalled < 20
    for r in results:
        assert not isinstance(r, VaeError), r
        assert np.isfinite(r.log_likelihood).all()
    stop.set()
    watcher.join(10)
    assert seen[0] == SERVING and NOT_SERVING in seen, seen


def test_sample_stream_memory_stays_bounded_with_a_slow_reader(model_dir):
    """A client that reads slowly must not make the server buffer the stream."""
    with served_process(model_dir) as (target, proc):
        with VaeClient(target) as c:  # warm the stream path once
            for _ in c.sample_stream(20_000, seed=1, chunk_size=2000, dtype="uint8"):
                pass
        base = rss_mb(proc.pid)
        peak = base
        n, chunk = 400_000, 2000  # 314 MB of uint8 images in all
        got = 0
        with VaeClient(target) as c:
            for i, (_, images) in enumerate(c.sample_stream(n, seed=2, chunk_size=chunk,
                                                            dtype="uint8")):
                got += len(images)
                if i < 20:
                    time.sleep(0.1)  # slow reader: the server's sends back up
                if i % 10 == 0:
                    peak = max(peak, rss_mb(proc.pid))
    assert got == n
    # A few chunks are 1.6 MB each: 60 MB of growth would mean buffering the stream.
    assert peak - base < 60, (base, peak)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_serves_and_stops_cleanly_on_either_event_loop(model_dir, loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    with served_process(model_dir, "--event-loop", loop) as (target, proc):
        with VaeClient(target, timeout=30) as c:
            images = c.decode(np.zeros((3, c.info().latent_dim), np.float32))
        assert images.shape == (3, 28, 28)
        proc.send_signal(signal.SIGTERM)
        output = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, output
    assert f"event loop {loop}" in output, output


# -- stopping: what callers and the metrics port see --------------------------------------


def test_work_refused_by_a_stopping_server_is_unavailable_and_not_a_fault(model_dir, caplog):
    """Once the server stops taking work, a call is refused with UNAVAILABLE (which clients
    retry), counted as shutting_down, and not logged as a model failure."""
    import logging

    from serving import ServerThread

    srv = ServerThread(model_dir, metrics_port=0)
    try:
        srv.call(srv.running.servicer.close())  # the batchers take no more work
        with (caplog.at_level(logging.ERROR), VaeClient(srv.target, timeout=10, retries=0) as c,
              pytest.raises(VaeError) as err):
            c.decode(np.zeros((2, c.info().latent_dim), np.float32))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value
        assert "shutting down" in str(err.value)
        metrics = srv.running.metrics.registry
        handled = {"grpc_service": "vae.v1.VaeService", "grpc_method": "Decode",
                   "grpc_type": "unary", "grpc_code": "Unavailable"}
        # The call is counted as its handler unwinds, which may be just after the caller
        # has its status.
        deadline = time.monotonic() + 5
        while (metrics.get_sample_value("grpc_server_handled_total", handled) is None
               and time.monotonic() < deadline):
            time.sleep(0.01)
        assert metrics.get_sample_value("grpc_server_handled_total", handled) == 1
        assert metrics.get_sample_value("vae_rejected_total", {"reason": "shutting_down"}) == 1
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    finally:
        srv.stop()


def test_calls_still_queued_when_the_grace_ends_get_unavailable(model_dir):
    """A stop whose grace ends with work still queued: the calls running finish, the queued
    ones are refused with UNAVAILABLE (retried elsewhere by a client), none with INTERNAL."""
    from serving import ServerThread

    srv = ServerThread(model_dir, max_batch_size=8, instances=1, max_queue_images=1_000_000)
    errors: list[BaseException | None] = [None] * 6

    def call(i: int) -> None:
        with VaeClient(srv.target, timeout=60, retries=0) as c:
            try:
                c.log_likelihood(np.full((16, 784), 0.5, np.float32), k=10_000, seed=i)
            except VaeError as exc:
                errors[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(0.5)  # in runs of 8 rows, 960,000 rows take far longer than the grace
    srv.stop(grace=0.2)
    for t in threads:
        t.join(30)
    codes = [e.code for e in errors if isinstance(e, VaeError)]
    assert codes, "every call finished within the grace: make them longer"
    assert set(codes) == {grpc.StatusCode.UNAVAILABLE}, errors


def _stop_with_a_burst_waiting_in_grpc(model_dir, n: int, refusing: bool = False,
                                       grace: float = 120.0, channelz: bool = True):
    """Stop a server while `n` Sample calls wait in gRPC for its event loop (blocked while
    they arrive, as a burst outruns a busy loop); the calls' status codes and details, the
    server's metrics, and how long the stop took. `refusing`: its servicer refuses calls, as
    a stop makes it after half the grace; `channelz`: False, as if gRPC could not count the
    calls it received."""
    import asyncio

    from serving import ServerThread
    from vae_proto import vae_pb2, vae_pb2_grpc

    srv = ServerThread(model_dir)
    running = srv.running
    running.servicer.refusing = refusing
    metric = running.metrics.registry.get_sample_value
    samples = {"grpc_service": "vae.v1.VaeService", "grpc_method": "Sample",
               "grpc_type": "unary"}
    gate = threading.Event()
    srv.loop.call_soon_threadsafe(gate.wait, 60)  # the loop takes no call until the gate
    try:
        with grpc.insecure_channel(srv.target) as channel:
            sample = vae_pb2_grpc.VaeServiceStub(channel).Sample
            before = metric("vae_grpc_received_calls_total")
            futures = [sample.future(vae_pb2.SampleRequest(n=64, seed=i), timeout=120)
                       for i in range(n)]
            wait_until(lambda: metric("vae_grpc_received_calls_total") - before >= n,
                       timeout=50)
            assert metric("grpc_server_started_total", samples) == 0
            if not channelz:
                running.received = None
            stopped = asyncio.run_coroutine_threadsafe(running.stop(grace), srv.loop)
            began = time.monotonic()
            gate.set()
            stopped.result(150)
            took = time.monotonic() - began
            codes = collections.Counter(f.code() for f in futures)
            details = {f.details() for f in futures if f.code() != grpc.StatusCode.OK}
    finally:
        gate.set()
        srv.loop.call_soon_threadsafe(srv.loop.stop)
        srv.thread.join(10)
    return codes, details, running.metrics, took


def test_calls_waiting_in_grpc_when_the_stop_begins_are_served_not_cancelled(model_dir):
    """A burst outruns the event loop: its calls wait in gRPC, where grpc's stop() cancels
    them (CANCELLED, which few clients retry). A stop with time to spare serves them all."""
    codes, _, _, _ = _stop_with_a_burst_waiting_in_grpc(model_dir, 2000)
    assert codes == {grpc.StatusCode.OK: 2000}, codes


def test_without_channelz_a_stop_still_serves_the_calls_waiting(model_dir):
    """Where gRPC cannot say how many calls it received, the stop takes calls until its
    loop, free, takes none for a while."""
    codes, _, _, _ = _stop_with_a_burst_waiting_in_grpc(model_dir, 2000, channelz=False)
    assert codes == {grpc.StatusCode.OK: 2000}, codes


def test_a_backlog_longer_than_the_grace_is_served_then_refused_within_it(model_dir):
    """Half the grace serving, a quarter refusing, and the stop still ends within the grace
    and the time runs already under way get (FINISH_SECONDS). Calls still waiting after
    that are left to gRPC, which cancels them."""
    from vae_server.server import FINISH_SECONDS

    codes, _, _, took = _stop_with_a_burst_waiting_in_grpc(model_dir, 3000, grace=1.0)
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE,
                          grpc.StatusCode.CANCELLED}, codes
    assert codes[grpc.StatusCode.OK] > 0 and codes[grpc.StatusCode.UNAVAILABLE] > 0, codes
    assert took < 1.0 + FINISH_SECONDS, took


def test_calls_still_waiting_in_grpc_once_the_server_refuses_get_unavailable(model_dir):
    """Past half the grace a stopping server refuses the calls still waiting, which it can
    do much faster than serve them: UNAVAILABLE, which clients retry elsewhere, and counted
    as shutting_down; none is cancelled by gRPC."""
    codes, details, metrics, _ = _stop_with_a_burst_waiting_in_grpc(model_dir, 2000,
                                                                    refusing=True)
    assert codes == {grpc.StatusCode.UNAVAILABLE: 2000}, codes
    assert details == {"the server is shutting down; retry"}
    assert metrics.registry.get_sample_value(
        "vae_rejected_total", {"reason": "shutting_down"}) == 2000


def test_a_refusing_server_refuses_streams_too(model_dir):
    with server_thread(model_dir) as srv, VaeClient(srv.target, timeout=30, retries=0) as c:
        srv.running.servicer.refusing = True
        with pytest.raises(VaeError) as err:
            list(c.sample_stream(10, seed=1))
        assert err.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in str(err.value)


def test_the_metrics_port_closes_with_the_server(model_dir):
    import socket
    import urllib.request

    from serving import ServerThread

    srv = ServerThread(model_dir, metrics_port=0)
    port = srv.running.metrics_port
    assert port
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert b"vae_model_info" in reply.read()
    srv.stop()
    with pytest.raises(ConnectionRefusedError), socket.create_connection(("127.0.0.1", port),
                                                                          timeout=5):
        pass


def test_a_long_call_s_keepalive_pings_are_answered_not_sent_away(model_dir):
    """Clients ping while a call is in flight (vae_client every 20 s) to find a server that
    stopped answering. gRPC's servers accept one ping in 5 minutes while they send nothing,
    and close the connection (GOAWAY too_many_pings) on the third too soon, failing the
    calls on it: a LogLikelihood or a stream waiting for room for a minute would be cut.
    vae-server accepts pings every few seconds. Here a client pings every 5.5 s through a
    call held 31 s: by gRPC's default the fifth ping, at 27.5 s, is the third too soon."""
    from vae_proto import vae_pb2, vae_pb2_grpc
    from vae_proto.tensor import to_tensor

    pings = [("grpc.keepalive_time_ms", 5500), ("grpc.keepalive_timeout_ms", 5000),
             ("grpc.http2.max_pings_without_data", 0)]
    with server_thread(model_dir, instances=1, inline_rows=0) as srv:
        gate = threading.Event()
        batcher = srv.running.servicer.decoder
        real_run = batcher._run
        batcher._run = lambda z: (gate.wait(60), real_run(z))[1]
        z = np.zeros((2, srv.running.servicer.runtime.latent_dim), np.float32)
        with grpc.insecure_channel(srv.target, options=pings) as channel:
            call = vae_pb2_grpc.VaeServiceStub(channel).Decode.future(
                vae_pb2.DecodeRequest(z=to_tensor(z)), timeout=60)
            time.sleep(31)
            held = not call.done()
            gate.set()
            reply = call.result(30)
    assert held  # the call was in flight through every ping
    assert reply.images.shape


def test_a_stream_to_a_client_that_stopped_answering_ends(model_dir, monkeypatch, tmp_path):
    """A client gone without a word (SIGSTOP: a hung host, a network cut) stops reading, and
    its stream would hold its room in the queue until the connection's age and grace ran out
    (12 minutes by default). The server's keepalive pings find the connection dead and end
    the call. The pings' period is shortened here; vae-server's is a minute."""
    from vae_server import server as server_module

    monkeypatch.setattr(server_module, "SERVER_KEEPALIVE_MS", 2000)
    monkeypatch.setattr(server_module, "SERVER_KEEPALIVE_TIMEOUT_MS", 2000)
    with server_thread(model_dir) as srv:
        servicer = srv.running.servicer
        client = subprocess.Popen(
            [str(VENV_BIN / "vae-client"), "--target", srv.target, "sample", "--n", "5000000",
             "--stream", "--chunk-size", "1000", "--no-progress", "--out",
             str(tmp_path / "big.npy")], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_until(lambda: servicer._in_flight > 0, client)
            time.sleep(0.5)  # chunks flowing
            client.send_signal(signal.SIGSTOP)
            wait_until(lambda: servicer._in_flight == 0, timeout=30,
                       what="the stream still runs", every=0.1)
        finally:
            client.kill()
            client.wait()

"""The server's Prometheus registry."""

from __future__ import annotations

import time


def test_metrics_include_process_cpu_and_memory_and_skip_gpus_cleanly():
    from vae_server.metrics import GpuCollector, Metrics

    m = Metrics()
    assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
    assert m.registry.get_sample_value("process_cpu_seconds_total") >= 0
    if GpuCollector().count == 0:  # no GPU here: no GPU series, and no error
        names = {s.name for f in m.registry.collect() for s in f.samples}
        assert not any(n.startswith("vae_gpu_") for n in names)


def test_queue_depth_is_read_from_the_queue_when_scraped():
    from prometheus_client import CollectorRegistry

    from vae_server.metrics import Metrics

    m = Metrics(CollectorRegistry(), gpu=False)
    queued = {"decoder": 0}
    m.watch_queue("decoder", lambda: queued["decoder"])
    assert m.registry.get_sample_value("vae_queue_depth", {"model": "decoder"}) == 0
    queued["decoder"] = 1500
    assert m.registry.get_sample_value("vae_queue_depth", {"model": "decoder"}) == 1500


# A stand-in for nvidia-ml-py (the module pynvml): one GPU, device-wide figures as NVML's.
FAKE_PYNVML = '''
class NVMLError(Exception): pass
class NVMLError_NotSupported(NVMLError): pass
class _Util: gpu = {utilization}
class _Mem: used = 20 << 30; total = 80 << 30
def nvmlInit(): pass
def nvmlDeviceGetCount(): return 1
def nvmlDeviceGetHandleByIndex(i): return i
def nvmlDeviceGetName(h): return "NVIDIA H100 80GB HBM3 MIG 1g.10gb"
def nvmlDeviceGetMemoryInfo(h): return _Mem()
def nvmlDeviceGetUtilizationRates(h):
    if {utilization} < 0: raise NVMLError_NotSupported("Not Supported")
    return _Util()
'''


def fake_pynvml(monkeypatch, tmp_path, utilization: int) -> None:
    """Put a fake pynvml first on the path, as PYTHONPATH would: `utilization` percent busy,
    or, if negative, NotSupported for utilisation (as on a MIG instance)."""
    import sys

    where = tmp_path / "fakenvml"
    where.mkdir(exist_ok=True)
    (where / "pynvml.py").write_text(FAKE_PYNVML.format(utilization=utilization))
    monkeypatch.syspath_prepend(str(where))
    monkeypatch.delitem(sys.modules, "pynvml", raising=False)


def test_an_nvml_query_that_fails_leaves_out_its_series_and_is_logged_once(
        monkeypatch, tmp_path, caplog):
    """Before: NotSupported from the utilisation query escaped collect(), and since the
    registry collects once when a collector is registered, the server could not start."""
    import logging

    from vae_server.metrics import Metrics

    fake_pynvml(monkeypatch, tmp_path, utilization=-1)
    with caplog.at_level(logging.WARNING, logger="vae_server.metrics"):
        m = Metrics()  # the registry's auto_describe collects here
        for _ in range(3):  # every scrape
            names = {s.name for f in m.registry.collect() for s in f.samples}
            assert "vae_gpu_utilization_ratio" not in names
            labels = {"gpu": "0", "name": "NVIDIA H100 80GB HBM3 MIG 1g.10gb"}
            assert m.registry.get_sample_value("vae_gpu_memory_used_bytes", labels) == 20 << 30
            assert m.registry.get_sample_value("vae_gpu_memory_total_bytes", labels) == 80 << 30
            assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
    warnings = [r for r in caplog.records if "nvmlDeviceGetUtilizationRates" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert "Not Supported" in warnings[0].getMessage()


def test_latency_buckets_reach_the_longest_call_the_defaults_allow():
    """Before: the last bucket was 30 s, so histogram_quantile read every longer SampleStream
    (timed whole; 10^7 images take about 100 s) as 30 s. A call may run for as long as its
    connection's age plus the grace after it."""
    import itertools

    from vae_server.config import load_settings
    from vae_server.metrics import LATENCY_BUCKETS

    settings = load_settings(["--model-dir", "unused"], env={})
    longest = settings.max_connection_age_s + settings.max_connection_age_grace_s
    assert LATENCY_BUCKETS[-1] >= longest
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))
    # Past a second, bounds at most 3x apart: a stream reads within its bucket's factor.
    long = [b for b in LATENCY_BUCKETS if b >= 1.0]
    assert all(hi / lo <= 3.0 for lo, hi in itertools.pairwise(long))
    assert len(LATENCY_BUCKETS) <= 25  # every histogram series costs one each


def test_a_channelz_that_refuses_leaves_received_calls_out_and_is_logged_once(caplog):
    """The scrape goes on without vae_grpc_received_calls_total while channelz refuses (the
    server stopped, say), logged when it starts refusing rather than at every scrape."""
    import logging

    from vae_server.intake import IntakeCollector
    from vae_server.metrics import Metrics

    m = Metrics(gpu=False)
    readings = iter([5, ValueError("no such server"), ValueError("no such server"), 9,
                     ValueError("gone again")])

    def core() -> int:
        r = next(readings)
        if isinstance(r, Exception):
            raise r
        return r

    m.registry.register(IntakeCollector(core))  # reads nothing yet

    def scrape() -> float | None:
        return m.registry.get_sample_value("vae_grpc_received_calls_total")

    with caplog.at_level(logging.WARNING, logger="vae_server.intake"):
        assert scrape() == 5
        assert scrape() is None
        assert scrape() is None
        assert m.registry.get_sample_value("process_resident_memory_bytes") > 0
        assert scrape() == 9
        assert scrape() is None
    assert [r.getMessage() for r in caplog.records if r.name == "vae_server.intake"] == [
        "vae_grpc_received_calls left out: channelz refused (no such server)",
        "vae_grpc_received_calls left out: channelz refused (gone again)"]


def test_the_metrics_port_takes_a_burst_and_frees_silent_connections(monkeypatch):
    """Before: prometheus_client's server listened with a backlog of 5 (a burst of 200
    scrapers saw connections time out) and let a client that sends nothing hold a thread for
    as long as it liked (400 of them: 400 threads)."""
    import shutil
    import socket
    import subprocess
    import threading
    import urllib.request

    from prometheus_client import CollectorRegistry

    from serving import wait_until
    from vae_server import metrics as metrics_module

    # Long enough for the 20 connections to be accepted, each holding a thread, before the
    # first gives up, on a loaded machine too.
    monkeypatch.setattr(metrics_module, "METRICS_IDLE_S", 3.0)
    http = metrics_module.serve_metrics(0, "127.0.0.1", CollectorRegistry())
    port = http.server_port
    try:
        if shutil.which("ss"):  # a listening socket's Send-Q is its backlog
            line = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True,
                                  text=True, check=True).stdout.split()
            assert int(line[2]) == metrics_module.METRICS_BACKLOG, line
        idle = threading.active_count()
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
        deadline = time.monotonic() + 10
        while threading.active_count() < idle + 15 and time.monotonic() < deadline:
            time.sleep(0.05)  # a thread each, as they are accepted
        assert threading.active_count() >= idle + 15
        # Their threads give up on them (without the idle limit, they never would).
        wait_until(lambda: threading.active_count() <= idle + 2, timeout=15,
                   what="the silent connections' threads are still waiting")
        for s in silent:
            assert s.recv(1) == b""  # closed by the server
            s.close()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert reply.status == 200
    finally:
        http.shutdown()
        http.server_close()


def test_every_status_code_of_every_method_starts_at_0():
    """Before: only grpc_code="OK" was made at start (go-grpc-prometheus's InitializeMetrics,
    which it claimed to follow, makes every code): the first burst of INTERNAL or
    DEADLINE_EXCEEDED made its series at its count, and rate() and increase() read it as 0,
    so an alert on server faults missed it."""
    import grpc
    from prometheus_client import CollectorRegistry

    from vae_proto import vae_pb2
    from vae_server.metrics import Metrics

    m = Metrics(CollectorRegistry(), gpu=False)
    service = vae_pb2.DESCRIPTOR.services_by_name["VaeService"]
    m.initialize_grpc(service)
    for method in service.methods:
        kind = "server_stream" if method.server_streaming else "unary"
        for code in GO_CODES:
            labels = {"grpc_service": service.full_name, "grpc_method": method.name,
                      "grpc_type": kind, "grpc_code": code}
            assert m.registry.get_sample_value("grpc_server_handled_total", labels) == 0, labels
    made = {s.labels["grpc_code"] for f in m.registry.collect() for s in f.samples
            if s.name == "grpc_server_handled_total"}
    assert made == set(GO_CODES) and len(GO_CODES) == len(grpc.StatusCode)


# go-grpc-prometheus's grpc_code values: Go's codes.Code.String(), which alerts and dashboards
# written for Go servers match (grpc_code=~"Unavailable|Internal"). Before, the label was
# Python's enum name (UNAVAILABLE), and such queries found nothing.
GO_CODES = ("OK", "Canceled", "Unknown", "InvalidArgument", "DeadlineExceeded", "NotFound",
            "AlreadyExists", "PermissionDenied", "ResourceExhausted", "FailedPrecondition",
            "Aborted", "OutOfRange", "Unimplemented", "Internal", "Unavailable", "DataLoss",
            "Unauthenticated")


def test_the_event_loop_s_cpu_time_is_its_thread_s_alone():
    """vae_event_loop_cpu_seconds_total counts the CPU time of the thread that runs the event
    loop, and not other threads' (ONNX Runtime's, gRPC's). Before, nothing showed a server
    whose loop was saturated: calls waited in gRPC, unseen by vae_in_flight_calls, while the
    process used one core of its pod's two (a helper measured the loop's thread at 0.91 cores
    under 256 callers, client p50 62 ms for a 1 ms Decode)."""
    import threading

    from prometheus_client import CollectorRegistry

    from vae_server.metrics import Metrics

    def spin(seconds: float) -> None:
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    m = Metrics(CollectorRegistry(), gpu=False)
    m.watch_event_loop(threading.get_ident())

    def value() -> float:
        return m.registry.get_sample_value("vae_event_loop_cpu_seconds_total")

    first = value()
    other = threading.Thread(target=spin, args=(0.3,))
    other.start()
    other.join()
    assert value() - first < 0.1  # another thread's work is not the loop's
    spin(0.3)
    assert 0.3 <= value() - first < 0.5

"""Monitoring end to end: a real vae-server under a short mixed load, scraped every second by a
real Prometheus (Debian's binary, on loopback); every PromQL expression of the Grafana
dashboard must return data. promtool checks the server's /metrics and the repository's
Prometheus config.

Without the prometheus package these tests skip, except in CI (env CI set), where they fail:
.ci/run installs it."""

from __future__ import annotations

import asyncio
import collections
import json
import math
import os
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from prometheus_harness import (
    DASHBOARD,
    PROMETHEUS_CONFIG,
    REJECT_REASONS,
    SERVER_JOB,
    LoadReport,
    Prometheus,
    dashboard_queries,
    has_finite_value,
    http_get,
    iter_panels,
    mixed_load,
    need_tool,
    scrape_config,
)
from serving import (
    Supervised,
    held_decoder,
    rss_mb,
    served_process,
    server_thread,
    supervised,
    wait_until,
)
from vae_client import AsyncVaeClient, VaeClient, VaeError
from vae_core.ports import free_port
from vae_proto import vae_pb2, vae_pb2_grpc
from vae_server.instrument import code_of
from vae_server.metrics import LATENCY_BUCKETS, Metrics, serve_metrics

pytestmark = pytest.mark.e2e

# Small limits, so that a few calls fill the queue: 16,384 images queued per model at most,
# 32 per model run.
MAX_QUEUE = 16384
SERVER_FLAGS = ("--max-batch-size", "32", "--max-queue-images", str(MAX_QUEUE),
                "--max-images-per-request", "1024", "--max-sample-n", "1024",
                "--max-chunk-size", "1024", "--warmup-rounds", "1")


@dataclass
class Served:
    target: str
    metrics_port: int
    metrics_url: str


@pytest.fixture(scope="module")
def served(model_dir) -> Iterator[Served]:
    """vae-server as a subprocess with its metrics port on."""
    metrics_port = free_port()
    with served_process(model_dir, "--metrics-port", str(metrics_port), *SERVER_FLAGS) as (
            target, _):
        yield Served(target, metrics_port, f"http://127.0.0.1:{metrics_port}/metrics")


def _families(metrics_url: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(http_get(metrics_url))}


def _some_traffic(target: str) -> None:
    """One call of each kind, and an invalid one: every labelled series exists afterwards."""

    async def go() -> None:
        async with AsyncVaeClient(target, timeout=30) as c:
            k = (await c.info()).latent_dim
            images = await c.sample(8, seed=1)
            await c.encode(images)
            await c.decode(np.zeros((2, k), np.float32))
            await c.log_likelihood(images, k=10)
            async for _ in c.sample_stream(100, seed=1, chunk_size=50):
                pass
            with pytest.raises(VaeError):
                await c.sample(0)

    asyncio.run(go())


# -- promtool ----------------------------------------------------------------------------------


def test_promtool_accepts_the_prometheus_config(tmp_path):
    promtool = need_tool("promtool")
    for path in (PROMETHEUS_CONFIG, tmp_path / "test.yml"):
        if path.name == "test.yml":  # the config the tests run, derived from the repository's
            path.write_text(json.dumps(scrape_config(9999)))
        done = subprocess.run([promtool, "check", "config", str(path)], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_metrics_passes_on_the_live_metrics(served):
    promtool = need_tool("promtool")
    _some_traffic(served.target)
    text = http_get(served.metrics_url)
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr


def test_metrics_have_the_names_types_and_labels_of_the_design(served):
    _some_traffic(served.target)
    families = _families(served.metrics_url)
    grpc_labels = {"grpc_service", "grpc_method", "grpc_type"}
    want = {
        # name (without _total): (type, labels)
        "grpc_server_started": ("counter", grpc_labels),
        "grpc_server_handled": ("counter", grpc_labels | {"grpc_code"}),
        "grpc_server_handling_seconds": ("histogram", grpc_labels),
        "grpc_server_msg_received": ("counter", grpc_labels),
        "grpc_server_msg_sent": ("counter", grpc_labels),
        "vae_batch_size": ("histogram", {"model"}),
        "vae_queue_wait_seconds": ("histogram", {"model"}),
        "vae_inference_seconds": ("histogram", {"model"}),
        "vae_queue_depth": ("gauge", {"model"}),
        "vae_queue_occupancy_ratio": ("gauge", {"model"}),
        "vae_items": ("counter", {"model"}),
        "vae_method_images": ("counter", {"grpc_method"}),
        "vae_rejected": ("counter", {"reason"}),
        "vae_anomalies": ("counter", set()),
        "vae_grpc_received_calls": ("counter", set()),
        "vae_event_loop_cpu_seconds": ("counter", set()),
        # An Info: in the text format, a gauge named vae_model_info, always 1.
        "vae_model_info": ("gauge", {"model_version", "likelihood", "latent_dim", "sigma",
                               "execution_provider"}),
        "process_cpu_seconds": ("counter", set()),
        "process_resident_memory_bytes": ("gauge", set()),
    }
    for name, (kind, labels) in want.items():
        assert name in families, f"{name} is missing from /metrics"
        family = families[name]
        assert family.type == kind, f"{name} is a {family.type}, not a {kind}"
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        assert samples, f"{name} has no samples"
        for s in samples:
            assert set(s.labels) - {"le"} == labels, f"{s.name} has labels {s.labels}"

    def values(name: str, label: str) -> set[str]:
        return {s.labels[label] for s in families[name].samples}

    for name in ("vae_batch_size", "vae_queue_wait_seconds", "vae_inference_seconds",
                 "vae_queue_depth", "vae_queue_occupancy_ratio", "vae_items"):
        assert values(name, "model") == {"encoder", "decoder"}, name
    assert {"Encode", "Decode", "Sample", "SampleStream", "LogLikelihood"} <= values(
        "grpc_server_handled", "grpc_method")
    assert values("grpc_server_handled", "grpc_service") >= {"vae.v1.VaeService",
                                                            "grpc.health.v1.Health"}
    assert "server_stream" in values("grpc_server_started", "grpc_type")
    assert values("vae_rejected", "reason") <= set(REJECT_REASONS)
    [info] = families["vae_model_info"].samples
    assert info.value == 1 and info.labels["execution_provider"] == "CPUExecutionProvider"
    # No GPU here (the CPU provider), so no GPU series at all: the dashboard says "no GPU".
    assert not [n for n in families if n.startswith("vae_gpu_")]


def test_latency_buckets_span_what_the_server_measures(served):
    """The observed latencies, from health checks (tens of microseconds) to large scoring
    calls (tens to hundreds of milliseconds), fall inside the finite buckets and spread over
    several of them."""
    assert LATENCY_BUCKETS[0] <= 50e-6 and LATENCY_BUCKETS[-1] >= 10.0
    _some_traffic(served.target)
    families = _families(served.metrics_url)
    for name in ("grpc_server_handling_seconds", "vae_queue_wait_seconds",
                 "vae_inference_seconds"):
        buckets: dict[float, float] = {}
        for s in families[name].samples:
            if s.name.endswith("_bucket"):
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
        finite = sorted(le for le in buckets if math.isfinite(le))
        assert finite == sorted(LATENCY_BUCKETS), name
        total = buckets[math.inf]
        assert total > 0 and buckets[finite[-1]] == total, \
            f"{name}: observations past {finite[-1]} s"
        counts = np.diff([0.0] + [buckets[le] for le in finite])
        # The buckets resolve what was seen: RPC latencies (health checks to large scoring
        # calls) spread over several; model runs and queue waits, more alike, over two or more
        # (which two depends on the machine's load, so no more is asked).
        spread = 3 if name == "grpc_server_handling_seconds" else 2
        assert (counts > 0).sum() >= spread, f"{name}: observations in fewer than {spread} buckets"


# -- Prometheus and the dashboard --------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus(served, tmp_path_factory) -> Iterator[Prometheus]:
    binary = need_tool("prometheus")
    prom = Prometheus(binary, scrape_config(served.metrics_port, "1s"),
                      tmp_path_factory.mktemp("prometheus"))
    try:
        prom.wait_targets_up()
        yield prom
    finally:
        prom.stop()


@pytest.fixture(scope="module")
def loaded(served, prometheus) -> LoadReport:
    """The mixed load, run once Prometheus scrapes the server."""
    return mixed_load(served.target, served.metrics_url, seconds=3.0)


def test_the_load_reached_every_outcome(loaded):
    assert loaded.outcomes.get("OK", 0) > 100
    for code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED"):
        assert loaded.outcomes.get(code, 0) > 0, (code, loaded.outcomes)
    assert loaded.anomalies > 0  # the random-noise images


def test_every_dashboard_query_returns_data(served, prometheus, loaded):
    queries = dashboard_queries()
    assert len(queries) >= 20
    gpu_here = any(n.startswith("vae_gpu_") for n in _families(served.metrics_url))
    # One process here: the --workers series are test_replicas.py's.
    wanted = [q for q in queries if (gpu_here or not q.gpu) and not q.workers]

    def missing() -> list[str]:
        out = []
        for q in wanted:
            result = prometheus.query(q.expr)
            if not has_finite_value(result):
                out.append(f"{q.panel} [{q.ref_id}]: {q.expr} -> {result}")
        reasons = {r["metric"]["reason"] for r in prometheus.query(
            f'sum by (reason) (vae_rejected_total{{job="{SERVER_JOB}"}})')}
        out += [f"no vae_rejected_total{{reason={r!r}}} in Prometheus"
                for r in ("invalid", "queue_full", "cancelled") if r not in reasons]
        return out

    # rate() needs two scrapes after the load's last change: a few seconds at most.
    deadline = time.monotonic() + 20
    while (gaps := missing()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not gaps, "dashboard queries without data:\n" + "\n".join(gaps)

    # GPU panels: no series at all, so their stat shows "no GPU"; the workers' panels, "one
    # process".
    for q in queries:
        if (q.gpu and not gpu_here) or q.workers:
            assert prometheus.query(q.expr) == [], q.expr


def test_a_stream_longer_than_30_s_reads_as_its_length_on_the_latency_panels(tmp_path):
    """Before: the last finite bucket was 30 s, so the dashboard's p50/p95/p99 read a whole
    SampleStream of 100 s (10^7 images, the default limit) as 30 s. Here a real Prometheus
    scrapes the server's own histograms, in which one stream took 100 s, and every latency
    panel puts it in its bucket, (60 s, 120 s]."""
    binary = need_tool("prometheus")
    metrics = Metrics(CollectorRegistry(), gpu=False)
    stream = metrics.handling.labels("vae.v1.VaeService", "SampleStream", "server_stream")
    http = serve_metrics(0, "127.0.0.1", metrics.registry)
    prom = Prometheus(binary, scrape_config(http.server_port, "1s"), tmp_path / "prometheus")
    panels = [q for q in dashboard_queries() if q.panel.startswith("Latency p")]
    assert len(panels) == 3
    try:
        prom.wait_targets_up()  # a scrape before the stream ends: rate() sees it begin
        stream.observe(100.0)
        deadline = time.monotonic() + 20
        while True:
            read = {q.panel: [float(r["value"][1]) for r in prom.query(q.expr)
                              if r["metric"].get("grpc_method") == "SampleStream"]
                    for q in panels}
            if all(v and math.isfinite(v[0]) for v in read.values()) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        prom.stop()
        http.shutdown()
        http.server_close()
    for panel, values in read.items():
        assert len(values) == 1 and 60.0 < values[0] <= 120.0, (panel, values)


# -- --workers: the supervisor's merged metrics ------------------------------------------------


@pytest.fixture(scope="module")
def workers2(model_dir) -> Iterator[Supervised]:
    """`vae-server --workers 2`: the supervisor's metrics port (the merge), and each worker's
    (loopback ports that its log names)."""
    with supervised(model_dir, 2, *SERVER_FLAGS) as sup:
        assert len(sup.worker_metrics_ports()) == 2, sup.log
        yield sup


def _worker_urls(sup: Supervised) -> list[str]:
    return [f"http://127.0.0.1:{p}/metrics" for p in sup.worker_metrics_ports()]


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _get(url: str, accept: str | None = None) -> tuple[str, str]:
    """The page and its content type, in the format `accept` asks for."""
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.read().decode(), reply.headers["Content-Type"]


def test_the_workers_merged_metrics_parse_as_text_and_as_openmetrics(workers2):
    """Before: the merge re-emitted each X_created gauge of the workers' text format beside
    the counter or histogram X, and OpenMetrics' parser rejected the page ("Clashing name:
    grpc_server_started_created"); a lone server's page parsed. Both formats, as Prometheus
    may ask for either."""
    for _ in range(2):  # two channels: most likely calls on both workers
        _some_traffic(workers2.target)
    text, kind = _get(workers2.metrics_url)
    assert kind.startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    om, kind = _get(workers2.metrics_url, OPENMETRICS)
    assert kind.startswith("application/openmetrics-text")
    om_families = {f.name: f for f in openmetrics_families(om)}
    # The creation times are folded into their families, not dropped: the earliest worker's.
    started = om_families["grpc_server_started"]
    created = [s for s in started.samples if s.name == "grpc_server_started_created"]
    assert created and len(created) == len(
        [s for s in started.samples if s.name == "grpc_server_started_total"])
    assert not [n for n in om_families if n.endswith("_created")]
    # The text page has what a lone server's has: X_created as gauges of their own.
    assert families["grpc_server_started_created"].type == "gauge"
    worker = {f.name for url in _worker_urls(workers2)
              for f in text_string_to_metric_families(_get(url)[0])}
    assert worker <= set(families), worker - set(families)


def _process_values(url: str) -> dict[str, float]:
    return {s.name: s.value for f in text_string_to_metric_families(_get(url)[0])
            if f.name.startswith("process_") for s in f.samples}


def _own_start_time(pid: int) -> float:
    """A process's start time as prometheus_client's process collector reads it."""
    btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    ticks = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text()
    return btime + float(stat.rsplit(")", 1)[1].split()[19]) / ticks


def test_the_workers_merged_process_metrics_include_the_supervisor(workers2):
    """Before: process_* summed the workers alone, so the CPU and Memory panels under-read
    a server run with --workers by its supervisor. Now the supervisor's own figures are in
    the sums, and its start, the server's, is the earliest."""
    pid = workers2.proc.pid
    workers = [_process_values(url) for url in _worker_urls(workers2)]
    own_cpu = sum(float(v) for v in Path(f"/proc/{pid}/stat").read_text()
                  .rsplit(")", 1)[1].split()[11:13]) / os.sysconf("SC_CLK_TCK")  # utime, stime
    merged = _process_values(workers2.metrics_url)
    # The supervisor started before it spawned its workers (tenths of a second at least).
    assert merged["process_start_time_seconds"] == pytest.approx(_own_start_time(pid),
                                                                 abs=0.02)
    assert min(w["process_start_time_seconds"] for w in workers) > _own_start_time(pid) + 0.05
    # Resident memory: the workers' (idle, steady) and the supervisor's, tens of MB.
    own_rss = rss_mb(pid) * 2**20
    rest = merged["process_resident_memory_bytes"] - sum(
        w["process_resident_memory_bytes"] for w in workers)
    assert 0.5 * own_rss < rest < 1.5 * own_rss, (rest, own_rss)
    # File descriptors: the supervisor holds at least its standard three and its pipes.
    assert merged["process_open_fds"] - sum(w["process_open_fds"] for w in workers) >= 3
    # CPU seconds only grow, and the merge was read after the workers' and the supervisor's.
    assert merged["process_cpu_seconds_total"] >= sum(
        w["process_cpu_seconds_total"] for w in workers) + own_cpu - 0.02
    assert merged["process_max_fds"] == max(w["process_max_fds"] for w in workers)


# -- deadlines ----------------------------------------------------------------------------------


def test_an_expired_deadline_is_counted_as_deadline(model_dir):
    """Calls whose deadline passes while they wait in the queue, behind a decoder held running,
    end DEADLINE_EXCEEDED for their callers and are counted as expired by the server: as
    DeadlineExceeded in grpc_server_handled_total and as vae_rejected_total{reason="deadline"},
    never as cancelled. (The held run makes the wait as long as the test needs on any machine:
    a call behind a long run of real work ends OK on a fast machine.)"""
    rows, tries, k = 128, 3, 10
    method = {"grpc_service": "vae.v1.VaeService", "grpc_method": "LogLikelihood",
              "grpc_type": "unary"}
    images = np.random.default_rng(0).random((32, 784), dtype=np.float32)
    with server_thread(model_dir, max_batch_size=rows, inline_rows=0, max_delay_ms=0,
                       instances=1) as srv, held_decoder(srv, rows):
        registry, decoder = srv.running.metrics.registry, srv.running.servicer.decoder

        def count(name: str, **labels: str) -> float:
            return registry.get_sample_value(name, labels) or 0.0

        def expired(c: VaeClient, seed: int) -> VaeError:
            """A call sent now, with a deadline it reaches the queue well before."""
            failed: list[VaeError] = []

            def call() -> None:
                try:
                    c.log_likelihood(images, k=k, seed=seed, timeout=1.5)
                except VaeError as err:
                    failed.append(err)

            caller = threading.Thread(target=call)
            caller.start()
            wait_until(lambda: decoder.queued_images == rows + 32 * k, timeout=1.4, every=0.005,
                       what="the call did not reach the queue before its deadline")
            caller.join(10)
            assert len(failed) == 1, "the call ended without an error"
            return failed[0]

        with VaeClient(srv.target, retries=0) as c:
            for i in range(tries):
                assert expired(c, i).code == grpc.StatusCode.DEADLINE_EXCEEDED
                # Its handler ends, and its rows leave the queue, once the server's clock has
                # reached the deadline too.
                wait_until(lambda n=i + 1: count("grpc_server_handled_total", **method,
                                                 grpc_code="DeadlineExceeded") == n, timeout=10)
                wait_until(lambda: decoder.queued_images == rows, timeout=10)
        assert count("grpc_server_started_total", **method) == tries
        assert count("grpc_server_handled_total", **method, grpc_code="Canceled") == 0
        assert count("vae_rejected_total", reason="deadline") == tries
        assert count("vae_rejected_total", reason="cancelled") == 0


class _Cancelled:
    """What code_of reads of a handler's context once grpc.aio has cancelled the handler."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def code(self) -> None:
        return None

    def time_remaining(self) -> float | None:
        return self.remaining


def test_a_cancellation_just_before_the_deadline_is_the_deadline():
    """The caller's deadline reaches the server as a plain cancellation, which can arrive a
    few milliseconds before the server's own clock reaches the same deadline (seen in CI: one
    expired call in twelve counted as CANCELLED)."""
    cancelled = asyncio.CancelledError()
    assert code_of(_Cancelled(0.0), cancelled) == "DeadlineExceeded"
    assert code_of(_Cancelled(0.004), cancelled) == "DeadlineExceeded"
    assert code_of(_Cancelled(1.0), cancelled) == "Canceled"
    assert code_of(_Cancelled(None), cancelled) == "Canceled"  # no deadline at all


def test_a_stream_closed_while_sending_is_cancelled():
    """grpc.aio closes a streaming handler with GeneratorExit, not CancelledError, when its
    call is cancelled while a reply is being written. Before, that counted as UNKNOWN."""
    assert code_of(_Cancelled(1.0), GeneratorExit()) == "Canceled"
    assert code_of(_Cancelled(0.0), GeneratorExit()) == "DeadlineExceeded"


def test_cancelled_streams_are_counted_as_cancelled(served):
    """Streams cancelled after their first chunk, while the next ones are being sent: each
    counts once as CANCELLED and once as rejected for `cancelled`, however it was stopped,
    after the model ran its first chunk; the dashboard's Rejections panel says so (before, it
    said that none of the calls it counts had reached the model)."""

    def counts() -> dict[str, float]:
        families = _families(served.metrics_url)
        out: dict[str, float] = collections.Counter()
        for s in families["grpc_server_handled"].samples:
            if s.name == "grpc_server_handled_total" and s.labels["grpc_method"] == "SampleStream":
                out[s.labels["grpc_code"]] += s.value
        for s in families["vae_rejected"].samples:
            if s.name == "vae_rejected_total":
                out["rejected " + s.labels["reason"]] += s.value
        return out

    def decoded() -> float:
        return sum(s.value for s in _families(served.metrics_url)["vae_items"].samples
                   if s.name == "vae_items_total" and s.labels["model"] == "decoder")

    before, rows = counts(), decoded()
    streams = 20
    with grpc.insecure_channel(served.target) as channel:
        stub = vae_pb2_grpc.VaeServiceStub(channel)
        for seed in range(streams):
            replies = stub.SampleStream(vae_pb2.SampleStreamRequest(n=100_000, seed=seed,
                                                                    chunk_size=1024))
            next(replies)
            replies.cancel()
    # Until the server has ended every stream (a stream's two counts are made one after the
    # other: a scrape may fall between them).
    expected = {"Canceled": streams, "rejected cancelled": streams}
    end = time.monotonic() + 10
    while True:
        delta = {k: v - before.get(k, 0) for k, v in counts().items() if v != before.get(k, 0)}
        if delta == expected or time.monotonic() > end:
            break
        time.sleep(0.05)
    assert delta == expected, delta
    assert decoded() - rows >= streams * 1024  # every first chunk ran through the decoder
    (panel,) = [p for p in iter_panels(json.loads(DASHBOARD.read_text())["panels"])
                if p.get("title") == "Rejections by reason"]
    assert "None of these reached the model" not in panel["description"]
    assert "a SampleStream stopped mid-way has already run" in panel["description"]

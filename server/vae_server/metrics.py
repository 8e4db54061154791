"""Prometheus metrics, under the names DESIGN.md fixes. Every metric lives in the registry
passed in, so each test can build a fresh CollectorRegistry."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from prometheus_client import (
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from vae_core.ports import bare_host
from vae_server.batcher import BatcherObserver

# From tens of microseconds (a single decode on the CPU) to seconds (bulk scoring), and on to
# minutes: a SampleStream is timed whole (10^7 images, the default limit, take about 100 s on
# two cores), and may last as long as its connection's age plus grace (120 s + 600 s by
# default). histogram_quantile reads anything past the last bound as that bound.
LATENCY_BUCKETS = (
    25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3,
    250e-3, 500e-3, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0,
)
BATCH_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192
REJECTION_REASONS = ("invalid", "queue_full", "deadline", "cancelled", "unauthenticated",
                     "shutting_down", "model_version")
IMAGE_METHODS = ("Encode", "Decode", "Sample", "SampleStream", "LogLikelihood")

# grpc_code spelt as go-grpc-prometheus spells it (Go's codes.Code.String(): InvalidArgument,
# Canceled), not as Python's enum names: queries and alerts written for Go servers
# (grpc_code=~"Unavailable|Internal") then match this server's series too.
_GO_SPELLING = {grpc.StatusCode.OK: "OK", grpc.StatusCode.CANCELLED: "Canceled"}
CODE_LABELS = {code: _GO_SPELLING.get(code) or code.name.title().replace("_", "")
               for code in grpc.StatusCode}


log = logging.getLogger(__name__)


METRICS_BACKLOG = 128  # connections waiting to be accepted
METRICS_IDLE_S = 10.0  # how long a metrics connection may go without sending its request


def serve_metrics(port: int, host: str, registry: CollectorRegistry) -> WSGIServer:
    """/metrics of `registry` over HTTP on `host` (as --host is written: "[::]" for every
    IPv6 and IPv4 address, "0.0.0.0", "127.0.0.1", a name) and `port` (0: a free one). A port
    or address that cannot be had raises a RuntimeError that names --metrics-port, which
    vae-server prints on one line before it exits with status 2."""
    addr = bare_host(host)
    try:
        try:
            http, _ = start_http_server(port, addr=addr, registry=registry)
        except OSError as exc:
            # Every address on a host without IPv6: IPv4's, as gRPC falls back for "[::]".
            if addr not in ("::", "") or exc.errno not in (errno.EAFNOSUPPORT,
                                                            errno.EADDRNOTAVAIL):
                raise
            http, _ = start_http_server(port, addr="0.0.0.0", registry=registry)
    except OSError as exc:  # busy, or an address this host does not have
        raise RuntimeError(f"--metrics-port {port}: cannot listen on {host}: "
                           f"{exc.strerror or exc}") from None
    # prometheus_client's server listens with socketserver's backlog of 5, and gives each
    # connection a thread that waits for its request as long as the client likes: a burst of
    # scrapers was refused connections, and silent clients held a thread each for good.
    http.socket.listen(METRICS_BACKLOG)
    base: Any = http.RequestHandlerClass

    def handle(self: Any) -> None:
        try:
            base.handle(self)
        except TimeoutError:  # a silent client: its connection closes, without a traceback
            self.close_connection = True

    http.RequestHandlerClass = type("IdleLimitedHandler", (base,),
                                    {"timeout": METRICS_IDLE_S, "handle": handle})
    return http


class LoopCpuCollector(Collector):
    """vae_event_loop_cpu_seconds_total: the CPU time of the thread that runs the server's
    event loop, read at scrape time. Its rate nears 1 (a core) when the loop is the limit:
    calls then wait in gRPC, which vae_in_flight_calls does not count, while the process uses
    one core of several. Nothing is collected once the thread has ended."""

    HELP = ("CPU time of the thread that runs the server's event loop (one per worker): a "
            "rate near 1 per loop means the loop is the limit, and calls wait in gRPC.")

    def __init__(self, thread_id: int) -> None:
        self._clock = time.pthread_getcpuclockid(thread_id)

    def collect(self) -> Iterator[CounterMetricFamily]:
        try:
            seconds = time.clock_gettime(self._clock)
        except OSError:  # the loop's thread has ended
            return
        yield CounterMetricFamily("vae_event_loop_cpu_seconds", self.HELP, value=seconds)


class GpuCollector(Collector):
    """GPU utilisation and memory from NVML (nvidia-ml-py), read at scrape time. Without the
    library or a GPU it collects nothing, and says why once in the log.

    A query that NVML refuses (utilisation on a MIG instance is NotSupported, a GPU fallen off
    the bus is Unknown) leaves out the series it would give, and is logged once per query: it
    must neither stop the server from starting (the registry collects once when this is
    registered) nor break every scrape."""

    def __init__(self) -> None:
        self._nvml = None
        self._failed: set[str] = set()  # queries whose failure is logged already
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self.count = pynvml.nvmlDeviceGetCount()
        except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError: no GPU metrics
            log.info("no GPU metrics: %s", exc)
            self.count = 0

    def _query(self, name: str, *args: Any) -> Any:
        """NVML's `name`(*args), or None (logged the first time) if NVML refuses it."""
        try:
            return getattr(self._nvml, name)(*args)
        except Exception as exc:  # noqa: BLE001 - NVMLError and its many subclasses
            if name not in self._failed:
                self._failed.add(name)
                log.warning("GPU metrics: NVML's %s failed (%s: %s); the series it gives are "
                            "left out", name, type(exc).__name__, exc)
            return None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if not self.count or self._nvml is None:
            return
        util = GaugeMetricFamily("vae_gpu_utilization_ratio",
                                 "GPU busy fraction over the last sample period (NVML).",
                                 labels=["gpu", "name"])
        used = GaugeMetricFamily("vae_gpu_memory_used_bytes", "GPU memory in use (NVML).",
                                 labels=["gpu", "name"])
        total = GaugeMetricFamily("vae_gpu_memory_total_bytes", "GPU memory in all (NVML).",
                                  labels=["gpu", "name"])
        for i in range(self.count):
            h = self._query("nvmlDeviceGetHandleByIndex", i)
            if h is None:
                continue
            name = self._query("nvmlDeviceGetName", h)
            name = name.decode() if isinstance(name, bytes) else str(name or "")
            labels = [str(i), name]
            rates = self._query("nvmlDeviceGetUtilizationRates", h)
            if rates is not None:
                util.add_metric(labels, rates.gpu / 100.0)
            mem = self._query("nvmlDeviceGetMemoryInfo", h)
            if mem is not None:
                used.add_metric(labels, float(mem.used))
                total.add_metric(labels, float(mem.total))
        yield from (f for f in (util, used, total) if f.samples)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None, gpu: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        # Process CPU, memory and file descriptors, and the Python version: prometheus_client's
        # default collectors, in our registry.
        r.register(PROCESS_COLLECTOR)
        r.register(PLATFORM_COLLECTOR)
        if gpu:
            r.register(GpuCollector())
        grpc_labels = ("grpc_service", "grpc_method", "grpc_type")
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.",
                               grpc_labels, registry=r)
        self.handled = Counter("grpc_server_handled_total",
                               "RPCs completed on the server, regardless of success or failure.",
                               (*grpc_labels, "grpc_code"), registry=r)
        self.handling = Histogram("grpc_server_handling_seconds",
                                  "Response latency of RPCs handled by the server.",
                                  grpc_labels, buckets=LATENCY_BUCKETS, registry=r)
        self.msg_received = Counter("grpc_server_msg_received_total",
                                    "RPC stream messages received on the server.", grpc_labels,
                                    registry=r)
        self.msg_sent = Counter("grpc_server_msg_sent_total",
                                "gRPC stream messages sent by the server.", grpc_labels,
                                registry=r)
        self.batch_size = Histogram("vae_batch_size", "Images per model run actually executed.",
                                    ("model",), buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("vae_queue_wait_seconds",
                                    "Time a call's images waited in the batcher's queue, "
                                    "once per slice of a call (at most --max-batch-size "
                                    "images).",
                                    ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("vae_inference_seconds",
                                   "Duration of one model run (ONNX Runtime's run call).",
                                   ("model",), buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("vae_queue_depth", "Images waiting in the batcher's queue.",
                                 ("model",), registry=r)
        self.occupancy = Gauge("vae_queue_occupancy_ratio",
                               "The share of --max-queue-images that admission counts as "
                               "taken: images queued, reserved by calls under way (a "
                               "LogLikelihood call's N x K rows), and made for streams and not "
                               "yet read. At 1, calls are refused with RESOURCE_EXHAUSTED.",
                               ("model",), registry=r)
        self.unsent = Gauge("vae_stream_unsent_images",
                            "SampleStream images made, or being made, for their callers to "
                            "read; they count against the decoder's queue limit.", registry=r)
        self.stream_stalls = Counter("vae_stream_stalls_total",
                                     "SampleStream chunks left unread by their callers for "
                                     "--stream-stall-s: the chunks made ahead of each were "
                                     "dropped, their room given back, to be made again if the "
                                     "caller reads on.", registry=r)
        self.in_flight = Gauge("vae_in_flight_calls",
                               "vae.v1 calls being handled, streams included: the load of "
                               "this replica (the autoscaler's signal).", registry=r)
        self.items = Counter("vae_items_total", "Images (rows) processed by the model.",
                             ("model",), registry=r)
        self.method_images = Counter("vae_method_images_total",
                                     "Images received or produced, by RPC method.",
                                     ("grpc_method",), registry=r)
        self.rejected = Counter("vae_rejected_total",
                                "vae.v1 calls refused or ended early, by reason (invalid, "
                                "queue_full, deadline, cancelled, unauthenticated, "
                                "shutting_down, model_version).", ("reason",),
                                registry=r)
        self.anomalies = Counter("vae_anomalies_total",
                                 "Images that LogLikelihood flagged as anomalies.", registry=r)
        self.model_info = Info("vae_model", "The model served and how.", registry=r)
        # Series exist from the start at 0, so that rate() sees the first burst of each.
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        for method in IMAGE_METHODS:
            self.method_images.labels(method)

    def initialize_grpc(self, service: Any) -> None:
        """Create every method's series of a service descriptor at 0, every status code's
        among them, as go-grpc-prometheus's InitializeMetrics does: rate() and increase()
        then see the first burst of each code."""
        for m in service.methods:
            labels = (service.full_name, m.name,
                      "server_stream" if m.server_streaming else "unary")
            self.started.labels(*labels)
            self.handling.labels(*labels)
            self.msg_received.labels(*labels)
            self.msg_sent.labels(*labels)
            for code in grpc.StatusCode:
                self.handled.labels(*labels, CODE_LABELS[code])

    def calls_started(self) -> int:
        """grpc_server_started_total over every method: the calls handlers have taken."""
        return int(sum(s.value for family in self.started.collect() for s in family.samples
                       if s.name.endswith("_total")))

    def observer(self, model: str) -> BatcherObserver:
        return _ModelObserver(self, model)

    def watch_in_flight(self, calls: Callable[[], float]) -> None:
        """vae_in_flight_calls reads `calls()` when scraped."""
        self.in_flight.set_function(calls)

    def watch_queue(self, model: str, images: Callable[[], float],
                    occupancy: Callable[[], float] | None = None) -> None:
        """vae_queue_depth{model} reads `images()` when scraped, and
        vae_queue_occupancy_ratio{model} `occupancy()`: nothing to set per call."""
        self.queue_depth.labels(model).set_function(images)
        if occupancy is not None:
            self.occupancy.labels(model).set_function(occupancy)

    def watch_event_loop(self, thread_id: int) -> None:
        """vae_event_loop_cpu_seconds_total of the thread `thread_id` (threading.get_ident()
        in the loop's thread); left out where the platform has no per-thread CPU clock."""
        if hasattr(time, "pthread_getcpuclockid"):
            self.registry.register(LoopCpuCollector(thread_id))

    def watch_unsent(self, images: Callable[[], float]) -> None:
        """vae_stream_unsent_images reads `images()` when scraped."""
        self.unsent.set_function(images)


class _ModelObserver(BatcherObserver):
    def __init__(self, metrics: Metrics, model: str) -> None:
        self._batch = metrics.batch_size.labels(model)
        self._wait = metrics.queue_wait.labels(model)
        self._inference = metrics.inference.labels(model)
        self._items = metrics.items.labels(model)

    def batch_run(self, size: int, queue_wait: Sequence[float], seconds: float) -> None:
        self._batch.observe(size)
        self._inference.observe(seconds)
        self._items.inc(size)
        for w in queue_wait:
            self._wait.observe(w)


def where_metrics(port: int | None) -> str:
    """The metrics endpoint in the start-up log: "on port N", or "off"."""
    return "off" if port is None else f"on port {port}"

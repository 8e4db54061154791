"""The --workers supervisor's handling of a worker's exit, and its merge of the workers'
metrics, without starting any process.

A process's sentinel becomes ready when the process dies, which can be before the parent
has reaped it: until then `exitcode` reads None. These tests drive `Supervisor._handle`
with a stand-in process that behaves so, and check what the supervisor logs and does.
"""

from __future__ import annotations

import logging
import re
import signal
import socket
import threading
import time
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from vae_server.config import load_settings
from vae_server.runtime import CPU, CUDA
from vae_server.workers import (
    FAILED,
    PING,
    PONG,
    READY,
    STABLE_S,
    STOP,
    MergedMetrics,
    Supervisor,
    _Worker,
    claim_port,
    with_instances,
)


class _UnreapedProcess:
    """A process killed by SIGKILL whose exit status is known only once it is joined."""

    def __init__(self, pid: int = 4242) -> None:
        self.sentinel = object()
        self.pid = pid
        self._joined = False
        self.terminated = False  # sent SIGTERM: ended by it, before it could take it

    @property
    def exitcode(self) -> int | None:
        if not self._joined:
            return None
        return -signal.SIGTERM if self.terminated else -9

    def join(self, timeout: float | None = None) -> None:
        self._joined = True

    def is_alive(self) -> bool:
        return not self._joined

    def kill(self) -> None:
        self._joined = True

    def terminate(self) -> None:
        self.terminated = True


class _Pipe:
    """The supervisor's end of a worker's pipe; `said` what the worker sent before it
    exited."""

    def __init__(self, said: list[Any] | None = None) -> None:
        self.said = list(said or [])
        self.sent: list[Any] = []

    def close(self) -> None:
        pass

    def send(self, message: Any) -> None:
        self.sent.append(message)

    def poll(self) -> bool:
        return bool(self.said)

    def recv(self) -> Any:
        return self.said.pop(0)


def _supervisor(monkeypatch: pytest.MonkeyPatch, *, ready: bool, said: list[Any] | None = None,
                flags: tuple[str, ...] = ()) -> tuple[Supervisor, Any]:
    supervisor = Supervisor(load_settings(["--model-dir", "unused", "--workers", "1", *flags],
                                          env={}))
    process = _UnreapedProcess()
    supervisor._workers = [_Worker(0, process, _Pipe(said),  # type: ignore[arg-type]
                                   metrics_port=12345 if ready else None, ready=ready)]
    started: list[int] = []

    def start(index: int) -> _Worker:
        started.append(index)
        return _Worker(index, _UnreapedProcess(), _Pipe())  # type: ignore[arg-type]

    monkeypatch.setattr(supervisor, "_start", start)
    return supervisor, (process, started)


def test_a_killed_worker_is_logged_with_its_exit_status(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    supervisor, (process, started) = _supervisor(monkeypatch, ready=True)
    with caplog.at_level(logging.ERROR, logger="vae_server.workers"):
        supervisor._handle(process.sentinel)
        supervisor._restart_due(time.monotonic())
    assert "worker 0 exited with -9: NOT_SERVING until its replacement is ready" in caplog.text
    assert started == [0]
    assert supervisor.restarts._value.get() == 1


def test_a_worker_dead_before_ready_is_logged_with_its_exit_status(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    supervisor, (process, started) = _supervisor(monkeypatch, ready=False)
    with caplog.at_level(logging.ERROR, logger="vae_server.workers"):
        supervisor._handle(process.sentinel)
    assert "worker 0 exited with -9 before it was ready: stopping" in caplog.text
    assert supervisor.failed and started == []


def test_a_worker_that_could_not_start_stops_the_server_with_its_reason_and_status_2(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Before: the supervisor logged "signal received: draining" (no signal came) and exited
    with 1, the worker's traceback above it; now the worker's one-line reason, status 2."""
    reason = "Failed to bind to address 127.0.0.1:50051"
    supervisor, (process, started) = _supervisor(
        monkeypatch, ready=False, said=[(FAILED, reason)])
    with caplog.at_level(logging.INFO, logger="vae_server.workers"):
        supervisor._handle(process.sentinel)
        assert supervisor._stopping
        assert supervisor._watch() == 2
    assert supervisor.failure == f"worker 0 could not start: {reason}"
    assert "signal received" not in caplog.text
    assert "stopping the other workers" in caplog.text
    assert started == []


def test_a_worker_killed_before_ready_without_a_reason_still_exits_1(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    supervisor, (process, _) = _supervisor(monkeypatch, ready=False)
    with caplog.at_level(logging.INFO, logger="vae_server.workers"):
        supervisor._handle(process.sentinel)
        assert supervisor._watch() == 1
    assert supervisor.failure is None and "signal received" not in caplog.text


def test_a_worker_that_stops_answering_is_killed_and_one_that_answers_is_asked_again(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """One question at a time: a hung worker does not read its pipe, whose buffer would
    fill, and the supervisor would then block on its next send."""
    supervisor, (process, _) = _supervisor(monkeypatch, ready=True,
                                           flags=("--worker-timeout-s", "10"))
    w = supervisor._workers[0]
    w.heard = 100.0
    supervisor._check_hung(105.0)
    supervisor._check_hung(108.0)
    assert w.conn.sent == [PING] and process.is_alive()  # asked once, not yet answered
    w.conn.said.append((PONG, None))
    supervisor._handle(w.conn)
    assert not w.asked and w.heard > 100.0
    w.heard = 100.0  # answered at 100, then nothing more
    supervisor._check_hung(109.0)
    assert w.conn.sent == [PING, PING] and process.is_alive()
    with caplog.at_level(logging.ERROR, logger="vae_server.workers"):
        supervisor._check_hung(110.5)
        supervisor._check_hung(112.0)
    assert not process.is_alive()  # killed: its sentinel then starts another
    assert caplog.text.count("worker 0 has not answered for 10 s: killed") == 1
    assert w.conn.sent == [PING, PING]


def test_a_pipe_reset_by_a_killed_worker_is_left_to_its_sentinel(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker killed with a message of ours unread resets its end of the socket pair.
    Before, the reset ended the supervisor with a traceback (seen with a hung worker killed
    while a PING waited in its pipe); now the sentinel starts another, as for any exit."""
    supervisor, (process, started) = _supervisor(monkeypatch, ready=True)
    w = supervisor._workers[0]

    def reset() -> Any:
        raise ConnectionResetError(104, "Connection reset by peer")

    monkeypatch.setattr(w.conn, "recv", reset)
    supervisor._handle(w.conn)
    supervisor._handle(process.sentinel)
    supervisor._restart_due(time.monotonic())
    assert started == [0] and supervisor.restarts._value.get() == 1


def _served(monkeypatch: pytest.MonkeyPatch) -> tuple[Supervisor, list[int]]:
    """A supervisor whose one worker has served, with its `_start` failing on demand."""
    supervisor, (_, started) = _supervisor(monkeypatch, ready=True)
    supervisor._served = True
    return supervisor, started


def test_a_replacement_that_fails_is_started_again_later_and_later(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Before: once the server had served, a replacement that died before it was ready (killed
    while loading, as by the OOM killer; a TLS key renamed; the model's files changed) stopped
    the whole server, its healthy workers included. Now it is started again; two quick exits in
    a row make the next start wait 1 s, then 2 s, 4 s ..., up to MAX_BACKOFF_S."""
    supervisor, started = _served(monkeypatch)
    now = time.monotonic()
    waits = []
    with caplog.at_level(logging.INFO, logger="vae_server.workers"):
        for n in range(8):
            w = supervisor._workers[0]
            if n:  # a replacement, dead before it was ready, with its reason
                w.ready = False
                w.conn.said.append((FAILED, "the model's files changed"))
            w.process.join()
            supervisor._handle(w.process.sentinel)
            assert not supervisor._stopping and not supervisor.failed
            due = supervisor._workers[0].restart_at
            assert due is not None and not supervisor._workers[0].running
            waits.append(round(due - now))
            supervisor._restart_due(due - 0.01)  # not yet
            assert len(started) == n
            supervisor._restart_due(due)
            assert len(started) == n + 1 and supervisor._workers[0].running
    assert waits == [0, 1, 2, 4, 8, 16, 30, 30]
    assert supervisor.restarts._value.get() == 8
    assert "worker 0 exited with -9 before it was ready (the model's files changed)" \
        in caplog.text
    # A replacement that never comes up counts however long it took to fail (one killed
    # while loading a large model, say); before, one that lived past STABLE_S reset the count.
    w = supervisor._workers[0]
    w.started -= 2 * STABLE_S
    supervisor._handle(w.process.sentinel)
    assert supervisor._workers[0].streak == 9
    supervisor._restart_due(supervisor._workers[0].restart_at)
    # One that then serves past STABLE_S starts the count again.
    w = supervisor._workers[0]
    w.ready, w.ready_at = True, time.monotonic() - STABLE_S
    supervisor._handle(w.process.sentinel)
    assert supervisor._workers[0].streak == 0
    assert supervisor._workers[0].restart_at == pytest.approx(time.monotonic(), abs=1)


def test_a_worker_that_cannot_be_forked_again_is_tried_later(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a fork refused at a restart (EAGAIN under a process limit) escaped the watch
    loop; the supervisor then waited forever for its workers, deaf to SIGTERM, while the
    others went on serving unwatched. Now the start is tried again after a wait."""
    supervisor, started = _served(monkeypatch)
    start = supervisor._start

    def refused(index: int) -> _Worker:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(supervisor, "_start", refused)
    w = supervisor._workers[0]
    w.process.join()
    supervisor._handle(w.process.sentinel)
    supervisor._restart_due(time.monotonic())
    assert not supervisor._workers[0].running and supervisor._workers[0].streak == 2
    monkeypatch.setattr(supervisor, "_start", start)
    supervisor._restart_due(supervisor._workers[0].restart_at)
    assert supervisor._workers[0].running and started == [0]


def test_a_fault_in_the_watch_loop_drains_the_workers(monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    supervisor, (process, _) = _supervisor(monkeypatch, ready=True)

    def broken(_: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(supervisor, "_handle", broken)
    monkeypatch.setattr("multiprocessing.connection.wait", lambda items, timeout: items[:1])
    with caplog.at_level(logging.ERROR, logger="vae_server.workers"):
        assert supervisor._watch() == 1
    assert "the supervisor failed: draining its workers" in caplog.text
    assert supervisor._workers[0].conn.sent == [STOP] and not process.is_alive()


def test_a_worker_that_cannot_be_forked_at_start_stops_those_started(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the BlockingIOError left run() with a traceback and the supervisor waited on
    the worker already started, forever."""
    supervisor = Supervisor(load_settings(["--model-dir", "unused", "--workers", "2",
                                           "--metrics-port", "-1"], env={}))
    first = _Worker(0, _UnreapedProcess(), _Pipe())  # type: ignore[arg-type]
    workers = iter([first])

    def start(index: int) -> _Worker:
        try:
            return next(workers)
        except StopIteration:
            raise BlockingIOError(11, "Resource temporarily unavailable") from None

    monkeypatch.setattr(supervisor, "_start", start)
    monkeypatch.setattr("vae_server.workers.load_manifest",
                        lambda _: {"model_version": "abc"})
    monkeypatch.setattr("vae_server.workers.claim_port", lambda host, port: None)
    monkeypatch.setattr("signal.signal", lambda sig, handler: None)
    with pytest.raises(RuntimeError, match=r"^worker 1 could not be started: \[Errno 11\]"):
        supervisor.run()
    assert first.conn.sent == [STOP] and not first.process.is_alive()


def test_workers_not_yet_ready_are_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Warming up can take longer than the timeout; that is not hanging."""
    supervisor, (process, _) = _supervisor(monkeypatch, ready=False,
                                           flags=("--worker-timeout-s", "1"))
    supervisor._check_hung(1000.0)
    assert process.is_alive() and supervisor._workers[0].conn.sent == []


def test_metrics_off_means_no_worker_listens_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: --metrics-port -1 still gave each worker a loopback metrics listener, and a
    worker was ready only once it named one."""
    supervisor, (process, _) = _supervisor(monkeypatch, ready=False,
                                           flags=("--metrics-port", "-1"))
    assert supervisor.worker_settings.metrics_port == -1
    on = Supervisor(load_settings(["--model-dir", "unused", "--workers", "2"], env={}))
    assert on.worker_settings.metrics_port == 0  # a free loopback port each, merged
    worker = supervisor._workers[0]
    worker.conn.said.append((READY, None))  # type: ignore[attr-defined]
    supervisor._handle(worker.conn)
    assert worker.ready and supervisor._serving
    assert supervisor.ready_workers() == []  # nothing to merge


def test_the_port_is_refused_while_another_process_listens_on_it_sharing_or_not() -> None:
    """Workers bind with SO_REUSEPORT; before, a supervisor started on a port where another
    server's workers (or any process that set SO_REUSEPORT) listened joined them."""
    import socket

    for reuse_port in (True, False):
        with socket.socket() as other:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            other.bind(("127.0.0.1", 0))
            other.listen()
            port = other.getsockname()[1]
            for host in ("127.0.0.1", "0.0.0.0", "[::]"):
                with pytest.raises(RuntimeError, match=f"could not bind {re.escape(host)}:{port}"):
                    claim_port(host, port)
    # Free, it is claimed, once at a time, and let go.
    lock = claim_port("127.0.0.1", port)
    try:
        with pytest.raises(RuntimeError, match="another vae-server --workers"):
            claim_port("127.0.0.1", port)
    finally:
        if lock is not None:
            lock.close()
    again = claim_port("127.0.0.1", port)
    if again is not None:
        again.close()


def _exposition(calls: float, in_flight: float, seconds: float) -> str:
    return (
        "# HELP calls_total Calls handled.\n# TYPE calls_total counter\n"
        f"calls_total{{method=\"Decode\"}} {calls}\n"
        "# HELP in_flight Calls in flight.\n# TYPE in_flight gauge\n"
        f"in_flight {in_flight}\n"
        "# HELP latency Call latency.\n# TYPE latency histogram\n"
        f"latency_bucket{{le=\"0.1\"}} {calls}\nlatency_bucket{{le=\"+Inf\"}} {calls}\n"
        f"latency_count {calls}\nlatency_sum {seconds}\n"
    )


def _values(merged: MergedMetrics) -> dict[str, float]:
    text = "".join(f"{s.name} {s.value}\n" for family in merged.collect() for s in family.samples)
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()}


def test_merged_counters_never_go_down_when_a_worker_restarts_or_cannot_be_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the merge summed the workers it could read, so a worker's exit (or a failed
    read) took its counts away, and Prometheus read a counter reset."""
    live = [(101, 9001), (102, 9002)]
    texts = {9001: _exposition(5, 1, 0.5), 9002: _exposition(3, 2, 0.25)}
    merged = MergedMetrics(lambda: list(live))

    def read(port: int) -> str:
        if port not in texts:
            raise OSError("connection refused")
        return texts[port]

    monkeypatch.setattr(merged, "_read", read)
    values = _values(merged)
    assert (values["calls_total"], values["in_flight"], values["latency_count"],
            values["latency_sum"], values["vae_workers_unread"]) == (8, 3, 8, 0.75, 0)
    del texts[9001]  # worker 101 cannot be read at this scrape: it counts as last read
    values = _values(merged)
    assert values["calls_total"] == 8
    # Said, where before only the log did: a worker whose loop hangs (SIGSTOP, say) was
    # served as last read, its gauges stale, and counted ready, until killed.
    assert values["vae_workers_unread"] == 1
    # Worker 101 exits; its replacement 103 starts from zero.
    merged.retire(101)
    live[0] = (103, 9003)
    texts[9003] = _exposition(0, 0, 0.0)
    values = _values(merged)
    assert values["calls_total"] == 8 and values["latency_count"] == 8
    assert values["latency_sum"] == 0.75
    assert values["in_flight"] == 2  # a gauge is of the processes running now
    texts[9002] = _exposition(6, 0, 0.5)
    texts[9003] = _exposition(2, 1, 0.125)
    assert _values(merged)["calls_total"] == 5 + 6 + 2
    # One family each, as one server's exposition.
    names = [f.name for f in text_string_to_metric_families(
        "".join(f"# TYPE {f.name} {f.type}\n" for f in merged.collect()))]
    assert sorted(names) == ["calls", "in_flight", "latency", "vae_workers_unread"]


def test_device_wide_gpu_gauges_merge_as_one_reading_not_a_sum(monkeypatch, tmp_path):
    """Every worker reads the same GPU from NVML: before, the merge added their readings,
    and two workers on a GPU 60 % busy read 120 %."""
    from prometheus_client import CollectorRegistry, generate_latest
    from test_metrics import fake_pynvml

    from vae_server.metrics import Metrics

    fake_pynvml(monkeypatch, tmp_path, utilization=60)
    texts = {port: generate_latest(Metrics(CollectorRegistry(auto_describe=True)).registry
                                   ).decode() for port in (9001, 9002)}
    merged = MergedMetrics(lambda: [(101, 9001), (102, 9002)])
    monkeypatch.setattr(merged, "_read", texts.__getitem__)
    values = {(s.name, s.labels.get("gpu")): s.value for f in merged.collect()
              for s in f.samples}
    assert values[("vae_gpu_utilization_ratio", "0")] == 0.6
    assert values[("vae_gpu_memory_used_bytes", "0")] == 20 << 30
    assert values[("vae_gpu_memory_total_bytes", "0")] == 80 << 30
    # A process's own figures are still added up across workers. (Each page read this
    # process's memory when it was made: the two may differ.)
    assert values[("process_resident_memory_bytes", None)] == sum(
        float(text.split("\nprocess_resident_memory_bytes ")[1].split()[0])
        for text in texts.values())


def test_merged_created_series_fold_into_their_families_and_parse_as_openmetrics(monkeypatch):
    """Before: each worker's X_created, a gauge family of its own in the text format, was
    served beside X, and OpenMetrics' parser refused the page ("Clashing name"). Now they
    are X's `_created` samples, the earliest worker's, in both formats, before and after a
    worker exits."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
    from prometheus_client.openmetrics.parser import (
        text_string_to_metric_families as openmetrics_families,
    )

    from vae_server.metrics import Metrics

    texts = {}
    for port, code in ((9001, "OK"), (9002, "InvalidArgument")):
        m = Metrics(CollectorRegistry(auto_describe=True), gpu=False)
        labels = ("vae.v1.VaeService", "Decode", "unary")
        m.started.labels(*labels).inc()
        m.handled.labels(*labels, code).inc()  # a series only one worker has
        m.handling.labels(*labels).observe(0.01)
        texts[port] = generate_latest(m.registry).decode()
    created = [min(float(re.search(rf'^{name}{{.*grpc_method="Decode".*}} (\S+)$', t,
                                   re.M).group(1)) for t in texts.values())
               for name in ("grpc_server_started_created", "grpc_server_handling_seconds_created")]
    live = [(101, 9001), (102, 9002)]
    merged = MergedMetrics(lambda: list(live))
    monkeypatch.setattr(merged, "_read", texts.__getitem__)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(merged)
    for _ in range(2):
        families = {f.name: f for f in openmetrics_families(openmetrics(registry).decode())}
        assert not [name for name in families if name.endswith("_created")]
        values = {(s.name, s.labels.get("grpc_method"), s.labels.get("grpc_code")): s.value
                  for f in families.values() for s in f.samples}
        assert values[("grpc_server_started_created", "Decode", None)] == created[0]
        assert values[("grpc_server_handling_seconds_created", "Decode", None)] == created[1]
        assert values[("grpc_server_started_total", "Decode", None)] == 2
        assert values[("grpc_server_handled_total", "Decode", "InvalidArgument")] == 1
        text = {f.name: f.type for f in text_string_to_metric_families(
            generate_latest(registry).decode())}
        assert text["grpc_server_started"] == "counter"
        assert text["grpc_server_started_created"] == "gauge"  # as a lone server's page
        merged.retire(101)  # the second round: one worker's counts retired
        live[:] = [(102, 9002)]


def _worker_page(started: int, handled_ok: int, queued: float, unsent: float) -> str:
    from prometheus_client import CollectorRegistry, generate_latest

    from vae_server.metrics import Metrics

    m = Metrics(CollectorRegistry(auto_describe=True), gpu=False)
    labels = ("vae.v1.VaeService", "SampleStream", "server_stream")
    m.started.labels(*labels).inc(started)
    m.handled.labels(*labels, "OK").inc(handled_ok)
    m.watch_queue("decoder", lambda: queued, lambda: queued / 4096)
    m.watch_unsent(lambda: unsent)
    return generate_latest(m.registry).decode()


def _handled(merged: MergedMetrics) -> dict[tuple[str, str], float]:
    return {(s.labels["grpc_method"], s.labels["grpc_code"]): s.value
            for f in merged.collect() if f.name == "grpc_server_handled" for s in f.samples
            if s.name == "grpc_server_handled_total"}


def test_calls_a_retired_worker_left_in_flight_end_unavailable_in_the_sum(monkeypatch):
    """Before: the 4 streams a killed worker had in flight at its last scrape stayed started
    and never handled, so the dashboard's calls in flight (started - handled) showed them
    for as long as the supervisor ran, and no fault was counted for the crash. Their callers
    got UNAVAILABLE; the sum now says so."""
    texts = {9001: _worker_page(6, 2, 0, 0), 9002: _worker_page(1, 1, 0, 0)}
    live = [(101, 9001), (102, 9002)]
    merged = MergedMetrics(lambda: list(live))
    monkeypatch.setattr(merged, "_read", texts.__getitem__)
    # The UNAVAILABLE series is there at 0 before any worker dies, so that rate() and the
    # fault alert see its rise (a series that first appears at 4 reads as no increase).
    assert _handled(merged) == {("SampleStream", "OK"): 3, ("SampleStream", "Unavailable"): 0}
    merged.retire(101)
    live[:] = [(102, 9002)]
    assert _handled(merged) == {("SampleStream", "OK"): 3, ("SampleStream", "Unavailable"): 4}
    merged.retire(102)  # one that ended with nothing in flight adds no UNAVAILABLE
    live[:] = []
    assert _handled(merged) == {("SampleStream", "OK"): 3, ("SampleStream", "Unavailable"): 4}


def test_queue_gauges_merge_as_the_fullest_worker_not_a_sum(monkeypatch):
    """Each worker has its own queue and its own --max-queue-images: before, two workers
    with 3,000 images queued read 6,000, past a limit of 4,096 that neither was near."""
    texts = {9001: _worker_page(0, 0, 3000, 2500), 9002: _worker_page(0, 0, 1000, 500)}
    merged = MergedMetrics(lambda: [(101, 9001), (102, 9002)])
    monkeypatch.setattr(merged, "_read", texts.__getitem__)
    values = _values(merged)
    assert values["vae_queue_depth"] == 3000 and values["vae_stream_unsent_images"] == 2500
    assert values["vae_queue_occupancy_ratio"] == 3000 / 4096  # the fullest, not 4000 / 4096


def test_a_stop_while_a_worker_waits_to_be_restarted_counts_only_those_asked_to_stop(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the dead predecessor of the replacement not yet started (-9) went into the
    stop's status: the running workers drained, and the server exited 1."""
    supervisor, (process, started) = _supervisor(monkeypatch, ready=True)
    supervisor._served = True
    supervisor._handle(process.sentinel)  # worker 0 died; its replacement waits
    assert not supervisor._workers[0].running and started == []
    supervisor._stopping = True  # SIGTERM before the replacement was started
    assert supervisor._watch() == 0


def test_a_stop_ends_a_worker_still_starting_with_sigterm_and_exits_0(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A worker reads no message before it is ready: before, the STOP waited in its pipe
    while it loaded and warmed up, and the supervisor killed it after drain + grace + 30 s
    and exited 1."""
    supervisor, (process, _) = _supervisor(monkeypatch, ready=False)
    supervisor._stopping = True
    assert supervisor._watch() == 0
    assert process.terminated and supervisor._workers[0].conn.sent == [STOP]
    ready, (ready_process, _) = _supervisor(monkeypatch, ready=True)
    ready._stopping = True
    assert ready._watch() == 1  # a ready worker is not terminated: -9 is not a clean stop
    assert not ready_process.terminated


def test_workers_run_their_share_of_the_cores_on_the_cpu_and_one_instance_on_cuda(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: the supervisor set every worker's instances to its share of the cores
    whatever the provider, so two workers on a 16-core GPU host ran 8 CUDA instances each."""
    monkeypatch.setattr("vae_server.workers.cores", lambda: 16)
    supervisor = Supervisor(load_settings(["--model-dir", "unused", "--workers", "2"], env={}))
    settings = supervisor.worker_settings
    assert (supervisor.cpu_share, settings.threads, settings.instances) == (8, 8, 0)
    assert with_instances(settings, CPU, supervisor.cpu_share).instances == 8
    assert with_instances(settings, CUDA, supervisor.cpu_share).instances == 0  # the runtime's 1
    chosen = replace(settings, instances=3)  # --instances 3: as asked, on either
    assert with_instances(chosen, CPU, 8).instances == with_instances(chosen, CUDA, 8).instances == 3


def test_a_worker_cut_off_mid_reply_leaves_the_scrape_to_the_others(monkeypatch) -> None:
    """Before: a reply shorter than its Content-Length raised http.client.IncompleteRead
    (not an OSError), and the whole scrape failed; a reply cut where a line ends parsed
    only while the scrape was being written, and failed every scrape after."""

    def cut_off(body: bytes, length: int) -> int:
        srv = socket.create_server(("127.0.0.1", 0))

        def serve() -> None:
            while True:
                conn, _ = srv.accept()
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (length, body))
                conn.close()

        threading.Thread(target=serve, daemon=True).start()
        return int(srv.getsockname()[1])

    whole = _exposition(5, 1, 0.25)
    short = cut_off(whole.encode(), len(whole) + 100)  # IncompleteRead
    garbage = b"# TYPE calls counter\ncalls_total{le"
    bad_line = cut_off(garbage, len(garbage))  # whole, and not an exposition
    texts = {9001: whole}
    merged = MergedMetrics(lambda: [(101, 9001), (102, short), (103, bad_line)],
                           timeout=5)
    plain_read = merged._read
    monkeypatch.setattr(merged, "_read",
                        lambda port: texts[port] if port in texts else plain_read(port))
    for _ in range(2):
        assert _values(merged)["calls_total"] == 5


def test_workers_metrics_are_read_side_by_side(monkeypatch) -> None:
    """Before: one after another under the lock, so N stopped workers cost N timeouts, past
    Prometheus's 10 s scrape timeout from five. Each read here waits until all have begun."""
    barrier = threading.Barrier(4, timeout=10)
    merged = MergedMetrics(lambda: [(100 + i, 9000 + i) for i in range(4)])

    def read(port: int) -> str:
        barrier.wait()  # BrokenBarrierError (a test failure) unless all four run at once
        return _exposition(1, 0, 0.0)

    monkeypatch.setattr(merged, "_read", read)
    assert _values(merged)["calls_total"] == 4

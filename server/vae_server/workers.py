"""`vae-server --workers N`: N serving processes on one port, one set of metrics for them all.

One Python process keeps about one core busy with gRPC whatever the machine has; workers are
the way past it on one host. The supervisor (this process) starts N workers, each a whole
server (its own batchers and model sessions) bound to the same port with SO_REUSEPORT, so
that the kernel spreads incoming connections over them, and:

- the port: before it starts a worker, the supervisor makes sure that no one else holds the
  port (a second `vae-server --workers N` would otherwise join the first one's sockets and
  take a share of its connections) and holds a lock on it for its whole life, so that two
  started at once cannot both pass; it fails as a lone server does on a busy port. Workers
  started again after a crash bind beside the others, as before.

- health: each worker warms up, says so, and waits; once all are ready the supervisor tells
  them to report SERVING, and when one dies it tells the others to report NOT_SERVING until
  its replacement is ready. A probe that reaches any worker learns whether all of them serve.
- metrics: each worker serves its own on a loopback port; the supervisor's metrics port
  merges them (metrics_merge): counters and histograms summed, so every metric reads as
  one server's would, and gauges summed, or where a sum means nothing, the min or max (the
  GPU's gauges, of one device that every worker reads, the max). Its own beside them:
  vae_workers{state="configured"|"ready"} and vae_worker_restarts_total. With
  --metrics-port -1 neither the supervisor nor the workers listen for metrics.
- SIGTERM (or SIGINT): every ready worker drains (NOT_SERVING, the drain delay, the grace),
  one still loading or warming up ends at once (calls it took while warming up, from
  clients that do not wait for SERVING, are cut off), and the supervisor exits once they
  all have, with status 0 if all of them did.
- a hung worker: the supervisor asks each ready worker's event loop to answer every few
  seconds; one that has not answered for --worker-timeout-s (a loop blocked, a process
  stopped) still holds its share of the port's connections, whose calls would wait for their
  deadlines, so it is killed, and started again as one that died.
- at start, a worker that fails before it is ready (a busy port, a model it cannot load)
  stops the whole server: the supervisor stops the others and exits with the worker's reason
  on one line and status 2, as a lone server would. So does one not ready
  --worker-start-timeout-s after it started (hung while loading or warming up, where it
  cannot answer yet): it is killed first.
- once the server has served, a worker that exits, or whose replacement fails in turn, is
  started again; after two in a row that each served less than STABLE_S (or never came up)
  the next waits 1 s first, and twice as long each time after, up to MAX_BACKOFF_S, so that
  a worker that keeps dying does not keep the cores busy reloading the model. A replacement
  serves the model the others serve or none: one that finds another at --model-dir (the
  files changed since the server started) says so and exits before it binds the port, and
  is tried again, so the server stays NOT_SERVING until the files are put back or it is
  restarted on them.
- a fault in the supervisor itself (a process it cannot start, a bug) drains the workers as
  a stop does: it never leaves them serving behind a supervisor that no longer watches them.
  A supervisor killed outright closes their pipes, and they drain; one whose event loop is
  blocked (it reads no pipe) is ended by a thread of its own a whole drain later.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from prometheus_client import PROCESS_COLLECTOR, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

from vae_core.host import cores
from vae_core.manifest import ManifestError, load_manifest
from vae_core.ports import bare_host, free_port, probe_bind
from vae_core.security import SecurityFileError
from vae_server.auth import TlsFiles, read_tls_files
from vae_server.config import Settings
from vae_server.metrics import CODE_LABELS, serve_metrics, where_metrics
from vae_server.runtime import CPU

log = logging.getLogger("vae_server.workers")

# Messages between the supervisor and a worker, over a pipe.
READY = "ready"  # worker -> supervisor, with its metrics port (None: no metrics)
FAILED = "failed"  # worker -> supervisor, with why it could not start
SERVING = "serving"  # supervisor -> worker: report SERVING
NOT_SERVING = "not_serving"  # report NOT_SERVING
STOP = "stop"  # drain and exit
PING = "ping"  # supervisor -> worker: answer PONG, from the event loop
PONG = "pong"  # worker -> supervisor

# A worker that lived less than this counts towards its replacement's wait.
STABLE_S = 30.0
MAX_BACKOFF_S = 30.0


# -- a worker ----------------------------------------------------------------------------------


def worker_main(settings: Settings, index: int, conn: multiprocessing.connection.Connection,
                version: str | None = None, cpu_share: int = 0,
                tls_files: TlsFiles | None = None) -> None:
    """A worker process: one server on the shared port, steered by the supervisor's pipe;
    it serves model `version` (the one the server started with) or none. On the CPU, unless
    --instances is set, it runs `cpu_share` instances of each model (its share of the
    cores); on CUDA, the one a lone server runs. With TLS, its certificate and key are
    `tls_files`, as the supervisor read them at its start: a worker started again later
    serves them too, never files changed since (another certificate on the same port, or a
    certificate without its key)."""
    import asyncio

    # Until it is ready, a worker reads no message, and a stop must not wait for the model to
    # load and warm up: SIGTERM (from the supervisor, or sent to the whole process group by
    # systemd or `timeout`) ends it at once, with status 0 (it reports NOT_SERVING until
    # ready: calls it took meanwhile came from clients that did not wait for SERVING).
    # SIGINT (Ctrl-C reaches the whole group) is the supervisor's to pass on: blocked by the
    # supervisor while this process started, it is unblocked once ignored. Once ready, both
    # drain the worker, as a lone server's.
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_when_orphaned(settings)
    # The environment is the supervisor's, one BLAS thread included (vae_server.__main__).
    logging.basicConfig(level=settings.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker {index} %(name)s: %(message)s")
    from vae_server import loops
    from vae_server.server import create_server, load_runtime

    def failed(why: str) -> None:
        with contextlib.suppress(OSError):  # a supervisor gone hears nothing
            conn.send((FAILED, why))

    async def serve() -> int:
        try:
            # Checked before the model loads (its manifest alone), and again once it has, before
            # the port is bound: no call may reach another model.
            if version is not None and (found := _version_at(settings)) != version:
                failed(_other_model(settings, found, version))
                return 2
            runtime = load_runtime(settings)
            if version is not None and runtime.spec.version != version:
                failed(_other_model(settings, runtime.spec.version, version))
                return 2
            running = await create_server(with_instances(settings, runtime.provider, cpu_share),
                                          runtime, reuse_port=True,
                                          metrics_addr="127.0.0.1", announce=False,
                                          tls_files=tls_files)
        except Exception as exc:
            # What stops a lone server's start with one line (a busy port, a model it
            # cannot load) is said by the supervisor, once; anything else is logged here too.
            expected = isinstance(exc, (RuntimeError, OSError, ManifestError))
            if not expected:
                logging.getLogger("vae_server").exception("could not start")
            failed(str(exc) if expected else f"{type(exc).__name__}: {exc}")
            return 2
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_message() -> None:
            try:
                message = conn.recv()
            except EOFError:  # the supervisor is gone: drain
                loop.remove_reader(conn.fileno())
                stop.set()
                return
            if message == STOP:
                stop.set()
            elif message == PING:
                with contextlib.suppress(OSError):
                    conn.send((PONG, None))
            else:
                asyncio.ensure_future(running.set_serving(message == SERVING))

        loop.add_reader(conn.fileno(), on_message)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            conn.send((READY, running.metrics_port))
        except OSError:  # the supervisor died while this one started: nothing to serve for
            stop.set()
        await stop.wait()
        await running.stop(settings.grace_seconds, settings.drain_delay_s)
        return 0

    code = loops.run(serve(), settings.event_loop)
    if code:
        sys.exit(code)


def _exit_when_orphaned(settings: Settings, every: float = 1.0) -> None:
    """A worker whose supervisor died (SIGKILL, a crash) drains when its pipe closes; one
    whose event loop is blocked never reads that, and went on holding its share of the port
    (a new server could not bind it, the connections the kernel gave it waited out their
    deadlines). A thread of its own ends it a whole drain after the supervisor is gone."""
    from vae_server.server import FINISH_SECONDS

    parent = multiprocessing.parent_process()
    supervisor = parent.pid if parent is not None else os.getppid()
    drain = settings.drain_delay_s + settings.grace_seconds + FINISH_SECONDS + 5.0

    def watch() -> None:
        while os.getppid() == supervisor:
            time.sleep(every)
        time.sleep(drain)
        log.error("the supervisor is gone and this worker did not stop in %.0f s: exiting",
                  drain)
        os._exit(1)

    threading.Thread(target=watch, name="vae-orphan-watch", daemon=True).start()


def with_instances(settings: Settings, provider: str, cpu_share: int) -> Settings:
    """A worker's settings once it knows its provider: where --instances is unset, on the CPU
    its share of the cores (a lone server's default, one per core, would have N workers run
    N times as many as there are cores); elsewhere the provider's default (one on CUDA)."""
    if provider == CPU and not settings.instances and cpu_share:
        return replace(settings, instances=cpu_share)
    return settings


def _version_at(settings: Settings) -> str:
    return str(load_manifest(settings.model_dir, verify_hashes=False)["model_version"])


def _other_model(settings: Settings, found: str, version: str) -> str:
    return (f"{settings.model_dir} holds model {found} now, not {version}, which the server "
            "started with and its other workers serve: put its files back, or restart the "
            "server to serve the new model")


# -- the port ----------------------------------------------------------------------------------


def claim_port(host: str, port: int) -> socket.socket | None:
    """Refuse `host`:`port` (as --host and --port are written) if another process holds it,
    and return a lock on it that the caller keeps while its workers serve there (None where
    the platform has no abstract sockets). The workers bind with SO_REUSEPORT, which would
    let them join the sockets of another server that did the same; so first a lock, one per
    address and port, that a second supervisor cannot take, then a bind of the port without
    SO_REUSEPORT, which fails while anything listens there (on that address, or on every
    address where `host` is one). Both raise a RuntimeError that vae-server prints on one
    line."""
    address = f"{host}:{port}"
    lock = None
    if sys.platform.startswith("linux"):
        lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            lock.bind(f"\0vae-server-workers:{bare_host(host)}:{port}")
        except OSError:
            lock.close()
            raise RuntimeError(f"could not bind {address}: another vae-server --workers "
                               "serves it") from None
    try:
        probe_bind(host, port, address)
    except BaseException:
        if lock is not None:
            lock.close()
        raise
    return lock


# -- the supervisor ----------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    metrics_port: int | None = None  # its loopback metrics port, once ready (None: off)
    ready: bool = False  # warmed up
    failure: str | None = None  # why it could not start, as it said
    heard: float = 0.0  # when it last sent anything (time.monotonic())
    asked: bool = False  # a PING not yet answered (one at a time: a pipe's buffer is finite)
    killed: bool = False  # by the supervisor, as hung
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None  # when it said it was ready
    streak: int = 0  # the workers before it in its place that each served under STABLE_S
    restart_at: float | None = None  # exited: when to start its replacement

    @property
    def running(self) -> bool:
        return self.restart_at is None


class Supervisor:
    """Starts and watches the workers; see the module's docstring."""

    def __init__(self, settings: Settings) -> None:
        self.count = settings.worker_count
        port = settings.port or free_port()  # the workers must agree on one port
        # The workers' own metrics ports are loopback ones; the supervisor serves the merge.
        # Each takes its share of the cores for its ONNX Runtime threads, and on the CPU for
        # its instances (worker_main), unless they are set.
        self.cpu_share = max(1, cores() // self.count)
        # With the metrics off (-1), the workers' are off too: nothing would read them.
        self.worker_settings = replace(settings, port=port,
                                       metrics_port=-1 if settings.metrics_port < 0 else 0,
                                       workers="1",
                                       threads=settings.threads or self.cpu_share)
        self.settings = settings
        self.port = port
        try:  # checked as a pair by load_settings
            self.tls_files = read_tls_files(settings)
        except SecurityFileError as exc:  # gone since: one line, as a lone server's
            raise RuntimeError(str(exc)) from None
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        # Set by the signal handler, read by the main loop: a plain flag, as the handler must
        # take no lock (_on_signal).
        self._stopping = False
        self._serving = False
        self._served = False  # every worker has been ready at once: the start is over
        self.version: str | None = None  # the model's, as the server started
        self.failed = False
        self.failure: str | None = None  # a worker's start-up failure, as it said it
        self.metrics_port: int | None = None
        self._http: Any = None
        self.registry = CollectorRegistry(auto_describe=False)
        # The supervisor's own CPU, memory and file descriptors are the server's too.
        self.merged = MergedMetrics(self.ready_workers, own=PROCESS_COLLECTOR)
        self.registry.register(self.merged)
        workers = Gauge("vae_workers", "Serving processes of this server (--workers): "
                        "configured, and ready (warmed up; SERVING once all are).", ("state",),
                        registry=self.registry)
        workers.labels("configured").set(self.count)
        workers.labels("ready").set_function(lambda: sum(w.ready for w in self._workers))
        self.restarts = Counter("vae_worker_restarts", "Replacement workers started: for a "
                                "worker that exited or was killed as hung, or for a "
                                "replacement that failed in turn.", registry=self.registry)

    def _start(self, index: int) -> _Worker:
        parent, child = self._context.Pipe()
        process = self._context.Process(target=worker_main,
                                        args=(self.worker_settings, index, child, self.version,
                                              self.cpu_share, self.tls_files),
                                        name=f"vae-worker-{index}", daemon=False)
        # A Ctrl-C (to the whole group) while the new process starts Python and imports its
        # modules, before worker_main ignores it, would end it with a traceback: SIGINT waits,
        # blocked, until then (the mask passes through fork and exec).
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            child.close()
        return _Worker(index, process, parent)

    def _running(self) -> list[_Worker]:
        """The workers whose process runs (not those waiting to be started again)."""
        return [w for w in self._workers if w.running]

    def _broadcast(self, message: str) -> None:
        for w in self._running():
            with contextlib.suppress(OSError):  # one that is gone: its sentinel says so
                w.conn.send(message)

    @staticmethod
    def _drain(w: _Worker) -> None:
        """Read what a worker that exited sent last (its reason, if it said one)."""
        with contextlib.suppress(OSError, EOFError, ValueError, TypeError):
            while w.conn.poll():
                kind, value = w.conn.recv()
                if kind == FAILED:
                    w.failure = value

    def ready_workers(self) -> list[tuple[int, int]]:
        """(pid, metrics port) of each ready worker."""
        return [(w.process.pid or 0, w.metrics_port) for w in self._workers
                if w.ready and w.metrics_port is not None]

    def run(self) -> int:
        """Serve until SIGTERM or SIGINT: 0 if every worker drained. A start that fails
        raises a RuntimeError or ManifestError (vae-server prints it on one line)."""
        # A model it cannot serve stops it here, once; every worker must serve this one.
        self.version = str(load_manifest(self.settings.model_dir)["model_version"])
        lock = claim_port(self.settings.host, self.port)
        try:
            if self.settings.metrics_port >= 0:
                self._http = serve_metrics(self.settings.metrics_port, self.settings.host,
                                           self.registry)
                self.metrics_port = self._http.server_port
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)
            try:
                for i in range(self.count):
                    self._workers.append(self._start(i))
            except Exception as exc:  # fork refused (a process limit, memory): stop those up
                self.failure = f"worker {len(self._workers)} could not be started: {exc}"
                self.failed = self._stopping = True
            else:
                log.info("%d workers on port %d, metrics %s", self.count, self.port,
                         where_metrics(self.metrics_port))
            code = self._watch()
        finally:
            if self._http is not None:
                self._http.shutdown()
                self._http.server_close()
            if lock is not None:
                lock.close()
        if self.failure is not None:
            raise RuntimeError(self.failure)
        return code

    def _on_signal(self, signum: int, frame: object) -> None:
        """SIGTERM or SIGINT: stop. Python runs a handler between two bytecodes of the main
        thread, which may be inside this handler's own work for a signal just before (signals
        sent together: `timeout` sends one to the process and one to its group, Ctrl-C twice):
        so it takes no lock. With threading.Event.set, the second one waited for the lock
        that the first held, forever, and the server never stopped."""
        self._stopping = True

    def _watch(self) -> int:
        timeout, pinged = self.settings.worker_timeout_s, time.monotonic()  # 0: no watch
        while not self._stopping:
            try:
                running = self._running()
                waitables: list[Any] = [w.conn for w in running]
                waitables += [w.process.sentinel for w in running]
                for ready in multiprocessing.connection.wait(waitables, timeout=0.2):
                    self._handle(ready)
                self._restart_due(time.monotonic())
                self._check_starting(time.monotonic())
                if timeout and time.monotonic() - pinged >= min(5.0, timeout / 4):
                    pinged = time.monotonic()
                    self._check_hung(pinged)
            except Exception:  # never leave the workers serving unwatched: drain them
                log.exception("the supervisor failed: draining its workers")
                self.failed = True
                break
        if self.failed:
            log.info("stopping the other workers")
        else:
            log.info("signal received: draining %d workers", len(self._running()))
        self._broadcast(STOP)
        for w in self._running():
            if not w.ready:  # it reads no message until it is ready: SIGTERM ends it now
                with contextlib.suppress(OSError):
                    w.process.terminate()
        deadline = time.monotonic() + (self.settings.drain_delay_s
                                       + self.settings.grace_seconds + 30.0)
        for w in self._running():
            w.process.join(max(0.0, deadline - time.monotonic()))
        # The status is of the workers asked to stop, not of one that died before (its
        # replacement waiting to be started): that exit was handled when it came.
        codes, clean = [], True
        for w in self._running():
            if w.process.is_alive():
                log.error("worker %d did not stop in time: killed", w.index)
                w.process.kill()
                w.process.join()
            codes.append(w.process.exitcode)
            # Still starting (no message read since the stop), it may be ended by the SIGTERM
            # before it could take it.
            clean &= w.process.exitcode == 0 or (
                not w.ready and w.process.exitcode == -signal.SIGTERM)
        log.info("stopped (worker exit codes %s)", codes)
        if self.failure is not None:
            return 2
        return 0 if clean and not self.failed else 1

    @staticmethod
    def _kill(w: _Worker) -> None:
        """Kill a worker found hung; its sentinel then says what follows."""
        w.killed = True
        with contextlib.suppress(OSError):
            w.process.kill()

    def _check_starting(self, now: float) -> None:
        """Kill each worker not ready --worker-start-timeout-s after it started: its sentinel
        then stops the server, with this reason, as for a worker that could not start."""
        limit = self.settings.worker_start_timeout_s
        for w in self._running():
            if limit and not w.ready and not w.killed and now - w.started > limit:
                log.error("worker %d is not ready %.0f s after it started: killed", w.index,
                          now - w.started)
                w.failure = f"not ready within --worker-start-timeout-s {limit:g}"
                self._kill(w)

    def _check_hung(self, now: float) -> None:
        """Kill each ready worker that has not answered for the timeout (its sentinel then
        starts another), and ask the others to answer."""
        for w in self._running():
            if not w.ready or w.killed:
                continue
            if now - w.heard > self.settings.worker_timeout_s:
                log.error("worker %d has not answered for %.0f s: killed, to be started "
                          "again", w.index, now - w.heard)
                self._kill(w)
                continue
            if not w.asked:
                w.asked = True
                with contextlib.suppress(OSError):
                    w.conn.send(PING)

    def _handle(self, ready: Any) -> None:
        for i, w in enumerate(self._workers):
            if ready is w.conn:
                try:
                    kind, value = w.conn.recv()
                except (EOFError, OSError):
                    # Gone: its sentinel reports the exit. A socket pair reads as reset, not
                    # as closed, when the process died with our messages still unread.
                    continue
                w.heard, w.asked = time.monotonic(), False
                if kind == FAILED:
                    w.failure = value
                elif kind == READY:
                    w.metrics_port, w.ready, w.ready_at = value, True, time.monotonic()
                    if all(x.ready for x in self._workers) and not self._serving:
                        self._serving = self._served = True
                        self._broadcast(SERVING)
                        log.info("SERVING: %d workers ready on port %d", self.count,
                                 self.port)
            elif ready == w.process.sentinel and not self._stopping:
                self._exited(i, w)

    def _exited(self, i: int, w: _Worker) -> None:
        # The sentinel can fire before the process is reaped, and until it is, exitcode
        # reads None: join it first.
        w.process.join()
        if w.failure is None:
            self._drain(w)
        why = f" ({w.failure})" if w.failure is not None else ""
        if not w.ready and not self._served:
            # It never came up at start: its replacement would not either.
            if w.failure is not None and self.failure is None:
                self.failure = f"worker {w.index} could not start: {w.failure}"
            log.error("worker %d exited with %s before it was ready: stopping%s",
                      w.index, w.process.exitcode, why)
            self.failed = True
            self._stopping = True
            return
        if w.ready:
            log.error("worker %d exited with %s: NOT_SERVING until its replacement is ready",
                      w.index, w.process.exitcode)
        else:
            log.error("worker %d exited with %s before it was ready%s", w.index,
                      w.process.exitcode, why)
        w.conn.close()
        if w.process.pid is not None:
            self.merged.retire(w.process.pid)
        now = time.monotonic()
        # One that never came up counts as a quick exit, however long it took to fail.
        served = now - w.ready_at if w.ready_at is not None else 0.0
        streak = 0 if served >= STABLE_S else w.streak + 1
        self._workers[i] = replace(w, ready=False, streak=streak,
                                   restart_at=now + self._backoff(w.index, streak))
        self._serving = False
        self._broadcast(NOT_SERVING)

    @staticmethod
    def _backoff(index: int, streak: int) -> float:
        """How long to wait before starting a worker whose last `streak` predecessors each
        served under STABLE_S (or never): none after the first of them, then 1 s, doubling up
        to MAX_BACKOFF_S."""
        if streak <= 1:
            return 0.0
        delay = min(MAX_BACKOFF_S, 2.0 ** (streak - 2))
        log.warning("worker %d: %d in a row served under %.0f s: starting the next in %.0f s",
                    index, streak, STABLE_S, delay)
        return delay

    def _restart_due(self, now: float) -> None:
        """Start each exited worker's replacement once its wait is over."""
        for i, w in enumerate(self._workers):
            if w.restart_at is None or now < w.restart_at:
                continue
            try:
                new = self._start(w.index)
            except Exception as exc:  # fork refused: try again later, as for a quick exit
                log.error("worker %d could not be started again: %s", w.index, exc)
                w.streak += 1
                w.restart_at = now + self._backoff(w.index, w.streak)
                continue
            new.streak = w.streak
            self._workers[i] = new
            self.restarts.inc()


def supervise(settings: Settings) -> int:
    return Supervisor(settings).run()


# -- one set of metrics ------------------------------------------------------------------------


# Samples that a sum would make meaningless: the earliest start, the largest limit.
_MIN = ("_created", "process_start_time_seconds")
# Each worker has its own queue, limited by its own --max-queue-images: the fullest one says
# how near the server is to refusing calls.
_MAX = ("process_max_fds", "vae_queue_depth", "vae_queue_occupancy_ratio",
        "vae_stream_unsent_images")
# Gauges of a whole device that every worker reads alike (NVML's utilisation and memory):
# the largest reading, not N times it.
_DEVICE = ("vae_gpu_",)


UNREAD = "vae_workers_unread"
UNREAD_HELP = ("Ready workers whose metrics could not be read at this scrape (stopped, or not "
               "answering): their counters count as last read and their gauges are stale.")


class MergedMetrics(Collector):
    """The workers' metrics as one server's: each worker's exposition read from its loopback
    port when scraped, samples of the same name and labels added up (info series, the same
    in every worker, kept once; start times, the earliest; limits, the largest). `own`, the
    supervisor's process collector, is merged the same way, so that process_* covers every
    process of the server.

    Counters, histograms and summaries never go down, as one server's do not: a worker that
    cannot be read at a scrape counts as it last read, and a worker that exits leaves what
    it last read to the sum (`retire`). Otherwise a restart would read as a counter reset,
    and rate() would add a false increase."""

    def __init__(self, workers: Callable[[], list[tuple[int, int]]], timeout: float = 2.0,
                 own: Collector | None = None) -> None:
        self._workers = workers  # (pid, metrics port) of each ready worker
        self._timeout = timeout
        self._own = own
        self._lock = threading.Lock()  # scrapes, and the supervisor's retire
        self._last: dict[int, list[Metric]] = {}  # each worker's families as last read, by pid
        self._retired = _Sum(cumulative_only=True)  # what the exited workers counted

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            total = _Sum()
            total.add(self._retired.metrics())
            if self._own is not None:
                total.add(self._own.collect())
            workers = self._workers()
            # Read side by side: a worker that does not answer (stopped, its loop blocked)
            # costs one timeout, not one each, against Prometheus's scrape timeout.
            with ThreadPoolExecutor(max(1, len(workers))) as pool:
                reads = [pool.submit(self._read_whole, port) for _, port in workers]
            unread = 0
            for (pid, port), read in zip(workers, reads, strict=True):
                try:
                    self._last[pid] = read.result()
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    # A worker restarting, or cut off mid-reply: the others still count, and
                    # it counts as last read.
                    unread += 1
                    log.warning("metrics of the worker on port %d unreadable: %s", port, exc)
                if pid in self._last:
                    total.add(self._last[pid])
            # Each method's UNAVAILABLE count at 0 until a worker's exit adds to it: a series
            # that first appears at N reads as no increase to rate() and to the alerts.
            metrics = total.metrics()
            total.add(_cut_off(metrics, zero=True))
            return [*total.metrics(), GaugeMetricFamily(UNREAD, UNREAD_HELP, value=unread)]

    def retire(self, pid: int) -> None:
        """The worker `pid` exited: what it counted stays in the sum, and the calls it had
        started and not ended at its last reading end UNAVAILABLE there (what their callers
        got, if the exit cut them off), so that started less handled counts only live calls
        and the crash counts as the fault it is. (What it counted after that reading is lost.)"""
        with self._lock:
            families = self._last.pop(pid, None)
            if families is not None:
                self._retired.add([*families, *_cut_off(families)])

    def _read(self, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                    timeout=self._timeout) as reply:
            return str(reply.read().decode("utf-8"))

    def _read_whole(self, port: int) -> list[Metric]:
        """A worker's metric families, parsed as they are read: one that does not parse (a
        reply cut short where a line ends) is unreadable, not kept to fail every scrape
        after."""
        return list(text_string_to_metric_families(self._read(port)))


# A call's start counts +1 toward its being open, its end -1.
_OPEN_SIGN = {"grpc_server_started_total": 1, "grpc_server_handled_total": -1}
UNAVAILABLE = CODE_LABELS[grpc.StatusCode.UNAVAILABLE]


def _cut_off(families: list[Metric], zero: bool = False) -> list[Metric]:
    """grpc_server_handled_total{grpc_code="Unavailable"} samples for the calls of one
    exposition that were started and not handled (none where every call had ended); with
    `zero`, a sample of 0 for every method started (a sum's base)."""
    open_calls: dict[tuple[tuple[str, str], ...], float] = {}
    documentation = ""
    for family in families:
        if family.name == "grpc_server_handled":
            documentation = family.documentation
        for sample in family.samples:
            sign = _OPEN_SIGN.get(sample.name)
            if sign:
                key = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "grpc_code"))
                open_calls[key] = open_calls.get(key, 0.0) + sign * sample.value
    cut = Metric("grpc_server_handled", documentation, "counter")
    for key, calls in open_calls.items():
        if calls > 0 or zero:
            cut.add_sample("grpc_server_handled_total", {**dict(key), "grpc_code": UNAVAILABLE},
                           0.0 if zero else calls)
    return [cut] if cut.samples else []


# Families whose samples only grow while a process runs.
_CUMULATIVE = ("counter", "histogram", "summary")


class _Sum:
    """Metric families of several processes, samples of the same name and labels merged as
    MergedMetrics says; `cumulative_only` keeps counters, histograms and summaries alone.

    The text format writes the `_created` samples of a counter or histogram X as a gauge
    family of their own, X_created; they are folded back into X (the earliest, as a start
    time), since beside a family X, OpenMetrics forbids a family X_created ("Clashing name"),
    and text-format exposition writes them out as X_created again."""

    def __init__(self, cumulative_only: bool = False) -> None:
        self._cumulative_only = cumulative_only
        self._families: dict[str, Metric] = {}
        self._values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}

    def add(self, families: Iterable[Metric]) -> None:
        families = list(families)  # one process's: X_created follows X
        cumulative = {f.name: f for f in families if f.type in _CUMULATIVE}
        for family in families:
            kind = family  # the family whose name, type and help the samples go under
            if family.type == "gauge" and family.name.endswith("_created"):
                kind = cumulative.get(family.name[:-len("_created")], family)
            if self._cumulative_only and kind.type not in _CUMULATIVE:
                continue
            self._families.setdefault(kind.name, Metric(kind.name, kind.documentation,
                                                        kind.type, kind.unit))
            series = self._values.setdefault(kind.name, {})
            info = kind.type in ("info", "stateset") or kind.name.endswith("_info")
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in series:
                    series[key] = sample.value
                elif info:  # the same series in every worker
                    series[key] = max(series[key], sample.value)
                elif sample.name.endswith(_MIN) or sample.name in _MIN:
                    series[key] = min(series[key], sample.value)
                elif sample.name in _MAX or sample.name.startswith(_DEVICE):
                    series[key] = max(series[key], sample.value)
                else:
                    series[key] = series[key] + sample.value

    def metrics(self) -> list[Metric]:
        out = []
        for name, kept in self._families.items():
            family = Metric(name, kept.documentation, kept.type, kept.unit)
            # OpenMetrics wants each series' samples together (a histogram's buckets, count,
            # sum and created), and the folded X_created samples came after all of X's.
            by_series: dict[Any, list[tuple[str, dict[str, str], float]]] = {}
            for (sample_name, labels), value in self._values[name].items():
                series = tuple(kv for kv in labels if kv[0] not in ("le", "quantile"))
                by_series.setdefault(series, []).append((sample_name, dict(labels), value))
            for samples in by_series.values():
                for sample in samples:
                    family.add_sample(*sample)
            out.append(family)
        return out


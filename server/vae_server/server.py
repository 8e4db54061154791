"""Build and run the gRPC server: VaeService, health, reflection, metrics, graceful stop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from vae_core.host import quota_cores
from vae_core.ports import keepalive_options, probe_bind
from vae_proto import vae_pb2
from vae_server import loops
from vae_server.auth import TlsFiles, TokenCheck, describe, guard_handlers, server_credentials
from vae_server.cardinality import one_request
from vae_server.config import Settings
from vae_server.instrument import InstrumentedServer
from vae_server.intake import server_ids, watch_intake
from vae_server.metrics import Metrics, serve_metrics, where_metrics
from vae_server.runtime import ModelRuntime
from vae_server.servicer import VaeServicer

log = logging.getLogger("vae_server")
SERVICE_NAME = vae_pb2.DESCRIPTOR.services_by_name["VaeService"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
# The health service name of liveness probes: SERVING from the start to the exit, drain
# included ("" and vae.v1.VaeService say whether to send calls: readiness).
LIVENESS = "liveness"
# After the grace: how long the calls whose queued work was refused, and the runs under way,
# have to end by themselves before whatever is left is cancelled.
FINISH_SECONDS = 5.0
# How often a stopping server looks whether its event loop has taken the calls waiting in
# gRPC, and how long the loop, free, must take none for nothing to be waiting: calls reach
# the loop in spurts, with pauses of over 10 ms between them in a burst.
TAKE_POLL_S = 0.01
QUIET_S = 0.1
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    health: health_aio.HealthServicer
    servicer: VaeServicer
    metrics: Metrics
    executor: concurrent.futures.ThreadPoolExecutor
    metrics_http: WSGIServer | None = None
    # The calls gRPC has received (intake.py); None where channelz cannot say.
    received: Callable[[], int] | None = None
    draining: bool = False

    async def set_serving(self, serving: bool) -> None:
        """Readiness: whether "" and vae.v1.VaeService report SERVING (never again once the
        drain has begun)."""
        if self.draining:
            return
        status = SERVING if serving else NOT_SERVING
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def stop(self, grace: float, drain_delay: float = 0.0) -> None:
        """NOT_SERVING; for `drain_delay` seconds go on taking calls (load balancers and
        clients stop sending meanwhile); take the calls still waiting in gRPC, serving them
        for up to half the grace and refusing the rest with UNAVAILABLE; then refuse new
        calls, and let calls in flight finish within what is left of `grace`."""
        await self.set_serving(False)
        self.draining = True
        if drain_delay > 0:
            await asyncio.sleep(drain_delay)
        # The calls waiting in gRPC: served for up to half the grace, the rest refused.
        start = time.monotonic()
        await self.take_waiting_calls(grace / 2)
        self.servicer.refusing = True
        await self.take_waiting_calls((grace - (time.monotonic() - start)) / 2)
        grace = max(0.0, grace - (time.monotonic() - start))
        # stop() refuses new calls at once, then waits for every call in flight, health
        # Watch streams included, which never end by themselves: so once the vae.v1 calls
        # are done (or the grace is over), a second stop() cancels whatever remains.
        stopping = asyncio.ensure_future(self.server.stop(grace))
        await asyncio.sleep(0)
        await self.servicer.wait_idle(grace)
        # Work still queued when the grace is over is refused as UNAVAILABLE (a client
        # retries it elsewhere), and the calls it belonged to end by themselves, as do those
        # whose runs are under way: gRPC's cancellation of a call whose handler goes on
        # afterwards is what grpc.aio is fragile with (it can crash in stop()).
        await self.servicer.close()
        await self.servicer.wait_idle(FINISH_SECONDS)
        await self.server.stop(0)
        await stopping
        self.executor.shutdown(wait=False, cancel_futures=True)
        if self.metrics_http is not None:
            self.metrics_http.shutdown()
            self.metrics_http.server_close()

    async def take_waiting_calls(self, limit: float) -> None:
        """Let the event loop take the calls gRPC has received, for at most `limit` seconds.
        Calls wait in gRPC until the loop takes them (a burst outruns it), and stop() would
        cancel them: CANCELLED, which clients rarely retry, though they were sent while the
        server was taking calls. Done once as many calls have started as had been received
        when this began (where channelz can say), or once the loop, free, has taken none for
        QUIET_S (some received calls never start: one that ended in gRPC, or named an unknown
        method)."""
        received: float = float("inf")  # without channelz, the quiet loop alone tells
        if self.received is not None:
            with contextlib.suppress(Exception):  # as a scrape goes on without it
                received = self.received()
        until = time.monotonic() + limit
        started = self.metrics.calls_started()
        quiet = 0.0  # how long the loop, free, has taken no call
        while started < received and time.monotonic() < until:
            slept = time.monotonic()
            await asyncio.sleep(TAKE_POLL_S)
            took = time.monotonic() - slept
            now = self.metrics.calls_started()
            quiet = quiet + took if now == started and took < 2 * TAKE_POLL_S else 0.0
            if quiet >= QUIET_S:
                return
            started = now


# The longest service name a health call may ask about: ours are a few characters long.
MAX_HEALTH_SERVICE_NAME = 256


class Health(health_aio.HealthServicer):
    """grpc.health.v1 as grpcio serves it, and its List, which grpcio leaves unimplemented
    (UNIMPLEMENTED with a Python exception's text, and a traceback in the log at each call).

    Health answers callers without a token. A Watch of a service no one serves stays open,
    and grpcio keeps its name as long as it does: names of any length (up to the receive
    limit, 64 MiB) let such callers hold several times the bytes they send in memory. Names
    longer than any service's are refused."""

    @staticmethod
    async def _check_name(request: health_pb2.HealthCheckRequest,
                          context: grpc.aio.ServicerContext) -> None:
        if len(request.service) > MAX_HEALTH_SERVICE_NAME:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"service: {len(request.service)} characters; a service name "
                                f"is at most {MAX_HEALTH_SERVICE_NAME}")

    async def Check(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> health_pb2.HealthCheckResponse:
        await self._check_name(request, context)
        return await super().Check(request, context)

    async def Watch(self, request: health_pb2.HealthCheckRequest,
                    context: grpc.aio.ServicerContext) -> None:
        await self._check_name(request, context)
        await super().Watch(request, context)

    async def List(self, request: health_pb2.HealthListRequest,
                   context: grpc.aio.ServicerContext) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status)
            for name, status in self._server_status.items()})


MIN_CLIENT_PING_INTERVAL_MS = 5_000
SERVER_KEEPALIVE_MS = 60_000
SERVER_KEEPALIVE_TIMEOUT_MS = 20_000


def grpc_options(settings: Settings, reuse_port: bool = False) -> list[tuple[str, int]]:
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Workers share the port; a lone server must not share it with a stray process.
        ("grpc.so_reuseport", int(reuse_port)),
        # Clients ping while their calls are in flight (vae_client's keepalive, every 20 s),
        # to find a server that stopped answering; gRPC's default (one ping in 5 minutes
        # while the server sends nothing) would answer a long call's pings with GOAWAY.
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        # Some ping between calls too (grpc-go's PermitWithoutStream, meshes, pooled
        # channels): gRPC would take each such ping as abuse and, after three, close the
        # connection with GOAWAY "too_many_pings". Allowed at the same floor. (The server's
        # own keepalive pings then reach idle connections too; an idle connection still
        # ends at --max-connection-age-s where that is set.)
        ("grpc.keepalive_permit_without_calls", 1),
        # And the server's own, to find clients gone without a word, whose streams would
        # otherwise hold queue room until their connection's age ends them.
        *keepalive_options(SERVER_KEEPALIVE_MS, SERVER_KEEPALIVE_TIMEOUT_MS),
        # Calls the event loop has not taken yet wait in gRPC, which by default cancels some
        # past 1,000 of them and all past 3,000: a burst of calls would end CANCELLED, a code
        # that says the caller gave up, instead of reaching the queue, which serves them or
        # refuses them with RESOURCE_EXHAUSTED. Soft and hard bounds equal: none at random.
        ("grpc.server.max_pending_requests", settings.max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", settings.max_pending_calls),
    ]
    if settings.max_connections > 0:
        options.append(("grpc.max_allowed_incoming_connections", settings.max_connections))
    if settings.max_connection_age_s > 0:
        options += [
            ("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms",
             round(settings.max_connection_age_grace_s * 1000)),
        ]
    return options


class _UnsentReply(logging.Filter):
    """grpc.aio logs a reply it could not send as an ERROR with its traceback ("ExecuteBatchError
    raised in core by servicer method [...]"), although the call had ended already: its caller
    cancelled it or went away mid-stream, or refused a reply over its receive limit (4 MiB by
    default in most gRPC clients). That is one WARNING line here, naming the method."""

    PREFIX = "ExecuteBatchError raised in core by servicer method "

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith(self.PREFIX):
            method = message[len(self.PREFIX):].strip("[]")
            record.msg = ("a reply of %s was not sent: the call had ended (cancelled, or its "
                          "caller went away or refused a reply over its receive limit)")
            record.args = (method,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def _quiet_unsent_replies() -> None:
    logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _UnsentReply) for f in logger.filters):
        logger.addFilter(_UnsentReply())


def load_runtime(settings: Settings) -> ModelRuntime:
    """The model of --model-dir under ONNX Runtime, as the settings say."""
    # --threads 0: ONNX Runtime's own count, the machine's cores, unless a cgroup CPU quota (a
    # pod's limit) allows fewer.
    return ModelRuntime(settings.model_dir, settings.provider, settings.threads or quota_cores(),
                        settings.spinning, settings.io_binding, settings.cuda_graphs,
                        max_rows=settings.max_batch_size, small_rows=settings.inline_rows)


async def create_server(settings: Settings, runtime: ModelRuntime | None = None,
                        reuse_port: bool = False, metrics_addr: str | None = None,
                        announce: bool = True, tls_files: TlsFiles | None = None
                        ) -> RunningServer:
    """Load (unless given) and warm up the model, start gRPC and metrics; health is SERVING
    on return (unless not `announce`: a worker's supervisor says when). Bind port 0 to get a
    free port (returned); `reuse_port` lets workers share the port. Metrics listen on the
    gRPC port's --host unless `metrics_addr` says otherwise (a worker's, loopback)."""
    _quiet_unsent_replies()
    metrics = Metrics()
    metrics.initialize_grpc(vae_pb2.DESCRIPTOR.services_by_name["VaeService"])
    metrics.watch_event_loop(threading.get_ident())  # this coroutine runs on the loop's thread
    if runtime is None:
        runtime = load_runtime(settings)
    metrics.model_info.info({
        "model_version": runtime.spec.version,
        "likelihood": runtime.likelihood,
        "latent_dim": str(runtime.latent_dim),
        "sigma": str(runtime.sigma),
        "execution_provider": runtime.provider,
    })
    # Session runs and bulk numpy work leave the event loop for these threads: each model's
    # instances, and two for the streams' and LogLikelihood's work around the runs. The
    # servicer's batchers get the instance count resolved here, once.
    instances = runtime.instances(settings.instances)
    settings = dataclasses.replace(settings, instances=instances)
    executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=2 * instances + 2, thread_name_prefix="vae-run")
    servicer = VaeServicer(runtime, settings, metrics, executor)
    before = server_ids()
    server = grpc.aio.server(options=grpc_options(settings, reuse_port))
    # The calls gRPC receives, before the event loop takes them (intake.py).
    received = watch_intake(metrics.registry.register, before)
    # Every service registers through `services`, which counts and times each method.
    services = InstrumentedServer(server, metrics)
    handlers = servicer.handlers()
    if settings.auth_tokens:  # vae.v1 only: health and reflection stay open
        handlers = guard_handlers(SERVICE_NAME, handlers,
                                  TokenCheck(settings.auth_tokens, metrics))
    services.add_service(SERVICE_NAME, handlers, one_request)
    health = Health()
    health_pb2_grpc.add_HealthServicer_to_server(health, services)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        reflection.aio.ReflectionServicer(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME)), services)
    address = f"{settings.host}:{settings.port}"
    if settings.port and not reuse_port:
        # A busy port in one line (a worker's siblings share theirs: the supervisor probed).
        probe_bind(settings.host, settings.port, address)
    credentials = server_credentials(settings, tls_files)
    port = (server.add_secure_port(address, credentials) if credentials is not None
            else server.add_insecure_port(address))
    if port == 0:
        raise RuntimeError(f"could not bind {address}")
    log.info("gRPC port security: %s", describe(settings))
    if settings.auth_tokens and not settings.tls:
        log.warning("bearer tokens without TLS travel in clear text: use TLS, or a "
                    "TLS-terminating proxy in front of this port")
    metrics_port, http = None, None
    if settings.metrics_port >= 0:
        try:
            http = serve_metrics(settings.metrics_port, metrics_addr or settings.host,
                                 metrics.registry)
        except RuntimeError:
            executor.shutdown(wait=False)
            raise
        metrics_port = http.server_port
    running = RunningServer(server, port, metrics_port, health, servicer, metrics, executor,
                            http, received)
    await running.set_serving(False)
    await health.set(LIVENESS, SERVING)
    await server.start()
    log.info("gRPC on port %d, metrics %s; warming up", port,
             where_metrics(metrics_port))
    loop = asyncio.get_running_loop()
    sizes = sorted({1, 16, min(256, settings.max_batch_size), settings.max_batch_size})
    for _ in range(max(1, settings.warmup_rounds)):
        await loop.run_in_executor(executor, runtime.warm_up, sizes,
                                   sorted({1, 16, runtime.small_rows}))
    if announce:
        await running.set_serving(True)
    log.info("%s model %s on %s, %d instance(s) per model, event loop %s",
             "SERVING" if announce else "ready:", runtime.spec.version, runtime.provider,
             instances, loops.running_loop_name())
    return running


async def serve(settings: Settings) -> int:
    """One serving process until SIGTERM or SIGINT, then the drain: NOT_SERVING, the drain
    delay, the grace. (--workers > 1: vae_server.workers runs several of them.)"""
    running = await create_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("signal received: NOT_SERVING; taking calls for %.1f s more, then finishing "
             "those in flight (grace %.1f s)", settings.drain_delay_s, settings.grace_seconds)
    await running.stop(settings.grace_seconds, settings.drain_delay_s)
    log.info("stopped")
    return 0

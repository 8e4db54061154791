"""Helpers that run a real vae-server for tests: in a thread of this process (so tests can
look at its batchers), or as a subprocess (so tests can signal it)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from vae_core.ports import free_port
from vae_proto import vae_pb2
from vae_server.config import load_settings
from vae_server.server import RunningServer, create_server

VENV_BIN = Path(sys.executable).parent


def cuda_usable(model_dir: Path) -> bool:
    """CUDA runs here. onnxruntime-gpu lists its provider even where no GPU is usable, so a
    session's actual provider decides; a GPU it falls back from is a failure, not a skip."""
    import shutil

    import onnxruntime as ort
    import pytest

    from vae_server.runtime import CUDA, ModelRuntime, ProviderError

    if CUDA not in ort.get_available_providers():
        return False
    try:
        ModelRuntime(model_dir, provider="cuda", io_binding="off")
        return True
    except ProviderError:
        pass
    if Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None:
        pytest.fail("a GPU is present, but onnxruntime-gpu fell back to the CPU")
    return False


class ServerThread:
    """create_server() on an event loop of its own thread."""

    def __init__(self, model_dir: Path, **settings: Any) -> None:
        argv = ["--model-dir", str(model_dir), "--host", "127.0.0.1", "--port", "0",
                "--metrics-port", "-1", "--warmup-rounds", "1"]
        for key, value in settings.items():
            argv += ["--" + key.replace("_", "-"), str(value)]
        self.settings = load_settings(argv, env={})
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningServer = self.call(create_server(self.settings))
        self.target = f"127.0.0.1:{self.running.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        self.call(self.running.stop(grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@contextmanager
def server_thread(model_dir: Path, **settings: Any) -> Iterator[ServerThread]:
    srv = ServerThread(model_dir, **settings)
    try:
        yield srv
    finally:
        srv.stop()


def rss_mb(pid: int) -> float:
    """The resident memory of process `pid` in MB (VmRSS)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def health_status(target: str, service: str = "", timeout: float = 1.0) -> int | None:
    """The health status, or None if the server does not answer."""
    with grpc.insecure_channel(target) as ch:
        try:
            reply = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError:
            return None
        return reply.status


def start_server_process(model_dir: Path, port: int, *extra: str,
                         env: dict[str, str] | None = None,
                         script: Path | None = None) -> subprocess.Popen[str]:
    """vae-server, or the Python `script` that runs it, on loopback `port`."""
    program = [sys.executable, str(script)] if script else [str(VENV_BIN / "vae-server")]
    cmd = [*program, "--model-dir", str(model_dir), "--host", "127.0.0.1",
           "--port", str(port), "--metrics-port", "-1", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def wait_serving(target: str, proc: subprocess.Popen[str] | None = None,
                 timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {proc.stdout.read()}")
        if health_status(target) == health_pb2.HealthCheckResponse.SERVING:
            return
        time.sleep(0.05)
    raise TimeoutError(f"{target} not SERVING after {timeout} s")


def stop_process(proc: subprocess.Popen[str], timeout: float = 20.0) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout`."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextmanager
def served_process(model_dir: Path, *extra: str, timeout: float = 60.0
                   ) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """vae-server as a subprocess on a free port, SERVING on entry, stopped on exit:
    yields (target, process)."""
    port = free_port()
    target = f"127.0.0.1:{port}"
    proc = start_server_process(model_dir, port, *extra)
    try:
        wait_serving(target, proc, timeout=timeout)
        yield target, proc
    finally:
        stop_process(proc)


# -- replicas: several server processes, each with its metrics --------------------------

SERVICE = "vae.v1.VaeService"


class Replica:
    """A vae-server process on a port of its own, with its metrics port."""

    def __init__(self, model_dir: Path, port: int | None = None, *extra: str) -> None:
        self.model_dir = model_dir
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.extra = extra
        self.start()

    def start(self) -> None:
        self.proc = start_server_process(self.model_dir, self.port, "--metrics-port",
                                         str(self.metrics_port), *self.extra)
        wait_serving(f"127.0.0.1:{self.port}", self.proc)

    def handled(self, method: str) -> float:
        return handled(self.metrics_port, method)


def metric_total(port: int, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(s.value for family in text_string_to_metric_families(text)
               for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def handled(port: int, method: str) -> float:
    return metric_total(port, "grpc_server_handled_total", grpc_service=SERVICE,
                        grpc_method=method)


def target_of(replicas: list[Replica]) -> str:
    return "ipv4:" + ",".join(f"127.0.0.1:{r.port}" for r in replicas)


@contextmanager
def replicas(model_dir: Path, count: int, *extra: str) -> Iterator[list[Replica]]:
    with ExitStack() as stack:
        started = []
        for _ in range(count):
            r = Replica(model_dir, None, *extra)
            stack.callback(lambda r=r: stop_process(r.proc))
            started.append(r)
        yield started


@contextmanager
def held_decoder(srv: ServerThread, rows: int) -> Iterator[threading.Event]:
    """Hold `srv`'s decoder (one run at a time, `--instances 1`): its runs wait for the gate
    this yields, and two Decode calls of `rows` latents are sent, the first running (held),
    the second waiting in the queue. On the way out the gate opens and both calls must have
    been answered."""
    import numpy as np

    from vae_client import VaeClient

    gate = threading.Event()
    batcher = srv.running.servicer.decoder
    real_run = batcher._run

    entered = threading.Event()

    def held(z: Any) -> Any:
        entered.set()
        gate.wait(30)
        return real_run(z)

    batcher._run = held
    z = np.zeros((rows, srv.running.servicer.runtime.latent_dim), np.float32)
    answered: list[Any] = []

    def call() -> None:
        with VaeClient(srv.target, retries=0) as c:
            answered.append(c.decode(z))

    threads = [threading.Thread(target=call) for _ in range(2)]
    try:
        threads[0].start()  # the first runs (held) ...
        assert entered.wait(30)
        threads[1].start()  # ... the second waits in the queue
        wait_until(lambda: batcher.queued_images >= rows, timeout=30, every=0.005)
        assert batcher.queued_images == rows
        yield gate
    finally:
        gate.set()
        for t in threads:
            t.join(30)
    assert len(answered) == 2  # the calls that held the decoder were answered


@contextmanager
def stub_server(handlers: dict[str, grpc.RpcMethodHandler]) -> Iterator[str]:
    """A stand-in vae.v1 server on loopback whose methods are `handlers` (by name, with raw
    bytes in and out); yields its target."""
    from concurrent import futures

    handler = grpc.method_handlers_generic_handler("vae.v1.VaeService", handlers)
    server = grpc.server(futures.ThreadPoolExecutor(2), handlers=[handler])
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


@contextmanager
def refusing_server(method: str, code: grpc.StatusCode) -> Iterator[str]:
    """A stand-in vae.v1 server that says no limits (a model of 4 latents) and refuses every
    `method` call with `code`: a load that the load generator cannot tell will be refused
    (it refuses at once what a real server's limits would refuse); yields its target."""
    def info(raw: bytes, context: grpc.ServicerContext) -> bytes:
        return vae_pb2.ModelInfo(latent_dim=4, image_shape=[28, 28]).SerializeToString()

    def refuse(raw: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(code, "refused by the stand-in server")

    with stub_server({"GetModelInfo": grpc.unary_unary_rpc_method_handler(info),
                      method: grpc.unary_unary_rpc_method_handler(refuse)}) as target:
        yield target


@dataclass
class Supervised:
    proc: subprocess.Popen[str]
    target: str
    metrics_port: int
    log: list[str]

    def text(self) -> str:
        return "".join(self.log)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def worker_metrics_ports(self) -> list[int]:
        """Each worker's loopback metrics port, as its log names it."""
        return [int(m) for m in re.findall(r"worker \d+ vae_server: gRPC on port \d+, "
                                           r"metrics on port (\d+)", self.text())]


@contextmanager
def supervised(model_dir: Path, workers: int = 2, *flags: str,
               script: Path | None = None) -> Iterator[Supervised]:
    """`vae-server --workers N` (and `flags`) as a subprocess, SERVING; killed on the way out
    if it still runs. With `script`, the Python file that runs vae-server."""
    port, metrics_port = free_port(), free_port()
    proc = start_server_process(model_dir, port, "--metrics-port", str(metrics_port),
                                "--workers", str(workers), "--warmup-rounds", "1", *flags,
                                script=script)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        yield Supervised(proc, f"127.0.0.1:{port}", metrics_port, log)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        reader.join(10)


def after(setup: str, argv: list[str]) -> list[str]:
    """`argv` run by a fresh Python after the statements `setup` (a signal's disposition, a
    resource limit): what Popen's preexec_fn would do, but preexec_fn runs in a fork of this
    process, where gRPC (which the tests load) restarts its poller and aborts the child
    before exec once close_fds has closed its epoll fd (grpc/grpc#43055: vae-client "exited"
    with -6, "epoll_wait error: Bad file descriptor", once in a full run)."""
    script = f"import os, sys\n{setup}\nos.execv(sys.argv[1], sys.argv[1:])"
    return [sys.executable, "-c", script, *argv]


def check_sigterm_left_as_the_caller_set(run: Callable[[], int], seen: list[Any]) -> None:
    """A command's main (`run`, whose command is patched to append the SIGTERM handler it runs
    under to `seen`) raises on SIGTERM while it works (vae_core.signals.terminate), except where
    the caller ignores SIGTERM, and puts the caller's handler back after."""
    from vae_core.signals import terminate

    before = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: object) -> None:
        pass

    try:
        for caller, expected in ((handler, terminate), (signal.SIG_IGN, signal.SIG_IGN)):
            signal.signal(signal.SIGTERM, caller)
            assert run() == 0
            assert seen.pop() == expected
            assert signal.getsignal(signal.SIGTERM) == caller
    finally:
        signal.signal(signal.SIGTERM, before)


def run_cli(target: str, *args: str, expect: int = 0, timeout: float = 60,
            setup: str | None = None) -> subprocess.CompletedProcess[str]:
    """`vae-client --target TARGET ARGS...`, its output captured; its exit status must be
    `expect`. With `setup`, run after those statements (`after`)."""
    argv = [str(VENV_BIN / "vae-client"), "--target", target, *args]
    proc = subprocess.run(after(setup, argv) if setup else argv, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == expect, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen[str] | None = None,
               timeout: float = 60.0, what: str = "not reached in time",
               every: float = 0.05) -> None:
    """Poll `ready` until it holds; fail with `what` after `timeout` seconds, or at once if
    `proc` has exited."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc is None or proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, what
        time.sleep(every)

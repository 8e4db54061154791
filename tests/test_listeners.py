"""vae-server's listeners, as a program: a busy metrics port, the metrics port's address,
and `--workers N` on a port that another server holds, or with a worker that cannot start."""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from serving import VENV_BIN, ServerThread, start_server_process, wait_serving
from vae_core.ports import free_port

pytestmark = pytest.mark.e2e


@contextmanager
def listening(host: str = "127.0.0.1", reuse_port: bool = False) -> Iterator[int]:
    """A port that another process listens on; yields it."""
    with socket.socket() as other:
        if reuse_port:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind((host, 0))
        other.listen()
        yield other.getsockname()[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "vae-server"), "--host", "127.0.0.1",
                           "--warmup-rounds", "1", *argv],
                          capture_output=True, text=True, timeout=120)


def _one_line_exit_2(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("vae-server: ") and all(w in last for w in words), proc.stderr
    return last


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_busy_metrics_port_is_one_line_naming_it_and_exit_2(model_dir, workers):
    """Before: an OSError traceback and status 1, unlike a busy gRPC port."""
    with listening() as busy:
        proc = _run("--model-dir", str(model_dir), "--port", str(free_port()),
                    "--metrics-port", str(busy), "--workers", workers)
    _one_line_exit_2(proc, f"--metrics-port {busy}", "in use")


def test_the_metrics_listener_follows_host(model_dir):
    """Before: metrics always listened on 0.0.0.0, open to all with --host 127.0.0.1, and
    out of reach on an IPv6-only network."""
    srv = ServerThread(model_dir, metrics_port=0)  # --host 127.0.0.1
    try:
        assert srv.running.metrics_http is not None
        assert srv.running.metrics_http.server_address[0] == "127.0.0.1"
    finally:
        srv.stop()
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    srv = ServerThread(model_dir, metrics_port=0, host="[::1]")
    try:
        assert srv.running.metrics_http is not None
        assert srv.running.metrics_http.server_address[0] == "::1"
    finally:
        srv.stop()


def test_a_busy_grpc_port_is_one_line_with_its_reason(model_dir):
    """Before, without --workers: gRPC's own "E... add_port.cc:83] Failed to add port" line,
    then "Failed to bind to address ...; set GRPC_VERBOSITY=debug ..." without the reason."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run("--model-dir", str(model_dir), "--port", str(port), "--metrics-port", "-1")
    last = _one_line_exit_2(proc, f"could not bind 127.0.0.1:{port}", "Address already in use")
    assert not [line for line in proc.stderr.splitlines()
                if "add_port" in line or "GRPC_VERBOSITY" in line], proc.stderr
    assert last == f"vae-server: could not bind 127.0.0.1:{port}: Address already in use"


def test_a_second_workers_server_on_the_port_is_refused(model_dir):
    """Before: the second `vae-server --workers 2` bound beside the first one's workers
    (SO_REUSEPORT) and took a share of its connections. Also: with --metrics-port -1 no
    worker listens for metrics (before, each opened a loopback listener)."""
    port = free_port()
    first = start_server_process(model_dir, port, "--workers", "2", "--warmup-rounds", "1")
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(first.stdout), daemon=True)
    reader.start()
    try:
        wait_serving(f"127.0.0.1:{port}", first)
        second = _run("--model-dir", str(model_dir), "--port", str(port),
                      "--metrics-port", "-1", "--workers", "2")
        _one_line_exit_2(second, f"could not bind 127.0.0.1:{port}")
        assert "worker" not in second.stderr.split("could not bind")[0], second.stderr
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
        first.wait()
        reader.join(10)
    text = "".join(log)
    assert text.count("metrics off") == 3, text  # the supervisor and both workers


def test_a_worker_not_ready_in_time_stops_the_server_with_one_line(model_dir):
    """Before: a worker that hung while loading or warming up (here: a warm-up of 10^5
    rounds) was never watched, as it could not answer yet; the server stayed NOT_SERVING for
    ever (this test was cut by its 120 s timeout)."""
    proc = _run("--model-dir", str(model_dir), "--port", str(free_port()), "--metrics-port",
                "-1", "--workers", "2", "--worker-start-timeout-s", "2",
                "--warmup-rounds", "100000")
    _one_line_exit_2(proc, "could not start: not ready within --worker-start-timeout-s 2")


def test_a_worker_that_cannot_start_stops_the_server_with_one_line_and_status_2(model_dir):
    """Before: the supervisor said "signal received: draining" (there was none) and exited
    with 1 below the worker's traceback. The failure here is one that only a worker meets:
    --provider cuda where ONNX Runtime has no CUDA provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the workers would start")
    proc = _run("--model-dir", str(model_dir), "--port", str(free_port()), "--metrics-port",
                "-1", "--workers", "2", "--provider", "cuda")
    _one_line_exit_2(proc, "could not start", "--provider cuda")
    assert "signal received" not in proc.stderr, proc.stderr


def test_metrics_on_every_address_fall_back_to_ipv4_without_ipv6(monkeypatch):
    """On a kernel without IPv6 (ipv6.disable=1) gRPC takes "[::]", the default --host, as
    every IPv4 address; the metrics listener must too. Before, vae-server exited 2 there."""
    from prometheus_client import CollectorRegistry

    from vae_server.metrics import serve_metrics

    real = socket.socket

    class NoIPv6(real):  # type: ignore[misc, valid-type]
        def __init__(self, family: int = socket.AF_INET, *args: object, **kw: object) -> None:
            if family == socket.AF_INET6:
                raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
            super().__init__(family, *args, **kw)

    monkeypatch.setattr(socket, "socket", NoIPv6)
    http = serve_metrics(0, "[::]", CollectorRegistry())
    try:
        assert http.server_address[0] == "0.0.0.0"
    finally:
        http.shutdown()
        http.server_close()
    with pytest.raises(RuntimeError, match="--metrics-port 0: cannot listen on \\[::1\\]"):
        serve_metrics(0, "[::1]", CollectorRegistry())  # one address: no other to fall to


def test_workers_on_other_addresses_of_one_port_do_not_refuse_each_other():
    """The supervisor's lock is per address and port: before, one on 127.0.0.1:P refused a
    second on 127.0.0.2:P, where nothing listened."""
    from vae_server.workers import claim_port

    port = free_port()
    lock = claim_port("127.0.0.1", port)
    try:
        other = claim_port("127.0.0.2", port)
        if other is not None:
            other.close()
        with pytest.raises(RuntimeError, match="another vae-server --workers serves it"):
            claim_port("127.0.0.1", port)
    finally:
        if lock is not None:
            lock.close()

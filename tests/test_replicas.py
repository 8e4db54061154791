"""Replicas over loopback: several server processes behind one round_robin target, a server
killed or restarted under load, bulk sampling split over servers, and `--workers`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from prometheus_harness import Prometheus, dashboard_queries, has_finite_value, need_tool, scrape_config
from serving import (
    VENV_BIN,
    Replica,
    Supervised,
    free_port,
    handled,
    health_status,
    metric_total,
    replicas,
    supervised,
    target_of,
    wait_serving,
    wait_until,
)
from vae_client import VaeClient, VaeError
from vae_client.channel import CLIENT_KEEPALIVE_S, CLIENT_KEEPALIVE_TIMEOUT_S
from vae_core.onnx_model import OnnxVAE

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def trio(model_dir):
    with replicas(model_dir, 3) as rs:
        yield rs


@pytest.fixture(scope="module")
def reference(model_dir):
    return OnnxVAE(model_dir, threads=1)


def test_round_robin_reaches_every_server_of_the_target(trio, reference):
    before = [r.handled("Decode") for r in trio]
    z = np.random.default_rng(0).standard_normal((4, reference.latent_dim), dtype=np.float32)
    with VaeClient(target_of(trio), timeout=30) as client:
        for _ in range(30):
            np.testing.assert_array_equal(client.decode(z).reshape(4, -1), reference.decode(z))
    calls = [r.handled("Decode") - b for r, b in zip(trio, before, strict=True)]
    assert sum(calls) == 30
    assert all(c >= 5 for c in calls), calls  # round robin: about 10 each


class Load:
    """Calls of every kind from `threads` threads on one client until stopped; each reply is
    checked against the model run in process, and every failure is kept."""

    def __init__(self, target: str, reference: OnnxVAE, threads: int = 6) -> None:
        self.reference = reference
        self.client = VaeClient(target, timeout=60)
        self.failures: list[BaseException] = []
        self.done = 0
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)
        self.client.close()

    def _run(self, worker: int) -> None:
        ref = self.reference
        i = 0
        while not self._stop.is_set():
            i += 1
            seed = worker * 100_000 + i
            try:
                if i % 4 == 3:  # a stream long enough to be cut
                    got = np.concatenate([x for _, x in self.client.sample_stream(
                        4000, seed=seed, chunk_size=250)])
                    want = ref.sample(4000, seed)
                else:
                    got = self.client.sample(16, seed=seed)
                    want = ref.sample(16, seed)
                np.testing.assert_allclose(got.reshape(len(want), -1), want, atol=1e-6)
                self.done += 1
            except (VaeError, AssertionError) as exc:
                self.failures.append(exc)


def test_a_server_killed_mid_load_loses_no_call(model_dir, reference):
    """SIGKILL: the calls it held are retried by gRPC on the others, and streams it was
    sending resume by offset there, with the same images."""
    with replicas(model_dir, 3) as rs, Load(target_of(rs), reference) as load:
        time.sleep(3)
        assert load.done > 0
        rs[1].proc.kill()
        rs[1].proc.wait()
        done_at_kill = load.done
        time.sleep(4)
    assert not load.failures, load.failures[:3]
    assert load.done > done_at_kill  # the load went on over the two left


def streaming_replica(rs: list[Replica]) -> Replica:
    """The one server sending a stream: the one with a SampleStream started and not
    handled."""
    sending = [r for r in rs if metric_total(
        r.metrics_port, "grpc_server_started_total", grpc_method="SampleStream")
        > r.handled("SampleStream")]
    assert len(sending) == 1
    return sending[0]


STREAM_N, STREAM_CHUNK = 40_000, 500


def begin_stream(client: VaeClient, rs: list[Replica], seed: int
                 ) -> tuple[list[tuple[int, np.ndarray]], Iterator[tuple[int, np.ndarray]],
                            Replica]:
    """A uint8 stream of STREAM_N images begun: its first chunk, the rest of it, and the
    replica that sends it."""
    stream = client.sample_stream(STREAM_N, seed=seed, chunk_size=STREAM_CHUNK, dtype="uint8")
    chunks = [next(stream)]
    return chunks, stream, streaming_replica(rs)


def assert_whole_stream(chunks: list[tuple[int, np.ndarray]], reference: OnnxVAE,
                        seed: int) -> None:
    """Every image of the stream, in order, once, and byte for byte the model's."""
    want = np.rint(reference.sample(STREAM_N, seed) * 255).astype(np.uint8).reshape(
        STREAM_N, 28, 28)
    offsets = [o for o, _ in chunks]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)  # none twice
    got = np.concatenate([x for _, x in chunks])
    assert got.shape == want.shape and got.tobytes() == want.tobytes()


def test_a_stream_whose_server_is_killed_resumes_on_another_byte_for_byte(model_dir,
                                                                          reference):
    with replicas(model_dir, 3) as rs, VaeClient(target_of(rs), timeout=120) as client:
        chunks, stream, sending = begin_stream(client, rs, 21)
        sending.proc.kill()
        chunks.extend(stream)
        others = [r for r in rs if r is not sending]
        resumed = sum(metric_total(r.metrics_port, "grpc_server_started_total",
                                   grpc_method="SampleStream") for r in others)
    assert resumed == 1  # the rest of the stream came from another server, in one call
    assert_whole_stream(chunks, reference, 21)


# Its wait is the client's keepalive (30 s and more), with a margin of 30 s: it may share the
# machine.
@pytest.mark.concurrent
def test_a_stream_whose_server_hangs_resumes_on_another_byte_for_byte(model_dir, reference):
    """A server that stops answering (SIGSTOP: a hung host, or one cut off the network) does
    not close its connection, and a stream has no deadline by default: before, the client
    waited for the next chunk for ever. Its keepalive pings now find the connection dead
    (CLIENT_KEEPALIVE), and the stream resumes by offset on another server."""
    with replicas(model_dir, 2) as rs, VaeClient(target_of(rs), timeout=120) as client:
        chunks, stream, sending = begin_stream(client, rs, 22)
        other = next(r for r in rs if r is not sending)
        sending.proc.send_signal(signal.SIGSTOP)
        try:
            reader = threading.Thread(target=lambda: chunks.extend(stream), daemon=True)
            reader.start()
            reader.join(CLIENT_KEEPALIVE_S + CLIENT_KEEPALIVE_TIMEOUT_S + 30)
            assert not reader.is_alive(), f"the stream waited: {len(chunks)} chunks"
            resumed = metric_total(other.metrics_port, "grpc_server_started_total",
                                   grpc_method="SampleStream")
        finally:
            sending.proc.send_signal(signal.SIGCONT)
    assert resumed == 1  # the rest of the stream came from the other server, in one call
    assert_whole_stream(chunks, reference, 22)


def test_a_server_restarted_with_sigterm_under_load_fails_no_call(model_dir, reference):
    with replicas(model_dir, 2, "--drain-delay-s", "0.5", "--grace-seconds", "20") as rs:
        with Load(target_of(rs), reference) as load:
            time.sleep(3)
            rs[0].proc.send_signal(signal.SIGTERM)
            assert rs[0].proc.wait(60) == 0
            rs[0].start()  # the same port: clients reconnect to it
            # The restarted server takes its share again, once the clients' reconnection
            # backoff (1 s, then 1.6 times longer each try) has found it.
            wait_until(lambda: rs[0].handled("Sample") + rs[0].handled("SampleStream") > 0,
                       rs[0].proc, timeout=60, what="the restarted server took no call")
            time.sleep(1)  # the load on both servers for a moment
        assert not load.failures, load.failures[:3]


def test_bulk_sample_over_two_servers_equals_one_stream(trio, tmp_path):
    one, two = tmp_path / "one.npy", tmp_path / "two.npy"
    common = ["sample", "--n", "20000", "--seed", "11", "--digit", "3", "--dtype", "uint8",
              "--chunk-size", "1000", "--stream", "--no-progress"]
    before = [r.handled("SampleStream") for r in trio[:2]]
    subprocess.run([str(VENV_BIN / "vae-client"), "--target", f"127.0.0.1:{trio[2].port}",
                    *common, "--out", str(one)], check=True, timeout=300)
    subprocess.run([str(VENV_BIN / "vae-client"), "--target", target_of(trio[:2]), *common,
                    "--out", str(two)], check=True, timeout=300)
    assert one.read_bytes() == two.read_bytes()
    assert np.load(two).shape == (20000, 28, 28)
    # Two streams, one for each range. (Which servers they reached depends on which
    # connections were up when they started: round_robin picks among ready ones.)
    assert sum(r.handled("SampleStream") - b for r, b in zip(trio[:2], before, strict=True)) \
        == 2


def test_parallel_streams_are_spread_over_the_servers(trio):
    """Once the client's connections are up, round_robin gives each stream the next server."""
    with VaeClient(target_of(trio[:2]), timeout=60) as client:
        for _ in range(10):  # both connections in use
            client.info()
        before = [r.handled("SampleStream") for r in trio[:2]]
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            parts = list(pool.map(lambda lo: np.concatenate([x for _, x in client.sample_stream(
                lo + 3000, seed=4, chunk_size=500, offset=lo)]), (0, 3000)))
        whole = np.concatenate([x for _, x in client.sample_stream(6000, seed=4,
                                                                   chunk_size=500)])
    assert np.concatenate(parts).tobytes() == whole.tobytes()
    assert [r.handled("SampleStream") - b for r, b in zip(trio[:2], before, strict=True)] \
        in ([2, 1], [1, 2])  # the two parallel ones on different servers, then the whole


def worker_pids(supervisor: int) -> list[int]:
    """The supervisor's worker processes (its spawned children, not the resource tracker)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor and b"spawn_main" in cmdline:
            pids.append(int(entry.name))
    return sorted(pids)


def calls_on_every_worker(sup: Supervised, reference: OnnxVAE, workers: int = 2) -> list[int]:
    """The workers' metrics ports, once Decode calls have reached each of them: the kernel
    spreads connections, not calls, so each call comes on a new channel."""
    ports = sup.worker_metrics_ports()
    assert len(ports) == workers, sup.log
    z = np.zeros((1, reference.latent_dim), np.float32)
    for _ in range(200):
        with VaeClient(sup.target, timeout=30) as client:
            client.decode(z)
        if all(handled(p, "Decode") > 0 for p in ports):
            break
    assert all(handled(p, "Decode") > 0 for p in ports), [handled(p, "Decode") for p in ports]
    return ports


def test_workers_serve_one_port_sum_their_metrics_and_drain_on_sigterm(model_dir, reference):
    with supervised(model_dir) as sup:
        workers = calls_on_every_worker(sup, reference)
        per_worker = [handled(w, "Decode") for w in workers]
        assert handled(sup.metrics_port, "Decode") == sum(per_worker)
        assert metric_total(sup.metrics_port, "vae_model_info") == 1.0  # an info series, once
        # SIGTERM with calls in flight: every call ends OK, then both workers exit. The six
        # clients' channels share one connection (gRPC Python's global subchannel pool), so
        # one worker may hold all six: 8,000 rows each fit its queue together.
        results: list[object] = []

        def call(seed: int) -> None:
            with VaeClient(sup.target, timeout=60) as client:
                results.append(client.log_likelihood(
                    np.full((8, 784), 0.5, np.float32), k=1000, seed=seed))

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(call, s) for s in range(6)]
            # SIGTERM once all six are in flight (a call still connecting would be refused).
            wait_until(lambda: metric_total(sup.metrics_port, "vae_in_flight_calls") >= 6,
                       sup.proc, timeout=30, what="the six calls never were in flight together")
            sup.proc.send_signal(signal.SIGTERM)
            for f in futures:
                f.result(120)
        assert sup.proc.wait(60) == 0
        assert len(results) == 6
    assert "stopped (worker exit codes [0, 0])" in sup.text(), sup.text()[-2000:]


def scripted_workers(script: str, tmp_path: Path, model_dir: Path, port: int, *flags: str,
                     **popen: Any) -> subprocess.Popen[str]:
    """`vae-server --workers 2` on loopback `port`, run by the Python `script`, which changes
    something first (spawned workers import it as __mp_main__: module-level code runs in
    each), its output on stdout."""
    path = tmp_path / "server.py"
    path.write_text(script)
    return subprocess.Popen(
        [sys.executable, str(path), "--model-dir", str(model_dir), "--host", "127.0.0.1",
         "--port", str(port), "--metrics-port", "-1", "--workers", "2", "--warmup-rounds", "1",
         *flags], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# The end of a script that runs vae-server after its changes.
RUN_SERVER = """
if __name__ == "__main__":
    from vae_server.__main__ import main

    sys.argv[0] = "vae-server"
    sys.exit(main())
"""


# vae-server, with a second SIGTERM raised at the start of each function (once each) that runs
# while the supervisor handles a first one: as signals sent together land (`timeout` sends one
# to the process and one to its group; Ctrl-C twice). Spawned workers import this file as
# __mp_main__, hence the guard.
SIGNAL_WHILE_HANDLING = """
import atexit, signal, sys

from vae_server.__main__ import main

raised = set()


def tracer(frame, event, arg):
    if event != "call" or frame.f_code in raised:
        return None
    handler = signal.getsignal(signal.SIGTERM)
    code = getattr(getattr(handler, "__func__", handler), "__code__", None)
    f = frame
    while f is not None:
        if f.f_code is code:
            raised.add(frame.f_code)
            signal.raise_signal(signal.SIGTERM)
            break
        f = f.f_back
    return None


if __name__ == "__main__":
    atexit.register(lambda: print(f"signals raised while handling one: {len(raised)}"))
    sys.settrace(tracer)
    sys.argv[0] = "vae-server"
    sys.exit(main())
"""


def test_a_signal_that_lands_while_another_is_handled_still_stops_the_workers(model_dir,
                                                                             tmp_path):
    """Before: the supervisor's handler called threading.Event.set, and a second signal that
    landed inside it (Python runs handlers between bytecodes) waited for the lock the first
    held: the supervisor hung for good, its workers drained and left unreaped."""
    port = free_port()
    proc = scripted_workers(SIGNAL_WHILE_HANDLING, tmp_path, model_dir, port)
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    assert code == 0, out[-2000:]
    assert "stopped (worker exit codes [0, 0])" in out, out[-2000:]
    raised = re.search(r"signals raised while handling one: (\d+)", out)
    assert raised and int(raised.group(1)) >= 1, out[-2000:]  # the second signal did land


# vae-server whose workers, once loaded, say so in WARMING_DIR and take 60 s more to warm up
# (a large model, CUDA graphs); spawned workers import this file as __mp_main__, so the patch
# is made at module level.
SLOW_WARM_UP = """
import os, sys, time

from vae_server import runtime

plain_warm_up = runtime.ModelRuntime.warm_up


def slow(self, *args, **kwargs):
    open(os.path.join(os.environ["WARMING_DIR"], str(os.getpid())), "w").close()
    time.sleep(60)
    return plain_warm_up(self, *args, **kwargs)


runtime.ModelRuntime.warm_up = slow
""" + RUN_SERVER


@pytest.mark.parametrize("how", ["SIGTERM to the group", "SIGINT to the group",
                                 "SIGTERM to the supervisor"])
def test_a_stop_while_the_workers_warm_up_ends_them_at_once_with_status_0(model_dir,
                                                                         tmp_path, how):
    """systemd (KillMode=control-group), `timeout` and Ctrl-C signal every process of the
    group; an orchestrator, the supervisor alone. Before: workers still loading or warming up
    died of SIGTERM (status 1 for the server), printed KeyboardInterrupt tracebacks on
    SIGINT, or, asked through their pipe, went on warming up until the supervisor killed them
    after drain + grace + 30 s, and the server exited 1."""
    warming = tmp_path / "warming"
    warming.mkdir()
    proc = scripted_workers(SLOW_WARM_UP, tmp_path, model_dir, free_port(),
                            start_new_session=True,
                            env={**os.environ, "WARMING_DIR": str(warming)})
    try:
        wait_until(lambda: len(list(warming.iterdir())) == 2, proc, 60, "two workers warming up")
        sig = signal.SIGINT if how.startswith("SIGINT") else signal.SIGTERM
        (os.killpg if how.endswith("group") else os.kill)(proc.pid, sig)
        code = proc.wait(30)  # well under the 60 s of warm-up, and drain + grace + 30 s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    assert code == 0, out[-2000:]
    assert "Traceback" not in out and "did not stop in time" not in out, out[-2000:]


def test_a_worker_that_dies_is_replaced_counted_and_graphed(model_dir, reference, tmp_path):
    """SIGKILL one of two workers: health says NOT_SERVING until a new one is ready, the
    restart is counted, the merged counters keep what the dead worker counted, and the
    dashboard's workers queries read it all from a real Prometheus."""
    with supervised(model_dir) as sup:
        def workers(state: str) -> float:
            return metric_total(sup.metrics_port, "vae_workers", state=state)

        def restarts() -> float:
            return metric_total(sup.metrics_port, "vae_worker_restarts_total")

        assert (workers("configured"), workers("ready"), restarts()) == (2.0, 2.0, 0.0)
        calls_on_every_worker(sup, reference)  # whichever dies has counted some
        before = handled(sup.metrics_port, "Decode")
        prom = Prometheus(need_tool("prometheus"), scrape_config(sup.metrics_port, "1s"),
                          tmp_path / "prometheus")
        try:
            prom.wait_targets_up()
            pids = worker_pids(sup.proc.pid)
            assert len(pids) == 2, pids
            os.kill(pids[0], signal.SIGKILL)
            seen = set()
            deadline = time.monotonic() + 120
            while restarts() < 1 or workers("ready") < 2:
                assert time.monotonic() < deadline, sup.text()[-2000:]
                seen.add(health_status(sup.target))
                time.sleep(0.1)
            assert health_pb2.HealthCheckResponse.NOT_SERVING in seen, seen
            wait_serving(sup.target, sup.proc)
            now = worker_pids(sup.proc.pid)
            assert len(now) == 2 and pids[0] not in now and pids[1] in now, (pids, now)
            assert (workers("configured"), restarts()) == (2.0, 1.0)
            # No call since: the dead worker's calls are still counted (before, they
            # vanished with it, and Prometheus read a counter reset).
            assert handled(sup.metrics_port, "Decode") == before
            z = np.random.default_rng(0).standard_normal((4, reference.latent_dim),
                                                         dtype=np.float32)
            with VaeClient(sup.target, timeout=30) as client:
                np.testing.assert_array_equal(client.decode(z).reshape(4, -1),
                                              reference.decode(z))
            # Every workers query of the dashboard has data; the restart shows.
            queries = [q for q in dashboard_queries() if q.workers]
            assert queries

            def gaps() -> list[str]:
                return [f"{q.panel} [{q.ref_id}]: {q.expr}" for q in queries
                        if not has_finite_value(prom.query(q.expr))]

            restarted = 'sum(vae_worker_restarts_total{job="vae-server"})'
            deadline = time.monotonic() + 20
            while (gaps() or [r["value"][1] for r in prom.query(restarted)] != ["1"]) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
            assert not gaps(), gaps()
            assert [r["value"][1] for r in prom.query(restarted)] == ["1"]
        finally:
            prom.stop()
    assert re.search(r"worker \d exited with -9: NOT_SERVING until its replacement is ready",
                     sup.text()), sup.text()[-2000:]


# vae-server whose workers block their event loop on SIGUSR1 (a handler runs on the main
# thread, the loop's), as a hung worker's loop is blocked while its process runs; spawned
# workers import this file as __mp_main__, so the handler is set at module level.
BLOCKS_ON_SIGUSR1 = """
import signal, sys, time

signal.signal(signal.SIGUSR1, lambda signum, frame: time.sleep(3600))
""" + RUN_SERVER


def test_a_hung_worker_is_killed_and_replaced(model_dir, reference, tmp_path):
    """A worker whose event loop is blocked still holds its share of the port's connections,
    and their calls waited for their deadlines. Before, the supervisor never noticed; now it
    kills the worker once it has not answered for --worker-timeout-s, and starts another,
    which serves. (Not SIGSTOP: the kernel sends SIGHUP to a process group with a stopped
    member when the group is orphaned, and the worker may die of that first.)"""
    script = tmp_path / "server.py"
    script.write_text(BLOCKS_ON_SIGUSR1)
    with supervised(model_dir, 2, "--worker-timeout-s", "5", script=script) as sup:
        def restarts() -> float:
            return metric_total(sup.metrics_port, "vae_worker_restarts_total")

        pids = worker_pids(sup.proc.pid)
        assert len(pids) == 2, pids
        time.sleep(6)  # answering workers are left alone past the timeout
        assert restarts() == 0.0 and worker_pids(sup.proc.pid) == pids
        os.kill(pids[0], signal.SIGUSR1)  # its loop blocks
        deadline = time.monotonic() + 60
        while restarts() < 1 or metric_total(sup.metrics_port, "vae_workers",
                                             state="ready") < 2:
            assert time.monotonic() < deadline, sup.text()[-2000:]
            time.sleep(0.2)
        wait_serving(sup.target, sup.proc)
        now = worker_pids(sup.proc.pid)
        assert len(now) == 2 and pids[0] not in now and pids[1] in now, (pids, now)
        # Every new connection is served, the new worker's among them.
        z = np.zeros((2, reference.latent_dim), np.float32)
        for _ in range(10):
            with VaeClient(sup.target, timeout=10) as client:
                np.testing.assert_array_equal(client.decode(z).reshape(2, -1),
                                              reference.decode(z))
    assert re.search(r"worker \d has not answered for \d+ s: killed", sup.text()), \
        sup.text()[-2000:]


def test_a_hung_worker_left_by_a_dead_supervisor_exits_and_frees_the_port(model_dir, tmp_path):
    """Before: a worker learnt of its supervisor's death only from its pipe, read by its
    event loop; one whose loop was blocked stayed, listening, and a new server could not
    bind the port. Now it exits a whole drain after the supervisor is gone, and the worker
    that answers drains as before."""
    port = free_port()
    proc = scripted_workers(BLOCKS_ON_SIGUSR1, tmp_path, model_dir, port, "--drain-delay-s", "0",
                            "--grace-seconds", "1", "--worker-timeout-s", "0",
                            start_new_session=True)
    pids: list[int] = []
    try:
        wait_serving(f"127.0.0.1:{port}", proc)
        pids = worker_pids(proc.pid)
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGUSR1)  # its loop blocks
        time.sleep(0.5)
        proc.kill()  # the supervisor dies; the other worker reads its pipe's end
        proc.wait()

        def gone(pid: int) -> bool:
            """Exited, or a zombie (reaped by init soon) whose every thread has exited: a
            process's leader shows Z while its other threads exit, and they hold its files, its
            listening socket among them, until the last one has."""
            states = []
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
                except OSError:
                    continue  # a thread that has just exited
            return all(state == "Z" for state in states)

        # A whole drain: 0 + 1 s grace + 5 s to finish + 5 s to spare, after a 1 s poll.
        wait_until(lambda: all(gone(p) for p in pids), timeout=40,
                   what="a worker still alive 40 s after its supervisor died")
        # No one listens on the port any more: a new server binds it. SO_REUSEADDR, as every
        # server sets: the connections the workers closed may wait out TIME_WAIT on it.
        with socket.socket() as free:
            free.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                free.bind(("127.0.0.1", port))
            except OSError as exc:
                held = subprocess.run(["ss", "-tanp", f"sport = :{port}"], capture_output=True,
                                      text=True).stdout if shutil.which("ss") else ""
                raise AssertionError(f"port {port} still held: {exc}\n{held}") from exc
            free.listen()
    finally:
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = proc.stdout.read() if proc.stdout else ""
    assert "the supervisor is gone and this worker did not stop in 11 s: exiting" in out, \
        out[-2000:]


def test_a_replacement_serves_the_model_the_server_started_with_or_none(
        model_dir, bernoulli_model_dir, tmp_path):
    """Before: a worker started again loaded whatever --model-dir held then. With the files
    changed, one port served two models (another image for the same seed, by connection)
    while health said SERVING. Now a replacement that finds another model says so and exits
    before it binds the port, and is tried again: every call reaches the model the server
    started with, health says NOT_SERVING, and once the files are back the server serves."""
    served = tmp_path / "model"
    shutil.copytree(model_dir, served)
    version = OnnxVAE(served).spec.version
    other = OnnxVAE(bernoulli_model_dir).spec.version
    assert other != version

    def versions() -> set[str]:
        seen = set()
        for _ in range(6):  # a new connection each: the kernel spreads them over the workers
            with VaeClient(sup.target, timeout=30) as client:
                seen.add(client.info().model_version)
        return seen

    with supervised(served) as sup:
        pids = worker_pids(sup.proc.pid)
        assert len(pids) == 2, pids
        shutil.rmtree(served)
        shutil.copytree(bernoulli_model_dir, served)
        os.kill(pids[0], signal.SIGKILL)
        refusal = f"holds model {other} now, not {version}"
        wait_until(lambda: sup.text().count(refusal) >= 2, sup.proc, timeout=120,
                   what="the replacement did not refuse the new model twice")
        assert health_status(sup.target) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert versions() == {version}
        assert sup.proc.poll() is None  # the server goes on
        shutil.rmtree(served)
        shutil.copytree(model_dir, served)
        wait_serving(sup.target, sup.proc)
        assert len(worker_pids(sup.proc.pid)) == 2
        assert versions() == {version}

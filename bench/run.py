"""`make bench`: the service beside its limits, measured in one run on this machine.

Limits: in-process ONNX Runtime (compute) and a trivial grpc.aio echo server with the same
message sizes (transport). Then the real server with batching off and on. Every figure is
printed with its ratio to the limit it is measured against; the table and the raw results go
to --out (JSON and markdown).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vae_core.host import cores, one_blas_thread

one_blas_thread()  # as the server does, for the in-process limits too

import numpy as np  # noqa: E402

from vae_client.bench import BenchResult, run_bench  # noqa: E402
from vae_core.onnx_model import OnnxVAE  # noqa: E402
from vae_core.ports import free_port  # noqa: E402
from vae_proto import vae_pb2  # noqa: E402
from vae_server import loops  # noqa: E402
from vae_server.images import images_out  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def wait_ready(target: str, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until the server at `target` reports SERVING on grpc.health.v1 (vae-server does once
    it has warmed up, after it has begun to listen), or answers at all where it has no health
    service (the echo server). Raises RuntimeError if `proc` exits first, TimeoutError after
    `timeout` seconds."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before serving")
        # A channel a try: one kept would wait out gRPC's reconnection backoff (growing to
        # 2 minutes) after the port opens.
        with grpc.insecure_channel(target) as channel:
            try:
                if health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=1).status == \
                        health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # no health service: it answers
                    return
        time.sleep(0.1)
    raise TimeoutError(f"not SERVING after {timeout:g} s")


class Process:
    """A server started with `cmd` plus --port (a free one), SERVING, then `settle` seconds
    more; terminated on exit. A server that exits or never serves raises RuntimeError with
    the end of its output."""

    def __init__(self, cmd: list[str], env: dict[str, str] | None = None,
                 cwd: Path | None = None, settle: float = 1.0) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        # The server's output, shown if it fails; closed in __exit__.
        self.log = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self.proc = subprocess.Popen([*cmd, "--port", str(self.port)], env=env, cwd=cwd,
                                         stdout=self.log, stderr=subprocess.STDOUT)
        except BaseException:
            self.log.close()
            raise
        try:
            wait_ready(self.target, self.proc)
        except (RuntimeError, TimeoutError) as exc:
            output = self.output()
            self.__exit__()
            raise RuntimeError(f"{' '.join(cmd)}: {exc}:\n{output}") from None
        time.sleep(settle)  # a moment more, the machine quiet after the warm-up

    def output(self, tail: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-tail:]

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def vae_server_cmd(model_dir: Path, *extra: str) -> list[str]:
    """vae-server on loopback, quiet, without metrics, and without --port (Process adds it).
    `python -m vae_server` is the vae-server script's main, and needs no installed script (the
    GPU machine runs the checkout from PYTHONPATH: BENCHMARKS.md, "GPU path")."""
    return [sys.executable, "-m", "vae_server", "--model-dir", str(model_dir),
            "--host", "127.0.0.1", "--metrics-port", "-1", "--log-level", "WARNING", *extra]


def server_cmd(model_dir: Path, batching: bool, threads: int, event_loop: str = "auto",
               spinning: bool = False, *extra: str) -> list[str]:
    return vae_server_cmd(model_dir, "--batching", str(batching).lower(),
                          "--threads", str(threads), "--spinning", str(spinning).lower(),
                          "--event-loop", event_loop, *extra)


def echo_cmd(latent_dim: int, chunk: int = 1024, event_loop: str = "auto") -> list[str]:
    """The transport limit's server (bench/echo_server.py), without its --port."""
    return [sys.executable, str(ROOT / "bench/echo_server.py"), "--chunk", str(chunk),
            "--latent-dim", str(latent_dim), "--event-loop", event_loop]


def callers_rate(step: Callable[[int, int], int], seconds: float, callers: int = 1) -> float:
    """Images/s of `step(caller, i)` (which returns the images it did) called back to back by
    `callers` threads at once for `seconds`: several callers model the server's instances,
    large runs beside each other, each on a one-thread session."""
    done = [0] * callers
    t0 = time.perf_counter()

    def loop(c: int) -> None:
        i = 0
        while time.perf_counter() - t0 < seconds:
            done[c] += step(c, i)
            i += 1

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(done) / (time.perf_counter() - t0)


STREAM_TIMEOUT_S = 120.0  # a 200,000-image stream takes seconds


def bench(target: str, method: str, duration: float, **kw: Any) -> BenchResult:
    """One load (vae-client bench's), 1 s of warm-up, then `duration` seconds measured. A
    stream has a deadline too, so that a stalled one fails the figure instead of hanging."""
    return asyncio.run(run_bench(target, method, duration=duration, warmup=1.0,
                                 stream_timeout=STREAM_TIMEOUT_S + duration, **kw))


def interleaved(a: str, b: str, rounds: int, method: str, duration: float, **kw: Any
                ) -> tuple[list[BenchResult], list[BenchResult]]:
    """`rounds` measurements of one load on each of two servers that run side by side (the
    one not loaded is idle), in the order A B, B A, A B ...: a shared machine's drift, which
    can move a figure by a third within a minute, then hits both alike."""
    results: dict[str, list[BenchResult]] = {a: [], b: []}
    for i in range(rounds):
        for target in ((a, b) if i % 2 == 0 else (b, a)):
            results[target].append(bench(target, method, duration, **kw))
    return results[a], results[b]


def median_ratio(base: list[float], other: list[float]) -> tuple[float | None, list[float | None]]:
    """The median of the rounds' ratios other / base, and those ratios: measured in turns, a
    round's two figures are a moment apart, and the ratio of the two medians could pair one
    round's base with another round's figure, undoing the turns. A round whose base is 0
    (every call failed) has no ratio, and then neither has the median."""
    ratios = [y / x if x > 0 else None for x, y in zip(base, other, strict=True)]
    whole = [r for r in ratios if r is not None]
    return (statistics.median(whole) if whole and len(whole) == len(ratios) else None), ratios


def ratios_text(ratio: float | None, ratios: list[float | None]) -> str:
    """median_ratio's figures as ab.py and workers.py print them ("-": no ratio)."""
    def f(x: float | None) -> str:
        return "-" if x is None else f"{x:.3f}"

    return f"{f(ratio)}, the median of the rounds' (rounds: {', '.join(map(f, ratios))})"


def in_process_decode_calls(model: OnnxVAE, seconds: float) -> float:
    """Single-image decodes per second, one after another, in this process."""
    z = np.random.default_rng(0).standard_normal((1, model.latent_dim), dtype=np.float32)

    def step(c: int, i: int) -> int:
        model.decode(z)
        return 1

    return callers_rate(step, seconds)


def in_process_stream_images(model: OnnxVAE, chunk: int, dtype: str, seconds: float,
                             callers: int = 1) -> float:
    """Images/s of the server's SampleStream work done in process: noise, decode, the dtype
    conversion and the bytes, chunk after chunk (by each of `callers` threads)."""

    def step(c: int, i: int) -> int:
        z = model.prior.latents(c, i * chunk, chunk)
        x = model.decode(z)
        images_out(x, vae_pb2.UINT8 if dtype == "uint8" else vae_pb2.FLOAT32).tobytes()
        return chunk

    return callers_rate(step, seconds, callers)


def in_process_loglik_images(model: OnnxVAE, k: int, seconds: float, callers: int = 1) -> float:
    """Images/s of the same estimator (OnnxVAE.score, the evaluator's code) in process, one
    image per call (by each of `callers` threads)."""
    x = np.random.default_rng(0).random((1, 784), dtype=np.float32)

    def step(c: int, i: int) -> int:
        model.score(x, k, seed=i * callers + c)
        return 1

    return callers_rate(step, seconds, callers)


# Latency percentiles of fewer calls than this are left out: a stream load's calls are whole
# 200,000-image streams, a few in a measurement, and the "p99" of three is their maximum.
MIN_LATENCY_CALLS = 20


def add_row(rows: list[dict[str, Any]], section: str, what: str, value: float, unit: str,
            limit: float | None, limit_name: str, extra: BenchResult | None = None,
            ratio: float | None = None, limit_errors: dict[str, int] | None = None,
            **fields: Any) -> None:
    """Append a figure to `rows` and print it, with its ratio to `limit` where one is given
    (a row without one is a limit: `limit_name` says which kind), or `ratio` itself where the
    figure is not value / limit. Failed calls of the load (`extra`'s errors, or an `errors`
    field) and of the limit's (`limit_errors`) are printed with it: a limit that failed part
    of its load reads low, and the ratio high. `fields` add to the row or replace its
    entries."""
    if ratio is None and limit:
        ratio = value / limit
    lat = extra.latency_ms if extra is not None and extra.calls >= MIN_LATENCY_CALLS else None
    row = {"section": section, "what": what, "value": value, "unit": unit,
           "limit": limit_name, "ratio": ratio,
           "p50_ms": lat["p50"] if lat else None, "p99_ms": lat["p99"] if lat else None,
           "errors": extra.errors if extra else {}, "limit_errors": limit_errors or {},
           **fields}
    rows.append(row)
    r = f"{ratio:.2f} of {limit_name}" if ratio is not None else "(limit)"
    times = f"  p50 {lat['p50']:.2f} ms p99 {lat['p99']:.2f} ms" if lat else ""
    print(f"{section:<28} {what:<32} {value:>12,.0f} {unit:<9} {r}{times}{errors_note(row)}",
          flush=True)


def errors_note(row: dict[str, Any]) -> str:
    """The failed calls of a row and of its limit, for its line ("" when none)."""
    notes = [f"{whose}: " + ", ".join(f"{k} {v}" for k, v in row[key].items())
             for whose, key in (("errors", "errors"), ("limit's errors", "limit_errors"))
             if row.get(key)]
    return "  " + "; ".join(notes) if notes else ""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", default=str(ROOT / "models/default"))
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime intra-op threads, server and in-process alike")
    p.add_argument("--spinning", choices=("true", "false"), default="false",
                   help="ONNX Runtime threads spin between runs (vae-server --spinning), "
                   "server and in-process alike")
    p.add_argument("--chunk", type=int, default=1024, help="SampleStream chunk size")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of target (a)'s load on the echo server and the server in turn")
    p.add_argument("--event-loop", default="auto", choices=loops.CHOICES,
                   help="the servers' event loop, echo server and vae-server alike")
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    args = p.parse_args()
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    model_dir = Path(args.model_dir)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    d = args.duration
    spinning = args.spinning == "true"
    # The compute limit runs with the server's ONNX Runtime thread settings, and also with
    # spinning the other way: the limit is the faster of the two (spinning speeds up one
    # workload in process and slows another).
    model = OnnxVAE(model_dir, threads=args.threads, spinning=spinning)
    other = OnnxVAE(model_dir, threads=args.threads, spinning=not spinning)
    # The server's instances (one per core): large runs beside each other, each on a
    # one-thread session. In process: as many callers, each on a one-thread session.
    instances = cores()
    one_thread = OnnxVAE(model_dir, threads=1)

    rows: list[dict[str, Any]] = []
    row = functools.partial(add_row, rows)

    def compute_limit(section: str, what: str, unit: str,
                      measure: Callable[..., float]) -> tuple[float, float]:
        """The fastest in process for one caller (spinning on and off), and the fastest of
        that and `instances` callers at once on one-thread sessions (the server's
        instances)."""
        one_caller = 0.0
        for m, spins in ((model, spinning), (other, not spinning)):
            value = measure(m)
            row(section, f"{what}, spin {'on' if spins else 'off'}", value, unit, None, "compute")
            one_caller = max(one_caller, value)
        best = one_caller
        if instances > 1:
            value = measure(one_thread, callers=instances)
            row(section, f"{what}, {instances} callers, 1 thread each", value, unit, None,
                "compute")
            best = max(best, value)
        return one_caller, best

    # (a) single-image Decode: transport limit, batching off, batching on.
    section = "decode, 1 image per call"
    row(section, "in-process ORT, 1 caller", in_process_decode_calls(model, d), "calls/s",
        None, "compute")
    # The echo server runs on the same event loop as the server: uvloop raises echo's calls/s
    # too, by more than the server's (BENCHMARKS.md).
    echo: dict[int, BenchResult] = {}
    with Process(echo_cmd(model.latent_dim, args.chunk, args.event_loop)) as srv:
        for c in (1, 16, 64):
            r = echo[c] = bench(srv.target, "decode", d, concurrency=c)
            row(section, f"echo server, c={c}", r.calls_per_s, "calls/s", None, "transport", r)
        stream_echo = {}
        for dtype in ("float32", "uint8"):
            stream_echo[dtype] = bench(srv.target, "stream", d, batch=args.chunk, dtype=dtype,
                                       stream_n=200_000)
    for batching in (False, True):
        cmd = server_cmd(model_dir, batching, args.threads, args.event_loop, spinning)
        with Process(cmd) as srv:
            for c in (1, 16, 64):
                r = bench(srv.target, "decode", d, concurrency=c)
                row(section, f"batching {'on' if batching else 'off'}, c={c}", r.calls_per_s,
                    "calls/s", echo[c].calls_per_s, f"echo c={c}", r,
                    limit_errors=echo[c].errors)
    # Target (a): the figures above are a minute apart from their echo figures; here the echo
    # server and the server run side by side and take the load in turns.
    cmd = server_cmd(model_dir, True, args.threads, args.event_loop, spinning)
    with (Process(echo_cmd(model.latent_dim, args.chunk, args.event_loop)) as echo_srv,
          Process(cmd) as srv):
        echo_rounds, server_rounds = interleaved(echo_srv.target, srv.target, args.rounds,
                                                 "decode", d, concurrency=64)
    echo_errors = summed_errors(echo_rounds)
    row(section, "echo server, c=64, in turns",
        statistics.median(r.calls_per_s for r in echo_rounds), "calls/s", None, "transport",
        errors=echo_errors)
    # The figure is the median of the rounds' ratios (median_ratio). Failed calls of any
    # round count against the row, as in every other row.
    row(section, INTERLEAVED_ROW, statistics.median(r.calls_per_s for r in server_rounds),
        "calls/s", None, "echo c=64 in turns",
        ratio=median_ratio([r.calls_per_s for r in echo_rounds],
                           [r.calls_per_s for r in server_rounds])[0],
        rounds=[{"echo": e.calls_per_s, "server": s.calls_per_s,
                 "echo_p50_ms": e.to_dict()["latency_ms"]["p50"],
                 "server_p50_ms": s.to_dict()["latency_ms"]["p50"]}
                for e, s in zip(echo_rounds, server_rounds, strict=True)],
        errors=summed_errors(server_rounds), limit_errors=echo_errors)
    print(f"{'':<28} {rounds_line(rows[-1])}", flush=True)

    # (b) SampleStream and (c) LogLikelihood, batching on, against in-process ORT; each on a
    # server of its own, as (a) is (a LogLikelihood load right after a stream load on the same
    # server measured slower: BENCHMARKS.md). Streams are measured against the fastest
    # in-process figure, whatever its settings.
    stream_limit = {}
    for dtype in ("float32", "uint8"):
        _, stream_limit[dtype] = compute_limit(
            f"SampleStream {dtype}", f"in-process, chunk {args.chunk}", "images/s",
            functools.partial(in_process_stream_images, chunk=args.chunk, dtype=dtype, seconds=d))
        row(f"SampleStream {dtype}", "echo server", stream_echo[dtype].images_per_s, "images/s",
            None, "transport", stream_echo[dtype])
    # The server as configured, and with one large run at a time (--instances 1).
    # (`--spinning true` costs streams beside the instances: BENCHMARKS.md.)
    variants = {"server": (), "server, --instances 1": ("--instances", "1")}
    for name, extra in variants.items():
        cmd = server_cmd(model_dir, True, args.threads, args.event_loop, spinning, *extra)
        with Process(cmd) as srv:
            for dtype in ("float32", "uint8"):
                r = bench(srv.target, "stream", d, batch=args.chunk, dtype=dtype,
                          stream_n=200_000)
                row(f"SampleStream {dtype}", name, r.images_per_s, "images/s",
                    stream_limit[dtype], "in-process", r)
    # One caller is measured against the estimator in process with one caller; several
    # callers against the fastest in process, several callers included.
    section = "LogLikelihood K=1000"
    one_caller, best = compute_limit(section, "in-process estimator", "images/s",
                                     functools.partial(in_process_loglik_images, k=1000,
                                                       seconds=d))
    for name, extra in (("server", ()), ("server, --instances 1", ("--instances", "1"))):
        cmd = server_cmd(model_dir, True, args.threads, args.event_loop, spinning, *extra)
        with Process(cmd) as srv:
            for c in (1, 4):
                r = bench(srv.target, "loglik", d, batch=1, k=1000, concurrency=c)
                limit, limit_name = ((one_caller, "in-process, 1 caller") if c == 1
                                     else (best, "in-process"))
                row(section, f"{name}, 1 image/call, c={c}", r.images_per_s, "images/s", limit,
                    limit_name, r)

    meta = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_cpu_name()}",
        "model_dir": str(model_dir),
        "model_version": model.manifest["model_version"],
        "command": " ".join(["bench/run.py", *sys.argv[1:]]),
        "duration_s": d,
        "ort_threads": args.threads,
        "ort_spinning": spinning,
        "instances": instances,
        "event_loop": loops.resolve(args.event_loop),
    }
    verdicts = targets(rows)
    print("\n" + "\n".join(f"{v['target']:<58} needs {v['needs']:.1f}: "
                            f"{' '.join(_verdict(v))}" for v in verdicts))
    (out / "bench.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                "targets": verdicts}, indent=2,
                                               allow_nan=False))
    (out / "bench.md").write_text(markdown(meta, rows) + targets_markdown(verdicts))
    print(f"\nwritten: {out / 'bench.json'}, {out / 'bench.md'}")
    return 0


# Target (a)'s row: the median of rounds taken in turns with the echo server's.
INTERLEAVED_ROW = "batching on, c=64, in turns"

# The benchmark targets: (section, row, needed ratio).
TARGETS = [
    ("(a) single-image Decode, c=64, against the echo server", "decode, 1 image per call",
     INTERLEAVED_ROW, 0.9),
    ("(b) SampleStream FLOAT32 against in process", "SampleStream float32", "server", 0.6),
    ("(b) SampleStream UINT8 against in process", "SampleStream uint8", "server", 0.8),
    ("(c) LogLikelihood K=1000, c=1, against 1 caller in process", "LogLikelihood K=1000",
     "server, 1 image/call, c=1", 0.8),
    ("(c) LogLikelihood K=1000, c=4, against in process", "LogLikelihood K=1000",
     "server, 1 image/call, c=4", 0.8),
]


def summed_errors(results: list[BenchResult]) -> dict[str, int]:
    return dict(sum((collections.Counter(r.errors) for r in results), collections.Counter()))


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with the ratio this run measured, and whether it was met: a ratio whose
    load or limit had failed calls is no measure of the server (a limit that failed part of
    its load reads low), and is "invalid", neither met nor missed."""
    by_key = {(r["section"], r["what"]): r for r in rows}
    verdicts = []
    for name, section, what, needs in TARGETS:
        row = by_key.get((section, what))
        ratio = row["ratio"] if row else None
        failed = bool(row and (row.get("errors") or row.get("limit_errors")))
        verdicts.append({"target": name, "needs": needs, "ratio": ratio, "invalid": failed,
                         "met": ratio is not None and not failed and ratio >= needs})
    return verdicts


def _verdict(v: dict[str, Any]) -> tuple[str, str]:
    if v.get("invalid"):
        return ("-" if v["ratio"] is None else f"{v['ratio']:.2f}"), "invalid: calls failed"
    if v["ratio"] is None:
        return "-", "not measured"
    return f"{v['ratio']:.2f}", "met" if v["met"] else "missed"


def targets_markdown(verdicts: list[dict[str, Any]]) -> str:
    lines = ["", "| target | needs | this run | |", "|---|---:|---:|---|"]
    lines += [f"| {v['target']} | {v['needs']:.1f} | {' | '.join(_verdict(v))} |"
              for v in verdicts]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def rounds_line(row: dict[str, Any]) -> str:
    """A row measured in turns: each round's ratio, and its errors if any."""
    line = "rounds, server / echo: " + ", ".join(
        f"{x['server'] / x['echo']:.2f}" if x["echo"] else "-" for x in row["rounds"])
    if row.get("errors"):
        line += "; errors: " + ", ".join(f"{k} {v}" for k, v in row["errors"].items())
    return line


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"Measured {meta['date']} on {meta['machine']}; model {meta['model_version']}; "
             f"`{meta['command']}` ({meta['duration_s']:g} s per figure; servers on "
             f"{meta['event_loop']}; ONNX Runtime threads {meta['ort_threads'] or 'one per core'}"
             f", spinning {'on' if meta['ort_spinning'] else 'off'}, {meta['instances']} "
             "instances per model).", "",
             "| measurement | | value | ratio | p50 ms | p99 ms | failed calls |",
             "|---|---|---:|---|---:|---:|---|"]
    for r in rows:
        ratio = f"{r['ratio']:.2f} of {r['limit']}" if r["ratio"] is not None else r["limit"]
        p50 = f"{r['p50_ms']:.2f}" if r["p50_ms"] is not None else ""
        p99 = f"{r['p99_ms']:.2f}" if r["p99_ms"] is not None else ""
        lines.append(f"| {r['section']} | {r['what']} | {r['value']:,.0f} {r['unit']} | {ratio} "
                     f"| {p50} | {p99} | {errors_note(r).strip()} |")
    lines += [f"\n{r['what']}: {rounds_line(r)}." for r in rows if "rounds" in r]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

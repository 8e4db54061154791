"""`make soak`: a long mixed load on the real server, watching for what only time shows.

Starts `vae-server --model-dir models/default` (or drives a running one with --target) and,
for --minutes (default 10), keeps --concurrency calls in flight, drawn from a mix of every
RPC: Decode, Encode, Sample, SampleStream, LogLikelihood, GetModelInfo. Every reply is
checked:

- each request is one of a few fixed variants, whose first reply (taken on the quiet server
  before the load) is the reference: every later reply must equal it byte for byte (the
  service promises the same bytes whatever else it is doing);
- a SampleStream's chunks must start at the requested offset, follow each other with no gap
  and no repeat, and end at n;
- every call started must end with exactly one status (none lost while in flight).

It reports calls and latency by method, errors by status code, lost, duplicated and wrong
replies, INTERNAL (and other server faults), and the server's RSS after the warm-up,
periodically and at the end, with the growth in %. The summary goes to --out (soak.json,
soak.md; the server's log beside them). The exit status is 1 if a reply was lost,
duplicated or wrong, if a call went unanswered (DEADLINE_EXCEEDED after 60 s), if the server
answered INTERNAL (or UNKNOWN, DATA_LOSS), died or did not stop cleanly, or if its RSS grew
by --max-rss-growth (5 %) or more after the warm-up; else 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import os
import platform
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from vae_core.ports import free_port
from vae_proto import vae_pb2

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SERVICE = "/vae.v1.VaeService/"
# Share of calls per method.
MIX = {"Decode": 30, "Encode": 20, "Sample": 15, "LogLikelihood": 15, "SampleStream": 10,
       "GetModelInfo": 10}
VARIANTS = 4
SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}
CALL_TIMEOUT = 60.0
# Load before the RSS baseline (or the run's length, if shorter): the heap of a fresh server
# grows for about 3 minutes of the mix, then stays flat (BENCHMARKS.md, "Soak"); a baseline
# taken sooner reads that settling as growth.
WARMUP_S = 180.0
STREAM_N, STREAM_CHUNK = 3000, 512


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def health(target: str, timeout: float = 1.0) -> int | None:
    with grpc.insecure_channel(target) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout).status
        except grpc.RpcError:
            return None


class Server:
    """vae-server as a subprocess on a free port, its output in a log file; SERVING on entry."""

    def __init__(self, model_dir: str, log_path: Path, extra: list[str]) -> None:
        port = free_port()
        self.target = f"127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(BIN / "vae-server"), "--model-dir", model_dir, "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "-1", "--log-level", "WARNING", *extra],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while health(self.target) != health_pb2.HealthCheckResponse.SERVING:
            if self.proc.poll() is not None:
                raise SystemExit(f"soak: the server exited with {self.proc.returncode}; "
                                 f"see {log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"soak: the server was not SERVING after 120 s; see {log_path}")
            time.sleep(0.1)

    def stop(self) -> int | None:
        """SIGTERM; the exit status (None if it had to be killed)."""
        code: int | None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                code = None
        else:
            code = self.proc.returncode
        self._log.close()
        return code


# -- the requests ------------------------------------------------------------------------------

def build_requests(latent_dim: int, seed: int) -> dict[str, list[Any]]:
    """VARIANTS fixed requests per method."""
    rng = np.random.default_rng(seed)
    req: dict[str, list[Any]] = collections.defaultdict(list)

    def tensor(a: np.ndarray) -> vae_pb2.Tensor:
        dtype = vae_pb2.UINT8 if a.dtype == np.uint8 else vae_pb2.FLOAT32
        return vae_pb2.Tensor(dtype=dtype, shape=a.shape, data=a.tobytes())

    for v in range(VARIANTS):
        uint8 = v % 2 == 0
        n = (1, 8, 64, 200)[v]
        z = rng.standard_normal((n, latent_dim), dtype=np.float32)
        req["Decode"].append(vae_pb2.DecodeRequest(
            z=tensor(z), output_dtype=vae_pb2.UINT8 if uint8 else vae_pb2.FLOAT32))
        x8 = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        x = x8 if uint8 else (x8 / np.float32(255)).astype(np.float32)
        req["Encode"].append(vae_pb2.EncodeRequest(images=tensor(x), sample=v % 3 == 0,
                                                   seed=seed + v))
        req["Sample"].append(vae_pb2.SampleRequest(
            n=n, seed=seed + v, output_dtype=vae_pb2.UINT8 if uint8 else vae_pb2.FLOAT32,
            return_latents=v == 1))
        req["LogLikelihood"].append(vae_pb2.LogLikelihoodRequest(
            images=tensor(x[:8]), k=(1, 50, 200, 500)[v], seed=seed + v, offset=v * 1000))
        req["SampleStream"].append(vae_pb2.SampleStreamRequest(
            n=STREAM_N, seed=seed + v, chunk_size=(STREAM_CHUNK, 0, 1000, 64)[v],
            output_dtype=vae_pb2.UINT8 if uint8 else vae_pb2.FLOAT32, offset=(0, 0, 1234, 2999)[v]))
        req["GetModelInfo"].append(vae_pb2.GetModelInfoRequest())
    return req


RESPONSE = {"Decode": vae_pb2.DecodeResponse, "Encode": vae_pb2.EncodeResponse,
            "Sample": vae_pb2.SampleResponse, "LogLikelihood": vae_pb2.LogLikelihoodResponse,
            "GetModelInfo": vae_pb2.ModelInfo}


# -- the load ----------------------------------------------------------------------------------

@dataclass
class Tally:
    started: collections.Counter[str] = field(default_factory=collections.Counter)
    ended: collections.Counter[str] = field(default_factory=collections.Counter)
    ok: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    wrong: collections.Counter[str] = field(default_factory=collections.Counter)
    lost_chunks: int = 0        # stream images that never came
    duplicated_chunks: int = 0  # stream chunks that came twice (or overlapped)
    latencies: dict[str, list[float]] = field(
        default_factory=lambda: collections.defaultdict(list))
    examples: list[str] = field(default_factory=list)  # the first few problems, described

    def problem(self, text: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(text)


class Soak:
    def __init__(self, channel: grpc.aio.Channel, requests: dict[str, list[Any]]) -> None:
        self.requests = requests
        self.unary = {m: channel.unary_unary(SERVICE + m,
                                             request_serializer=type(requests[m][0]).SerializeToString)
                      for m in RESPONSE}
        self.stream = channel.unary_stream(
            SERVICE + "SampleStream",
            request_serializer=vae_pb2.SampleStreamRequest.SerializeToString,
            response_deserializer=vae_pb2.SampleChunk.FromString)
        self.reference: dict[tuple[str, int], bytes] = {}
        self.tally = Tally()

    async def _stream_digest(self, method: str, v: int, req: vae_pb2.SampleStreamRequest) -> bytes:
        """The stream's images as one digest; gaps and repeats counted."""
        digest = hashlib.sha256()
        expected = req.offset
        chunk = req.chunk_size or None
        async for c in self.stream(req, timeout=CALL_TIMEOUT):
            size = c.images.shape[0] if c.images.shape else 0
            if c.offset != expected:
                if c.offset < expected:
                    self.tally.duplicated_chunks += 1
                    self.tally.problem(f"{method}[{v}]: chunk at {c.offset} again (next due "
                                       f"{expected})")
                else:
                    self.tally.lost_chunks += 1
                    self.tally.problem(f"{method}[{v}]: images {expected}..{c.offset - 1} "
                                       "never came")
            if chunk is not None and size != min(chunk, req.n - c.offset):
                self.tally.problem(f"{method}[{v}]: a chunk of {size} at {c.offset}")
                self.tally.wrong[method] += 1
            digest.update(c.offset.to_bytes(8, "little"))
            digest.update(c.images.data)
            expected = c.offset + size
        if expected != req.n:
            self.tally.lost_chunks += 1
            self.tally.problem(f"{method}[{v}]: the stream ended at {expected} of {req.n}")
        return digest.digest()

    async def call(self, method: str, v: int) -> bytes:
        req = self.requests[method][v]
        if method == "SampleStream":
            return await self._stream_digest(method, v, req)
        reply = await self.unary[method](req, timeout=CALL_TIMEOUT)
        assert isinstance(reply, bytes)
        return reply

    async def take_references(self) -> None:
        """Each variant's reply on the quiet server: what every later reply must equal."""
        for method, variants in self.requests.items():
            for v in range(len(variants)):
                reply = await self.call(method, v)
                if method in RESPONSE:
                    RESPONSE[method].FromString(reply)  # it parses
                self.reference[method, v] = reply

    async def one(self, method: str, v: int) -> None:
        t = self.tally
        t.started[method] += 1
        t0 = time.perf_counter()
        try:
            reply = await self.call(method, v)
        except grpc.aio.AioRpcError as err:
            t.errors[method][err.code().name] += 1
            if err.code().name in SERVER_FAULTS or err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                t.problem(f"{method}[{v}]: {err.code().name}: {err.details()}")
        except Exception as exc:  # noqa: BLE001 - a reply this client cannot read: counted
            t.errors[method][f"client {type(exc).__name__}"] += 1
            t.problem(f"{method}[{v}]: {type(exc).__name__}: {exc}")
        else:
            t.ok[method] += 1
            t.latencies[method].append(time.perf_counter() - t0)
            if reply != self.reference[method, v]:
                t.wrong[method] += 1
                t.problem(f"{method}[{v}]: a reply that differs from the reference")
        finally:
            t.ended[method] += 1


async def soak(target: str, pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    duration = args.minutes * 60.0
    warmup = args.warmup if args.warmup is not None else min(WARMUP_S, duration)
    options = [("grpc.max_receive_message_length", 64 << 20),
               ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        info = vae_pb2.ModelInfo.FromString(await channel.unary_unary(SERVICE + "GetModelInfo")(
            b"", timeout=CALL_TIMEOUT))
        s = Soak(channel, build_requests(info.latent_dim, args.seed))
        await s.take_references()

        rng = random.Random(args.seed)
        methods, weights = list(MIX), list(MIX.values())
        started_at = datetime.now(timezone.utc)
        t0 = time.monotonic()
        end = t0 + warmup + duration

        async def worker() -> None:
            while time.monotonic() < end:
                await s.one(rng.choices(methods, weights)[0], rng.randrange(VARIANTS))

        samples: list[tuple[float, float]] = []  # (seconds since the warm-up ended, RSS MB)

        async def monitor() -> None:
            await asyncio.sleep(warmup)
            last_print = 0.0
            while True:
                now = time.monotonic()
                rss = rss_mb(pid) if pid is not None else None
                if rss is not None:
                    samples.append((round(now - t0 - warmup, 1), round(rss, 1)))
                if now - last_print >= args.report_every or now >= end:
                    last_print = now
                    calls = sum(s.tally.started.values())
                    errors = sum(sum(c.values()) for c in s.tally.errors.values())
                    print(f"soak: {now - t0:7.1f} s, {calls:,} calls, {errors:,} errors, "
                          f"RSS {rss if rss is not None else float('nan'):.1f} MB", flush=True)
                if now >= end:
                    return
                await asyncio.sleep(min(args.rss_every, max(end - now, 0.01)))

        mon = asyncio.ensure_future(monitor())
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        await mon
        elapsed = time.monotonic() - t0
        await asyncio.sleep(1.0)
        rss_quiet = rss_mb(pid) if pid is not None else None
    return summarize(s.tally, samples, rss_quiet, elapsed, warmup, info, args, started_at)


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values) * 1e3, q)), 2) if values else None


def summarize(t: Tally, samples: list[tuple[float, float]], rss_quiet: float | None,
              elapsed: float, warmup: float, info: vae_pb2.ModelInfo,
              args: argparse.Namespace, started_at: datetime) -> dict[str, Any]:
    errors_by_code: collections.Counter[str] = collections.Counter()
    for c in t.errors.values():
        errors_by_code.update(c)
    lost = sum(t.started.values()) - sum(t.ended.values()) + t.lost_chunks
    hung = errors_by_code["DEADLINE_EXCEEDED"]
    faults = sum(errors_by_code[c] for c in SERVER_FAULTS)
    # Under load, RSS moves with the replies in flight: the median of the first three
    # samples after the warm-up against that of the last three.
    rss = [r for _, r in samples]
    rss_warm = round(float(np.median(rss[:3])), 1) if rss else None
    rss_end = round(float(np.median(rss[-3:])), 1) if rss else None
    growth = (None if rss_warm is None or rss_end is None
              else round(100.0 * (rss_end - rss_warm) / rss_warm, 2))
    failures = []
    if lost:
        failures.append(f"{lost} lost replies or stream images")
    if hung:
        failures.append(f"{hung} calls unanswered within {CALL_TIMEOUT:.0f} s (DEADLINE_EXCEEDED)")
    if t.duplicated_chunks:
        failures.append(f"{t.duplicated_chunks} duplicated stream chunks")
    if sum(t.wrong.values()):
        failures.append(f"{sum(t.wrong.values())} wrong replies")
    if faults:
        failures.append(f"{faults} server faults ({errors_by_code['INTERNAL']} INTERNAL)")
    unread = {code: n for code, n in errors_by_code.items() if code.startswith("client ")}
    if unread:
        failures.append(f"{sum(unread.values())} replies the client could not read ("
                        + ", ".join(f"{code} {n}" for code, n in sorted(unread.items())) + ")")
    if growth is not None and growth >= args.max_rss_growth:
        failures.append(f"RSS grew by {growth} % after the warm-up (limit {args.max_rss_growth} %)")
    return {
        "started_at": started_at.isoformat(timespec="seconds"),
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cores": os.cpu_count()},
        "target": args.target or "vae-server started by soak.py",
        "model_dir": None if args.target else args.model_dir,
        "model_version": info.model_version,
        "execution_provider": info.execution_provider,
        "minutes": args.minutes, "warmup_s": warmup, "elapsed_s": round(elapsed, 1),
        "concurrency": args.concurrency, "mix": MIX, "seed": args.seed,
        "calls": dict(t.started), "ok": dict(t.ok),
        "errors": {m: dict(c) for m, c in t.errors.items()},
        "errors_by_code": dict(errors_by_code),
        "internal": errors_by_code["INTERNAL"], "server_faults": faults,
        "lost": lost, "duplicated": t.duplicated_chunks, "hung": hung, "wrong": dict(t.wrong),
        "latency_ms": {m: {"p50": _pct(v, 50), "p99": _pct(v, 99), "max": _pct(v, 100)}
                       for m, v in sorted(t.latencies.items())},
        "rss_mb": {"after_warmup": rss_warm, "end": rss_end,
                   "after_load": None if rss_quiet is None else round(rss_quiet, 1),
                   "max": max(rss, default=None), "growth_pct": growth,
                   "samples": samples},  # (seconds after the warm-up, MB)
        "problems": t.examples,
        "failures": failures,
        "passed": not failures,
    }


def markdown(r: dict[str, Any]) -> str:
    rss = r["rss_mb"]
    lines = [
        f"Soak of {r['minutes']} min (after {r['warmup_s']:.0f} s of warm-up) on "
        f"{r['machine']['cores']} cores, {r['execution_provider']}, model {r['model_version']}, "
        f"{r['concurrency']} calls in flight; {r['started_at']} to {r['ended_at']}.",
        "",
        f"**{'PASSED' if r['passed'] else 'FAILED'}**"
        + ("" if r["passed"] else ": " + "; ".join(r["failures"])),
        "",
        "Calls include the warm-up's; latencies are of OK calls (a whole stream for "
        "SampleStream).",
        "",
        "| method | calls | OK | errors | wrong | p50 ms | p99 ms | max ms |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for m in MIX:
        lat = r["latency_ms"].get(m, {})
        errs = ", ".join(f"{k} {v}" for k, v in sorted(r["errors"].get(m, {}).items())) or "0"
        lines.append(f"| {m} | {r['calls'].get(m, 0):,} | {r['ok'].get(m, 0):,} | {errs} | "
                     f"{r['wrong'].get(m, 0)} | {lat.get('p50')} | {lat.get('p99')} | "
                     f"{lat.get('max')} |")
    lines += [
        "",
        f"Lost replies or stream images: {r['lost']}; duplicated stream chunks: "
        f"{r['duplicated']}; unanswered (DEADLINE_EXCEEDED): {r['hung']}; INTERNAL: "
        f"{r['internal']}; server faults: {r['server_faults']}.",
        "",
        f"Server RSS (median of 3 samples): {rss['after_warmup']} MB after the warm-up, "
        f"{rss['end']} MB at the end (growth {rss['growth_pct']} %), {rss['max']} MB at most "
        f"({len(rss['samples'])} samples), {rss['after_load']} MB a second after the load.",
    ]
    if r["problems"]:
        lines += ["", "First problems:", ""] + [f"- {p}" for p in r["problems"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("SOAK_MINUTES", "10")),
                   help="length of the load after the warm-up (default: $SOAK_MINUTES or 10)")
    p.add_argument("--warmup", type=float, default=None,
                   help=f"seconds of load before the RSS baseline (default: {WARMUP_S:g}, or "
                   "the run's length if shorter)")
    p.add_argument("--model-dir", default=str(ROOT / "models/default"))
    p.add_argument("--target", default=None,
                   help="drive a running server at HOST:PORT instead of starting one")
    p.add_argument("--server-pid", type=int, default=None,
                   help="with --target: the server's PID, to read its RSS (same machine)")
    p.add_argument("--server-arg", action="append", default=[],
                   help="an extra vae-server flag for the server started here (repeatable), "
                   "e.g. --server-arg=--threads=1")
    p.add_argument("--concurrency", type=int, default=8, help="calls in flight")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rss-every", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--report-every", type=float, default=60.0,
                   help="seconds between progress lines")
    p.add_argument("--max-rss-growth", type=float, default=5.0,
                   help="RSS growth after the warm-up, in %%, that fails the soak")
    p.add_argument("--out", default=str(ROOT / "bench-results"))
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    server = None
    exit_status: int | None = 0
    if args.target:
        target, pid = args.target, args.server_pid
    else:
        server = Server(args.model_dir, out / "soak-server.log", args.server_arg)
        target, pid = server.target, server.proc.pid
    print(f"soak: {args.minutes} min of mixed load on {target}, {args.concurrency} in flight",
          flush=True)
    try:
        result = asyncio.run(soak(target, pid, args))
    finally:
        if server is not None:
            alive = server.proc.poll() is None
            exit_status = server.stop()
    if server is not None:
        result["server_exit_status"] = exit_status
        result["server_log"] = str(server.log_path)
        if not alive:
            result["failures"].append(f"the server died during the soak (see {server.log_path})")
        elif exit_status != 0:
            result["failures"].append(f"the server stopped with status {exit_status}")
        result["passed"] = not result["failures"]
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "soak.md").write_text(markdown(result))
    print(markdown(result))
    print(f"written: {out / 'soak.json'}, {out / 'soak.md'}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())

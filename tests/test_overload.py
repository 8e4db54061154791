"""Overload: a real server offered more than ten times the calls it can serve.

A vae-server subprocess with a small queue (--max-queue-images) is first measured at its
capacity (the calls per second it serves with several in flight); then, in an open loop
(calls sent on schedule, answered or not), it is offered fifteen times that rate for a few
seconds: LogLikelihood and Decode calls of 4,096 decoder rows each, so that one call fills
the decoder's whole queue. What must hold:

- every call ends OK or RESOURCE_EXHAUSTED, nothing else, none lost: sent = OK + refused;
- at least ten calls offered per call served (the load really is far above capacity);
- every OK reply is the full, correct answer: the bytes of the same call on a quiet server;
- refusals are prompt: their median far under the accepted calls', their p99 under 200 ms;
- the server's memory (VmRSS) stays within a bound while it sheds the load, and after;
- once the load stops, a normal call is answered at once, with the same bytes as before.

The timing bounds alone get a second run when the first misses them (assert_sheds_load).

The model is wider than conftest's small one (hidden 1,024): the decoder's compute, not
gRPC, then sets what the server can serve, as with a real model, and fifteen times that rate
is a load that one Python client can offer and that the server can afford to refuse.

On the small model, whose decoder costs little, the offered rate is so high (about 800
LogLikelihood calls/s of 50 KB) that the refusals themselves queue behind each other on the
server's event loop; test_loglikelihood_overload_on_a_cheap_decoder holds it to looser
latency bounds, and to keeping most of its capacity. That test failed when LogLikelihood was
refused only after dequantisation, an encoder run and the noise: refusals p50 ~260 ms, calls
served down from 40/s to ~5/s, RSS +250 MB for good.

Bounds are generous (the machine is small and shared), yet each catches the failure it is
about: a server that queues without limit, buffers refused work, or refuses late.
"""

from __future__ import annotations

import asyncio
import collections
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serving import rss_mb, served_process
from vae_proto import vae_pb2

pytestmark = pytest.mark.e2e

SERVICE = "/vae.v1.VaeService/"
QUEUE = 4096          # --max-queue-images: images waiting per model
DECODE_N = QUEUE      # latents per Decode call (float32 images back: no conversion to hold
                      # the server's event loop); like LogLikelihood, it fills the decoder queue
SERVER_FLAGS = ("--max-queue-images", str(QUEUE), "--max-batch-size", "1024",
                "--max-images-per-request", str(QUEUE), "--max-sample-n", "256",
                "--max-chunk-size", "256", "--default-chunk-size", "256", "--max-k", str(QUEUE),
                "--threads", "1", "--warmup-rounds", "1", "--log-level", "WARNING")
CAPACITY_IN_FLIGHT = 6  # calls in flight while measuring capacity
CAPACITY_BACKOFF = 0.01  # seconds a caller waits after a refusal while measuring capacity
CAPACITY_SECONDS = 1.5
OFFERED = 15          # the open loop's rate, in multiples of the capacity
OVERLOAD = 10         # calls offered per call served, at least
LOAD_SECONDS = 2.5
CALL_TIMEOUT = 30.0
VARIANTS = 3          # distinct requests per method: each reply must be its own call's
REFUSAL_P99_MS = 200.0  # typically 40-70 ms here; a server that refuses late takes seconds
RSS_PEAK_GROWTH_MB = 100.0   # a reply is 12.5 MB; a few in flight at once
RSS_SETTLED_GROWTH_MB = 50.0
NORMAL_CALL_MS = 500.0


class RssSampler:
    """The peak VmRSS of a process, sampled every 20 ms in a thread."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = rss_mb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def build_requests(latent_dim: int, ll_images: int, ll_k: int) -> dict[str, list[bytes]]:
    """VARIANTS serialised requests per method: Decode of DECODE_N latents and LogLikelihood
    of `ll_images` uint8 images with K = `ll_k`."""
    rng = np.random.default_rng(0)
    out: dict[str, list[bytes]] = {"Decode": [], "LogLikelihood": []}
    for v in range(VARIANTS):
        z = rng.standard_normal((DECODE_N, latent_dim), dtype=np.float32)
        out["Decode"].append(vae_pb2.DecodeRequest(
            z=vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=z.shape, data=z.tobytes()),
            output_dtype=vae_pb2.FLOAT32).SerializeToString())
        x = rng.integers(0, 256, (ll_images, 784), dtype=np.uint8)
        out["LogLikelihood"].append(vae_pb2.LogLikelihoodRequest(
            images=vae_pb2.Tensor(dtype=vae_pb2.UINT8, shape=x.shape, data=x.tobytes()),
            k=ll_k, seed=v).SerializeToString())
    return out


@dataclass
class Outcome:
    method: str
    variant: int
    code: grpc.StatusCode
    seconds: float
    correct: bool = False  # an OK reply equal to the reference (replies are not kept: 12 MB)


@dataclass
class Result:
    """What one overload run measured."""

    reference: dict[tuple[str, int], bytes]
    capacity: float = 0.0  # calls/s served with CAPACITY_IN_FLIGHT in flight
    rate: float = 0.0            # calls/s offered
    sent: int = 0
    sending_s: float = 0.0
    load_s: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    rss_before: float = 0.0
    rss_peak: float = 0.0
    rss_after: float = 0.0
    rss_settled: float = 0.0
    normal_correct: bool = False
    normal_ms: float = 0.0
    healthy_after: bool = False
    log: list[str] = field(default_factory=list)

    def of(self, code: grpc.StatusCode) -> list[Outcome]:
        return [o for o in self.outcomes if o.code == code]

    @property
    def codes(self) -> collections.Counter[str]:
        return collections.Counter(o.code.name for o in self.outcomes)

    def figures(self) -> dict[str, Any]:
        ok = [o.seconds for o in self.of(grpc.StatusCode.OK)]
        refused = [o.seconds for o in self.of(grpc.StatusCode.RESOURCE_EXHAUSTED)]
        return {
            "capacity, calls/s": round(self.capacity, 1),
            "offered, calls/s": round(self.sent / self.sending_s, 1),
            "served under load, calls/s": round(len(ok) / self.load_s, 1),
            "sent": self.sent, "codes": dict(self.codes),
            "refused p50/p99/max ms": [round(ms(refused, q), 1) for q in (50, 99, 100)],
            "accepted p50/p99/max ms": [round(ms(ok, q), 1) for q in (50, 99, 100)],
            "RSS MB before/peak/after/settled": [round(v, 1) for v in (
                self.rss_before, self.rss_peak, self.rss_after, self.rss_settled)],
            "a normal call afterwards, ms": round(self.normal_ms, 1),
        }


def ms(seconds: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(seconds) * 1e3, q)) if seconds else float("nan")


async def _call(stub: Any, method: str, variant: int, payload: bytes, started: float,
                outcomes: list[Outcome], reference: bytes) -> None:
    try:
        reply = await stub(payload, timeout=CALL_TIMEOUT)
    except grpc.aio.AioRpcError as err:
        outcomes.append(Outcome(method, variant, err.code(), time.perf_counter() - started))
        return
    outcomes.append(Outcome(method, variant, grpc.StatusCode.OK, time.perf_counter() - started,
                            reply == reference))


def _pick(mix: tuple[str, ...], i: int) -> tuple[str, int]:
    return mix[i % len(mix)], (i // len(mix)) % VARIANTS


async def _overload(target: str, pid: int, mix: tuple[str, ...], ll_images: int,
                    ll_k: int) -> Result:
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stubs = {m: channel.unary_unary(SERVICE + m) for m in ("Decode", "LogLikelihood")}
        info = vae_pb2.ModelInfo.FromString(await channel.unary_unary(
            SERVICE + "GetModelInfo")(b"", timeout=CALL_TIMEOUT))
        requests = build_requests(info.latent_dim, ll_images, ll_k)
        # The right answers, one call at a time on a quiet server (and the warm-up).
        result = Result(reference={})
        for method, payloads in requests.items():
            for v, p in enumerate(payloads):
                result.reference[method, v] = await stubs[method](p, timeout=CALL_TIMEOUT)

        # Capacity: the calls of this mix served per second with a few in flight.
        measured: list[Outcome] = []
        end = time.perf_counter() + CAPACITY_SECONDS
        counter = iter(range(10**9))

        async def caller() -> None:
            while time.perf_counter() < end:
                method, v = _pick(mix, next(counter))
                await _call(stubs[method], method, v, requests[method][v], time.perf_counter(),
                            measured, result.reference[method, v])
                if measured[-1].code != grpc.StatusCode.OK:
                    await asyncio.sleep(CAPACITY_BACKOFF)  # no storm of refusals

        await asyncio.gather(*(caller() for _ in range(CAPACITY_IN_FLIGHT)))
        served = [o for o in measured if o.code == grpc.StatusCode.OK]
        assert served and {o.code for o in measured} <= {
            grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, [o.code for o in measured]
        result.capacity = len(served) / CAPACITY_SECONDS
        result.rate = OFFERED * result.capacity

        # The open loop: a call every 1 / rate seconds, whatever happened to the others.
        result.rss_before = rss_mb(pid)
        tasks = []
        with RssSampler(pid) as rss:
            t0 = time.perf_counter()
            i = 0
            while (due := t0 + i / result.rate) < t0 + LOAD_SECONDS:
                if (wait := due - time.perf_counter()) > 0:
                    await asyncio.sleep(wait)
                method, v = _pick(mix, i)
                # Latency counts from when the call was due: a client that falls behind
                # its schedule shows it rather than hiding it (no coordinated omission).
                tasks.append(asyncio.ensure_future(_call(
                    stubs[method], method, v, requests[method][v], due, result.outcomes,
                    result.reference[method, v])))
                i += 1
            result.sent = i
            result.sending_s = time.perf_counter() - t0
            await asyncio.gather(*tasks)
            result.load_s = time.perf_counter() - t0
        result.rss_peak = rss.peak
        result.rss_after = rss_mb(pid)

        # Afterwards: a normal call is answered at once; health says SERVING.
        t1 = time.perf_counter()
        normal = await stubs["Decode"](requests["Decode"][0], timeout=CALL_TIMEOUT)
        result.normal_correct = normal == result.reference["Decode", 0]
        result.normal_ms = (time.perf_counter() - t1) * 1e3
        health = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        result.healthy_after = health.status == health_pb2.HealthCheckResponse.SERVING
        await asyncio.sleep(1.0)
        result.rss_settled = rss_mb(pid)
    return result


def _drain(proc: subprocess.Popen[str], log: list[str]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)


def run_overload(model_dir: Path, mix: tuple[str, ...], ll_images: int, ll_k: int,
                 *flags: str) -> Result:
    with served_process(model_dir, *SERVER_FLAGS, *flags) as (target, proc):
        log: list[str] = []
        threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
        result = asyncio.run(_overload(target, proc.pid, mix, ll_images, ll_k))
        assert proc.poll() is None, "the server exited: " + "".join(log[-40:])
        result.log = log
    print(f"overload {model_dir.parent.name} {mix}, LogLikelihood {ll_images} x K={ll_k}: "
          f"{result.figures()}")
    return result


def assert_sheds_load(run: Callable[[], Result], refusal_p99_ms: float = REFUSAL_P99_MS,
                      refusal_speedup: float = 5.0, served_share: float = 0.0) -> Result:
    """Runs `run` and checks that the server shed its load; returns the run checked.

    Only the timing bounds get a second run, when the first misses them: on a small shared
    machine one stall of the whole machine, a few hundred ms, delays every call due meanwhile,
    accepted or refused, past any bound that still tells a prompt refusal from a late one; in
    the capacity's window it lowers the load offered. A server that refuses late misses them
    on every run. Everything else holds on every run."""
    r = run()
    for attempt in range(2):
        assert_nothing_lost(r)
        missed = timing_misses(r, refusal_p99_ms, refusal_speedup, served_share)
        if not missed:
            return r
        if attempt == 0:
            print(f"timing bounds missed, measured again: {missed}")
            r = run()
    raise AssertionError(f"{missed}: {r.figures()}")


def assert_nothing_lost(r: Result) -> None:
    figures = r.figures()
    ok = r.of(grpc.StatusCode.OK)
    refused = r.of(grpc.StatusCode.RESOURCE_EXHAUSTED)
    # Nothing lost; nothing but OK and RESOURCE_EXHAUSTED.
    assert len(r.outcomes) == r.sent, figures
    assert len(ok) + len(refused) == r.sent, figures
    assert ok, figures
    # Each accepted call got its own full, correct answer.
    wrong = [(o.method, o.variant) for o in ok if not o.correct]
    assert not wrong, f"replies that differ from the same call's on a quiet server: {wrong}"
    # Memory stays bounded.
    assert r.rss_peak - r.rss_before < RSS_PEAK_GROWTH_MB, figures
    assert r.rss_settled - r.rss_before < RSS_SETTLED_GROWTH_MB, figures
    # Served afterwards, with the same answer as before the load.
    assert r.normal_correct and r.healthy_after, figures
    assert not any("Traceback" in line for line in r.log), "".join(r.log)


def timing_misses(r: Result, refusal_p99_ms: float, refusal_speedup: float,
                  served_share: float) -> list[str]:
    """The bounds that depend on the clock and that `r` misses: a load far above capacity (the
    capacity is measured in a window of time), refusals prompt and far quicker than serving,
    at least `served_share` of the capacity still served under the load, and a normal call
    answered at once after it."""
    refused = [o.seconds for o in r.of(grpc.StatusCode.RESOURCE_EXHAUSTED)]
    accepted = [o.seconds for o in r.of(grpc.StatusCode.OK)]
    bounds = {
        f"at least {OVERLOAD} calls offered per call served": r.sent >= OVERLOAD * len(accepted),
        f"at least {served_share:g} of the capacity served under the load":
            len(accepted) / r.load_s >= served_share * r.capacity,
        f"refusals' p99 under {refusal_p99_ms:g} ms": ms(refused, 99) < refusal_p99_ms,
        f"refusals' p50 under 1/{refusal_speedup:g} of accepted calls'":
            ms(refused, 50) < ms(accepted, 50) / refusal_speedup,
        f"a normal call afterwards under {NORMAL_CALL_MS:g} ms": r.normal_ms < NORMAL_CALL_MS,
    }
    return [name for name, held in bounds.items() if not held]


@pytest.fixture(scope="module")
def wide_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A VAE with one hidden layer of 1,024 (a decoder run of 4,096 rows takes tens of ms on
    one thread), trained for one epoch: its answers need not be good, only its cost real. So
    its prior is fitted around the encoder's means, and its sigma is the training one: the
    default MAP codes and calibration run that decoder over every digit, for a minute and more
    of the suite, and change nothing a call costs."""
    from vae_export.model import VAEConfig
    from vae_export.onnx_export import export_onnx
    from vae_export.prior_fit import PriorConfig
    from vae_export.train import TrainConfig, train

    root = tmp_path_factory.mktemp("wide")
    train(VAEConfig(latent_dim=4, hidden=(1024,)), TrainConfig(epochs=1, patience=1, threads=1),
          root / "run", progress=False, prior_cfg=PriorConfig(codes="mean"))
    export_onnx(root / "run", root / "model", calibrate=False)
    return root / "model"


def test_overload_is_shed_promptly_and_nothing_is_lost(wide_model_dir: Path) -> None:
    # LogLikelihood of one image with K = 4,096 (4,096 decoder rows: the whole queue), and
    # Decode of 4,096 latents.
    assert_sheds_load(lambda: run_overload(
        wide_model_dir, ("LogLikelihood", "Decode"), ll_images=1, ll_k=QUEUE))


def test_loglikelihood_overload_on_a_cheap_decoder(model_dir: Path) -> None:
    # One instance: with two (the default here), the two runs' work around ONNX Runtime
    # (noise, estimator) takes the GIL from the event loop; capacity rose from ~72 to ~85
    # calls/s, so the load offered rose with it, and refusals took p50 20 - 40 ms against
    # accepted calls' 56 - 69 ms (3 - 4 ms against 28 ms with one instance), too near for the
    # bound below (BENCHMARKS.md, instances). The wide model's tests run two.
    # Refusals wait their turn on a loop that also parses ~40 MB/s of requests: seen here at
    # p50 2 - 50 ms, p99 40 - 500 ms (against seconds when they were refused late).
    # Refused work does not eat the capacity: at least 0.4 of it is still served.
    assert_sheds_load(lambda: run_overload(
        model_dir, ("LogLikelihood",), 16, 256, "--instances", "1"),
        refusal_p99_ms=1500.0, refusal_speedup=2.0, served_share=0.4)


BURST = 10_000  # calls sent at once on one connection


async def _burst(target: str, latent_dim: int) -> tuple[collections.Counter[str], bool]:
    """BURST Decode calls of one latent each, all sent before any is answered, on a channel
    that retries nothing (so every status is the server's own); then one more call. Returns
    the codes, and whether every OK reply and the last call's are the right image."""
    z = np.zeros((1, latent_dim), np.float32)
    payload = vae_pb2.DecodeRequest(
        z=vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=z.shape, data=z.tobytes()),
        output_dtype=vae_pb2.FLOAT32).SerializeToString()
    options = [("grpc.enable_retries", 0)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        decode = channel.unary_unary(SERVICE + "Decode")
        reference = await decode(payload, timeout=CALL_TIMEOUT)

        async def one() -> tuple[str, bool]:
            try:
                return "OK", await decode(payload, timeout=CALL_TIMEOUT) == reference
            except grpc.aio.AioRpcError as err:
                return err.code().name, True

        outcomes = await asyncio.gather(*(one() for _ in range(BURST)))
        after = await decode(payload, timeout=CALL_TIMEOUT)
    return (collections.Counter(code for code, _ in outcomes),
            all(right for _, right in outcomes) and after == reference)


def test_a_burst_of_calls_is_served_or_refused_never_cancelled(model_dir: Path) -> None:
    # Calls arrive faster than the server's event loop takes them from gRPC, which holds the
    # rest meanwhile. gRPC's own bounds on those (1,000, then 3,000 calls) used to cancel
    # much of such a burst: CANCELLED, a code that says the caller gave up, and that gRPC's
    # retry policies do not retry. Held instead, each reaches the server's queue, which
    # serves it or refuses it with RESOURCE_EXHAUSTED.
    with served_process(model_dir, *SERVER_FLAGS) as (target, _proc):
        latent_dim = vae_pb2.ModelInfo.FromString(
            grpc.insecure_channel(target).unary_unary(SERVICE + "GetModelInfo")(
                b"", timeout=CALL_TIMEOUT)).latent_dim
        codes, right = asyncio.run(_burst(target, latent_dim))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["OK"] > 0, codes
    assert right, "an OK reply was not the image of its latent"

"""A load generator for a vae-server, like Triton's perf_analyzer: closed loop (a fixed number
of calls in flight) or open loop (a fixed arrival rate), reporting throughput, latency
percentiles and errors by status code.

Requests are serialised once and replies are not parsed, so the generator spends its CPU on
sending and receiving, not on protobuf.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from vae_client._codec import images_tensor, latents_tensor, request
from vae_client.channel import Security, create_aio_channel
from vae_client.errors import VaeError
from vae_proto import vae_pb2

SERVICE = "/vae.v1.VaeService/"
METHODS = ("decode", "encode", "sample", "stream", "loglik")
# The server's limit (a field of ModelInfo.limits) on each method's `batch`: the images of a
# call, or of a chunk for stream.
BATCH_LIMITS = {"decode": "max_images_per_request", "encode": "max_images_per_request",
                "loglik": "max_images_per_request", "sample": "max_sample_n",
                "stream": "max_chunk_size"}


@dataclass
class BenchResult:
    method: str
    mode: str  # "closed" (concurrency) or "open" (rate)
    concurrency: int | None  # None in the open loop, which has none
    rate: float | None
    batch: int
    duration_s: float
    calls: int
    images: int
    calls_per_s: float
    images_per_s: float
    latency_ms: dict[str, float]
    errors: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """As JSON takes it: a latency that no call measured (NaN) is None (null), since
        JSON has no NaN."""
        d = asdict(self)
        d["latency_ms"] = {k: None if math.isnan(v) else v for k, v in self.latency_ms.items()}
        return d

    def summary(self) -> str:
        lat = self.latency_ms
        errs = ", ".join(f"{k} {v}" for k, v in self.errors.items()) or "none"
        latency = (f"p50 {lat['p50']:.2f} ms, p90 {lat['p90']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                   f"max {lat['max']:.2f} ms" if self.calls else "no latency (no call succeeded)")
        load = f"c={self.concurrency}" if self.rate is None else f"rate={self.rate:g}/s"
        return (f"{self.method} {self.mode} {load} batch={self.batch}: "
                f"{self.calls_per_s:,.0f} calls/s, {self.images_per_s:,.0f} images/s, "
                f"{latency}; errors: {errs}")


def build_request(method: str, batch: int, latent_dim: int, k: int = 1000,
                  dtype: vae_pb2.DType = vae_pb2.FLOAT32, stream_n: int = 100_000,
                  seed: int = 0) -> tuple[str, bytes, int]:
    """(RPC path, serialised request, images per call) for one benchmark method. A number
    too large for its field raises VaeError INVALID_ARGUMENT, as the clients' calls do."""
    rng = np.random.default_rng(seed)
    if method == "decode":
        z = rng.standard_normal((batch, latent_dim), dtype=np.float32)
        req: Any = vae_pb2.DecodeRequest(z=latents_tensor(z), output_dtype=dtype)
        return SERVICE + "Decode", req.SerializeToString(), batch
    if method == "encode":
        x = rng.random((batch, 784), dtype=np.float32)
        req = vae_pb2.EncodeRequest(images=images_tensor(x))
        return SERVICE + "Encode", req.SerializeToString(), batch
    if method == "sample":
        req = request(vae_pb2.SampleRequest, n=batch, seed=seed, output_dtype=dtype)
        return SERVICE + "Sample", req.SerializeToString(), batch
    if method == "loglik":
        x = rng.random((batch, 784), dtype=np.float32)
        req = request(vae_pb2.LogLikelihoodRequest, images=images_tensor(x), k=k, seed=seed)
        return SERVICE + "LogLikelihood", req.SerializeToString(), batch
    if method == "stream":
        req = request(vae_pb2.SampleStreamRequest, n=stream_n, seed=seed, chunk_size=batch,
                      output_dtype=dtype)
        return SERVICE + "SampleStream", req.SerializeToString(), stream_n
    raise ValueError(f"method must be one of {METHODS}, not {method!r}")


def check_load(method: str, batch: int, info: vae_pb2.ModelInfo, k: int = 1,
               stream_n: int = 1) -> None:
    """Refuse a load of which the server would refuse every call (VaeError INVALID_ARGUMENT):
    a batch over its limit for `method` (whose images, allocated first, may not even fit in
    memory), LogLikelihood's k or decoder rows (batch x k) over its limits, a stream longer
    than it serves. A limit of 0 is one the server did not say."""
    limits = info.limits

    def refuse(what: str, name: str, limit: int) -> None:
        raise VaeError(grpc.StatusCode.INVALID_ARGUMENT,
                       f"{what}, more than the server's {name} ({limit})")

    name = BATCH_LIMITS.get(method, "")  # another method: build_request refuses it
    limit = getattr(limits, name) if name else 0
    if limit and batch > limit:
        refuse(f"batch: {batch} images per {'chunk' if method == 'stream' else 'call'}", name,
               limit)
    if method == "loglik":
        if limits.max_k and k > limits.max_k:
            refuse(f"k: {k} importance samples", "max_k", limits.max_k)
        queue = info.batching.max_queue_images
        if queue and batch * k > queue:
            refuse(f"batch x k: {batch} x {k} = {batch * k} decoder rows", "max_queue_images",
                   queue)
    if method == "stream" and limits.max_stream_n and stream_n > limits.max_stream_n:
        refuse(f"stream_n: {stream_n} images", "max_stream_n", limits.max_stream_n)


def _percentiles(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan"),
                "max": float("nan"), "mean": float("nan")}
    a = np.asarray(latencies) * 1e3
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(a.max()),
            "mean": float(a.mean())}


async def run_bench(target: str, method: str, concurrency: int = 1, duration: float = 10.0,
                    batch: int = 1, rate: float | None = None, k: int = 1000,
                    dtype: str = "float32", stream_n: int = 100_000, warmup: float = 1.0,
                    timeout: float | None = 30.0, stream_timeout: float | None = None,
                    security: Security | None = None) -> BenchResult:
    """Drive `method` for `duration` seconds (finite, > 0) after `warmup` seconds (finite,
    >= 0) that are not counted. `timeout`: the deadline of every unary call, None for none;
    `stream_timeout`: that of each whole stream (default none: a stream may outlast any
    fixed deadline). `security`: TLS and token of the channel (default: plaintext, no
    token)."""
    if not (math.isfinite(duration) and duration > 0):
        raise ValueError(f"duration: {duration}; it must be a finite number > 0")
    if not (math.isfinite(warmup) and warmup >= 0):
        raise ValueError(f"warmup: {warmup}; it must be a finite number >= 0")
    dtype_enum = vae_pb2.UINT8 if dtype == "uint8" else vae_pb2.FLOAT32
    # No retries: the load generator counts every refusal.
    async with create_aio_channel(target, security, 64, retries=0) as channel:
        info_call = channel.unary_unary(SERVICE + "GetModelInfo",
                                        request_serializer=vae_pb2.GetModelInfoRequest.SerializeToString,
                                        response_deserializer=vae_pb2.ModelInfo.FromString)
        try:
            info = await info_call(vae_pb2.GetModelInfoRequest(), timeout=timeout)
        except grpc.RpcError as err:  # no server, refused credentials: no load to generate
            raise VaeError.from_rpc_error(err) from None
        check_load(method, batch, info, k, stream_n)  # before build_request allocates it
        path, payload, images_per_call = build_request(method, batch, info.latent_dim, k,
                                                       dtype_enum, stream_n)
        if method == "stream":
            stub: Any = channel.unary_stream(path)
        else:
            stub = channel.unary_unary(path)

        latencies: list[float] = []
        errors: collections.Counter[str] = collections.Counter()
        counting = False
        images = 0

        async def one_call(started: float) -> None:
            nonlocal images
            try:
                if method == "stream":
                    # Images count as their chunks arrive: a stream can last longer than the
                    # measurement, and counting it whole at its end would credit the window
                    # with images received before it (or after).
                    received = 0
                    async for _ in stub(payload, timeout=stream_timeout):
                        size = min(batch, stream_n - received)
                        received += size
                        if counting:
                            images += size
                else:
                    await stub(payload, timeout=timeout)
            except grpc.aio.AioRpcError as err:
                if counting:
                    errors[err.code().name] += 1
                return
            if counting:
                latencies.append(time.perf_counter() - started)
                if method != "stream":
                    images += images_per_call

        loop_end = time.perf_counter() + warmup + duration

        async def closed_worker() -> None:
            while time.perf_counter() < loop_end:
                await one_call(time.perf_counter())

        async def open_loop() -> None:
            assert rate is not None
            interval = 1.0 / rate
            pending: set[asyncio.Task[None]] = set()
            next_at = time.perf_counter()
            while next_at < loop_end:
                delay = next_at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                # Latency counts from the scheduled send time: no coordinated omission.
                task = asyncio.ensure_future(one_call(next_at))
                pending.add(task)
                task.add_done_callback(pending.discard)
                next_at += interval
            if pending:
                await asyncio.gather(*pending)

        async def start_counting() -> float:
            nonlocal counting
            await asyncio.sleep(warmup)
            counting = True
            return time.perf_counter()

        counter_task = asyncio.ensure_future(start_counting())
        if rate is None:
            await asyncio.gather(*(closed_worker() for _ in range(concurrency)))
        else:
            await open_loop()
        started = await counter_task
        elapsed = max(time.perf_counter() - started, 1e-9)

    calls = len(latencies)
    return BenchResult(
        method=method, mode="closed" if rate is None else "open",
        concurrency=concurrency if rate is None else None,
        rate=rate, batch=batch, duration_s=round(elapsed, 3), calls=calls, images=images,
        calls_per_s=calls / elapsed, images_per_s=images / elapsed,
        latency_ms=_percentiles(latencies), errors=dict(errors))

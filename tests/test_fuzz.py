"""Fuzzing every RPC of vae.v1.VaeService with arbitrary, malformed and extreme requests.

One real server (a subprocess on the small model) takes thousands of requests per RPC, built
by hypothesis: wrong and unknown dtypes, shapes that disagree with the data, negative and huge
dimensions, NaN, Inf and out-of-range pixels, empty tensors, huge counts and offsets, unknown
enum values, unknown and repeated fields, and raw bytes that are not protobuf at all. Each
hypothesis example sends a handful of them at once, so the server's batcher also mixes good
and bad calls.

The property, for each request: the server answers within the call's deadline with OK (and
a reply of the right shape) or a status that is the caller's to fix (INVALID_ARGUMENT, whose
message names the field, RESOURCE_EXHAUSTED, OUT_OF_RANGE), never INTERNAL or UNKNOWN; and
after every example it still serves a good call with the same bytes as before.

Requests are sent as bytes through raw method handlers (no request serializer), so a test
controls the wire form to the byte: field order, repeated fields, unknown fields.

Faults the fuzzer found have tests of their own (shapes numpy cannot hold, bytes that are not
protobuf): both were INTERNAL or UNKNOWN before their fixes.
"""

from __future__ import annotations

import collections
import functools
import math
import os
import re
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import text_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from serving import served_process
from vae_proto import vae_pb2

pytestmark = pytest.mark.e2e

SERVICE = "/vae.v1.VaeService/"
RPCS = ("Encode", "Decode", "Sample", "SampleStream", "LogLikelihood", "GetModelInfo")
REQUEST = {
    "Encode": vae_pb2.EncodeRequest, "Decode": vae_pb2.DecodeRequest,
    "Sample": vae_pb2.SampleRequest, "SampleStream": vae_pb2.SampleStreamRequest,
    "LogLikelihood": vae_pb2.LogLikelihoodRequest, "GetModelInfo": vae_pb2.GetModelInfoRequest,
}

# The server's limits, small so that valid requests cost little and limits are easy to cross.
MAX_IMAGES = 64      # Encode, Decode, LogLikelihood
MAX_SAMPLE_N = 64
MAX_CHUNK = 64
MAX_K = 32
MAX_QUEUE = 2048
MAX_STREAM_N = 10_000_000  # the default: huge streams are read for two chunks, then cancelled
SERVER_FLAGS = (
    "--max-batch-size", "256", "--max-queue-images", str(MAX_QUEUE),
    "--max-images-per-request", str(MAX_IMAGES), "--max-sample-n", str(MAX_SAMPLE_N),
    "--max-chunk-size", str(MAX_CHUNK), "--default-chunk-size", "16", "--max-k", str(MAX_K),
    "--max-stream-n", str(MAX_STREAM_N), "--threads", "1", "--warmup-rounds", "1",
)

# Requests per hypothesis example, sent concurrently, and examples per RPC: thousands of
# requests per RPC in `make test`, the same ones every run. VAE_FUZZ_SCALE=10 fuzzes ten times
# longer, and VAE_FUZZ_RANDOM=1 draws new examples each run.
PER_EXAMPLE = 8
SCALE = float(os.environ.get("VAE_FUZZ_SCALE", "1"))
EXAMPLES = max(1, int(400 * SCALE))       # well-formed requests with bad contents
RAW_EXAMPLES = max(1, int(150 * SCALE))   # bytes that may not be protobuf at all
CALL_TIMEOUT = 15.0  # seconds: a call still unanswered by then has hung
STREAM_CHUNKS = 2    # chunks read from an OK stream before cancelling it

# Statuses a malformed request may get: the caller's to fix, never the server's fault.
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE}
# An INVALID_ARGUMENT message starts with the request field it is about ("request" for bytes
# that are not the request message at all).
FIELD_NAMED = re.compile(r"^(images|z|n|k|seed|chunk_size|offset|output_dtype|digit|request)\b")

FUZZ = settings(
    max_examples=EXAMPLES, deadline=None, database=None,
    derandomize=os.environ.get("VAE_FUZZ_RANDOM") != "1",
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                           HealthCheck.filter_too_much],
)


# -- the wire form, by hand --------------------------------------------------------------------

def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 values travel as 10-byte two's complement varints
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _key(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint(len(payload)) + payload


# -- strategies --------------------------------------------------------------------------------
# Every strategy is built once (building one costs more than drawing from it): the module's
# constants, and functools.cache for those that depend on the model's latent size.

U32 = 2**32 - 1
U64 = 2**64 - 1
I64_MIN, I64_MAX = -(2**63), 2**63 - 1
SPECIAL_FLOATS = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, float(np.nextafter(np.float32(1), 2)),
                  -1e-45, 1e-45, 3.4e38, -3.4e38, -1.0, 2.0, 255.0, 0.5)
EXTREME_DIMS = (I64_MAX, I64_MIN, -1, 2**31 - 1, 2**31, 2**32, 2**32 + 1, 2**62, 784, 28, 4)
# Bytes: longer tensors are not built (their data length is random instead). One past the
# image limit is 65 x 784 x 4 bytes.
MAX_DATA = 256 << 10

seeds = st.one_of(st.integers(0, 1000), st.sampled_from((U32, 2**32, 2**63, U64)),
                  st.integers(0, U64))
uint32s = st.one_of(st.integers(0, 300), st.sampled_from((U32, 2**31, 2**31 - 1, 2**16)),
                    st.integers(0, U32))
uint64s = st.one_of(st.integers(0, 300), st.sampled_from((U32, 2**32, 2**63, U64)),
                    st.integers(0, U64))
# DType values: the two real ones most often, then UNSPECIFIED and values the enum lacks.
dtypes = st.sampled_from((1, 1, 1, 1, 2, 2, 2, 0, 3, 99, -1, 2**31 - 1, -(2**31)))
output_dtypes = st.sampled_from((0, 1, 2, 0, 1, 2, 3, 99, -1, 2**31 - 1))
booleans = st.booleans()
one_in_three = st.sampled_from((True, False, False))
one_in_five = st.sampled_from((True, False, False, False, False))
dims = st.one_of(st.integers(-3, 1000), st.sampled_from(EXTREME_DIMS))
free_shapes: st.SearchStrategy[list[int]] = st.one_of(st.lists(dims, max_size=6), st.just([]))
length_modes = st.sampled_from(("exact",) * 6 + ("minus", "plus", "random", "empty"))
small_deltas = st.integers(1, 8)
random_lengths = st.integers(0, 4096)
fills = st.sampled_from(("uniform",) * 4 + ("normal", "zeros", "ones", "bits", "special"))
valid_fills = st.sampled_from(("uniform", "uniform", "zeros", "ones"))
specials_lists = st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(SPECIAL_FLOATS)),
                          min_size=1, max_size=3)
rng_seeds = st.integers(0, 2**32 - 1)
tensor_times = st.sampled_from((1,) * 8 + (0, 2))  # a Tensor field missing, once or twice
fields_per_message = st.integers(0, 2)
wire_types = st.sampled_from((0, 1, 2, 5))
u64_any = st.integers(0, U64)
bytes8 = st.binary(min_size=8, max_size=8)
bytes4 = st.binary(min_size=4, max_size=4)
bytes64 = st.binary(max_size=64)


def counts(limit: int) -> st.SearchStrategy[int]:
    """Image counts around a limit: mostly small, sometimes 0, the limit or one past it."""
    return st.one_of(st.integers(1, 8), st.sampled_from((0, 1, limit, limit + 1)),
                     st.integers(0, limit + 2))


image_counts = counts(MAX_IMAGES)
valid_image_counts = st.integers(1, 8)
GOOD_SHAPES: dict[str, tuple[Callable[[int, int], list[int]], ...]] = {
    "images": (lambda n, k: [n, 784], lambda n, k: [n, 28, 28]),
    "latents": (lambda n, k: [n, k],),
}
NEAR_SHAPES: dict[str, tuple[Callable[[int, int], list[int]], ...]] = {
    "images": (lambda n, k: [n, 783], lambda n, k: [n, 785], lambda n, k: [n, 28, 27],
               lambda n, k: [n, 28, 28, 1], lambda n, k: [784], lambda n, k: [n * 784],
               lambda n, k: [n, 1, 784], lambda n, k: [1, n, 784], lambda n, k: [n, 784, 1],
               lambda n, k: [n, 27, 29]),
    "latents": (lambda n, k: [n, k + 1], lambda n, k: [n, k - 1], lambda n, k: [k],
                lambda n, k: [n, 1, k], lambda n, k: [n * k], lambda n, k: [n, 784],
                lambda n, k: [n, 28, 28], lambda n, k: [k, n]),
}
good_shapes = {kind: st.sampled_from(v) for kind, v in GOOD_SHAPES.items()}
near_shapes = {kind: st.sampled_from(v) for kind, v in NEAR_SHAPES.items()}
shape_kinds = st.sampled_from(("good", "good", "near", "free"))


def _floats(count: int, fill: str, rng: np.random.Generator,
            specials: list[tuple[int, float]]) -> np.ndarray:
    if fill == "uniform":
        a = rng.random(count, dtype=np.float32)
    elif fill == "normal":
        a = rng.standard_normal(count, dtype=np.float32)
    elif fill == "zeros":
        a = np.zeros(count, np.float32)
    elif fill == "ones":
        a = np.ones(count, np.float32)
    elif fill == "bits":  # any 32-bit pattern: NaNs, infinities, subnormals, huge values
        a = rng.integers(0, 2**32, count, dtype=np.uint32).view(np.float32)
    else:  # a constant special value
        a = np.full(count, specials[0][1] if specials else np.nan, np.float32)
    for index, value in specials:
        if count:
            a[index % count] = np.float32(value)
    return a


@st.composite
def _unknown_fields(draw: st.DrawFn, first: int, numbers: st.SearchStrategy[int]) -> bytes:
    out = []
    for _ in range(draw(fields_per_message) if draw(one_in_five) else 0):
        number = draw(numbers)
        wire = draw(wire_types)
        if wire == 0:
            out.append(_key(number, 0) + _varint(draw(u64_any)))
        elif wire == 1:
            out.append(_key(number, 1) + draw(bytes8))
        elif wire == 5:
            out.append(_key(number, 5) + draw(bytes4))
        else:
            out.append(_len_field(number, draw(bytes64)))
    return b"".join(out)


@functools.cache
def unknown_fields(first: int) -> st.SearchStrategy[bytes]:
    """Mostly none; else fields the message does not define (numbers from `first`), of
    every wire type."""
    numbers = st.one_of(st.integers(first, first + 20), st.integers(first, 2**29 - 1))
    return _unknown_fields(first, numbers)


@st.composite
def _tensor(draw: st.DrawFn, kind: str, latent_dim: int) -> bytes:
    if draw(one_in_three):  # a valid tensor: the other fields decide
        dtype = 1 if kind == "latents" or draw(booleans) else 2
        shape = draw(good_shapes[kind])(draw(valid_image_counts), latent_dim)
        mode, fill, specials = "exact", draw(valid_fills), []
    else:
        dtype = draw(dtypes)
        how = draw(shape_kinds)
        if how == "free":
            shape = draw(free_shapes)
        else:
            shape = draw(good_shapes[kind] if how == "good" else near_shapes[kind])(
                draw(image_counts), latent_dim)
        mode, fill = draw(length_modes), draw(fills)
        specials = draw(specials_lists) if draw(one_in_three) else []
    itemsize = 1 if dtype == 2 else 4
    count = math.prod(shape) if shape and min(shape) >= 0 else (1 if not shape else None)
    exact = count * itemsize if count is not None and count * itemsize <= MAX_DATA else None
    if exact is None or mode == "random":
        length = draw(random_lengths)
    elif mode == "exact":
        length = exact
    elif mode == "minus":
        length = max(0, exact - draw(small_deltas))
    elif mode == "plus":
        length = exact + draw(small_deltas)
    else:
        length = 0
    rng = np.random.default_rng(draw(rng_seeds))
    if dtype == 2 and fill != "bits":
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    else:
        data = _floats(length // 4, fill, rng, specials).tobytes() + rng.bytes(length % 4)
    # Field by field, so that dimensions may be anything int64 holds, the packed shape may
    # also come unpacked, and unknown fields may ride along.
    parts = [_key(1, 0) + _varint(dtype) if dtype else b""]
    if shape:
        if draw(booleans):
            parts.append(_len_field(2, b"".join(_varint(d) for d in shape)))
        else:
            parts.extend(_key(2, 0) + _varint(d) for d in shape)
    parts.append(_len_field(3, data) if data else b"")
    parts.append(draw(unknown_fields(4)))
    if draw(one_in_five):
        parts = draw(st.permutations(parts))
    return b"".join(parts)


@functools.cache
def tensors(kind: str, latent_dim: int) -> st.SearchStrategy[bytes]:
    """A serialised Tensor: valid for `kind` (images or latents) a third of the time; else
    any dtype, a shape near the right one or any list of int64, data of the right length or
    not, NaN, Inf and out-of-range values."""
    return _tensor(kind, latent_dim)


def with_tensor(draw: st.DrawFn, message: Any, tensor: bytes, first_unknown: int) -> bytes:
    """`message` serialised with its Tensor field 1 set to the bytes `tensor`: missing, once,
    or twice (protobuf merges a repeated message field), before or after the other fields,
    with unknown fields."""
    parts = [message.SerializeToString(), *[_len_field(1, tensor)] * draw(tensor_times)]
    if draw(booleans):
        parts.reverse()
    parts.append(draw(unknown_fields(first_unknown)))
    return b"".join(parts)


sample_ns = st.one_of(counts(MAX_SAMPLE_N), uint32s)
stream_ns = st.one_of(st.integers(1, 200), st.integers(0, 200),
                      st.sampled_from((MAX_STREAM_N, MAX_STREAM_N + 1, U32, 2**63, U64)),
                      st.integers(0, U64))
offset_kinds = st.sampled_from(("zero", "zero", "zero", "inside", "edge", "any"))
chunk_sizes = st.one_of(st.sampled_from((0, 0, 1, MAX_CHUNK, MAX_CHUNK + 1)), uint32s)
ks = st.one_of(st.integers(1, 8), st.integers(0, 8), st.sampled_from((MAX_K, MAX_K + 1)), uint32s)


@st.composite
def _encode(draw: st.DrawFn, latent_dim: int) -> bytes:
    msg = vae_pb2.EncodeRequest(sample=draw(booleans), seed=draw(seeds))
    return with_tensor(draw, msg, draw(tensors("images", latent_dim)), 4)


@st.composite
def _decode(draw: st.DrawFn, latent_dim: int) -> bytes:
    msg = vae_pb2.DecodeRequest(output_dtype=draw(output_dtypes))
    return with_tensor(draw, msg, draw(tensors("latents", latent_dim)), 3)


@st.composite
def _sample(draw: st.DrawFn) -> bytes:
    msg = vae_pb2.SampleRequest(n=draw(sample_ns), seed=draw(seeds),
                                output_dtype=draw(output_dtypes), return_latents=draw(booleans))
    return msg.SerializeToString() + draw(unknown_fields(5))


@st.composite
def _stream(draw: st.DrawFn) -> bytes:
    n = draw(stream_ns)
    where = draw(offset_kinds)
    if where == "zero":
        offset = 0
    elif where == "inside":
        offset = draw(st.integers(0, max(n - 1, 0)))
    elif where == "edge":
        offset = draw(st.sampled_from((max(n - 1, 0), n, n + 1)))
    else:
        offset = draw(u64_any)
    msg = vae_pb2.SampleStreamRequest(n=n, seed=draw(seeds), chunk_size=draw(chunk_sizes),
                                      output_dtype=draw(output_dtypes), offset=min(offset, U64))
    return msg.SerializeToString() + draw(unknown_fields(6))


@st.composite
def _loglik(draw: st.DrawFn, latent_dim: int) -> bytes:
    msg = vae_pb2.LogLikelihoodRequest(k=draw(ks), seed=draw(seeds), offset=draw(uint64s))
    return with_tensor(draw, msg, draw(tensors("images", latent_dim)), 5)


@functools.cache
def requests(rpc: str, latent_dim: int) -> st.SearchStrategy[bytes]:
    """Serialised requests for `rpc`: each one parses as the RPC's request type."""
    return {
        "Encode": lambda: _encode(latent_dim), "Decode": lambda: _decode(latent_dim),
        "Sample": _sample, "SampleStream": _stream, "LogLikelihood": lambda: _loglik(latent_dim),
        "GetModelInfo": lambda: unknown_fields(1),
    }[rpc]()


mutations = st.sampled_from(("truncate", "flip", "insert", "append"))
mutation_counts = st.integers(1, 3)
flips = st.integers(1, 255)
inserts = st.binary(min_size=1, max_size=8)
appends = st.binary(min_size=1, max_size=16)


@st.composite
def _mutated(draw: st.DrawFn, valid: st.SearchStrategy[bytes]) -> bytes:
    raw = bytearray(draw(valid))
    for _ in range(draw(mutation_counts)):
        how = draw(mutations)
        at = draw(st.integers(0, len(raw)))
        if how == "truncate":
            del raw[at:]
        elif how == "flip" and raw:
            raw[at % len(raw)] ^= draw(flips)
        elif how == "insert":
            raw[at:at] = draw(inserts)
        else:
            raw += draw(appends)
    return bytes(raw)


@functools.cache
def raw_payloads(rpc: str, latent_dim: int) -> st.SearchStrategy[bytes]:
    """Any bytes, or a request damaged on the wire: truncated, a byte changed, bytes
    inserted or appended."""
    return st.one_of(bytes64, _mutated(requests(rpc, latent_dim)))


def parses(rpc: str, payload: bytes) -> bool:
    try:
        REQUEST[rpc].FromString(payload)
    except Exception:  # noqa: BLE001 - DecodeError, or anything else the parser raises
        return False
    return True


# -- the server and the checks -----------------------------------------------------------------

@dataclass
class Answer:
    code: grpc.StatusCode
    details: str
    replies: list[bytes]  # the reply, or the chunks read from a stream


@dataclass
class FuzzServer:
    target: str
    proc: subprocess.Popen[str]
    channel: grpc.Channel
    log: list[str]
    latent_dim: int = 0
    model_version: str = ""
    good_call: bytes = b""
    good_reply: bytes = b""
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))

    def __post_init__(self) -> None:
        self._unary = {rpc: self.channel.unary_unary(SERVICE + rpc) for rpc in RPCS}
        self._stream = self.channel.unary_stream(SERVICE + "SampleStream")
        self._health = health_pb2_grpc.HealthStub(self.channel)
        info = vae_pb2.ModelInfo.FromString(
            self._unary["GetModelInfo"](b"", timeout=CALL_TIMEOUT))
        self.latent_dim, self.model_version = info.latent_dim, info.model_version
        z = np.linspace(-2, 2, 3 * self.latent_dim, dtype=np.float32).reshape(3, -1)
        self.good_call = vae_pb2.DecodeRequest(z=vae_pb2.Tensor(
            dtype=vae_pb2.FLOAT32, shape=z.shape, data=z.tobytes())).SerializeToString()
        self.good_reply = self._unary["Decode"](self.good_call, timeout=CALL_TIMEOUT)

    def send(self, rpc: str, payloads: Sequence[bytes]) -> list[Answer]:
        """Every payload at once; the answers in order."""
        self.cases[rpc] += len(payloads)
        if rpc == "SampleStream":
            answers = [self._read_stream(call)
                       for call in [self._stream(p, timeout=CALL_TIMEOUT) for p in payloads]]
        else:
            futures = [self._unary[rpc].future(p, timeout=CALL_TIMEOUT) for p in payloads]
            answers = []
            for f in futures:
                try:
                    answers.append(Answer(grpc.StatusCode.OK, "", [f.result()]))
                except grpc.RpcError as err:
                    answers.append(Answer(err.code(), err.details() or "", []))
        for a in answers:
            self.codes[rpc][a.code.name] += 1
        return answers

    @staticmethod
    def _read_stream(call: Any) -> Answer:
        chunks: list[bytes] = []
        try:
            for chunk in call:
                chunks.append(chunk)
                if len(chunks) == STREAM_CHUNKS:
                    call.cancel()  # enough read: an OK stream, cut short by us
                    break
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED or len(chunks) < STREAM_CHUNKS:
                return Answer(err.code(), err.details() or "", chunks)
        return Answer(grpc.StatusCode.OK, "", chunks)

    def still_serving(self) -> None:
        """A good call gets the same bytes as at the start, and health says SERVING."""
        assert self.proc.poll() is None, f"the server exited with {self.proc.returncode}"
        reply = self._unary["Decode"](self.good_call, timeout=CALL_TIMEOUT)
        assert reply == self.good_reply, "a good Decode call no longer gets the same bytes"

    def healthy(self) -> None:
        reply = self._health.Check(health_pb2.HealthCheckRequest(service=""), timeout=CALL_TIMEOUT)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _drain(proc: subprocess.Popen[str], log: list[str]) -> None:
    """Read the server's output as it comes: a full pipe would block the server."""
    assert proc.stdout is not None
    for line in proc.stdout:
        log.append(line)


@pytest.fixture(scope="module")
def server(model_dir: Any) -> Iterator[FuzzServer]:
    with served_process(model_dir, *SERVER_FLAGS) as (target, proc):
        log: list[str] = []
        threading.Thread(target=_drain, args=(proc, log), daemon=True).start()
        options = [("grpc.max_receive_message_length", 64 << 20),
                   ("grpc.max_send_message_length", 64 << 20)]
        with grpc.insecure_channel(target, options=options) as channel:
            srv = FuzzServer(target, proc, channel, log)
            yield srv
            # `pytest -s` shows how many requests each RPC took, and how they ended.
            for rpc in RPCS:
                print(f"fuzz {rpc}: {srv.cases[rpc]} requests, {dict(srv.codes[rpc])}")
            assert proc.poll() is None, "".join(log[-50:])


def _describe(rpc: str, payload: bytes, a: Answer) -> str:
    """The request (tensor data as its length) and how it ended, for a failure message."""
    try:
        msg: Any = REQUEST[rpc].FromString(payload)
    except Exception:  # noqa: BLE001
        text = f"{len(payload)} bytes that do not parse: {payload[:64].hex()}"
    else:
        lengths = {}
        for name in ("images", "z"):
            if name in msg.DESCRIPTOR.fields_by_name and msg.HasField(name):
                lengths[name] = len(getattr(msg, name).data)
                getattr(msg, name).data = b""
        text = f"{{{text_format.MessageToString(msg, as_one_line=True)}}}, data bytes {lengths}"
    return f"{rpc} {text}\n-> {a.code.name}: {a.details}"


def _check_reply(rpc: str, payload: bytes, replies: list[bytes], latent_dim: int) -> None:
    """An OK reply has the shape and the size that the request asked for."""
    req: Any = REQUEST[rpc].FromString(payload)

    def images_of(t: vae_pb2.Tensor, n: int, dtype: int) -> None:
        want = vae_pb2.UINT8 if dtype == vae_pb2.UINT8 else vae_pb2.FLOAT32
        assert t.dtype == want and list(t.shape) == [n, 28, 28]
        assert len(t.data) == n * 784 * (1 if want == vae_pb2.UINT8 else 4)
        if want == vae_pb2.FLOAT32:
            x = np.frombuffer(t.data, np.float32)
            assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 1

    def latents_of(t: vae_pb2.Tensor, n: int) -> None:
        assert t.dtype == vae_pb2.FLOAT32 and list(t.shape) == [n, latent_dim]
        assert len(t.data) == n * latent_dim * 4

    if rpc == "GetModelInfo":
        assert vae_pb2.ModelInfo.FromString(replies[0]).latent_dim == latent_dim
    elif rpc == "Encode":
        r = vae_pb2.EncodeResponse.FromString(replies[0])
        n = req.images.shape[0]
        latents_of(r.mu, n)
        latents_of(r.logvar, n)
        if req.sample:
            latents_of(r.z, n)
        else:
            assert not r.HasField("z")
    elif rpc == "Decode":
        images_of(vae_pb2.DecodeResponse.FromString(replies[0]).images, req.z.shape[0],
                  req.output_dtype)
    elif rpc == "Sample":
        r = vae_pb2.SampleResponse.FromString(replies[0])
        images_of(r.images, req.n, req.output_dtype)
        if req.return_latents:
            latents_of(r.latents, req.n)
    elif rpc == "SampleStream":
        chunk = req.chunk_size or 16
        first = req.offset
        assert replies, "an OK stream sent no chunk"
        for raw in replies:
            c = vae_pb2.SampleChunk.FromString(raw)
            size = min(chunk, req.n - first)
            assert c.offset == first
            images_of(c.images, size, req.output_dtype)
            first += size
    elif rpc == "LogLikelihood":
        r = vae_pb2.LogLikelihoodResponse.FromString(replies[0])
        n = req.images.shape[0]
        assert r.k == req.k and len(r.elbo) == len(r.log_likelihood) == len(r.anomaly) == n
        assert all(math.isfinite(v) for v in (*r.elbo, *r.log_likelihood, *r.bits_per_dim))
        assert all(0 <= p <= 100 for p in r.percentile)


def check_batch(server: FuzzServer, rpc: str, payloads: Sequence[bytes]) -> None:
    """The property: every answer is OK with a well-formed reply, or a status that is the
    caller's to fix; an INVALID_ARGUMENT names its field; the server serves on."""
    answers = server.send(rpc, payloads)
    for payload, a in zip(payloads, answers, strict=True):
        if a.code == grpc.StatusCode.FAILED_PRECONDITION:  # a model_version, not the one served
            version = REQUEST[rpc].FromString(payload).model_version if parses(rpc, payload) \
                else ""
            assert version not in ("", server.model_version), _describe(rpc, payload, a)
            assert a.details.startswith("model_version: "), _describe(rpc, payload, a)
            continue
        assert a.code in ALLOWED, _describe(rpc, payload, a)
        if a.code == grpc.StatusCode.INVALID_ARGUMENT:
            assert FIELD_NAMED.match(a.details), "names no field: " + _describe(rpc, payload, a)
        if a.code == grpc.StatusCode.OK:
            assert parses(rpc, payload), "OK for bytes that do not parse: " + _describe(rpc, payload, a)
            try:
                _check_reply(rpc, payload, a.replies, server.latent_dim)
            except AssertionError as exc:
                raise AssertionError(f"a wrong reply ({exc}): {_describe(rpc, payload, a)}") from None
    server.still_serving()


def _fuzz(server: FuzzServer, rpc: str, strategy: st.SearchStrategy[bytes], examples: int
          ) -> None:
    @settings(FUZZ, max_examples=examples)
    @given(st.lists(strategy, min_size=PER_EXAMPLE, max_size=PER_EXAMPLE))
    def prop(payloads: list[bytes]) -> None:
        check_batch(server, rpc, payloads)

    before = server.cases[rpc]
    prop()
    assert server.cases[rpc] - before >= examples * PER_EXAMPLE
    server.healthy()


# -- the tests ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rpc", RPCS)
def test_malformed_requests_get_a_callers_status(server: FuzzServer, rpc: str) -> None:
    _fuzz(server, rpc, requests(rpc, server.latent_dim), EXAMPLES)


@pytest.mark.parametrize("rpc", RPCS)
def test_damaged_bytes_never_hang_the_server(server: FuzzServer, rpc: str) -> None:
    """Raw bytes, and requests damaged on the wire: each gets a caller's status (bytes that
    are not the request message: INVALID_ARGUMENT), and none hangs or stops the server."""
    _fuzz(server, rpc, raw_payloads(rpc, server.latent_dim), RAW_EXAMPLES)


# -- faults the fuzzer found ---------------------------------------------------------------------

@pytest.mark.parametrize("rpc", RPCS)
def test_unparseable_bytes_are_invalid_argument(server: FuzzServer, rpc: str) -> None:
    """Found by the fuzzer: these got UNKNOWN ('Unexpected <class DecodeError>'), from
    grpc.aio's own deserializer, before the handlers parsed their requests."""
    @settings(FUZZ, max_examples=50)
    @given(st.binary(min_size=1, max_size=64).filter(lambda b: not parses(rpc, b)))
    @example(b"\xff")  # a field number of 0 / a truncated varint
    @example(b"\x0a\x05abc")  # a length past the end of the message
    def prop(payload: bytes) -> None:
        check_batch(server, rpc, [payload])
        [a] = server.send(rpc, [payload])
        assert a.code == grpc.StatusCode.INVALID_ARGUMENT, _describe(rpc, payload, a)

    prop()


@st.composite
def shapes_numpy_cannot_hold(draw: st.DrawFn) -> list[int]:
    """Shapes whose byte length agrees with the data but that numpy cannot reshape to: more
    dimensions than numpy's 64 (or than the API's limit), or an empty tensor whose other
    dimensions multiply past the address space."""
    if draw(booleans):
        return [1] * draw(st.integers(33, 100))
    huge = draw(st.sampled_from((I64_MAX, 2**62, 2**61)))
    return draw(st.permutations([0, huge, *draw(st.lists(st.sampled_from((1, 784, huge)),
                                                         max_size=2))]))


@pytest.mark.parametrize("rpc", ("Encode", "Decode", "LogLikelihood"))
def test_shapes_numpy_cannot_hold(server: FuzzServer, rpc: str) -> None:
    """Found by the fuzzer: these got INTERNAL (numpy's ValueError escaped from_tensor)."""
    def payload(shape: list[int]) -> bytes:
        data = b"\0" * (4 if math.prod(shape) else 0)
        tensor = vae_pb2.Tensor(dtype=vae_pb2.FLOAT32, shape=shape, data=data)
        base = REQUEST[rpc](k=1) if rpc == "LogLikelihood" else REQUEST[rpc]()
        return base.SerializeToString() + _len_field(1, tensor.SerializeToString())

    @settings(FUZZ, max_examples=50)
    @given(shapes_numpy_cannot_hold())
    @example([1] * 65)
    @example([I64_MAX, 0])
    @example([2**40, 2**40, 0])
    def prop(shape: list[int]) -> None:
        payloads = [payload(shape)]
        check_batch(server, rpc, payloads)
        [a] = server.send(rpc, payloads)
        assert a.code == grpc.StatusCode.INVALID_ARGUMENT, _describe(rpc, payloads[0], a)

    prop()

"""vae_client.errors: VaeError crosses a process boundary as itself (a Ray task's error), a
broken stream offers a resume offset only where the same request can succeed, and a number
too large for its field is a VaeError, as the README promises of every failure."""

from __future__ import annotations

import asyncio
import pickle
import re

import grpc
import numpy as np
import pytest

from vae_client import VaeClient, VaeError
from vae_client.aio import AsyncVaeClient
from vae_client.bench import build_request
from vae_client.errors import stream_error
from vae_core.ports import free_port


def test_a_vae_error_pickles_as_itself():
    """Before: VaeError could not be unpickled (its __init__ needs code and details), so a
    failed bulk shard reached the driver as Ray's UnserializableException, a traceback."""
    err = VaeError(grpc.StatusCode.INVALID_ARGUMENT, "chunk_size: 1000 is out of range", 7)
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, VaeError) and str(back) == str(err)
    assert (back.code, back.details, back.resume_offset) == (err.code, err.details, 7)


class _RpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return "details"


@pytest.mark.parametrize("code,resumable", [
    (grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.INTERNAL, True),
    (grpc.StatusCode.DEADLINE_EXCEEDED, True), (grpc.StatusCode.RESOURCE_EXHAUSTED, True),
    (grpc.StatusCode.INVALID_ARGUMENT, False), (grpc.StatusCode.UNAUTHENTICATED, False),
])
def test_a_stream_error_offers_a_resume_only_where_it_can_help(code, resumable):
    """Before: `sample --digit 11` said 'the same request with offset=0 resumes it'."""
    err = stream_error(_RpcError(code), 40)
    assert err.code == code
    assert (err.resume_offset == 40) == resumable
    assert ("offset=40 resumes it" in str(err)) == resumable


def test_a_chunk_over_the_client_s_limit_offers_no_resume():
    """Before: 'the same request with offset=0 resumes it', which fails the same way, and
    `vae-client bulk`, which waits out a RESOURCE_EXHAUSTED that offers a resume (a full
    queue), retried it for 5 minutes."""
    err = _RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED)
    err.details = lambda: ("Stream removed (CLIENT: Received message larger than max "  # type: ignore[method-assign]
                           "(3136018 vs. 1048576))")
    out = stream_error(err, 0)
    assert out.code == grpc.StatusCode.RESOURCE_EXHAUSTED and out.resume_offset is None
    assert "resumes it" not in str(out)


U32, U64 = 2**32 - 1, 2**64 - 1
IMAGE = np.zeros((1, 784), np.float32)


@pytest.mark.parametrize("call,field,limit", [
    (lambda c: c.sample(U32 + 1), "n", U32),
    (lambda c: c.sample(4, digit=U32 + 1), "digit", U32),
    (lambda c: c.sample(4, digit=-1), "digit", U32),
    (lambda c: c.sample(4, seed=U64 + 1), "seed", U64),
    (lambda c: c.sample(4, seed=-1), "seed", U64),
    (lambda c: next(c.sample_stream(U64 + 1)), "n", U64),
    (lambda c: next(c.sample_stream(100, chunk_size=U32 + 1)), "chunk_size", U32),
    (lambda c: next(c.sample_stream(100, offset=-1)), "offset", U64),
    (lambda c: c.log_likelihood(IMAGE, k=U32 + 1), "k", U32),
    (lambda c: c.log_likelihood(IMAGE, offset=U64 + 1), "offset", U64),
    (lambda c: c.encode(IMAGE, sample=True, seed=U64 + 1), "seed", U64),
])
def test_a_number_too_large_for_its_field_is_invalid_argument(call, field, limit):
    """Before: protobuf's ValueError ('Value out of range: 4294967296'), which names neither
    the field nor its limit, and is no VaeError. Refused before anything is sent (no server
    listens at the target)."""
    with VaeClient(f"127.0.0.1:{free_port()}") as c, pytest.raises(VaeError) as err:
        call(c)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith(f"{field}: ") and f".. {limit}" in err.value.details


def test_the_async_client_refuses_them_too():
    async def main() -> None:
        async with AsyncVaeClient(f"127.0.0.1:{free_port()}") as c:
            await c.log_likelihood(IMAGE, k=U32 + 1)

    with pytest.raises(VaeError) as err:
        asyncio.run(main())
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details == f"k: {U32 + 1} is out of range; it must be 0 .. {U32}"


@pytest.mark.parametrize("method,kw,field", [
    ("sample", {"batch": U32 + 1}, "n"), ("loglik", {"k": U32 + 1}, "k"),
    ("stream", {"batch": U32 + 1}, "chunk_size"), ("stream", {"stream_n": U64 + 1}, "n"),
])
def test_the_load_generator_s_requests_too(method, kw, field):
    kw = {"batch": 1, **kw}
    with pytest.raises(VaeError) as err:
        build_request(method, latent_dim=4, **kw)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details.startswith(f"{field}: ")


def test_the_largest_numbers_that_fit_are_sent():
    """The check refuses only what cannot be sent: the limits themselves go to the server
    (which none is here: UNAVAILABLE, not INVALID_ARGUMENT)."""
    with VaeClient(f"127.0.0.1:{free_port()}", retries=0, timeout=5) as c,\
            pytest.raises(VaeError) as err:
        c.sample(U32, seed=U64, digit=U32)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE


NO_SERVER = "127.0.0.1:1"  # nothing listens on port 1: a call that is sent fails UNAVAILABLE


@pytest.mark.parametrize("call,field", [
    (lambda c: c.sample("3"), "n"),
    (lambda c: c.sample(2.0), "n"),
    (lambda c: c.sample(True), "n"),
    (lambda c: c.sample(2, seed=None), "seed"),
    (lambda c: c.sample(2, seed=1.5), "seed"),
    (lambda c: c.sample(2, digit="3"), "digit"),
    (lambda c: c.sample(2, digit=True), "digit"),
    (lambda c: c.sample(2, digit=3.0), "digit"),
    (lambda c: next(c.sample_stream(10, offset=None)), "offset"),
    (lambda c: c.log_likelihood(IMAGE, k=1.5), "k"),
    (lambda c: c.encode(IMAGE, sample="yes"), "sample"),
    (lambda c: c.encode(IMAGE, sample=2), "sample"),
    (lambda c: c.encode("abc"), "images"),
    (lambda c: c.encode([[0.5] * 784, [0.5] * 3]), "images"),
    (lambda c: c.encode(IMAGE.astype(np.complex64)), "images"),
    (lambda c: c.decode("abc"), "z"),
    (lambda c: c.decode(np.zeros((1, 4), np.complex64)), "z"),
    (lambda c: c.sample(2, timeout="5"), "timeout"),
    (lambda c: c.sample(2, timeout=float("nan")), "timeout"),
    (lambda c: c.sample(2, timeout=1e12), "timeout"),
    (lambda c: next(c.sample_stream(10, timeout=float("nan"))), "timeout"),
])
def test_a_value_of_another_type_is_invalid_argument_naming_the_field(call, field):
    """Before: TypeError or ValueError from the range check, protobuf or numpy, naming no
    field ("'<=' not supported between instances of 'int' and 'str'"), or, for seed=None,
    seed 0 without a word, for sample=2 a bool, for complex images a warning and the real
    part, for a timeout of 1e12 s DEADLINE_EXCEEDED from gRPC at once. Refused before anything
    is sent: nothing listens at the target."""
    with VaeClient(NO_SERVER, retries=0) as c, pytest.raises(VaeError) as err:
        call(c)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert err.value.details.startswith(f"{field}: "), err.value.details


def test_numpy_numbers_of_every_kind_are_taken():
    """What is a whole number to numpy is one here, and a pixel array of another float type
    is float32; these reach the wire (no server: UNAVAILABLE, not INVALID_ARGUMENT)."""
    with VaeClient(NO_SERVER, retries=0, timeout=np.float32(5)) as c:
        for call in (lambda: c.sample(np.int64(2), seed=np.uint64(3), digit=np.int8(4)),
                     lambda: c.encode(IMAGE.astype(np.float16), sample=np.bool_(True)),
                     lambda: c.log_likelihood(IMAGE.astype(bool), k=np.int32(5))):
            with pytest.raises(VaeError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value


def test_integer_pixels_are_read_as_the_command_reads_them():
    """Before: the library sent an int64 array as float32 (0 .. 255 refused as 'FLOAT32
    pixels must lie in [0, 1]', 0/1 digits scored as full ink), where `vae-client score` read
    the same array as uint8 (0/1 digits as all but black): the same data scored differently.
    One rule now, which refuses integers of 0 and 1 alone as ambiguous."""
    from vae_client._codec import images_tensor
    from vae_client.images import ImageFileError, as_images

    digits = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    for ints in (digits, digits.astype(np.int16)):
        as_uint8 = ints.astype(np.uint8)
        assert images_tensor(ints) == images_tensor(as_uint8)
        assert images_tensor(as_images(ints, "x.npy")) == images_tensor(as_uint8)
    binary = (digits > 127).astype(np.int64)
    with pytest.raises(VaeError, match="int64 pixels of 0 and 1 alone are ambiguous"):
        images_tensor(binary)
    with pytest.raises(ImageFileError, match=r"^x\.npy: int64 pixels of 0 and 1 alone"):
        as_images(binary, "x.npy")
    # As bool or float they are binarised digits, 1 full ink.
    assert images_tensor(binary.astype(bool)) == images_tensor(binary.astype(np.float32))
    with pytest.raises(VaeError) as err:
        images_tensor(digits + 1)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details == "images: integer pixels must lie in 0 .. 255; found values in 1 .. 256"
    with pytest.raises(ImageFileError, match=r"^x\.npy: integer pixels must lie in 0 \.\. 255"):
        as_images(digits - 1, "x.npy")


@pytest.mark.parametrize("timeout", [float("inf"), None])
def test_an_infinite_timeout_is_no_deadline(timeout):
    """Before: timeout=inf (or any value past gRPC's 64-bit nanoseconds) failed every call at
    once with DEADLINE_EXCEEDED, the code of a call whose time ran out. Now it is no
    deadline: the call is sent and fails as calls to no server do."""
    with VaeClient(NO_SERVER, retries=0, timeout=timeout) as c, pytest.raises(VaeError) as err:
        c.sample(2, timeout=float("inf"))
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value

    async def main() -> None:
        async with AsyncVaeClient(NO_SERVER, retries=0, timeout=timeout) as c:
            await c.sample(2)

    with pytest.raises(VaeError) as err:
        asyncio.run(main())
    assert err.value.code == grpc.StatusCode.UNAVAILABLE, err.value


@pytest.mark.parametrize("make", [VaeClient, AsyncVaeClient])
@pytest.mark.parametrize("kw,message", [
    ({"timeout": float("nan")}, "timeout: nan s"), ({"timeout": 1e10}, "timeout: 1e+10 s"),
    ({"timeout": "30"}, "timeout: '30' is not a number"),
    ({"timeout": 0}, "timeout: 0 s; a client's timeout must be above 0"),
    ({"timeout": -1}, "timeout: -1 s; a client's timeout must be above 0"),
])
def test_a_client_of_a_bad_timeout_is_refused_when_made(make, kw, message):
    """Before: a client made with a timeout of 0 or less failed every call at once with
    DEADLINE_EXCEEDED; a call's own timeout of 0 or less still does, as gRPC's."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        make(NO_SERVER, **kw)


@pytest.mark.parametrize("make", [VaeClient, AsyncVaeClient])
def test_a_port_gRPC_would_misread_is_refused_when_made(make):
    """Before: VaeClient('127.0.0.1:112837') called the server on port 112837 - 65536 = 47301,
    gRPC taking the port modulo 65536; `vae-client --target` refused it already."""
    with pytest.raises(ValueError, match="port 112837 of '127.0.0.1:112837' is not in 1 .. 65535"):
        make("127.0.0.1:112837")


def test_a_second_sigterm_ends_the_command_at_once():
    """The first SIGTERM stops the command as Ctrl-C does; its clean-up may wait on a stalled
    server (`bulk --no-ray` without --timeout), so the second takes the default action, as
    every SIGTERM did before. Before: it was ignored, and only SIGKILL ended the command."""
    import signal

    from vae_core.signals import Terminated
    from vae_core.signals import terminate as _terminate

    before = signal.getsignal(signal.SIGTERM)
    try:
        signal.signal(signal.SIGTERM, _terminate)
        with pytest.raises(Terminated):
            _terminate(signal.SIGTERM, None)
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGTERM, before)


@pytest.mark.parametrize("timeout", [0, -1.0, float("-inf")])
def test_a_timeout_already_past_fails_the_call_at_once(timeout):
    """Against a server that would answer only after seconds: DEADLINE_EXCEEDED at once, as
    README says of a call's timeout of 0 or less (a guard of that promise, not of a bug)."""
    import threading
    import time

    from serving import stub_server

    release = threading.Event()

    def slow(raw: bytes, context: grpc.ServicerContext) -> bytes:
        release.wait(10)
        return b""

    handlers = {"Sample": grpc.unary_unary_rpc_method_handler(slow)}
    with stub_server(handlers) as target, VaeClient(target, retries=0) as c:
        try:
            began = time.monotonic()
            with pytest.raises(VaeError) as err:
                c.sample(2, timeout=timeout)
            assert time.monotonic() - began < 2
        finally:
            release.set()
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value


@pytest.mark.parametrize("timeout", [0, -1.0])
def test_a_timeout_already_past_fails_even_a_quick_call(timeout):
    """Before: gRPC raced the deadline against the reply, and a server that answered at once
    won about half the time: a caller whose budget had run out could not tell what to expect.
    No call is sent now, a stream's neither."""
    from serving import stub_server
    from vae_proto import vae_pb2

    calls = []

    def quick(raw: bytes, context: grpc.ServicerContext) -> bytes:
        calls.append(1)
        return vae_pb2.SampleResponse().SerializeToString()

    def stream(raw: bytes, context: grpc.ServicerContext):
        calls.append(1)
        return iter(())

    handlers = {"Sample": grpc.unary_unary_rpc_method_handler(quick),
                "SampleStream": grpc.unary_stream_rpc_method_handler(stream)}
    with stub_server(handlers) as target, VaeClient(target, retries=0) as c:
        for _ in range(20):
            with pytest.raises(VaeError) as err:
                c.sample(1, timeout=timeout)
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
            with pytest.raises(VaeError) as err:
                list(c.sample_stream(1, timeout=timeout))
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value

        async def main() -> None:
            async with AsyncVaeClient(target, retries=0) as c:
                await c.sample(1, timeout=timeout)

        with pytest.raises(VaeError) as err:
            asyncio.run(main())
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
    assert calls == []


@pytest.mark.parametrize("make", [VaeClient, AsyncVaeClient])
@pytest.mark.parametrize("kw,message", [
    ({"retries": 2.5}, "retries: 2.5 is not a whole number"),
    ({"retries": -1}, "retries: -1; it must be 0 or more"),
    ({"retries": True}, "retries: True is not a whole number"),
    ({"max_message_mb": 64.5}, "max_message_mb: 64.5 is not a whole number"),
    ({"max_message_mb": "64"}, "max_message_mb: '64' is not a whole number"),
])
def test_retries_and_message_sizes_of_another_type_are_refused_when_made(make, kw, message):
    """Before: retries=2.5 made a client whose every call failed INVALID_ARGUMENT 'Failed to
    create channel' (gRPC could not parse its own retry policy), and max_message_mb=64.5 or
    '64' raised a TypeError about operands."""
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        make(NO_SERVER, **kw)


def test_decode_checks_model_version_as_the_other_calls_do():
    """Before: decode sent model_version=None (the others refuse it) and raised protobuf's
    TypeError for model_version=5, where encode answered INVALID_ARGUMENT naming it."""
    for version, message in ((5, "model_version: 5 is not a string"),
                             (None, "model_version: None; it must be given")):
        with VaeClient(NO_SERVER, retries=0, model_version=version) as c:
            for call in (lambda: c.decode(np.zeros((1, 4))), lambda: c.encode(IMAGE)):
                with pytest.raises(VaeError) as err:
                    call()
                assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, err.value
                assert err.value.details == message


def test_uint8_pixels_of_0_and_1_alone_are_ambiguous_too():
    """Before: binarised digits as uint8 0/1 ((x > 127).astype(np.uint8), the usual way to
    keep them) were sent as 8-bit pixels, all but black, and scored as nothing like digits
    without an error; as int64 they were refused as ambiguous."""
    from vae_client._codec import images_tensor
    from vae_client.images import ImageFileError, as_images

    binary = (np.random.default_rng(0).integers(0, 256, (3, 28, 28)) > 127).astype(np.uint8)
    with pytest.raises(VaeError, match="uint8 pixels of 0 and 1 alone are ambiguous"):
        images_tensor(binary)
    with pytest.raises(ImageFileError, match=r"^x\.npy: uint8 pixels of 0 and 1 alone"):
        as_images(binary, "x.npy")
    assert images_tensor(binary * 255).data == (binary * 255).tobytes()
    assert images_tensor(np.zeros((1, 28, 28), np.uint8)).shape == [1, 28, 28]


def test_ambiguous_images_are_judged_one_by_one():
    """Before: a file of 8-bit digits and binarised ones was accepted whole (its largest pixel
    255), then `vae-client score` refused its second --batch part after scoring the first,
    and wrote nothing. Each image is judged alone now, so the whole file is refused first."""
    from vae_client._codec import images_tensor
    from vae_client.images import ImageFileError, as_images

    digits = np.random.default_rng(0).integers(0, 256, (4, 28, 28)).astype(np.uint8)
    mixed = np.concatenate([digits, (digits > 127).astype(np.uint8)])
    with pytest.raises(VaeError, match=r"ambiguous \(image 4 and others\)"):
        images_tensor(mixed)
    with pytest.raises(ImageFileError, match=r"^x\.npy: uint8 pixels of 0 and 1 alone"):
        as_images(mixed, "x.npy")
    assert images_tensor(digits).shape == [4, 28, 28]


@pytest.mark.parametrize("make", [VaeClient, AsyncVaeClient])
def test_numpy_retries_make_a_client(make):
    """Before: retries=np.int64(2) passed the check, then the retry policy's JSON failed with
    TypeError: the channel took the number as given."""
    async def made() -> None:
        client = make(NO_SERVER, retries=np.int64(2))
        assert client.retries == 2 and type(client.retries) is int
        await client.close() if make is AsyncVaeClient else client.close()

    asyncio.run(made())


def test_a_stream_whose_time_ran_out_resumes_where_it_began():
    """Before: timeout=0 gave no resume offset, and a timeout that ran out before the first
    try said the stream could not be 'resumed'."""
    with VaeClient(NO_SERVER, retries=0) as c:
        for timeout in (0, 1e-9):
            with pytest.raises(VaeError) as err:
                list(c.sample_stream(5, offset=2, timeout=timeout))
            assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, err.value
            assert err.value.resume_offset == 2 and "resumed" not in err.value.details


def test_main_leaves_an_ignored_sigterm_ignored(monkeypatch):
    """vae-client raises on SIGTERM while it works, except where SIGTERM is ignored (`trap ''
    TERM`, or nohup-like parents): before, it put its handler over the parent's choice, as
    vae-export did until a review; afterwards the caller's handler is back."""
    import signal

    from serving import check_sigterm_left_as_the_caller_set
    from vae_client import __main__ as cli

    during: list[object] = []
    monkeypatch.setattr(cli, "run_info", lambda args: during.append(
        signal.getsignal(signal.SIGTERM)) or 0)
    check_sigterm_left_as_the_caller_set(lambda: cli.main(["--target", NO_SERVER, "info"]),
                                         during)

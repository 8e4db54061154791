"""vae_client.errors: VaeError crosses a process boundary as itself (a Ray task's error), a
broken stream offers a resume offset only where the same request can succeed, and a number
too large for its field is a VaeError, as the README promises of every failure."""

from __future__ import annotations

import asyncio
import pickle

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

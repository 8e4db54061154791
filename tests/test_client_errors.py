"""vae_client.errors: VaeError crosses a process boundary as itself (a Ray task's error), and
a broken stream offers a resume offset only where the same request can succeed."""

from __future__ import annotations

import pickle

import grpc
import pytest

from vae_client import VaeError
from vae_client.errors import stream_error


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

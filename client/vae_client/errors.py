"""The one exception type of the client library."""

from __future__ import annotations

import grpc


class VaeError(Exception):
    """A call failed: `code` is the grpc.StatusCode, `details` the server's message. For a
    SampleStream that broke off, `resume_offset` is the first image not received: the same
    request with offset=resume_offset goes on with exactly the images that were missed."""

    def __init__(self, code: grpc.StatusCode, details: str,
                 resume_offset: int | None = None) -> None:
        self.code = code
        self.details = details
        self.resume_offset = resume_offset
        message = self.status
        if resume_offset is not None:
            message += (f" (the stream stopped before image {resume_offset}: the same request "
                        f"with offset={resume_offset} resumes it)")
        super().__init__(message)

    @property
    def status(self) -> str:
        """The status alone, "CODE: details", without the resume hint."""
        return f"{self.code.name}: {self.details}"

    def __reduce__(self) -> tuple[type[VaeError], tuple[grpc.StatusCode, str, int | None]]:
        # Pickled as its arguments: a Ray task's error then reaches the driver as itself.
        return VaeError, (self.code, self.details, self.resume_offset)

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError, resume_offset: int | None = None) -> VaeError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code, details or "", resume_offset)


# Statuses that the same request would get again: a stream they end is not resumed by offset.
NOT_RESUMABLE = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.NOT_FOUND})


# gRPC's words for a message over a limit (RESOURCE_EXHAUSTED, as a full queue is): a chunk
# larger than the client takes is as large again when the stream is asked for again.
TOO_LARGE = "larger than max"


def stream_error(err: grpc.RpcError, resume: int) -> VaeError:
    """The error of a stream that broke off before image `resume`, with the offset that
    resumes it unless the same request would fail the same way."""
    code = err.code() if hasattr(err, "code") else None
    details = (err.details() if hasattr(err, "details") else "") or ""
    again = code in NOT_RESUMABLE or (code == grpc.StatusCode.RESOURCE_EXHAUSTED
                                      and TOO_LARGE in details)
    return VaeError.from_rpc_error(err, None if again else resume)


def stream_resumable(err: grpc.RpcError, progressed: bool, retries: int) -> bool:
    """Whether a SampleStream that broke with `err` goes on from where it stopped: its server
    went away (UNAVAILABLE: killed, restarted, or its connection aged out) after this try of
    the stream brought images, and retries are on. A try that brings none ends it: gRPC has
    already retried the call itself, so no server is there to take it."""
    code = err.code() if hasattr(err, "code") else None
    return progressed and code == grpc.StatusCode.UNAVAILABLE and retries > 0

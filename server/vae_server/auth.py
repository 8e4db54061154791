"""Transport security and bearer tokens of the gRPC port.

TLS (and mutual TLS) is gRPC's own: `server_credentials` turns the settings into
grpc.ServerCredentials. Tokens are checked by `TokenCheck`, which `guard_handlers` puts in
front of every vae.v1 method handler, and only when tokens are configured (no cost
otherwise). Health and reflection are not guarded, so that load balancers and probes need no
secret.

The check wraps the method handlers, as the gRPC metrics do (instrument.py), rather than
being a server interceptor: registered inside the metrics' wrappers, a refused call is
counted as handled with code UNAUTHENTICATED like any other, and no call pays an
interceptor's extra coroutine and rebuilt handler.

No token, presented or configured, is ever written to a log or an error message.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import grpc

from vae_core.security import PRIVATE_KEY, read_pem
from vae_server.config import Settings
from vae_server.instrument import wrap_handler
from vae_server.metrics import Metrics

log = logging.getLogger(__name__)

METADATA_KEY = "authorization"
SCHEME = "bearer"


class TlsFiles(NamedTuple):
    """The PEM bytes of --tls-key, --tls-cert and --tls-client-ca (None: no client CA)."""
    key: bytes
    cert: bytes
    client_ca: bytes | None

    def __repr__(self) -> str:  # never the private key, in a log or a traceback
        return f"TlsFiles(key=<{len(self.key)} bytes>, cert=<{len(self.cert)} bytes>, ...)"


def read_tls_files(settings: Settings) -> TlsFiles | None:
    """What the TLS settings' files hold now; None for plaintext."""
    if not settings.tls:
        return None
    return TlsFiles(read_pem(settings.tls_key, "--tls-key", PRIVATE_KEY),
                    read_pem(settings.tls_cert, "--tls-cert"),
                    read_pem(settings.tls_client_ca, "--tls-client-ca")
                    if settings.tls_client_ca else None)


def server_credentials(settings: Settings, files: TlsFiles | None = None
                       ) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port, requiring client certificates signed by
    --tls-client-ca when it is set; None for plaintext. Of `files` where given (what the
    files held when the server started: --workers), else of the files as they are."""
    if not settings.tls:
        return None
    pem = files or read_tls_files(settings)
    assert pem is not None
    return grpc.ssl_server_credentials([(pem.key, pem.cert)], root_certificates=pem.client_ca,
                                       require_client_auth=pem.client_ca is not None)


def describe(settings: Settings) -> str:
    """What protects the gRPC port, in words fit for the log: never a token."""
    if not settings.tls:
        transport = "plaintext (no TLS)"
    elif settings.tls_client_ca:
        transport = f"mutual TLS (client certificates checked against {settings.tls_client_ca})"
    else:
        transport = "TLS"
    n = len(settings.auth_tokens)
    tokens = f"bearer tokens on ({n} token{'s' if n != 1 else ''})" if n else "bearer tokens off"
    return f"{transport}, {tokens}"


def _digest(token: str | bytes) -> bytes:
    # Comparing fixed-length digests keeps compare_digest's time independent of the length
    # of the token presented, as well as of its content.
    return hashlib.sha256(token.encode("utf-8") if isinstance(token, str) else token).digest()


class TokenCheck:
    """Accepts a call whose metadata holds `authorization: Bearer TOKEN` with one of the
    configured tokens; refuses any other with UNAUTHENTICATED, counted as
    vae_rejected_total{reason="unauthenticated"}."""

    def __init__(self, tokens: Iterable[str], metrics: Metrics | None = None) -> None:
        self._digests = [_digest(t) for t in tokens]
        if not self._digests:
            raise ValueError("TokenCheck needs at least one token")
        self._rejected = metrics.rejected.labels("unauthenticated") if metrics else None

    def _accepts(self, token: str | bytes) -> bool:
        presented = _digest(token)
        ok = False
        for known in self._digests:  # every one, whatever matched: no early exit
            ok |= hmac.compare_digest(presented, known)
        return ok

    def problem(self, metadata: Any) -> str | None:
        """None if the call may go on, else why not (for the caller and the debug log)."""
        values = [v for k, v in metadata or () if k == METADATA_KEY]
        if not values:
            return "missing bearer token: send metadata 'authorization: Bearer <token>'"
        bearer = False
        for value in values:
            text = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() != SCHEME:
                continue
            bearer = True
            if self._accepts(token.strip()):
                return None
        if not bearer:
            return "the authorization metadata must be 'Bearer <token>'"
        return "the bearer token is not accepted"

    async def enforce(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Return if the call may go on; else end it with UNAUTHENTICATED."""
        problem = self.problem(context.invocation_metadata())
        if problem is None:
            return
        if self._rejected is not None:
            self._rejected.inc()
        log.debug("UNAUTHENTICATED %s: %s", method, problem)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, problem)


def guard_handlers(service: str, handlers: Mapping[str, grpc.RpcMethodHandler],
                   check: TokenCheck) -> dict[str, grpc.RpcMethodHandler]:
    """The method handlers of `service`, each checking the caller's token before it runs.

    Register the result where the metrics wrap it (InstrumentedServer): the check then runs
    inside their count and timing, and a refused call is handled with code UNAUTHENTICATED.
    The request is parsed before the check, as gRPC has already received it whole.
    """
    return {name: _guarded(h, f"/{service}/{name}", check) for name, h in handlers.items()}


def _guarded(handler: grpc.RpcMethodHandler, method: str, check: TokenCheck
             ) -> grpc.RpcMethodHandler:
    return wrap_handler(handler, lambda b: _guarded_unary(b, method, check),
                        lambda b: _guarded_stream(b, method, check))


def _guarded_unary(behavior: Callable[..., Any], method: str, check: TokenCheck
                   ) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check.enforce(method, context)
        return await behavior(request, context)

    return guarded


def _guarded_stream(behavior: Callable[..., Any], method: str, check: TokenCheck
                    ) -> Callable[..., Any]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await check.enforce(method, context)
        async for item in behavior(request, context):
            yield item

    return guarded

"""Channels to a vae-server: plaintext or TLS, with a client certificate for mutual TLS,
and a bearer token. The one place where the sync client, the asyncio client, the load
generator and the CLI build their channels.

The token travels as `authorization: Bearer TOKEN` metadata, added to every call by a
client interceptor, with TLS or without. gRPC's call credentials would refuse a channel
without TLS, and a token over plaintext has its uses (behind a TLS-terminating proxy, on
loopback); without TLS it is sent in clear text, so prefer TLS wherever the network is not
trusted.
"""

from __future__ import annotations

import ipaddress
import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import grpc

from vae_client._codec import channel_options, check_retries
from vae_core.ports import keepalive_options
from vae_core.security import (
    CERTIFICATE,
    PRIVATE_KEY,
    TOKEN_RULE,
    check_ca,
    check_pair,
    read_pem,
    read_tokens,
    valid_token,
)

# PEM contents as bytes, or the path of a PEM file.
PemSource: TypeAlias = "bytes | str | os.PathLike[str]"
METADATA_KEY = "authorization"


def _pem(source: PemSource | None, option: str, kind: str = CERTIFICATE) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return read_pem(source, option, kind)


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The one token of a token file, read by the server's rules (vae_core.security): blank
    lines and lines starting with # are skipped, so a server's token file with a single token
    serves the client too."""
    tokens = read_tokens(path, "token file")
    if len(tokens) != 1:
        raise ValueError(f"{os.fspath(path)}: a client token file holds exactly one token, "
                         f"not {len(tokens)}")
    return tokens[0]


def _check_token(token: str) -> str:
    token = token.strip()
    if not valid_token(token):  # the message never repeats the token
        raise ValueError(f"a bearer token must be non-empty {TOKEN_RULE}")
    return token


@dataclass(frozen=True)
class Security:
    """How to reach the server: TLS (verifying the server against `root_certificates`, or
    the system's roots when None), a client certificate and key for mutual TLS, a bearer
    token. The default, Security(), is plaintext without a token."""

    tls: bool = False
    root_certificates: bytes | None = field(default=None, repr=False)
    certificate_chain: bytes | None = field(default=None, repr=False)
    private_key: bytes | None = field(default=None, repr=False)
    server_name: str | None = None  # the name the server's certificate must carry
    token: str | None = field(default=None, repr=False)

    @classmethod
    def from_options(cls, *, tls: bool = False, tls_ca: PemSource | None = None,
                     tls_cert: PemSource | None = None, tls_key: PemSource | None = None,
                     tls_server_name: str | None = None, token: str | None = None,
                     as_flags: bool = False) -> Security:
        """From the options that VaeClient, AsyncVaeClient and the CLI take. Each PEM
        option is the file's contents (bytes) or its path; giving any TLS option turns TLS
        on. Raises ValueError for a certificate without its key (or the reverse), and for a
        file that cannot be read or holds no PEM certificate (key), naming the option as the
        library spells it (tls_ca), or as the CLI does with `as_flags` (--tls-ca)."""
        def name(option: str) -> str:
            return "--" + option.replace("_", "-") if as_flags else option

        if (tls_cert is None) != (tls_key is None):
            raise ValueError(f"a client certificate ({name('tls_cert')}) and its key "
                             f"({name('tls_key')}) go together")
        on = tls or any(x is not None for x in (tls_ca, tls_cert, tls_key, tls_server_name))
        security = cls(tls=on, root_certificates=_pem(tls_ca, name("tls_ca")),
                       certificate_chain=_pem(tls_cert, name("tls_cert")),
                       private_key=_pem(tls_key, name("tls_key"), PRIVATE_KEY),
                       server_name=tls_server_name,
                       token=None if token is None else _check_token(token))
        # gRPC would find a bad CA or pair only at the handshake, after its retries, and say
        # "Failed to create security handshaker". OpenSSL reads files, not bytes: a pair
        # given as bytes is left to gRPC.
        if tls_ca is not None:
            check_ca(tls_ca, name("tls_ca"))
        if tls_cert is not None and tls_key is not None and not isinstance(tls_cert, bytes) \
                and not isinstance(tls_key, bytes):
            check_pair(tls_cert, tls_key, name("tls_cert"), name("tls_key"))
        return security

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((METADATA_KEY, f"Bearer {self.token}"),) if self.token else ()

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key,
                                            self.certificate_chain)

    def options(self, options: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        if self.tls and self.server_name:
            return [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return options


def resolve_security(security: Security | None, channel: object | None = None,
                     **options: Any) -> Security:
    """The Security of a client given either `security` or the separate options of
    Security.from_options (not both); none of them with a ready-made `channel`."""
    given = Security.from_options(**options)
    if security is not None and given != Security():
        raise ValueError("give either security or the separate TLS and token options")
    result = security or given
    if channel is not None and result != Security():
        raise ValueError("give either a channel or the TLS and token options, not both")
    return result


# -- retries ---------------------------------------------------------------------------------
# gRPC retries by itself what the service config allows: UNAVAILABLE (no server reached, or it
# went away), RESOURCE_EXHAUSTED (the server's queue was full: it refuses before running
# anything) and CANCELLED by the server (gRPC cancels the calls a server received but did not
# hand to a handler, past --max-pending-calls or when it stops; a call its own caller cancels is
# never retried), after an exponential back-off (each wait within 20 % of the current cap).
# It never retries a call once a reply has begun (a stream that has sent a chunk fails
# instead: resume it with `offset`). Throttling stops retrying while most calls fail, so that
# retries cannot multiply an overload. Every vae.v1 call is a pure function of its request
# (seeds included), so a retried call gives the answer the first would have.
DEFAULT_RETRIES = 4  # attempts after the first; gRPC allows at most 4
DEFAULT_MAX_MESSAGE_MB = 64  # the largest message a client sends or receives


# A target may name several servers (`ipv4:10.0.0.1:50051,10.0.0.2:50051`, or a DNS name
# with several addresses, `dns:///vae.default.svc:50051`): gRPC's round_robin policy keeps a
# connection to each and spreads the calls over them. The servers close connections after a
# while (vae-server --max-connection-age-s), and a reconnect resolves the name again, so
# replicas added since get their share.
LOAD_BALANCING: list[dict[str, Any]] = [{"round_robin": {}}]


# A server that stops answering without closing its connection (a hung host, a network cut)
# would keep a call waiting for its deadline, and a stream, which has none by default, for
# ever. Keepalive pings while calls are in flight find such a connection dead: its calls
# fail UNAVAILABLE, and a stream resumes by offset on another server. vae-server accepts
# pings this often (grpc.http2.min_ping_interval_without_data_ms); a proxy in between may
# need the same.
CLIENT_KEEPALIVE_S = 20
CLIENT_KEEPALIVE_TIMEOUT_S = 10
KEEPALIVE_OPTIONS = keepalive_options(CLIENT_KEEPALIVE_S * 1000,
                                      CLIENT_KEEPALIVE_TIMEOUT_S * 1000)


def retry_options(retries: int, max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
                  ) -> list[tuple[str, Any]]:
    """Channel options that balance calls over the target's servers (round_robin) and let
    gRPC retry vae.v1 calls, of requests up to `max_message_mb`, up to `retries` times (0:
    never)."""
    retries = check_retries(retries)
    if retries == 0:
        return [("grpc.enable_retries", 0),
                ("grpc.service_config", json.dumps({"loadBalancingConfig": LOAD_BALANCING}))]
    config = {
        "loadBalancingConfig": LOAD_BALANCING,
        "methodConfig": [{
            "name": [{"service": "vae.v1.VaeService"}],
            "retryPolicy": {
                "maxAttempts": min(retries, 4) + 1,
                "initialBackoff": "0.05s",
                "maxBackoff": "2s",
                "backoffMultiplier": 3,
                "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED", "CANCELLED"],
            },
        }],
        "retryThrottling": {"maxTokens": 20, "tokenRatio": 0.2},
    }
    # gRPC keeps a call's request for its retries only up to this size (256 KiB by default,
    # about 80 images), and past it gives up at the first refusal.
    return [("grpc.enable_retries", 1), ("grpc.service_config", json.dumps(config)),
            ("grpc.per_rpc_retry_buffer_size", max_message_mb << 20)]


# The schemes gRPC resolves itself; any other "name:rest" is a host and port (gRPC's own rule:
# a target whose scheme it does not know is read as dns:///target).
_GRPC_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p",
                 "passthrough")
_UNIX = ("unix", "unix-abstract")


def _addresses(target: str) -> list[str] | None:
    """The HOST:PORT addresses gRPC dials for `target`: an ipv4:/ipv6: list's entries (gRPC
    skips empty ones; ipv4:ADDR, ipv4:/ADDR and ipv4:///ADDR are all its), a dns: target's
    (after an authority: dns://AUTH/HOST:PORT), or the target itself; None for a Unix socket
    or a target gRPC resolves by other means."""
    scheme, colon, rest = target.partition(":")
    if scheme in ("ipv4", "ipv6"):
        return [entry for entry in rest.lstrip("/").split(",") if entry]
    if scheme == "dns":
        return [rest.lstrip("/").split("/", 1)[-1]]
    if colon and scheme in _GRPC_SCHEMES:
        return None
    return [target]


def check_target(target: str) -> str:
    """`target`, or ValueError where gRPC would misread it: a numeric port outside 1 .. 65535
    (gRPC takes it modulo 65536), an ipv4:/ipv6: entry that is no such address (gRPC logs its
    own parse errors before failing), an IPv6 address with a port but no brackets (read as a
    host name on port 443), an http:// URL, blanks. Forms gRPC parses itself are left to it."""
    scheme, colon, rest = target.partition(":")
    if colon and scheme in _UNIX and rest:
        return target  # a socket's path, which may hold blanks
    if not target or target != target.strip() or " " in target:
        raise ValueError(f"{target!r}: empty, or with blanks")
    if colon and "//" in rest[:2] and scheme.lower() in ("http", "https", "grpc", "grpcs"):
        raise ValueError(f"{target!r}: a gRPC target is HOST:PORT (or dns:///HOST:PORT), "
                         f"not a URL")
    addresses = _addresses(target)
    if addresses is None:
        return target
    if scheme in ("ipv4", "ipv6"):
        for entry in addresses:
            host, port = _host_port(entry)
            try:
                ip = ipaddress.ip_address(host)
            except ValueError:
                raise ValueError(f"{host!r} in {target!r} is not an {scheme} address") from None
            if ip.version != int(scheme[-1]):
                raise ValueError(f"{host!r} in {target!r} is not an {scheme} address")
            _check_port(port, target)
        if not addresses:
            raise ValueError(f"{target!r} lists no address")
        return target
    _check_port(_host_port(addresses[0])[1], target)
    return target


def leaves_host(target: str) -> bool:
    """Whether calls to `target` may leave this host: any address not on loopback, any name
    but localhost, any target gRPC resolves by other means (xds:, a proxy's). A Unix socket
    does not."""
    addresses = _addresses(target)
    if addresses is None:
        return target.partition(":")[0] not in _UNIX
    for entry in addresses:
        host = _host_port(entry)[0]
        if host == "localhost":
            continue
        try:
            if not ipaddress.ip_address(host).is_loopback:
                return True
        except ValueError:  # a host name: wherever it resolves
            return True
    return False


def _warn_clear_token(target: str, sec: Security) -> None:
    if sec.token and not sec.tls and leaves_host(target):
        warnings.warn(f"the bearer token goes to {target} in clear text (no TLS): anyone on "
                      "the network between can read it and call as you", stacklevel=3)


def _host_port(address: str) -> tuple[str, str | None]:
    """("host", "port") of "host:port" or "[v6]:port"; the port None where there is none (a
    lone IPv6 address included)."""
    if address.startswith("["):
        host, bracket, tail = address[1:].partition("]")
        if not bracket or (tail and not tail.startswith(":")):
            raise ValueError(f"{address!r}: an IPv6 address with a port goes in brackets, "
                             f"[ADDR]:PORT")
        return host, (tail[1:] if tail else None)
    if address.count(":") <= 1:
        host, _, port = address.partition(":")
        return host, (port if ":" in address else None)
    try:
        ipaddress.IPv6Address(address)
    except ValueError:
        raise ValueError(f"{address!r}: an IPv6 address with a port goes in brackets, "
                         f"[ADDR]:PORT") from None
    return address, None


def _check_port(port: str | None, target: str) -> None:
    """A numeric port in 1 .. 65535; a named one (http) is gRPC's to resolve."""
    if not port or not port.isdigit():
        return
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} of {target!r} is not in 1 .. 65535")


def create_channel(target: str, security: Security | None = None,
                   max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
                   retries: int = DEFAULT_RETRIES) -> grpc.Channel:
    """A synchronous channel to `target` with `security` (default: plaintext, no token),
    retrying refused and unreachable calls up to `retries` times. A target gRPC would misread
    (check_target) is a ValueError."""
    check_target(target)
    sec = security or Security()
    _warn_clear_token(target, sec)
    options = sec.options(channel_options(max_message_mb) + retry_options(retries, max_message_mb)
                          + KEEPALIVE_OPTIONS)
    channel = (grpc.secure_channel(target, sec.credentials(), options=options) if sec.tls
               else grpc.insecure_channel(target, options=options))
    if sec.token:
        channel = grpc.intercept_channel(channel, _MetadataInterceptor(sec.metadata))
    return channel


def create_aio_channel(target: str, security: Security | None = None,
                       max_message_mb: int = DEFAULT_MAX_MESSAGE_MB, retries: int = DEFAULT_RETRIES
                       ) -> grpc.aio.Channel:
    """An asyncio channel to `target`, as create_channel."""
    check_target(target)
    sec = security or Security()
    _warn_clear_token(target, sec)
    options = sec.options(channel_options(max_message_mb) + retry_options(retries, max_message_mb)
                          + KEEPALIVE_OPTIONS)
    interceptors: list[grpc.aio.ClientInterceptor] | None = None
    if sec.token:
        interceptors = [_AioUnaryMetadata(sec.metadata), _AioStreamMetadata(sec.metadata)]
    if sec.tls:
        return grpc.aio.secure_channel(target, sec.credentials(), options=options,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


# -- adding the token to every call ---------------------------------------------------------


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, details: Any, metadata: list[tuple[str, Any]]) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = details.wait_for_ready
        self.compression = getattr(details, "compression", None)


class _MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                           grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(details, [*(details.metadata or ()), *self._metadata])

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def _aio_details(details: Any, metadata: tuple[tuple[str, str], ...]) -> Any:
    merged = grpc.aio.Metadata(*(details.metadata or ()), *metadata)
    return grpc.aio.ClientCallDetails(details.method, details.timeout, merged,
                                      details.credentials, details.wait_for_ready)


class _AioUnaryMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), request)


class _AioStreamMetadata(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_aio_details(details, self._metadata), request)

"""A free TCP port on loopback, for tests and benchmarks that start servers; a host as the
socket layer and as gRPC take it; and the keepalive options of gRPC channels and servers."""

from __future__ import annotations

import contextlib
import socket


def free_port() -> int:
    """A port that nothing listens on now. Another process may take it before the caller
    binds it: callers that can should bind port 0 and ask the socket instead."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bare_host(host: str) -> str:
    """`host` as a socket binds it: "[::1]" (as --host and gRPC write an IPv6 address)
    becomes "::1"; anything else is left as it is."""
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def grpc_host(host: str) -> str:
    """`host` as gRPC binds it in "HOST:PORT": an IPv6 address in brackets ("::1" alone fails
    to bind); anything else is left as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def keepalive_options(every_ms: int, timeout_ms: int) -> list[tuple[str, int]]:
    """gRPC options to ping the peer every `every_ms` while calls are in flight and drop a
    connection whose ping is unanswered after `timeout_ms`, so that a peer that stopped
    answering without closing it (a hung host, a network cut) is found. Pings go on without
    data frames (a stalled stream has none), and gRPC waits for a ping's ack for its
    ping_timeout (a minute by default) whatever keepalive_timeout says, so both are set."""
    return [("grpc.keepalive_time_ms", every_ms), ("grpc.keepalive_timeout_ms", timeout_ms),
            ("grpc.http2.ping_timeout_ms", timeout_ms),
            ("grpc.http2.max_pings_without_data", 0)]


def probe_bind(host: str, port: int, address: str) -> None:
    """Bind each address of `host` on `port` without SO_REUSEPORT, and let go: a RuntimeError
    ("could not bind ADDRESS: why") if anything listens there, whether it shares the port or
    not. gRPC finds the same, but says it in its own log lines first."""
    name = bare_host(host)
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise RuntimeError(f"could not bind {address}: {exc}") from None
    for family, kind, proto, _, sockaddr in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:  # a family this host lacks (IPv6): gRPC skips it too
            continue
        with probe:
            # As gRPC binds: past connections in TIME_WAIT do not count, listeners do.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # "[::]" takes IPv4 too, as gRPC's does
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                raise RuntimeError(f"could not bind {address}: {exc.strerror or exc}"
                                   ) from None

"""A free TCP port on loopback, for tests and benchmarks that start servers; a host as the
socket layer and as gRPC take it; and the keepalive options of gRPC channels and servers."""

from __future__ import annotations

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

"""A free TCP port on loopback, for tests and benchmarks that start servers; and a host as
the socket layer takes it."""

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

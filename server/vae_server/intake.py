"""The calls gRPC has received, counted before the server takes them, as a metric.

A call reaches gRPC's core when its first bytes arrive, and a handler only when the event
loop next asks core for a call: one call per ask. When calls arrive faster than the loop takes
them (a burst, or a loop kept busy), they wait in core, where the batcher's queue, its
admission control and the handlers' metrics cannot see them; a call whose deadline passes
there, or whose caller gives up, or that core cancels (past --max-pending-calls, or after 30 s
untaken), ends without a handler ever running.

Core counts every call it receives (channelz, on in gRPC by default):
vae_grpc_received_calls_total. Every call that reaches a handler is counted by
grpc_server_started_total, so the difference between the two is the calls received and not
(yet, or ever) taken: waiting, or ended in core (and calls to a method the server does not
have). Only core's count of received calls is exported: its counts of ended calls leave out
the calls it cancels itself, and end a handled call before or after its handler does, so
"waiting" and "ended untaken" cannot be told apart exactly from them.

channelz is read through grpcio's own binding (`grpc._cython.cygrpc`, which the
grpcio-channelz package wraps); where it is missing or refuses, the metric is left out and the
log says why.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

NAME = "vae_grpc_received_calls"
HELP = ("Calls gRPC has received, counted before the server's event loop takes them (channelz). "
        "Less grpc_server_started_total: calls waiting for the loop, or that ended before it "
        "took them (deadline, caller gone, cancelled by gRPC), or named an unknown method.")


def _channelz() -> Any:
    """grpcio's binding of channelz, or None where it has none."""
    try:
        from grpc._cython import cygrpc
    except ImportError:  # pragma: no cover - grpcio always ships it
        return None
    return cygrpc if hasattr(cygrpc, "channelz_get_servers") else None


_CHANNELZ = _channelz()  # looked up once, not at every scrape


def server_ids() -> set[int]:
    """The channelz ids of the gRPC servers of this process (empty without channelz)."""
    cz = _CHANNELZ
    if cz is None:
        return set()
    ids: set[int] = set()
    start = 0
    while True:
        page = json.loads(cz.channelz_get_servers(start))
        servers = page.get("server", [])
        ids.update(int(s["ref"]["serverId"]) for s in servers)
        if page.get("end", True) or not servers:
            return ids
        start = max(ids) + 1


def received_calls(server_id: int) -> int:
    """The calls core has received on the server `server_id`. Raises ValueError for a server
    channelz does not know (one that has stopped)."""
    cz = _CHANNELZ
    if cz is None:
        raise ValueError("channelz is not available")
    data = json.loads(cz.channelz_get_server(server_id))["server"]["data"]
    return int(data.get("callsStarted", 0))


class IntakeCollector(Collector):
    """vae_grpc_received_calls_total of one gRPC server, read from `received` (a function of
    nothing, as received_calls gives it) when scraped."""

    def __init__(self, received: Callable[[], int]) -> None:
        self._received = received
        self._failing = False  # logged when it starts failing, not at every scrape

    def describe(self) -> Iterator[CounterMetricFamily]:
        """The name, for the registry's check at register(): without reading core."""
        yield CounterMetricFamily(NAME, HELP)

    def collect(self) -> Iterator[CounterMetricFamily]:
        try:
            value = self._received()
        except Exception as exc:  # noqa: BLE001 - a scrape goes on without this metric
            if not self._failing:
                self._failing = True
                log.warning("%s left out: channelz refused (%s)", NAME, exc)
            return
        self._failing = False
        yield CounterMetricFamily(NAME, HELP, value=value)


def watch_intake(register: Callable[[Collector], None], before: set[int]
                 ) -> Callable[[], int] | None:
    """Register an IntakeCollector for the gRPC server made since `before` (server_ids()
    taken just before it was made), and return its reader of received calls. None, logged,
    where it cannot be told apart."""
    new = server_ids() - before
    if len(new) != 1:
        log.warning("%s left out: %s", NAME, "channelz found no new gRPC server" if not new
                    else "several gRPC servers were made at once")
        return None
    server_id = new.pop()

    def received() -> int:
        return received_calls(server_id)

    register(IntakeCollector(received))
    return received

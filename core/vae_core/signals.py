"""SIGTERM as the commands take it (vae-client, vae-export): raised where the process is, as
Ctrl-C is, so that their clean-up runs (part files, an export's staging folder removed)
rather than the process dying where it stands. timeout, systemd, docker stop and Kubernetes
all stop a command so."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised by `terminate`: a command stops as on Ctrl-C."""


def terminate(signum: int, frame: object) -> None:
    # A second SIGTERM ends the process at once (a clean-up that waits on a stalled server
    # must not make the command unkillable but by SIGKILL).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within: SIGTERM raises Terminated. Not from a thread other than the main one, which
    may not set handlers, nor over a SIGTERM ignored (by the parent) or handled outside
    Python; the handler before is back after."""
    before = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or before in (
            signal.SIG_IGN, None):
        yield
        return
    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)

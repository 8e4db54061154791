"""The event loop the server runs on: uvloop where it is installed, else asyncio's own.

Every call passes through the event loop several times (gRPC's completion callbacks, the
handler's task steps, the batcher's futures); uvloop runs those passes in C, and serves more
calls per second than asyncio's loop (BENCHMARKS.md).
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def resolve(name: str) -> str:
    """The loop that `--event-loop name` runs on: "uvloop" or "asyncio"."""
    if name not in CHOICES:
        raise ValueError(f"event loop must be one of {', '.join(CHOICES)}, not {name!r}")
    if name == "asyncio":
        return "asyncio"
    if not uvloop_installed():
        if name == "uvloop":
            raise RuntimeError("--event-loop uvloop, but uvloop is not installed "
                               "(pip install uvloop; it has no Windows build)")
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T], name: str = "auto") -> T:
    """asyncio.run(main) on the loop that `name` resolves to."""
    if resolve(name) == "uvloop":
        import uvloop

        return uvloop.run(main)  # type: ignore[no-any-return]
    return asyncio.run(main)


def running_loop_name() -> str:
    """The running loop's kind, as the server logs it."""
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"

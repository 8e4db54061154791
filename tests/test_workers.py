"""The --workers supervisor's handling of a worker's exit, without starting any process.

A process's sentinel becomes ready when the process dies, which can be before the parent
has reaped it: until then `exitcode` reads None. These tests drive `Supervisor._handle`
with a stand-in process that behaves so, and check what the supervisor logs and does.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from vae_server.config import load_settings
from vae_server.workers import Supervisor, _Worker


class _UnreapedProcess:
    """A process killed by SIGKILL whose exit status is known only once it is joined."""

    def __init__(self) -> None:
        self.sentinel = object()
        self._joined = False

    @property
    def exitcode(self) -> int | None:
        return -9 if self._joined else None

    def join(self, timeout: float | None = None) -> None:
        self._joined = True


class _Pipe:
    def close(self) -> None:
        pass

    def send(self, message: Any) -> None:
        pass


def _supervisor(monkeypatch: pytest.MonkeyPatch, *, ready: bool) -> tuple[Supervisor, Any]:
    supervisor = Supervisor(load_settings(["--model-dir", "unused", "--workers", "1"], env={}))
    process = _UnreapedProcess()
    supervisor._workers = [_Worker(0, process, _Pipe(),  # type: ignore[arg-type]
                                   metrics_port=12345 if ready else None)]
    started: list[int] = []

    def start(index: int) -> _Worker:
        started.append(index)
        return _Worker(index, _UnreapedProcess(), _Pipe())  # type: ignore[arg-type]

    monkeypatch.setattr(supervisor, "_start", start)
    return supervisor, (process, started)


def test_a_killed_worker_is_logged_with_its_exit_status(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    supervisor, (process, started) = _supervisor(monkeypatch, ready=True)
    with caplog.at_level(logging.ERROR, logger="vae_server.workers"):
        supervisor._handle(process.sentinel)
    assert "worker 0 exited with -9: NOT_SERVING until its replacement is ready" in caplog.text
    assert started == [0]
    assert supervisor.restarts._value.get() == 1


def test_a_worker_dead_before_ready_is_logged_with_its_exit_status(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    supervisor, (process, started) = _supervisor(monkeypatch, ready=False)
    with caplog.at_level(logging.ERROR, logger="vae_server.workers"):
        supervisor._handle(process.sentinel)
    assert "worker 0 exited with -9 before it was ready: stopping" in caplog.text
    assert supervisor.failed and started == []

"""Dynamic batching for one model: concurrent calls merge into one session run.

No gRPC here: a queue of pending slices, one future per slice, runs off the event loop.

- A call that finds the model idle runs at once; the calls that arrive while a run is in
  progress form the next batch (no fixed window taxes a quiet server). `max_delay` > 0 lets
  a batch wait that long to fill, but only while another run is in progress.
- Queue capacity is counted in images; a call that does not fit fails at once (QueueFull).
- A call larger than `max_batch` is split into slices and reassembled in order.
- A slice whose deadline has passed or whose caller cancelled is dropped before it runs.
- A failed run fails only the callers in that batch (BatchFailed); the loop goes on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from vae_server.errors import BatchFailed, DeadlineExpired, QueueFull

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]


class BatcherObserver:
    """Hooks for metrics; the default does nothing."""

    def queue_depth(self, images: int) -> None: ...
    def batch_run(self, size: int, queue_wait: Sequence[float], seconds: float) -> None: ...


@dataclass(eq=False)
class _Slice:
    rows: np.ndarray
    future: asyncio.Future[list[np.ndarray]]
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    def __init__(
        self,
        run: RunFn,
        executor: concurrent.futures.Executor,
        max_batch: int,
        max_queue: int,
        max_delay: float = 0.0,
        observer: BatcherObserver | None = None,
        merge: bool = True,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_delay = max_delay
        # merge=False is "batching off": each call runs by itself, straight away, in the
        # executor (the baseline that batching is measured against).
        self.merge = merge
        self._observer = observer or BatcherObserver()
        self._queue: collections.deque[_Slice] = collections.deque()
        self._queued_images = 0
        # Created lazily inside the running loop (asyncio primitives bind to a loop).
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # Counters for tests and GetModelInfo; metrics get the same through the observer.
        self.largest_batch = 0
        self.dropped: collections.Counter[str] = collections.Counter()  # slices, by reason

    @property
    def queued_images(self) -> int:
        return self._queued_images

    async def submit(self, rows: np.ndarray, deadline: float | None = None) -> list[np.ndarray]:
        """Run `rows` [n, ...] through the model; returns the outputs' rows for this call."""
        n = len(rows)
        if n == 0:
            raise ValueError("empty batch")
        if self._queued_images + n > self.max_queue:
            self.dropped["queue_full"] += 1
            raise QueueFull(
                f"queue full: {self._queued_images} images waiting, the limit is "
                f"{self.max_queue}; retry later"
            )
        loop = asyncio.get_running_loop()
        if not self.merge:
            return await self._run_alone(rows, deadline, loop)
        self._ensure_started()
        slices = [
            _Slice(rows[i : i + self.max_batch], loop.create_future(), deadline)
            for i in range(0, n, self.max_batch)
        ]
        self._queue.extend(slices)
        self._queued_images += n
        self._observer.queue_depth(self._queued_images)
        assert self._wakeup is not None
        self._wakeup.set()
        try:
            if len(slices) == 1:  # the common case: no gathering future on the hot path
                return await slices[0].future
            parts = await asyncio.gather(*(s.future for s in slices))
        except BaseException:
            for s in slices:  # a cancelled caller: its slices must not run
                s.future.cancel()
            raise
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    async def _run_alone(self, rows: np.ndarray, deadline: float | None,
                         loop: asyncio.AbstractEventLoop) -> list[np.ndarray]:
        self._queued_images += len(rows)
        self._observer.queue_depth(self._queued_images)
        try:
            parts = []
            for i in range(0, len(rows), self.max_batch):
                if deadline is not None and time.monotonic() >= deadline:
                    self.dropped["deadline"] += 1
                    raise DeadlineExpired("deadline expired before the model ran")
                part = rows[i : i + self.max_batch]
                started = time.monotonic()
                try:
                    parts.append(await loop.run_in_executor(self._executor, self._run, part))
                except Exception as exc:
                    raise BatchFailed(f"model run failed: {exc}") from exc
                finally:
                    self._record_run(len(part), [0.0], started)
        finally:
            self._queued_images -= len(rows)
            self._observer.queue_depth(self._queued_images)
        if len(parts) == 1:
            return list(parts[0])
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    def _ensure_started(self) -> None:
        if self._task is None or self._task.done():
            self._wakeup = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._queue:
            s = self._queue.popleft()
            if not s.future.done():
                s.future.set_exception(BatchFailed("the server is shutting down"))
        self._queued_images = 0

    def _take_batch(self) -> list[_Slice]:
        """Pop live slices up to max_batch images; drop cancelled and expired ones."""
        batch: list[_Slice] = []
        size = 0
        now = time.monotonic()
        while self._queue:
            s = self._queue[0]
            if s.future.done():  # cancelled by its caller
                self._queue.popleft()
                self._queued_images -= len(s.rows)
                self.dropped["cancelled"] += 1
                continue
            if s.deadline is not None and now >= s.deadline:
                self._queue.popleft()
                self._queued_images -= len(s.rows)
                self.dropped["deadline"] += 1
                s.future.set_exception(DeadlineExpired("deadline expired while queued"))
                continue
            if size + len(s.rows) > self.max_batch:
                break
            self._queue.popleft()
            self._queued_images -= len(s.rows)
            batch.append(s)
            size += len(s.rows)
        self._observer.queue_depth(self._queued_images)
        return batch

    async def _loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        just_ran = False
        while True:
            if not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
                just_ran = False  # the model was idle: the call that woke us runs at once
                continue
            if self.max_delay > 0 and just_ran and self._queued_images < self.max_batch:
                # Calls queued up during the last run: the model is busy, let the batch fill.
                oldest = self._queue[0].enqueued
                wait = oldest + self.max_delay - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            batch = self._take_batch()
            if not batch:
                continue
            just_ran = True
            rows = batch[0].rows if len(batch) == 1 else np.concatenate([s.rows for s in batch])
            started = time.monotonic()
            try:
                outputs = await loop.run_in_executor(self._executor, self._run, rows)
            except Exception as exc:  # noqa: BLE001 - the callers get it, the loop goes on
                for s in batch:
                    if not s.future.done():
                        s.future.set_exception(BatchFailed(f"model run failed: {exc}"))
                continue
            finally:
                self._record_run(len(rows), [started - s.enqueued for s in batch], started)
            offset = 0
            for s in batch:
                n = len(s.rows)
                if not s.future.done():
                    s.future.set_result([o[offset : offset + n] for o in outputs])
                offset += n

    def _record_run(self, size: int, queue_wait: list[float], started: float) -> None:
        self.largest_batch = max(self.largest_batch, size)
        self._observer.batch_run(size, queue_wait, time.monotonic() - started)

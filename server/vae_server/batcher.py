"""Dynamic batching for one model: concurrent calls merge into one session run.

No gRPC here: a queue of pending slices, one future per slice, and a drain scheduled on the
event loop.

- A batch is taken when the event loop has nothing else ready to run (every call that has
  reached the server is queued), when it holds `max_batch` images, or when its oldest call
  has waited `max_delay`. An idle server therefore runs a lone call at once; a busy one
  gathers the calls that its event loop already holds, without a timer taxing quiet times.
- One run at a time per model. Small batches (up to `inline_rows` images, given a
  `run_inline` function) run on the event loop's thread: for a few rows a hand-off to a
  worker thread costs more than the run. Larger ones run in the executor; calls that arrive
  meanwhile form the next batch.
- Queue capacity is counted in images; a call that does not fit fails at once (QueueFull).
- A call larger than `max_batch` is split into slices and reassembled in order.
- A slice whose deadline has passed or whose caller cancelled is dropped before it runs.
- A failed run fails only the callers in that batch (BatchFailed); the batcher goes on.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
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


def _has_ready_callbacks(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether the event loop holds callbacks that are ready to run now: calls that have
    arrived and are on their way to the queue. asyncio's loops keep them in `_ready`; on a
    loop without it, batches do not wait for them (they still merge what is queued)."""
    return bool(getattr(loop, "_ready", None))


class Reservation:
    """Room held in a Batcher's queue for images to be submitted later (Batcher.reserve)."""

    def __init__(self, batcher: Batcher, n: int) -> None:
        self._batcher = batcher
        self.held = n

    def take(self, n: int) -> bool:
        """Turn up to `n` held images into queued ones; True if all `n` were held."""
        used = min(n, self.held)
        self.held -= used
        self._batcher._reserved -= used
        return used == n

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.take(self.held)  # release what was not submitted


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
        run_inline: RunFn | None = None,
        inline_rows: int = 0,
    ) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError("max_batch and max_queue must be >= 1")
        self._run = run
        self._executor = executor
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_delay = max_delay
        # merge=False is "batching off": each call runs by itself, straight away (the
        # baseline that batching is measured against).
        self.merge = merge
        self._run_inline = run_inline
        self.inline_rows = inline_rows if run_inline is not None else 0
        self._observer = observer or BatcherObserver()
        self._queue: collections.deque[_Slice] = collections.deque()
        self._queued_images = 0
        self._scheduled = False  # a drain is scheduled on the loop
        self._running = False  # a run is in progress in the executor
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserved = 0  # images of Reservations not yet submitted
        # Calls in the last batch: under steady load, about as many arrive for the next one.
        self._expect = 1
        self._timer: asyncio.TimerHandle | None = None
        # Counters for tests and GetModelInfo; metrics get the same through the observer.
        self.largest_batch = 0
        self.runs = 0
        self.dropped: collections.Counter[str] = collections.Counter()  # slices, by reason

    @property
    def queued_images(self) -> int:
        return self._queued_images

    def check_room(self, n: int) -> None:
        """Raise QueueFull (or BatchFailed when closed) unless `n` more images fit."""
        if self._closed:
            raise BatchFailed("the server is shutting down")
        if self._queued_images + self._reserved + n > self.max_queue:
            self.dropped["queue_full"] += 1
            held = f" and {self._reserved} reserved" if self._reserved else ""
            raise QueueFull(
                f"queue full: {self._queued_images} images waiting{held}, the limit is "
                f"{self.max_queue}; retry later"
            )

    def reserve(self, n: int) -> Reservation:
        """Room for `n` images that a call will submit later, after other work: it is refused
        now (QueueFull) rather than after that work. Use as a context manager; pass it to
        submit(), and whatever was not submitted is released on exit."""
        self.check_room(n)
        self._reserved += n
        return Reservation(self, n)

    async def submit(self, rows: np.ndarray, deadline: float | None = None,
                     reservation: Reservation | None = None) -> list[np.ndarray]:
        """Run `rows` [n, ...] through the model; returns the outputs' rows for this call."""
        n = len(rows)
        if n == 0:
            raise ValueError("empty batch")
        if reservation is not None and reservation.take(n):
            if self._closed:
                raise BatchFailed("the server is shutting down")
        else:
            self.check_room(n)
        # The loop, looked up once: get_running_loop() costs a getpid() system call per call
        # on Python 3.11. A batcher serves one event loop.
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if not self.merge:
            return await self._run_alone(rows, deadline, loop)
        if n <= self.max_batch:  # the common case: one slice, no gathering future
            s = _Slice(rows, loop.create_future(), deadline)
            self._enqueue((s,), n, loop)
            try:
                return await s.future
            except BaseException:
                s.future.cancel()  # a cancelled caller: its slice must not run
                raise
        slices = [_Slice(rows[i : i + self.max_batch], loop.create_future(), deadline)
                  for i in range(0, n, self.max_batch)]
        self._enqueue(slices, n, loop)
        try:
            parts = await asyncio.gather(*(s.future for s in slices))
        except BaseException:
            for s in slices:
                s.future.cancel()
            raise
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    def _enqueue(self, slices: Sequence[_Slice], n: int, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.extend(slices)
        self._queued_images += n
        self._observer.queue_depth(self._queued_images)
        if self._running:
            return
        if self._timer is not None and len(self._queue) >= self._expect:
            self._timer.cancel()  # the batch it waited for is complete
            self._timer = None
            self._scheduled = False
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain, loop)

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
                    if len(part) <= self.inline_rows:
                        assert self._run_inline is not None
                        parts.append(self._run_inline(part))
                    else:
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

    async def close(self) -> None:
        """Fail what is queued; a run in progress still delivers to its callers."""
        self._closed = True
        while self._queue:
            s = self._queue.popleft()
            if not s.future.done():
                s.future.set_exception(BatchFailed("the server is shutting down"))
        self._queued_images = 0

    # -- the drain: runs as a callback on the event loop ------------------------------------

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._timer = None
        if self._running or not self._queue or self._closed:
            return
        oldest = time.monotonic() - self._queue[0].enqueued
        if self._queued_images < self.max_batch and oldest < self.max_delay:
            if _has_ready_callbacks(loop):
                # Calls that have arrived are still on their way here: let them join.
                self._scheduled = True
                loop.call_soon(self._drain, loop)
                return
            if len(self._queue) < self._expect:
                # As many calls as the last batch held are likely on their way: wait for
                # them (`_enqueue` wakes the drain when they are in), at most max_delay.
                self._scheduled = True
                self._timer = loop.call_later(self.max_delay - oldest, self._drain, loop)
                return
        batch = self._take_batch()
        if not batch:
            return
        self._expect = len(batch)
        rows = batch[0].rows if len(batch) == 1 else np.concatenate([s.rows for s in batch])
        started = time.monotonic()
        if len(rows) <= self.inline_rows:
            assert self._run_inline is not None
            try:
                outputs = self._run_inline(rows)
            except Exception as exc:  # noqa: BLE001 - the callers get it, the batcher goes on
                self._fail(batch, exc)
            else:
                self._deliver(batch, outputs)
            finally:
                self._record_run(len(rows), [started - s.enqueued for s in batch], started)
            self._schedule_next(loop)
            return
        self._running = True
        run = loop.run_in_executor(self._executor, self._run, rows)
        run.add_done_callback(lambda f: self._finished(f, batch, started, loop))

    def _finished(self, run: asyncio.Future[Sequence[np.ndarray]], batch: list[_Slice],
                  started: float, loop: asyncio.AbstractEventLoop) -> None:
        self._running = False
        self._record_run(sum(len(s.rows) for s in batch),
                         [started - s.enqueued for s in batch], started)
        if run.cancelled():
            self._fail(batch, RuntimeError("the run was cancelled"))
        elif (exc := run.exception()) is not None:
            self._fail(batch, exc)
        else:
            self._deliver(batch, run.result())
        self._schedule_next(loop)

    def _schedule_next(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._queue and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain, loop)

    @staticmethod
    def _deliver(batch: list[_Slice], outputs: Sequence[np.ndarray]) -> None:
        offset = 0
        for s in batch:
            n = len(s.rows)
            if not s.future.done():
                s.future.set_result([o[offset : offset + n] for o in outputs])
            offset += n

    @staticmethod
    def _fail(batch: list[_Slice], exc: BaseException) -> None:
        for s in batch:
            if not s.future.done():
                s.future.set_exception(BatchFailed(f"model run failed: {exc}"))

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

    def _record_run(self, size: int, queue_wait: list[float], started: float) -> None:
        self.largest_batch = max(self.largest_batch, size)
        self.runs += 1
        self._observer.batch_run(size, queue_wait, time.monotonic() - started)

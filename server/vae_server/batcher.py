"""Dynamic batching for one model: concurrent calls merge into one session run.

No gRPC here: a queue of pending slices, one future per slice, and a drain scheduled on the
event loop.

- A batch is taken when the event loop has nothing else ready to run (every call that has
  reached the server is queued), when it holds `max_batch` images, or when its oldest call
  has waited `max_delay`. An idle server therefore runs a lone call at once; a busy one
  gathers the calls that its event loop already holds, without a timer taxing quiet times.
- Small batches (up to `inline_rows` images, given a `run_inline` function: a one-thread
  session) run on the event loop's thread: for a few rows a hand-off to a worker thread costs
  more than the run. Larger ones run in the executor, up to `instances` of them at once (as
  Triton's instance count): a large batch alone runs on `run` (all cores), one that starts
  beside another large run, or while more large work waits for an idle instance, on
  `run_inline`, one core each. On a small CPU, runs on one thread each beside each other
  beat one run at a time on all threads, whose threads wait for each other at every step
  (BENCHMARKS.md). Queued large work is shared among the instances, not merged into one
  batch for one of them: a busy instance takes its share when its run ends. When every
  instance is busy, large calls form the next batch.
- Small calls (up to `inline_rows` images each) do not ride in a large batch nor wait for
  one: while a large batch runs, they run beside it on the event loop's thread, gathered for
  at most `max_delay` (a lone one at once), and a batch taken from a queue that holds both
  takes only the large ones. A single-image call then does not wait behind a stream's
  chunks (BENCHMARKS.md).
- Queue capacity is counted in images; a call that does not fit fails at once (QueueFull).
  Work of a call already admitted (a SampleStream's later chunks) waits for room instead
  (`wait_room`): a stream under way is paced by the queue, not broken off by other calls.
- A call larger than `max_batch` is split into slices and reassembled in order.
- A slice whose deadline has passed or whose caller cancelled is dropped before it runs.
- A failed run fails only the callers in that batch (BatchFailed); the batcher goes on.
- A job (`submit_job`) brings its own pre- and post-processing: its rows are made, and the
  model's outputs for them turned into its result, in the thread that runs the batch. Work
  around a run then costs no hop between threads of its own (LogLikelihood's noise and
  estimator: each hop costs a few hundred microseconds of thread wake-ups on a small CPU).
  A job larger than `max_batch` runs alone, in runs of `max_batch` rows.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np

from vae_server.errors import BatchFailed, DeadlineExpired, QueueFull, ShuttingDown

RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]
T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class Job(Protocol[T_co]):
    """Work that brings its own pre- and post-processing (Batcher.submit_job): both run in
    the thread that runs its batch."""

    @property
    def rows(self) -> int:
        """The rows make_rows() makes."""
        ...

    def make_rows(self) -> np.ndarray:
        """The model's input rows [rows, ...]."""
        ...

    def finish(self, outputs: list[np.ndarray]) -> T_co:
        """The job's result from the model's outputs for its rows."""
        ...


class BatcherObserver:
    """Hooks for metrics; the default does nothing. (The queue's depth is read when metrics
    are scraped, `queued_images`, rather than set on every call.)"""

    def batch_run(self, size: int, queue_wait: Sequence[float], seconds: float) -> None: ...


@dataclass(eq=False)
class _Slice:
    rows: np.ndarray | None  # None for a job, which makes them
    n: int  # rows
    future: asyncio.Future[Any]
    deadline: float | None  # time.monotonic() after which the caller no longer waits
    job: Job[Any] | None = None
    enqueued: float = field(default_factory=time.monotonic)
    queued: bool = True  # in the queue, its images counted in queued_images
    reservation: Reservation | None = None  # the room it was admitted with, if any

    @property
    def keeps(self) -> bool:
        """A stream chunk's slice: its images stay counted through its run (Reservation.keeps)."""
        return self.reservation is not None and self.reservation.keeps


class _Failed:
    """A slice's own failure inside a batch that ran: its job's make_rows or finish raised."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Reservation:
    """Room held in a Batcher's queue for images to be submitted later (Batcher.reserve)."""

    def __init__(self, batcher: Batcher, n: int, keeps: bool = False) -> None:
        self._batcher = batcher
        self.held = n
        # Set for a stream's chunk (wait_room's `keeps`), whose outputs wait for their caller
        # to read them: as each of its slices leaves the queue for its run, its images stay
        # counted against the queue, as unsent (unsent_images), and `kept` says how many; the
        # caller releases them (release_unsent) once sent or never to be. Else the room would
        # be free during the run, other work would take it, and the chunk's images would pass
        # the queue's limit when it is held after the run.
        self.keeps = keeps
        self.kept = 0

    def take(self, n: int) -> bool:
        """Turn up to `n` held images into queued ones; True if all `n` were held."""
        used = min(n, self.held)
        self.held -= used
        self._batcher._reserved -= used
        return used == n

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.held:  # release what was not submitted
            self.take(self.held)
            self._batcher._room_freed()


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
        instances: int = 1,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or instances < 1:
            raise ValueError("max_batch, max_queue and instances must be >= 1")
        self._run = run
        self.instances = instances
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
        self._active = 0  # large runs in progress in the executor
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reserved = 0  # images of Reservations not yet submitted
        self._room_waiters: list[asyncio.Future[None]] = []  # wait_room's callers
        self._waiting = 0  # the images they wait to submit
        self._unsent = 0  # of SampleStream chunks run or running, not yet sent (unsent_images)
        # Calls in the last batch: under steady load, about as many arrive for the next one.
        self._expect = 1
        self._timer: asyncio.TimerHandle | None = None
        self._small_ran = -float("inf")  # time.monotonic() of the last run beside a large one
        self._gathered = 0  # small images gathering for that lane while its timer is set
        # Whether a slice was enqueued since the drain last looked (`_arriving`).
        self._arrived = False
        # Counters for tests and GetModelInfo; metrics get the same through the observer.
        self.largest_batch = 0
        self.runs = 0
        self.dropped: collections.Counter[str] = collections.Counter()  # slices, by reason

    @property
    def queued_images(self) -> int:
        return self._queued_images

    @property
    def occupancy(self) -> float:
        """The share of --max-queue-images that admission counts as taken (check_room):
        images queued, reserved, waited for by calls under way, and made for streams and not
        yet sent. At 1, calls are refused with RESOURCE_EXHAUSTED."""
        return self._taken / self.max_queue

    @property
    def _taken(self) -> int:
        return self._queued_images + self._reserved + self._waiting + self._unsent

    @property
    def unsent_images(self) -> int:
        """Images of stream chunks that have left the queue for their run and are not yet
        sent (Reservation.keeps): they count against the queue's room until release_unsent,
        so that a caller that stops reading holds room, which new calls are refused for,
        rather than memory that nothing bounds."""
        return self._unsent

    def release_unsent(self, n: int) -> None:
        """`n` of the unsent images were sent, or will never be."""
        self._unsent -= n
        if n and self._room_waiters:
            self._room_freed()

    @property
    def _running(self) -> bool:
        """Every instance runs a large batch: small calls run beside them (_drain_small)."""
        return self._active >= self.instances

    def idle_instances(self) -> int:
        """Instances that would start a call's large work at once: none while work is queued
        or with batching off (every call runs alone), otherwise those not running a large
        batch."""
        return 0 if self._queue or not self.merge else self.instances - self._active

    def check_room(self, n: int) -> None:
        """Raise QueueFull (or ShuttingDown when closed) unless `n` more images fit."""
        if self._closed:
            raise ShuttingDown("the server is shutting down; retry")
        # Work of admitted calls waiting for room (wait_room) keeps its place: a new call
        # does not take the room it waits for, or a stream could wait for ever.
        if self._taken + n > self.max_queue:
            self.dropped["queue_full"] += 1
            held = f" and {self._reserved} reserved" if self._reserved else ""
            held += f" and {self._waiting} of calls under way" if self._waiting else ""
            held += (f" and {self._unsent} made for streams, not yet sent" if self._unsent
                     else "")
            raise QueueFull(
                f"queue full: {self._queued_images} images waiting{held}, the limit is "
                f"{self.max_queue} and this call needs {n}; retry later"
            )

    def reserve(self, n: int) -> Reservation:
        """Room for `n` images that a call will submit later, after other work: it is refused
        now (QueueFull) rather than after that work. Use as a context manager; pass it to
        submit(), and whatever was not submitted is released on exit."""
        self.check_room(n)
        self._reserved += n
        return Reservation(self, n)

    async def wait_room(self, n: int, deadline: float | None = None,
                        keeps: bool = False) -> Reservation:
        """Room for `n` images, held for the caller (a Reservation, as reserve() gives) once
        it is free: for work of a call already admitted, which the queue paces rather than
        refuses. While it waits, new calls do not take the room it waits for. Raises
        ShuttingDown when the batcher closes, DeadlineExpired at `deadline`, and QueueFull at
        once if `n` images can never fit. With `keeps` (a stream's chunk), its images stay
        counted through their run until released as sent (Reservation.keeps)."""
        if n > self.max_queue:
            self.check_room(n)
        loop = self._loop or asyncio.get_running_loop()
        while True:
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry")
            # Other waiters' images are not counted: woken together, each takes what is free.
            if self._queued_images + self._reserved + self._unsent + n <= self.max_queue:
                self._reserved += n
                return Reservation(self, n, keeps)
            timeout = None if deadline is None else deadline - time.monotonic()
            if timeout is not None and timeout <= 0:
                self.dropped["deadline"] += 1
                raise DeadlineExpired("deadline expired while waiting for room in the queue")
            waiter: asyncio.Future[None] = loop.create_future()
            self._room_waiters.append(waiter)
            self._waiting += n
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                self.dropped["deadline"] += 1
                raise DeadlineExpired("deadline expired while waiting for room in the "
                                      "queue") from None
            finally:
                self._waiting -= n
                if waiter in self._room_waiters:
                    self._room_waiters.remove(waiter)

    def _room_freed(self) -> None:
        """Images left the queue or a reservation: every wait_room caller looks again (in
        the order they came; the first that fits takes the room before the next looks)."""
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def submit(self, rows: np.ndarray, deadline: float | None = None,
                     reservation: Reservation | None = None) -> list[np.ndarray]:
        """Run `rows` [n, ...] through the model; returns the outputs' rows for this call."""
        n = len(rows)
        if n == 0:
            raise ValueError("empty batch")
        loop = self._admit(n, reservation)
        if n <= self.max_batch or not self.merge:  # the common case: one slice
            s = _Slice(rows, n, loop.create_future(), deadline, reservation=reservation)
            return await self._one(s, loop)  # type: ignore[no-any-return]
        slices = [_Slice(rows[i : i + self.max_batch], min(self.max_batch, n - i),
                         loop.create_future(), deadline, reservation=reservation)
                  for i in range(0, n, self.max_batch)]
        self._enqueue(slices, n, loop)
        try:
            parts = await asyncio.gather(*(s.future for s in slices))
        except BaseException:
            self._withdraw(slices)
            raise
        return [np.concatenate(outs) for outs in zip(*parts, strict=True)]

    async def submit_job(self, job: Job[T], deadline: float | None = None,
                         reservation: Reservation | None = None) -> T:
        """Run `job` through the model and return `job.finish(outputs)`: its rows are made
        and its outputs finished in the thread that runs the batch (a worker, or the event
        loop's thread for a small one). An exception from either fails this job alone, with
        that exception."""
        n = job.rows
        if n <= 0:
            raise ValueError("empty job")
        loop = self._admit(n, reservation)
        s = _Slice(None, n, loop.create_future(), deadline, job, reservation=reservation)
        return await self._one(s, loop)  # type: ignore[no-any-return]

    def _admit(self, n: int, reservation: Reservation | None) -> asyncio.AbstractEventLoop:
        """Room for `n` images, from `reservation` where it holds them, or QueueFull; returns
        the event loop, looked up once: get_running_loop() costs a getpid() system call per
        call on Python 3.11. A batcher serves one event loop."""
        if reservation is not None and reservation.take(n):
            if self._closed:
                raise ShuttingDown("the server is shutting down; retry")
        else:
            self.check_room(n)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    async def _one(self, s: _Slice, loop: asyncio.AbstractEventLoop) -> Any:
        """One slice's result: run at once by itself (batching off), or queued to merge."""
        if not self.merge:
            return await self._run_alone(s, loop)
        self._enqueue((s,), s.n, loop)
        try:
            return await s.future
        except BaseException:
            self._withdraw((s,))  # a cancelled caller: its slice must not run
            raise

    def _withdraw(self, slices: Sequence[_Slice]) -> None:
        """The caller of `slices` has gone: they must not run, and those still queued give
        their room back now, not when a drain next passes them (after the run in progress):
        new calls would be refused, and streams waiting for room kept waiting, for work that
        no one waits for."""
        freed = 0
        for s in slices:
            s.future.cancel()
            if s.queued:
                s.queued = False
                freed += s.n
                self.dropped["cancelled"] += 1
        if freed:
            self._release(freed)

    def _enqueue(self, slices: Sequence[_Slice], n: int, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.extend(slices)
        self._queued_images += n
        self._arrived = True
        last = slices[-1].n  # a split call's last slice may be small
        if self._running:
            # Every instance is busy with a large batch: a small call runs beside them
            # (_drain_small), a large one waits for a run to end. While they run, a timer is
            # the small lane's: it runs the calls gathering unless a full batch has come.
            if last > self.inline_rows:
                return
            if self._timer is not None:
                self._gathered += last
                if self._gathered < self.inline_rows:
                    return
            self._wake(loop)
        elif (self._timer is None or len(self._queue) >= self._expect
              or (self._active and last > self.inline_rows)):
            # With a timer: the batch it waited for is complete, or an idle instance beside
            # a run takes a large call at once (_drain).
            self._wake(loop)

    async def _run_alone(self, s: _Slice, loop: asyncio.AbstractEventLoop) -> Any:
        """Batching off: the call runs by itself, at once, in runs of at most max_batch rows."""
        if s.keeps:
            self._kept(s)
        else:
            self._queued_images += s.n
        try:
            if s.deadline is not None and time.monotonic() >= s.deadline:
                self.dropped["deadline"] += 1
                raise DeadlineExpired("deadline expired before the model ran")
            waited = 0.0  # inline: at once
            if s.n <= self.inline_rows:
                results, runs = self._execute([s], self._run_inline)
            else:
                # The room is given back when the run ends, not when the caller stops
                # waiting: a run that has started cannot be stopped, and its images hold the
                # cores until it ends. (One not yet started is cancelled with its caller.)
                submitted = time.monotonic()
                started: list[float] = []

                def execute() -> tuple[list[Any], list[tuple[int, float]]]:
                    started.append(time.monotonic())  # its wait for a thread ends here
                    return self._execute([s], self._run)

                run = self._executor.submit(execute)
                if s.queued:
                    s.queued = False
                    run.add_done_callback(lambda _: self._release_threadsafe(loop, s.n))
                results, runs = await asyncio.wrap_future(run, loop=loop)
                waited = started[0] - submitted
        finally:
            if s.queued:
                self._release(s.n)
        self._record_runs(runs, [waited])
        if isinstance(results[0], _Failed):
            raise results[0].exc
        return results[0]

    def _kept(self, s: _Slice) -> None:
        """`s`, a stream chunk's slice, starts its run: its images count as unsent, not free."""
        assert s.reservation is not None
        s.queued = False
        s.reservation.kept += s.n
        self._unsent += s.n

    def _release(self, n: int) -> None:
        self._queued_images -= n
        if self._room_waiters:
            self._room_freed()

    def _release_threadsafe(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        with contextlib.suppress(RuntimeError):  # a closed loop: nothing is left to admit
            loop.call_soon_threadsafe(self._release, n)

    async def close(self) -> None:
        """Fail what is queued; a run in progress still delivers to its callers."""
        self._closed = True
        while self._queue:
            s = self._queue.popleft()
            if s.queued:
                s.queued = False
                self._queued_images -= s.n
            if not s.future.done():
                s.future.set_exception(ShuttingDown("the server is shutting down; retry"))
        self._room_freed()  # waiters see the batcher closed

    # -- the drain: runs as a callback on the event loop ------------------------------------

    def _drain(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        self._timer = None
        if not self._queue or self._closed:
            return
        if self._running:
            self._drain_small(loop)
            return
        small = self.inline_rows
        oldest = time.monotonic() - self._queue[0].enqueued
        # Beside a run, an idle instance takes large calls at once: waiting would only delay
        # them (more are no cheaper per row than these alone). The queue is counted only where
        # the answer is needed: this runs on every pass of the loop while calls gather.
        large_rows = self._large_rows() if self._active else None
        if (self._queued_images < self.max_batch and oldest < self.max_delay
                and not large_rows):
            if self._arriving():
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
        if large_rows is None:
            large_rows = self._large_rows()
        # Queued large work is shared among the instances, busy ones included: each takes
        # its part, and one that is busy takes its part when its run ends, rather than an idle
        # one merging every queued call into one run while the other, once free, has nothing
        # left (a run of two 1,000-row jobs costs as much as the two runs; BENCHMARKS.md).
        limit = self.max_batch
        if self.instances > 1 and large_rows:
            limit = min(limit, -(-large_rows // self.instances))
        # Small calls queued beside large ones do not ride in the large run: they run beside
        # it (_drain_small), and do not wait for it.
        batch, size = self._take_batch("large", limit) if small and large_rows else ([], 0)
        if not batch:  # no large ones, or they were all cancelled or expired
            batch, size = self._take_batch(limit=limit)
        if not batch:
            return
        self._expect = len(batch)
        started = time.monotonic()
        if size <= self.inline_rows:
            results, runs = self._execute(batch, self._run_inline)
            self._record_runs(runs, [started - s.enqueued for s in batch])
            self._deliver(batch, results)
            self._schedule_next(loop)
            return
        # Alone, a large batch has all the cores (`run`); beside another run, or with large
        # work left for another instance, it has one (`run_inline`'s one-thread session).
        wide = self.instances == 1 or not (self._active
                                           or any(s.n > small for s in self._queue))
        self._active += 1
        run = loop.run_in_executor(self._executor, self._execute, batch,
                                   self._run if wide else self._run_inline or self._run)
        run.add_done_callback(lambda f: self._finished(f, batch, started, loop))
        self._schedule_next(loop)  # an idle instance, or small ones beside this run

    def _large_rows(self) -> int:
        """Images queued in slices of more than inline_rows."""
        return sum(s.n for s in self._queue if s.n > self.inline_rows and s.queued)

    def _drain_small(self, loop: asyncio.AbstractEventLoop) -> None:
        """While every instance runs a large batch: run the queued small slices (up to
        `inline_rows` images each) on this thread, up to `inline_rows` images per run, rather
        than behind that run and the large slices queued after it; the large ones stay queued,
        in their order, for the executor. A small call that finds this lane idle for
        max_delay runs at once; under a stream of small calls they gather for up to
        max_delay, as the executor's batches do (one-row runs would cost a run each)."""
        oldest: float | None = None
        images = 0
        for s in self._queue:
            if s.n <= self.inline_rows and s.queued:
                oldest = s.enqueued if oldest is None else oldest
                images += s.n
        if oldest is None:
            return
        now = time.monotonic()
        waited = now - oldest
        if waited < self.max_delay and images < self.inline_rows:
            if self._arriving():  # as in _drain: arrived calls are still on their way here
                self._scheduled = True
                loop.call_soon(self._drain, loop)
                return
            if now - self._small_ran < self.max_delay:
                self._gathered = images  # _enqueue adds what arrives, and wakes a full batch
                self._scheduled = True
                self._timer = loop.call_later(self.max_delay - waited, self._drain, loop)
                return
        batch, _ = self._take_batch("small")
        if not batch:
            return
        results, runs = self._execute(batch, self._run_inline)
        self._small_ran = time.monotonic()
        self._record_runs(runs, [now - s.enqueued for s in batch])
        self._deliver(batch, results)
        self._schedule_next(loop)  # more small ones may be queued

    def _arriving(self) -> bool:
        """Whether calls that have reached the server may still be on their way to the queue
        (gRPC's callbacks, then their handlers' task steps, take several passes of the event
        loop): a pass that brought a slice since the last look says more are coming, a pass
        that brought none says not. Only this batcher's own slices count: the loop's ready
        queue (asyncio's `_ready`, which this once read) also holds the other batcher's
        rescheduled drain, and two batchers with work then kept each other waiting for the
        whole max_delay."""
        arrived, self._arrived = self._arrived, False
        return arrived

    def _execute(self, batch: list[_Slice],
                 run: RunFn | None) -> tuple[list[Any], list[tuple[int, float]]]:
        """In the thread that runs the batch: make the jobs' rows, run the model with `run`
        (in runs of at most max_batch rows), and give each slice its outputs or its job's
        result. Returns the results, a _Failed for a slice that failed, and (rows, seconds)
        of each run."""
        assert run is not None
        results: list[Any] = [None] * len(batch)
        parts: list[np.ndarray] = []
        live: list[int] = []
        for i, s in enumerate(batch):
            rows = s.rows
            if s.job is not None:
                try:
                    rows = s.job.make_rows()
                    if len(rows) != s.n:
                        raise ValueError(f"a job of {s.n} rows made {len(rows)}")
                except Exception as exc:  # noqa: BLE001 - this job fails, the batch goes on
                    results[i] = _Failed(exc)
                    continue
            assert rows is not None
            parts.append(rows)
            live.append(i)
        runs: list[tuple[int, float]] = []
        if not live:
            return results, runs
        try:
            x = parts[0] if len(parts) == 1 else np.concatenate(parts)
            pieces = []
            for start in range(0, len(x), self.max_batch):
                piece = x[start : start + self.max_batch]
                t0 = time.monotonic()
                try:
                    out = run(piece)
                finally:
                    runs.append((len(piece), time.monotonic() - t0))
                # Outputs are handed out by offset: a short one would give callers the
                # rows of others, or too few.
                wrong = [len(o) for o in out if len(o) != len(piece)]
                if wrong:
                    raise ValueError(f"the model returned {wrong[0]} rows for {len(piece)} "
                                     "inputs")
                pieces.append(out)
            outputs = (pieces[0] if len(pieces) == 1
                       else [np.concatenate(o) for o in zip(*pieces, strict=True)])
        except Exception as exc:  # noqa: BLE001 - the callers get it, the batcher goes on
            for i in live:
                results[i] = _Failed(BatchFailed(f"model run failed: {exc}"))
            return results, runs
        offset = 0
        for i in live:
            s = batch[i]
            mine = [o[offset : offset + s.n] for o in outputs]
            offset += s.n
            if s.job is None:
                results[i] = mine
                continue
            try:
                results[i] = s.job.finish(mine)
            except Exception as exc:  # noqa: BLE001 - this job fails, the others have theirs
                results[i] = _Failed(exc)
        return results, runs

    def _finished(self, run: asyncio.Future[tuple[list[Any], list[tuple[int, float]]]],
                  batch: list[_Slice], started: float, loop: asyncio.AbstractEventLoop) -> None:
        self._active -= 1
        if run.cancelled() or run.exception() is not None:  # the executor refused the work
            why = "cancelled" if run.cancelled() else str(run.exception())
            self._deliver(batch, [_Failed(BatchFailed(f"model run failed: {why}"))
                                  for _ in batch])
        else:
            results, runs = run.result()
            self._record_runs(runs, [started - s.enqueued for s in batch])
            self._deliver(batch, results)
        self._schedule_next(loop)  # the next large batch; small calls gathering join now

    def _schedule_next(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._queue:
            self._wake(loop)

    def _wake(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drain at the loop's next pass; a timer that was set is cancelled (what it waited
        for is in, or the run it ran beside has ended)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._scheduled = False
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._drain, loop)

    @staticmethod
    def _deliver(batch: list[_Slice], results: list[Any]) -> None:
        for s, result in zip(batch, results, strict=True):
            if s.future.done():
                continue
            if isinstance(result, _Failed):
                s.future.set_exception(result.exc)
            else:
                s.future.set_result(result)

    def _take_batch(self, rows: str = "any",
                    limit: int | None = None) -> tuple[list[_Slice], int]:
        """Pop live slices up to `limit` images (max_batch by default; a larger slice
        alone), and their images; drop cancelled and expired ones. `rows`: "small" takes only
        slices of up to inline_rows images, up to inline_rows in all; "large" only the larger
        ones; the slices they pass keep their places in the queue."""
        batch: list[_Slice] = []
        passed: list[_Slice] = []
        small = rows == "small"
        if limit is None:
            limit = self.inline_rows if small else self.max_batch
        size = 0
        now = time.monotonic()
        while self._queue:
            s = self._queue[0]
            if not s.queued or s.future.done():
                # Withdrawn by its caller, or cancelled with its caller not yet woken to
                # withdraw it (a task's cancel() cancels the future it awaits at once): it
                # must not run, nor reach set_exception below, which a done future refuses.
                self._queue.popleft()
                self._withdraw((s,))
                continue
            if s.deadline is not None and now >= s.deadline:
                self._queue.popleft()
                s.queued = False
                self._queued_images -= s.n
                self.dropped["deadline"] += 1
                s.future.set_exception(DeadlineExpired("deadline expired while queued"))
                continue
            if (small and s.n > limit) or (rows == "large" and s.n <= self.inline_rows):
                passed.append(self._queue.popleft())
                continue
            if (batch or small) and size + s.n > limit:
                break
            self._queue.popleft()
            s.queued = False
            self._queued_images -= s.n
            if s.keeps:
                self._kept(s)
            batch.append(s)
            size += s.n
        self._queue.extendleft(reversed(passed))
        if self._room_waiters:
            self._room_freed()
        return batch, size

    def _record_runs(self, runs: list[tuple[int, float]], queue_wait: list[float]) -> None:
        for i, (size, seconds) in enumerate(runs):
            self.largest_batch = max(self.largest_batch, size)
            self.runs += 1
            self._observer.batch_run(size, queue_wait if i == 0 else (), seconds)

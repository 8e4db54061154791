"""The batcher alone: merging, splitting, row ownership, drops, queue limits, failures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

from vae_server.batcher import Batcher, Reservation
from vae_server.errors import BatchFailed, DeadlineExpired, QueueFull, ShuttingDown


class Model:
    """Doubles its input; records the batch sizes it ran; can be held busy or made to fail."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.ran_rows: list[np.ndarray] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: float | None = None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.gate.wait(10)
        self.sizes.append(len(x))
        self.ran_rows.append(x.copy())
        if self.fail_on is not None and (x == self.fail_on).any():
            raise RuntimeError("poisoned batch")
        return [x * 2.0, x + 1.0]


@pytest.fixture
def executor():
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        yield ex


def rows(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.float32)[:, None].repeat(3, axis=1)


async def hold_a_run(b: Batcher, model: Model, n: int) -> asyncio.Future:
    """A call of `n` rows from 0, running and held there by `model`'s gate."""
    model.gate.clear()
    run = asyncio.ensure_future(b.submit(rows(0, n)))
    await asyncio.sleep(0.05)
    return run


@dataclass
class FnJob:
    """A batcher.Job of functions: `rows` rows made by `make`, finished by `then`."""

    rows: int
    make: Callable[[], np.ndarray]
    then: Callable[[list[np.ndarray]], Any]

    def make_rows(self) -> np.ndarray:
        return self.make()

    def finish(self, outputs: list[np.ndarray]) -> Any:
        return self.then(outputs)


def test_idle_model_runs_a_lone_call_at_once(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=64, max_queue=1024, max_delay=10.0)
        t0 = time.perf_counter()
        out = await b.submit(rows(0, 1))
        elapsed = time.perf_counter() - t0
        await b.close()
        return out, elapsed

    out, elapsed = asyncio.run(main())
    np.testing.assert_array_equal(out[0], rows(0, 1) * 2)
    # max_delay (10 s) applies only while the model is busy: an idle model does not wait.
    assert elapsed < 5.0


def test_calls_arriving_during_a_run_merge_and_each_gets_its_own_rows(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=1000, max_queue=10_000)
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0.05)  # the first call is now running, held by the gate
        calls = [asyncio.ensure_future(b.submit(rows(100 * i, i))) for i in range(1, 30)]
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, *calls)
        await b.close()
        return b, results

    b, results = asyncio.run(main())
    for i, out in enumerate(results[1:], start=1):
        np.testing.assert_array_equal(out[0], rows(100 * i, i) * 2)
        np.testing.assert_array_equal(out[1], rows(100 * i, i) + 1)
    assert model.sizes[0] == 1
    assert model.sizes[1] == sum(range(1, 30))  # everything that queued ran as one batch
    assert b.largest_batch == sum(range(1, 30))


def test_a_call_larger_than_max_batch_is_split_and_reassembled(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=7, max_queue=1000)
        out = await b.submit(rows(0, 50))
        await b.close()
        return out

    out = asyncio.run(main())
    np.testing.assert_array_equal(out[0], rows(0, 50) * 2)
    assert max(model.sizes) <= 7 and sum(model.sizes) == 50


def test_full_queue_fails_at_once_without_waiting(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=10, max_queue=20)
        model.gate.clear()
        running = asyncio.ensure_future(b.submit(rows(0, 10)))
        await asyncio.sleep(0.05)
        queued = asyncio.ensure_future(b.submit(rows(10, 20)))  # fills the queue
        await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        with pytest.raises(QueueFull, match="limit is 20"):
            await b.submit(rows(30, 1))
        refused_in = time.perf_counter() - t0
        model.gate.set()
        done = await asyncio.gather(running, queued)
        await b.close()
        return refused_in, done

    refused_in, done = asyncio.run(main())
    assert refused_in < 1.0  # room only comes when the gate opens, after this
    np.testing.assert_array_equal(done[1][0], rows(10, 20) * 2)


def test_expired_and_cancelled_calls_never_run(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=1000)
        blocker = await hold_a_run(b, model, 1)
        expired = asyncio.ensure_future(b.submit(rows(500, 2), deadline=time.monotonic() + 0.01))
        cancelled = asyncio.ensure_future(b.submit(rows(700, 3)))
        kept = asyncio.ensure_future(b.submit(rows(900, 4)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        model.gate.set()
        with pytest.raises(DeadlineExpired):
            await expired
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        await blocker
        out = await kept
        await b.close()
        return b, out

    b, out = asyncio.run(main())
    np.testing.assert_array_equal(out[0], rows(900, 4) * 2)
    ran = np.concatenate(model.ran_rows)[:, 0]
    assert not np.isin([500, 501, 700, 701, 702], ran).any()
    assert b.dropped["deadline"] == 1 and b.dropped["cancelled"] == 1


def test_a_failed_run_fails_only_its_batch_and_the_batcher_goes_on(executor):
    model = Model()
    model.fail_on = 666.0

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=1000)
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0.05)
        poisoned = asyncio.ensure_future(b.submit(rows(666, 1)))
        neighbour = asyncio.ensure_future(b.submit(rows(10, 2)))
        await asyncio.sleep(0.01)
        model.gate.set()
        await first
        results = await asyncio.gather(poisoned, neighbour, return_exceptions=True)
        after = await b.submit(rows(20, 2))
        await b.close()
        return results, after

    results, after = asyncio.run(main())
    assert isinstance(results[0], BatchFailed) and isinstance(results[1], BatchFailed)
    np.testing.assert_array_equal(after[0], rows(20, 2) * 2)


@pytest.mark.parametrize("inline", [False, True], ids=["worker", "event-loop"])
def test_a_run_that_returns_the_wrong_number_of_rows_fails_its_batch(executor, inline):
    """Outputs are handed out by offset: a run with a row short would give a caller another
    caller's rows, or too few. Its batch fails instead, and the batcher goes on."""
    model = Model()
    short = {"on": True}

    def run(x: np.ndarray) -> list[np.ndarray]:
        out = model(x)
        return [o[:-1] for o in out] if short["on"] else out

    async def main():
        b = Batcher(run, executor, max_batch=100, max_queue=1000,
                    run_inline=run if inline else None, inline_rows=64 if inline else 0)
        model.gate.clear()
        first = asyncio.ensure_future(b.submit(rows(0, 3)))
        second = asyncio.ensure_future(b.submit(rows(10, 2)))
        await asyncio.sleep(0.05)
        model.gate.set()
        results = await asyncio.gather(first, second, return_exceptions=True)
        short["on"] = False
        after = await b.submit(rows(20, 2))
        await b.close()
        return results, after

    results, after = asyncio.run(main())
    for r in results:
        assert isinstance(r, BatchFailed), r
        assert "returned" in str(r) and "rows for" in str(r), r
    np.testing.assert_array_equal(after[0], rows(20, 2) * 2)


def test_a_closed_batcher_refuses_work_as_shutting_down(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=2, max_queue=1000)
        model.gate.clear()
        running = asyncio.ensure_future(b.submit(rows(0, 2)))
        await asyncio.sleep(0.05)  # running, held by the gate
        queued = asyncio.ensure_future(b.submit(rows(10, 2)))
        await asyncio.sleep(0.01)
        await b.close()
        model.gate.set()
        done = await asyncio.gather(running, queued, return_exceptions=True)
        with pytest.raises(ShuttingDown):
            await b.submit(rows(20, 1))
        with pytest.raises(ShuttingDown):
            b.reserve(1)
        return done

    running, queued = asyncio.run(main())
    np.testing.assert_array_equal(running[0], rows(0, 2) * 2)  # a run in progress delivers
    assert isinstance(queued, ShuttingDown), queued


def test_batching_off_runs_every_call_alone(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=1000, merge=False)
        outs = await asyncio.gather(*(b.submit(rows(10 * i, 3)) for i in range(10)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert model.sizes == [3] * 10
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out[0], rows(10 * i, 3) * 2)


def test_calls_trickling_in_wait_for_as_many_as_the_last_batch_held(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=1000, max_queue=10_000, max_delay=5.0)
        await asyncio.gather(*(b.submit(rows(10 * i, 1)) for i in range(8)))  # one batch of 8

        async def later(i: int) -> list[np.ndarray]:
            await asyncio.sleep(0.01 * i)  # arriving one by one, 10 ms apart
            return await b.submit(rows(100 + i, 1))

        outs = await asyncio.gather(*(later(i) for i in range(8)))
        await b.close()
        return outs

    outs = asyncio.run(main())
    assert model.sizes == [8, 8]  # the second eight waited for each other
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out[0], rows(100 + i, 1) * 2)


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        return pytest.importorskip("uvloop").new_event_loop  # type: ignore[no-any-return]
    return asyncio.new_event_loop


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_calls_still_on_their_way_through_the_event_loop_join_the_batch(executor, loop_name):
    # Calls reach the queue over several passes of the event loop (gRPC's callbacks, then
    # their handlers' task steps). A batch that looked only at the loop's ready queue left
    # with the first pass's calls alone on uvloop, which hides that queue ([4, 12]).
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=1000, max_queue=10_000, max_delay=5.0)

        async def arrive(i: int) -> list[np.ndarray]:
            for _ in range(i % 4):  # on its way for 0 - 3 passes
                await asyncio.sleep(0)
            return await b.submit(rows(i, 1))

        outs = await asyncio.gather(*(arrive(i) for i in range(16)))
        await b.close()
        return outs

    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        outs = runner.run(main())
    assert model.sizes == [16]
    for i, out in enumerate(outs):
        np.testing.assert_array_equal(out[0], rows(i, 1) * 2)


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_two_batchers_do_not_hold_each_other_back(executor, loop_name):
    # The server has two batchers (encoder and decoder). Each one's drain, rescheduled while
    # calls may still be arriving, must not count as an arriving call for the other: on
    # asyncio they used to keep each other waiting for the whole max_delay.
    model_a, model_b = Model(), Model()

    async def main():
        a = Batcher(model_a, executor, max_batch=1000, max_queue=10_000, max_delay=5.0)
        b = Batcher(model_b, executor, max_batch=1000, max_queue=10_000, max_delay=5.0)
        t0 = time.perf_counter()
        outs = await asyncio.gather(a.submit(rows(1, 1)), b.submit(rows(2, 1)))
        elapsed = time.perf_counter() - t0
        await a.close()
        await b.close()
        return outs, elapsed

    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        (out_a, out_b), elapsed = runner.run(main())
    assert model_a.sizes == [1] and model_b.sizes == [1]
    np.testing.assert_array_equal(out_a[0], rows(1, 1) * 2)
    np.testing.assert_array_equal(out_b[0], rows(2, 1) * 2)
    assert elapsed < 2.5  # not max_delay (5 s): neither waited for the other


def test_a_lone_caller_does_not_wait_for_the_batching_delay(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=1000, max_queue=10_000, max_delay=10.0)
        t0 = time.perf_counter()
        for i in range(20):  # one call in flight at a time
            await b.submit(rows(i, 1))
        elapsed = time.perf_counter() - t0
        await b.close()
        return elapsed

    elapsed = asyncio.run(main())
    assert model.sizes == [1] * 20
    assert elapsed < 5.0  # not one max_delay (10 s) was waited


def test_small_batches_run_on_the_event_loop_thread_and_large_ones_in_workers(executor):
    threads: dict[str, list[int]] = {"inline": [], "executor": []}

    def recorded(kind: str):
        def run(x: np.ndarray) -> list[np.ndarray]:
            threads[kind].append(threading.get_ident())
            return [x * 2.0]

        return run

    async def main():
        b = Batcher(recorded("executor"), executor, max_batch=1000, max_queue=10_000,
                    run_inline=recorded("inline"), inline_rows=16)
        small = await b.submit(rows(0, 16))
        large = await b.submit(rows(0, 17))
        await b.close()
        return threading.get_ident(), small, large

    loop_thread, small, large = asyncio.run(main())
    np.testing.assert_array_equal(small[0], rows(0, 16) * 2)
    np.testing.assert_array_equal(large[0], rows(0, 17) * 2)
    assert threads["inline"] == [loop_thread]
    assert len(threads["executor"]) == 1 and threads["executor"][0] != loop_thread


def test_a_reservation_refuses_at_once_and_holds_room_until_submitted_or_released(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=10)
        with b.reserve(8) as room:
            with pytest.raises(QueueFull, match="8 reserved"):
                b.reserve(3)  # 8 held + 3 > 10
            with pytest.raises(QueueFull):
                await b.submit(rows(0, 3))  # the held room is not anyone's to take
            out = await b.submit(rows(0, 5), reservation=room)  # uses 5 of the 8
            assert room.held == 3
            other = await b.submit(rows(10, 2))  # 3 held + 2 fit
        released = b.reserve(10)  # everything left was released on exit
        released.__exit__(None, None, None)
        await b.close()
        return out, other

    out, other = asyncio.run(main())
    np.testing.assert_array_equal(out[0], rows(0, 5) * 2)
    np.testing.assert_array_equal(other[0], rows(10, 2) * 2)


def test_waiting_for_room_returns_once_images_leave_the_queue(executor):
    """Work of a call already admitted (a stream's later chunks) waits for room, in the order
    it came, and is then admitted; a reservation released frees room too."""
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=4, max_queue=8, instances=1)
        model.gate.clear()
        running = asyncio.ensure_future(b.submit(rows(0, 4)))
        await asyncio.sleep(0.05)  # running, held by the gate: out of the queue
        queued = asyncio.ensure_future(b.submit(rows(10, 4)))
        room = b.reserve(4)
        await asyncio.sleep(0.01)
        assert b.queued_images == 4
        order: list[str] = []

        async def chunk(name: str, start: int) -> list[np.ndarray]:
            with await b.wait_room(4) as room:
                order.append(name)
                return await b.submit(rows(start, 4), reservation=room)

        first = asyncio.ensure_future(chunk("first", 20))
        second = asyncio.ensure_future(chunk("second", 30))
        await asyncio.sleep(0.05)
        assert order == []  # 4 queued + 4 reserved: no room for either
        with pytest.raises(QueueFull):
            b.check_room(1)  # a new call is still refused
        room.__exit__(None, None, None)  # the reservation is released: room for one
        with pytest.raises(QueueFull, match="of calls under way"):
            b.check_room(1)  # ... which a new call does not take from the waiters
        await asyncio.sleep(0.05)
        assert order == ["first"]
        model.gate.set()  # the runs go on: room for the second
        done = await asyncio.gather(running, queued, first, second)
        await b.close()
        return order, done

    order, done = asyncio.run(main())
    assert order == ["first", "second"]
    for out, start in zip(done, (0, 10, 20, 30), strict=True):
        np.testing.assert_array_equal(out[0], rows(start, 4) * 2)


def test_waiting_for_room_ends_at_the_deadline_on_close_or_at_once_if_it_can_never_fit(executor):
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=4, max_queue=4, instances=1)
        with pytest.raises(QueueFull):
            await b.wait_room(5)  # more than the whole queue: refused, not waited for
        held = b.reserve(4)
        t0 = time.monotonic()
        with pytest.raises(DeadlineExpired, match="waiting for room"):
            await b.wait_room(1, deadline=time.monotonic() + 0.1)
        waited = time.monotonic() - t0
        waiting = asyncio.ensure_future(b.wait_room(1))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await b.close()
        with pytest.raises(ShuttingDown):
            await waiting
        held.__exit__(None, None, None)
        return waited

    assert 0.09 <= asyncio.run(main()) < 5


def test_a_job_makes_its_rows_and_its_result_in_the_thread_that_runs_the_batch(executor):
    model = Model()
    model.gate.clear()  # hold the first run so that the next calls queue up and merge
    where: dict[str, int] = {}

    def make() -> np.ndarray:
        where["make"] = threading.get_ident()
        return rows(100, 4)

    def then(outputs: list[np.ndarray]) -> float:
        where["then"] = threading.get_ident()
        return float(outputs[0].sum() + outputs[1].sum())

    async def main():
        b = Batcher(model, executor, max_batch=64, max_queue=1024)
        first = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0.05)  # the first call runs alone, held at the gate
        plain = asyncio.ensure_future(b.submit(rows(10, 2)))
        job = asyncio.ensure_future(b.submit_job(FnJob(4, make, then)))
        await asyncio.sleep(0.05)
        model.gate.set()
        out = await asyncio.gather(first, plain, job)
        await b.close()
        return threading.get_ident(), out

    loop_thread, (first, plain, job) = asyncio.run(main())
    assert model.sizes == [1, 6]  # the job merged with the plain call
    np.testing.assert_array_equal(plain[0], rows(10, 2) * 2)
    assert job == float((rows(100, 4) * 2).sum() + (rows(100, 4) + 1).sum())
    assert where["make"] == where["then"] != loop_thread


def test_a_failing_job_fails_alone_and_a_large_job_runs_in_runs_of_max_batch(executor):
    model = Model()
    model.gate.clear()

    def broken_make() -> np.ndarray:
        raise ZeroDivisionError("make")

    def broken_then(outputs: list[np.ndarray]) -> None:
        raise KeyError("then")

    async def main():
        b = Batcher(model, executor, max_batch=8, max_queue=1024)
        first = asyncio.ensure_future(b.submit(rows(0, 1)))
        await asyncio.sleep(0.05)
        calls = [asyncio.ensure_future(c) for c in (
            b.submit_job(FnJob(2, broken_make, lambda o: o)),
            b.submit_job(FnJob(2, lambda: rows(20, 2), broken_then)),
            b.submit(rows(30, 2)),
            b.submit_job(FnJob(2, lambda: rows(40, 3), lambda o: o)),  # one row too many
            b.submit_job(FnJob(20, lambda: rows(50, 20), lambda o: o[0])),  # over max_batch
        )]
        await asyncio.sleep(0.05)
        model.gate.set()
        out = await asyncio.gather(first, *calls, return_exceptions=True)
        await b.close()
        return out, b.largest_batch

    out, largest = asyncio.run(main())
    _, make_failed, then_failed, plain, miscounted, large = out
    assert isinstance(make_failed, ZeroDivisionError)
    assert isinstance(then_failed, KeyError)
    assert isinstance(miscounted, ValueError) and "made 3" in str(miscounted)
    np.testing.assert_array_equal(plain[0], rows(30, 2) * 2)
    np.testing.assert_array_equal(large, rows(50, 20) * 2)
    # The large job ran alone, in runs of at most max_batch rows; nothing ran above it.
    assert model.sizes[-3:] == [8, 8, 4] and largest == 8


class InlineRun:
    """The small-batch run on the event loop's thread: Model's outputs, recording its sizes."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        self.sizes.append(len(x))
        return [x * 2.0, x + 1.0]


def beside(big: Model, executor, max_batch: int = 100, max_delay: float = 0.0,
           inline: InlineRun | None = None) -> Batcher:
    """A batcher whose calls of up to 8 images run inline, beside `big`'s large runs."""
    return Batcher(big, executor, max_batch=max_batch, max_queue=10_000, max_delay=max_delay,
                   run_inline=inline or InlineRun(), inline_rows=8)


async def hold_a_large_run(b: Batcher, big: Model) -> asyncio.Future:
    """A 50-row call, running in the worker and held there by `big`'s gate."""
    return await hold_a_run(b, big, 50)


def test_small_calls_do_not_wait_behind_a_large_run(executor):
    """While a large batch runs in a worker, small calls run on the event loop's thread (the
    one-thread session) instead of queueing behind it and the large calls queued after it;
    large calls keep their order and wait for the worker."""
    big, inline = Model(), InlineRun()

    async def main():
        b = beside(big, executor, inline=inline)
        first = await hold_a_large_run(b, big)
        second = asyncio.ensure_future(b.submit(rows(1000, 60)))  # queued: runs next
        await asyncio.sleep(0)
        small = [asyncio.ensure_future(b.submit(rows(100 * i, i))) for i in (1, 3, 4, 2)]
        done, _ = await asyncio.wait(small, timeout=5)
        answered_while_held = len(done)
        running_still = not first.done()
        big.gate.set()
        results = await asyncio.gather(first, second, *small)
        await b.close()
        return answered_while_held, running_still, results

    answered_while_held, running_still, results = asyncio.run(main())
    assert running_still
    assert answered_while_held == 4  # none waited for the held run
    for i, out in zip((1, 3, 4, 2), results[2:], strict=True):
        np.testing.assert_array_equal(out[0], rows(100 * i, i) * 2)
        np.testing.assert_array_equal(out[1], rows(100 * i, i) + 1)
    np.testing.assert_array_equal(results[1][0], rows(1000, 60) * 2)
    # The small calls ran in batches of at most inline_rows; the large ones in the worker,
    # in their order, none of them inline.
    assert sum(inline.sizes) == 10 and max(inline.sizes) <= 8
    assert big.sizes == [50, 60]


def test_small_calls_beside_a_large_run_gather_for_at_most_max_delay(executor):
    """A small call that finds the lane beside the large run idle runs at once; the ones that
    follow it within max_delay gather into one run (not a run each), which still does not wait
    for the large run."""
    big, inline = Model(), InlineRun()

    async def main():
        b = beside(big, executor, max_delay=1.0, inline=inline)
        large = await hold_a_large_run(b, big)
        t0 = time.perf_counter()
        await b.submit(rows(100, 1))
        alone = time.perf_counter() - t0
        later = []
        for i in range(3):  # one at a time, 20 ms apart
            later.append(asyncio.ensure_future(b.submit(rows(200 + 10 * i, 1))))
            await asyncio.sleep(0.02)
        await asyncio.gather(*later)
        gathered = time.perf_counter() - t0
        held = not large.done()
        big.gate.set()
        await large
        await b.close()
        return alone, gathered, held

    alone, gathered, held = asyncio.run(main())
    assert held
    assert inline.sizes == [1, 3]
    # A max_delay long beside the calls' 20 ms spacing, so that a stall of the machine does
    # not let the lane's timer run the calls apart.
    assert alone < 0.5  # the lane was idle: no wait
    assert 0.9 < gathered < 5.0  # gathered for about max_delay (1 s), not for the run


def test_small_calls_gathering_beside_a_run_join_the_next_batch_when_it_ends(executor):
    big = Model()

    async def main():
        b = beside(big, executor, max_delay=5.0)
        large = await hold_a_large_run(b, big)
        await b.submit(rows(100, 1))  # runs at once: the lane was idle
        waiting = asyncio.ensure_future(b.submit(rows(200, 1)))  # gathers, for up to 5 s
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        big.gate.set()
        out = await waiting
        elapsed = time.perf_counter() - t0
        await large
        await b.close()
        return out, elapsed

    out, elapsed = asyncio.run(main())
    np.testing.assert_array_equal(out[0], rows(200, 1) * 2)
    assert elapsed < 1.0  # not the 5 s window: the end of the large run let it in


def test_small_calls_left_beside_a_cancelled_large_call_still_run(executor):
    """When the large run ends, the queue holds a small call and a large one whose caller has
    cancelled: the small call runs (it is not left waiting for a large batch that is gone)."""
    big = Model()

    async def main():
        b = beside(big, executor, max_delay=5.0)
        first = await hold_a_large_run(b, big)
        await b.submit(rows(100, 1))  # the lane beside the run was idle: ran at once
        gone = asyncio.ensure_future(b.submit(rows(1000, 60)))
        small = asyncio.ensure_future(b.submit(rows(200, 1)))  # gathers, for up to 5 s
        await asyncio.sleep(0.05)
        gone.cancel()
        big.gate.set()
        out = await asyncio.wait_for(small, 2.0)
        await first
        await b.close()
        return out

    out = asyncio.run(main())
    np.testing.assert_array_equal(out[0], rows(200, 1) * 2)
    assert big.sizes == [50]  # the cancelled call never ran


def test_a_full_small_lane_does_not_wait_for_its_timer(executor):
    """Beside a large run, small calls gather for at most max_delay or until they hold
    inline_rows images: a full batch runs at once, not when the timer (or the run) ends."""
    big, inline = Model(), InlineRun()

    async def main():
        b = beside(big, executor, max_delay=10.0, inline=inline)
        large = await hold_a_large_run(b, big)
        await b.submit(rows(100, 1))         # lane idle: runs at once
        first = asyncio.ensure_future(b.submit(rows(200, 1)))  # lane busy: timer ~10 s
        await asyncio.sleep(0.02)
        t0 = time.perf_counter()
        more = [asyncio.ensure_future(b.submit(rows(300 + 10 * i, 1))) for i in range(7)]
        await asyncio.gather(first, *more)   # 8 images gathered = inline_rows
        elapsed = time.perf_counter() - t0
        big.gate.set()
        await large
        await b.close()
        return elapsed

    elapsed = asyncio.run(main())
    assert inline.sizes[-1] == 8
    assert elapsed < 5.0, f"a full small batch waited {elapsed:.2f} s for the lane's timer"


def test_small_calls_left_behind_an_executor_batch_run_beside_it(executor):
    """A burst of small calls larger than max_batch: the first max_batch images go to the
    executor, and the small calls left in the queue run beside that run, not after it."""
    big = Model()

    async def main():
        b = beside(big, executor, max_batch=16)
        big.gate.clear()
        calls = [asyncio.ensure_future(b.submit(rows(100 * i, 4))) for i in range(10)]
        await asyncio.sleep(0.3)
        answered_while_held = sum(c.done() for c in calls)
        big.gate.set()
        await asyncio.gather(*calls)
        await b.close()
        return answered_while_held

    answered = asyncio.run(main())
    # 4 calls (16 images) are held in the executor; the other 6 are small and could run beside.
    assert answered == 6, f"{answered} of the 6 small calls left behind were answered"


# -- instances: several large runs of one model at once ------------------------------------


class OneThread(Model):
    """The one-thread session's run: in a worker it runs an instance's batch (held by `gate`,
    counting how many run at once); on the event loop's thread, a small batch (never held)."""

    def __init__(self) -> None:
        super().__init__()
        self.inline_sizes: list[int] = []
        self.running = 0
        self.most_at_once = 0
        self._lock = threading.Lock()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        if threading.current_thread() is threading.main_thread():
            self.inline_sizes.append(len(x))
            return [x * 2.0, x + 1.0]
        with self._lock:
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            return super().__call__(x)
        finally:
            with self._lock:
                self.running -= 1


def instances(wide: Model, one: OneThread, executor, n: int = 2, max_delay: float = 0.0,
              max_batch: int = 200) -> Batcher:
    """A batcher with `n` instances: its calls of up to 8 images run inline."""
    return Batcher(wide, executor, max_batch=max_batch, max_queue=10_000, max_delay=max_delay,
                   run_inline=one, inline_rows=8, instances=n)


async def hold_two_large_runs(b: Batcher, one: OneThread) -> list[asyncio.Future]:
    """Two 50-row calls queued at once, then held running by `one`'s gate."""
    one.gate.clear()
    calls = [asyncio.ensure_future(b.submit(rows(1000 * i, 50))) for i in (1, 2)]
    await asyncio.sleep(0.2)
    return calls


def assert_doubled(results: list, starts: tuple[int, ...]) -> None:
    """Each 50-row call's first output is its rows doubled."""
    for start, out in zip(starts, results, strict=True):
        np.testing.assert_array_equal(out[0], rows(start, 50) * 2)


def test_a_large_call_runs_beside_a_large_run_on_an_idle_instance(executor):
    """With two instances, a large call that arrives while another large batch runs starts
    at once on the one-thread session, instead of waiting for that run."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor)
        first = await hold_a_large_run(b, wide)  # alone: the full-width session
        second = await asyncio.wait_for(b.submit(rows(1000, 60)), 5)
        held = not first.done()
        wide.gate.set()
        out = await first
        await b.close()
        return held, second, out

    held, second, out = asyncio.run(main())
    assert held  # the second call was answered while the first run was still held
    np.testing.assert_array_equal(second[0], rows(1000, 60) * 2)
    np.testing.assert_array_equal(out[0], rows(0, 50) * 2)
    assert wide.sizes == [50] and one.sizes == [60]


def test_one_instance_keeps_one_large_run_at_a_time(executor):
    """The default (one instance): a large call waits for the large run in progress."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor, n=1)
        first = await hold_a_large_run(b, wide)
        second = asyncio.ensure_future(b.submit(rows(1000, 60)))
        await asyncio.sleep(0.2)
        waited = not second.done()
        wide.gate.set()
        await asyncio.gather(first, second)
        await b.close()
        return waited

    assert asyncio.run(main())
    assert wide.sizes == [50, 60] and one.sizes == []


def test_large_calls_queued_together_are_shared_among_idle_instances(executor):
    """Two large calls queued at once, both instances idle: each instance runs one of them
    on the one-thread session, at the same time, rather than one merged batch running while
    the other instance idles."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor)
        calls = await hold_two_large_runs(b, one)
        at_once = one.running
        one.gate.set()
        results = await asyncio.gather(*calls)
        await b.close()
        return at_once, results

    at_once, results = asyncio.run(main())
    assert at_once == 2
    assert sorted(one.sizes) == [50, 50] and wide.sizes == []
    assert_doubled(results, (1000, 2000))


def test_large_calls_queued_beside_a_run_are_not_merged_for_the_one_idle_instance(executor):
    """One instance busy, two large calls queued at once: the idle instance takes one of
    them; the other waits for the next instance to be free, rather than riding in one merged
    run while the busy instance, once free, finds nothing to do (LogLikelihood jobs at four
    in flight: BENCHMARKS.md)."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor)
        first = await hold_a_large_run(b, wide)  # alone: the full-width session
        one.gate.clear()
        calls = [asyncio.ensure_future(b.submit(rows(1000 * i, 50))) for i in (1, 2)]
        await asyncio.sleep(0.2)
        running = one.running
        wide.gate.set()
        one.gate.set()
        results = await asyncio.gather(first, *calls)
        await b.close()
        return running, results

    running, results = asyncio.run(main())
    assert running == 1
    # Three runs of one call each: not the two queued calls merged into one run of 100.
    assert sorted(one.sizes + wide.sizes) == [50, 50, 50]
    assert_doubled(results, (0, 1000, 2000))


def test_no_more_large_runs_than_instances(executor):
    """Two instances busy with large runs: a third large call waits for one of them to end,
    and small calls run beside the two."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor)
        two = await hold_two_large_runs(b, one)
        third = asyncio.ensure_future(b.submit(rows(3000, 50)))
        small = await asyncio.wait_for(b.submit(rows(5, 1)), 5)
        await asyncio.sleep(0.1)
        waiting = not third.done()
        at_once = one.running
        one.gate.set()
        results = await asyncio.gather(*two, third)
        await b.close()
        return waiting, at_once, small, results

    waiting, at_once, small, results = asyncio.run(main())
    assert waiting and at_once == 2
    assert one.most_at_once == 2 and one.sizes[:2] == [50, 50]
    # The third ran after them: on the one-thread session if it started while the other was
    # still ending, on the full-width one if alone.
    assert len(one.sizes) + len(wide.sizes) == 3
    np.testing.assert_array_equal(small[0], rows(5, 1) * 2)
    assert one.inline_sizes == [1]
    assert_doubled(results, (1000, 2000, 3000))


def test_an_idle_instance_does_not_wait_for_small_calls_to_gather(executor):
    """While one instance runs, a large call starts on the idle one at once, even when the
    batcher is waiting up to max_delay for small calls to gather."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor, max_delay=10.0)
        first = await hold_a_large_run(b, wide)
        # Five small calls at once: one inline batch of five, so the batcher expects five.
        await asyncio.gather(*(b.submit(rows(10 * i, 1)) for i in range(5)))
        gathering = asyncio.ensure_future(b.submit(rows(100, 1)))  # waits for 4 more, <= 10 s
        await asyncio.sleep(0.05)
        t0 = time.perf_counter()
        await asyncio.wait_for(b.submit(rows(1000, 60)), 30)
        elapsed = time.perf_counter() - t0
        wide.gate.set()
        await asyncio.gather(first, gathering)
        await b.close()
        return elapsed

    elapsed = asyncio.run(main())
    assert one.inline_sizes[0] == 5
    assert elapsed < 5.0, f"the large call waited {elapsed:.2f} s for small calls to gather"


def test_idle_instances_counts_those_that_would_start_new_work_at_once(executor):
    """All of them when idle; one beside one run; none with both busy and work queued."""
    wide, one = Model(), OneThread()

    async def main():
        b = instances(wide, one, executor)
        seen = [b.idle_instances()]
        first = await hold_a_large_run(b, wide)
        seen.append(b.idle_instances())
        second = asyncio.ensure_future(b.submit(rows(1000, 50)))
        one.gate.clear()
        await asyncio.sleep(0.2)
        third = asyncio.ensure_future(b.submit(rows(2000, 50)))
        await asyncio.sleep(0.1)
        seen.append(b.idle_instances())
        wide.gate.set()
        one.gate.set()
        await asyncio.gather(first, second, third)
        await asyncio.sleep(0.05)
        seen.append(b.idle_instances())
        await b.close()
        return seen

    assert asyncio.run(main()) == [2, 1, 0, 2]


def test_a_cancelled_caller_gives_its_queued_room_back_at_once(executor):
    """Before, a cancelled call's rows stayed counted in the queue until a drain passed them,
    after the run in progress: a new call was refused as queue full, and a caller waiting
    for room kept waiting, for work that no one waited for."""
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=1000)
        blocker = await hold_a_run(b, model, 100)
        gone = asyncio.ensure_future(b.submit(rows(1000, 800)))  # split in 8 slices
        alone = asyncio.ensure_future(b.submit(rows(5000, 50)))
        await asyncio.sleep(0.05)
        assert b.queued_images == 850
        waiting = asyncio.ensure_future(b.wait_room(900))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        gone.cancel()
        alone.cancel()
        await asyncio.sleep(0.01)
        queued = b.queued_images
        room = await asyncio.wait_for(waiting, 1)  # woken by the room given back
        kept = asyncio.ensure_future(b.submit(rows(9000, 30), reservation=room))
        model.gate.set()
        await blocker
        out = await kept
        room.__exit__()
        await b.close()
        return b, queued, out

    b, queued, out = asyncio.run(main())
    assert queued == 0
    np.testing.assert_array_equal(out[0], rows(9000, 30) * 2)
    ran = np.concatenate(model.ran_rows)[:, 0]
    assert not np.isin([1000, 1799, 5000], ran).any()  # the cancelled calls never ran
    assert b.dropped["cancelled"] == 9 and b.queued_images == 0


def test_batching_off_keeps_a_started_run_s_room_until_it_ends(executor):
    """With batching off, a run that has started cannot be stopped: its images count in the
    queue until it ends, whether or not its caller still waits. Before, a cancelled caller
    gave the room back at once while the run went on holding the cores."""
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=1000, merge=False)
        model.gate.clear()
        call = asyncio.ensure_future(b.submit(rows(0, 600)))
        await asyncio.sleep(0.05)
        call.cancel()
        await asyncio.sleep(0.05)
        during = b.queued_images
        with pytest.raises(QueueFull):
            b.check_room(500)
        model.gate.set()
        for _ in range(100):
            if b.queued_images == 0:
                break
            await asyncio.sleep(0.01)
        await b.close()
        return during, b.queued_images

    during, after = asyncio.run(main())
    assert (during, after) == (600, 0)


def test_a_drain_before_a_cancelled_caller_wakes_does_not_stop(executor):
    """A task's cancel() cancels the future it awaits at once; the caller withdraws its slice
    only when it next runs. A drain between the two found the slice still queued and, its
    deadline past, set an exception on the cancelled future: InvalidStateError stopped the
    drain, and the calls queued behind waited for their deadlines (30 s in a test)."""
    model = Model()

    async def main():
        b = Batcher(model, executor, max_batch=100, max_queue=1000)
        blocker = await hold_a_run(b, model, 1)
        late = asyncio.ensure_future(b.submit(rows(10, 5), deadline=time.monotonic() + 0.01))
        await asyncio.sleep(0.05)  # the late call's deadline passes while it is queued
        late.cancel()  # its future is cancelled now; the call withdraws at the next pass
        batch, size = b._take_batch()  # a drain that comes first
        model.gate.set()
        await blocker
        out = await asyncio.wait_for(b.submit(rows(20, 3)), 5)
        with pytest.raises(asyncio.CancelledError):
            await late
        await b.close()
        return b, [s.n for s in batch], size, out

    b, batch, size, out = asyncio.run(main())
    assert (batch, size) == ([], 0)  # the cancelled call is dropped, not failed
    np.testing.assert_array_equal(out[0], rows(20, 3) * 2)
    assert b.queued_images == 0 and b.dropped["cancelled"] == 1


@pytest.mark.parametrize("merge", [True, False], ids=["batching", "batching off"])
def test_a_stream_chunk_keeps_its_room_through_its_run(executor, merge):
    """A stream chunk's images count against the queue from its admission until its caller
    has read them, its run included. Before: a chunk's room went back when its run began and
    was held again, as unsent, when it ended; other work took the room meanwhile, and
    unsent stream images reached 1.25 x --max-queue-images under competing streams."""
    model = Model()

    async def main() -> None:
        b = Batcher(model, executor, max_batch=4, max_queue=8, instances=1, merge=merge)
        model.gate.clear()

        async def chunk(start: int) -> Reservation:
            room = await b.wait_room(4, keeps=True)
            with room:
                await b.submit(rows(start, 4), reservation=room)
            return room

        first = asyncio.ensure_future(chunk(0))
        await asyncio.sleep(0.05)  # running, held by the gate
        assert (b.queued_images, b.unsent_images) == (0, 4)
        second = asyncio.ensure_future(chunk(10))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            b.check_room(1)  # the first's 4 and the second's 4
        model.gate.set()
        rooms = await asyncio.gather(first, second)
        assert [r.kept for r in rooms] == [4, 4] and b.unsent_images == 8
        assert b.queued_images == 0
        b.release_unsent(8)  # sent
        b.check_room(8)
        await b.close()

    asyncio.run(main())


def test_occupancy_is_what_admission_counts_over_its_limit(executor):
    """Before: the only queue gauge counted images queued, while admission also counts room
    reserved (a LogLikelihood call's N x k rows, before any is queued), waited for, and
    made for streams: a helper saw 97 % of calls refused as queue_full while the panel
    never came near the limit. `occupancy` is admission's own sum over the limit."""
    model = Model()

    async def main() -> list[float]:
        b = Batcher(model, executor, max_batch=10, max_queue=100)
        seen = [b.occupancy]
        with b.reserve(60):
            seen.append(b.occupancy)
            room = await b.wait_room(20, keeps=True)  # a stream's chunk: unsent once run
            with room:
                await b.submit(rows(0, 20), reservation=room)
            assert room.kept == b.unsent_images == 20
            seen.append(b.occupancy)
            with pytest.raises(QueueFull):
                b.check_room(21)  # full at 1.0 and over: what the gauge must show
            b.check_room(20)
            b.release_unsent(20)
        seen.append(b.occupancy)
        await b.close()
        return seen

    assert asyncio.run(main()) == [0.0, 0.6, 0.8, 0.0]


def test_batching_off_times_the_wait_for_a_thread():
    """Before: with batching off, every call's queue wait was recorded as 0, however long it
    waited for a free executor thread behind other calls' runs: the Queue wait panel could
    not show a saturated server in that mode."""
    model = Model()
    waits: list[float] = []

    class Observer:
        def batch_run(self, size: int, queue_wait: Any, seconds: float) -> None:
            waits.extend(queue_wait)

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as one:
            b = Batcher(model, one, max_batch=100, max_queue=1000, merge=False,
                        observer=Observer())  # type: ignore[arg-type]
            model.gate.clear()
            first = asyncio.ensure_future(b.submit(rows(0, 3)))
            second = asyncio.ensure_future(b.submit(rows(10, 3)))  # waits for the one thread
            await asyncio.sleep(0.3)
            model.gate.set()
            await asyncio.gather(first, second)
            await b.close()

    asyncio.run(main())
    assert len(waits) == 2 and min(waits) < 0.1 and max(waits) >= 0.25, waits

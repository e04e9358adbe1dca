"""The in-process batching queue in front of the encoder (aegan_serve/batching.py)."""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
import pytest

from aegan_core.errors import Overloaded
from aegan_serve.batching import Batcher


class SlowModel:
    """Row i -> row i * 2 + 1, after holding the (single) model thread for ``delay_s``; records
    the rows of every run. ``gate`` lets a test hold the first run until it has queued more."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.runs: list[int] = []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        self.gate.wait(5)
        threading.Event().wait(self.delay_s)
        self.runs.append(len(rows))
        return rows * 2 + 1


def batcher(model: SlowModel, **options) -> Batcher:
    settings = {"max_batch": 16, "max_queue": 1024, "max_wait_s": 10.0, **options}
    return Batcher(model, executor=ThreadPoolExecutor(1), **settings)


def test_concurrent_requests_of_many_sizes_each_get_their_own_rows():
    model = SlowModel(delay_s=0.002)
    queue = batcher(model, max_batch=16)
    rng = np.random.default_rng(0)
    requests = [rng.normal(size=(int(rng.integers(1, 6)), 3)).astype(np.float32) for _ in range(80)]

    async def main():
        return await asyncio.gather(*(queue(rows) for rows in requests))

    answers = asyncio.run(main())
    for rows, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer, rows * 2 + 1)  # exact: same numbers, same order
    assert sum(model.runs) == sum(len(r) for r in requests)
    assert max(model.runs) <= 16  # no run larger than max_batch (no request here exceeds it)
    assert len(model.runs) < len(requests) / 3  # and requests really were put together
    assert sum(queue.sizes.values()) == len(model.runs)


def test_a_request_larger_than_max_batch_runs_alone_and_whole():
    model = SlowModel()
    queue = batcher(model, max_batch=4)
    rows = np.arange(30, dtype=np.float32).reshape(10, 3)
    answer = asyncio.run(queue(rows))
    np.testing.assert_array_equal(answer, rows * 2 + 1)
    assert model.runs == [10]


def test_max_batch_one_turns_batching_off():
    model = SlowModel(delay_s=0.001)
    queue = batcher(model, max_batch=1)

    async def main():
        return await asyncio.gather(*(queue(np.full((1, 2), i, np.float32)) for i in range(20)))

    answers = asyncio.run(main())
    assert model.runs == [1] * 20
    assert [a[0, 0] for a in answers] == [i * 2 + 1 for i in range(20)]


def test_a_full_queue_refuses_at_once_and_keeps_serving_the_rest():
    model = SlowModel()
    model.gate.clear()  # the first run holds the model until the queue has filled up
    queue = batcher(model, max_batch=4, max_queue=8)

    async def main():
        first = asyncio.ensure_future(queue(np.zeros((4, 1), np.float32)))
        await asyncio.sleep(0.05)  # the first request is now running, its rows left the queue
        waiting = [asyncio.ensure_future(queue(np.ones((4, 1), np.float32))) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="queue is full"):
            await queue(np.ones((1, 1), np.float32))  # 8 rows wait: one more is too many
        model.gate.set()
        return await asyncio.gather(first, *waiting)

    answers = asyncio.run(main())
    assert [a.tolist() for a in answers] == [[[1.0]] * 4, [[3.0]] * 4, [[3.0]] * 4]


def test_requests_that_waited_too_long_are_refused_not_run():
    model = SlowModel(delay_s=0.3)
    queue = batcher(model, max_batch=1, max_wait_s=0.1)

    async def main():
        return await asyncio.gather(
            *(queue(np.zeros((1, 1), np.float32)) for _ in range(3)), return_exceptions=True
        )

    started = time.monotonic()
    first, *late = asyncio.run(main())
    took = time.monotonic() - started
    assert first.tolist() == [[1.0]]
    for refused in late:
        assert isinstance(refused, Overloaded), late
        said = re.fullmatch(
            r"waited (\d+\.\d) s for the model, longer than 0\.1 s; retry shortly", str(refused)
        )
        assert said and 0.1 <= float(said[1]) <= took + 0.05, refused  # how long it waited
    assert model.runs == [1]  # the late ones cost no model time


def test_a_batch_takes_waiting_requests_up_to_exactly_max_batch_rows():
    model = SlowModel()
    model.gate.clear()  # the first run holds the model while four more requests queue
    queue = batcher(model, max_batch=4)

    async def main():
        first = asyncio.ensure_future(queue(np.zeros((1, 1), np.float32)))
        await asyncio.sleep(0.05)
        rest = [asyncio.ensure_future(queue(np.full((1, 1), i, np.float32))) for i in range(5)]
        await asyncio.sleep(0)
        model.gate.set()
        return await asyncio.gather(first, *rest)

    answers = asyncio.run(main())
    assert [a.tolist() for a in answers] == [[[1.0]], *([[2.0 * i + 1]] for i in range(5))]
    assert model.runs == [1, 4, 1]  # 4 of the 5 waiting rows fill a batch exactly
    assert queue.sizes == {1: 2, 4: 1}


def test_cancelled_requests_are_dropped_from_the_queue():
    model = SlowModel()
    model.gate.clear()
    queue = batcher(model, max_batch=100)

    async def main():
        first = asyncio.ensure_future(queue(np.zeros((1, 1), np.float32)))
        await asyncio.sleep(0.05)
        before = asyncio.ensure_future(queue(np.full((1, 1), 3, np.float32)))
        gone = asyncio.ensure_future(queue(np.zeros((5, 1), np.float32)))
        kept = asyncio.ensure_future(queue(np.full((2, 1), 7, np.float32)))
        await asyncio.sleep(0)
        gone.cancel()  # the client went away while waiting
        model.gate.set()
        return await first, await before, await kept

    first, before, kept = asyncio.run(main())
    assert before.tolist() == [[7.0]] and kept.tolist() == [[15.0], [15.0]]
    # the cancelled request's 5 rows were never run, and the requests on either side of it
    # still went in one batch
    assert model.runs == [1, 3]


def test_a_model_failure_fails_only_its_own_batch():
    calls = []

    def flaky(rows: np.ndarray) -> np.ndarray:
        calls.append(len(rows))
        if len(calls) == 1:
            threading.Event().wait(0.05)
            raise RuntimeError("device lost")
        return rows + 1

    queue = Batcher(flaky, max_batch=1, max_queue=10, max_wait_s=10, executor=ThreadPoolExecutor(1))

    async def main():
        return await asyncio.gather(
            queue(np.zeros((1, 1), np.float32)),
            queue(np.zeros((1, 1), np.float32)),
            return_exceptions=True,
        )

    failed, served = asyncio.run(main())
    assert isinstance(failed, RuntimeError)
    assert served.tolist() == [[1.0]]


def test_a_tiny_request_on_an_idle_model_runs_inline_and_a_busy_model_queues_it():
    threads: list[str] = []

    def model(rows: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        threading.Event().wait(0.05)
        return rows + 1

    queue = Batcher(
        model,
        max_batch=8,
        max_queue=64,
        max_wait_s=10,
        executor=ThreadPoolExecutor(1, thread_name_prefix="model"),
        inline_rows=1,
    )

    queue.inline_budget_s = 1.0  # the model below is slow on purpose: allow it inline

    async def main():
        first = await queue(np.zeros((1, 1), np.float32))  # no cost measured yet: the thread
        assert first.tolist() == [[1.0]]
        alone = await queue(np.zeros((1, 1), np.float32))  # idle and cheap: inline, this thread
        pair = await queue(np.zeros((2, 1), np.float32))  # more rows than inline_rows
        busy = asyncio.ensure_future(queue(np.zeros((3, 1), np.float32)))
        await asyncio.sleep(0.01)
        behind = await queue(np.full((1, 1), 5, np.float32))  # the model is busy: it queues
        return alone, pair, await busy, behind

    alone, pair, busy, behind = asyncio.run(main())
    assert alone.tolist() == [[1.0]] and pair.tolist() == [[1.0], [1.0]]
    assert busy.tolist() == [[1.0]] * 3 and behind.tolist() == [[6.0]]
    assert threads[1] == threading.current_thread().name
    assert all(name.startswith("model") for name in threads[:1] + threads[2:]), threads
    assert sorted(queue.sizes.elements()) == [1, 1, 1, 2, 3]
    queue.inline_budget_s = 0.001  # 50 ms a row is over the budget: never inline

    async def again():
        return await queue(np.zeros((1, 1), np.float32))

    asyncio.run(again())
    assert threads[-1].startswith("model")


def test_the_cost_of_a_row_is_a_moving_average_that_decides_what_runs_inline(monkeypatch):
    """Seconds per row of each run (timed by a clock the model moves), averaged 0.8 : 0.2 with
    the runs before; a request runs inline while its rows cost no more than the budget."""
    from aegan_serve import batching

    clock = {"now": 0.0, "step": 0.0}
    fake = SimpleNamespace(perf_counter=lambda: clock["now"], monotonic=time.monotonic)
    monkeypatch.setattr(batching, "time", fake)
    threads: list[str] = []

    def model(rows: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        clock["now"] += clock["step"]
        return rows

    queue = batcher(model, max_batch=8, inline_rows=0)

    def run(rows: int, seconds: float) -> float:
        clock["step"] = seconds
        asyncio.run(queue(np.zeros((rows, 1), np.float32)))
        return queue.row_cost_s

    assert queue.row_cost_s == math.inf  # nothing measured yet
    assert run(1, 0.01) == pytest.approx(0.01)  # the first run is the estimate
    assert run(4, 0.08) == pytest.approx(0.8 * 0.01 + 0.2 * 0.02)  # 0.02 s a row this time
    assert run(2, 0.002) == pytest.approx(0.8 * 0.012 + 0.2 * 0.001)

    queue.inline_rows = 1
    clock["step"] = 0.0
    measured = queue.row_cost_s
    for budget, inline in [(measured, True), (measured * 0.999, False)]:
        queue.row_cost_s = measured  # each case from the same estimate
        queue.inline_budget_s = budget
        threads.clear()
        asyncio.run(queue(np.zeros((1, 1), np.float32)))
        assert (threads == [threading.current_thread().name]) is inline, (budget, threads)

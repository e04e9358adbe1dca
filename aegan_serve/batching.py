"""Cross-request batching in front of one model graph, inside the server worker (asyncio only).

Concurrent requests put their inputs in one queue; a single task takes them out in arrival order,
runs the graph once on as many of them as fit in ``max_batch`` rows, and gives each request back
exactly its own rows. The next batch starts as soon as the graph is free, holding everything that
arrived meanwhile ("continuous" batching): an idle server adds no waiting time, a busy one makes
larger batches by itself. A request is never split: one with more rows than ``max_batch`` runs
alone. ``max_batch=1`` turns batching off (each request runs on its own).

Bounded: at most ``max_queue`` rows may wait, and none longer than ``max_wait_s``; past either the
request is refused with :class:`Overloaded` (429 with ``Retry-After``) before any model work is
spent on it. A request whose client went away (its task cancelled) is dropped from the queue.

A request of at most ``inline_rows`` rows that finds the graph idle and nobody waiting runs at
once, on the event loop, while the measured cost of such a run stays under ``inline_budget_s``:
for a tiny run the hops to the model thread and back cost more than the run itself.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np

from aegan_core.errors import Overloaded


@dataclass
class _Waiting:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    since: float


class Batcher:
    """Batch calls of ``run`` ((N, ...) -> (N, ...)) across concurrent requests."""

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        *,
        max_batch: int,
        max_queue: int,
        max_wait_s: float,
        executor: Executor | None = None,
        name: str = "model",
        inline_rows: int = 0,
        inline_budget_s: float = 0.001,
    ) -> None:
        self.run = run
        self.inline_rows = inline_rows
        self.inline_budget_s = inline_budget_s
        self.row_cost_s = math.inf  # measured seconds per row of recent runs (none yet)
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_wait_s = max_wait_s
        self.executor = executor  # None: the event loop's default thread pool
        self.name = name
        self.sizes: Counter[int] = Counter()  # rows per graph run, for /info
        self._queue: deque[_Waiting] = deque()
        self._queued_rows = 0
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, rows: np.ndarray) -> np.ndarray:
        """``run(rows)``, computed together with whatever other requests are waiting."""
        if self._queued_rows + len(rows) > self.max_queue:
            raise Overloaded(
                f"the {self.name} queue is full ({self._queued_rows} rows waiting, at most "
                f"{self.max_queue}); retry shortly"
            )
        loop = asyncio.get_running_loop()
        idle = not self._queue and (self._worker is None or self._worker.done())
        cheap = len(rows) * self.row_cost_s <= self.inline_budget_s
        if idle and len(rows) <= self.inline_rows and cheap:  # the hops would cost more
            self.sizes[len(rows)] += 1
            return self._timed(rows)
        item = _Waiting(rows, loop.create_future(), time.monotonic())
        self._queue.append(item)
        self._queued_rows += len(rows)
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._drain())
        return await item.future

    def _timed(self, rows: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        outputs = self.run(rows)
        cost = (time.perf_counter() - started) / max(1, len(rows))
        self.row_cost_s = (
            cost if math.isinf(self.row_cost_s) else 0.8 * self.row_cost_s + 0.2 * cost
        )
        return outputs

    def _next_batch(self) -> list[_Waiting]:
        """Take the next requests (in arrival order, at most ``max_batch`` rows unless a single
        request is larger); refuse those that waited too long; drop those nobody awaits."""
        batch: list[_Waiting] = []
        rows = 0
        now = time.monotonic()
        while self._queue:
            item = self._queue[0]
            if batch and rows + len(item.rows) > self.max_batch:
                break
            self._queue.popleft()
            self._queued_rows -= len(item.rows)
            if item.future.done():  # cancelled: the client went away
                continue
            if now - item.since > self.max_wait_s:
                item.future.set_exception(
                    Overloaded(
                        f"waited {now - item.since:.1f} s for the {self.name}, longer than "
                        f"{self.max_wait_s:g} s; retry shortly"
                    )
                )
                continue
            batch.append(item)
            rows += len(item.rows)
        return batch

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._queue:
            batch = self._next_batch()
            if not batch:
                continue
            inputs = np.concatenate([item.rows for item in batch])
            self.sizes[len(inputs)] += 1
            try:
                outputs = await loop.run_in_executor(self.executor, self._timed, inputs)
            except Exception as exc:  # a model failure fails the requests of this batch only
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            start = 0
            for item in batch:
                stop = start + len(item.rows)
                if not item.future.done():
                    item.future.set_result(outputs[start:stop])
                start = stop

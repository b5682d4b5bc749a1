"""Dynamic batching that forms a batch when the model is free.

Why not `@serve.batch`: in Ray Serve 2.60 its loop forms the next batch as soon as one is
handed over, then makes that batch wait for the running one (`max_concurrent_batches`). Under
load, while a forward pass of ~100 ms runs, the requests arriving meanwhile are cut into
batches of whatever came within `batch_wait_timeout_s` (5 ms): batches of one or two, each
waiting its turn. Measured with the MiniLM recommender on 2 cores and 16 clients: batches of
~1 and 11 req/s, against 31 req/s for batches of 16 on the same thread (bench/throughput.py).

This batcher is what Triton's dynamic batcher does: the batch is formed when the model is
free to run it. Everything that queued during the previous forward pass goes into the next one
(up to `max_batch_size`). When the model is idle, the first request waits at most
`batch_wait_timeout_s` for company, counted from its arrival, so a request that already waited
for a running batch never waits again. One batch runs at a time (a replica has one model).

A request whose caller gave up (its future cancelled) before its batch formed is dropped from
the batch. If the batch function raises, the batch's requests are run again one at a time, so
the exception reaches only the request that caused it (one malformed input must not fail the
fifteen well-formed ones batched with it); the others get their answers, at the cost of one
extra forward pass each, paid only when a batch fails. The batcher then goes on with the next
batch. A batch function can also fail one request without raising: an exception in that
request's place in the results fails only its caller. Ray-free: tests drive it with plain
asyncio.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class Batcher(Generic[Item, Result]):
    """`await batcher.submit(item)` -> the result of `item` from `run(batch)`."""

    def __init__(
        self,
        run: Callable[[list[Item]], Awaitable[Sequence[Result | Exception]]],
        *,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self._clock = clock
        self.configure(max_batch_size, batch_wait_timeout_s)
        self._queue: deque[tuple[float, Item, asyncio.Future[Result]]] = deque()
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self.batches = 0  # batches run, for tests and info()
        self.last_batch_size = 0
        self.isolated = 0  # failed batches whose requests were re-run one at a time

    def configure(self, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        """Hot patch: the next batch formed uses these."""
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait_timeout_s < 0:
            raise ValueError(
                f"batch_wait_timeout_s must not be negative, got {batch_wait_timeout_s}"
            )
        self.max_batch_size = max_batch_size
        self.batch_wait_timeout_s = batch_wait_timeout_s

    @property
    def queued(self) -> int:
        return sum(not f.done() for _, _, f in self._queue)

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((self._clock(), item, future))
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._loop())
        return await future

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0][2].done():  # cancelled by its caller
            self._queue.popleft()

    async def _loop(self) -> None:
        while True:
            self._drop_abandoned()
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            # The model is free. Wait for company only while the oldest request is young.
            deadline = self._queue[0][0] + self.batch_wait_timeout_s
            while self.queued < self.max_batch_size:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except asyncio.TimeoutError:
                    break
            batch: list[tuple[Item, asyncio.Future[Result]]] = []
            while self._queue and len(batch) < self.max_batch_size:
                _, item, future = self._queue.popleft()
                if not future.done():
                    batch.append((item, future))
            if batch:
                await self._run_one(batch)

    async def _run_one(self, batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        self.batches += 1
        self.last_batch_size = len(batch)
        try:
            results = await self._run([item for item, _ in batch])
        except asyncio.CancelledError:
            self._cancel(batch)
            raise
        except Exception as exc:
            if len(batch) == 1:
                self._settle(batch, exc)
                return
            # Which request broke it? Run each alone: only the culprit gets the exception.
            self.isolated += 1
            for item, future in batch:
                if future.done():  # its caller gave up meanwhile
                    continue
                try:
                    alone = await self._run([item])
                except asyncio.CancelledError:
                    self._cancel(batch)
                    raise
                except Exception as single:
                    self._settle([(item, future)], single)
                    continue
                self._deliver([(item, future)], alone)
            return
        self._deliver(batch, results)

    def _deliver(
        self,
        batch: list[tuple[Item, asyncio.Future[Result]]],
        results: Sequence[Result | Exception],
    ) -> None:
        if len(results) != len(batch):  # the batch function is broken: no answer can be trusted
            self._settle(batch, RuntimeError(
                f"the batch function returned {len(results)} results for {len(batch)} requests"
            ))  # fmt: skip
            return
        for (_, future), result in zip(batch, results):
            if future.done():
                continue
            if isinstance(result, Exception):  # that request's own error (e.g. its bad input)
                future.set_exception(result)
            else:
                future.set_result(result)

    @staticmethod
    def _settle(batch: list[tuple[Item, asyncio.Future[Result]]], exc: BaseException) -> None:
        for _, future in batch:
            if not future.done():
                future.set_exception(exc)

    @staticmethod
    def _cancel(batch: list[tuple[Item, asyncio.Future[Result]]]) -> None:
        for _, future in batch:
            if not future.done():
                future.cancel()

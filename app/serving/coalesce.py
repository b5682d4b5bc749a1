"""Router -> model micro-batching: concurrent calls to one version leave as one call when the
version is busy.

The model replica already batches dynamically (`app/serving/batching.py`), but each request the
Router serves still crosses the Ray boundary as its own Serve handle call, and each such call
costs the Router and the replica a fixed amount of CPU (Serve's request bookkeeping, one
serialization, one RPC) whatever the model does. Under load that fixed cost, not the model, can
be what limits a small model. `Coalescer` sends concurrent items for one key (a version) as one
call (`ModelServer.infer_many`) when the key is busy:

- While a key has fewer than `max_calls_in_flight` calls out per replica of it (`replicas(key)`,
  the version's running replicas: a version scaled out to three takes three times the calls),
  an item leaves at once, alone: at concurrency 1 nothing waits and nothing changes (the
  single-item call is the plain `infer`).
- Once it has that many, items queue; the queue leaves as one call when a call of that key
  comes back (the same rule as the replica's batcher: the batch forms when there is room for
  it), or at once when it holds `max_batch_size` items. A queued item never waits for a timer.
- A call carries at most `max_batch_size` items.
- At most `limit(key)` items of a key are outstanding, in calls out or waiting (-1: no limit):
  one more is refused at once with `QueueFull`, which the Router answers as load shedding (503
  with Retry-After) rather than send it on. The Router's limit is what Serve admits from one
  caller when each request is a call of its own: the version's running replicas times its
  `max_ongoing_requests`, plus its `max_queued_requests`. Without it the full calls that leave
  a busy key at once would pile up in Serve's handle queue, which counts calls, not requests.

Per-item semantics are the caller's and the sender's, never the coalescer's: each item has its
own future, so its own deadline (an item whose caller gave up is dropped from the queue, and a
call whose callers all gave up is cancelled), its own result and its own error. The sender
returns one result or one exception per item, in order; an exception in an item's place fails
only that item. If the sender raises (the call as a whole failed: a lost replica, a full
queue), every item of the call fails with that same error, so each runs its own retry or
fallback. Ray-free: tests drive it with plain asyncio and a fake sender.
"""

from __future__ import annotations

import asyncio
import functools
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from app.config.router import MicroBatchSettings

__all__ = ["Coalescer", "LaneStats", "QueueFull", "Send"]

Item = TypeVar("Item")
Result = TypeVar("Result")

# send(key, items) -> one result or one exception per item, in the items' order
Send = Callable[[str, list[Item]], Awaitable[Sequence[Result | BaseException]]]


class QueueFull(Exception):
    """The key already has `limit` items outstanding: this one is refused, not queued."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(f"{limit} requests for {key!r} are already out or waiting")
        self.key = key
        self.limit = limit


@dataclass
class LaneStats:
    """Per key: calls sent, items they carried, calls with more than one item, the largest,
    the most calls out at once, and items refused on a full queue."""

    calls: int = 0
    items: int = 0
    coalesced_calls: int = 0
    largest_call: int = 0
    peak_in_flight: int = 0
    shed: int = 0

    def snapshot(self) -> dict[str, int]:
        return {"calls": self.calls, "items": self.items, "coalesced_calls": self.coalesced_calls,
                "largest_call": self.largest_call, "peak_in_flight": self.peak_in_flight,
                "shed": self.shed}  # fmt: skip


@dataclass
class _Lane(Generic[Item, Result]):
    pending: deque[tuple[Item, asyncio.Future[Result]]] = field(default_factory=deque)
    in_flight: int = 0
    items_out: int = 0  # items in the calls in flight
    stats: LaneStats = field(default_factory=LaneStats)


class Coalescer(Generic[Item, Result]):
    """`await coalescer.submit(key, item)` -> the item's result from `send(key, [..., item, ...])`."""

    def __init__(
        self,
        send: Send[Item, Result],
        settings: MicroBatchSettings,
        replicas: Callable[[str], int] = lambda key: 1,
        limit: Callable[[str], int] = lambda key: -1,
    ) -> None:
        self._send = send
        self._lanes: dict[str, _Lane[Item, Result]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.settings = settings
        self._replicas = replicas  # a key's running replicas (fewer than 1 counts as 1)
        self._limit = limit  # items of a key outstanding, out or waiting (-1: no limit)

    def _room(self, key: str) -> int:
        """Calls `key` may have out before items wait."""
        return self.settings.max_calls_in_flight * max(1, self._replicas(key))

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def configure(self, settings: MicroBatchSettings) -> None:
        """Hot patch: the next call formed uses these. Items queued under tighter settings (or
        while it was on) are sent now rather than left waiting for a call that may not come."""
        self.settings = settings
        for key, lane in self._lanes.items():
            self._pump(key, lane)

    def in_flight(self, key: str) -> int:
        lane = self._lanes.get(key)
        return 0 if lane is None else lane.in_flight

    def queued(self, key: str) -> int:
        lane = self._lanes.get(key)
        return 0 if lane is None else sum(not f.done() for _, f in lane.pending)

    def snapshot(self) -> dict[str, Any]:
        """Per key counters, and the totals (for /status)."""
        lanes = {key: lane.stats.snapshot() for key, lane in self._lanes.items()}
        totals = {name: sum(s[name] for s in lanes.values())
                  for name in ("calls", "items", "coalesced_calls", "shed")}  # fmt: skip
        return {**totals, "versions": lanes}

    async def submit(self, key: str, item: Item) -> Result:
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane()
        limit = self._limit(key) if self.settings.enabled else -1
        if limit >= 0 and lane.items_out + self.queued(key) >= limit:
            lane.stats.shed += 1
            raise QueueFull(key, limit)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        lane.pending.append((item, future))
        self._pump(key, lane)
        # A caller that gives up (its deadline, a client gone) cancels `future`: it is then
        # skipped when the next call forms, or its result dropped if its call already left.
        return await future

    def _pump(self, key: str, lane: _Lane[Item, Result]) -> None:
        """Send what may leave now: alone while the key has room for more calls, in calls of up
        to max_batch_size when it has not; a full call always leaves."""
        settings = self.settings
        size = settings.max_batch_size if settings.enabled else 1
        room = self._room(key)
        while lane.pending:
            live = [entry for entry in lane.pending if not entry[1].done()]
            lane.pending = deque(live)
            if not live:
                return
            if settings.enabled and lane.in_flight >= room:
                if len(live) < size:
                    return  # busy: wait for a call to come back, or for a full call
            batch = [lane.pending.popleft() for _ in range(min(size, len(lane.pending)))]
            lane.in_flight += 1
            lane.items_out += len(batch)
            stats = lane.stats
            stats.calls += 1
            stats.items += len(batch)
            stats.coalesced_calls += len(batch) > 1
            stats.largest_call = max(stats.largest_call, len(batch))
            stats.peak_in_flight = max(stats.peak_in_flight, lane.in_flight)
            task = asyncio.get_running_loop().create_task(self._run(key, lane, batch))
            self._tasks.add(task)  # keep a reference until it finishes
            task.add_done_callback(self._tasks.discard)
            watch = functools.partial(_abandoned, batch, task)
            for _, future in batch:
                future.add_done_callback(watch)

    async def _run(
        self, key: str, lane: _Lane[Item, Result], batch: list[tuple[Item, asyncio.Future[Result]]]
    ) -> None:
        futures = [future for _, future in batch]
        try:
            results = await self._send(key, [item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(
                    f"the sender returned {len(results)} results for {len(batch)} items"
                )
        except asyncio.CancelledError:
            # Every caller gave up (see _abandoned), or the loop is shutting down.
            for future in futures:
                future.cancel()
        except Exception as exc:  # the call as a whole failed: each item fails with it
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
        else:
            for future, result in zip(futures, results):
                if future.done():  # its caller gave up while the call was out
                    continue
                if isinstance(result, asyncio.CancelledError):
                    future.cancel()  # (set_exception refuses a CancelledError)
                elif isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            lane.in_flight -= 1
            lane.items_out -= len(batch)
            self._pump(key, lane)


def _abandoned(
    batch: list[tuple[Any, asyncio.Future[Any]]], task: asyncio.Task[None], _: object
) -> None:
    """Cancel a call once every item in it was cancelled by its caller: nobody waits for it,
    and the replica should not spend a forward pass on it."""
    if not task.done() and all(future.cancelled() for _, future in batch):
        task.cancel()

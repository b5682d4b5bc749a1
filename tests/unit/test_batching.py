"""app/serving/batching.py: batches form when the model is free; plain asyncio, no Ray."""

from __future__ import annotations

import asyncio

import pytest

from app.serving.batching import Batcher


class Model:
    """A batch function that takes `seconds` per batch and records the batches it saw."""

    def __init__(self, seconds: float = 0.0, fail_on: object = None,
                 hold: asyncio.Event | None = None) -> None:  # fmt: skip
        self.seconds, self.fail_on, self.hold = seconds, fail_on, hold
        self.batches: list[list[int]] = []
        self.running = 0
        self.most_running = 0

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await asyncio.sleep(self.seconds)
            if self.hold is not None and len(self.batches) == 1:
                await self.hold.wait()  # the first forward pass lasts until the test says so
            if self.fail_on in items:
                raise ValueError(f"bad item {self.fail_on}")
            return [i * 10 for i in items]
        finally:
            self.running -= 1


def run(coro):
    return asyncio.run(coro)


def test_requests_queued_during_a_forward_pass_form_the_next_batch():
    # @serve.batch (2.60) would cut these into batches of one, each waiting its turn.
    async def scenario():
        done_arriving = asyncio.Event()
        model = Model(hold=done_arriving)
        batcher = Batcher(model, max_batch_size=16, batch_wait_timeout_s=0.001)
        first = asyncio.create_task(batcher.submit(0))
        while not model.batches:  # the first batch (of one) is running
            await asyncio.sleep(0.001)
        rest = []
        for i in range(1, 11):  # arrive one by one, further apart than the wait timeout
            rest.append(asyncio.create_task(batcher.submit(i)))
            await asyncio.sleep(0.002)
        done_arriving.set()  # (no timing: the first pass runs until all ten have queued)
        results = await asyncio.gather(first, *rest)
        return model, results

    model, results = run(scenario())
    assert results == [i * 10 for i in range(11)]
    assert model.batches == [[0], list(range(1, 11))]
    assert model.most_running == 1


def test_max_batch_size_splits_a_long_queue_in_arrival_order():
    async def scenario():
        model = Model(seconds=0.01)
        batcher = Batcher(model, max_batch_size=4, batch_wait_timeout_s=0.0)
        return model, await asyncio.gather(*(batcher.submit(i) for i in range(10)))

    model, results = run(scenario())
    assert results == [i * 10 for i in range(10)]
    assert model.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_an_idle_model_waits_for_company_up_to_the_timeout():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=8, batch_wait_timeout_s=0.2)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.02)
        second = asyncio.create_task(batcher.submit(2))
        await asyncio.gather(first, second)
        return model

    assert run(scenario()).batches == [[1, 2]]


def test_a_full_batch_does_not_wait_for_the_timeout():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=3, batch_wait_timeout_s=30.0)
        # With a 30 s timeout this only finishes because the third request fills the batch.
        return await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(3))), 5)

    assert run(scenario()) == [0, 10, 20]


def test_the_timeout_counts_from_the_oldest_arrival():
    # A request that waited for a running batch is not made to wait again: here the timeout
    # is 5 s of the fake clock, which moves 10 s while the first batch runs.
    async def scenario():
        now = [0.0]
        model = Model(seconds=0.05)
        batcher = Batcher(model, max_batch_size=8, batch_wait_timeout_s=5.0, clock=lambda: now[0])
        batcher.configure(8, 0.0)
        first = asyncio.create_task(batcher.submit(1))
        await asyncio.sleep(0.01)  # batch [1] is running; the next one waits up to 5 s
        batcher.configure(8, 5.0)
        second = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.001)
        now[0] = 10.0
        return await asyncio.wait_for(asyncio.gather(first, second), 2), model

    results, model = run(scenario())
    assert results == [10, 20] and model.batches == [[1], [2]]


def test_an_exception_fails_only_the_request_that_caused_it_and_the_next_batch_runs():
    # One poison request among three: the batch is re-run one request at a time, so the two
    # well-formed requests are answered and only the culprit gets the exception.
    async def scenario():
        model = Model(seconds=0.01, fail_on=2)
        batcher = Batcher(model, max_batch_size=3, batch_wait_timeout_s=0.0)
        first = await asyncio.gather(*(batcher.submit(i) for i in range(3)), return_exceptions=True)
        second = await batcher.submit(7)
        return first, second, model, batcher

    first, second, model, batcher = run(scenario())
    assert first[:2] == [0, 10]
    assert isinstance(first[2], ValueError) and "bad item 2" in str(first[2])
    assert second == 70
    assert model.batches == [[0, 1, 2], [0], [1], [2], [7]]
    assert batcher.isolated == 1


def test_one_poison_request_among_sixteen_fails_alone():
    async def scenario():
        model = Model(seconds=0.01, fail_on=5)
        batcher = Batcher(model, max_batch_size=16, batch_wait_timeout_s=0.05)
        return await asyncio.gather(*(batcher.submit(i) for i in range(16)), return_exceptions=True)

    results = run(scenario())
    failed = [i for i, r in enumerate(results) if isinstance(r, Exception)]
    assert failed == [5]
    assert [r for i, r in enumerate(results) if i != 5] == [i * 10 for i in range(16) if i != 5]


def test_a_wrong_number_of_results_fails_the_batch():
    async def short(items):
        return items[:-1]

    async def scenario():
        batcher = Batcher(short, max_batch_size=2, batch_wait_timeout_s=0.0)
        return await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)

    results = run(scenario())
    assert all(
        isinstance(r, RuntimeError) and "1 results for 2 requests" in str(r) for r in results
    )


def test_a_cancelled_request_is_left_out_of_its_batch():
    async def scenario():
        model = Model(seconds=0.05)
        batcher = Batcher(model, max_batch_size=8, batch_wait_timeout_s=0.0)
        running = asyncio.create_task(batcher.submit(0))
        await asyncio.sleep(0.01)
        gone = asyncio.create_task(batcher.submit(1))
        kept = asyncio.create_task(batcher.submit(2))
        await asyncio.sleep(0.001)
        gone.cancel()
        return model, await asyncio.gather(running, kept), gone.cancelled()

    model, results, cancelled = run(scenario())
    assert results == [0, 20] and cancelled
    assert model.batches == [[0], [2]]


def test_configure_applies_to_the_next_batch_and_rejects_bad_values():
    async def scenario():
        model = Model()
        batcher = Batcher(model, max_batch_size=1, batch_wait_timeout_s=0.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(2)))
        batcher.configure(max_batch_size=4, batch_wait_timeout_s=0.0)
        await asyncio.gather(*(batcher.submit(i) for i in range(4)))
        return model

    assert run(scenario()).batches == [[0], [1], [0, 1, 2, 3]]
    batcher = Batcher(Model(), max_batch_size=1, batch_wait_timeout_s=0)
    with pytest.raises(ValueError, match="max_batch_size must be at least 1, got 0"):
        batcher.configure(0, 0.1)
    with pytest.raises(ValueError, match="batch_wait_timeout_s must not be negative, got -1"):
        batcher.configure(4, -1)

"""app/serving/coalesce.py: router -> model micro-batching; plain asyncio and a fake sender, no Ray."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.config.router import MicroBatchSettings
from app.config.traffic import TrafficConfig, apply_override
from app.errors import InvalidInput, ReplicaLost
from app.serving.coalesce import Coalescer, QueueFull


class Replica:
    """A fake sender: records each call's items; a call lasts until the test releases it.
    Item "bad" fails alone (InvalidInput in its place); `lost` makes the next call raise."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[object]]] = []
        self.gates: list[asyncio.Event] = []
        self.lost = False
        self.cancelled = 0

    async def __call__(self, key: str, items: list[object]) -> list[object]:
        self.calls.append((key, list(items)))
        gate = asyncio.Event()
        self.gates.append(gate)
        try:
            await gate.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.lost:
            raise ReplicaLost("the replica died")
        return [InvalidInput(f"bad item {i}") if i == "bad" else f"{key}:{i}" for i in items]

    def release(self, index: int | None = None) -> None:
        for gate in self.gates if index is None else [self.gates[index]]:
            gate.set()


def on(max_batch_size: int = 32, max_calls_in_flight: int = 1) -> MicroBatchSettings:
    return MicroBatchSettings(enabled=True, max_batch_size=max_batch_size,
                              max_calls_in_flight=max_calls_in_flight)  # fmt: skip


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def run(coro):
    return asyncio.run(coro)


async def drain(replica: Replica) -> None:
    """Answer every call out, let the queued ones leave, and answer those too."""
    replica.release()
    await settle()
    replica.release()


def test_an_idle_version_sends_at_once_alone():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        task = asyncio.create_task(coalescer.submit("v1", 1))
        await settle()
        assert replica.calls == [("v1", [1])]  # nothing waited for company
        replica.release()
        return await task, coalescer.snapshot()

    result, snapshot = run(scenario())
    assert result == "v1:1"
    assert snapshot["calls"] == 1 and snapshot["coalesced_calls"] == 0


def test_requests_arriving_while_the_version_is_busy_leave_as_one_call():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        first = asyncio.create_task(coalescer.submit("v1", 0))
        await settle()
        rest = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(1, 8)]
        await settle()
        assert len(replica.calls) == 1  # busy: the seven wait for the first call
        assert coalescer.queued("v1") == 7
        replica.release(0)
        await settle()
        replica.release()
        return replica, await asyncio.gather(first, *rest), coalescer.snapshot()

    replica, results, snapshot = run(scenario())
    assert [items for _, items in replica.calls] == [[0], list(range(1, 8))]
    assert results == [f"v1:{i}" for i in range(8)]
    assert snapshot["versions"]["v1"] == {"calls": 2, "items": 8, "coalesced_calls": 1,
                                          "largest_call": 7, "peak_in_flight": 1, "shed": 0}  # fmt: skip


def test_below_max_calls_in_flight_each_request_leaves_alone():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on(max_calls_in_flight=3))
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(5)]
        await settle()
        calls = [items for _, items in replica.calls]
        await drain(replica)
        await asyncio.gather(*tasks)
        return calls

    assert run(scenario()) == [[0], [1], [2]]  # the 4th and 5th wait for one of those


def test_a_version_scaled_out_takes_max_calls_in_flight_per_replica():
    # With one call per version, a version Serve scaled out to 3 replicas would still get one
    # call at a time from this router: two of its replicas idle while requests wait.
    async def scenario():
        replica = Replica()
        replicas = {"v1": 3}
        coalescer = Coalescer(replica, on(max_calls_in_flight=1), replicas=replicas.__getitem__)
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(5)]
        await settle()
        alone = [items for _, items in replica.calls]
        replicas["v1"] = 0  # none running (a restart): counted as one
        replica.release(0)
        await settle()
        after = [items for _, items in replica.calls]
        await drain(replica)
        await asyncio.gather(*tasks)
        return alone, after, coalescer.snapshot()["versions"]["v1"]

    alone, after, lane = run(scenario())
    assert alone == [[0], [1], [2]]  # 3 replicas x 1 call; the 4th and 5th wait
    assert after == [[0], [1], [2]]  # 2 still out >= 1 x max(1, 0): [3, 4] keep waiting
    assert lane["peak_in_flight"] == 3


def test_past_its_limit_of_outstanding_requests_one_more_is_refused_at_once():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on(max_calls_in_flight=1), limit=lambda key: 3)
        first = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(3)]
        await settle()  # [0] out, [1, 2] wait: 3 outstanding
        with pytest.raises(
            QueueFull, match="3 requests for 'v1' are already out or waiting"
        ) as full:
            await coalescer.submit("v1", 3)
        assert full.value.limit == 3
        other = asyncio.create_task(coalescer.submit("v2", 9))  # another version has its own
        await drain(replica)
        results = await asyncio.gather(*first, other)
        # Room again once they were answered: a new request is taken.
        late = asyncio.create_task(coalescer.submit("v1", 4))
        await settle()
        replica.release()
        return results, await late, coalescer.snapshot()

    results, late, snapshot = run(scenario())
    assert results == ["v1:0", "v1:1", "v1:2", "v2:9"] and late == "v1:4"
    assert snapshot["shed"] == 1 and snapshot["versions"]["v1"]["shed"] == 1


def test_full_calls_that_leave_a_busy_version_count_against_its_limit():
    # A full call leaves at once even when the version is busy, so the queue itself never holds
    # a whole call: the limit counts the requests in calls out too, or the calls would pile up
    # in Serve's handle queue (which counts calls, not requests).
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on(max_batch_size=4, max_calls_in_flight=1),
                              limit=lambda key: 10)  # fmt: skip
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(20)]
        await settle()
        out = [items for _, items in replica.calls]
        refused = sum(1 for t in tasks if t.done() and isinstance(t.exception(), QueueFull))
        await drain(replica)
        await asyncio.gather(*tasks, return_exceptions=True)
        return out, refused, coalescer.queued("v1")

    out, refused, queued = run(scenario())
    assert out == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # [9] waits: 1 + 4 + 4 + 1 = 10
    assert refused == 10 and queued == 0


def test_no_limit_when_off_or_unbounded():
    async def scenario(settings, limit):
        replica = Replica()
        coalescer = Coalescer(replica, settings, limit=lambda key: limit)
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(6)]
        await settle()
        await drain(replica)
        return await asyncio.gather(*tasks)

    assert len(run(scenario(on(max_calls_in_flight=1), -1))) == 6
    assert len(run(scenario(MicroBatchSettings(enabled=False), 0))) == 6  # off: Serve's queue


def test_a_full_call_leaves_without_waiting_and_calls_are_capped():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on(max_batch_size=4))
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(10)]
        await settle()
        calls = [items for _, items in replica.calls]
        await drain(replica)
        await asyncio.gather(*tasks)
        return calls, [items for _, items in replica.calls]

    before, after = run(scenario())
    assert before == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]  # [9] waits: not full, version busy
    assert after == [*before, [9]]


def test_versions_are_coalesced_apart():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        tasks = [asyncio.create_task(coalescer.submit(v, i)) for i in range(3) for v in ("a", "b")]
        await settle()
        await drain(replica)
        return replica.calls, await asyncio.gather(*tasks)

    calls, results = run(scenario())
    assert sorted(calls) == [("a", [0]), ("a", [1, 2]), ("b", [0]), ("b", [1, 2])]
    assert results == [f"{v}:{i}" for i in range(3) for v in ("a", "b")]


def test_a_bad_item_fails_alone_with_its_own_error():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        first = asyncio.create_task(coalescer.submit("v1", "x"))
        await settle()
        batch = [asyncio.create_task(coalescer.submit("v1", i)) for i in ("a", "bad", "c")]
        await settle()
        await drain(replica)
        return replica.calls, await asyncio.gather(first, *batch, return_exceptions=True)

    calls, results = run(scenario())
    assert calls[1] == ("v1", ["a", "bad", "c"])  # coalesced together
    assert results[0] == "v1:x" and results[1] == "v1:a" and results[3] == "v1:c"
    assert isinstance(results[2], InvalidInput) and results[2].message == "bad item bad"


def test_a_whole_call_failure_reaches_every_item_of_that_call_only():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        first = asyncio.create_task(coalescer.submit("v1", 0))
        await settle()
        batch = [asyncio.create_task(coalescer.submit("v1", i)) for i in (1, 2, 3)]
        await settle()
        replica.release(0)  # the first call answers...
        await settle()
        replica.lost = True  # ...the coalesced one loses its replica
        replica.release()
        return await asyncio.gather(first, *batch, return_exceptions=True)

    first, *batch = run(scenario())
    assert first == "v1:0"
    assert all(isinstance(r, ReplicaLost) for r in batch)  # each item retries or falls back


def test_an_item_whose_caller_gave_up_is_dropped_before_its_call_leaves():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        first = asyncio.create_task(coalescer.submit("v1", 0))
        await settle()
        impatient = asyncio.create_task(asyncio.wait_for(coalescer.submit("v1", 1), 0.001))
        patient = asyncio.create_task(coalescer.submit("v1", 2))
        with pytest.raises(asyncio.TimeoutError):
            await impatient  # its own deadline: the others' are untouched
        replica.release(0)
        await settle()
        replica.release()
        return replica.calls, await asyncio.gather(first, patient)

    calls, results = run(scenario())
    assert [items for _, items in calls] == [[0], [2]]
    assert results == ["v1:0", "v1:2"]


def test_a_call_whose_callers_all_gave_up_is_cancelled_and_frees_its_slot():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        first = asyncio.create_task(coalescer.submit("v1", 0))
        await settle()
        first.cancel()
        await settle()
        assert replica.cancelled == 1 and coalescer.in_flight("v1") == 0
        later = asyncio.create_task(coalescer.submit("v1", 1))
        await settle()
        replica.release(1)
        return await later

    assert run(scenario()) == "v1:1"


def test_one_caller_giving_up_does_not_cancel_a_shared_call():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        first = asyncio.create_task(coalescer.submit("v1", 0))
        await settle()
        a = asyncio.create_task(coalescer.submit("v1", 1))
        b = asyncio.create_task(coalescer.submit("v1", 2))
        await settle()
        replica.release(0)
        await settle()  # [1, 2] is out
        a.cancel()
        await settle()
        replica.release()
        return replica.cancelled, await first, await b

    assert run(scenario()) == (0, "v1:0", "v1:2")


def test_off_every_request_leaves_alone_at_once():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, MicroBatchSettings(enabled=False))
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(4)]
        await settle()
        replica.release()
        await asyncio.gather(*tasks)
        return [items for _, items in replica.calls]

    assert run(scenario()) == [[0], [1], [2], [3]]


def test_a_hot_patch_turning_it_off_sends_what_was_queued():
    async def scenario():
        replica = Replica()
        coalescer = Coalescer(replica, on())
        tasks = [asyncio.create_task(coalescer.submit("v1", i)) for i in range(3)]
        await settle()
        assert coalescer.queued("v1") == 2
        coalescer.configure(MicroBatchSettings(enabled=False))
        await settle()
        replica.release()
        await asyncio.gather(*tasks)
        return [items for _, items in replica.calls]

    assert run(scenario()) == [[0], [1], [2]]


def test_a_sender_returning_the_wrong_count_fails_the_call_not_the_coalescer():
    async def short(key: str, items: list[int]) -> list[int]:
        return items[:-1]

    async def scenario():
        coalescer = Coalescer(short, on(max_calls_in_flight=1))
        with pytest.raises(RuntimeError, match="1 results for 2 items|0 results for 1 items"):
            await coalescer.submit("v1", 0)
        return coalescer.in_flight("v1")

    assert run(scenario()) == 0


def test_the_setting_is_part_of_the_hot_patchable_traffic_table_and_survives_an_override():
    config = TrafficConfig.model_validate({"stable": "v1", "weights": {"v1": 100},
                                           "microbatch": {"enabled": True, "max_batch_size": 8}})  # fmt: skip
    assert config.microbatch == MicroBatchSettings(enabled=True, max_batch_size=8)
    steered = apply_override(config, {"weights": {"v1": 100}, "stable": "v1"})
    assert steered.microbatch == config.microbatch
    assert TrafficConfig.model_validate({"stable": "v1", "weights": {"v1": 100}}).microbatch \
        == MicroBatchSettings()  # fmt: skip
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatchSettings(max_batch_size=0)


@settings(max_examples=60, deadline=None)
@given(
    arrivals=st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=40),
    max_batch_size=st.integers(min_value=1, max_value=8),
    max_calls_in_flight=st.integers(min_value=1, max_value=4),
    bad=st.sets(st.integers(min_value=0, max_value=39), max_size=5),
)
def test_every_item_gets_exactly_its_own_answer_within_the_limits(
    arrivals, max_batch_size, max_calls_in_flight, bad
):
    """Items arrive in waves (`arrivals[i]` loop turns after the previous one) while calls take
    a varying number of turns: every item gets its own answer or its own error, once; no call
    exceeds max_batch_size; and calls out at once exceed max_calls_in_flight only by full calls."""

    async def scenario():
        calls: list[list[int]] = []
        out = 0
        most_out_unfull = 0

        async def send(key: str, items: list[int]) -> list[object]:
            nonlocal out, most_out_unfull
            calls.append(list(items))
            out += 1
            if len(items) < max_batch_size:
                most_out_unfull = max(most_out_unfull, out)
            try:
                for _ in range(items[0] % 3 + 1):
                    await asyncio.sleep(0)
            finally:
                out -= 1
            return [InvalidInput(str(i)) if i in bad else i * 2 for i in items]

        coalescer = Coalescer(send, on(max_batch_size, max_calls_in_flight))
        tasks = []
        for i, wait in enumerate(arrivals):
            for _ in range(wait):
                await asyncio.sleep(0)
            tasks.append(asyncio.create_task(coalescer.submit("v", i)))
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return calls, results, most_out_unfull

    calls, results, most_out_unfull = run(scenario())
    for i, result in enumerate(results):
        if i in bad:
            assert isinstance(result, InvalidInput) and result.message == str(i)
        else:
            assert result == i * 2
    assert sorted(i for call in calls for i in call) == list(range(len(arrivals)))  # once each
    assert all(1 <= len(call) <= max_batch_size for call in calls)
    assert most_out_unfull <= max_calls_in_flight

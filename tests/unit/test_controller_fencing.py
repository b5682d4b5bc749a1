"""Fencing: when two RolloutController replicas overlap (Serve starts the new replica of an
updated controller while the old one drains), only the newest one's writes count and the
superseded one stops ticking, publishing and taking commands (issue 18 item 4, F6.3).

Each test runs two ControllerCores over one InMemoryStore, as two replicas over one GCS."""

from __future__ import annotations

import json

import pytest

from app.errors import Fenced, Unavailable, http_status
from app.observability.stats import RouterStats
from deployments.controller import CHECKPOINT_S, EPOCH_SUFFIX, FENCE_CHECK_S, ControllerCore
from deployments.store import Fence, InMemoryStore
from tests.support.fakes import FakeClock
from tests.unit.test_controller import DECLARED, KEY, controller, declared, run

EPOCH_KEY = KEY + EPOCH_SUFFIX


class FlakyStore(InMemoryStore):
    """An InMemoryStore whose reads can fail, and which can run `before_put(key)` just before
    a write lands (another replica acting between a check and a write)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_gets = False
        self.before_put = None

    def get(self, key: str) -> bytes | None:
        if self.fail_gets:
            raise OSError("store unavailable (FlakyStore.fail_gets)")
        return super().get(key)

    def put(self, key: str, value: bytes) -> None:
        hook, self.before_put = self.before_put, None
        if hook is not None:
            hook(key)
        super().put(key, value)


def failing_stats() -> dict:
    stats = RouterStats()
    for n in range(40):
        stats.record("v2", n % 2 == 0, 10.0)  # 50% errors: past fail-fast
        stats.record("v1", True, 10.0)
    return stats.drain()


def overlapped(store: InMemoryStore, clock: FakeClock) -> tuple[ControllerCore, ControllerCore]:
    """The old replica runs a rollout; then Serve starts the new one beside it."""
    old = run(declared(controller(store, clock)))
    new = controller(store, clock)
    run(new.reconfigure(DECLARED))
    run(new.tick())
    return old, new


def test_each_replica_claims_the_next_epoch_and_tags_what_it_stores():
    store, clock = InMemoryStore(), FakeClock()
    first = run(declared(controller(store, clock)))
    assert first.epoch == 1 and json.loads(store.data[KEY])["epoch"] == 1
    second = controller(store, clock)
    run(second.tick())  # a replica re-stores what it resumed, under its own epoch
    assert second.epoch == 2 and json.loads(store.data[KEY])["epoch"] == 2
    assert run(second.status())["epoch"] == 2


def test_a_superseded_replica_stops_and_answers_503_to_everything():
    store, clock = InMemoryStore(), FakeClock()
    old, new = overlapped(store, clock)
    clock.advance(FENCE_CHECK_S)
    run(old.tick())  # nothing to write: it still checks the fence about once a second
    assert old.fenced is not None and "epoch 1" in old.fenced and "epoch 2" in old.fenced
    for call in (
        old.command("abort"),
        old.status(),
        old.history(),
        old.check_health(),
        old.wait_for_traffic(0, 0.01),
        old.report({}),
        old.feedback([], {}),
    ):
        with pytest.raises(Fenced, match="superseded by epoch 2") as refused:
            run(call)
        assert http_status(refused.value) == 503 and refused.value.retry_after_s == 1.0
    # the new replica is not disturbed
    assert run(new.command("pause"))["phase"] == "paused"
    assert run(new.command("abort"))["phase"] == "aborted"
    assert json.loads(store.data[KEY])["phase"] == "aborted"


def test_a_superseded_replica_never_stores_or_publishes_its_decisions():
    # The old replica's evidence (or a stale view) decides a rollback after the new one took
    # over: it must not reach the store or the routers, whatever it decided in memory.
    store, clock = InMemoryStore(), FakeClock()
    old, new = overlapped(store, clock)
    published = dict(old.override)
    run(old.report(failing_stats()))
    run(old.tick())
    assert old.override == published  # no router was told
    assert json.loads(store.data[KEY])["phase"] == "progressing"
    assert json.loads(store.data[KEY])["epoch"] == 2
    assert old.fenced is not None
    clock.advance(FENCE_CHECK_S)
    run(old.tick())  # ticking on is a no-op
    assert json.loads(store.data[KEY])["epoch"] == 2
    assert new.state.phase.value == "progressing"


def test_a_write_that_lands_after_a_newer_claim_is_neither_acknowledged_nor_published():
    # GCS KV has no conditional write: the old replica checks the fence, then a newer replica
    # claims it, then the old one's write lands. The check after the write catches it.
    store, clock = FlakyStore(), FakeClock()
    old = run(declared(controller(store, clock)))
    published = dict(old.override)
    store.before_put = lambda key: Fence(store, EPOCH_KEY).claim()
    with pytest.raises(Fenced, match="abort may not be applied: .*superseded by epoch 2"):
        run(old.command("abort"))
    assert old.override == published  # routers never heard of the abort
    assert old.fenced is not None


def test_a_stale_write_that_landed_is_overwritten_by_the_holders_next_checkpoint():
    store, clock = InMemoryStore(), FakeClock()
    old, new = overlapped(store, clock)
    stale = json.loads(store.data[KEY]) | {"phase": "aborted", "epoch": 1}
    store.data[KEY] = json.dumps(stale).encode()  # the old replica's write, landing late
    clock.advance(CHECKPOINT_S)
    run(new.tick())
    saved = json.loads(store.data[KEY])
    assert saved["epoch"] == 2 and saved["phase"] == "progressing"


def test_two_replicas_claiming_the_same_epoch_leave_exactly_one_holder():
    # Read, increment, write is not atomic: both may write epoch 1. The last write wins and
    # the other replica's token is not in the store, so it is the one fenced.
    store = InMemoryStore()
    first, second = Fence(store, EPOCH_KEY), Fence(store, EPOCH_KEY)
    first.claim()
    del store.data[EPOCH_KEY]  # second read before first wrote
    second.claim()
    assert first.epoch == second.epoch == 1
    assert store.get(EPOCH_KEY) is not None
    assert [first.holder() == f.mine for f in (first, second)] == [False, True]


def test_an_unreadable_fence_writes_nothing_and_fences_nothing():
    # A fence read that fails is no answer: nothing is stored or published on it, the command
    # is a 503 (not applied yet), and the replica carries on once the store answers.
    store, clock = FlakyStore(), FakeClock()
    core = run(declared(controller(store, clock)))
    canary = dict(core.override)
    store.fail_gets = True
    with pytest.raises(Unavailable, match="abort is not stored yet") as refused:
        run(core.command("abort"))
    assert not isinstance(refused.value, Fenced) and core.fenced is None
    assert core.override == canary
    assert json.loads(store.data[KEY])["phase"] == "progressing"
    store.fail_gets = False
    run(core.tick())
    assert json.loads(store.data[KEY])["phase"] == "aborted"
    assert core.override["weights"] == {"v1": 100.0, "v2": 0.0}

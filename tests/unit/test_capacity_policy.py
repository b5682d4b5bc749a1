"""deployments/capacity_policy.py: Serve's queue-length policy, never below the rollout's floor.

Driven with a real `AutoscalingContext` built by hand and a fake KV reader (no Ray cluster).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from ray.serve.config import AutoscalingConfig, AutoscalingContext

from deployments.capacity_policy import (
    LOAD_UP_SINCE,
    REQUESTS_IN_REPLICA,
    CapacityFloorPolicy,
    counted_in_requests,
    floor_key,
    request_load_policy,
)

APP, MODEL, VERSION = "recommender", "recommender", "v2"
KEY = f"{APP}/{MODEL}/capacity/{VERSION}"


class FakeKv:
    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.reads = 0
        self.fail = False

    def read(self, key: str) -> bytes | None:
        self.reads += 1
        if self.fail:
            raise ConnectionError("GCS unreachable")
        return self.data.get(key)

    def set_floor(self, floor: int, expires_at_s: float, generation: int = 1) -> None:
        value = {"floor": floor, "generation": generation, "expires_at_s": expires_at_s}
        self.data[KEY] = json.dumps(value).encode()


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def context(
    now: float,
    *,
    running: int,
    target: int | None = None,
    requests: float = 0.0,
    state: dict | None = None,
    upscale_delay_s: float = 0.0,
    queued: float = 0.0,
    held: dict | None = None,
) -> AutoscalingContext:
    config = AutoscalingConfig(
        min_replicas=1, max_replicas=10, target_ongoing_requests=2,
        upscale_delay_s=upscale_delay_s, downscale_delay_s=600,
    )  # fmt: skip
    return AutoscalingContext(
        deployment_id=None,  # not read by the policy; its type lives in Serve's private modules
        deployment_name=f"{MODEL}-{VERSION}",
        app_name=APP,
        current_num_replicas=running,
        target_num_replicas=running if target is None else target,
        running_replicas=[],
        total_num_requests=requests,
        total_queued_requests=queued,
        aggregated_metrics={} if held is None else {REQUESTS_IN_REPLICA: held},
        raw_metrics={},
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=10,
        policy_state=state or {},
        last_scale_up_time=None,
        last_scale_down_time=None,
        current_time=now,
        config=config,
    )


def policy(kv: FakeKv, clock: Clock, upscale_delay_s: float = 0.0) -> CapacityFloorPolicy:
    return CapacityFloorPolicy(
        MODEL, VERSION, upscale_delay_s=upscale_delay_s,
        read_kv=kv.read, clock=clock, background=False, app=APP,
    )  # fmt: skip


def test_the_key_is_the_published_one():
    assert floor_key(APP, MODEL, VERSION) == KEY
    assert policy(FakeKv(), Clock()).key == KEY


def test_a_floor_raises_the_answer_at_once():
    kv, clock = FakeKv(), Clock()
    kv.set_floor(3, expires_at_s=clock.now + 60)
    p = policy(kv, clock, upscale_delay_s=30)
    p.refresh()
    # 1 replica, idle: the load alone would keep 1; the floor asks for 3, with no delay.
    desired, state = p(context(clock.now, running=1, requests=0))
    assert desired == 3
    assert state[LOAD_UP_SINCE] is None


def test_a_floor_never_lowers_the_loads_answer():
    kv, clock = FakeKv(), Clock()
    kv.set_floor(2, expires_at_s=clock.now + 60)
    p = policy(kv, clock)
    p.refresh()
    # 2 replicas with 20 ongoing requests at 2 per replica: the load asks for 10.
    desired, _ = p(context(clock.now, running=2, requests=20))
    assert desired == 10
    # Without load the floor holds the version at 2 (Serve's downscale delay does the rest).
    assert p(context(clock.now, running=4, requests=0))[0] == 2


@pytest.mark.parametrize(
    "case", ["missing", "expired", "stale", "unreadable", "kv_down"],
)  # fmt: skip
def test_a_missing_stale_or_expired_floor_is_ignored(case):
    kv, clock = FakeKv(), Clock()
    p = policy(kv, clock)
    if case == "missing":
        p.refresh()
    elif case == "expired":
        kv.set_floor(5, expires_at_s=clock.now + 1)
        p.refresh()
        clock.now += 1
    elif case == "stale":
        kv.set_floor(5, expires_at_s=clock.now + 600)
        p.refresh()
        clock.now += 5.5  # no read answered for more than 5 s
    elif case == "unreadable":
        kv.data[KEY] = b'{"floor": "many"}'
        p.refresh()
    elif case == "kv_down":
        kv.set_floor(5, expires_at_s=clock.now + 600)
        p.refresh()
        kv.fail = True
        for _ in range(12):  # the reads fail for 6 s: the last good one goes stale
            clock.now += 0.5
            p.refresh()
    assert p.floor(clock.now) == 0
    # The load alone decides: 1 replica, 1 ongoing request at 2 per replica -> 1.
    assert p(context(clock.now, running=1, requests=1))[0] == 1


def test_a_fresh_floor_counts_until_it_expires_or_goes_stale():
    kv, clock = FakeKv(), Clock()
    kv.set_floor(4, expires_at_s=clock.now + 10)
    p = policy(kv, clock)
    p.refresh()
    clock.now += 4.9
    assert p.floor(clock.now) == 4
    p.refresh()
    clock.now += 4.9  # read 4.9 s ago, expires in 0.2 s
    assert p.floor(clock.now) == 4
    clock.now += 0.2
    assert p.floor(clock.now) == 0


def test_the_declared_upscale_delay_holds_the_load_but_not_a_floor_rise():
    kv, clock = FakeKv(), Clock()
    p = policy(kv, clock, upscale_delay_s=30)
    p.refresh()
    # The load asks for 5 (2 replicas, 20 requests at 2 each -> 10, capped later by Serve).
    state: dict = {}
    desired, state = p(context(clock.now, running=2, requests=10, state=state))
    assert desired == 2  # held: the load must ask for 30 s in a row
    assert state[LOAD_UP_SINCE] == clock.now
    clock.now += 20
    desired, state = p(context(clock.now, running=2, requests=10, state=state))
    assert desired == 2
    # A floor published now is answered at once, while the load part still waits.
    kv.set_floor(3, expires_at_s=clock.now + 60)
    p.refresh()
    desired, state = p(context(clock.now, running=2, requests=10, state=state))
    assert desired == 3
    assert state[LOAD_UP_SINCE] is not None
    # 30 s after the load first asked, the load's answer wins.
    clock.now += 10
    p.refresh()
    desired, state = p(context(clock.now, running=2, target=3, requests=10, state=state))
    assert desired == 5
    assert state[LOAD_UP_SINCE] is None


def test_a_load_that_stops_asking_restarts_the_delay():
    kv, clock = FakeKv(), Clock()
    p = policy(kv, clock, upscale_delay_s=10)
    p.refresh()
    _, state = p(context(clock.now, running=1, requests=6))
    clock.now += 8
    _, state = p(context(clock.now, running=1, requests=1, state=state))  # the spike is over
    assert state[LOAD_UP_SINCE] is None
    clock.now += 5
    desired, state = p(context(clock.now, running=1, requests=6, state=state))
    assert desired == 1  # a new spike waits its own 10 s


def test_serves_wrapper_leaves_a_floor_alone_with_its_delay_at_zero():
    """What Serve does with the answer (ray/serve/autoscaling_policy.py): scaling factors and
    its own delay, which the builder sets to 0 for a version that opts in."""
    from ray.serve.autoscaling_policy import _apply_autoscaling_config

    kv, clock = FakeKv(), Clock()
    kv.set_floor(4, expires_at_s=clock.now + 60)
    p = policy(kv, clock, upscale_delay_s=30)
    p.refresh()
    wrapped = _apply_autoscaling_config(p)
    desired, state = wrapped(context(clock.now, running=1, requests=0, upscale_delay_s=0))
    assert desired == 4
    assert LOAD_UP_SINCE in state


def test_the_thread_reads_the_key_without_blocking_a_call():
    kv = FakeKv()
    kv.set_floor(2, expires_at_s=time.time() + 60)
    gate = threading.Event()
    real_read = kv.read

    def slow_read(key: str) -> bytes | None:
        gate.wait(5)  # a KV that hangs: calls must not wait for it
        return real_read(key)

    p = CapacityFloorPolicy(MODEL, VERSION, read_kv=slow_read, refresh_s=0.05)
    started = time.monotonic()
    desired, _ = p(context(time.time(), running=1, requests=0))
    assert time.monotonic() - started < 1.0
    assert desired == 0  # nothing read yet: no floor, no load (Serve applies min_replicas)
    gate.set()
    deadline = time.monotonic() + 5
    while p.floor(time.time()) != 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert p.floor(time.time()) == 2
    assert p(context(time.time(), running=1, requests=0))[0] == 2
    assert p.key == KEY  # the application came from the context


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match=r"upscale_delay_s \(-1"):
        CapacityFloorPolicy(MODEL, VERSION, upscale_delay_s=-1)


# -- the load in requests (Router -> model micro-batching) -------------------------------------


def test_coalesced_calls_count_each_request_they_carry():
    # Two routers with two calls out each, carrying 30 requests: Serve counts 4 calls, which at
    # target 2 on one replica asks for 2 replicas; the 30 requests ask for 15 (capped at 10 by
    # Serve's bounds, applied by its wrapper, not here).
    ctx = context(1_000.0, running=1, requests=4.0, held={"r1": 30.0})
    assert request_load_policy(ctx)[0] == pytest.approx(15.0)
    assert counted_in_requests(ctx).total_num_requests == 30.0
    assert ctx.total_num_requests == 4.0  # Serve's context is left as it was


def test_calls_queued_in_handles_add_to_the_requests_in_the_replicas():
    ctx = context(1_000.0, running=2, requests=6.0, queued=4.0, held={"r1": 10.0, "r2": 12.0})
    assert counted_in_requests(ctx).total_num_requests == 26.0
    assert request_load_policy(ctx)[0] == pytest.approx(13.0)


@pytest.mark.parametrize(
    "held", [None, {}, {"r1": 1.0}, {"r1": float("nan")}], ids=["no metric", "no replica",
                                                                "fewer", "nan"],
)  # fmt: skip
def test_without_a_larger_request_count_the_answer_is_serves(held):
    # No replica reported yet, or the requests read below Serve's own count (sampled at another
    # moment, or micro-batching off): Serve's count stands.
    ctx = context(1_000.0, running=1, requests=4.0, held=held)
    assert counted_in_requests(ctx) is ctx
    assert request_load_policy(ctx)[0] == pytest.approx(2.0)


def test_the_floor_policy_counts_requests_too():
    kv, clock = FakeKv(), Clock()
    answer, _ = policy(kv, clock)(context(clock.now, running=1, requests=2.0, held={"r1": 12.0}))
    assert answer == 6  # 12 requests at target 2, no floor published

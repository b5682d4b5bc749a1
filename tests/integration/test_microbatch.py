"""Router -> model micro-batching on a real Ray cluster: concurrent requests for one version
leave the Router as fewer `infer_many` calls than requests, yet each keeps its own outcome (a
bad item fails alone with its own 4xx) and its own fallback; no more of a version's requests
are out or waiting in the Router than Serve would admit from it without micro-batching
(running replicas x `max_ongoing_requests` + `max_queued_requests`), the rest are shed at
once (503)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import httpx
import pytest

from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = pytest.mark.integration

USERS = ["user loves science fiction films"]
ITEMS = ["space opera", "cooking show", "jazz music"]
GOOD = infer_body(USERS, ITEMS)
# Over v1's limits.max_tokens (64) only once tokenized: the router lets it through (it does not
# tokenize), the replica refuses it alone with a 413 (OverBudget, an InvalidInput).
BAD = infer_body(["word " * 80], ITEMS)
MICROBATCH = {"enabled": True, "max_batch_size": 32, "max_calls_in_flight": 1}


@pytest.fixture(scope="module")
def microbatch_app(cluster, tiny_models, tmp_path_factory):
    forget_rollouts()
    tmp = tmp_path_factory.mktemp("microbatch")
    # Each call takes 300 ms, so requests sent together find their version busy and coalesce.
    slow = {"added_latency_ms": 300}
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"], faults=slow, limits={"max_tokens": 64}),
        model_config(tmp, tmp, "v2", tiny_models["a"], faults={**slow, "error_rate": 1.0}),
        # At most 1 x 1 + 2 of its requests out or waiting in the Router (its one replica x
        # max_ongoing_requests + max_queued_requests).
        model_config(
            tmp,
            tmp,
            "v3",
            tiny_models["a"],
            faults=slow,
            max_ongoing_requests=1,
            max_queued_requests=2,
            batching={"max_batch_size": 1},
        ),
    ]
    config = serve_config(versions, {"v1": 100})
    router = config["applications"][0]["deployments"][0]
    router["user_config"]["microbatch"] = MICROBATCH
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    wait_for_condition(lambda: cluster.router_status().get("microbatch", {}).get("enabled"),
                       timeout_s=60, message="the router to turn micro-batching on")  # fmt: skip
    return cluster


def together(
    url: str, sends: list[Callable[[httpx.Client], httpx.Response]]
) -> list[httpx.Response]:
    """Each of `sends` on its own thread and connection, released at once by a barrier."""
    responses: list[httpx.Response | None] = [None] * len(sends)
    barrier = threading.Barrier(len(sends))

    def run(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            barrier.wait()
            responses[i] = sends[i](client)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sends))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in responses if r is not None]


def pinned(version: str, body: dict, **headers: str) -> Callable[[httpx.Client], httpx.Response]:
    path = f"/v2/models/{APP}/versions/{version}/infer"
    return lambda client: client.post(path, json=body, headers=headers)


def lane(cluster, version: str) -> dict[str, int]:
    zero = {"calls": 0, "items": 0, "coalesced_calls": 0, "largest_call": 0, "shed": 0}
    return cluster.router_status()["microbatch"]["versions"].get(version, zero)


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in ("calls", "items", "coalesced_calls")}


def test_concurrent_requests_for_one_version_leave_as_fewer_calls(microbatch_app):
    cluster = microbatch_app
    router_before = lane(cluster, "v1")
    replica_before = cluster.replica_info(f"{APP}-v1")["infer_many"]
    responses = together(cluster.url, [pinned("v1", GOOD)] * 16)
    assert [r.status_code for r in responses] == [200] * 16, [r.text[:200] for r in responses]
    assert {r.headers["x-model-version"] for r in responses} == {"v1"}
    router = delta(lane(cluster, "v1"), router_before)
    assert router["items"] == 16
    assert router["calls"] < 16 and router["coalesced_calls"] >= 1, router
    replica = cluster.replica_info(f"{APP}-v1")["infer_many"]
    coalesced_items = replica["items"] - replica_before["items"]
    coalesced_calls = replica["calls"] - replica_before["calls"]
    assert coalesced_calls >= 1 and coalesced_items >= 2  # they did arrive as infer_many calls
    assert coalesced_calls < coalesced_items, replica


def test_a_bad_item_among_good_ones_fails_alone_with_its_own_4xx(microbatch_app):
    cluster = microbatch_app
    before = lane(cluster, "v1")
    sends = [pinned("v1", GOOD)] * 7
    sends.insert(4, pinned("v1", BAD))
    responses = together(cluster.url, sends)
    statuses = [r.status_code for r in responses]
    assert statuses == [200] * 4 + [413] + [200] * 3, [r.text[:200] for r in responses]
    assert "limits.max_tokens is 64" in responses[4].json()["error"]
    after = lane(cluster, "v1")
    assert delta(after, before)["coalesced_calls"] >= 1
    # The client's fault, not the version's: the breaker stays closed.
    assert cluster.router_status()["versions"]["v1"]["breaker"]["state"] == "closed"


def test_each_item_of_a_failed_coalesced_call_falls_back_on_its_own(microbatch_app):
    cluster = microbatch_app
    before = lane(cluster, "v2")
    allow = {"x-allow-fallback": "true"}
    responses = together(cluster.url, [pinned("v2", GOOD, **allow)] * 12)
    assert [r.status_code for r in responses] == [200] * 12, [r.text[:200] for r in responses]
    assert {r.headers["x-model-version"] for r in responses} == {"v1"}
    assert {r.headers.get("x-fallback-from") for r in responses} == {"v2"}
    reasons = Counter(r.headers["x-fallback-reason"] for r in responses)
    assert set(reasons) <= {"error", "breaker_open"} and reasons["error"] >= 2, reasons
    tried = delta(lane(cluster, "v2"), before)
    # v2's failures came back from calls that carried several requests; each still fell back.
    assert tried["coalesced_calls"] >= 1 and tried["calls"] < tried["items"], tried


def test_past_what_serve_would_admit_a_request_is_shed_at_once(microbatch_app):
    # v3: one call out at a time, 300 ms each, at most 3 requests out or waiting. Before, the
    # coalescer took all of them (and full calls past Serve's bound on the version's queue,
    # which counts calls), each left to wait out its deadline under an overload.
    cluster = microbatch_app
    before = lane(cluster, "v3")
    responses = together(cluster.url, [pinned("v3", GOOD)] * 12)
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 503} and statuses[503] >= 1, [r.text[:200] for r in responses]
    assert statuses[200] >= 3  # the one sent and the two that waited
    for r in (r for r in responses if r.status_code == 503):
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert "v3" in error and "max_queued_requests" in error, error
    shed = lane(cluster, "v3")["shed"] - before["shed"]
    assert shed == statuses[503], (shed, statuses)
    # Shedding is not the version's fault: its breaker stays closed.
    assert cluster.router_status()["versions"]["v3"]["breaker"]["state"] == "closed"

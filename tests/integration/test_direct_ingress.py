"""The Router's own HTTP server (Serve's direct ingress, HAProxy in front) on a real cluster.

The session cluster is served the production way (app/ops/serving_mode.py): HAProxy on the
cluster's HTTP port, each Router replica serving HTTP itself. These tests call the Router's own
server, the port HAProxy forwards to, and check that what the Router promises over HTTP holds
there too: answers, the 413 and the 400s that name the field, pinning, fallback headers, the
request id, and a client that goes away while a shadow copy is in flight.
"""

from __future__ import annotations

import copy
import os

import httpx
import pytest

from tests.integration.test_serving import BAD_INPUTS
from tests.support.serving import APP, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.environ.get("ROLLOUT_TEST_SERVING") == "proxy",
        reason="ROLLOUT_TEST_SERVING=proxy: this run serves through Serve's Python proxy, so no "
        "Router replica has a server of its own",
    ),
]

BODY = infer_body(["user loves science fiction films"], ["space opera", "cooking show", "jazz"])
SLOW_MS = 1500


@pytest.fixture(scope="module")
def direct(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("direct")
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"]),
        model_config(tmp, tmp, "v2", tiny_models["b"], faults={"error_rate": 1.0}),
        model_config(tmp, tmp, "v3", tiny_models["a"], faults={"added_latency_ms": SLOW_MS}),
    ]
    config = serve_config(versions, {"v1": 100})
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    with httpx.Client(base_url=cluster.router_url(), timeout=60) as client:
        wait_for_condition(lambda: client.get("/v2/health/ready").status_code == 200,
                           timeout_s=60, message="the Router's own server ready")  # fmt: skip
        yield cluster, client, config, tmp


def set_table(direct, stable: str = "v1", **user_config) -> dict:
    """Change the Router's traffic table in place; wait until the Router applied it."""
    cluster, client, config, tmp = direct
    before = cluster.router_status()["generation"]
    updated = copy.deepcopy(config)
    router = next(d for d in updated["applications"][0]["deployments"] if d["name"] == "Router")
    router["user_config"] = {"stable": stable, "pinnable": ["v1", "v2", "v3"], **user_config}
    cluster.serve_deploy(updated, tmp)
    return wait_for_condition(
        lambda: (s := cluster.router_status())["generation"] > before and s,
        timeout_s=60, message="the router to apply the new table",
    )  # fmt: skip


def test_the_clusters_port_is_haproxy_forwarding_to_the_routers_own_server(direct):
    cluster, client, _, _ = direct
    port = int(client.base_url.port)
    assert port != cluster.http_port
    # HAProxy's generated config (under this cluster's own state directory) lists the Router's
    # port as a server: traffic to the cluster's port reaches the Router without a Python proxy.
    state = cluster.haproxy_state
    configs = list(state.rglob("haproxy.cfg"))
    assert configs, f"no haproxy.cfg under {state}"
    assert any(f":{port}" in c.read_text() for c in configs), [c.read_text() for c in configs]
    via_haproxy = cluster.client.post(f"/v2/models/{APP}/infer", json=BODY,
                                      headers={"x-request-id": "via-haproxy-1"})  # fmt: skip
    direct_answer = client.post(f"/v2/models/{APP}/infer", json=BODY,
                                headers={"x-request-id": "via-router-1"})  # fmt: skip
    assert (via_haproxy.status_code, direct_answer.status_code) == (200, 200)
    assert via_haproxy.headers["x-request-id"] == "via-haproxy-1"
    assert via_haproxy.json()["outputs"] == direct_answer.json()["outputs"]


def test_an_answer_echoes_the_request_id_and_names_its_version(direct):
    _, client, _, _ = direct
    r = client.post(f"/v2/models/{APP}/infer", json=BODY, headers={"x-request-id": "di-answer-1"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "di-answer-1"
    assert r.headers["x-model-version"] == "v1"
    assert r.headers["x-routing-decision"] in {"weighted", "sticky"}
    generated = client.post(f"/v2/models/{APP}/infer", json=BODY)
    assert len(generated.headers["x-request-id"]) >= 16  # one is made up when the client sent none


def test_a_body_over_the_limit_is_a_413_naming_it(direct):
    _, client, _, _ = direct
    big = b'{"inputs": [' + b" " * (8 * 1024 * 1024) + b"]}"
    r = client.post(f"/v2/models/{APP}/infer", content=big, headers={"x-request-id": "di-413"})
    assert r.status_code == 413 and "limit" in r.json()["error"], r.text[:300]
    assert r.json()["request_id"] == "di-413"
    assert client.post(f"/v2/models/{APP}/infer", json=BODY).status_code == 200


@pytest.mark.parametrize("body,status,needle", BAD_INPUTS)
def test_bad_input_is_a_4xx_naming_the_field(direct, body, status, needle):
    _, client, _, _ = direct
    r = client.post(f"/v2/models/{APP}/infer", content=body, headers={"x-request-id": "di-bad"})
    assert r.status_code == status, r.text[:300]
    assert needle in r.json()["error"]
    assert r.json()["request_id"] == "di-bad"


def test_pinning_and_fallback_headers(direct):
    _, client, _, _ = direct
    set_table(direct, weights={"v1": 100}, breaker={"enabled": False})
    pinned = client.post(f"/v2/models/{APP}/versions/v3/infer", json=BODY)
    assert pinned.status_code == 200, pinned.text
    assert pinned.headers["x-model-version"] == "v3"
    assert pinned.headers["x-routing-decision"] == "pinned"
    failing = client.post(f"/v2/models/{APP}/versions/v2/infer", json=BODY)
    assert failing.status_code == 500 and "injected fault" in failing.json()["error"]
    rescued = client.post(f"/v2/models/{APP}/versions/v2/infer", json=BODY,
                          headers={"x-allow-fallback": "true"})  # fmt: skip
    assert rescued.status_code == 200, rescued.text
    assert rescued.headers["x-model-version"] == "v1"
    assert rescued.headers["x-fallback-from"] == "v2"
    assert rescued.headers["x-routing-decision"] == "fallback"
    unknown = client.post(f"/v2/models/{APP}/versions/v9/infer", json=BODY)
    assert unknown.status_code == 404 and "'v9'" in unknown.json()["error"]


def _shadow_stats(cluster, version: str) -> dict:
    return cluster.router_status()["shadow_stats"].get(version) or {}


def test_a_client_that_leaves_while_its_shadow_copy_runs_costs_nothing(direct):
    """The primary (v1) answers at once and the client hangs up; the shadow copy (v3, 1.5 s)
    is still running then. It completes and is counted; the Router keeps serving."""
    cluster, client, _, _ = direct
    status = set_table(direct, weights={"v1": 100},
                       shadow={"version": "v3", "percent": 100, "max_in_flight": 8})  # fmt: skip
    replica = status["router_replica"]
    before = _shadow_stats(cluster, "v3")
    for i in range(4):
        with httpx.Client(base_url=client.base_url, timeout=60) as once:
            r = once.post(f"/v2/models/{APP}/infer", json=BODY, headers={"x-request-id": f"sh-{i}"})
            assert r.status_code == 200 and r.headers["x-model-version"] == "v1"
        # The connection closes here, before the shadow copy can have finished.
    after = wait_for_condition(
        lambda: (s := _shadow_stats(cluster, "v3")).get("completed", 0)
        >= before.get("completed", 0) + 4 and s,
        timeout_s=30, message="the four shadow copies to complete",
    )  # fmt: skip
    assert after.get("failed", 0) == before.get("failed", 0), after
    assert client.post(f"/v2/models/{APP}/infer", json=BODY).status_code == 200
    assert cluster.router_status()["router_replica"] == replica


def test_a_client_that_leaves_mid_request_opens_no_breaker_and_starts_no_shadow(direct):
    """The primary (v3, 1.5 s) is still running when the client gives up after 0.3 s: the
    Router takes no verdict against v3 (the client left), sends no shadow copy for an answer no
    one reads, and keeps serving."""
    cluster, client, _, _ = direct
    status = set_table(
        direct, stable="v3", weights={"v3": 100},
        shadow={"version": "v1", "percent": 100, "max_in_flight": 8},
        breaker={"consecutive_failures": 2, "cooldown_s": 60},
    )  # fmt: skip
    replica = status["router_replica"]
    for i in range(3):
        with httpx.Client(base_url=client.base_url, timeout=0.3) as impatient:
            with pytest.raises(httpx.ReadTimeout):
                impatient.post(f"/v2/models/{APP}/infer", json=BODY,
                               headers={"x-request-id": f"gone-{i}"})  # fmt: skip
    # Longer than the abandoned requests would have taken.
    wait_for_condition(lambda: client.post(f"/v2/models/{APP}/infer", json=BODY).status_code == 200,
                       timeout_s=30, message="a full request to v3 to succeed")  # fmt: skip
    s = cluster.router_status()
    assert s["router_replica"] == replica
    breaker = s["versions"]["v3"]["breaker"]
    assert breaker["state"] == "closed" and breaker.get("trips", 0) == 0, breaker
    shadow = wait_for_condition(lambda: (x := _shadow_stats(cluster, "v1")).get("completed") and x,
                                timeout_s=30, message="the one answered request's shadow")  # fmt: skip
    # Only the request that was answered (the last one) started a shadow copy.
    assert shadow["sent"] == 1 and shadow.get("failed", 0) == 0, shadow

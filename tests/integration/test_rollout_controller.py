"""The rollout controller on a real Ray cluster: a canary that succeeds, a faulty canary rolled
back automatically under load with no client errors, the admin API's token, manual commands,
and a controller killed mid-rollout that resumes where it was."""

from __future__ import annotations

import copy
import random
import threading
import time

import httpx
import pytest

from tests.support import loadgen
from tests.support.serving import APP, forget_rollouts, infer_body, model_config, serve_config
from tests.support.waiting import wait_for_condition
from tests.support.webhooks import WebhookReceiver as Receiver

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789abcdef"
# The feedback endpoint's own credential (the click pipeline's), not the admin token.
FEEDBACK_TOKEN = "test-feedback-token-0123456789ab"
FEEDBACK = {"authorization": f"Bearer {FEEDBACK_TOKEN}"}
BODY = infer_body(["user loves science fiction films"], ["space opera", "cooking show"])
FAST_GATES = {"min_requests": 10, "fail_fast_min_requests": 5, "max_p99_latency_ratio": None}


def _plan(candidate: str, steps: list[dict], **extra) -> dict:
    return {"strategy": "canary", "candidate": candidate, "stable": "v1",
            "canary": {"steps": steps}, "gates": FAST_GATES, **extra}  # fmt: skip


@pytest.fixture(scope="module")
def rollout_app(cluster, tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rollout")
    token_file = tmp / "admin_token"
    token_file.write_text(TOKEN + "\n")
    feedback_token_file = tmp / "feedback_token"
    feedback_token_file.write_text(FEEDBACK_TOKEN + "\n")
    versions = [
        model_config(tmp, tmp, "v1", tiny_models["a"]),
        model_config(tmp, tmp, "v2", tiny_models["b"]),
        model_config(tmp, tmp, "v3", tiny_models["b"], faults={"error_rate": 1.0}),
    ]
    # The defaults: /status needs the token, a version at weight 0 is pinned only with it,
    # feedback needs its own token.
    config = serve_config(versions, {"v1": 100}, pinnable=[], public_status=False,
                          open_feedback=False)  # fmt: skip
    cluster.admin_token = TOKEN
    config["applications"][0]["runtime_env"] = {
        "env_vars": {
            "ROLLOUT_ADMIN_TOKEN_FILE": str(token_file),
            "ROLLOUT_FEEDBACK_TOKEN_FILE": str(feedback_token_file),
        }
    }
    forget_rollouts()
    cluster.serve_deploy(config, tmp)
    cluster.wait_running()
    return cluster, config, tmp


def declare(rollout_app, plan: dict | None, **controller) -> None:
    cluster, config, tmp = rollout_app
    updated = copy.deepcopy(config)
    updated["applications"][0]["deployments"].append(
        {"name": "RolloutController",
         "user_config": {"plan": plan, "tick_interval_s": 0.25, **controller}}
    )  # fmt: skip
    cluster.serve_deploy(updated, tmp)


def admin(cluster, method: str, path: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return cluster.client.request(method, f"/admin/rollout{path}", headers=headers)


def _infer_as_random_user(client: httpx.Client, rng: random.Random, index: int) -> str | None:
    r = client.post(f"/v2/models/{APP}/infer", json=BODY,
                    headers={"x-user-id": f"user-{rng.randrange(100_000)}"})  # fmt: skip
    return None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"


def Load(url: str, clients: int = 4) -> loadgen.Load:  # noqa: N802 - reads like the class
    """Background clients with many user ids; counts every response that is not a 200."""
    return loadgen.Load(url, _infer_as_random_user, clients)


def test_admin_api_needs_the_bearer_token(rollout_app):
    cluster = rollout_app[0]
    assert admin(cluster, "GET", "", token=None).status_code == 401
    wrong = admin(cluster, "GET", "", token="not-the-token-at-all-xx")
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    ok = admin(cluster, "GET", "")
    assert ok.status_code == 200 and ok.json()["phase"] == "idle"
    r = admin(cluster, "POST", "/resume")
    assert r.status_code == 409 and "no rollout" in r.json()["error"]


def _waves_document(published_at: float) -> dict:
    return {
        "name": "recommender-v2", "published_at": published_at, "on_failure": "halt",
        "phase": "running", "current_wave": 0,
        "waves": [{"index": 0, "state": "running", "bake_until": None, "regions": [
            {"region": "us-east-1", "state": "running", "phase": "progressing",
             "step": "set_weight 10", "weights": {"v1": 90.0, "v2": 10.0}, "reason": None},
            {"region": "eu-west-1", "state": "unreachable", "phase": None, "step": None,
             "weights": None, "reason": "GET /admin/rollout: ConnectError"}]}],
    }  # fmt: skip


def test_the_waves_orchestrators_state_is_taken_with_the_token_and_shown_in_status(rollout_app):
    """POST /admin/waves (what `rollout waves` publishes to every region): 401 without the
    admin token, 400 naming the field for a bad body, else in GET /admin/rollout's `waves`."""
    cluster, _, _ = rollout_app
    document = _waves_document(time.time())
    url = "/admin/waves"
    assert cluster.client.post(url, json=document).status_code == 401
    bearer = {"authorization": f"Bearer {TOKEN}"}
    bad = copy.deepcopy(document)
    bad["waves"][0]["regions"][1]["state"] = "exploded"
    r = cluster.client.post(url, json=bad, headers=bearer)
    assert r.status_code == 400 and "waves.0.regions.1.state" in r.json()["error"], r.text
    r = cluster.client.post(url, content=b"{not json", headers=bearer)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"], r.text
    r = cluster.client.post(url, json=document, headers=bearer)
    assert r.status_code == 200 and r.json()["accepted"] is True, r.text
    status = admin(cluster, "GET", "").json()
    shown = status["waves"]
    assert shown["published_at"] == document["published_at"] and shown["received_at"] > 0
    regions = [r["region"] for w in shown["waves"] for r in w["regions"]]
    assert regions == ["us-east-1", "eu-west-1"]
    assert "notifications" in status and isinstance(status["ab_series"], list)
    older = _waves_document(document["published_at"] - 60)
    r = cluster.client.post(url, json=older, headers=bearer)
    assert r.status_code == 200 and r.json()["accepted"] is False
    assert admin(cluster, "GET", "").json()["waves"]["published_at"] == document["published_at"]


def test_status_and_weight_0_pins_need_the_admin_token(rollout_app):
    """/status names every deployed version and its breaker: it needs the admin token unless
    the router publishes it. A version at weight 0 (here v2, before any rollout) can be pinned
    only with the admin token or when the table lists it as `pinnable` (F5, F10)."""
    cluster, config, tmp = rollout_app
    assert cluster.client.get("/status").status_code == 401
    assert cluster.router_status()["weights"] == {"v1": 100}  # v2 and v3 take no traffic
    url = f"/v2/models/{APP}/versions/v2/infer"
    r = cluster.client.post(url, json=BODY)
    assert r.status_code == 401 and "pinnable" in r.json()["error"]
    r = cluster.client.post(f"/v2/models/{APP}/infer", json=BODY, headers={"x-model-version": "v2"})
    assert r.status_code == 401
    r = cluster.client.post(url, json=BODY, headers={"authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.headers["x-model-version"] == "v2"
    assert cluster.client.post(f"/v2/models/{APP}/versions/v1/infer", json=BODY).status_code == 200
    opened = copy.deepcopy(config)
    opened["applications"][0]["deployments"][0]["user_config"]["pinnable"] = ["v2"]
    cluster.serve_deploy(opened, tmp)
    wait_for_condition(lambda: cluster.client.post(url, json=BODY).status_code == 200,
                       timeout_s=60, message="v2 pinnable")  # fmt: skip
    cluster.serve_deploy(config, tmp)  # closed again
    wait_for_condition(lambda: cluster.client.post(url, json=BODY).status_code == 401,
                       timeout_s=60, message="v2 closed again")  # fmt: skip


def test_pinned_requests_are_served_but_never_gate_evidence(rollout_app):
    """A client that pins the candidate chose its version: its requests (here 30 to v2, by path
    and by header) are answered and counted apart, and the controller's window for v2 stays
    empty, so pinned successes cannot pad a failing canary nor pinned failures sink a good one."""
    cluster = rollout_app[0]
    declare(rollout_app, _plan("v2", [{"set_weight": 10}, {"pause_s": None}]))
    wait_for_condition(lambda: admin(cluster, "GET", "").json()["phase"] == "paused",
                       timeout_s=30, message="the canary waiting for promote")  # fmt: skip
    pinned_before = cluster.router_status()["pinned"].get("v2", {}).get("requests", 0)
    for _ in range(15):
        by_path = cluster.client.post(f"/v2/models/{APP}/versions/v2/infer", json=BODY)
        by_header = cluster.client.post(f"/v2/models/{APP}/infer", json=BODY,
                                        headers={"x-model-version": "v2"})  # fmt: skip
        assert by_path.status_code == by_header.status_code == 200
        assert by_header.headers["x-routing-decision"] == "pinned"
    time.sleep(1.5)  # several stats pushes (every 250 ms)
    status = admin(cluster, "GET", "").json()
    assert status["versions"]["v2"]["requests"] == 0, status["versions"]
    assert cluster.router_status()["pinned"]["v2"]["requests"] - pinned_before == 30
    # Every command records its caller in the history (F10): the name the client gives
    # (`rollout` sends user@host) and the address the proxy saw.
    r = cluster.client.post("/admin/rollout/abort", headers={
        "authorization": f"Bearer {TOKEN}", "x-rollout-actor": "alice@laptop"})  # fmt: skip
    assert r.status_code == 200
    events = admin(cluster, "GET", "/history").json()["events"]
    assert "by alice@laptop from " in events[-1]["reason"], events[-1]


def test_canary_steps_to_full_and_succeeds(rollout_app):
    cluster = rollout_app[0]
    steps = [{"set_weight": 20}, {"analysis_s": 3}, {"set_weight": 50}, {"analysis_s": 3}]
    with Load(cluster.url) as load:
        declare(rollout_app, _plan("v2", steps, gates={**FAST_GATES, "min_requests": 5}))
        seen_weights = set()

        def done():
            status = admin(cluster, "GET", "").json()
            seen_weights.add(status["weights"].get("v2"))
            assert status["phase"] not in ("paused", "rolled_back"), status  # fail with the reason
            return status["phase"] == "succeeded" and status

        status = wait_for_condition(
            done, timeout_s=90, interval_s=0.25, message="canary to succeed"
        )
    assert load.errors == [] and load.sent > 50
    assert {20.0, 50.0, 100.0} <= seen_weights, seen_weights
    assert status["stable"] == "v2" and status["weights"] == {"v2": 100.0, "v1": 0.0}
    router = wait_for_condition(
        lambda: (s := cluster.router_status())["weights"].get("v2") == 100 and s,
        timeout_s=10, message="router at 100% v2",
    )  # fmt: skip
    assert router["stable"] == "v2"
    history = admin(cluster, "GET", "/history").json()["events"]
    assert [e["to_phase"] for e in history][-1] == "succeeded"


def test_faulty_canary_is_rolled_back_within_a_second_with_no_client_errors(rollout_app):
    """... and every decision of it is posted to the declared webhooks (a receiver in this
    test, one JSON and one Slack-format webhook, URLs read from files)."""
    cluster, _, tmp = rollout_app
    steps = [{"set_weight": 30}, {"analysis_s": 60}]
    receiver = Receiver()
    (tmp / "hook-json").write_text(receiver.url + "/json\n")
    (tmp / "hook-slack").write_text(receiver.url + "/slack\n")
    notifications = {"webhooks": [
        {"name": "ops-json", "url_file": str(tmp / "hook-json")},
        {"name": "ops-slack", "format": "slack", "url_file": str(tmp / "hook-slack")}]}  # fmt: skip
    with Load(cluster.url, clients=6) as load:
        time.sleep(1.0)
        declare(rollout_app, _plan("v3", steps), notifications=notifications)
        # From the moment the router sends v3 traffic to the moment it stops.
        wait_for_condition(lambda: cluster.router_status()["weights"].get("v3", 0) > 0,
                           timeout_s=60, interval_s=0.05, message="v3 to get traffic")  # fmt: skip
        onset = time.monotonic()
        wait_for_condition(lambda: cluster.router_status()["weights"].get("v3", 0) == 0,
                           timeout_s=30, interval_s=0.05, message="v3 back to 0%")  # fmt: skip
        time_to_rollback = time.monotonic() - onset
        time.sleep(0.5)
    status = admin(cluster, "GET", "").json()
    assert status["phase"] == "rolled_back", status
    assert load.errors == [], load.errors[:5]
    print(f"time to rollback: {time_to_rollback:.3f}s over {load.sent} requests")
    reason = admin(cluster, "GET", "/history").json()["events"][-1]["reason"]
    assert "error" in reason

    try:
        wait_for_condition(lambda: len(receiver.bodies("/slack")) >= 3, 30,
                           message="the controller's notifications")  # fmt: skip
    finally:
        receiver.close()
    posted = receiver.bodies("/json")
    assert [b["event"] for b in posted] == ["started", "step", "rolled_back"], posted
    rolled_back = posted[-1]
    assert rolled_back["candidate"] == "v3" and rolled_back["stable"] == "v1"
    assert rolled_back["reason"] == reason and rolled_back["failed_gates"]
    for gate in rolled_back["failed_gates"]:  # the readings that decided it
        assert rolled_back["gates"][gate]["status"] == "failed"
        assert rolled_back["gates"][gate]["value"] is not None
    slack = receiver.bodies("/slack")
    assert "rolled back" in slack[-1]["text"] and slack[-1]["attachments"][0]["blocks"]
    print(f"webhook receiver got {len(posted)} JSON and {len(slack)} Slack notifications")


def test_manual_commands_and_controller_restart_resume_the_same_step(rollout_app):
    import ray

    cluster = rollout_app[0]
    steps = [{"set_weight": 25}, {"pause_s": None}, {"set_weight": 60}, {"analysis_s": 60}]
    declare(rollout_app, _plan("v2", steps, auto_promote=True))
    status = wait_for_condition(
        lambda: (s := admin(cluster, "GET", "").json())["weights"].get("v2") == 25 and s,
        timeout_s=60, message="first step",
    )  # fmt: skip
    assert status["phase"] == "paused"  # waiting for `rollout promote`
    wait_for_condition(lambda: cluster.router_status()["weights"].get("v2") == 25, timeout_s=10,
                       message="router at 25%")  # fmt: skip

    # Kill the controller's replica: Serve restarts it; it resumes from the GCS store.
    actors = [a for a in ray.util.list_named_actors(all_namespaces=True)
              if "RolloutController" in a["name"]]  # fmt: skip
    assert actors, "controller replica actor not found"
    ray.kill(ray.get_actor(actors[0]["name"], namespace=actors[0]["namespace"]), no_restart=False)
    # Routers keep serving their last traffic meanwhile.
    for _ in range(20):
        r = cluster.client.post(f"/v2/models/{APP}/infer", json=BODY)
        assert r.status_code == 200
    resumed = wait_for_condition(
        lambda: (s := admin(cluster, "GET", "")).status_code == 200 and s.json(),
        timeout_s=90, message="controller back",
    )  # fmt: skip
    assert resumed["weights"].get("v2") == 25 and resumed["step_index"] == status["step_index"]

    r = admin(cluster, "POST", "/promote")
    assert r.status_code == 200 and r.json()["weights"]["v2"] == 60
    assert r.json()["phase"] == "progressing"  # analysing 60% for 60 s
    assert admin(cluster, "POST", "/resume").status_code == 409  # not paused
    assert admin(cluster, "POST", "/pause").status_code == 200
    assert admin(cluster, "GET", "").json()["phase"] == "paused"
    assert admin(cluster, "POST", "/resume").status_code == 200
    r = admin(cluster, "POST", "/abort")
    assert (
        r.status_code == 200 and r.json()["phase"] == "aborted" and r.json()["weights"]["v2"] == 0
    )
    wait_for_condition(lambda: cluster.router_status()["weights"].get("v2") == 0, timeout_s=10,
                       message="router back on v1")  # fmt: skip
    assert admin(cluster, "POST", "/start").status_code == 200  # the declared plan, again
    assert admin(cluster, "GET", "").json()["weights"]["v2"] == 25
    assert admin(cluster, "POST", "/abort").status_code == 200


def test_blue_green_previews_on_shadow_traffic_then_switches(rollout_app):
    cluster = rollout_app[0]
    plan = {"strategy": "blue_green", "candidate": "v2", "stable": "v1",
            "blue_green": {"preview_s": 2, "shadow_percent": 100, "analysis_s": 2, "scale_down_delay_s": 1},
            "gates": {**FAST_GATES, "min_shadow_agreement": 0.0}}  # fmt: skip
    declare(rollout_app, None)  # clear the last rollout first
    saw_shadow_preview = False
    with Load(cluster.url) as load:
        declare(rollout_app, plan)

        def done():
            nonlocal saw_shadow_preview
            router = cluster.router_status()
            if router["weights"].get("v2") == 0 and (router["shadow"] or {}).get("version") == "v2":
                saw_shadow_preview = True  # clients on v1, copies to v2
            status = admin(cluster, "GET", "").json()
            return status["phase"] in ("succeeded", "rolled_back", "paused") and status

        status = wait_for_condition(done, timeout_s=90, interval_s=0.2, message="blue-green to end")
    assert status["phase"] == "succeeded", status
    assert saw_shadow_preview
    assert load.errors == []
    history = admin(cluster, "GET", "/history").json()["events"]
    agreement = [e["gates"].get("min_shadow_agreement") for e in history if e["gates"]]
    assert any(g and g["status"] == "passed" for g in agreement), history
    router = cluster.router_status()
    assert router["weights"]["v2"] == 100 and router["shadow"] is None


def test_prometheus_gate_rolls_back_on_a_bad_reading_and_holds_when_unreachable(rollout_app):
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cluster = rollout_app[0]
    reading = {"value": "0"}

    class FakePrometheus(BaseHTTPRequestHandler):  # speaks /api/v1/query like Prometheus
        def do_GET(self):  # noqa: N802
            body = {"status": "success", "data": {"resultType": "vector",
                    "result": [{"metric": {}, "value": [time.time(), reading["value"]]}]}}  # fmt: skip
            self.send_response(200)
            self.end_headers()
            self.wfile.write(json.dumps(body).encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    gates = {**FAST_GATES, "prometheus_query": "sum(gpu_oom_total)", "prometheus_max": 0}
    try:
        declare(rollout_app, None)
        with Load(cluster.url):
            declare(rollout_app, _plan("v2", [{"set_weight": 20}, {"analysis_s": 60}], gates=gates),
                    prometheus_url=url)  # fmt: skip
            wait_for_condition(lambda: admin(cluster, "GET", "").json()["phase"] == "progressing",
                               timeout_s=60, message="rollout under way")  # fmt: skip
            time.sleep(2)
            status = admin(cluster, "GET", "").json()
            assert status["phase"] == "progressing" and status["prometheus"]["value"] == 0.0
            reading["value"] = "3"  # an OOM shows up in the monitoring system
            status = wait_for_condition(
                lambda: (s := admin(cluster, "GET", "").json())["phase"] == "rolled_back" and s,
                timeout_s=30, message="rollback on the Prometheus gate",
            )  # fmt: skip
        assert "prometheus_max" in admin(cluster, "GET", "/history").json()["events"][-1]["reason"]
    finally:
        server.shutdown()
        server.server_close()

    declare(rollout_app, None)
    unreachable = {**gates, "fail_fast_error_rate": None}
    declare(rollout_app, _plan("v2", [{"set_weight": 20}, {"analysis_s": 60}], gates=unreachable),
            prometheus_url=url)  # fmt: skip
    status = wait_for_condition(
        lambda: (s := admin(cluster, "GET", "").json())["prometheus"]["reason"]
        and s["phase"] == "progressing" and s,
        timeout_s=30, message="Prometheus unreachable, the rollout under way",
    )  # fmt: skip
    assert status["prometheus"]["available"] is False
    # Fail closed (F12): an unreadable metric keeps the gate pending, so the analysis cannot
    # pass on it; it was "skipped" (and the analysis passed) before.
    verdict = wait_for_condition(
        lambda: next((v for v in admin(cluster, "GET", "").json()["verdicts"]
                      if v["gate"] == "prometheus_max" and "queries in a row" in v["reason"]), None),
        timeout_s=30, message="the Prometheus gate past its error limit",
    )  # fmt: skip
    assert verdict["status"] == "pending" and "prometheus_on_error: pause" in verdict["reason"]
    assert admin(cluster, "POST", "/abort").status_code == 200


def FeedbackLoad(url: str, rates: dict[str, float], clients: int = 4) -> loadgen.Load:  # noqa: N802
    """Clients that call infer, then post a click for the answer: true with probability
    `rates[version]` of the version that answered (the x-model-version header)."""

    def call(client: httpx.Client, rng: random.Random, index: int) -> str | None:
        r = client.post(f"/v2/models/{APP}/infer", json=BODY,
                        headers={"x-user-id": f"user-{rng.randrange(100_000)}"})  # fmt: skip
        if r.status_code != 200:
            return f"infer {r.status_code} {r.text[:200]}"
        clicked = rng.random() < rates[r.headers["x-model-version"]]
        f = client.post(f"/v2/models/{APP}/feedback", headers=FEEDBACK, json={
            "request_id": r.headers["x-request-id"], "outcome": "click", "value": clicked,
        })  # fmt: skip
        # Answers from before the plan was declared are accepted but excluded from the arms.
        if f.status_code != 200 or not (f.json().get("counted") or f.json().get("excluded")):
            return f"feedback {f.status_code} {f.text[:200]}"
        return None

    return loadgen.Load(url, call, clients, seed=100)


@pytest.fixture
def fb(rollout_app):
    """A client holding the feedback token: the click pipeline's."""
    with httpx.Client(base_url=rollout_app[0].url, headers=FEEDBACK, timeout=60) as client:
        yield client


def test_feedback_endpoint_counts_once_and_names_bad_input(rollout_app, fb):
    cluster = rollout_app[0]
    declare(rollout_app, None)
    url = f"/v2/models/{APP}/feedback"
    answer = cluster.client.post(
        f"/v2/models/{APP}/infer", json=BODY, headers={"x-request-id": "fb-1"}
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "fb-1"
    # Outcomes decide promotions: only the holder of the feedback token may send them (F2).
    item = {"request_id": "fb-1", "outcome": "click", "value": True}
    anyone = cluster.client.post(url, json=item)
    assert anyone.status_code == 401 and anyone.headers["www-authenticate"] == "Bearer"
    admin_token = cluster.client.post(url, json=item, headers={"authorization": f"Bearer {TOKEN}"})
    assert admin_token.status_code == 401  # a credential of its own, not the admin token
    # Right after the answer (before the router's push reaches the controller) it counts.
    first = fb.post(url, json={"request_id": "fb-1", "outcome": "click", "value": True})
    assert first.status_code == 200, first.text
    assert first.json() == {"request_id": "fb-1", "outcome": "click",
                            "version": answer.headers["x-model-version"], "counted": True}  # fmt: skip
    again = fb.post(url, json={"request_id": "fb-1", "outcome": "click", "value": True})
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert again.json()["counted"] is False
    unknown = fb.post(url, json={"request_id": "never-served", "outcome": "click", "value": True})
    assert unknown.status_code == 404 and "unknown" in unknown.json()["error"]
    other = cluster.client.post(
        f"/v2/models/{APP}/infer", json=BODY, headers={"x-request-id": "fb-k"}
    )
    assert other.status_code == 200
    for body, field in (
        ({"request_id": "fb-1", "outcome": "click"}, "body.value"),
        ({"request_id": "fb-1", "outcome": "Bad Name", "value": 1}, "body.outcome"),
        (
            {"request_id": "fb-k", "outcome": "click", "value": 4.5},
            "is binary",
        ),  # click was true/false
    ):
        bad = fb.post(url, json=body)
        assert bad.status_code == 400 and field in bad.json()["error"], bad.text
    broken = fb.post(url, content=b"{not json")
    assert broken.status_code == 400 and "not valid JSON" in broken.json()["error"]
    batch = fb.post(url, json={"feedback": [
        {"request_id": "fb-1", "outcome": "revenue", "value": 3.5},
        {"request_id": "never-served", "outcome": "click", "value": False},
    ]})  # fmt: skip
    assert batch.status_code == 200 and batch.json()["counted"] == 1
    assert [r.get("status") for r in batch.json()["results"]] == [None, 404]
    status = admin(cluster, "GET", "").json()
    counts = status["feedback"]
    assert counts["counted"] >= 2 and counts["duplicate"] >= 1 and counts["unknown"] >= 2
    # A short TTL (changed in place): an answer older than the TTL is 410 Gone (and one older
    # than twice the TTL is forgotten: 404).
    try:
        declare(rollout_app, None, feedback={"ttl_s": 5})
        wait_for_condition(lambda: admin(cluster, "GET", "").json()["feedback"]["ttl_s"] == 5,
                           timeout_s=30, message="the feedback TTL applied")  # fmt: skip
        late = cluster.client.post(
            f"/v2/models/{APP}/infer", json=BODY, headers={"x-request-id": "fb-2"}
        )
        assert late.status_code == 200
        codes = []

        def expired():
            r = fb.post(url, json={"request_id": "fb-2", "outcome": "rating", "value": 5})
            codes.append(r.status_code)
            return r.status_code == 410 and r

        gone = wait_for_condition(
            expired, timeout_s=30, interval_s=0.2, message="410 for an expired id"
        )
        assert "feedback is taken for 5s" in gone.json()["error"]
        assert set(codes) <= {200, 410}  # counted once, then duplicates, then 410
    finally:
        declare(rollout_app, None)


def test_improvement_gate_promotes_a_candidate_that_wins_on_feedback(rollout_app):
    """The click rate per version is the client's (v2 0.6, v1 0.3): this tests the plumbing
    (router ledger -> controller -> sequential test -> gate), not the models."""
    cluster = rollout_app[0]
    declare(rollout_app, None)
    gate = {"outcome": "click", "min_lift": 0.0, "mde": 0.3, "min_samples_per_arm": 50,
            "max_wait_s": 120}  # fmt: skip
    plan = _plan("v2", [{"set_weight": 30}, {"analysis_s": 2}, {"set_weight": 60}, {"analysis_s": 1}],
                 gates={**FAST_GATES, "min_requests": 5, "improvement": gate})  # fmt: skip
    with FeedbackLoad(cluster.url, {"v1": 0.3, "v2": 0.6, "v3": 0.0}) as load:
        declare(rollout_app, plan)
        # `serve deploy` returns before the controller applies the declaration: until then the
        # status still shows the previous rollout's ending.
        wait_for_condition(
            lambda: admin(cluster, "GET", "").json()["phase"] == "progressing",
            timeout_s=60, interval_s=0.1, message="the lift-gated rollout to start",
        )  # fmt: skip

        def ended():  # returns (not raises) on a wrong ending, so the test fails at once
            status = admin(cluster, "GET", "").json()
            return status["phase"] in ("succeeded", "paused", "rolled_back", "aborted") and status

        status = wait_for_condition(ended, timeout_s=240, message="the lift-gated rollout to end")
    assert status["phase"] == "succeeded", status
    assert load.errors == [] and load.sent > 100
    lift = next(v for v in status["verdicts"] if v["gate"] == "improvement")
    assert lift["status"] == "passed" and lift["conclusion"] == "better"
    assert lift["low"] > 0  # the always-valid interval lies above 0
    assert status["outcomes"]["click"]["v2"]["mean"] > status["outcomes"]["click"]["v1"]["mean"]
    history = admin(cluster, "GET", "/history").json()["events"]
    analysis = [e for e in history if "analysis" in e["reason"] and "passed" in e["reason"]]
    assert analysis and analysis[0]["gates"]["improvement"]["conclusion"] == "better"
    declare(rollout_app, None)

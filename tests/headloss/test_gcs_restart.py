"""Head-node loss: the GCS dies mid-rollout, under client load, and comes back from Redis.

The app is deployed as serve_config.yaml lays it out (each version its own application, the
router app in version_apps mode) with the real `serve deploy`. A canary rollout holds at 30%;
then the GCS server process is killed outright, stays down for DOWN_S while clients keep
calling, and a new GCS server starts on the same port and reloads its tables from Redis
(conftest.py). The test measures what clients saw while the GCS was down and checks that the
rollout resumed where it was: same phase and step, every history event from before the kill,
and then it completes.

`HEADLOSS_REPORT=<file>` writes the measured numbers as JSON.
"""

from __future__ import annotations

import copy
import json
import os
import time
from pathlib import Path

import httpx
import pytest

from app import ray_compat
from app.constants import KV_NAMESPACE
from tests.support import loadgen
from tests.support.serving import version_apps_config
from tests.support.tiny_models import build_tiny_bert, write_model_config
from tests.support.waiting import wait_for_condition

APP = "recommender"
TOKEN = "headloss-admin-token-0123456789"
STATE_KEY = f"{APP}/{APP}/rollout-state"  # the controller's KV key: <app>/<model>/rollout-state
BODY = {
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["user loves science fiction"]},
        {
            "name": "items",
            "datatype": "BYTES",
            "shape": [2],
            "data": ["space opera", "cooking show"],
        },
    ]
}
# Lenient gates: this test is about the control plane surviving the GCS, not about judging v2.
GATES = {"min_requests": 10, "fail_fast_min_requests": 10, "max_error_rate": 0.25,
         "max_error_rate_increase": 0.25, "max_p99_latency_ratio": None, "fail_fast_error_rate": 0.5}  # fmt: skip
# The hold at 30% outlasts the GCS's downtime and restart, so the step the rollout resumes at
# is the one it held when the GCS died.
HOLD_S = 25
STEPS = [{"set_weight": 30}, {"pause_s": HOLD_S}, {"set_weight": 60}, {"pause_s": 2}]
DOWN_S = 8.0
CLIENTS = 4


@pytest.fixture(scope="module")
def app(headloss, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("headloss")
    (tmp / "admin_token").write_text(TOKEN)
    v1 = write_model_config(tmp, "v1", build_tiny_bert(tmp / "a", 0))
    v2 = write_model_config(tmp, "v2", build_tiny_bert(tmp / "b", 1))
    config = version_apps_config({"v1": v1, "v2": v2}, {"v1": 100})
    config["applications"][-1]["runtime_env"] = {
        "env_vars": {"ROLLOUT_ADMIN_TOKEN_FILE": str(tmp / "admin_token")}
    }
    headloss.serve_deploy(config, tmp)
    wait_all_running()
    return headloss, config, tmp


def wait_all_running(timeout_s: float = 180) -> None:
    from ray import serve

    def running():
        apps = serve.status().applications
        failed = {n: a.message for n, a in apps.items() if a.status == "DEPLOY_FAILED"}
        if failed:
            raise AssertionError(f"failed to deploy: {failed}")
        return len(apps) == 3 and all(a.status == "RUNNING" for a in apps.values())

    wait_for_condition(running, timeout_s, message="every app RUNNING")


def admin(url: str, path: str = "", timeout_s: float = 10) -> httpx.Response:
    return httpx.get(f"{url}/admin/rollout{path}", timeout=timeout_s,
                     headers={"authorization": f"Bearer {TOKEN}"})  # fmt: skip


def stored_state() -> dict | None:
    raw = ray_compat.kv_get(STATE_KEY, KV_NAMESPACE)
    return None if raw is None else json.loads(raw)


def test_gcs_killed_mid_rollout_comes_back_from_redis(app):
    headloss, config, tmp = app
    if not os.environ.get("HEADLOSS_WITHOUT_REDIS"):  # (the control, conftest.py)
        assert headloss.redis.keys() > 0  # the GCS's tables are in Redis, not in its memory
    declared = copy.deepcopy(config)
    declared["applications"][-1]["deployments"].append({
        "name": "RolloutController",
        "user_config": {"tick_interval_s": 0.25, "plan": {
            "strategy": "canary", "candidate": "v2", "stable": "v1",
            "canary": {"steps": STEPS}, "gates": GATES}},
    })  # fmt: skip
    url = headloss.url
    statuses_while_down: list[dict] = []
    # A Router serves once its first traffic table is in (version_apps: once its versions
    # answer); the clients start after that.
    wait_for_condition(
        lambda: httpx.post(f"{url}/v2/models/{APP}/infer", json=BODY, timeout=10).status_code == 200,
        timeout_s=60, message="the router to serve",
    )  # fmt: skip
    with loadgen.InferLoad(url, f"/v2/models/{APP}/infer", BODY, CLIENTS) as load:
        started_at = time.monotonic()
        time.sleep(2)
        headloss.serve_deploy(declared, tmp)
        before = wait_for_condition(
            lambda: (s := admin(url).json())["step_index"] == 1 and s["weights"].get("v2") == 30 and s,
            timeout_s=60, message="rollout holding at 30%",
        )  # fmt: skip
        history_before = admin(url, "/history").json()["events"]
        # The hold is stored (persist before publish): what a restarted GCS must give back.
        stored_before = wait_for_condition(
            lambda: (s := stored_state()) and s["step_index"] == 1 and s, timeout_s=10,
            message="the hold at 30% stored",
        )  # fmt: skip

        killed_at = headloss.kill_gcs()
        while (left := DOWN_S - (time.monotonic() - killed_at)) > 0.5:
            try:  # what operators see while the GCS is down (the router asks the controller)
                s = admin(url, timeout_s=left).json()
                statuses_while_down.append({k: s.get(k) for k in ("phase", "step_index", "epoch")})
            except (httpx.HTTPError, ValueError) as exc:
                statuses_while_down.append({"error": f"{type(exc).__name__}: {exc}"})
            time.sleep(min(1.0, max(0.0, DOWN_S - (time.monotonic() - killed_at))))
        restarted_at = headloss.start_gcs()

        # The controller stores again once the GCS answers: a checkpoint of the hold (its timer
        # runs) or the next step; either way the write says where the rollout is.
        def stored_again():
            s = stored_state()
            return s is not None and s != stored_before and s

        stored_after = wait_for_condition(
            stored_again, timeout_s=60, message="the controller to store again"
        )
        resumed_at = time.monotonic()
        after = admin(url).json()

        def succeeded():
            s = admin(url).json()
            assert s["phase"] not in ("rolled_back", "aborted"), s  # fail with the reason
            return s["phase"] == "succeeded" and s

        final = wait_for_condition(succeeded, timeout_s=90, message="rollout to succeed")
        time.sleep(1)  # a little steady traffic after the rollout
        ended_at = time.monotonic()
    history = admin(url, "/history").json()["events"]
    windows = {
        "start_to_kill": load.window(started_at, killed_at),
        "gcs_down": load.window(killed_at, restarted_at),
        "gcs_restart_to_controller_stored": load.window(restarted_at, resumed_at),
        "controller_stored_to_end": load.window(resumed_at, ended_at),
    }
    report = {
        "gcs_down_s": round(restarted_at - killed_at, 2),
        "gcs_restart_to_controller_stored_s": round(resumed_at - restarted_at, 2),
        # Where the processes ran (conftest.CpuSplit): head processes apart from the workers,
        # or every process on every CPU (HEADLOSS_SHARED_CPUS=1).
        "cpus": ({"head": sorted(headloss.split.head_cpus),
                  "workers": sorted(headloss.split.worker_cpus),
                  "processes_pinned": headloss.split.pinned}
                 if headloss.split.possible else "shared"),
        "requests": windows,
        "requests_total": load.sent, "failed_total": len(load.errors),
        "status_while_down": statuses_while_down,
        "epoch_before": before["epoch"], "epoch_after": after["epoch"],
        "stored_before": {k: stored_before[k] for k in ("phase", "step_index")},
        "stored_after": {k: stored_after[k] for k in ("phase", "step_index")},
        "status_after": {k: after[k] for k in ("phase", "step_index", "weights")},
        "events": [(e["to_phase"], e["step_index"], e.get("weight")) for e in history],
    }  # fmt: skip
    print("head-loss report:", json.dumps(report, indent=1))
    if os.environ.get("HEADLOSS_REPORT"):
        Path(os.environ["HEADLOSS_REPORT"]).write_text(json.dumps(report, indent=1))

    # Resumed where it was: the same phase and step (or the step after it, once the hold ran
    # out), and every decision taken before the kill is still in the history.
    assert stored_after["phase"] == stored_before["phase"] == before["phase"]
    assert stored_after["step_index"] >= stored_before["step_index"] == 1
    assert after["phase"] == before["phase"] and after["step_index"] >= 1
    assert history[: len(history_before)] == history_before
    assert final["weights"]["v2"] == 100
    # Clients: served while the GCS was down, and none failed, then or at any other time.
    assert windows["gcs_down"]["requests"] > 0
    assert load.errors == [], report

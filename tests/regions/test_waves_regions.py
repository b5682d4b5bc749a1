"""`rollout waves` across two real Ray clusters on this machine (tests/regions/conftest.py).

Each region (r1, r2) runs its own cluster and its own app (tiny models v1, v2, v3), deployed
from its rendered region config; the orchestrator is the real CLI (`rollout waves start`) in
a subprocess, reaching each region through its overlay's `admin:` block. Client traffic runs
in both regions throughout and must see no failed request.

1. v1 -> v2 in waves [r1] (bake) then [r2]; the orchestrator is SIGKILLed mid-bake and
   started again: it takes over the stale lock, finishes the bake, and both regions end on v2.
2. v2 -> v3, where r2's v3 fails every call (fault injection): r1 succeeds, r2's gates roll
   it back, the waves halt, r1 stays on v3, and a third wave's region r3 (its admin API a
   tripwire server that records every call) is never contacted but to be told the waves
   state (which it refuses, and the waves go on).

After each run every region's `GET /admin/rollout` shows the waves state (`waves`), every
region of the waves file in it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.regions.conftest import (
    BIN,
    RayRegion,
    build_project,
    start_loads,
    write_yaml,
)
from tests.support.loadgen import Load
from tests.support.waiting import wait_for_condition


@pytest.fixture(scope="module")
def project(ray_regions: dict[str, RayRegion], tmp_path_factory):
    """Both regions deployed (v1 serving; r2's v3 faulty) and client traffic in each."""
    root = build_project(ray_regions, tmp_path_factory.mktemp("regions"), faulty={"r2": "v3"})
    loads = start_loads(ray_regions)
    try:
        yield root, loads
    finally:
        for load in loads.values():
            load.__exit__(None, None, None)


def _waves(root: Path, name: str, plan: str, bake_s: float, regions=("r1", "r2")) -> Path:
    return write_yaml(root / f"configs/waves/{name}.yaml", {
        "name": name, "on_failure": "halt", "poll_interval_s": 1.0,
        "waves": [{"regions": [{"region": r, "plan": f"configs/rollouts/{plan}"}],
                   "bake_s": bake_s if i == 0 else 0} for i, r in enumerate(regions)],
    })  # fmt: skip


class _Tripwire(BaseHTTPRequestHandler):
    """An admin API that must never be called: records the call, answers 503."""

    calls: list[str] = []

    def _refuse(self) -> None:
        self.calls.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.send_header("content-length", "0")
        self.end_headers()

    do_GET = do_POST = do_PUT = _refuse

    def log_message(self, *args: Any) -> None:
        pass


def _tripwire_region(root: Path, name: str) -> tuple[ThreadingHTTPServer, list[str]]:
    """Region `name`: r1's overlay with its admin API and dashboard at a tripwire server."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Tripwire)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    overlay = yaml.safe_load((root / "configs/regions/r1.yaml").read_text())
    overlay["region"] = name
    overlay["admin"] = {**overlay["admin"], "url": url, "dashboard_url": url}
    write_yaml(root / f"configs/regions/{name}.yaml", overlay)
    _Tripwire.calls = []
    return server, _Tripwire.calls


def _orchestrator(root: Path, waves: Path, log: Path) -> subprocess.Popen:
    command = [str(BIN / "rollout"), "waves", "start", str(waves), "--root", str(root),
               "--state-dir", str(root / "state")]  # fmt: skip
    with log.open("a") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "ROLLOUT_ACTOR": "regions-test"})  # fmt: skip


def _exit_code(process: subprocess.Popen, timeout_s: float) -> int:
    """The orchestrator's exit status; killed if it is still running after `timeout_s` (one
    left running would go on steering regions whose ports a later run may reuse)."""
    try:
        return process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)
        raise


def _state(root: Path, name: str) -> dict[str, Any]:
    path = root / "state" / f"{name}.state.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _no_failed_requests(loads: dict[str, Load]) -> None:
    for name, load in loads.items():
        assert load.sent > 0, f"{name}: no client traffic"
        assert load.errors == [], f"{name}: {len(load.errors)} failed: {load.errors[:3]}"


def test_waves_succeed_across_regions_and_resume_after_a_kill_mid_bake(project, ray_regions):
    root, loads = project
    waves, log = _waves(root, "to-v2", "to-v2.yaml", bake_s=15), root / "to-v2.log"
    first = _orchestrator(root, waves, log)
    try:
        wait_for_condition(lambda: _state(root, "to-v2").get("phase") == "baking", 180,
                           interval_s=0.5, message="wave 1 baking")  # fmt: skip
    finally:
        first.send_signal(signal.SIGKILL)  # killed: no cleanup, its lock file stays
        first.wait(30)
    assert (root / "state/to-v2.lock").exists()
    assert ray_regions["r2"].admin_status().get("plan_digest") is None  # wave 2 not started

    second = _orchestrator(root, waves, log)
    assert _exit_code(second, 240) == 0, log.read_text()
    state = _state(root, "to-v2")
    assert state["phase"] == "succeeded" and state["waves_completed"] == 2
    decisions = [e["decision"] for e in state["history"]]
    assert decisions.count("wave 1 succeeded; bake 15s") == 1  # the bake resumed, not restarted
    baked = next(e["time"] for e in state["history"] if e["decision"].startswith("wave 1 succ"))
    done = next(e["time"] for e in state["history"] if e["decision"].startswith("bake done"))
    assert done - baked >= 15
    for name, region in ray_regions.items():
        status = region.admin_status()
        assert status["phase"] == "succeeded" and status["weights"].get("v2") == 100
        # Every region was told the whole waves state, both waves (the operator page's).
        waves = status["waves"]
        assert waves is not None and waves["name"] == "to-v2", (name, waves)
        assert waves["phase"] == "succeeded" and waves["received_at"] > 0
        shown = {r["region"]: r["state"] for w in waves["waves"] for r in w["regions"]}
        assert shown == {"r1": "succeeded", "r2": "succeeded"}, (name, waves)
    assert not (root / "state/to-v2.lock").exists()
    _no_failed_requests(loads)


def test_a_failing_second_region_is_rolled_back_and_the_first_keeps_the_new_version(
    project, ray_regions
):
    root, loads = project
    tripwire, calls = _tripwire_region(root, "r3")
    try:
        waves = _waves(root, "to-v3", "to-v3.yaml", bake_s=2, regions=("r1", "r2", "r3"))
        log = root / "to-v3.log"
        assert _exit_code(_orchestrator(root, waves, log), 300) == 1, log.read_text()
    finally:
        tripwire.shutdown()
        tripwire.server_close()
    state = _state(root, "to-v3")
    assert state["phase"] == "halted" and state["halted_at_region"] == "r2"
    # r3 is only told the waves state (its admin API refuses it: the waves go on regardless).
    rollout_calls = [c for c in calls if c != "POST /admin/waves"]
    assert rollout_calls == [] and state["regions"]["r3"]["status"] == "pending", (calls, state)
    assert state["regions"]["r2"]["reading"]["phase"] == "rolled_back"
    assert state["reason"].startswith("r2: rolled back")  # the reason from r2's own history
    r1, r2 = ray_regions["r1"].admin_status(), ray_regions["r2"].admin_status()
    assert r1["phase"] == "succeeded" and r1["weights"].get("v3") == 100
    assert r2["phase"] == "rolled_back" and r2["weights"].get("v2") == 100
    for status in (r1, r2):
        waves = status["waves"]
        assert waves["name"] == "to-v3" and waves["phase"] == "halted", waves
        shown = {r["region"]: r["state"] for w in waves["waves"] for r in w["regions"]}
        assert shown == {"r1": "succeeded", "r2": "failed", "r3": "pending"}, waves
    _no_failed_requests(loads)

"""The waves orchestrator (app/ops/waves.py) against fake regions that are real HTTP servers
on 127.0.0.1 (a thread each): an admin API (`/admin/rollout`, bearer token) and a dashboard
(`PUT /api/serve/applications/`) whose rollout moves one step per status read. No Ray."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.errors import ConfigError
from app.ops.cli.commands import main
from app.ops.waves import (
    WavesLocked,
    WavesPhase,
    WavesRunner,
    load_waves,
    read_state,
    resolve_waves,
    send_command,
)
from app.rollout import RolloutPlan

ROOT = Path(__file__).resolve().parents[2]
PLAN = "configs/rollouts/recommender-v2-canary.yaml"
TOKEN = "test-admin-token-0123456789"


class FakeRegion:
    """One region's router admin API and dashboard. A declared plan runs `steps` status reads,
    then succeeds, or rolls back if `fail` is set."""

    def __init__(self, name: str, port: int | None = None, *, steps: int = 2) -> None:
        self.name = name
        self.steps = steps
        self.fail = False
        self.lock = threading.Lock()
        self.digest: str | None = None
        self.phase = "idle"
        self.left = 0
        self.weights = {"v1": 100, "v2": 0}
        self.requests: list[tuple[str, str]] = []
        self.events: list[dict[str, Any]] = []
        self.declared: list[dict[str, Any] | None] = []
        # POST /admin/waves: the waves states published here (apart from `requests`, which
        # are the rollout API's), and the status it answers them with (503: refuses them).
        self.published: list[dict[str, Any]] = []
        self.waves_reply = 200
        self.port = port or _free_port()
        self.server: ThreadingHTTPServer | None = None

    # -- the rollout ----------------------------------------------------------------------

    def _declare(self, config: dict[str, Any]) -> None:
        (app,) = [a for a in config["applications"] if a["import_path"] == "app.builder:build_app"]
        (controller,) = [d for d in app["deployments"] if d["name"] == "RolloutController"]
        plan = controller["user_config"]["plan"]
        self.declared.append(plan)
        if plan is None:  # no plan: routers follow their declared weights (the stable)
            if self.phase not in ("succeeded", "rolled_back", "aborted"):
                self.phase = "aborted"
            self.weights = {"v1": 100, "v2": 0}
            return
        digest = RolloutPlan.model_validate(plan).digest()
        if digest != self.digest:
            self.digest, self.phase, self.left = digest, "progressing", self.steps

    def _status(self) -> dict[str, Any]:
        if self.phase == "progressing":
            self.left -= 1
            self.weights = {"v1": 50, "v2": 50}
            if self.left <= 0:
                if self.fail:
                    self.phase, self.weights = "rolled_back", {"v1": 100, "v2": 0}
                    self.events.append({"to_phase": "rolled_back",
                                        "reason": "rolled back: error rate 0.30 > 0.05"})  # fmt: skip
                else:
                    self.phase, self.weights = "succeeded", {"v1": 0, "v2": 100}
        errors = 30 if self.fail else 0
        return {
            "phase": self.phase, "candidate": "v2", "stable": "v1", "step": "set_weight 50",
            "step_index": 1, "weights": self.weights, "plan_digest": self.digest,
            "versions": {"v2": {"requests": 100, "errors": errors, "error_rate": errors / 100}},
            "message": "rolled back: gate error_rate" if self.phase == "rolled_back" else None,
        }  # fmt: skip

    def _command(self, name: str) -> tuple[int, dict[str, Any]]:
        live = self.phase in ("idle", "progressing", "paused", "promoting")
        if name == "abort" and live:
            self.phase, self.weights = "aborted", {"v1": 100, "v2": 0}
        elif name == "start" and not live and self.digest is not None:
            self.phase, self.left = "progressing", self.steps
        else:
            return 409, {"error": f"{name} does not fit phase {self.phase}"}
        return 200, self._status()

    # -- HTTP -------------------------------------------------------------------------------

    def start(self) -> FakeRegion:
        region = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _reply(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if self.headers.get("authorization") == f"Bearer {TOKEN}":
                    return True
                self._reply(401, {"error": "unauthorized"})
                return False

            def do_GET(self) -> None:
                with region.lock:
                    region.requests.append(("GET", self.path))
                    if self.path == "/admin/rollout" and self._authorized():
                        self._reply(200, region._status())
                    elif self.path == "/admin/rollout/history" and self._authorized():
                        self._reply(200, {"events": region.events})
                    elif not self.path.startswith("/admin/rollout"):
                        self._reply(404, {"error": "not found"})

            def do_POST(self) -> None:
                if self.path == "/admin/waves":
                    length = int(self.headers.get("content-length") or 0)
                    body = json.loads(self.rfile.read(length))
                    with region.lock:
                        if self._authorized():
                            if region.waves_reply == 200:
                                region.published.append(body)
                            self._reply(region.waves_reply, {"accepted": True})
                    return
                with region.lock:
                    region.requests.append(("POST", self.path))
                    name = self.path.removeprefix("/admin/rollout/")
                    if self._authorized():
                        self._reply(*region._command(name))

            def do_PUT(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length))
                with region.lock:
                    region.requests.append(("PUT", self.path))
                    region._declare(body)
                    self._reply(200, {})

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def count(self, method: str, path: str | None = None) -> int:
        return sum(1 for m, p in self.requests if m == method and (path is None or p == path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def world(tmp_path):
    """A project root with three regions (a, b, c) whose overlays point at fake regions."""
    regions: dict[str, FakeRegion] = {}
    token_file = tmp_path / "admin_token"
    token_file.write_text(TOKEN + "\n")
    (tmp_path / "configs/regions").mkdir(parents=True)
    (tmp_path / "configs/rollouts").mkdir(parents=True)
    shutil.copy(ROOT / PLAN, tmp_path / PLAN)
    base = {"applications": [{"name": "recommender", "import_path": "app.builder:build_app",
                              "args": {"model": "recommender"}}]}  # fmt: skip
    (tmp_path / "serve_config.yaml").write_text(yaml.safe_dump(base))
    for name in ("a", "b", "c"):
        region = FakeRegion(name)
        regions[name] = region
        url = f"http://127.0.0.1:{region.port}"
        overlay = {
            "region": name,
            "admin": {"url": url, "token_file": str(token_file), "dashboard_url": url},
            "serve": {"applications": [{"name": "recommender", "args": {"region": name}}]},
        }
        (tmp_path / f"configs/regions/{name}.yaml").write_text(yaml.safe_dump(overlay))
    yield tmp_path, regions
    for region in regions.values():
        region.stop()


def _waves_file(root: Path, waves: list[list[str]], *, on_failure: str = "halt",
                bake_s: float = 60, name: str = "v2", poll_s: float = 5) -> Path:  # fmt: skip
    spec = {
        "name": name,
        "on_failure": on_failure,
        "poll_interval_s": poll_s,
        "waves": [
            {"regions": [{"region": r, "plan": PLAN} for r in wave], "bake_s": bake_s}
            for wave in waves
        ],
    }
    path = root / "configs/waves" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _runner(root: Path, path: Path, clock: Clock) -> WavesRunner:
    spec = load_waves(path)
    return WavesRunner(
        spec=spec, targets=resolve_waves(spec, root), state_dir=root / "state", root=root,
        clock=clock, sleep=clock.sleep,
    )  # fmt: skip


def _decisions(runner: WavesRunner) -> list[str]:
    return [entry["decision"] for entry in runner.state["history"]]


# ----------------------------------------------------------------------------- scenarios


def test_all_waves_succeed_one_after_another(world):
    root, regions = world
    for region in regions.values():
        region.start()
    clock = Clock()
    runner = _runner(root, _waves_file(root, [["a"], ["b", "c"]]), clock)

    assert runner.run() is WavesPhase.SUCCEEDED
    assert runner.state["waves_completed"] == 2
    # Each region was declared once, through its dashboard, with the plan.
    for region in regions.values():
        assert region.count("PUT") == 1
        assert region.declared[0]["candidate"] == "v2"
        assert region.phase == "succeeded"
    # Wave 2 was declared only after wave 1 succeeded and baked 60 s.
    decisions = _decisions(runner)
    assert decisions.index("wave 1 succeeded; bake 60s") < decisions.index("start b: plan " + PLAN)
    bake = next(e for e in runner.state["history"] if e["decision"].startswith("bake done"))
    baked_at = next(e for e in runner.state["history"] if e["decision"].startswith("wave 1 succ"))
    assert bake["time"] - baked_at["time"] >= 60
    # Every decision carries each region's readings.
    assert baked_at["readings"]["a"]["phase"] == "succeeded"
    assert baked_at["readings"]["a"]["weights"] == {"v1": 0, "v2": 100}
    # The state file is the runner's state, and the lock is released.
    assert read_state(root / "state", "v2")["phase"] == "succeeded"
    assert not (root / "state/v2.lock").exists()


def test_a_failing_region_in_wave_two_halts_the_waves(world):
    root, regions = world
    for region in regions.values():
        region.start()
    regions["b"].fail = True
    runner = _runner(root, _waves_file(root, [["a"], ["b"], ["c"]]), Clock())

    assert runner.run() is WavesPhase.HALTED
    assert runner.state["halted_at_region"] == "b"
    assert runner.state["reason"] == "b: rolled back: error rate 0.30 > 0.05"  # from its history
    assert regions["b"].phase == "rolled_back"  # the region rolled itself back
    assert regions["c"].requests == []  # wave 3 never started: not even read
    # Wave 1 stays promoted: not aborted, not redeclared.
    assert regions["a"].phase == "succeeded" and regions["a"].weights == {"v1": 0, "v2": 100}
    assert regions["a"].count("POST") == 0 and regions["a"].count("PUT") == 1
    halted = runner.state["history"][-1]
    assert halted["decision"].startswith("halted: b:")
    assert halted["readings"]["b"]["candidate_error_rate"] == 0.3
    # A halted run stays halted when started again.
    assert _runner(root, root / "configs/waves/v2.yaml", Clock()).run() is WavesPhase.HALTED
    assert regions["c"].requests == []


def test_rollback_all_sends_every_region_of_the_rollout_back_to_stable(world):
    root, regions = world
    for region in regions.values():
        region.start()
    regions["b"].fail = True
    regions["c"].steps = 100  # still progressing when b fails
    runner = _runner(root, _waves_file(root, [["a"], ["b", "c"]], on_failure="rollback_all"),
                     Clock())  # fmt: skip

    assert runner.run() is WavesPhase.ROLLED_BACK
    # a had succeeded: declared again with no plan, so its routers follow v1 again.
    assert regions["a"].declared[-1] is None and regions["a"].weights == {"v1": 100, "v2": 0}
    # c was live: aborted through its admin API.
    assert regions["c"].count("POST", "/admin/rollout/abort") == 1
    assert regions["c"].phase == "aborted"
    assert regions["b"].phase == "rolled_back"
    assert {r["status"] for r in runner.state["regions"].values()} == {"rolled_back"}
    assert runner.state["history"][-1]["decision"].startswith("rolled_back: rollback_all after b:")


def test_an_unreachable_region_pauses_the_wave_and_is_never_passed(world):
    root, regions = world
    regions["a"].start()  # b is down: nothing listens on its port
    clock = Clock()
    runner = _runner(root, _waves_file(root, [["a"], ["b"]], bake_s=10), clock)

    with runner.lock:
        for _ in range(20):
            runner.tick()
            clock.sleep(5)
        assert runner.phase is WavesPhase.RUNNING and runner.state["wave"] == 1
        assert runner.state["regions"]["b"]["status"] == "pending"
        assert "unreachable: b (paused, not passed)" in runner.state["reason"]
        assert runner.state["waves_completed"] == 1
        regions["b"].start()  # back
        while not runner.done:
            runner.tick()
            clock.sleep(5)
    assert runner.phase is WavesPhase.SUCCEEDED
    assert "all regions of the wave answer again" in _decisions(runner)


def test_a_region_lost_during_the_bake_holds_the_bake(world):
    root, regions = world
    for region in regions.values():
        region.start()
    clock = Clock()
    runner = _runner(root, _waves_file(root, [["a"], ["b"]], bake_s=10), clock)
    with runner.lock:
        while runner.phase is not WavesPhase.BAKING:
            runner.tick()
        regions["a"].stop()
        clock.sleep(100)  # the bake time has passed, but a cannot be read
        runner.tick()
        assert runner.phase is WavesPhase.BAKING
        assert runner.state["regions"]["a"]["status"] == "unreachable"
        regions["a"].start()
        runner.tick()
        assert runner.state["wave"] == 1 and runner.state["regions"]["a"]["status"] == "succeeded"


def test_killed_mid_bake_resumes_with_the_remaining_bake(world):
    root, regions = world
    for region in regions.values():
        region.start()
    path = _waves_file(root, [["a"], ["b"]], bake_s=60)
    clock = Clock()
    first = _runner(root, path, clock)
    first.lock.acquire()
    while first.phase is not WavesPhase.BAKING:
        clock.sleep(5)
        first.tick()
    clock.sleep(20)
    first.tick()
    # Killed: its lock file stays behind, naming a process that is gone.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    lock = json.loads(first.lock.path.read_text())
    first.lock.path.write_text(json.dumps({**lock, "pid": int(dead.stdout)}))
    del first

    clock.sleep(15)  # 35 s of the 60 s bake are gone by the wall clock
    second = _runner(root, path, clock)
    assert second.run(max_ticks=1) is WavesPhase.BAKING  # took over the stale lock
    assert second.bake_remaining_s() == pytest.approx(25)
    assert regions["b"].requests == []
    clock.sleep(25)
    assert second.run() is WavesPhase.SUCCEEDED
    assert regions["a"].count("PUT") == 1  # not declared again after the restart


def test_a_restart_between_declaring_and_saving_does_not_declare_twice(world):
    root, regions = world
    regions["a"].start()
    path = _waves_file(root, [["a"]], bake_s=0)
    first = _runner(root, path, Clock())
    with first.lock:
        first.tick()  # declared; the region runs it
    assert regions["a"].count("PUT") == 1
    second = _runner(root, path, Clock())
    assert second.run() is WavesPhase.SUCCEEDED
    assert regions["a"].count("PUT") == 1


def test_a_second_orchestrator_is_refused_and_commands_reach_the_running_one(world):
    root, regions = world
    for region in regions.values():
        region.start()
    path = _waves_file(root, [["a"], ["b"]], bake_s=60)
    clock = Clock()
    running = _runner(root, path, clock)
    running.lock.acquire()
    try:
        with pytest.raises(WavesLocked, match=r"held by pid \d+ on "):
            _runner(root, path, clock).run()
        while running.phase is not WavesPhase.BAKING:
            running.tick()
        assert "queued for the running orchestrator" in send_command(
            _runner(root, path, clock), "pause", "alice@laptop"
        )
        running.tick()
        assert running.state["paused"]
        clock.sleep(600)
        running.tick()
        assert running.phase is WavesPhase.BAKING  # paused: the bake clock stopped
        assert running.bake_remaining_s() == pytest.approx(60)
        send_command(_runner(root, path, clock), "promote", "alice@laptop")
        running.tick()
        assert running.state["wave"] == 1
        running.tick()
        assert regions["b"].count("PUT") == 1
        assert "bake skipped (by alice@laptop)" in _decisions(running)
    finally:
        running.lock.release()


def test_abort_without_a_running_orchestrator_rolls_back_at_once(world):
    root, regions = world
    for region in regions.values():
        region.start()
    regions["a"].steps = 100
    path = _waves_file(root, [["a"], ["b"]])
    runner = _runner(root, path, Clock())
    runner.run(max_ticks=3)
    assert send_command(_runner(root, path, Clock()), "abort", "bob") == "abort: aborted"
    assert regions["a"].phase == "aborted"
    assert read_state(root / "state", "v2")["phase"] == "aborted"


# ----------------------------------------------------------------------------- the waves file


def _spec(**changes: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": "v2", "on_failure": "halt",
        "waves": [{"regions": [{"region": "a", "plan": PLAN}], "bake_s": 60},
                  {"regions": [{"region": "b", "plan": PLAN}], "bake_s": 0}],
    }  # fmt: skip
    spec.update(changes)
    return spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (_spec(on_failure="retry"), "on_failure: Input should be 'halt' or 'rollback_all'"),
        (_spec(bake="1h"), "bake: Extra inputs are not permitted"),
        (_spec(waves=[]), "waves: List should have at least 1 item"),
        (_spec(waves=[{"regions": [{"region": "a", "plan": PLAN}], "bake_s": -1}]),
         "waves.0.bake_s: Input should be greater than or equal to 0"),
        (_spec(waves=[{"regions": [{"region": "a", "plan": PLAN}], "bake_s": "60"}]),
         "waves.0.bake_s: Input should be a valid number"),
        (_spec(waves=[{"regions": [{"region": "a", "plan": PLAN, "url": "http://x"}],
                       "bake_s": 0}]), "waves.0.regions.0.url: Extra inputs are not permitted"),
        (_spec(waves=[{"regions": [], "bake_s": 0}]), "waves.0.regions: List should have at least"),
        (_spec(waves=[{"regions": [{"region": "a", "plan": PLAN}], "bake_s": 0},
                      {"regions": [{"region": "a", "plan": PLAN}], "bake_s": 0}]),
         "waves[1].regions[0].region: 'a' is already in waves[0].regions[0]"),
        (_spec(waves=[{"regions": [{"region": "zz", "plan": PLAN}], "bake_s": 0}]),
         "waves[0].regions[0].region: no overlay configs/regions/zz.yaml for 'zz'"),
        (_spec(waves=[{"regions": [{"region": "a", "plan": "serve_config.yaml"}], "bake_s": 0}]),
         "waves[0].regions[0].plan: serve_config.yaml is not under configs/rollouts/"),
        (_spec(waves=[{"regions": [{"region": "a", "plan": "configs/rollouts/no.yaml"}],
                       "bake_s": 0}]), "waves[0].regions[0].plan: configs/rollouts/no.yaml does not exist"),
    ],
)  # fmt: skip
def test_bad_waves_files_are_refused_with_the_field_named(world, spec, message):
    root, _ = world
    path = root / "configs/waves/bad.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError) as raised:
        resolve_waves(load_waves(path), root)
    assert message in str(raised.value)
    assert str(path) in str(raised.value) or "waves:" in str(raised.value)


def test_a_region_without_an_admin_block_is_refused(world):
    root, _ = world
    overlay = yaml.safe_load((root / "configs/regions/b.yaml").read_text())
    del overlay["admin"]
    (root / "configs/regions/b.yaml").write_text(yaml.safe_dump(overlay))
    with pytest.raises(ConfigError, match=r"waves\[1\]\.regions\[0\]\.region: .*no `admin:` block"):
        resolve_waves(load_waves(_waves_file(root, [["a"], ["b"]])), root)


def test_a_bad_admin_block_names_the_field(world):
    from app.ops.overlay import load_overlay

    root, _ = world
    overlay = yaml.safe_load((root / "configs/regions/a.yaml").read_text())
    overlay["admin"]["url"] = "not a url"
    (root / "configs/regions/a.yaml").write_text(yaml.safe_dump(overlay))
    with pytest.raises(ConfigError, match=r"a\.yaml: admin\.url: String should match pattern"):
        load_overlay(root / "configs/regions/a.yaml")


def test_the_shipped_waves_file_validates(capsys):
    assert main(["validate", "configs/waves/recommender-v2.yaml"]) == 0
    out = capsys.readouterr().out
    assert "wave 1: us-east-1" in out and "wave 2: eu-west-1" in out and "europe-west4" in out


def test_the_cli_runs_the_waves_and_shows_every_region(world, capsys):
    root, regions = world
    for region in regions.values():
        region.start()
    path = _waves_file(root, [["a", "b", "c"]], bake_s=0, poll_s=0.05)
    args = ["--root", str(root), "--state-dir", str(root / "state")]
    assert main(["waves", "start", str(path), *args]) == 0
    assert "waves v2: succeeded" in capsys.readouterr().out
    assert main(["waves", "status", str(path), *args]) == 0
    assert "orchestrator: none running" in capsys.readouterr().out
    assert main(["status", "--all-regions", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert all(f"\n{r} " in out for r in "abc") and "v2=100" in out
    regions["c"].stop()
    assert main(["status", "--all-regions", "--root", str(root), "--json"]) == 2
    assert "ConnectError" in json.loads(capsys.readouterr().out)["c"]["error"]
    assert main(["waves", "start", "configs/waves/missing.yaml", *args]) == 2

"""`make demo`'s rollout, `make demo-worse` and `make demo-rollback`: declare a plan with
`serve deploy`, drive traffic from the demo world's simulated users (bench/world.py: each
request is a user and a slate of items; the user clicks the top item with a probability that
depends on their hidden taste, and the click or no-click goes back as feedback), and print the
rollout, its load stage and the A/B verdict as they happen.

A plan's `load_stage` replays a sample at the candidate before its first step: this script
writes one first (`LOAD_SAMPLE_RECORDS` demo world requests, in the capture format, into the
plan's `sample` directory, replacing the model's earlier ones) and declares the directory's
absolute path. `--faulty` leaves the load stage out: that rehearsal is of the live gates (the
replay would see v2's errors and roll it back before any user request reached it).

    demo_rollout.py --plan configs/rollouts/demo-canary.yaml           # v2 wins: 100%
    demo_rollout.py --plan configs/rollouts/demo-canary.yaml --worse   # v2 loses: rolled back
    demo_rollout.py --plan configs/rollouts/demo-canary.yaml --faulty  # v2 fails 50%: rolled back
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

from app.config import FaultInjection, load_model_config
from app.ops.cli.render import TERMINAL_PHASES
from app.ops.declare import declare_plan, load_plan, patch_version
from app.serving.auth import load_admin_token, load_feedback_token
from app.serving.capture import CaptureRecord, model_directory, write_sample

# bench/ runs from the checkout (it is not installed): make it importable from scripts/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.world import WORSE_V2, World  # noqa: E402

TERMINAL = TERMINAL_PHASES
LOAD_SAMPLE_RECORDS = 60


class Traffic:
    """Client threads playing the demo world's users: infer, click (or not) on the top item,
    post the outcome as feedback. Counts responses by status and serving version, and clicks
    per version (what the clients saw; the controller's own counts come from the feedback)."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.stop = url, threading.Event()
        self.world = World()
        self.codes: Counter = Counter()
        self.versions: Counter = Counter()
        self.clicks: Counter = Counter()
        self.feedback_errors: Counter = Counter()
        # The click pipeline holds the feedback credential (ROLLOUT_FEEDBACK_TOKEN_FILE, set by
        # scripts/demo.sh), not the admin token.
        token = load_feedback_token()
        self.feedback_headers = {"authorization": f"Bearer {token}"} if token else {}
        self.lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)
        ]

    def _send_feedback(self, client: httpx.Client, pending: list[dict]) -> None:
        """One batch POST (what an event pipeline would do); every item must count."""
        try:
            f = client.post("/v2/models/recommender/feedback", json={"feedback": pending},
                            headers=self.feedback_headers)  # fmt: skip
            results = f.json().get("results", []) if f.status_code == 200 else []
            # Answers from before the plan was declared are accepted but not in an A/B arm.
            lost = len(pending) - sum(1 for r in results if r.get("counted") or r.get("excluded"))
        except (httpx.HTTPError, ValueError):
            lost = len(pending)
        if lost:
            with self.lock:
                self.feedback_errors["not counted"] += lost
        pending.clear()

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        pending: list[dict] = []
        sent_at = time.monotonic()
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                slate = self.world.slate(rng)
                clicked = None
                try:
                    r = client.post("/v2/models/recommender/infer", json=slate.body(top_k=1),
                                    headers={"x-user-id": slate.user.user_id})  # fmt: skip
                    code, version = r.status_code, r.headers.get("x-model-version", "-")
                    if code == 200:
                        outputs = {o["name"]: o for o in r.json()["outputs"]}
                        top = outputs["ranking"]["data"][0]  # ranking [1, 1]: the top item
                        clicked = World.click(slate, int(top), rng)
                        pending.append({"request_id": r.headers["x-request-id"], "outcome": "click",
                                        "value": clicked})  # fmt: skip
                    if len(pending) >= 10 or (pending and time.monotonic() - sent_at > 0.5):
                        self._send_feedback(client, pending)
                        sent_at = time.monotonic()
                except httpx.HTTPError as exc:
                    code, version = type(exc).__name__, "-"
                with self.lock:
                    self.codes[code] += 1
                    self.versions[version] += 1
                    if clicked:
                        self.clicks[version] += 1

    def start(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def write_load_sample(plan: dict, model: str) -> None:
    """Fill the plan's load stage sample with demo world requests (the capture format, as
    `rollout capture import` writes it) and make its path absolute: the controller reads it
    on its own node, from its own working directory."""
    sample = Path(plan["load_stage"]["sample"]).resolve()
    shutil.rmtree(model_directory(sample, model), ignore_errors=True)  # this run's sample only
    rng, world = random.Random(11), World()
    records = [CaptureRecord(model, "v1", time.time(), world.slate(rng).body(top_k=1))
               for _ in range(LOAD_SAMPLE_RECORDS)]  # fmt: skip
    write_sample(sample, model, records)
    plan["load_stage"]["sample"] = str(sample)


def load_line(load: dict) -> str:
    """One line of the load stage's progress, from the controller's status block."""
    if load.get("summary"):
        return f"load stage {load['phase']}: {load['summary']}"
    figures = ""
    if "sent" in load:
        p99 = "-" if load.get("p99_ms") is None else f"{load['p99_ms']:g} ms"
        figures = (f": {load.get('current_rps', 0):g} rps scheduled, {load.get('achieved_rps', 0):g} "
                   f"answered/s, p99 {p99}, {load['sent']} sent, {load.get('errors', 0)} errors")  # fmt: skip
    target = "-" if load.get("target_rps") is None else f"{load['target_rps']:g}"
    return f"load stage {load.get('phase')} (target {target} rps){figures}"


def serve_deploy(config: dict, dashboard: str, path: Path) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir / "serve"), "deploy", "-a", dashboard, str(path)], check=True,
                   stdout=subprocess.DEVNULL)  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", default="configs/rollouts/demo-canary.yaml")
    parser.add_argument("--config", default="serve_config.yaml")
    parser.add_argument("--url", default=os.environ.get("ROLLOUT_URL", "http://127.0.0.1:8000"))
    parser.add_argument("--dashboard", default="http://127.0.0.1:8265")
    parser.add_argument("--faulty", action="store_true", help="inject 50%% errors into v2 first")
    parser.add_argument("--worse", action="store_true",
                        help="hot-patch v2 to a worse scoring (bench.world.WORSE_V2) first")  # fmt: skip
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()

    token = load_admin_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    config = yaml.safe_load(Path(args.config).read_text())
    plan = load_plan(Path(args.plan))
    if plan is not None and plan.get("load_stage"):
        if args.faulty:  # a rehearsal of the live gates: see the module docstring
            plan = {k: v for k, v in plan.items() if k != "load_stage"}
        else:
            write_load_sample(plan, "recommender")
    declared = declare_plan(config, None)
    v2 = load_model_config("configs/models/recommender/v2.yaml").user_config()
    if args.faulty:  # v2 as its model config declares it, but failing half its requests
        v2 = v2.model_copy(update={"faults": FaultInjection(error_rate=0.5)})
    if args.worse:  # v2 with a "latency fix" that makes its rankings worse (hot patch)
        v2 = v2.model_copy(update={"hyperparameters": {**v2.hyperparameters, **WORSE_V2}})
    # Always declared, so a rehearsal after another starts from v2 as this run wants it.
    patch_version(declared, "recommender-v2", v2.model_dump(mode="json"))
    state = Path(".ray-demo")
    state.mkdir(exist_ok=True)
    # Reset first (no plan: routers follow serve_config.yaml's own split; v2's faults as
    # asked), so declaring the plan below always starts a new rollout generation.
    serve_deploy(declared, args.dashboard, state / "serve_config.reset.yaml")
    time.sleep(2)
    traffic = Traffic(args.url, args.clients).start()
    time.sleep(2)
    print(
        f"  traffic: {args.clients} clients playing the demo world's users (clicks go back as "
        f"feedback); declaring {args.plan}"
        + (" with v2 failing 50% of requests" if args.faulty else "")
        + (f" with v2 hot-patched to {WORSE_V2}" if args.worse else ""),
        flush=True,
    )
    # The rollout (re)started by this declaration publishes a new traffic generation: until the
    # controller shows one, what it reports is the previous rollout (a rehearsal right after
    # `make demo` would otherwise read that one's "succeeded" and stop at once).
    with httpx.Client(base_url=args.url, timeout=10) as client:
        before = (
            client.get("/admin/rollout", headers=headers).json().get("generation")
            if token
            else None
        )
    serve_deploy(declare_plan(declared, plan), args.dashboard, state / "serve_config.rollout.yaml")
    started = time.monotonic()
    onset = rolled_back = paused_since = None
    last, lift_printed, last_load = None, 0.0, None
    with httpx.Client(base_url=args.url, timeout=10) as client:
        while time.monotonic() - started < args.timeout:
            weights = client.get("/status", headers=headers).json()["weights"]
            status = client.get("/admin/rollout", headers=headers).json() if token else {}
            if token and status.get("generation") == before:
                time.sleep(0.1)  # the new declaration has not reached the controller yet
                continue
            phase = status.get("phase", "?")
            if onset is None and weights.get("v2", 0) > 0:
                onset = time.monotonic()
            if onset is not None and rolled_back is None and phase == "rolled_back":
                rolled_back = time.monotonic()
            line = (
                f"  [{time.monotonic() - started:5.1f}s] {phase:<11} step {status.get('step_index', '?')}"
                f"/{status.get('steps_total', '?')} ({status.get('step', '?')}): "
                + "  ".join(f"{v} {w:g}%" for v, w in sorted(weights.items()))
            )
            lift = next(
                (v for v in status.get("verdicts", []) if v.get("gate") == "improvement"), None
            )
            if line.split("] ", 1)[1] != last:
                print(line, flush=True)
                last = line.split("] ", 1)[1]
                lift_printed = 0.0
            load = status.get("load_stage") or {}
            if load and (load.get("phase"), load.get("summary")) != last_load:
                # once per stage phase (waiting, ramp, hold, passed/failed), with its figures
                print(f"           {load_line(load)}", flush=True)
                last_load = (load.get("phase"), load.get("summary"))
            if lift is not None and time.monotonic() - lift_printed > 10:
                print(f"           A/B {lift['status']}: {lift['reason']}", flush=True)
                lift_printed = time.monotonic()
            if phase in TERMINAL:
                break
            paused_since = (paused_since or time.monotonic()) if phase == "paused" else None
            if paused_since is not None and time.monotonic() - paused_since > 5:
                print(
                    "  the rollout paused (analysis inconclusive or waiting for promote): "
                    "`rollout promote` accepts the step, `rollout resume` re-runs it",
                    flush=True,
                )
                break
            time.sleep(0.1)
    time.sleep(1)
    traffic.finish()
    sent = sum(traffic.codes.values())
    failed = sum(n for code, n in traffic.codes.items() if code != 200)
    print(
        f"  clients: {sent} requests, {failed} failed; served by "
        + ", ".join(f"{v}: {n}" for v, n in sorted(traffic.versions.items()))
    )
    print(
        "  clicks seen by the clients: "
        + ", ".join(
            f"{v}: {traffic.clicks[v]}/{n} ({traffic.clicks[v] / n:.1%})"
            for v, n in sorted(traffic.versions.items())
            if v != "-" and n
        )
        + (f"; feedback errors {dict(traffic.feedback_errors)}" if traffic.feedback_errors else "")
    )
    if token and status.get("verdicts"):
        lift = next((v for v in status["verdicts"] if v.get("gate") == "improvement"), None)
        if lift is not None and lift.get("conclusion") in ("better", "worse"):
            print(f"  the A/B test says v2 performs {lift['conclusion']}: {lift['reason']}")
    if args.faulty and rolled_back and onset:
        print(f"  rolled back automatically {rolled_back - onset:.2f}s after v2 first got traffic")
    if token:
        for event in client_events(args.url, headers)[-3:]:
            print(f"  event: {event['from_phase']} -> {event['to_phase']}: {event['reason']}")
    expected = "rolled_back" if (args.faulty or args.worse) else "succeeded"
    return 0 if phase == expected or not token else 1


def client_events(url: str, headers: dict) -> list[dict]:
    return httpx.get(f"{url}/admin/rollout/history", headers=headers, timeout=10).json()["events"]


if __name__ == "__main__":
    sys.exit(main())

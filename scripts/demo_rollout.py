"""`make demo`'s rollout and `make demo-rollback`: declare a plan with `serve deploy`, drive
synthetic traffic from many users, and print the rollout as it happens.

    demo_rollout.py --plan configs/rollouts/demo-canary.yaml
    demo_rollout.py --plan configs/rollouts/demo-canary.yaml --faulty   # v2 fails 50%: rollback
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import yaml

from app.admin import load_admin_token
from app.config import FaultInjection, load_model_config
from app.declare import declare_plan, load_plan

TERMINAL = {"succeeded", "rolled_back", "aborted"}
BODY = {
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["loves science fiction films"]},
        {"name": "items", "datatype": "BYTES", "shape": [3],
         "data": ["an epic space opera", "a pasta cooking show", "a jazz documentary"]},
    ]
}  # fmt: skip


class Traffic:
    """Client threads with random user ids; counts responses by status and serving version."""

    def __init__(self, url: str, clients: int) -> None:
        self.url, self.stop = url, threading.Event()
        self.codes: Counter = Counter()
        self.versions: Counter = Counter()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v2/models/recommender/infer", json=BODY,
                                    headers={"x-user-id": f"user-{rng.randrange(1_000_000)}"})  # fmt: skip
                    code, version = r.status_code, r.headers.get("x-model-version", "-")
                except httpx.HTTPError as exc:
                    code, version = type(exc).__name__, "-"
                with self.lock:
                    self.codes[code] += 1
                    self.versions[version] += 1

    def start(self) -> Traffic:
        for t in self.threads:
            t.start()
        return self

    def finish(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


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
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()

    token = load_admin_token()
    headers = {"authorization": f"Bearer {token}"} if token else {}
    config = yaml.safe_load(Path(args.config).read_text())
    plan = load_plan(Path(args.plan))
    declared = declare_plan(config, None)
    app = declared["applications"][0]
    if args.faulty:  # v2 as its model config declares it, but failing half its requests
        v2 = load_model_config("configs/models/recommender/v2.yaml").user_config()
        faulty = v2.model_copy(update={"faults": FaultInjection(error_rate=0.5)})
        app["deployments"].append({"name": "recommender-v2", "user_config": faulty.model_dump(mode="json")})
    state = Path(".ray-demo")
    state.mkdir(exist_ok=True)
    # Reset first (no plan: routers follow serve_config.yaml's own split; v2's faults as
    # asked), so declaring the plan below always starts a new rollout generation.
    serve_deploy(declared, args.dashboard, state / "serve_config.reset.yaml")
    time.sleep(2)
    traffic = Traffic(args.url, args.clients).start()
    time.sleep(2)
    print(f"  traffic: {args.clients} clients, random user ids; declaring {args.plan}"
          + (" with v2 failing 50% of requests" if args.faulty else ""), flush=True)
    serve_deploy(declare_plan(declared, plan), args.dashboard, state / "serve_config.rollout.yaml")
    started = time.monotonic()
    onset = rolled_back = paused_since = None
    last = None
    with httpx.Client(base_url=args.url, timeout=10) as client:
        while time.monotonic() - started < args.timeout:
            weights = client.get("/status").json()["weights"]
            status = client.get("/admin/rollout", headers=headers).json() if token else {}
            phase = status.get("phase", "?")
            if onset is None and weights.get("v2", 0) > 0:
                onset = time.monotonic()
            if onset is not None and rolled_back is None and phase == "rolled_back":
                rolled_back = time.monotonic()
            line = (f"  [{time.monotonic() - started:5.1f}s] {phase:<11} step {status.get('step_index', '?')}"
                    f"/{status.get('steps_total', '?')} ({status.get('step', '?')}): "
                    + "  ".join(f"{v} {w:g}%" for v, w in sorted(weights.items())))
            if line.split("] ", 1)[1] != last:
                print(line, flush=True)
                last = line.split("] ", 1)[1]
            if phase in TERMINAL:
                break
            paused_since = (paused_since or time.monotonic()) if phase == "paused" else None
            if paused_since is not None and time.monotonic() - paused_since > 5:
                print("  the rollout paused (analysis inconclusive or waiting for promote): "
                      "`rollout promote` accepts the step, `rollout resume` re-runs it", flush=True)
                break
            time.sleep(0.1)
    time.sleep(1)
    traffic.finish()
    sent = sum(traffic.codes.values())
    failed = sum(n for code, n in traffic.codes.items() if code != 200)
    print(f"  clients: {sent} requests, {failed} failed; served by "
          + ", ".join(f"{v}: {n}" for v, n in sorted(traffic.versions.items())))
    if args.faulty and rolled_back and onset:
        print(f"  rolled back automatically {rolled_back - onset:.2f}s after v2 first got traffic")
    if token:
        for event in client_events(args.url, headers)[-3:]:
            print(f"  event: {event['from_phase']} -> {event['to_phase']}: {event['reason']}")
    return 0 if (phase == ("rolled_back" if args.faulty else "succeeded")) or not token else 1


def client_events(url: str, headers: dict) -> list[dict]:
    return httpx.get(f"{url}/admin/rollout/history", headers=headers, timeout=10).json()["events"]


if __name__ == "__main__":
    sys.exit(main())

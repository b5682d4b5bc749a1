"""Time to rollback: how long a faulty canary keeps its traffic before the controller pulls it.

    cd /work/main && .venv/bin/python -m bench.rollback [--trials N] [--json] [--smoke]

Starts a throwaway Ray of its own (`address="local"`, 4 logical CPUs, with the dashboard on a
free loopback port, because the declarative Serve API lives there) and Serve on a free loopback
port, builds two tiny random BERT artifacts (`tests.support.tiny_models.build_tiny_bert`),
and deploys the recommender app the way operators do: a serve config (import_path
`app.builder:build_app`) PUT to the dashboard's REST API (`ServeSubmissionClient
.deploy_applications`, what `serve deploy` calls). Versions:

* v1: healthy (the stable version);
* v2: `faults: {error_rate: 1.0}`: every request it receives fails.

The app's runtime_env sets ROLLOUT_ADMIN_TOKEN_FILE (a temp file with a random 32-character
token) so the router's admin API is on.

Steady load runs the whole time: 6 client threads (httpx, loopback, a random `x-user-id` per
request); every response that is not a 200 (and every transport error) is a client error.

Each trial re-deploys the same config with one change, the RolloutController's user_config:
a canary plan for v2, steps `[{set_weight: 20 + trial/100}, {analysis_s: 60}]` (the weight
differs per trial, so the plan digest changes and the controller starts a new rollout
generation in place: no replica restarts), gates `{min_requests: 10, fail_fast_min_requests: 5,
max_p99_latency_ratio: null}`. The router's GET /status is polled every 20 ms:

* onset    = the first poll whose `weights` give v2 > 0 (v2 fails every request from then on);
* rollback = the first poll after onset whose `weights` give v2 == 0;

and onset -> rollback is the trial's time. The controller's phase must then be `rolled_back`
for this trial's plan digest (GET /admin/rollout, bearer token). Between trials the state
settles: v2 at 0, phase rolled_back, and the router's v2 breaker out of its open cool-down.

With one router replica the time includes the router's 250 ms stats push interval, the
controller's 250 ms tick (`tick_interval_s: 0.25`) and the long-poll push back to the router.

Prints one JSON object (stdout) with trials, median_s, p90_s, max_s, times_s, client_errors,
requests_sent, machine, ray_version, wall_s (and a few details); without --json, one JSON line
per trial comes before it. Progress on stderr. Exit status
1 if any trial failed to roll back or any client request failed.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

from app.rollout import RolloutPlan  # noqa: E402
from bench.common import cpu_count, log  # noqa: E402
from bench.localapp import APP, TICK_S, LocalApp, wait_for, with_user_configs  # noqa: E402 - sets RAY_AUTH_MODE first
from tests.support import loadgen  # noqa: E402

CANDIDATE, STABLE = "v2", "v1"
CLIENTS = 6
POLL_S = 0.02
GATES = {"min_requests": 10, "fail_fast_min_requests": 5, "max_p99_latency_ratio": None}
BODY = {
    "inputs": [
        {
            "name": "user",
            "datatype": "BYTES",
            "shape": [1],
            "data": ["user loves science fiction films"],
        },
        {
            "name": "items",
            "datatype": "BYTES",
            "shape": [2],
            "data": ["space opera", "cooking show"],
        },
    ]
}


def with_plan(config: dict[str, Any], plan: dict[str, Any] | None) -> dict[str, Any]:
    return with_user_configs(config, RolloutController={"plan": plan, "tick_interval_s": TICK_S})


def trial_plan(index: int) -> dict[str, Any]:
    weight = 20 + index / 100  # a new digest per trial: a new rollout generation
    return {
        "strategy": "canary",
        "candidate": CANDIDATE,
        "stable": STABLE,
        "canary": {"steps": [{"set_weight": weight}, {"analysis_s": 60}]},
        "gates": GATES,
    }


# -- load --------------------------------------------------------------------------------------


class Load(loadgen.Load):
    """CLIENTS threads sending inference with random user ids (tests/support/loadgen.py);
    every non-200 is a client error, kept with the time it happened."""

    def __init__(self, url: str) -> None:
        self.served_by: Counter[str] = Counter()
        self.fallbacks = 0
        super().__init__(url, self._infer, CLIENTS)

    def _infer(self, client: httpx.Client, rng: random.Random, index: int) -> str | None:
        try:
            r = client.post(f"/v2/models/{APP}/infer", json=BODY,
                            headers={"x-user-id": f"user-{rng.randrange(1_000_000)}"})  # fmt: skip
        except httpx.HTTPError as exc:
            return f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"
        version, fallback = r.headers.get("x-model-version"), r.headers.get("x-fallback-from")
        with self.lock:
            if version:
                self.served_by[version] += 1
            if fallback:
                self.fallbacks += 1
        return (
            None
            if r.status_code == 200
            else f"{time.strftime('%H:%M:%S')} {r.status_code} {r.text[:200]}"
        )

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.sent, len(self.errors)


# -- one trial ---------------------------------------------------------------------------------


def v2_weight(client: httpx.Client) -> tuple[float, dict[str, Any]]:
    status = client.get("/status").json()
    return float(status["weights"].get(CANDIDATE, 0)), status


def run_trial(index: int, client: httpx.Client, admin: Callable[[], dict[str, Any]],
              deploy: Callable[[dict[str, Any]], None], load: Load) -> dict[str, Any]:  # fmt: skip
    plan = trial_plan(index)
    digest = RolloutPlan.model_validate(plan).digest()
    sent0, errors0 = load.snapshot()
    declared = time.monotonic()
    deploy(plan)
    deployed_s = time.monotonic() - declared

    # Onset: the first /status poll with v2 > 0.
    deadline = time.monotonic() + 60
    breaker_at_onset = None
    while True:
        weight, status = v2_weight(client)
        if weight > 0:
            onset = time.monotonic()
            breaker_at_onset = status["versions"][CANDIDATE]["breaker"]["state"]
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"trial {index}: v2 got no traffic within 60s of the deploy (plan {digest})"
            )
        time.sleep(POLL_S)
    onset_weight = weight

    # Rollback: the first poll after onset with v2 == 0.
    polls = 0
    while True:
        time.sleep(POLL_S)
        polls += 1
        weight, _ = v2_weight(client)
        if weight == 0:
            rollback = time.monotonic()
            break
        if time.monotonic() - onset > 30:
            raise RuntimeError(f"trial {index}: v2 still at {weight}% 30s after onset")
    seconds = rollback - onset

    # The controller's verdict for this trial's plan.
    state = wait_for(lambda: (s := admin())["plan_digest"] == digest and s["phase"] != "progressing" and s,
                     timeout_s=10, interval_s=0.1, what=f"trial {index}: the controller's verdict")  # fmt: skip
    if state["phase"] != "rolled_back":
        raise RuntimeError(
            f"trial {index}: the controller's phase is {state['phase']}, not rolled_back: {state}"
        )
    sent1, errors1 = load.snapshot()
    return {
        "trial": index,
        "seconds": round(seconds, 3),
        "onset_weight": onset_weight,
        "plan_digest": digest,
        "deploy_call_s": round(deployed_s, 3),
        "declare_to_onset_s": round(onset - declared, 3),
        "polls": polls,
        "breaker_at_onset": breaker_at_onset,
        "candidate_requests": state["versions"].get(CANDIDATE, {}).get("requests"),
        "requests": sent1 - sent0,
        "errors": errors1 - errors0,
    }


def settle(client: httpx.Client, admin: Callable[[], dict[str, Any]]) -> None:
    """v2 at 0 on the router, the controller terminal, the router's v2 breaker not cooling down."""

    def settled() -> bool:
        weight, status = v2_weight(client)
        breaker = status["versions"][CANDIDATE]["breaker"]
        return weight == 0 and admin()["phase"] == "rolled_back" and breaker["state"] != "open"

    wait_for(settled, timeout_s=30, interval_s=0.2, what="the state to settle")
    time.sleep(0.5)


# -- main --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollback", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="rollouts to time (default 20; --smoke 3)"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="only the JSON object on stdout (without it, one line per trial comes first)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="3 trials: checks that the bench works"
    )
    args = parser.parse_args(argv)
    trials = args.trials or (3 if args.smoke else 20)
    if trials < 1:
        parser.error("--trials must be at least 1")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    app = LocalApp()
    results: list[dict[str, Any]] = []
    failure: str | None = None
    load: Load | None = None
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        from tests.support.tiny_models import build_tiny_bert
        from tests.support.tiny_models import write_model_config as model_config

        log("building two tiny BERT artifacts")
        healthy = build_tiny_bert(tmp / "tiny-a", seed=0)
        faulty = build_tiny_bert(tmp / "tiny-b", seed=1)
        versions = [
            model_config(tmp, "v1", healthy),
            model_config(tmp, "v2", faulty, faults={"error_rate": 1.0}),
        ]
        app.start(tmp, versions, router={"stable": STABLE, "weights": {STABLE: 100}})
        config, client, admin = app.config, app.client, app.admin

        def deploy(plan: dict[str, Any] | None) -> None:
            app.deploy(with_plan(config, plan))

        replicas_before = app.replica_ids()
        base_url = app.url
        probe = client.post(f"/v2/models/{APP}/infer", json=BODY)
        if probe.status_code != 200 or probe.headers.get("x-model-version") != STABLE:
            raise RuntimeError(f"the first request failed: {probe.status_code} {probe.text[:300]}")
        if admin()["phase"] != "idle":
            raise RuntimeError(f"the controller is not idle before the first trial: {admin()}")
        log(f"deployed in {time.perf_counter() - started:.0f}s; admin API answers (phase idle)")

        with Load(base_url) as load:
            time.sleep(2.0)  # warm up: every client thread connected and served
            log(f"load: {CLIENTS} client threads; {load.snapshot()[0]} requests in the 2 s warm-up")
            for index in range(trials):
                try:
                    result = run_trial(index, client, admin, deploy, load)
                except Exception as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    log(f"trial {index + 1}/{trials} failed: {failure}")
                    break
                results.append(result)
                log(f"trial {index + 1}/{trials}: rollback {result['seconds']:.3f}s after onset "
                    f"(weight {result['onset_weight']:g}%, breaker at onset {result['breaker_at_onset']}, "
                    f"{result['candidate_requests']} v2 requests judged; declare->onset "
                    f"{result['declare_to_onset_s']:.2f}s; {result['requests']} requests, {result['errors']} errors)")  # fmt: skip
                if index + 1 < trials:
                    settle(client, admin)
            time.sleep(0.5)
        replicas_after = app.replica_ids()
    finally:
        if load is not None:
            load.stop.set()
        app.close()
        sys.stdout = stdout

    times = [r["seconds"] for r in results]
    assert load is not None
    result: dict[str, Any] = {
        "trials": len(results),
        "median_s": percentile(times, 50) if times else None,
        "p90_s": percentile(times, 90) if times else None,
        "max_s": max(times) if times else None,
        "min_s": min(times) if times else None,
        "times_s": times,
        "client_errors": len(load.errors),
        "requests_sent": load.sent,
        "served_by": dict(load.served_by),
        "fallbacks": load.fallbacks,
        "replicas_restarted": replicas_before != replicas_after,
        "smoke": args.smoke,
        "machine": f"{platform.system()} {platform.release()} {platform.machine()}, {cpu_count()} CPUs, "
        f"python {platform.python_version()}",  # fmt: skip
        "ray_version": ray.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if load.errors:
        result["client_error_messages"] = load.errors[:20]
    if failure:
        result["failure"] = failure
    if not args.json:  # per-trial details first; the JSON object is the last line
        for r in results:
            print(json.dumps(r))
    print(json.dumps(result), flush=True)
    if load.errors:
        log(f"{len(load.errors)} client errors; first: {load.errors[:5]}")
    if replicas_before != replicas_after:
        log(f"replicas changed during the run: {replicas_before} -> {replicas_after}")
    return 1 if (failure or load.errors or len(results) < trials) else 0


if __name__ == "__main__":
    sys.exit(main())

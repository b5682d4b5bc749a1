"""Time to rollback: how long a faulty canary keeps its traffic before the controller pulls it.

    cd /work/main && .venv/bin/python -m bench.rollback [--trials N] [--json] [--smoke]
                                                  [--feedback-flood RATE [--flood-batch B]]

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

`--feedback-flood RATE` (issue 18 item 6: a flood of feedback must not delay a rollback) makes
it a paired run: trials alternate between no flood and a flood, so both conditions share one
app, one load and the same drift; each condition gets `--trials` trials. During a flood trial,
`FLOOD_THREADS` threads POST feedback batches of `--flood-batch` items (default 100) to
/v2/models/recommender/feedback with the feedback token (`Authorization: Bearer`,
ROLLOUT_FEEDBACK_TOKEN_FILE in the app's env), paced to RATE items/s in all. The flood starts
1 s before the trial's declaration and stops once the trial is timed. Each item names the
request id of one of the last 2,000 answers (the load sends a unique `x-request-id` per
request), outcome `click`, true for 1 in 10; the controller counts it, finds it a duplicate, or
excludes it (an answer from before the trial's rollout began, or a fallback answer), after
the same lookups either way; only a counted one is added to the outcome book
(`items_by_result` counts them). The Router's per-client feedback limit (router.feedback_rate_per_s, 1,000
items/s by default, burst 5,000) would answer 429 to part of a 1,000/s flood from one address,
so the app's router args raise it to 100 x RATE (burst 10 x RATE) for this run: the whole flood
reaches the controller. The JSON's top-level figures are then the no-flood trials, and
`feedback_flood` holds the flood trials' figures and what the flood achieved.

Where the time goes: probes (bench/propagation.py `ReplicaProbes`, Ray's `__ray_call__` into the
replicas) record, on this host's monotonic clock, each controller publish and router apply,
each stats report the controller receives (requests and errors per version), each tick and
store write (`_persist`) with its duration, each feedback batch counted (`FeedbackDesk.count`)
with its duration, and the controller loop's lag (a 10 ms sleeper's lateness). `breakdown`
(medians per condition) splits a trial into: onset published -> applied by the router
(`onset_apply_ms`), -> the controller holds `fail_fast_min_requests` v2 errors (`evidence_s`),
-> the tick that rolls back starts (`tick_wait_ms`), -> the rollback published
(`tick_to_publish_ms`), -> applied by the router (`publish_to_apply_ms`); `router_s` is the whole
span on the router, and `requests_per_s` / `candidate_requests_per_s` what the router reported
meanwhile. `controller_loop` gives the tick period and duration, store writes, feedback counted
(ms of loop per s, us per item) and loop lag over the trials; `cores_used` the CPU (from /proc)
of the bench driver, Serve's proxy, the Router, the controller, the model replicas and Ray's
daemons over the trials, in cores.

Prints one JSON object (stdout) with trials, median_s, p90_s, max_s, times_s, client_errors,
requests_sent, machine, ray_version, wall_s (and a few details); without --json, one JSON line
per trial comes before it. Progress on stderr. Exit status
1 if any trial failed to roll back or any client request failed.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import ray  # noqa: E402

from app.rollout import RolloutPlan  # noqa: E402
from bench.common import bench_parser, log, machine  # noqa: E402
from bench.localapp import APP, TICK_S, LocalApp, serve_config, wait_for, with_user_configs  # noqa: E402 - sets RAY_AUTH_MODE first
from bench.propagation import ReplicaProbes  # noqa: E402
from tests.support import loadgen  # noqa: E402

CANDIDATE, STABLE = "v2", "v1"
CLIENTS = 6
POLL_S = 0.02
GOAL_S = 1.0  # issue 18 item 6: median rollback <= 1 s, with and without a feedback flood
FLOOD_MIN_SHARE = 0.5  # of the flood's rate the Router must accept, or the run fails
FLOOD_THREADS = 4
FLOOD_WARMUP_S = 1.0
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
        self.answered: deque[str] = deque(maxlen=5000)  # recent request ids, for feedback
        super().__init__(url, self._infer, CLIENTS)

    def _infer(self, client: httpx.Client, rng: random.Random, index: int) -> str | None:
        request_id = uuid.uuid4().hex
        try:
            r = client.post(f"/v2/models/{APP}/infer", json=BODY,
                            headers={"x-user-id": f"user-{rng.randrange(1_000_000)}",
                                     "x-request-id": request_id})  # fmt: skip
        except httpx.HTTPError as exc:
            return f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}"
        version, fallback = r.headers.get("x-model-version"), r.headers.get("x-fallback-from")
        with self.lock:
            if version:
                self.served_by[version] += 1
            if fallback:
                self.fallbacks += 1
            if r.status_code == 200:
                self.answered.append(request_id)
        return (
            None
            if r.status_code == 200
            else f"{time.strftime('%H:%M:%S')} {r.status_code} {r.text[:200]}"
        )

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.sent, len(self.errors)


# -- feedback flood ----------------------------------------------------------------------------


class Flood:
    """FLOOD_THREADS threads POSTing feedback batches, paced together to `rate` items/s while
    `active` is set. Counts POSTs by status, items by result, and each POST's round trip."""

    def __init__(self, url: str, token: str, rate: float, batch: int, load: Load) -> None:
        self.url, self.rate, self.batch, self.load = url, rate, batch, load
        self.headers = {"authorization": f"Bearer {token}"}
        self.active = threading.Event()
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.next_at = 0.0  # when the next batch is due (time.monotonic)
        self.statuses: Counter[str] = Counter()
        self.first_error: str | None = None  # the first answer that was not 200, for the report
        self.results: Counter[str] = Counter()
        self.items_sent = self.items_accepted = 0
        self.post_ms: list[float] = []
        self.active_s = 0.0
        self._since: float | None = None
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                        for i in range(FLOOD_THREADS)]  # fmt: skip

    def __enter__(self) -> Flood:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.off()
        self.stop.set()
        for t in self.threads:
            t.join()

    def on(self) -> None:
        with self.lock:
            self.next_at = time.monotonic()
            self._since = self.next_at
        self.active.set()

    def off(self) -> None:
        self.active.clear()
        with self.lock:
            if self._since is not None:
                self.active_s += time.monotonic() - self._since
                self._since = None

    def _slot(self) -> float:
        """When this thread's next batch is due: the schedule is shared, so together the
        threads send `rate` items/s; a schedule more than 1 s behind is not caught up."""
        with self.lock:
            now = time.monotonic()
            self.next_at = max(self.next_at, now - 1.0)
            due, self.next_at = self.next_at, self.next_at + self.batch / self.rate
            return due

    def _items(self, rng: random.Random) -> list[dict[str, Any]]:
        with self.load.lock:
            ids = list(self.load.answered)[-2000:]
        if not ids:
            ids = [uuid.uuid4().hex]
        return [{"request_id": rng.choice(ids), "outcome": "click", "value": rng.random() < 0.1}
                for _ in range(self.batch)]  # fmt: skip

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=self.url, timeout=30, headers=self.headers) as client:
            while not self.stop.is_set():
                if not self.active.wait(0.1):
                    continue
                delay = self._slot() - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                if not self.active.is_set():
                    continue
                items = self._items(rng)
                started = time.monotonic()
                try:
                    r = client.post(f"/v2/models/{APP}/feedback", json={"feedback": items})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    r, status = None, type(exc).__name__
                elapsed_ms = (time.monotonic() - started) * 1000
                results: Counter[str] = Counter()
                if r is not None and r.status_code == 200:
                    for item in r.json().get("results", []):
                        kind = ("counted" if item.get("counted") else "duplicate" if item.get("duplicate")
                                else "excluded" if item.get("excluded") else str(item.get("status", "other")))  # fmt: skip
                        results[kind] += 1
                with self.lock:
                    if self.first_error is None and status != "200":
                        self.first_error = f"{status} {r.text[:300] if r is not None else ''}"
                    self.statuses[status] += 1
                    self.items_sent += len(items)
                    self.items_accepted += len(items) if status == "200" else 0
                    self.results.update(results)
                    self.post_ms.append(elapsed_ms)

    def snapshot(self) -> tuple[int, int]:
        with self.lock:
            return self.items_sent, self.items_accepted

    def report(self) -> dict[str, Any]:
        with self.lock:
            posts = np.asarray(self.post_ms or [0.0])
            return {
                "rate_per_s": self.rate, "batch": self.batch, "threads": FLOOD_THREADS,
                "active_s": round(self.active_s, 1), "items_sent": self.items_sent,
                "items_accepted": self.items_accepted,
                "achieved_items_per_s": round(self.items_accepted / self.active_s, 1) if self.active_s else None,
                "posts_by_status": dict(self.statuses), "items_by_result": dict(self.results),
                "first_error": self.first_error,
                "post_ms": {"median": round(float(np.median(posts)), 2),
                            "p90": round(float(np.percentile(posts, 90)), 2),
                            "max": round(float(posts.max()), 2)},
            }  # fmt: skip


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
        "t_declared": declared,  # time.monotonic: where the trial sits in the controller's timeline
        "t_end": time.monotonic(),
    }


def settle(client: httpx.Client, admin: Callable[[], dict[str, Any]]) -> None:
    """v2 at 0 on the router, the controller terminal, the router's v2 breaker not cooling down."""

    def settled() -> bool:
        weight, status = v2_weight(client)
        breaker = status["versions"][CANDIDATE]["breaker"]
        return weight == 0 and admin()["phase"] == "rolled_back" and breaker["state"] != "open"

    wait_for(settled, timeout_s=30, interval_s=0.2, what="the state to settle")
    time.sleep(0.5)


# -- where the time goes -----------------------------------------------------------------------


def breakdown(trial: dict[str, Any], timeline: dict[str, list[Any]],
              publishes: list[tuple[int, float, dict[str, float]]],
              applied: dict[str, dict[int, float]]) -> dict[str, Any]:  # fmt: skip
    """One trial's rollback split into its parts, from the probes (bench/propagation.py) in the
    controller and the router, all on this host's monotonic clock:

    onset_apply_ms: the controller published v2 > 0 -> the router applied it;
    evidence_s: the router applied it -> the controller had received GATES
        fail_fast_min_requests v2 errors (the router's stats pushes);
    tick_wait_ms: -> the start of the tick that rolled back;
    tick_to_publish_ms: that tick's start -> the rollback published (its store writes);
    publish_to_apply_ms: -> the router applied v2 = 0;
    router_s: the router applied v2 > 0 -> it applied v2 = 0 (what /status shows, less polling).
    """
    start, end = trial["t_declared"], trial["t_end"]
    mine = [(g, t, w) for g, t, w in publishes if start <= t <= end]
    onset = next(((g, t) for g, t, w in mine if w.get(CANDIDATE, 0) > 0), None)
    if onset is None:
        return {}
    back = next(((g, t) for g, t, w in mine if t > onset[1] and w.get(CANDIDATE, 0) == 0), None)
    if back is None:
        return {}

    def applied_at(generation: int) -> float | None:
        return max((a[generation] for a in applied.values() if generation in a), default=None)

    onset_applied, back_applied = applied_at(onset[0]), applied_at(back[0])
    need, errors, evidence_at = GATES["fail_fast_min_requests"], 0, None
    requests = candidate_requests = 0
    for t, counts in timeline.get("reports", []):
        if onset[1] <= t <= back[1]:
            errors += counts.get(CANDIDATE, (0, 0))[1]
            candidate_requests += counts.get(CANDIDATE, (0, 0))[0]
            requests += sum(n for n, _ in counts.values())
            if errors >= need and evidence_at is None:
                evidence_at = t
    tick = next(((t0, d) for t0, d in timeline.get("ticks", []) if t0 <= back[1] <= t0 + d), None)
    out: dict[str, Any] = {"onset_generation": onset[0], "rollback_generation": back[0]}
    # What the router reported while v2 had traffic: requests/s in all, and to v2.
    out["requests_per_s"] = round(requests / (back[1] - onset[1]), 1)
    out["candidate_requests_per_s"] = round(candidate_requests / (back[1] - onset[1]), 1)
    if onset_applied is not None:
        out["onset_apply_ms"] = round((onset_applied - onset[1]) * 1000, 1)
    if onset_applied is not None and back_applied is not None:
        out["router_s"] = round(back_applied - onset_applied, 3)
    if evidence_at is not None and onset_applied is not None:
        out["evidence_s"] = round(evidence_at - onset_applied, 3)
    if tick is not None:
        if evidence_at is not None:
            out["tick_wait_ms"] = round((tick[0] - evidence_at) * 1000, 1)
        out["tick_to_publish_ms"] = round((back[1] - tick[0]) * 1000, 1)
    if back_applied is not None:
        out["publish_to_apply_ms"] = round((back_applied - back[1]) * 1000, 1)
    return out


def loop_figures(
    timeline: dict[str, list[Any]], windows: list[tuple[float, float]]
) -> dict[str, Any]:
    """The controller's loop during `windows` (time.monotonic spans): tick period and duration,
    store writes (_persist), feedback counted, and event-loop lag over 5 ms."""

    def inside(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    span = sum(b - a for a, b in windows) or 1.0
    ticks = sorted((t, d) for t, d in timeline.get("ticks", []) if inside(t))
    gaps = [b[0] - a[0] for a, b in zip(ticks, ticks[1:]) if b[0] - a[0] < 5]
    persists = [d for t, d in timeline.get("persists", []) if inside(t)]
    feedback = [(d, n) for t, d, n in timeline.get("feedback", []) if inside(t)]
    lags = [lag for t, lag in timeline.get("lags", []) if inside(t)]

    def ms(values: list[float], q: float) -> float | None:
        return round(float(np.percentile(np.asarray(values), q)) * 1000, 1) if values else None

    def spread(values: list[float]) -> dict[str, float | None]:
        return {"median": ms(values, 50), "p90": ms(values, 90), "max": ms(values, 100)}

    items = sum(n for _, n in feedback)
    busy = sum(d for d, _ in feedback)
    return {
        "seconds": round(span, 1),
        "tick_period_ms": spread(gaps),
        "tick_ms": spread([d for _, d in ticks]),
        "persist_ms": spread(persists),
        "feedback_batches_per_s": round(len(feedback) / span, 1),
        "feedback_items_per_s": round(items / span, 1),
        "feedback_count_ms_per_s": round(busy * 1000 / span, 1),
        "feedback_count_us_per_item": round(busy * 1e6 / items, 2) if items else None,
        "loop_lags_over_5ms_per_s": round(len(lags) / span, 2),
        "loop_lag_ms": {**spread(lags), "total_per_s": round(sum(lags) * 1000 / span, 1)},
    }


def cpu_by_role() -> dict[str, float]:
    """CPU seconds (user + system, from /proc) used so far by this process and the Ray processes
    it started (its descendants), by role: the bench driver (load, flood and poller threads),
    Serve's proxy, the Router, the controller, the model replicas, and Ray's own daemons."""
    tick = os.sysconf("SC_CLK_TCK")
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    command: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:  # gone meanwhile
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ..., utime, stime
        pid = int(entry)
        parent[pid], cpu[pid] = int(fields[1]), (int(fields[11]) + int(fields[12])) / tick
        command[pid] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    me, mine = os.getpid(), set()
    for pid in parent:
        p, seen = pid, 0
        while p > 1 and seen < 64:
            if p == me:
                mine.add(pid)
                break
            p, seen = parent.get(p, 0), seen + 1
    roles: Counter[str] = Counter()
    for pid in mine:
        cmd = command[pid]
        role = ("driver" if pid == me else "router" if ":Router" in cmd
                else "controller" if ":RolloutController" in cmd
                else "models" if f"ServeReplica:{APP}:" in cmd
                else "proxy" if "ProxyActor" in cmd else "ray")  # fmt: skip
        roles[role] += cpu[pid]
    return dict(roles)


def cpu_shares(trials: list[dict[str, Any]]) -> dict[str, float]:
    """Cores used per role over these trials (CPU seconds / wall seconds; 1.0 = one core)."""
    wall = sum(t.get("wall_s", 0.0) for t in trials) or 1.0
    total: Counter[str] = Counter()
    for t in trials:
        total.update(t.get("cpu_s", {}))
    return {k: round(v / wall, 3) for k, v in sorted(total.items())}


def phase_medians(trials: list[dict[str, Any]]) -> dict[str, float | None]:
    keys = ("onset_apply_ms", "evidence_s", "tick_wait_ms", "tick_to_publish_ms",
            "publish_to_apply_ms", "router_s", "requests_per_s", "candidate_requests_per_s")  # fmt: skip
    out: dict[str, float | None] = {}
    for key in keys:
        values = [t["breakdown"][key] for t in trials if key in t.get("breakdown", {})]
        out[key] = round(float(np.median(values)), 3) if values else None
    return out


# -- main --------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(np.asarray(values), q)), 3)


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "bench.rollback",
        __doc__,
        json_help="only the JSON object on stdout (without it, one line per trial comes first)",
    )
    parser.add_argument(
        "--trials", type=int, default=None, help="rollouts to time (default 20; --smoke 3)"
    )
    parser.add_argument(
        "--smoke", action="store_true", help="3 trials: checks that the bench works"
    )
    parser.add_argument("--feedback-flood", type=float, default=None, metavar="RATE",
                        help="paired run: every other trial under a flood of RATE feedback "
                        "items/s (e.g. 1000); --trials trials per condition")  # fmt: skip
    parser.add_argument("--flood-batch", type=int, default=100, metavar="B",
                        help="feedback items per POST during a flood (default 100)")  # fmt: skip
    args = parser.parse_args(argv)
    trials = args.trials or (3 if args.smoke else 20)
    if trials < 1:
        parser.error("--trials must be at least 1")
    flood_rate = args.feedback_flood
    if flood_rate is not None and (flood_rate <= 0 or not 1 <= args.flood_batch <= 1000):
        parser.error("--feedback-flood must be positive and --flood-batch in 1..1000")
    total = trials * 2 if flood_rate else trials
    # The Router's per-client feedback limit, raised so that the whole flood reaches the
    # controller (the flood comes from one address).
    router_args = ({"feedback_rate_per_s": flood_rate * 100, "feedback_burst": int(flood_rate * 10)}
                   if flood_rate else {})  # fmt: skip

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-rollback-"))
    app = LocalApp()
    results: list[dict[str, Any]] = []
    failure: str | None = None
    load: Load | None = None
    flood: Flood | None = None
    timeline: dict[str, list[Any]] = {}
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
        traffic = {"stable": STABLE, "weights": {STABLE: 100}}

        def build(http_port: int, env: dict[str, str]) -> dict[str, Any]:
            built = serve_config(versions, http_port, env, traffic)
            built["applications"][0]["args"]["router"] = router_args
            return built

        app.start(tmp, versions, router=traffic, build=build)
        config, client, admin = app.config, app.client, app.admin

        def deploy(plan: dict[str, Any] | None) -> None:
            app.deploy(with_plan(config, plan))

        replicas_before = app.replica_ids()
        probes = ReplicaProbes(app.details())
        probes.install()
        probes.install_timeline()
        base_url = app.url
        probe = client.post(f"/v2/models/{APP}/infer", json=BODY)
        if probe.status_code != 200 or probe.headers.get("x-model-version") != STABLE:
            raise RuntimeError(f"the first request failed: {probe.status_code} {probe.text[:300]}")
        if admin()["phase"] != "idle":
            raise RuntimeError(f"the controller is not idle before the first trial: {admin()}")
        log(f"deployed in {time.perf_counter() - started:.0f}s; admin API answers (phase idle)")

        with Load(base_url) as load:
            flood = Flood(base_url, app.feedback_token, flood_rate or 1.0, args.flood_batch, load)
            time.sleep(2.0)  # warm up: every client thread connected and served
            log(f"load: {CLIENTS} client threads; {load.snapshot()[0]} requests in the 2 s warm-up")
            with flood:
                for index in range(total):
                    flooded = bool(flood_rate) and index % 2 == 1
                    try:
                        items0 = flood.snapshot()[1]
                        if flooded:
                            flood.on()
                            time.sleep(FLOOD_WARMUP_S)  # the flood is steady before the declaration
                        cpu0, wall0 = cpu_by_role(), time.monotonic()
                        try:
                            result = run_trial(index, client, admin, deploy, load)
                        finally:
                            flood.off()
                        cpu1, wall1 = cpu_by_role(), time.monotonic()
                        result["cpu_s"] = {k: round(cpu1[k] - cpu0.get(k, 0.0), 3) for k in cpu1}
                        result["wall_s"] = round(wall1 - wall0, 3)
                        result["flood"] = flooded
                        if flooded:
                            result["flood_items_accepted"] = flood.snapshot()[1] - items0
                    except Exception as exc:
                        failure = f"{type(exc).__name__}: {exc}"
                        log(f"trial {index + 1}/{total} failed: {failure}")
                        break
                    results.append(result)
                    log(f"trial {index + 1}/{total}{' (feedback flood)' if flooded else ''}: rollback "
                        f"{result['seconds']:.3f}s after onset "
                        f"(weight {result['onset_weight']:g}%, breaker at onset {result['breaker_at_onset']}, "
                        f"{result['candidate_requests']} v2 requests judged; declare->onset "
                        f"{result['declare_to_onset_s']:.2f}s; {result['requests']} requests, {result['errors']} errors)")  # fmt: skip
                    if index + 1 < total:
                        settle(client, admin)
            time.sleep(0.5)
        replicas_after = app.replica_ids()
        timeline, publishes, applied = probes.timeline(), probes.publishes(), probes.applied()
        for r in results:
            r["breakdown"] = breakdown(r, timeline, publishes, applied)
    finally:
        if load is not None:
            load.stop.set()
        app.close()
        sys.stdout = stdout

    plain = [r for r in results if not r.get("flood")]
    flooded_trials = [r for r in results if r.get("flood")]
    times = [r["seconds"] for r in plain]
    flood_times = [r["seconds"] for r in flooded_trials]
    assert load is not None
    result: dict[str, Any] = {
        "trials": len(plain),
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
        "machine": machine(),
        "ray_version": ray.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
        # Where the time went (medians over the trials) and the controller's loop meanwhile.
        "breakdown": phase_medians(plain),
        "controller_loop": loop_figures(timeline, [(r["t_declared"], r["t_end"]) for r in plain]),
        "cores_used": cpu_shares(plain),
    }
    if flood_rate and flood is not None:
        result["feedback_flood"] = {
            "trials": len(flood_times),
            "median_s": percentile(flood_times, 50) if flood_times else None,
            "p90_s": percentile(flood_times, 90) if flood_times else None,
            "max_s": max(flood_times) if flood_times else None,
            "min_s": min(flood_times) if flood_times else None,
            "times_s": flood_times,
            **flood.report(),
            "router_args": router_args,
            "breakdown": phase_medians(flooded_trials),
            "cores_used": cpu_shares(flooded_trials),
            "controller_loop": loop_figures(
                timeline, [(r["t_declared"], r["t_end"]) for r in flooded_trials]
            ),
        }
        # A flood the Router refused (or whose items the controller failed on) measures nothing:
        # the run fails rather than report "with a flood" figures taken without one.
        achieved = result["feedback_flood"]["achieved_items_per_s"] or 0.0
        flood_reached = achieved >= FLOOD_MIN_SHARE * flood_rate
        if not flood_reached:
            failure = failure or (
                f"the feedback flood did not reach the controller: {achieved:g} of {flood_rate:g} "
                f"items/s accepted; first answer that was not 200: "
                f"{result['feedback_flood']['first_error']}"
            )
        result["goal_s"] = GOAL_S
        result["goal_met"] = {
            "without_flood": bool(times) and percentile(times, 50) <= GOAL_S,
            "with_flood": flood_reached
            and bool(flood_times)
            and percentile(flood_times, 50) <= GOAL_S,
        }
    if load.errors:
        result["client_error_messages"] = load.errors[:20]
    if failure:
        result["failure"] = failure
    if not args.json:  # per-trial details first; the JSON object is the last line
        for r in results:
            print(json.dumps({k: v for k, v in r.items() if k not in ("t_declared", "t_end")}))
    print(json.dumps(result), flush=True)
    if load.errors:
        log(f"{len(load.errors)} client errors; first: {load.errors[:5]}")
    if replicas_before != replicas_after:
        log(f"replicas changed during the run: {replicas_before} -> {replicas_after}")
    return 1 if (failure or load.errors or len(results) < total) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Chaos under a canary: a full rollout under steady load while replicas are killed at random.

    cd /work/main && .venv/bin/python -m bench.chaos [--json] [--seed N] [--duration S] [--smoke]
    rollout bench chaos --json

Modelled on Ray's chaos release tests (a killer that strikes at random intervals while a
workload runs, then the workload's outcome is checked) and on Serve's own failure tests (a
replica found by its actor name and killed with `ray.kill`; Serve replaces it).

A throwaway Ray + Serve (bench/localapp.py) runs the recommender app with two Router replicas
(`router_replicas: 2`) and two healthy versions (tiny random BERTs, v1 stable and v2 the
candidate, one replica each; `--real`: the demo's MiniLM configs; `--version-apps`: one
application per version, serve_config.yaml's layout, instead of one application). Steady load runs the whole
time: `--clients` threads (httpx, loopback, a random `x-user-id` and a unique `x-request-id` per
request). Then the RolloutController's user_config declares a canary of v2 (the REST PUT that
`serve deploy` sends): weights 10 -> 25 -> 50 -> 75, each step followed by an analysis sized
so the plan ends near the end of the chaos window, gates a healthy candidate passes (below),
auto-promote. From the declaration on, a chaos thread kills, for `--duration` seconds:

* a model replica of each version (v1 and v2),
* one of the two Router replicas,
* the RolloutController's replica,

one at a time, in a seeded random order (each round of four kinds shuffled by `--seed`'s RNG;
`--smoke` kills a Router first, so that its short run always has one), with a random pause
(uniform in `--interval`) after the previous kill was repaired. A kill is
`ray.kill(actor, no_restart=True)` of a RUNNING replica's actor, found by the `actor_name` in
Serve's details (namespace "serve"); Serve starts a replacement. The killer waits until every
deployment is back to its target number of RUNNING replicas before the next pause, so at most
one replica is down at a time and never both Routers. After the window, kills stop and the
bench waits (under load) for the rollout to end, then stops the load. The seed fixes the order
of the kinds, the pauses, the replica picked and the clients' user ids; not the outcome, which
depends on timing (which requests a kill catches, how long a repair takes).

Gates: min_requests 20 (smoke 5), max_error_rate 0.05, max_error_rate_increase 0.02,
fail_fast_error_rate 0.5 over >= 10 requests, max_p99_latency_ratio off: a kill makes the killed
version's next requests wait for its replacement replica (seconds), so a p99 ratio would judge
which version was killed last, not the candidate. The expected final phase is `succeeded`
(the candidate is healthy); `phase_as_expected` says whether the rollout ended there. The
bench waits for the rollout to end (a terminal phase) or to pause: with no pause step in the
plan and no operator, a pause is an analysis that ended with a gate still pending
(inconclusive), e.g. too few candidate requests because the load's closed-loop clients were
all waiting on the stable version's replacement replica.

Attribution: which failures are "the requests in flight on a Router replica when it was killed".

Each request is recorded with its start and end time (time.monotonic in this process), status,
body and request id. Each kill is recorded with `t_kill` (just before `ray.kill`) and `t_dead`
(the first moment a call to the actor's `__ray_ready__` fails: the actor is gone; polled every
20 ms, so t_dead - t_kill bounds when it died). A failed request (not 200, or a transport error)
is attributed to a Router kill K only when all of these hold:

1. the failure came from the ingress (HAProxy, or Serve's proxy with BENCH_SERVING=proxy), not
   from a Router: the Router answers every error as JSON `{"error": ...}`; a non-JSON error body
   (the ingress's plain-text 500 when the replica it called died) or a dropped connection is the
   ingress's. A JSON error came from a live Router, so it is
   never attributed to a kill;
2. it was in flight at K: it started at or before K's t_dead and ended at or after K's t_kill;
3. the proxy's log agrees, when it has a record for the request id: the lines Serve's proxy logged
   for that request (`Request failed: The actor died ...`) name K's actor (its actor id or its
   replica id, which is part of the actor's name).
   A record that names another actor vetoes the attribution; no record leaves 1 and 2 to decide.

One JSON error is attributed too: a Router's 408 "the request body did not arrive ... (0 bytes
read)" for a request in flight at K (rule 2). Serve's proxy had streamed the body to the killed
Router, then retried the request on the other one, whose body read found nothing and gave up at
the request's deadline (seen once in seed 3, after the fix below; no live client sends a body
of 0 bytes with a content-length). It is counted as in flight on the killed Router, with its
own cause, `body_lost_with_killed_router`.

4. (the ingress's reaction time) a failure that is not the Router's (rule 1), that started within
   DEAD_ROUTER_WINDOW_S (0.25 s) after a Router K was dead and that Serve's proxy has no log
   record for (behind HAProxy it never has: HAProxy's own log is not read) is a request the
   ingress sent to K before it took K out of rotation: HAProxy after `observe layer4` errors or
   a failed health check, and on a keep-alive connection it had open to K. It is a time window
   only. Behind Serve's proxy such a request has a log record and stays outside, as
   `sent_to_dead_router`. It counts as
   `failed_sent_to_dead_router` (per kill `failed_sent_after_death`), not as in flight and not
   as outside. HAProxy re-sends such a request to the other Router when K closed the connection
   without an answer (RAY_SERVE_HAPROXY_RETRY_ON, app/ops/serving_mode.py); what is left is
   counted here.

Everything else failed is `failed_outside_killed_router` and is listed in `outside_failures` with
its status, error text, timing, the nearest kill and the proxy's log lines. Among those, a proxy
error whose log names a killed Router but which started after that Router was dead is a request
the proxy sent to a dead replica before it heard of the death (`cause: sent_to_dead_router`).

Output: a table (default) or one JSON object (`--json`) with `requests`, `failed`,
`failed_outside_killed_router`, `failed_in_flight_on_killed_router`, `kills` (count per kind:
router, controller, model:v1, model:v2), `final_phase`, `expected_phase`, `phase_as_expected`,
`failures_by_status`, `max_failed_per_router_kill`, `latency_ms` and `requests_over_5s` (of the
answered requests: one that waited for a replacement replica is slow, not failed),
`kill_details` (per kill: time, kind, replica, death and repair times, requests in flight on any
Router, failures attributed, how many of those the proxy's log confirms, what those clients
got), `outside_failures`, `outside_causes`,
`served_by`, `fallbacks`, `rollout` (the controller's history and last verdicts), `plan`,
`seed`, `duration_s`, `clients`, `machine`, `ray_version`, `wall_s`. Progress on stderr.
Exit status 1 when the run broke (no kills, the rollout neither ended nor paused, an exception),
or with `--strict`
when a request failed outside a killed Router or the final phase is not the expected one.
"""

from __future__ import annotations

import json
import random
import re
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx  # noqa: E402
import ray  # noqa: E402

from app import ray_compat  # noqa: E402
from app.config import CONTROLLER_DEPLOYMENT, ROUTER_DEPLOYMENT  # noqa: E402
from bench.common import bench_parser, log, machine  # noqa: E402
from bench.localapp import (  # noqa: E402 - sets RAY_AUTH_MODE first
    APP,
    ROOT,
    TICK_S,
    LocalApp,
    serve_config,
    wait_for,
    with_user_configs,
)
from tests.support import loadgen  # noqa: E402

STABLE, CANDIDATE = "v1", "v2"
ROUTER_REPLICAS = 2
WEIGHTS = (10, 25, 50, 75)
EXPECTED_PHASE = "succeeded"  # both versions are healthy
# Where a rollout of this plan can come to rest: its terminal phases, or paused. Nothing here
# pauses it (no `pause_s: null` step, no pause command), so a pause is an analysis that ended
# with a gate still pending (inconclusive: too little evidence); it waits for an operator.
ENDED = ("succeeded", "rolled_back", "aborted", "paused")
KINDS = ("router", "controller", f"model:{STABLE}", f"model:{CANDIDATE}")
DEAD_POLL_S = 0.02
# Rule 4 (module docstring): how long after a Router died a request sent to it counts as the
# ingress not having taken it out yet. Measured under HAProxy: 0.03-0.05 s after the death.
DEAD_ROUTER_WINDOW_S = 0.25
BODY = {
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["user loves space opera"]},
        {"name": "items", "datatype": "BYTES", "shape": [2], "data": ["space opera", "cooking show"]},
    ]
}  # fmt: skip


def gates(smoke: bool) -> dict[str, Any]:
    return {
        "min_requests": 5 if smoke else 20,
        "max_error_rate": 0.05,
        "max_error_rate_increase": 0.02,
        "max_p99_latency_ratio": None,  # see the module docstring
        "fail_fast_error_rate": 0.5,
        "fail_fast_min_requests": 10,
    }


def canary_plan(duration_s: float, smoke: bool) -> dict[str, Any]:
    """Weights 10 -> 25 -> 50 -> 75, an analysis after each; ends near the chaos window's end."""
    analysis_s = round(max(4.0, duration_s * 0.8 / len(WEIGHTS)), 1)
    steps: list[dict[str, Any]] = []
    for weight in WEIGHTS:
        steps += [{"set_weight": weight}, {"analysis_s": analysis_s}]
    return {"strategy": "canary", "candidate": CANDIDATE, "stable": STABLE,
            "canary": {"steps": steps}, "gates": gates(smoke), "auto_promote": True}  # fmt: skip


# -- load: every request recorded --------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One request as the client saw it; times are time.monotonic() in this process."""

    request_id: str
    start: float
    end: float
    status: int | None  # None: a transport error (no HTTP response)
    version: str | None = None  # x-model-version
    fallback: str | None = None  # x-fallback-from / x-fallback-reason
    error: str | None = None  # the error body or transport error, trimmed
    router_error: bool = False  # a JSON {"error": ...} body: a Router answered it

    @property
    def failed(self) -> bool:
        return self.status != 200


class Load(loadgen.Load):
    """Client threads (tests/support/loadgen.py) that keep every request's record."""

    def __init__(self, url: str, clients: int, seed: int) -> None:
        self.records: list[Sent] = []
        self.counter = 0
        super().__init__(url, self._infer, clients, seed=seed)

    def _infer(self, client: httpx.Client, rng: random.Random, index: int) -> str | None:
        with self.lock:
            self.counter += 1
            request_id = f"chaos-{index}-{self.counter}"
        headers = {"x-user-id": f"user-{rng.randrange(1_000_000)}", "x-request-id": request_id}
        start = time.monotonic()
        try:
            r = client.post(f"/v2/models/{APP}/infer", json=BODY, headers=headers)
        except httpx.HTTPError as exc:
            sent = Sent(request_id, start, time.monotonic(), None,
                        error=f"{type(exc).__name__}: {exc}"[:300])  # fmt: skip
        else:
            end = time.monotonic()
            fallback = r.headers.get("x-fallback-from")
            if fallback:
                fallback = f"{fallback}:{r.headers.get('x-fallback-reason', 'error')}"
            error, router_error = None, False
            if r.status_code != 200:
                error = r.text[:300]
                try:
                    body = r.json()
                except ValueError:  # not JSON: the proxy's own plain-text answer
                    body = None
                router_error = isinstance(body, dict) and "error" in body
            sent = Sent(request_id, start, end, r.status_code, r.headers.get("x-model-version"),
                        fallback, error, router_error)  # fmt: skip
        with self.lock:
            self.records.append(sent)
        return None if not sent.failed else sent.error


# -- chaos: find a replica by its actor name, kill it, time its death and repair --------------------


@dataclass
class Kill:
    kind: str  # router, controller, model:<version>
    deployment: str
    replica_id: str
    actor_id: str | None
    actor_name: str
    t_kill: float  # just before ray.kill
    t_dead: float | None = None  # first failed call to the actor
    t_repaired: float | None = None  # every deployment back at its target RUNNING replicas
    attributed: list[str] = field(default_factory=list)  # request ids failed in flight
    # request ids sent just after its death, before the ingress took it out (rule 4)
    sent_after_death: list[str] = field(default_factory=list)
    confirmed: int = 0  # of those, how many the proxy's log names this actor for
    answers: Counter[str] = field(default_factory=Counter)  # what those clients got

    def summary(self, t0: float, records: list[Sent]) -> dict[str, Any]:
        dead = self.t_dead if self.t_dead is not None else self.t_kill
        in_flight = sum(1 for s in records if s.start <= dead and s.end >= self.t_kill)
        return {
            "t_s": round(self.t_kill - t0, 2),
            "kind": self.kind,
            "replica": self.replica_id,
            "dead_after_ms": None if self.t_dead is None else round((self.t_dead - self.t_kill) * 1000),
            "repaired_after_s": None if self.t_repaired is None else round(self.t_repaired - self.t_kill, 2),
            "in_flight": in_flight,
            "failed_in_flight": len(self.attributed),
            "failed_sent_after_death": len(self.sent_after_death),
            "confirmed_by_proxy_log": self.confirmed,
            "failed_as": dict(self.answers),
        }  # fmt: skip


def kind_of(deployment: str) -> str | None:
    if deployment == ROUTER_DEPLOYMENT:
        return "router"
    if deployment == CONTROLLER_DEPLOYMENT:
        return "controller"
    prefix = f"{APP}-"
    if deployment.startswith(prefix):  # ModelServer "<model>-<version>" (either layout)
        return f"model:{deployment[len(prefix) :]}"
    return None


def deployments(details: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """kind -> the deployment's details (with "app" and "name" added), for every app."""
    found = {}
    for app_name, app in (details.get("applications") or {}).items():
        for name, d in (app.get("deployments") or {}).items():
            kind = kind_of(name)
            if kind is not None:
                found[kind] = {**d, "app": app_name, "name": name}
    return found


def whole(details: dict[str, Any]) -> bool:
    """Every deployment at its target number of RUNNING replicas, and nothing else starting."""
    for d in deployments(details).values():
        replicas = d.get("replicas") or []
        running = [r for r in replicas if r.get("state") == "RUNNING"]
        if len(running) < d.get("target_num_replicas", 1) or len(running) != len(replicas):
            return False
    return True


class Chaos(threading.Thread):
    """Kill one replica of a random kind, wait for Serve to repair it, pause, repeat."""

    def __init__(self, app: LocalApp, seed: int, interval_s: tuple[float, float],
                 stop: threading.Event, router_first: bool = False) -> None:  # fmt: skip
        super().__init__(name="chaos", daemon=True)
        self.app, self.rng, self.interval_s, self.stop = app, random.Random(seed), interval_s, stop
        self.router_first = router_first  # --smoke: a short run still kills a Router
        self.kills: list[Kill] = []
        self.errors: list[str] = []

    def run(self) -> None:
        order: list[str] = []
        while not self.stop.wait(self.rng.uniform(*self.interval_s)):
            if not order:
                order = list(KINDS)
                self.rng.shuffle(order)
                if self.router_first and not self.kills:
                    order.remove("router")
                    order.append("router")  # popped first
            kind = order.pop()
            try:
                self.kills.append(self.kill(kind))
            except Exception as exc:  # keep killing; the report lists what went wrong
                self.errors.append(f"{kind}: {type(exc).__name__}: {exc}")
                log(f"chaos: {kind} kill failed: {exc!r}")

    def kill(self, kind: str) -> Kill:
        target = deployments(self.app.details())[kind]
        running = sorted(
            (r for r in target.get("replicas") or [] if r.get("state") == "RUNNING"),
            key=lambda r: r["replica_id"],
        )
        replica = self.rng.choice(running)
        actor = ray.get_actor(replica["actor_name"], namespace="serve")
        kill = Kill(kind, target["name"], replica["replica_id"], replica.get("actor_id"),
                    replica["actor_name"], time.monotonic())  # fmt: skip
        ray.kill(actor, no_restart=True)
        deadline = kill.t_kill + 10
        while time.monotonic() < deadline:
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=1)
            except ray.exceptions.GetTimeoutError:
                continue
            except Exception:  # RayActorError: it is gone
                kill.t_dead = time.monotonic()
                break
            time.sleep(DEAD_POLL_S)
        log(f"chaos: killed {kind} replica {kill.replica_id} "
            f"(dead after {((kill.t_dead or kill.t_kill) - kill.t_kill) * 1000:.0f} ms)")  # fmt: skip
        wait_for(lambda: self._repaired(kill), timeout_s=120, interval_s=0.2,
                 what=f"Serve to replace the {kind} replica")  # fmt: skip
        kill.t_repaired = time.monotonic()
        log(f"chaos: {kind} repaired {kill.t_repaired - kill.t_kill:.1f}s after the kill")
        return kill

    def _repaired(self, kill: Kill) -> bool:
        details = self.app.details()
        ids = [r["replica_id"] for r in deployments(details)[kill.kind].get("replicas") or []]
        return kill.replica_id not in ids and whole(details)


# -- attribution -----------------------------------------------------------------------------------

_LOG_RECORD = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) \d{4}-\d\d-\d\d ")


def proxy_log_lines(details: dict[str, Any], request_ids: set[str]) -> dict[str, str]:
    """request id -> what Serve's proxies logged for it (whole records, continuation lines
    included), for the ids asked; empty when the logs cannot be read."""
    found: dict[str, list[str]] = {}
    logs = Path(ray_compat.session_dir()) / "logs"
    for proxy in (details.get("proxies") or {}).values():
        path = proxy.get("log_file_path")
        if not path or not request_ids:
            continue
        try:
            text = (logs / path.lstrip("/")).read_text(errors="replace")
        except OSError:
            continue
        current: list[str] | None = None
        for line in text.splitlines():
            if _LOG_RECORD.match(line):
                current = None
                rid = next((r for r in line.split() if r in request_ids), None)
                if rid is not None:
                    current = found.setdefault(rid, [])
            if current is not None:
                current.append(line)
    return {rid: "\n".join(lines) for rid, lines in found.items()}


def attribute(records: list[Sent], kills: list[Kill], proxy_logs: dict[str, str],
              t0: float) -> list[dict[str, Any]]:  # fmt: skip
    """Attribute failures to Router kills (the rules in the module docstring); return the
    failures outside them, each with its cause as far as the client and the proxy's log tell."""
    routers = [k for k in kills if k.kind == "router"]
    outside = []
    for s in (s for s in records if s.failed):
        logged = proxy_logs.get(s.request_id, "")
        names = [k for k in routers if _names(logged, k)]
        cause = "router_answered" if s.router_error else "proxy_error"
        if s.router_error and s.status == 408 and "(0 bytes read)" in (s.error or ""):
            in_flight = [
                k for k in routers if s.start <= (k.t_dead or k.t_kill) and s.end >= k.t_kill
            ]
            if in_flight:  # its body went to the killed Router (see the module docstring)
                in_flight[0].attributed.append(s.request_id)
                in_flight[0].answers[f"{s.status} body_lost_with_killed_router"] += 1
                continue
        if not s.router_error:
            candidates = [
                k for k in routers if s.start <= (k.t_dead or k.t_kill) and s.end >= k.t_kill
            ]
            if logged and "Request failed" in logged:
                candidates = [k for k in candidates if k in names]
            if candidates:
                candidates[0].attributed.append(s.request_id)
                candidates[0].confirmed += candidates[0] in names
                candidates[0].answers[f"{s.status} {s.error}"] += 1
                continue
            if names and all(s.start > (k.t_dead or k.t_kill) for k in names):
                cause = "sent_to_dead_router"
            if not logged:  # rule 4: sent to a Router the ingress had not taken out yet
                after = [
                    k for k in routers
                    if 0 < s.start - (k.t_dead or k.t_kill) <= DEAD_ROUTER_WINDOW_S
                ]  # fmt: skip
                if after:
                    after[0].sent_after_death.append(s.request_id)
                    after[0].answers[f"{s.status} {s.error} (sent after its death)"] += 1
                    continue
        nearest = min(kills, key=lambda k: abs(k.t_kill - s.start), default=None)
        outside.append({
            "t_s": round(s.start - t0, 2), "latency_s": round(s.end - s.start, 3),
            "status": s.status, "error": s.error, "cause": cause, "request_id": s.request_id,
            "nearest_kill": None if nearest is None else
            {"kind": nearest.kind, "replica": nearest.replica_id,
             "start_minus_kill_s": round(s.start - nearest.t_kill, 2)},
            "proxy_log": logged[-1200:] or None,
        })  # fmt: skip
    return outside


def _names(logged: str, kill: Kill) -> bool:
    return bool(logged) and (
        (kill.actor_id is not None and kill.actor_id in logged) or kill.replica_id in logged
    )


# -- the run ----------------------------------------------------------------------------------------


def model_configs(tmp: Path, real: bool, replicas: int) -> list[Path]:
    if real:  # the demo's MiniLM versions, as `make demo` deploys them
        return [ROOT / "configs/models/recommender" / f"{v}.yaml" for v in (STABLE, CANDIDATE)]
    from tests.support.tiny_models import build_tiny_bert, write_model_config

    log("building two tiny BERT artifacts")
    scaling = {"autoscaling": {"min_replicas": replicas, "max_replicas": replicas}}
    return [
        write_model_config(tmp, v, build_tiny_bert(tmp / f"tiny-{v}", seed=i), **scaling)
        for i, v in enumerate((STABLE, CANDIDATE))
    ]


def phase(app: LocalApp) -> str | None:
    try:
        return str(app.admin()["phase"])
    except Exception:  # the controller may be restarting: ask again later
        return None


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser("bench.chaos", __doc__, json_help="one JSON object on stdout")
    parser.add_argument(
        "--seed", type=int, default=0, help="the chaos RNG and the clients' user ids"
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help="seconds of chaos (the canary is sized to it); default 180, --smoke 30",
    )
    parser.add_argument(
        "--interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("MIN", "MAX"),
        help="seconds between a repaired kill and the next (default 3 8; --smoke 1 3)",
    )
    parser.add_argument(
        "--clients", type=int, default=None, help="client threads (default 6; --smoke 4)"
    )
    parser.add_argument(
        "--model-replicas",
        type=int,
        default=1,
        help="replicas per version (tiny models; default 1: a model kill leaves none)",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="the demo's MiniLM versions (configs/models/recommender/) instead of tiny BERTs",
    )
    parser.add_argument(
        "--version-apps",
        action="store_true",
        help="one application per version (serve_config.yaml's layout) instead of one app",
    )
    parser.add_argument("--smoke", action="store_true", help="a short run for CI (tiny models)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 also when a request failed outside a killed Router or the "
                        "rollout did not end as expected")  # fmt: skip
    args = parser.parse_args(argv)
    duration = args.duration or (30.0 if args.smoke else 180.0)
    low, high = args.interval or ((1.0, 3.0) if args.smoke else (3.0, 8.0))
    interval = (float(low), float(high))
    clients = args.clients or (4 if args.smoke else 6)
    if duration <= 0 or clients < 1 or not 0 <= interval[0] <= interval[1]:
        parser.error("--duration and --clients must be positive, --interval MIN <= MAX")

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    app = LocalApp()
    plan = canary_plan(duration, args.smoke)
    load: Load | None = None
    chaos: Chaos | None = None
    failure: str | None = None
    final: dict[str, Any] = {}
    history: list[dict[str, Any]] = []
    proxy_logs: dict[str, str] = {}
    t0 = t_end = time.monotonic()
    wall0 = time.time()  # the controller's history is in wall-clock seconds
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        versions = model_configs(tmp, args.real, args.model_replicas)
        router = {"stable": STABLE, "weights": {STABLE: 100}}

        def build(http_port: int, env: dict[str, str]) -> dict[str, Any]:
            config = serve_config(versions, http_port, env, router)
            app_args = config["applications"][0]["args"]
            app_args["router_replicas"] = ROUTER_REPLICAS
            if args.version_apps:  # serve_config.yaml's layout: the Router app stays first
                app_args["version_apps"] = True
                del app_args["versions"]
                config["applications"] += [
                    {"name": f"{APP}-{v}", "route_prefix": None,
                     "import_path": "app.builder:build_version", "args": {"config": str(path)},
                     "runtime_env": {"env_vars": env}}
                    for v, path in zip((STABLE, CANDIDATE), versions, strict=True)
                ]  # fmt: skip
            return config

        app.start(tmp, versions, router, build=build)
        wait_for(lambda: whole(app.details()), 120, 0.5, "every replica RUNNING")
        if phase(app) != "idle":
            raise RuntimeError(f"the controller is not idle before the rollout: {app.admin()}")
        log(f"deployed in {time.perf_counter() - started:.0f}s: {ROUTER_REPLICAS} Routers, "
            f"{args.model_replicas} replica(s) per version")  # fmt: skip
        stop = threading.Event()
        with Load(app.url, clients, args.seed) as load:
            time.sleep(2.0)  # warm up: every client connected and served
            log(f"load: {clients} clients; declaring the canary ({plan['canary']['steps']})")
            t0, wall0 = time.monotonic(), time.time()
            app.deploy(with_user_configs(
                app.config, RolloutController={"plan": plan, "tick_interval_s": TICK_S}))  # fmt: skip
            chaos = Chaos(app, args.seed, interval, stop, router_first=args.smoke)
            chaos.start()
            stop.wait(duration)
            stop.set()
            chaos.join(timeout=180)  # a kill in progress finishes (its repair is awaited)
            log(f"chaos over after {time.monotonic() - t0:.0f}s: {len(chaos.kills)} kills; "
                "waiting for the rollout to end")  # fmt: skip
            try:
                wait_for(lambda: phase(app) in ENDED, 120, 0.5, "the rollout to end")
            except Exception as exc:
                failure = f"the rollout did not end: {exc}"
            wait_for(lambda: whole(app.details()), 120, 0.5, "every replica RUNNING")
            time.sleep(2.0)  # requests after the last repair
            t_end = time.monotonic()
        final = app.admin()
        try:
            r = app.client.get("/admin/rollout/history",
                               headers={"authorization": f"Bearer {app.token}"})  # fmt: skip
            history = r.json().get("events", []) if r.status_code == 200 else []
        except Exception as exc:
            log(f"no rollout history: {exc!r}")
        failed_ids = {s.request_id for s in load.records if s.failed and not s.router_error}
        proxy_logs = proxy_log_lines(app.details(), failed_ids)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log(f"the run broke: {failure}")
    finally:
        if load is not None:
            load.stop.set()
        app.close()
        sys.stdout = stdout

    records = load.records if load else []
    kills = chaos.kills if chaos else []
    outside = attribute(records, kills, proxy_logs, t0)
    failed = [s for s in records if s.failed]
    router_kills = [k for k in kills if k.kind == "router"]
    final_phase = final.get("phase")
    report: dict[str, Any] = {
        "requests": len(records),
        "failed": len(failed),
        "failed_outside_killed_router": len(outside),
        "failed_in_flight_on_killed_router": sum(len(k.attributed) for k in router_kills),
        "failed_sent_to_dead_router": sum(len(k.sent_after_death) for k in router_kills),
        "max_failed_per_router_kill": max((len(k.attributed) for k in router_kills), default=0),
        "kills": {kind: sum(1 for k in kills if k.kind == kind) for kind in KINDS},
        "final_phase": final_phase,
        "expected_phase": EXPECTED_PHASE,
        "phase_as_expected": final_phase == EXPECTED_PHASE,
        "failures_by_status": dict(
            Counter("transport" if s.status is None else str(s.status) for s in failed)
        ),  # fmt: skip
        "outside_causes": dict(Counter(o["cause"] for o in outside)),
        "kill_details": [k.summary(t0, records) for k in kills],
        "outside_failures": outside[:50],
        "latency_ms": latency_ms([s.end - s.start for s in records if s.status == 200]),
        "requests_over_5s": sum(1 for s in records if s.end - s.start > 5),
        "served_by": dict(Counter(s.version for s in records if s.status == 200)),
        "fallbacks": dict(Counter(s.fallback for s in records if s.fallback)),
        "rollout": {
            "message": final.get("message"),
            "verdicts": final.get("verdicts"),
            "events": [  # t_s: seconds after the declaration
                {
                    "t_s": round(e["time_s"] - wall0, 2),
                    "phase": e.get("to_phase"),
                    "weight": e.get("weight"),
                    "reason": e.get("reason"),
                }
                for e in history
            ][-40:],
        },  # fmt: skip
        "plan": plan,
        "seed": args.seed,
        "duration_s": duration,
        "interval_s": list(interval),
        "clients": clients,
        "model_replicas": args.model_replicas,
        "models": "minilm" if args.real else "tiny",
        "layout": "version_apps" if args.version_apps else "one_app",
        "chaos_to_end_s": round(t_end - t0, 1),
        "chaos_errors": chaos.errors if chaos else [],
        "smoke": args.smoke,
        "machine": machine(),
        "ray_version": ray.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if failure:
        report["failure"] = failure
    print(json.dumps(report) if args.json else table(report), flush=True)
    broke = bool(failure) or not kills or final_phase not in ENDED
    missed = bool(outside) or final_phase != EXPECTED_PHASE
    return 1 if broke or (args.strict and missed) else 0


def latency_ms(seconds: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of the answered requests' latencies, in ms."""
    if not seconds:
        return {"p50": None, "p99": None, "max": None}
    ms = sorted(s * 1000 for s in seconds)
    at = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 1)  # noqa: E731
    return {"p50": at(0.5), "p99": at(0.99), "max": round(ms[-1], 1)}


def table(report: dict[str, Any]) -> str:
    """The report for people: the totals, then one line per kill, then the outside failures."""
    events = report["rollout"]["events"]
    last_event = events[-1]["reason"] if events else "no rollout history"
    lines = [
        f"chaos: seed {report['seed']}, {report['duration_s']:g}s of kills, {report['clients']} "
        f"clients, {report['models']} models; {report['wall_s']:.0f}s in all",
        f"requests {report['requests']}, failed {report['failed']} "
        f"({report['failures_by_status']}), in flight on a killed Router "
        f"{report['failed_in_flight_on_killed_router']} (max {report['max_failed_per_router_kill']} "
        f"per kill), sent to a dead Router {report['failed_sent_to_dead_router']}, outside "
        f"killed Routers {report['failed_outside_killed_router']} {report['outside_causes'] or ''}",
        f"latency of answered requests {report['latency_ms']} ms, "
        f"{report['requests_over_5s']} over 5 s; fallbacks {report['fallbacks']}",
        f"kills {report['kills']}; final phase {report['final_phase']} "
        f"(expected {report['expected_phase']}): {last_event}",
        "",
        f"{'t (s)':>7}  {'kind':<10}  {'replica':<10}  {'dead (ms)':>9}  {'repaired (s)':>12}  "
        f"{'in flight':>9}  {'failed':>6}",
    ]
    for k in report["kill_details"]:
        lines.append(
            f"{k['t_s']:>7.1f}  {k['kind']:<10}  {k['replica']:<10}  {k['dead_after_ms'] or '-':>9}  "
            f"{k['repaired_after_s'] or '-':>12}  {k['in_flight']:>9}  {k['failed_in_flight']:>6}"
        )
    for o in report["outside_failures"]:
        lines.append(f"outside: t={o['t_s']}s {o['status']} {o['cause']}: {o['error']}")
    if report.get("failure"):
        lines.append(f"the run broke: {report['failure']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

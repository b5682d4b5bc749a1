"""Propagation: the time from a controller decision to every Router replica applying it.

    cd /work/main && .venv/bin/python -m bench.propagation [--decisions N] [--routers R] [--json] [--smoke]
                                                     [--clients C] [--users U | --focus K]
    rollout bench propagation --json

DESIGN.md, decision 2: a router never waits for the controller; the controller's traffic
reaches every router replica by long-poll push, goal within 200 ms. Every earlier bench and test
ran one Router replica; this one runs `--routers` (default 2, as the region overlays do).

A throwaway Ray + Serve (bench/localapp.py) runs the recommender app with `router_replicas: R`
and two healthy tiny random BERTs (v1 stable, v2 the candidate). Steady sticky load runs the
whole time: `--clients` threads, each request from one of `--users` user ids (`x-user-id`),
so every user sends many requests and each one's answers can be checked for stickiness.

The controller's user_config declares a canary of v2 whose steps are `set_weight: w_k` then
`pause_s: null` (wait for `rollout promote`) for k = 1..N, w_k = 90 k / N, with gates a healthy
candidate passes. The declaration is the first decision (the controller's next tick publishes
w_1); then the driver sends N admin `promote` commands (POST /admin/rollout/promote, admin
token), each after the previous one reached every router plus a random 0.15-0.6 s (so commands
do not line up with the 250 ms stats pushes and ticks). The N-th promote switches v2 to 100%,
and the rollout then succeeds (stable becomes v2: one more generation, published by a tick).

How "decided" and "applied" are timed, per router replica. Serve's proxy load-balances, so
GET /status through it shows one replica at random, and Ray 2.60's direct ingress (one port per
replica) is off unless the whole cluster sets RAY_SERVE_ENABLE_DIRECT_INGRESS. So the bench
reaches each replica's actor (its `actor_name` in Serve's details) with Ray's
`actor.__ray_call__(fn)`, which runs `fn(actor)` inside the replica process:

* probes: once, before the load starts, it wraps two methods on the live objects, changing
  nothing they do: the controller's `ControllerCore._publish` (records `time.monotonic()` and
  the generation when the controller publishes traffic) and each Router's
  `RouterSync._apply_override` (records `time.monotonic()` and the controller generation once
  the Router swapped its table to it; a refused override is not recorded). All replicas run on
  this one host, whose CLOCK_MONOTONIC every process shares, so these times compare directly;
* views: the driver reads, from each replica, what its /status reports (the table's weights,
  the controller generation it applied, a refused override), polling every 5 ms.

Figures, over every generation the controller published after the declaration:

* `publish_to_all_applied_ms`: publish -> the LAST router replica applied it (the goal,
  <= 200 ms; `ratio_to_goal` is that over 200 ms);
* `per_router_ms`: publish -> applied, per replica; `skew_ms`: last - first router applied
  (the window in which two routers disagree, when a sticky user can flip back);
* `command_to_all_seen_ms` (promotes only): the driver sent POST promote -> every replica's view
  shows the new weights (includes the HTTP hop to a router, the command's GCS write and
  fence check, and the 5 ms view polling); `command_answered_ms`: the POST's round trip.

`--focus K` stresses stickiness: instead of `--users` random ids, K user ids per step chosen
(by their bucket, app/serving/buckets.py) so that the step moves them from v1 to v2, and the load
sends only as the K users of the step at hand, from 0.15-0.6 s before its decision until 0.15-0.6 s
after every router applied it: every answer then comes from a user whose version is changing.

Stickiness: every 200 answer is recorded per user with its send/receive times, `x-model-version`,
`x-routing-decision` and `x-fallback-from`. A flip is a user answered by v2 on a sticky decision
and later by v1 on a sticky decision while the weights only rose, in the order the requests were
sent (fallback answers are skipped: a fallback serves v1 by design). `flip_details` gives each
with its times relative to the last publish before the v1 answer came back, and `in_window`:
whether that v1 request was sent before the last router applied the generation (so it could
reach a router that had not), and `causal`: whether it was sent after the v2 answer came back.
Clients echo each user's highest `x-traffic-generation` (monotonic reads: a Router behind it
waits for that generation), so `flips_causal` should be 0; `--no-echo` turns the echo off.

Output: one JSON object (`--json`: only it; otherwise one JSON line per decision first). Exit
status 1 if a command failed, a decision did not reach every router, a client request failed,
or the rollout did not succeed; flips are reported, not an exit status (the integration test
`tests/integration/test_router_replicas.py` asserts on them).
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ray

from app.constants import TRAFFIC_GENERATION_HEADER
from app.serving.buckets import BucketMap, bucket_of
from bench.common import bench_parser, log, machine
from bench.localapp import APP, TICK_S, LocalApp, serve_config, wait_for, with_user_configs
from tests.support import loadgen

CANDIDATE, STABLE = "v2", "v1"
GOAL_MS = 200.0
VIEW_POLL_S = 0.005
GATES = {"min_requests": 10, "fail_fast_min_requests": 5, "max_p99_latency_ratio": None}
BODY = {
    "inputs": [
        {"name": "user", "datatype": "BYTES", "shape": [1], "data": ["user loves science fiction films"]},
        {"name": "items", "datatype": "BYTES", "shape": [2], "data": ["space opera", "cooking show"]},
    ]
}  # fmt: skip

__all__ = [
    "Promotion",
    "ReplicaProbes",
    "StickyLoad",
    "count_flips",
    "moved_users",
    "place_flips",
    "promotion_plan",
    "propagation",
    "summary",
]


def promotion_plan(weights: list[float]) -> dict[str, Any]:
    """A canary that sets each weight, then waits for `rollout promote`."""
    steps: list[dict[str, Any]] = []
    for weight in weights:
        steps += [{"set_weight": weight}, {"pause_s": None}]
    return {"strategy": "canary", "candidate": CANDIDATE, "stable": STABLE,
            "canary": {"steps": steps}, "gates": GATES}  # fmt: skip


# -- probes inside the replicas -------------------------------------------------------------------
# Built by a factory so that cloudpickle ships them by value: a replica never imports this module.


def _probe_functions() -> dict[str, Callable[..., Any]]:
    def user_object(actor: Any) -> Any:
        # Serve 2.60: ReplicaActor -> Replica -> UserCallableWrapper -> the deployment's instance.
        return actor._replica_impl._user_callable_wrapper.user_callable

    def install_router(actor: Any) -> str:
        import time

        router = user_object(actor)
        sync = router.sync
        if getattr(sync, "_bench_applied", None) is None:
            applied: list[tuple[int | None, float]] = []
            original = sync._apply_override

            def apply(override: Any) -> None:
                original(override)
                if override is not None and router.override is override:  # applied, not refused
                    applied.append((override.get("generation"), time.monotonic()))

            sync._apply_override = apply
            sync._bench_applied = applied
        return str(actor._replica_impl._replica_id.unique_id)

    def install_controller(actor: Any) -> int:
        import time

        core = user_object(actor)
        if getattr(core, "_bench_published", None) is None:
            published: list[tuple[int, float, dict[str, float]]] = []
            original = core._publish

            def publish(state: Any) -> None:
                started = time.monotonic()
                original(state)
                weights = dict((core.override or {}).get("weights") or {})
                published.append((int(core.override["generation"]), started, weights))

            core._publish = publish
            core._bench_published = published
        return int((core.override or {}).get("generation") or 0)

    def install_timeline(actor: Any) -> bool:
        """On the controller: when stats reports arrive (and what they count), each tick and
        each store write-and-publish (_persist) with its duration, each feedback batch counted
        (FeedbackDesk.count) with its duration, and event-loop lag (a 10 ms sleeper's
        lateness, kept when over 5 ms)."""
        import asyncio
        import time

        core = user_object(actor)
        if getattr(core, "_bench_timeline", None) is not None:
            return False
        timeline: dict[str, list[Any]] = {"reports": [], "feedback": [], "ticks": [],
                                          "persists": [], "lags": [], "lag_samples": [0]}  # fmt: skip
        window_add, desk_count = core.window.add, core.desk.count
        tick, persist = core._tick, core._persist

        def add(stats: Any, now: float) -> Any:
            counts = {str(v): (int(s.get("requests", 0)), int(s.get("errors", 0)))
                      for v, s in (stats or {}).items()}  # fmt: skip
            timeline["reports"].append((time.monotonic(), counts))
            return window_add(stats, now)

        def count(items: Any, *args: Any) -> Any:  # FeedbackDesk.count's own arguments
            started = time.monotonic()
            try:
                return desk_count(items, *args)
            finally:
                timeline["feedback"].append((started, time.monotonic() - started, len(items)))

        async def timed_tick(now: float) -> None:
            started = time.monotonic()
            try:
                await tick(now)
            finally:
                timeline["ticks"].append((started, time.monotonic() - started))

        async def timed_persist() -> None:
            started = time.monotonic()
            try:
                await persist()
            finally:
                timeline["persists"].append((started, time.monotonic() - started))

        async def lag_monitor() -> None:
            while True:
                started = time.monotonic()
                await asyncio.sleep(0.01)
                lag = time.monotonic() - started - 0.01
                timeline["lag_samples"][0] += 1
                if lag > 0.005:
                    timeline["lags"].append((started, lag))

        core.window.add, core.desk.count = add, count
        core._tick, core._persist = timed_tick, timed_persist
        core._bench_timeline = timeline
        loop = actor._replica_impl._user_callable_wrapper.event_loop
        core._bench_lag_task = asyncio.run_coroutine_threadsafe(lag_monitor(), loop)
        return True

    def controller_timeline(actor: Any) -> dict[str, Any]:
        core = user_object(actor)
        timeline = getattr(core, "_bench_timeline", None) or {}
        return {k: list(v) for k, v in timeline.items()}

    def router_view(actor: Any) -> dict[str, Any]:
        router = user_object(actor)
        table, override = router.table, router.override
        return {
            "generation": (override or {}).get("generation", 0),
            "weights": dict(table.weights) if table is not None else {},
            "refused": None if router.refused_override is None else router.refused_override.get("error"),
            "applied": list(getattr(router.sync, "_bench_applied", None) or ()),
        }  # fmt: skip

    def controller_view(actor: Any) -> dict[str, Any]:
        core = user_object(actor)
        return {"generation": int((core.override or {}).get("generation") or 0),
                "published": list(getattr(core, "_bench_published", None) or ())}  # fmt: skip

    return {"install_router": install_router, "install_controller": install_controller,
            "install_timeline": install_timeline, "controller_timeline": controller_timeline,
            "router_view": router_view, "controller_view": controller_view}  # fmt: skip


class ReplicaProbes:
    """The Router replicas and the controller of one app, reached as Ray actors."""

    def __init__(self, details: dict[str, Any], app: str = APP) -> None:
        deployments = details["applications"][app]["deployments"]
        self.functions = _probe_functions()
        self.routers = {
            r["replica_id"]: ray.get_actor(r["actor_name"], namespace="serve")
            for r in deployments["Router"]["replicas"] if r["state"] == "RUNNING"
        }  # fmt: skip
        (controller,) = [r for r in deployments["RolloutController"]["replicas"]
                         if r["state"] == "RUNNING"]  # fmt: skip
        self.controller = ray.get_actor(controller["actor_name"], namespace="serve")

    def _call(self, actor: Any, name: str) -> Any:
        return actor.__ray_call__.remote(self.functions[name])

    def install(self) -> None:
        ray.get([self._call(a, "install_router") for a in self.routers.values()], timeout=30)
        ray.get(self._call(self.controller, "install_controller"), timeout=30)

    def views(self) -> dict[str, dict[str, Any]]:
        ids = list(self.routers)
        views = ray.get([self._call(self.routers[i], "router_view") for i in ids], timeout=30)
        return dict(zip(ids, views))

    def published(self) -> dict[int, float]:
        """Generation -> when the controller published it (time.monotonic, this host)."""
        return {g: t for g, t, _ in self.publishes()}

    def publishes(self) -> list[tuple[int, float, dict[str, float]]]:
        """(generation, when, weights) of every publish since the probe was installed."""
        view = ray.get(self._call(self.controller, "controller_view"), timeout=30)
        return [(int(g), t, w) for g, t, w in view["published"]]

    def install_timeline(self) -> None:
        """The controller's timeline probe (`timeline()` reads it)."""
        ray.get(self._call(self.controller, "install_timeline"), timeout=30)

    def timeline(self) -> dict[str, list[Any]]:
        return dict(ray.get(self._call(self.controller, "controller_timeline"), timeout=30))

    def applied(self) -> dict[str, dict[int, float]]:
        """Router replica id -> generation -> when it applied it (the first time)."""
        out: dict[str, dict[int, float]] = {}
        for replica, view in self.views().items():
            first: dict[int, float] = {}
            for generation, t in view["applied"]:
                if generation is not None:
                    first.setdefault(int(generation), t)
            out[replica] = first
        return out

    def wait_all(self, generation: int, weights: dict[str, float], timeout_s: float = 10) -> float:
        """Poll every replica's view until each shows `generation` (or newer) and `weights`;
        return when (time.monotonic)."""
        want = {v: float(w) for v, w in weights.items() if w}
        deadline = time.monotonic() + timeout_s
        while True:
            views = self.views()
            if all(v["generation"] >= generation
                   and {k: float(w) for k, w in v["weights"].items() if w} == want
                   for v in views.values()):  # fmt: skip
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every router shows generation {generation} {want} "
                                   f"after {timeout_s}s: {views}")  # fmt: skip
            time.sleep(VIEW_POLL_S)


# -- sticky load ------------------------------------------------------------------------------------


class StickyLoad(loadgen.Load):
    """Client threads, each request from one of `users` (user ids), or only from `focus` while
    the driver sets it; every answer kept per user: (sent, received, version, routing decision,
    fallback-from)."""

    def __init__(self, url: str, clients: int, users: list[str], seed: int = 0,
                 echo_generation: bool = False) -> None:  # fmt: skip
        self.users = users
        self.focus: list[str] | None = None
        self.answers: dict[str, list[tuple[float, float, str, str, str | None]]] = defaultdict(list)
        # With echo_generation, each user's requests carry the highest x-traffic-generation
        # its answers carried so far (what a client that keeps monotonic reads does).
        self.echo_generation = echo_generation
        self.generations: dict[str, str] = {}
        super().__init__(url, self._infer, clients, seed)

    def _infer(self, client: httpx.Client, rng: random.Random, index: int) -> str | None:
        user = rng.choice(self.focus or self.users)
        headers = {"x-user-id": user}
        if self.echo_generation:
            with self.lock:
                seen = self.generations.get(user)
            if seen is not None:
                headers[TRAFFIC_GENERATION_HEADER] = seen
        sent = time.monotonic()
        r = client.post(f"/v2/models/{APP}/infer", json=BODY, headers=headers)
        received = time.monotonic()
        if r.status_code != 200:
            return f"{time.strftime('%H:%M:%S')} {r.status_code} {r.text[:200]}"
        generation = r.headers.get(TRAFFIC_GENERATION_HEADER)
        if self.echo_generation and generation is not None:
            with self.lock:
                if int(generation) > int(self.generations.get(user, "0")):
                    self.generations[user] = generation
        record = (sent, received, r.headers.get("x-model-version", "?"),
                  r.headers.get("x-routing-decision", "?"), r.headers.get("x-fallback-from"))  # fmt: skip
        with self.lock:
            self.answers[user].append(record)
        return None


def moved_users(before: float, after: float, k: int, taken: set[str] | None = None) -> list[str]:
    """`k` user ids (`user-<n>`) whose bucket is on STABLE at candidate weight `before` and on
    CANDIDATE at `after`: the users a step from `before` to `after` moves (app/serving/buckets.py)."""
    old = BucketMap.build({STABLE: 100 - before, CANDIDATE: before}, STABLE)
    new = BucketMap.build({STABLE: 100 - after, CANDIDATE: after}, STABLE)
    found: list[str] = []
    n = 0
    while len(found) < k:
        user, n = f"user-{n}", n + 1
        bucket = bucket_of(user)
        if user not in (taken or ()) and old.version_for(bucket) == STABLE \
                and new.version_for(bucket) == CANDIDATE:  # fmt: skip
            found.append(user)
    return found


def count_flips(answers: dict[str, list[tuple[float, float, str, str, str | None]]],
                new: str = CANDIDATE, old: str = STABLE) -> list[dict[str, Any]]:  # fmt: skip
    """Users answered by `new` (sticky) and later by `old` (sticky), in send order: one entry
    per flip back. Fallback answers (x-fallback-from) are not routing decisions and are skipped."""
    flips = []
    for user, records in answers.items():
        last_new: tuple[float, float] | None = None
        for sent, received, version, decision, fallback in sorted(records):
            if fallback or decision != "sticky":
                continue
            if version == new:
                last_new = (sent, received)
            elif version == old and last_new is not None:
                # causal: the old answer's request left after the new answer came back (so a
                # client echoing x-traffic-generation had sent it), not while both were in flight.
                flips.append({"user": user, "new_sent": last_new[0], "new_received": last_new[1],
                              "old_sent": sent, "old_received": received,
                              "causal": sent > last_new[1]})  # fmt: skip
                last_new = None
    return flips


# -- the promotion -----------------------------------------------------------------------------------


class Promotion:
    """Drive a declared `promotion_plan(weights)` to the end: wait for the first step on every
    router, then `promote` once per step (the last one switches to 100%), each after the
    previous one reached every router plus `dwell()` seconds. With `focus` (user lists per
    step: the declaration's first step, then one per promote), the load sends only as the
    users a step moves, from `dwell()` seconds before its decision to `dwell()` seconds after
    every router applied it.

    `status()` and `promote()` are the admin API's GET /admin/rollout and POST
    /admin/rollout/promote (an httpx.Response); `declare()` deploys the plan."""

    def __init__(self, probes: ReplicaProbes, load: StickyLoad, weights: list[float],
                 status: Callable[[], dict[str, Any]], promote: Callable[[], httpx.Response],
                 declare: Callable[[], None], dwell: Callable[[], float],
                 focus: list[list[str]] | None = None) -> None:  # fmt: skip
        self.probes, self.load, self.weights = probes, load, weights
        self.status, self.promote, self.declare, self.dwell = status, promote, declare, dwell
        self.focus = focus
        self.commands: list[dict[str, Any]] = []
        self.published_before = 0

    def _focus(self, step: int) -> None:
        if self.focus is not None:
            self.load.focus = self.focus[step]

    def run(self, log_line: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
        """The final admin status (phase succeeded, unless a gate said otherwise)."""
        self.published_before = max(self.probes.published(), default=0)
        self._focus(0)
        time.sleep(self.dwell())
        self.declare()
        first = wait_for(lambda: (s := self.status())["weights"].get(CANDIDATE) == self.weights[0] and s,
                         60, 0.02, f"the first step ({self.weights[0]}%)")  # fmt: skip
        self.probes.wait_all(first["generation"], first["weights"])
        time.sleep(self.dwell())
        for index in range(len(self.weights)):
            self._focus(index + 1)
            time.sleep(self.dwell())
            sent = time.monotonic()
            r = self.promote()
            answered = time.monotonic()
            if r.status_code != 200:
                raise RuntimeError(f"promote {index + 1}: {r.status_code} {r.text[:300]}")
            state = r.json()
            seen = self.probes.wait_all(state["generation"], state["weights"])
            self.commands.append({
                "promote": index + 1, "generation": state["generation"],
                "weight": state["weights"].get(CANDIDATE), "phase": state["phase"],
                "command_answered_ms": round((answered - sent) * 1000, 2),
                "command_to_all_seen_ms": round((seen - sent) * 1000, 2),
            })  # fmt: skip
            log_line(f"promote {index + 1}/{len(self.weights)}: v2 {state['weights'].get(CANDIDATE)}% "
                     f"(generation {state['generation']}, {state['phase']}); every router shows it "
                     f"{(seen - sent) * 1000:.1f} ms after the command was sent")  # fmt: skip
            time.sleep(self.dwell())
        final = wait_for(lambda: (s := self.status())["phase"] in ("succeeded", "rolled_back", "aborted") and s,
                         30, 0.1, "the rollout to end")  # fmt: skip
        self.probes.wait_all(final["generation"], final["weights"])
        self.load.focus = None
        return final


# -- figures ----------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "p90": None, "max": None, "min": None}
    a = np.asarray(values, dtype=float)
    return {"median": round(float(np.median(a)), 2), "p90": round(float(np.percentile(a, 90)), 2),
            "max": round(float(a.max()), 2), "min": round(float(a.min()), 2)}  # fmt: skip


def propagation(published: dict[int, float], applied: dict[str, dict[int, float]],
                after: int) -> list[dict[str, Any]]:  # fmt: skip
    """Per published generation > `after`: ms to each router, to the last one, and the skew."""
    rows = []
    for generation in sorted(g for g in published if g > after):
        t0 = published[generation]
        times = {r: a.get(generation) for r, a in applied.items()}
        row: dict[str, Any] = {"generation": generation, "published_at": t0}
        if any(t is None for t in times.values()):
            # A router that skipped a generation (a newer one arrived first) never applied it.
            row["missing"] = sorted(r for r, t in times.items() if t is None)
        got = {r: t for r, t in times.items() if t is not None}
        if got:
            row["per_router_ms"] = {r: round((t - t0) * 1000, 2) for r, t in got.items()}
            row["all_applied_ms"] = round((max(got.values()) - t0) * 1000, 2)
            row["skew_ms"] = round((max(got.values()) - min(got.values())) * 1000, 2)
            row["window"] = (min(got.values()), max(got.values()))
        rows.append(row)
    return rows


def place_flips(flips: list[dict[str, Any]], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each flip with the last publish before its old answer came back (a router chose the
    version between the send and the answer), and whether that old request was sent before
    the generation's propagation window ended (the last router applied it), i.e. it could have
    reached a router that had not applied it yet."""
    placed = []
    for flip in flips:
        before = [r for r in rows if r["published_at"] <= flip["old_received"]]
        row = before[-1] if before else None
        out: dict[str, Any] = {"user": flip["user"], "causal": flip.get("causal", False)}
        if row is not None:
            t0 = row["published_at"]
            out["generation"] = row["generation"]
            out["new_sent_ms"] = round((flip["new_sent"] - t0) * 1000, 2)
            out["new_received_ms"] = round((flip["new_received"] - t0) * 1000, 2)
            out["old_sent_ms"] = round((flip["old_sent"] - t0) * 1000, 2)
            out["old_received_ms"] = round((flip["old_received"] - t0) * 1000, 2)
            window = row.get("window")
            out["window_ms"] = None if window is None else [
                round((window[0] - t0) * 1000, 2), round((window[1] - t0) * 1000, 2)]  # fmt: skip
            out["in_window"] = window is not None and flip["old_sent"] <= window[1]
        placed.append(out)
    return placed


# -- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "bench.propagation",
        __doc__,
        json_help="only the JSON object on stdout (without it, one line per decision first)",
    )
    parser.add_argument("--decisions", type=int, default=None,
                        help="promote commands (default 24; --smoke 4)")  # fmt: skip
    parser.add_argument("--routers", type=int, default=2, help="Router replicas (default 2)")
    parser.add_argument("--clients", type=int, default=4, help="load threads (default 4)")
    parser.add_argument("--users", type=int, default=200, help="sticky user ids (default 200)")
    parser.add_argument("--focus", type=int, default=0, metavar="K",
                        help="stress stickiness: K users per step, chosen so that the step moves "
                        "them, and the load sends only as the next step's K users")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the load and the pauses")
    parser.add_argument("--no-echo", action="store_true",
                        help="clients do not echo x-traffic-generation (no monotonic reads: "
                        "what a client that ignores the header sees)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="4 decisions: checks that it works")
    args = parser.parse_args(argv)
    decisions = args.decisions or (4 if args.smoke else 24)
    if decisions < 1 or args.routers < 1 or args.clients < 1 or args.users < 1 or args.focus < 0:
        parser.error("--decisions, --routers, --clients and --users must be at least 1")
    weights = [round(90 * k / decisions, 2) for k in range(1, decisions + 1)]
    focus: list[list[str]] | None = None
    users = [f"user-{n}" for n in range(args.users)]
    if args.focus:
        taken: set[str] = set()
        focus = []
        for before, after in zip([0.0, *weights], [*weights, 100.0]):
            focus.append(moved_users(before, after, args.focus, taken))
            taken.update(focus[-1])
        users = sorted(taken)
    rng = random.Random(args.seed)

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-propagation-"))
    app = LocalApp()
    load: StickyLoad | None = None
    promotion: Promotion | None = None
    failure: str | None = None
    rows: list[dict[str, Any]] = []
    final: dict[str, Any] = {}
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        from tests.support.tiny_models import build_tiny_bert
        from tests.support.tiny_models import write_model_config as model_config

        log("building two tiny BERT artifacts")
        versions = [model_config(tmp, "v1", build_tiny_bert(tmp / "tiny-a", seed=0)),
                    model_config(tmp, "v2", build_tiny_bert(tmp / "tiny-b", seed=1))]  # fmt: skip
        router = {"stable": STABLE, "weights": {STABLE: 100}}

        def build(http_port: int, env: dict[str, str]) -> dict[str, Any]:
            config = serve_config(versions, http_port, env, router)
            config["applications"][0]["args"]["router_replicas"] = args.routers
            return config

        app.start(tmp, versions, router, build=build)

        def routers_running() -> dict[str, Any] | None:
            details = app.details()
            replicas = details["applications"][APP]["deployments"]["Router"]["replicas"]
            running = [r for r in replicas if r["state"] == "RUNNING"]
            return details if len(running) == args.routers else None

        probes = ReplicaProbes(
            wait_for(routers_running, 120, 0.5, f"{args.routers} Routers RUNNING")
        )
        probes.install()
        log(f"deployed in {time.perf_counter() - started:.0f}s: {len(probes.routers)} Router "
            f"replicas, probes installed")  # fmt: skip

        def declare() -> None:
            plan = promotion_plan(weights)
            app.deploy(with_user_configs(
                app.config, RolloutController={"plan": plan, "tick_interval_s": TICK_S}))  # fmt: skip

        with StickyLoad(app.url, args.clients, users, args.seed,
                        echo_generation=not args.no_echo) as load:  # fmt: skip
            time.sleep(2.0)  # warm up: every client connected and served
            log(f"load: {args.clients} clients, {len(users)} users"
                f"{f' ({args.focus} per step, focused)' if focus else ''}; declaring "
                f"{decisions} steps {weights} (each waits for promote)")  # fmt: skip
            promotion = Promotion(probes, load, weights, app.admin,
                                  lambda: app.client.post("/admin/rollout/promote"), declare,
                                  lambda: rng.uniform(0.15, 0.6), focus)  # fmt: skip
            final = promotion.run(log)
        rows = propagation(probes.published(), probes.applied(), promotion.published_before)
    except Exception as exc:
        failure = f"{type(exc).__name__}: {exc}"
        log(f"failed: {failure}")
    finally:
        if load is not None:
            load.stop.set()
        app.close()
        sys.stdout = stdout

    commands = promotion.commands if promotion is not None else []
    measured = [r for r in rows if "all_applied_ms" in r]
    flips = count_flips(load.answers) if load is not None else []
    placed = place_flips(flips, rows)
    per_user = load.answers if load is not None else {}
    answers = [a for records in per_user.values() for a in records]
    stats = summary([r["all_applied_ms"] for r in measured])
    ratio = {k: round(float(v) / GOAL_MS, 3) for k, v in stats.items() if v is not None}
    result: dict[str, Any] = {
        "routers": args.routers,
        "decisions": len(measured),
        "promotes": len(commands),
        "goal_ms": GOAL_MS,
        "publish_to_all_applied_ms": stats,
        "ratio_to_goal": ratio or None,
        "skew_ms": summary([r["skew_ms"] for r in measured]),
        "per_router_ms": summary([ms for r in measured for ms in r["per_router_ms"].values()]),
        "command_to_all_seen_ms": summary([c["command_to_all_seen_ms"] for c in commands]),
        "command_answered_ms": summary([c["command_answered_ms"] for c in commands]),
        "generations_missing_a_router": [r["generation"] for r in rows if "missing" in r],
        "final_phase": final.get("phase"),
        "requests": load.sent if load else 0,
        "client_errors": len(load.errors) if load else 0,
        "served_by": dict(Counter(a[2] for a in answers)),
        "routing_decisions": dict(Counter(a[3] for a in answers)),
        "fallbacks": sum(1 for a in answers if a[4]),
        "users": len(users),
        "focus_per_step": args.focus,
        "users_moved": sum(
            1 for records in per_user.values() if {a[2] for a in records} >= {STABLE, CANDIDATE}
        ),  # fmt: skip
        "flips": len(flips),
        "flips_in_window": sum(1 for f in placed if f.get("in_window")),
        # after the client had the new answer (so it echoed its generation): goal 0
        "flips_causal": sum(1 for f in placed if f.get("causal")),
        "echo_generation": not args.no_echo,
        "flip_details": placed[:50],
        "per_decision": [
            {k: r.get(k) for k in ("generation", "all_applied_ms", "skew_ms", "per_router_ms")}
            for r in rows
        ],
        "smoke": args.smoke,
        "machine": machine(),
        "ray_version": ray.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if load is not None and load.errors:
        result["client_error_messages"] = load.errors[:20]
    if failure:
        result["failure"] = failure
    if not args.json:
        by_generation = {c["generation"]: c for c in commands}
        for r in rows:
            line = {k: v for k, v in r.items() if k not in ("published_at", "window")}
            line.update(by_generation.get(r["generation"], {}))
            print(json.dumps(line))
    print(json.dumps(result), flush=True)
    ok = (not failure and not result["client_errors"] and final.get("phase") == "succeeded"
          and len(commands) == decisions)  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

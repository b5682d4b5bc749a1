"""Autoscaling proven: load drives a version from one replica to several and back down.

    cd /work/main && .venv/bin/python -m bench.autoscale [--trials N] [--json] [--smoke]

Starts a throwaway Ray of its own (`address="local"`, 4 logical CPUs, the dashboard on a free
loopback port) and Serve on a free loopback port (bench/localapp.py), builds a tiny random BERT
(`tests.support.tiny_models.build_tiny_bert`) and deploys the recommender app with one version,
v1, the way operators do (a serve config PUT to the dashboard's REST API). v1 is slowed on
purpose (`faults: {added_latency_ms: 300}`: an await, so a replica holds many requests at once)
and scales in seconds:

    autoscaling: {min_replicas: 1, max_replicas: 3, target_ongoing_requests: 2,
                  upscale_delay_s: 1, downscale_delay_s: 3, look_back_period_s: 2,
                  metrics_interval_s: 0.5}

Each trial, closed-loop clients (httpx, loopback keep-alive, each sends its next request when
the last one answered) run in three phases:

* before: 1 client for `--phase-s` seconds (1 request in flight: below the target, 1 replica);
* during: 8 clients (8 in flight: 4 replicas' worth at target 2, capped at 3) from the onset
  until 2 or more replicas are RUNNING, then `--phase-s` seconds more;
* after: back to 1 client until v1 is down to 1 RUNNING replica, then `--phase-s` seconds more.

The Serve details (dashboard REST API) are polled every 0.25 s:

* `scale_up_decided_s`: onset -> a second replica exists (any state: Serve's controller decided);
* `scale_up_s`: onset -> a second replica is RUNNING (in the routing set: serving);
* `scale_down_s`: the load drops -> v1 has one RUNNING replica again;
* `replicas`: [seconds since the trial began, RUNNING, all] at each change.

Latency is client-side per request (p50/p99 per phase); a failed request is a status other than
200, a transport error, or an answer from a version other than v1. Prints one JSON object on
stdout (per-trial figures, their medians, failed requests, machine, ray_version, wall_s);
without --json, one JSON line per trial comes first. Progress on stderr. Exit status 1 if a
request failed or a trial did not scale up and back down.

The push interval must be short for a trial to take seconds: in Ray 2.60 each caller's handle
pushes its load to Serve's controller every `metrics_interval_s` (10 s by default), whatever
the RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S variables say (2.60 defines, but does not
read, them). No environment variable is needed on this bench's cluster.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import httpx
import numpy as np

from bench.common import Background, bench_parser, log, machine
from bench.localapp import APP, LocalApp  # sets RAY_AUTH_MODE before Ray is imported

VERSION = "v1"
DEPLOYMENT = f"{APP}-{VERSION}"
MAX_REPLICAS = 3
LOW, HIGH = 1, 8  # clients (requests in flight) before/after and during
POLL_S = 0.25
ADDED_LATENCY_MS = 300
AUTOSCALING = {
    "min_replicas": 1,
    "max_replicas": MAX_REPLICAS,
    "target_ongoing_requests": 2,
    "upscale_delay_s": 1,
    "downscale_delay_s": 3,
    "look_back_period_s": 2,
    "metrics_interval_s": 0.5,
}
BODY = json.dumps(
    {
        "inputs": [
            {"name": "user", "datatype": "BYTES", "shape": [1],
             "data": ["user loves science fiction films"]},
            {"name": "items", "datatype": "BYTES", "shape": [2],
             "data": ["space opera", "cooking show"]},
        ]
    }
).encode()  # fmt: skip
PATH = f"/v2/models/{APP}/infer"


class Clients(Background):
    """`HIGH` closed-loop client threads, of which the first `level` send; each request is kept
    as (phase, latency s, error or None). They POST to `path` (the model's routed path by
    default; a version-pinned one for a candidate at 0%) and expect `version` to answer."""

    join_timeout_s = 180.0

    def __init__(self, url: str, path: str = PATH, version: str = VERSION) -> None:
        super().__init__(HIGH)
        self.url, self.path, self.version = url, path, version
        self.level = 0
        self.phase = "idle"
        self.records: list[tuple[str, float, str | None]] = []

    def _run(self, index: int) -> None:
        headers = {"content-type": "application/json", "x-user-id": f"bench-{index}"}
        with httpx.Client(base_url=self.url, timeout=120) as session:
            while not self.stop.is_set():
                if index >= self.level:
                    time.sleep(0.01)
                    continue
                phase, started, error = self.phase, time.perf_counter(), None
                try:
                    r = session.post(self.path, content=BODY, headers=headers)
                    if r.status_code != 200:
                        error = f"{r.status_code} {r.text[:200]}"
                    elif r.headers.get("x-model-version") != self.version:
                        error = f"served by {r.headers.get('x-model-version')!r}"
                except httpx.HTTPError as exc:
                    error = f"{type(exc).__name__}: {exc}"
                with self.lock:
                    self.records.append((phase, time.perf_counter() - started, error))

    def set(self, phase: str, level: int) -> None:
        self.phase, self.level = phase, level

    def take(self) -> list[tuple[str, float, str | None]]:
        with self.lock:
            records, self.records = self.records, []
        return records


class ReplicaWatch(Background):
    """Polls a version's replicas (Serve details; v1's by default) in a thread; keeps each
    change of (RUNNING, all)."""

    join_timeout_s = 10.0

    def __init__(self, app: LocalApp, deployment: str = DEPLOYMENT) -> None:
        super().__init__()
        self.app, self.deployment = app, deployment
        self.origin = time.monotonic()
        self.current = (0, 0)
        self.changes: list[tuple[float, int, int]] = []

    def counts(self) -> tuple[int, int]:
        deployment = self.app.details()["applications"][APP]["deployments"][self.deployment]
        replicas = deployment.get("replicas", [])
        return sum(r["state"] == "RUNNING" for r in replicas), len(replicas)

    def _run(self, index: int) -> None:
        while not self.stop.is_set():
            try:
                counts = self.counts()
            except Exception as exc:  # the dashboard busy for a moment: poll again
                log(f"replica poll failed: {exc!r}")
            else:
                with self.lock:
                    if counts != self.current:
                        self.changes.append((time.monotonic(), *counts))
                    self.current = counts
            self.stop.wait(POLL_S)

    def until(self, predicate, timeout_s: float, what: str) -> float:
        """Wait until `predicate(running, all)`; return the monotonic time of the first poll that
        saw it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                for at, running, total in self.changes:
                    if at >= self.since and predicate(running, total):
                        return at
            time.sleep(0.05)
        raise TimeoutError(f"{self.deployment}: timed out after {timeout_s:g}s waiting for {what}")

    def mark(self) -> float:
        """From now on, `until` looks only at what is seen from this moment: the current counts
        (recorded here) and later changes."""
        with self.lock:
            self.since = time.monotonic()
            self.changes.append((self.since, *self.current))
        return self.since

    def __enter__(self) -> Self:
        self.current = self.counts()
        self.since = self.origin
        self.changes.append((time.monotonic(), *self.current))
        return super().__enter__()


def latency(records: list[tuple[str, float, str | None]], phase: str) -> dict[str, Any]:
    ms = np.asarray([s for p, s, _ in records if p == phase]) * 1000
    failed = sum(1 for p, _, e in records if p == phase and e is not None)
    if not len(ms):
        return {"requests": 0, "failed": failed, "p50_ms": None, "p99_ms": None}
    return {"requests": int(len(ms)), "failed": failed,
            "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1)}  # fmt: skip


def scale_up(watch: ReplicaWatch, clients: Clients, phase_s: float) -> tuple[float, float, float]:
    """The scale-up measurement: from 1 RUNNING replica, `LOW` clients for `phase_s` (phase
    "before"), then `HIGH` clients (phase "during") from the onset until a second replica
    exists (decided) and until one is RUNNING (serving). Returns the monotonic times (onset,
    decided, serving); the clients keep sending at `HIGH`."""
    if watch.current[0] != 1:
        watch.until(lambda running, total: running == 1 and total == 1, 60, "1 replica")
    clients.set("before", LOW)
    time.sleep(phase_s)

    onset = watch.mark()
    clients.set("during", HIGH)
    decided = watch.until(lambda running, total: total >= 2, 90, "a second replica to start")
    serving = watch.until(lambda running, total: running >= 2, 90, "a second replica RUNNING")
    return onset, decided, serving


def run_trial(watch: ReplicaWatch, clients: Clients, phase_s: float) -> dict[str, Any]:
    began = watch.mark()
    clients.take()
    onset, decided, serving = scale_up(watch, clients, phase_s)
    time.sleep(phase_s)
    peak = max(r for at, r, _ in watch.changes if at >= onset)

    drop = watch.mark()
    clients.set("after", LOW)
    down = watch.until(lambda running, total: running == 1, 90, "scale back to 1 replica")
    time.sleep(phase_s)
    clients.set("idle", 0)
    time.sleep(0.5)  # the last requests answer
    records = clients.take()
    with watch.lock:
        changes = [(round(at - began, 2), r, t) for at, r, t in watch.changes if at >= began]
    replicas_over_time: list[list[float]] = []
    for at, r, t in changes:  # marks repeat the current counts: keep only changes
        if not replicas_over_time or replicas_over_time[-1][1:] != [r, t]:
            replicas_over_time.append([at, r, t])
    return {
        "scale_up_decided_s": round(decided - onset, 2),
        "scale_up_s": round(serving - onset, 2),
        "scale_down_s": round(down - drop, 2),
        "peak_replicas": peak,
        "before": latency(records, "before"),
        "during": latency(records, "during"),
        "after": latency(records, "after"),
        "failed": sum(1 for _, _, e in records if e is not None),
        "errors": [e for _, _, e in records if e is not None][:5],
        "replicas": replicas_over_time,
    }


def median(values: list[float]) -> float | None:
    return round(float(np.median(values)), 2) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = bench_parser(
        "bench.autoscale",
        __doc__,
        json_help="only the JSON object on stdout (without it, one line per trial first)",
    )
    parser.add_argument("--trials", type=int, default=None,
                        help="scale-up/scale-down cycles (default 3; --smoke 1)")  # fmt: skip
    parser.add_argument("--phase-s", type=float, default=None,
                        help="seconds of each steady phase (default 8; --smoke 3)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true",
                        help="1 short trial: checks that the bench works")  # fmt: skip
    args = parser.parse_args(argv)
    trials = args.trials or (1 if args.smoke else 3)
    phase_s = args.phase_s if args.phase_s is not None else (3.0 if args.smoke else 8.0)
    if trials < 1 or phase_s <= 0:
        parser.error("--trials must be at least 1 and --phase-s positive")

    import ray

    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench-autoscale-"))
    app = LocalApp()
    results: list[dict[str, Any]] = []
    failure: str | None = None
    stdout, sys.stdout = sys.stdout, sys.stderr  # Ray's own print()s go to stderr
    try:
        from tests.support.tiny_models import build_tiny_bert, write_model_config

        log("building a tiny BERT artifact")
        artifact = build_tiny_bert(tmp / "tiny", seed=0)
        version = write_model_config(
            tmp, VERSION, artifact, autoscaling=AUTOSCALING,
            faults={"added_latency_ms": ADDED_LATENCY_MS},
        )  # fmt: skip
        app.start(tmp, [version], router={"stable": VERSION, "weights": {VERSION: 100}})
        log(f"deployed in {time.perf_counter() - started:.0f}s")
        with ReplicaWatch(app) as watch, Clients(app.url) as clients:
            for index in range(trials):
                try:
                    result = run_trial(watch, clients, phase_s)
                except Exception as exc:
                    failure = f"{type(exc).__name__}: {exc}"
                    log(f"trial {index + 1}/{trials} failed: {failure}")
                    break
                results.append(result)
                log(f"trial {index + 1}/{trials}: 1 -> {result['peak_replicas']} replicas, "
                    f"decided {result['scale_up_decided_s']}s and serving {result['scale_up_s']}s "
                    f"after onset; back to 1 {result['scale_down_s']}s after the load dropped; "
                    f"p99 before/during/after {result['before']['p99_ms']}/"
                    f"{result['during']['p99_ms']}/{result['after']['p99_ms']} ms; "
                    f"{result['failed']} failed")  # fmt: skip
    finally:
        app.close()
        sys.stdout = stdout

    failed = sum(r["failed"] for r in results)
    summary: dict[str, Any] = {
        "trials": len(results),
        "scale_up_decided_s": median([r["scale_up_decided_s"] for r in results]),
        "scale_up_s": median([r["scale_up_s"] for r in results]),
        "scale_down_s": median([r["scale_down_s"] for r in results]),
        "peak_replicas": max((r["peak_replicas"] for r in results), default=None),
        **{
            f"p{q}_{phase}_ms": median(
                [r[phase][f"p{q}_ms"] for r in results if r[phase][f"p{q}_ms"] is not None]
            )
            for phase in ("before", "during", "after")
            for q in (50, 99)
        },  # fmt: skip
        "failed_requests": failed,
        "requests": sum(r[p]["requests"] for r in results for p in ("before", "during", "after")),
        "per_trial": results,
        "autoscaling": AUTOSCALING,
        "added_latency_ms": ADDED_LATENCY_MS,
        "clients": {"before": LOW, "during": HIGH, "after": LOW},
        "phase_s": phase_s,
        "smoke": args.smoke,
        "machine": machine(),
        "ray_version": ray.__version__,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    if failure:
        summary["failure"] = failure
    if not args.json:
        for r in results:
            print(json.dumps(r))
    print(json.dumps(summary), flush=True)
    return 1 if (failure or failed or len(results) < trials) else 0


if __name__ == "__main__":
    sys.exit(main())

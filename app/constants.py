"""Tunables of the router <-> controller plumbing, in one place, each overridable from the
environment (as Ray Serve's `_private/constants.py` does): `RAY_ROLLOUT_<NAME>`.

Defaults are what the project is tested and benchmarked with; change them to trade
propagation speed against controller load, not to fix a bug.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)

__all__ = [
    "ADMIN_CALL_TIMEOUT_S",
    "ARTIFACT_CACHE_KEEP",
    "CONTROLLER_RETRY_S",
    "DEFAULT_TICK_INTERVAL_S",
    "DESCRIBE_TIMEOUT_S",
    "GAUGE_INTERVAL_S",
    "GENERATION_EPOCH_STRIDE",
    "GENERATION_WAIT_S",
    "KV_NAMESPACE",
    "KV_TIMEOUT_S",
    "LONG_POLL_TIMEOUT_S",
    "MAX_SHADOW_REPORTS",
    "OUTCOMES_WRITE_INTERVAL_S",
    "OFF_LOOP_PARSE_BYTES",
    "PARSE_SLOTS",
    "PROMETHEUS_MIN_INTERVAL_S",
    "RATE_WINDOW_S",
    "RECENT_REQUEST_IDS",
    "REPLICA_RETRIES",
    "REPLICA_RETRY_PAUSE_S",
    "REPORT_TIMEOUT_S",
    "SERVED_BACKLOG",
    "STATS_PUSH_INTERVAL_S",
    "STATS_PUSH_MIN_GAP_S",
    "TRAFFIC_GENERATION_HEADER",
]


def _env(name: str, default: T, parse: Callable[[str], T]) -> T:
    """`RAY_ROLLOUT_<name>` parsed, or `default`; a value that is not positive is refused."""
    raw = os.environ.get(f"RAY_ROLLOUT_{name}")
    if raw is None:
        return default
    value = parse(raw)
    if not value > 0:
        raise ValueError(f"RAY_ROLLOUT_{name} ({raw}) must be positive")
    return value


def _env_float(name: str, default: float) -> float:
    return _env(name, default, float)


def _env_int(name: str, default: int) -> int:
    return _env(name, default, int)


# The GCS key-value namespace the controller persists rollout state and outcomes in.
KV_NAMESPACE = os.environ.get("RAY_ROLLOUT_KV_NAMESPACE", "ray-rollout")

# Controller: how often it ticks when the declaration does not say (`tick_interval_s`).
DEFAULT_TICK_INTERVAL_S = _env_float("DEFAULT_TICK_INTERVAL_S", 0.25)
# Routers push their per-version stats this often (the gates' evidence is this fresh).
STATS_PUSH_INTERVAL_S = _env_float("STATS_PUSH_INTERVAL_S", 0.25)
# ... or sooner, when a request failed (a candidate's failures are what a rollback waits for),
# but never closer together than this.
STATS_PUSH_MIN_GAP_S = _env_float("STATS_PUSH_MIN_GAP_S", 0.05)
# A stats push that takes longer is abandoned (its answered ids are kept for the next one).
REPORT_TIMEOUT_S = _env_float("REPORT_TIMEOUT_S", 2.0)
# A router's long-poll for traffic returns after this long with no change (then asks again).
LONG_POLL_TIMEOUT_S = _env_float("LONG_POLL_TIMEOUT_S", 10.0)
# The controller's published traffic generations: epoch * this + the replica's publish count,
# so a replica's generations are above every earlier replica's.
GENERATION_EPOCH_STRIDE = 1_000_000_000
# Monotonic reads across Routers: every answer carries the controller generation its Router
# routed with, and a request that echoes a newer one waits this long at most for its Router to
# apply that generation (it is on its way: the skew between Routers was 6-146 ms measured).
TRAFFIC_GENERATION_HEADER = "x-traffic-generation"
# An admin command's idempotency key (the `rollout` CLI, the waves orchestrator and the operator
# page send a fresh one per command): the controller applies a re-sent command once.
IDEMPOTENCY_HEADER = "idempotency-key"
GENERATION_WAIT_S = _env_float("GENERATION_WAIT_S", 0.5)
# How long a router waits before asking an unreachable controller again.
CONTROLLER_RETRY_S = _env_float("CONTROLLER_RETRY_S", 1.0)
# A write to (or read from) the rollout store (Ray's GCS) that takes longer is abandoned.
KV_TIMEOUT_S = _env_float("KV_TIMEOUT_S", 2.0)
# Admin API calls the router forwards to the controller (status, history, commands, feedback).
ADMIN_CALL_TIMEOUT_S = _env_float("ADMIN_CALL_TIMEOUT_S", 10.0)
# version_apps: how long a router waits for a version's replica to describe its model.
DESCRIBE_TIMEOUT_S = _env_float("DESCRIBE_TIMEOUT_S", 5.0)
# Router gauges (weights, availability, breakers, drift) are re-sent this often.
GAUGE_INTERVAL_S = _env_float("GAUGE_INTERVAL_S", 1.0)
# The Prometheus gate's query runs at most this often.
PROMETHEUS_MIN_INTERVAL_S = _env_float("PROMETHEUS_MIN_INTERVAL_S", 1.0)
# `rps` in the controller's status is the request rate over this window.
RATE_WINDOW_S = _env_float("RATE_WINDOW_S", 10.0)

# A request whose replica died under it (and that has no fallback) is retried this many times,
# pausing REPLICA_RETRY_PAUSE_S, then twice that, ..., never past its deadline: Serve's handle
# can pick the dead replica again until it hears of the death.
REPLICA_RETRIES = _env_int("REPLICA_RETRIES", 4)
REPLICA_RETRY_PAUSE_S = _env_float("REPLICA_RETRY_PAUSE_S", 0.1)

# Answered request ids a router keeps for its next push (a controller that is away must not
# grow it without end; the newest are kept).
SERVED_BACKLOG = _env_int("SERVED_BACKLOG", 200_000)
# Answered request ids a router remembers itself, for feedback that beats its push.
RECENT_REQUEST_IDS = _env_int("RECENT_REQUEST_IDS", 50_000)
# The controller writes its outcome book (feedback counts) to the store at most this often,
# not at every tick: under a feedback flood every tick had a changed book to write.
OUTCOMES_WRITE_INTERVAL_S = _env_float("OUTCOMES_WRITE_INTERVAL_S", 1.0)
# Shadow comparison reports the controller keeps.
MAX_SHADOW_REPORTS = _env_int("MAX_SHADOW_REPORTS", 100_000)
# A request body this large or larger is parsed in a worker thread, not on the router's event
# loop, and at most PARSE_SLOTS such bodies are parsed at once per router replica (a parsed JSON
# body takes ~20x its size in memory).
OFF_LOOP_PARSE_BYTES = _env_int("OFF_LOOP_PARSE_BYTES", 256 * 1024)
PARSE_SLOTS = _env_int("PARSE_SLOTS", 2)
# Registry versions (`mlflow:` artifacts) a node keeps in its artifact cache: after a download
# the least recently loaded copies beyond this many are deleted (app/serving/artifacts.py).
ARTIFACT_CACHE_KEEP = _env_int("ARTIFACT_CACHE_KEEP", 8)
